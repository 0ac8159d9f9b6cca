"""
End-to-end tests of bungate.http.tunnel (and .tunnels, .takeover) over real sockets on 127.0.0.1.

autobahn clients talk to an autobahn echo server through a tiny in-test proxy, standing in
for the gateway: for each client connection it reads the upgrade head, connects to the echo
server, forwards the head, reads the 101 back and hands both connections to a
:class:`~bungate.http.tunnel.Tunnel` (the 101 is written as the tunnel's ``client_head``).
A raw client (plain bytes, frames built by hand) covers what autobahn would not do: frames
sent with the handshake, frames cut in the middle, broken frames. One test hands over from
a real twisted.web ``HTTPChannel``, as the gateway will.

Waiting is on events: every protocol here reports changes to a :class:`Watch`, whose
conditions are checked then; each wait has a deadline.
"""

from __future__ import annotations

import hashlib
import select
import time
from typing import Any, Callable, List, Optional, Tuple

import pytest
import pytest_twisted
import trustme
from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from twisted.internet import defer
from twisted.internet import reactor as _reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, PrivateCertificate, optionsForClientTLS
from twisted.internet.task import Clock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.web import resource, server
from zope.interface import implementer

from bungate.core.wsframe import BINARY, CLOSE, TEXT, close_frame
from bungate.http.takeover import channel_leftover
from bungate.http.transport import EagerPort, make_eager
from bungate.http.tunnel import (
    CLIENT_PROTOCOL_ERROR,
    DRAIN,
    IDLE_TIMEOUT,
    UPSTREAM_CLOSED,
    Tunnel,
)
from bungate.http.tunnels import Tunnels
from bungate.testing import wait_until
from tests.core.test_wsframe import reference_frame

reactor: Any = _reactor
TIMEOUT = 20.0
MIB = 1024 * 1024
KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
#: No size limits; and autobahn's own timeouts long enough never to decide a test: txaio
#: rounds a timer's deadline down to a whole second, so its 1 s close handshake timeout
#: may fire after a few milliseconds.
AUTOBAHN_OPTIONS = {
    "maxFramePayloadSize": 0,
    "maxMessagePayloadSize": 0,
    "openHandshakeTimeout": 30,
    "closeHandshakeTimeout": 30,
}


# --- waiting on events --------------------------------------------------------------------


class Watch:
    """Conditions waited for; checked whenever a watched protocol reports a change."""

    def __init__(self) -> None:
        self._waiting: List[Tuple[Callable[[], Any], defer.Deferred[None]]] = []

    def until(self, condition: Callable[[], Any], what: str, timeout: float = TIMEOUT) -> Any:
        if condition():
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._waiting.append((condition, d))

        def expired(result: Any, after: float) -> None:
            if isinstance(result, Failure):
                result.trap(defer.CancelledError)
            raise defer.TimeoutError(f"timed out after {after}s waiting for {what}")

        d.addTimeout(timeout, reactor, onTimeoutCancel=expired)
        return d

    def changed(self) -> None:
        for entry in list(self._waiting):
            condition, d = entry
            if d.called:
                self._waiting.remove(entry)
            elif condition():
                self._waiting.remove(entry)
                d.callback(None)


def pattern(n: int, seed: int = 0) -> bytes:
    """``n`` bytes that differ from one position (and one seed) to the next."""
    block = hashlib.sha256(b"%d" % seed).digest() * 2048  # 64 KiB
    return (block * (n // len(block) + 1))[:n]


# --- the upstream: an autobahn echo server ------------------------------------------------


@implementer(IPushProducer)
class Streamer:
    """Sends ``total`` bytes as binary messages of ``chunk`` bytes, as fast as allowed."""

    def __init__(self, protocol: EchoServer, total: int, chunk: int) -> None:
        self.protocol = protocol
        self.total = total
        self.chunk = chunk
        self.sent = 0
        self.paused = False
        self.pauses = 0
        self.sha = hashlib.sha256()

    def pump(self) -> None:
        while not self.paused and self.sent < self.total:
            n = min(self.chunk, self.total - self.sent)
            data = pattern(n, seed=self.sent // self.chunk)
            self.sha.update(data)
            self.sent += n
            self.protocol.sendMessage(data, isBinary=True)
        if self.sent >= self.total:
            self.protocol.unregisterProducer()
        self.protocol.factory.watch.changed()

    def pauseProducing(self) -> None:
        self.paused = True
        self.pauses += 1
        self.protocol.factory.watch.changed()

    def resumeProducing(self) -> None:
        self.paused = False
        self.pump()

    def stopProducing(self) -> None:
        self.paused = True


class EchoServer(WebSocketServerProtocol):
    """Echoes messages; text messages ``cmd:...`` ask for something else."""

    def __init__(self) -> None:
        super().__init__()
        self.path = ""
        self.opened = False
        self.messages: List[Tuple[bytes, bool]] = []
        self.pongs: List[bytes] = []
        self.close_info: Optional[Tuple[bool, Any, Any]] = None
        self.streamer: Optional[Streamer] = None

    def onConnect(self, request: Any) -> None:
        self.path = request.path
        self.factory.servers.append(self)

    def onOpen(self) -> None:
        self.opened = True
        if self.path == "/welcome":
            self.sendMessage(b"welcome")
        self.factory.watch.changed()

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.messages.append((payload, isBinary))
        if not isBinary and payload.startswith(b"cmd:"):
            words = payload[4:].decode().split()
            if words[0] == "close":
                self.sendClose(int(words[1]), "server bye")
            elif words[0] == "stream":
                self.streamer = Streamer(self, int(words[1]), int(words[2]))
                self.registerProducer(self.streamer, True)
                self.streamer.pump()
            elif words[0] == "fragmented":
                size, fragment = int(words[1]), int(words[2])
                self.sendMessage(pattern(size, 7), isBinary=True, fragmentSize=fragment)
            elif words[0] == "ping":
                self.sendPing(words[1].encode())
        else:
            self.sendMessage(payload, isBinary)
        self.factory.watch.changed()

    def onPong(self, payload: bytes) -> None:
        self.pongs.append(payload)
        self.factory.watch.changed()

    def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:
        self.close_info = (wasClean, code, reason)
        self.factory.watch.changed()


# --- the clients ---------------------------------------------------------------------------


class Client(WebSocketClientProtocol):
    """An autobahn client that records what it gets."""

    def __init__(self) -> None:
        super().__init__()
        self.opened = False
        self.messages: List[Tuple[bytes, bool]] = []
        self.pongs: List[bytes] = []
        self.close_info: Optional[Tuple[bool, Any, Any]] = None
        self.count_only = False  # keep a length and a digest instead of the messages
        self.received = 0
        self.sha = hashlib.sha256()

    def onOpen(self) -> None:
        self.opened = True
        self.factory.watch.changed()

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.count_only:
            self.received += len(payload)
            self.sha.update(payload)
        else:
            self.messages.append((payload, isBinary))
        self.factory.watch.changed()

    def onPong(self, payload: bytes) -> None:
        self.pongs.append(payload)
        self.factory.watch.changed()

    def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:
        self.close_info = (wasClean, code, reason)
        self.factory.watch.changed()


class EchoFactory(WebSocketServerFactory):
    protocol = EchoServer

    def __init__(self, watch: Watch) -> None:
        super().__init__()
        self.watch = watch
        self.servers: List[EchoServer] = []


class ClientFactory(WebSocketClientFactory):
    protocol = Client

    def __init__(self, watch: Watch, url: str) -> None:
        super().__init__(url)
        self.watch = watch


class RawClient(Protocol):
    """Bytes in, bytes out: for what a well-behaved WebSocket client would not send."""

    def __init__(self, watch: Watch) -> None:
        self.watch = watch
        self.data = b""
        self.lost = False

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        self.watch.changed()

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:
        self.lost = True
        self.watch.changed()

    @property
    def after_head(self) -> Optional[bytes]:
        _, sep, rest = self.data.partition(b"\r\n\r\n")
        return rest if sep else None


def upgrade_head(path: str = "/", host: str = "localhost") -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        f"Sec-WebSocket-Key: {KEY.decode()}\r\n\r\n"
    ).encode()


def masked(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    return reference_frame(opcode, payload, fin, b"\x0f\x1e\x2d\x3c")


def server_frames(data: bytes) -> List[Tuple[int, bytes]]:
    """Whole unmasked frames (short or 16-bit lengths) at the start of ``data``."""
    frames = []
    while len(data) >= 2:
        length, start = data[1] & 0x7F, 2
        if length == 126:
            length, start = int.from_bytes(data[2:4], "big"), 4
        if len(data) < start + length:
            break
        frames.append((data[0] & 0x0F, data[start : start + length]))
        data = data[start + length :]
    return frames


# --- the in-test proxy ---------------------------------------------------------------------


class Front(Protocol):
    """A client connection of the mini proxy, until it becomes half of a tunnel."""

    def __init__(self, proxy: MiniProxy) -> None:
        self.proxy = proxy
        self.buffer = b""
        self.head: Optional[bytes] = None
        self.back: Optional[Back] = None
        self.tunnel: Optional[Tunnel] = None
        self.leftover = b""

    def connectionMade(self) -> None:
        self.wire: Any = self.transport  # take_over sets self.transport to None
        self.proxy.fronts.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if self.head is None:
            head, sep, rest = self.buffer.partition(b"\r\n\r\n")
            if not sep:
                return
            self.head, self.buffer = head + sep, rest
        if self.back is None and len(self.buffer) >= self.proxy.wait_client_leftover:
            self.back = Back(self)
            endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.proxy.upstream_port)
            connectProtocol(endpoint, self.back)

    def upgraded(self, back: Back, head: bytes, rest: bytes) -> None:
        self.leftover, self.buffer = self.buffer, b""
        if not head.startswith(b"HTTP/1.1 101"):
            self.transport.write(head + rest)  # type: ignore[union-attr]
            self.transport.loseConnection()  # type: ignore[union-attr]
            back.transport.loseConnection()  # type: ignore[union-attr]
            return
        tunnel = self.proxy.tunnels.try_open(
            self.transport,
            back.transport,
            client_leftover=self.leftover,
            upstream_leftover=rest,
            client_head=head,
        )
        if tunnel is None:
            self.transport.write(  # type: ignore[union-attr]
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                b"Connection: close\r\n\r\n"
            )
            self.transport.loseConnection()  # type: ignore[union-attr]
            back.transport.loseConnection()  # type: ignore[union-attr]
        else:
            self.tunnel = tunnel
            self.proxy.opened.append(tunnel)
        self.proxy.watch.changed()


class Back(Protocol):
    """The mini proxy's connection to the echo server, until the 101 is read."""

    def __init__(self, front: Front) -> None:
        self.front = front
        self.buffer = b""
        self.handed_over = False

    def connectionMade(self) -> None:
        self.wire: Any = self.transport
        if self.front.proxy.eager:
            make_eager(self.transport)  # as the upstream pool does
        assert self.front.head is not None
        self.transport.write(self.front.head)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        head, sep, rest = self.buffer.partition(b"\r\n\r\n")
        if not sep or (self.front.proxy.hold_upstream_leftover and not rest):
            return
        self.handed_over = True
        self.front.upgraded(self, head + sep, rest)


class _FrontFactory(Factory):
    def __init__(self, proxy: MiniProxy) -> None:
        self.proxy = proxy

    def buildProtocol(self, addr: Any) -> Front:
        return Front(self.proxy)


class MiniProxy:
    """Upgrade, then tunnel: the part of the gateway under test, and nothing else."""

    def __init__(
        self,
        upstream_port: int,
        tunnels: Tunnels,
        watch: Watch,
        tls: Any = None,
        eager: bool = False,
        hold_upstream_leftover: bool = False,
        wait_client_leftover: int = 0,
    ) -> None:
        self.upstream_port = upstream_port
        self.tunnels = tunnels
        self.watch = watch
        self.tls = tls
        self.eager = eager
        self.hold_upstream_leftover = hold_upstream_leftover
        self.wait_client_leftover = wait_client_leftover
        self.fronts: List[Front] = []
        self.opened: List[Tunnel] = []
        self.port: Any = None

    def listen(self) -> int:
        factory: Any = _FrontFactory(self)
        if self.tls is not None:
            factory = TLSMemoryBIOFactory(self.tls, False, factory)
        if self.eager:
            self.port = EagerPort(0, factory, interface="127.0.0.1", reactor=reactor)
            self.port.startListening()
        else:
            self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        return int(self.port.getHost().port)


# --- fixtures ------------------------------------------------------------------------------


class Harness:
    """One echo server, and proxies with their tunnel registries, for one test."""

    def __init__(self, ca: trustme.CA) -> None:
        self.watch = Watch()
        self.ca = ca
        leaf = ca.issue_cert("localhost", "127.0.0.1")
        self.server_tls = PrivateCertificate.loadPEM(
            leaf.private_key_and_cert_chain_pem.bytes().decode()
        ).options()
        self.client_tls = optionsForClientTLS(
            "localhost", trustRoot=Certificate.loadPEM(ca.cert_pem.bytes())
        )
        factory = EchoFactory(self.watch)
        factory.setProtocolOptions(**AUTOBAHN_OPTIONS)
        self.upstream_factory = factory
        self.upstream_port_object = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.upstream_port = self.upstream_port_object.getHost().port
        self.proxies: List[MiniProxy] = []
        self.clients: List[Any] = []
        self.closed: List[Tuple[Tunnel, str]] = []
        self.ports: List[Any] = [self.upstream_port_object]

    @property
    def servers(self) -> List[EchoServer]:
        return list(self.upstream_factory.servers)

    def proxy(
        self,
        tls: bool = False,
        clock: Any = None,
        max_open: Optional[int] = None,
        idle_timeout: float = 60.0,
        **kw: Any,
    ) -> Tuple[MiniProxy, int]:
        def on_closed(tunnel: Tunnel, reason: str) -> None:
            self.closed.append((tunnel, reason))
            self.watch.changed()

        tunnels = Tunnels(
            clock if clock is not None else reactor,
            max_open=max_open,
            idle_timeout=idle_timeout,
            on_closed=on_closed,
        )
        proxy = MiniProxy(
            self.upstream_port,
            tunnels,
            self.watch,
            tls=self.server_tls if tls else None,
            **kw,
        )
        port = proxy.listen()
        self.proxies.append(proxy)
        self.ports.append(proxy.port)
        return proxy, port

    @defer.inlineCallbacks
    def client(self, port: int, tls: bool = False, path: str = "/", wait: bool = True) -> Any:
        scheme = "wss" if tls else "ws"
        factory = ClientFactory(self.watch, f"{scheme}://localhost:{port}{path}")
        factory.setProtocolOptions(serverConnectionDropTimeout=30, **AUTOBAHN_OPTIONS)
        endpoint: Any = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        if tls:
            endpoint = wrapClientTLS(self.client_tls, endpoint)
        client = yield endpoint.connect(factory)
        self.clients.append(client)
        if wait:
            yield self.watch.until(lambda: client.opened or client.close_info, "the handshake")
            assert client.opened, client.close_info
        return client

    @defer.inlineCallbacks
    def raw(self, port: int, tls: bool = False) -> Any:
        endpoint: Any = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        if tls:
            endpoint = wrapClientTLS(self.client_tls, endpoint)
        raw = RawClient(self.watch)
        yield connectProtocol(endpoint, raw)
        self.clients.append(raw)
        return raw

    def until(self, condition: Callable[[], Any], what: str, timeout: float = TIMEOUT) -> Any:
        return self.watch.until(condition, what, timeout)

    def tunnel_closed(self, tunnel: Tunnel) -> Any:
        return tunnel.when_closed().addTimeout(TIMEOUT, reactor)

    @defer.inlineCallbacks
    def stop(self) -> Any:
        for proxy in self.proxies:
            for tunnel in proxy.opened:
                if not tunnel.closed:
                    tunnel.abort()
        for protocol in [*self.clients, *self.servers]:
            transport = getattr(protocol, "transport", None)
            if transport is not None and getattr(transport, "connected", False):
                transport.abortConnection()
        for port in self.ports:
            yield port.stopListening()


@pytest.fixture
def harness() -> Any:
    h = Harness(trustme.CA())
    yield h
    pytest_twisted.blockon(h.stop())


both_transports = pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])


def only(items: List[Any]) -> Any:
    assert len(items) == 1, items
    return items[0]


# --- messages ------------------------------------------------------------------------------


@both_transports
@pytest_twisted.inlineCallbacks
def test_text_binary_and_ping_pong_both_ways(harness: Harness, tls: bool) -> Any:
    proxy, port = harness.proxy(tls=tls)
    client = yield harness.client(port, tls=tls)
    tunnel = only(proxy.opened)
    server_ = only(harness.servers)

    client.sendMessage("héllo".encode())
    yield harness.until(lambda: client.messages, "the text echo")
    assert client.messages == [("héllo".encode(), False)]

    blob = bytes(range(256)) * 5
    client.sendMessage(blob, isBinary=True)
    yield harness.until(lambda: len(client.messages) == 2, "the binary echo")
    assert client.messages[1] == (blob, True)

    client.sendPing(b"from-client")
    yield harness.until(lambda: client.pongs, "the pong")
    assert client.pongs == [b"from-client"]

    client.sendMessage(b"cmd:ping from-server")
    yield harness.until(lambda: server_.pongs, "the client's pong")
    assert server_.pongs == [b"from-server"]

    assert server_.messages[:2] == [("héllo".encode(), False), (blob, True)]
    # client: 2 data, ping, the command, pong; upstream: 2 echoes, pong, ping
    assert tunnel.client_frames == 5 and tunnel.upstream_frames == 4
    assert tunnel.client_to_upstream > len(blob) and tunnel.upstream_to_client > len(blob)
    totals = proxy.tunnels.totals()
    assert totals.open == 1 and totals.opened == 1
    assert totals.client_to_upstream == tunnel.client_to_upstream

    client.sendClose(1000)
    yield harness.tunnel_closed(tunnel)
    assert proxy.tunnels.open == 0
    assert [reason for _, reason in harness.closed] == [UPSTREAM_CLOSED], harness.closed


@both_transports
@pytest_twisted.inlineCallbacks
def test_fragmented_messages_both_ways(harness: Harness, tls: bool) -> Any:
    proxy, port = harness.proxy(tls=tls)
    client = yield harness.client(port, tls=tls)
    tunnel = only(proxy.opened)

    blob = pattern(100_000, 3)
    client.sendMessage(blob, isBinary=True, fragmentSize=4096)
    text = ("é" * 3000 + "ü").encode()  # fragments cut characters in half
    client.sendMessage(text, isBinary=False, fragmentSize=777)
    yield harness.until(lambda: len(client.messages) == 2, "the echoes")
    assert client.messages == [(blob, True), (text, False)]
    assert tunnel.client_frames == 25 + 8

    client.sendMessage(b"cmd:fragmented 50000 1000")
    yield harness.until(lambda: len(client.messages) == 3, "the fragmented message")
    assert client.messages[2] == (pattern(50000, 7), True)
    # The echoes went back whole; autobahn ends an exact multiple of the fragment size
    # with an empty final continuation frame: 50 + 1.
    assert tunnel.upstream_frames == 1 + 1 + 51


@both_transports
@pytest_twisted.inlineCallbacks
def test_close_code_from_the_client_reaches_the_upstream(harness: Harness, tls: bool) -> Any:
    proxy, port = harness.proxy(tls=tls)
    client = yield harness.client(port, tls=tls)
    client.sendClose(4001, "client bye")
    server_ = only(harness.servers)
    yield harness.until(lambda: client.close_info and server_.close_info, "both ends")
    assert server_.close_info == (True, 4001, "client bye")
    assert client.close_info[:2] == (True, 1000)  # autobahn's answer, passed back
    yield harness.tunnel_closed(only(proxy.opened))


@both_transports
@pytest_twisted.inlineCallbacks
def test_close_code_from_the_upstream_reaches_the_client(harness: Harness, tls: bool) -> Any:
    proxy, port = harness.proxy(tls=tls)
    client = yield harness.client(port, tls=tls)
    client.sendMessage(b"cmd:close 4002")
    server_ = only(harness.servers)
    yield harness.until(lambda: client.close_info and server_.close_info, "both ends")
    assert client.close_info == (True, 4002, "server bye")
    assert server_.close_info is not None and server_.close_info[:2] == (True, 1000)
    tunnel = only(proxy.opened)
    yield harness.tunnel_closed(tunnel)
    assert tunnel.reason == UPSTREAM_CLOSED


@pytest_twisted.inlineCallbacks
def test_a_ten_mib_message(harness: Harness) -> Any:
    proxy, port = harness.proxy()
    client = yield harness.client(port)
    blob = pattern(10 * MIB, 11)
    client.sendMessage(blob, isBinary=True)
    yield harness.until(lambda: client.messages, "the 10 MiB echo", timeout=60)
    payload, binary = only(client.messages)
    assert binary and len(payload) == len(blob)
    assert hashlib.sha256(payload).digest() == hashlib.sha256(blob).digest()
    tunnel = only(proxy.opened)
    assert tunnel.client_to_upstream > 10 * MIB and tunnel.upstream_to_client > 10 * MIB


# --- backpressure --------------------------------------------------------------------------


def buffered(transport: Any) -> int:
    """Bytes a TCP transport holds for its peer (the gateway's memory for that side)."""
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


@pytest.mark.parametrize("eager", [False, True], ids=["twisted-writes", "eager-writes"])
@pytest_twisted.inlineCallbacks
def test_a_client_that_stops_reading_pauses_the_upstream(harness: Harness, eager: bool) -> Any:
    total, chunk = 50 * MIB, 64 * 1024
    proxy, port = harness.proxy(eager=eager)
    client = yield harness.client(port)
    client.count_only = True
    front = only(proxy.fronts)
    assert front.back is not None
    to_client, from_upstream = front.wire, front.back.wire
    assert type(from_upstream).__name__ == ("EagerClient" if eager else "Client")

    # Measure what the gateway holds for the client at every write it makes.
    peak = [0]
    write = to_client.write

    def measured_write(data: bytes) -> None:
        write(data)
        peak[0] = max(peak[0], buffered(to_client))

    to_client.write = measured_write
    pauses = [0]
    pause = from_upstream.pauseProducing

    def counted_pause() -> None:
        pauses[0] += 1
        pause()
        harness.watch.changed()

    from_upstream.pauseProducing = counted_pause

    client.transport.pauseProducing()  # the client stops reading
    client.sendMessage(b"cmd:stream %d %d" % (total, chunk))
    server_ = only(harness.servers)
    yield harness.until(lambda: server_.streamer is not None, "the stream to start")
    streamer = server_.streamer
    assert streamer is not None

    def stalled() -> bool:
        # Steady, not a passing moment: the kernel takes no more bytes for the client
        # (its socket is not writable), the gateway has stopped reading the upstream,
        # and the upstream has stopped sending. Only the client reading changes that.
        _, writable, _ = select.select([], [to_client.socket], [], 0)
        return bool(
            not writable
            and streamer.paused
            and pauses[0]
            and from_upstream not in reactor.getReaders()
        )

    yield wait_until(reactor, stalled, TIMEOUT, what="the stream to stall")
    tunnel = only(proxy.opened)
    assert streamer.sent < total / 2, streamer.sent
    assert tunnel.upstream_to_client < total / 2
    assert peak[0] < 4 * MIB, peak[0]

    client.transport.resumeProducing()  # reading again: everything arrives, intact
    yield harness.until(lambda: client.received >= total, "the whole stream", timeout=120)
    assert client.received == total == streamer.sent
    assert client.sha.digest() == streamer.sha.digest()
    assert peak[0] < 4 * MIB, peak[0]
    assert streamer.pauses > 0 and pauses[0] > 0


# --- idle timeout --------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_idle_timeout_closes_both_sides(harness: Harness) -> Any:
    clock = Clock()
    proxy, port = harness.proxy(clock=clock, idle_timeout=30)
    client = yield harness.client(port)
    tunnel = only(proxy.opened)
    server_ = only(harness.servers)

    clock.advance(29)
    client.sendMessage(b"still here")  # activity at t=29 (both ways)
    yield harness.until(lambda: client.messages, "the echo")
    clock.advance(1)  # t=30: 1 s idle only
    assert tunnel.reason is None
    clock.advance(28)  # t=58
    assert tunnel.reason is None
    clock.advance(1)  # t=59: 30 s without a byte
    assert tunnel.reason == IDLE_TIMEOUT
    yield harness.tunnel_closed(tunnel)
    yield harness.until(lambda: client.close_info and server_.close_info, "both ends")
    assert client.close_info[:2] == (False, 1006)  # no close frame: the TCP connection
    assert server_.close_info is not None and server_.close_info[:2] == (False, 1006)
    assert [reason for _, reason in harness.closed] == [IDLE_TIMEOUT]


# --- drain ---------------------------------------------------------------------------------


@both_transports
@pytest_twisted.inlineCallbacks
def test_going_away_sends_1001_both_ways_and_ends_within_the_grace(
    harness: Harness, tls: bool
) -> Any:
    proxy, port = harness.proxy(tls=tls)
    clients = []
    for _ in range(3):
        client = yield harness.client(port, tls=tls)
        client.sendMessage(b"before")
        clients.append(client)
    yield harness.until(lambda: all(c.messages for c in clients), "the echoes")

    grace = 5.0
    started = time.monotonic()
    yield proxy.tunnels.going_away_all(grace).addTimeout(TIMEOUT, reactor)
    elapsed = time.monotonic() - started
    assert elapsed < grace, elapsed
    yield harness.until(
        lambda: all(c.close_info for c in clients) and all(s.close_info for s in harness.servers),
        "every end to see the close",
    )
    for client in clients:
        assert client.close_info[:2] == (True, 1001)
    for server_ in harness.servers:
        assert server_.close_info is not None and server_.close_info[:2] == (True, 1001)
    assert [reason for _, reason in harness.closed] == [DRAIN] * 3
    assert not proxy.tunnels.has_room  # a draining worker opens no tunnel

    refused = yield harness.client(port, tls=tls, wait=False)
    yield harness.until(lambda: refused.close_info, "the refused handshake")
    assert not refused.opened and proxy.tunnels.refused == 1


@pytest_twisted.inlineCallbacks
def test_going_away_waits_for_the_frame_in_progress(harness: Harness) -> Any:
    proxy, port = harness.proxy()
    raw = yield harness.raw(port)
    raw.transport.write(upgrade_head())
    yield harness.until(lambda: raw.after_head is not None, "the 101")
    assert raw.data.startswith(b"HTTP/1.1 101")
    tunnel = only(proxy.opened)
    server_ = only(harness.servers)
    yield harness.until(lambda: server_.opened, "the upstream to open")

    frame = masked(BINARY, pattern(1000, 5))
    raw.transport.write(frame[:300])
    yield wait_until(reactor, lambda: tunnel.client_to_upstream == 300, TIMEOUT, what="300 B")

    started = time.monotonic()
    tunnel.going_away(5.0, b"restarting")
    # To the client, at a boundary now: our close frame goes out at once.
    going_away = close_frame(1001, b"restarting")
    yield harness.until(lambda: raw.after_head == going_away, "the close frame to the client")
    # To the upstream, in the middle of a frame: not yet.
    assert server_.close_info is None and not server_.messages

    raw.transport.write(frame[300:] + masked(TEXT, b"after our close: dropped"))
    yield harness.until(lambda: server_.close_info and raw.lost, "both ends to close")
    assert server_.messages == [(pattern(1000, 5), True)]  # the frame, whole
    assert server_.close_info is not None
    assert server_.close_info[:3] == (True, 1001, "restarting")
    assert raw.after_head == going_away  # nothing from the upstream after it
    yield harness.tunnel_closed(tunnel)
    assert tunnel.reason == DRAIN and time.monotonic() - started < 5.0


@pytest_twisted.inlineCallbacks
def test_going_away_closes_a_frame_that_never_ends(harness: Harness) -> Any:
    clock = Clock()
    proxy, port = harness.proxy(clock=clock)
    raw = yield harness.raw(port)
    raw.transport.write(upgrade_head())
    yield harness.until(lambda: raw.after_head is not None, "the 101")
    tunnel = only(proxy.opened)
    server_ = only(harness.servers)
    frame = masked(BINARY, pattern(5000, 5))
    raw.transport.write(frame[:100])
    yield wait_until(reactor, lambda: tunnel.client_to_upstream == 100, TIMEOUT, what="100 B")

    tunnel.going_away(2.0)
    yield harness.until(lambda: raw.after_head == close_frame(1001), "the close to the client")
    clock.advance(1.9)
    assert tunnel.reason == DRAIN and not tunnel.closed
    clock.advance(0.1)  # the grace is over: no boundary came, the connections go
    yield harness.until(lambda: raw.lost and server_.close_info, "both ends to be cut")
    assert server_.close_info is not None and server_.close_info[:2] == (False, 1006)
    assert not server_.messages
    yield harness.tunnel_closed(tunnel)


# --- handing over ------------------------------------------------------------------------


@both_transports
@pytest_twisted.inlineCallbacks
def test_leftovers_are_relayed_first(harness: Harness, tls: bool) -> Any:
    early = masked(TEXT, b"early")
    proxy, port = harness.proxy(
        tls=tls, hold_upstream_leftover=True, wait_client_leftover=len(early)
    )
    raw = yield harness.raw(port, tls=tls)
    raw.transport.write(upgrade_head("/welcome") + early)  # a frame with the handshake
    yield harness.until(
        lambda: raw.after_head is not None and len(server_frames(raw.after_head)) == 2,
        "the welcome and the echo",
    )
    front = only(proxy.fronts)
    assert front.leftover == early
    # The upstream's first frame came with its 101: it is relayed first, then the echo.
    assert server_frames(raw.after_head) == [(TEXT, b"welcome"), (TEXT, b"early")]
    assert only(harness.servers).messages == [(b"early", False)]


@pytest_twisted.inlineCallbacks
def test_cap_refuses_tunnels_beyond_max_open(harness: Harness) -> Any:
    proxy, port = harness.proxy(max_open=1)
    first = yield harness.client(port)
    second = yield harness.client(port, wait=False)
    yield harness.until(lambda: second.close_info, "the refused handshake")
    assert not second.opened
    assert proxy.tunnels.refused == 1 and proxy.tunnels.open == 1
    assert proxy.tunnels.totals().refused == 1
    first.sendClose(1000)
    yield harness.tunnel_closed(only(proxy.opened))
    third = yield harness.client(port)
    assert third.opened and proxy.tunnels.totals().opened == 2


@pytest_twisted.inlineCallbacks
def test_a_broken_frame_closes_both_sides_after_the_valid_ones(harness: Harness) -> Any:
    proxy, port = harness.proxy()
    raw = yield harness.raw(port)
    raw.transport.write(upgrade_head())
    yield harness.until(lambda: raw.after_head is not None, "the 101")
    server_ = only(harness.servers)
    unmasked = reference_frame(TEXT, b"bad", True, None)
    raw.transport.write(masked(TEXT, b"ok") + unmasked)
    yield harness.until(lambda: raw.lost and server_.close_info, "both ends to close")
    assert server_.messages == [(b"ok", False)]
    tunnel = only(proxy.opened)
    yield harness.tunnel_closed(tunnel)
    assert tunnel.reason == CLIENT_PROTOCOL_ERROR


class UpgradeThroughTwistedWeb(resource.Resource):
    """
    What the gateway will do, on twisted.web: forward the upgrade, read the 101, take the
    channel's transport over.
    """

    isLeaf = True

    def __init__(self, harness: Harness, tunnels: Tunnels) -> None:
        super().__init__()
        self.harness = harness
        self.tunnels = tunnels
        self.leftovers: List[bytes] = []
        self.channels: List[Any] = []
        self.tunnels_opened: List[Tunnel] = []

    def render_GET(self, request: Any) -> Any:
        head = b"GET %s HTTP/1.1\r\n" % request.uri
        for name, values in request.requestHeaders.getAllRawHeaders():
            head += b"%s: %s\r\n" % (name, b",".join(values))
        head += b"\r\n"
        web = self

        class Upstream(Protocol):
            buffer = b""

            def connectionMade(self) -> None:
                self.transport.write(head)  # type: ignore[union-attr]

            def dataReceived(self, data: bytes) -> None:
                self.buffer += data
                answer, sep, rest = self.buffer.partition(b"\r\n\r\n")
                if sep:
                    web.upgraded(request, self, answer + sep, rest)

        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.harness.upstream_port)
        connectProtocol(endpoint, Upstream())
        return server.NOT_DONE_YET

    def upgraded(self, request: Any, upstream: Any, head: bytes, rest: bytes) -> None:
        channel = request.channel
        leftover = channel_leftover(channel)
        self.leftovers.append(leftover)
        tunnel = self.tunnels.try_open(
            channel.transport,
            upstream.transport,
            client_leftover=leftover,
            upstream_leftover=rest,
            client_head=head,
        )
        assert tunnel is not None
        self.channels.append(channel)
        self.tunnels_opened.append(tunnel)
        self.harness.watch.changed()


@both_transports
@pytest_twisted.inlineCallbacks
def test_take_over_from_a_twisted_web_channel(harness: Harness, tls: bool) -> Any:
    tunnels = Tunnels(reactor, idle_timeout=60)
    web = UpgradeThroughTwistedWeb(harness, tunnels)
    factory: Any = server.Site(web, timeout=60)
    if tls:
        factory = TLSMemoryBIOFactory(harness.server_tls, False, factory)
    port_object = reactor.listenTCP(0, factory, interface="127.0.0.1")
    harness.ports.append(port_object)
    raw = yield harness.raw(port_object.getHost().port, tls=tls)

    early = masked(TEXT, b"sent with the handshake")
    raw.transport.write(upgrade_head() + early)
    yield harness.until(
        lambda: raw.after_head is not None and server_frames(raw.after_head), "the echo"
    )
    assert raw.data.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert web.leftovers == [early]  # the channel had read it; the tunnel relayed it
    assert server_frames(raw.after_head) == [(TEXT, b"sent with the handshake")]
    channel = only(web.channels)
    assert channel.transport is None  # the channel is retired
    tunnel = only(web.tunnels_opened)

    raw.transport.write(masked(BINARY, pattern(60_000, 9)))
    yield harness.until(lambda: len(server_frames(raw.after_head)) == 2, "the second echo")
    assert server_frames(raw.after_head)[1] == (BINARY, pattern(60_000, 9))
    raw.transport.write(masked(CLOSE, (1000).to_bytes(2, "big")))
    reason = yield harness.tunnel_closed(tunnel)
    assert reason == UPSTREAM_CLOSED
    yield harness.until(lambda: raw.lost, "the client's connection to close")
    assert server_frames(raw.after_head)[2] == (CLOSE, (1000).to_bytes(2, "big"))


def test_going_away_all_without_tunnels_fires_at_once_and_refuses_new_ones() -> None:
    tunnels = Tunnels(Clock(), max_open=10)
    fired: List[Any] = []
    tunnels.going_away_all(1.0).addCallback(fired.append)
    assert fired == [None]
    untouched = object()
    assert tunnels.try_open(untouched, untouched) is None
    assert tunnels.totals().refused == 1 and tunnels.open == 0
