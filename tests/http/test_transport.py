"""Eager TCP transports (bungate/transport.py), on real sockets on 127.0.0.1."""

from __future__ import annotations

import io
import socket
from typing import Any, List

import pytest
import pytest_twisted
from twisted.internet import defer, error, protocol, tcp
from twisted.internet import reactor as _reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.testing import StringTransport
from twisted.protocols.basic import FileSender

from bungate.http import transport
from bungate.http.transport import (
    EagerClient,
    EagerPort,
    EagerServer,
    eager_writes,
    make_eager,
    missing_internals,
)
from bungate.testing import wait_until


class SendSpy:
    """Stands in for a transport's socket and records every send."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.sends: List[bytes] = []

    def send(self, data: Any) -> int:
        n = self._sock.send(data)
        self.sends.append(bytes(data[:n]))
        return n

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class Server(protocol.Protocol):
    """The accepted side; each test sets ``on_data``."""

    def __init__(self) -> None:
        self.lost: defer.Deferred[Any] = defer.Deferred()
        self.on_data: Any = None
        self.start_writing_calls = 0

    def connectionMade(self) -> None:
        transport: Any = self.transport
        self.spy = transport.socket = SendSpy(transport.socket)
        original = transport.startWriting

        def counted() -> None:
            self.start_writing_calls += 1
            original()

        transport.startWriting = counted
        self.factory.accepted.callback(self)  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        if self.on_data is not None:
            self.on_data(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.reason = reason
        self.lost.callback(None)


class Client(protocol.Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.lost: defer.Deferred[Any] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        self.reason = reason
        self.lost.callback(None)


@pytest.fixture
def port():
    factory = protocol.Factory.forProtocol(Server)
    factory.accepted = None  # type: ignore[attr-defined]
    p = EagerPort(0, factory, interface="127.0.0.1", reactor=_reactor)
    p.startListening()
    yield p
    pytest_twisted.blockon(defer.maybeDeferred(p.stopListening))


@pytest_twisted.inlineCallbacks
def connect(port):
    port.factory.accepted = defer.Deferred()
    client = Client()
    endpoint = TCP4ClientEndpoint(_reactor, "127.0.0.1", port.getHost().port)
    yield connectProtocol(endpoint, client)
    server = yield port.factory.accepted
    return server, client


def close(server, client):
    client.transport.loseConnection()
    return defer.DeferredList([server.lost, client.lost])


@pytest_twisted.inlineCallbacks
def test_writes_of_one_delivery_leave_in_one_send_without_the_reactor(port):
    """Twisted alone registers for writability (two epoll_ctl) before every send."""
    server, client = yield connect(port)
    assert type(server.transport) is EagerServer

    def answer(data: bytes) -> None:
        server.transport.write(b"head:")
        server.transport.write(data)
        server.transport.writeSequence([b":a", b"b"])

    server.on_data = answer
    client.transport.write(b"ping")
    yield wait_until(_reactor, lambda: client.received == b"head:ping:ab", timeout=5)
    assert server.spy.sends == [b"head:ping:ab"]
    assert server.start_writing_calls == 0
    yield close(server, client)


@pytest_twisted.inlineCallbacks
def test_a_write_outside_a_delivery_is_sent_before_write_returns(port):
    server, client = yield connect(port)
    server.transport.write(b"tick")
    assert server.spy.sends == [b"tick"]
    assert server.start_writing_calls == 0
    yield wait_until(_reactor, lambda: client.received == b"tick", timeout=5)
    yield close(server, client)


class Producer:
    def __init__(self) -> None:
        self.paused = 0
        self.resumed = 0

    def pauseProducing(self) -> None:
        self.paused += 1

    def resumeProducing(self) -> None:
        self.resumed += 1

    def stopProducing(self) -> None:
        pass


@pytest_twisted.inlineCallbacks
def test_a_client_that_stops_reading_pauses_the_producer_and_loses_nothing(port):
    server, client = yield connect(port)
    producer = Producer()
    server.transport.registerProducer(producer, True)
    client.transport.pauseProducing()  # the client reads nothing for now
    chunks = []
    # Far more than both sockets' buffers hold: sends go partial, the rest is queued.
    while not producer.paused and len(chunks) < 400:
        chunk = bytes([len(chunks) % 251]) * 65536
        chunks.append(chunk)
        server.transport.write(chunk)
    assert producer.paused == 1
    assert server.start_writing_calls >= 1  # the reactor's write path took over
    for extra in (b"after-", b"pause"):  # queued behind the rest, in order
        chunks.append(extra)
        server.transport.write(extra)
    client.transport.resumeProducing()
    expected = b"".join(chunks)
    yield wait_until(_reactor, lambda: len(client.received) >= len(expected), timeout=20)
    assert client.received == expected
    assert producer.resumed >= 1
    server.transport.unregisterProducer()
    yield close(server, client)


@pytest_twisted.inlineCallbacks
def test_a_pull_producer_started_during_a_delivery_sends_everything(port):
    """FileSender writes one chunk per resumeProducing: someone must keep asking."""
    server, client = yield connect(port)
    body = bytes(range(256)) * 8192  # 2 MiB

    def answer(data: bytes) -> None:
        server.transport.write(b"head\n")
        d = FileSender().beginFileTransfer(io.BytesIO(body), server.transport)
        d.addCallback(lambda _: server.transport.loseConnection())

    server.on_data = answer
    client.transport.write(b"go")
    yield client.lost
    assert client.received == b"head\n" + body


@pytest_twisted.inlineCallbacks
def test_close_right_after_a_write_in_a_delivery_sends_it_first(port):
    server, client = yield connect(port)

    def answer(data: bytes) -> None:
        server.transport.write(b"bye")
        server.transport.loseConnection()
        server.transport.write(b" now")  # still accepted: Twisted writes it before closing

    server.on_data = answer
    client.transport.write(b"quit")
    yield client.lost
    assert client.received == b"bye now"
    assert client.reason.check(error.ConnectionDone)


@pytest_twisted.inlineCallbacks
def test_a_send_error_closes_the_connection_the_usual_way(port):
    server, client = yield connect(port)
    server.transport.pauseProducing()  # do not notice the client's end by reading
    client.transport.abortConnection()
    yield client.lost
    writes = 0

    def write_until_lost() -> bool:
        nonlocal writes
        if not server.lost.called:
            writes += 1
            server.transport.write(b"x" * 1024)  # never raises
        return server.lost.called

    yield wait_until(_reactor, write_until_lost, timeout=10)
    assert server.reason.check(error.ConnectionLost, error.ConnectionDone)
    server.transport.write(b"after the end")  # dropped, as Twisted drops it
    assert writes >= 1


@pytest_twisted.inlineCallbacks
def test_make_eager_switches_outgoing_tcp_connections_only(port):
    server, client = yield connect(port)
    transport = client.transport
    assert type(transport) is tcp.Client
    make_eager(transport)
    assert type(transport) is EagerClient
    assert transport.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    assert server.transport.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    make_eager(transport)  # idempotent
    assert type(transport) is EagerClient
    received = []
    server.on_data = received.append
    transport.write(b"eager")
    yield wait_until(_reactor, lambda: b"".join(received) == b"eager", timeout=5)

    fake = StringTransport()
    make_eager(fake)
    assert type(fake) is StringTransport
    make_eager(None)
    yield close(server, client)


@pytest_twisted.inlineCallbacks
def test_make_eager_reaches_the_connection_under_a_wrapper(port):
    server, client = yield connect(port)

    class Wrapper:  # as TLSMemoryBIOProtocol holds its TCP transport
        transport = client.transport

    make_eager(Wrapper())
    assert type(client.transport) is EagerClient
    yield close(server, client)


@pytest_twisted.inlineCallbacks
def test_the_twisted_internals_eager_writes_rely_on_are_all_there(port):
    """
    A Twisted upgrade that renames one of these turns eager writes off at run time (with a
    warning); here it fails loudly, so the release notes get read.
    """
    server, client = yield connect(port)
    try:
        assert missing_internals(server.transport) == []
        assert missing_internals() == []
    finally:
        yield close(server, client)


def test_eager_writes_follow_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert eager_writes("off") is False
    assert eager_writes("on") is True
    monkeypatch.setattr(transport.platform, "python_implementation", lambda: "PyPy")
    assert eager_writes("auto") is True
    monkeypatch.setattr(transport.platform, "python_implementation", lambda: "CPython")
    assert eager_writes("auto") is False
    # A Twisted without one of the internals: off whatever the setting says.
    monkeypatch.setattr(transport, "TWISTED_INTERNALS", (*transport.TWISTED_INTERNALS, "_gone"))
    assert eager_writes("on") is False
