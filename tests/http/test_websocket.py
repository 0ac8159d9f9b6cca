"""
WebSocket proxying through the gateway: autobahn clients, through a gateway in this
process, to an autobahn echo server; plain and TLS listeners, a balanced route, a drain.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, threads
from twisted.internet import reactor as _reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS

from bungate import Gateway
from bungate.core.wsframe import CLOSE_GOING_AWAY
from bungate.testing import wait_until
from tests.http.test_proxy import raw_request, split
from tests.http.test_tunnel import (
    AUTOBAHN_OPTIONS,
    CLOSE,
    KEY,
    MIB,
    ClientFactory,
    EchoFactory,
    Watch,
    pattern,
    server_frames,
    upgrade_head,
)
from tests.tlskit import write_pair

reactor: Any = _reactor


@pytest.fixture
def watch() -> Watch:
    return Watch()


@pytest.fixture
def echo(watch: Watch) -> Any:
    factory = EchoFactory(watch)
    factory.setProtocolOptions(**AUTOBAHN_OPTIONS)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    factory.url = f"http://127.0.0.1:{port.getHost().port}"
    yield factory
    pytest_twisted.blockon(port.stopListening())


@pytest.fixture
def gateways() -> Any:
    made: list[Gateway] = []

    def make(routes: list[dict[str, Any]], **server: Any) -> Any:
        gw = Gateway(
            {
                "server": {"host": "127.0.0.1", "port": 0, **server},
                "logger": {"request_logging": False, "level": "error"},
                "cluster": {"shutdown_timeout": 2},
            }
        )
        for route in routes:
            route = dict(route)
            gw.add_route(route.pop("pattern"), **route)
        made.append(gw)
        return gw.listen().addCallback(lambda _: gw)

    yield make
    for gw in made:
        pytest_twisted.blockon(gw.close())


def connect(watch: Watch, gw: Any, path: str = "/ws/echo", tls: Any = None) -> Any:
    port = gw.ports[0].getHost().port
    scheme = "wss" if tls is not None else "ws"
    factory = ClientFactory(watch, f"{scheme}://127.0.0.1:{port}{path}")
    factory.setProtocolOptions(**AUTOBAHN_OPTIONS)
    endpoint: Any = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    if tls is not None:
        endpoint = wrapClientTLS(tls, endpoint)
    protocol = factory.buildProtocol(None)
    return connectProtocol(endpoint, protocol).addCallback(
        lambda p: watch.until(lambda: p.opened, "the handshake").addCallback(lambda _: p)
    )


@pytest_twisted.inlineCallbacks
def test_messages_pings_and_closes_go_both_ways(gateways, echo, watch):
    gw = yield gateways([{"pattern": "/ws/*", "target": echo.url}])
    client = yield connect(watch, gw)
    client.sendMessage(b"hello")
    client.sendMessage(b"\x00\x01binary", isBinary=True)
    client.sendPing(b"p1")
    yield watch.until(lambda: len(client.messages) == 2 and client.pongs, "the echoes")
    assert client.messages == [(b"hello", False), (b"\x00\x01binary", True)]
    assert client.pongs == [b"p1"]
    server = echo.servers[-1]
    assert server.path == "/ws/echo"  # the normalized path went upstream
    client.sendMessage(b"cmd:close 4003")
    yield watch.until(lambda: client.close_info is not None, "the server's close")
    assert client.close_info[1] == 4003


@pytest_twisted.inlineCallbacks
def test_a_ten_mib_message_and_fragments(gateways, echo, watch):
    gw = yield gateways([{"pattern": "/ws/*", "target": echo.url}])
    client = yield connect(watch, gw)
    big = pattern(10 * MIB, 3)
    client.count_only = True
    client.sendMessage(big, isBinary=True)
    yield watch.until(lambda: client.received == len(big), "the 10 MiB echo", timeout=60)
    client.count_only = False
    client.sendMessage(b"cmd:fragmented 300000 65536")
    yield watch.until(lambda: client.messages, "the fragmented message")
    assert client.messages[-1] == (pattern(300000, 7), True)


@pytest_twisted.inlineCallbacks
def test_wss_on_a_tls_listener_and_a_balanced_route(gateways, echo, watch, ca, tmp_path):
    cert, key = write_pair(ca.issue_cert("127.0.0.1"), tmp_path, "gw")
    gw = yield gateways(
        [
            {
                "pattern": "/ws/*",
                "load_balancer": {"targets": [{"url": echo.url}, {"url": echo.url}]},
            }
        ],
        tls={"enabled": True, "cert": cert, "key": key},
    )
    trust = Certificate.loadPEM(ca.cert_pem.bytes())
    client = yield connect(watch, gw, tls=optionsForClientTLS("127.0.0.1", trust))
    client.sendMessage(b"over tls")
    yield watch.until(lambda: client.messages, "the echo")
    assert client.messages == [(b"over tls", False)]


HANDSHAKE = (
    b"GET /ws/x HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


@pytest.mark.parametrize(
    "route, request_bytes",
    [
        ({"websocket": False}, HANDSHAKE),  # the route does not proxy them
        ({}, HANDSHAKE.replace(b"websocket", b"h2c")),  # another protocol: ignored
        ({}, HANDSHAKE.replace(b"GET", b"POST")),  # not a handshake
    ],
)
@pytest_twisted.inlineCallbacks
def test_anything_but_a_proxied_handshake_is_served_as_plain_http(
    gateways, echo, route, request_bytes
):
    gw = yield gateways([{"pattern": "/ws/*", "target": echo.url, **route}])
    port = gw.ports[0].getHost().port
    answer = yield threads.deferToThread(raw_request, port, request_bytes, False)
    status, headers, _ = split(answer)
    assert status != 101 and b"upgrade" not in headers
    assert all(not s.opened for s in echo.servers)


@pytest_twisted.inlineCallbacks
def test_a_drain_ends_tunnels_with_going_away_before_its_deadline(gateways, echo, watch):
    gw = yield gateways([{"pattern": "/ws/*", "target": echo.url}])
    client = yield connect(watch, gw)
    client.sendMessage(b"still here")
    yield watch.until(lambda: client.messages, "the echo")
    started = reactor.seconds()
    closing = gw.close()
    # The tunnel keeps working while the drain runs (until shortly before the deadline).
    client.sendMessage(b"during the drain")
    yield watch.until(lambda: len(client.messages) == 2, "an echo during the drain")
    yield watch.until(lambda: client.close_info is not None, "the going-away close")
    assert client.close_info[1] == CLOSE_GOING_AWAY
    yield watch.until(lambda: echo.servers[-1].close_info is not None, "the upstream's close")
    assert echo.servers[-1].close_info[1] == CLOSE_GOING_AWAY
    yield closing
    assert reactor.seconds() - started < 2 + 1  # shutdown_timeout, and a margin
    yield defer.succeed(None)


@pytest_twisted.inlineCallbacks
def test_the_handshake_goes_through_the_routes_auth(gateways, echo, watch):
    key = "ws-key-0123456789abcdef"
    gw = yield gateways([{"pattern": "/ws/*", "target": echo.url, "auth": {"api_keys": [key]}}])
    port = gw.ports[0].getHost().port
    refused = yield threads.deferToThread(raw_request, port, HANDSHAKE, False)
    assert split(refused)[0] == 401 and all(not s.opened for s in echo.servers)
    with_key = HANDSHAKE.replace(b"\r\n\r\n", b"\r\nX-API-Key: " + key.encode() + b"\r\n\r\n")
    answer = yield threads.deferToThread(raw_request, port, with_key, False)
    status, headers, _ = split(answer)
    assert status == 101 and headers[b"upgrade"][0].lower() == b"websocket"
    assert headers[b"sec-websocket-accept"] == [b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="]
    yield watch.until(lambda: echo.servers and echo.servers[-1].opened, "the upstream open")


@pytest_twisted.inlineCallbacks
def test_past_the_tunnel_cap_a_handshake_gets_503_and_is_counted(gateways, echo, watch):
    gw = yield gateways([{"pattern": "/ws/*", "target": echo.url}], max_tunnels_per_worker=1)
    first = yield connect(watch, gw)
    port = gw.ports[0].getHost().port
    answer = yield threads.deferToThread(raw_request, port, upgrade_head("/ws/echo"), False)
    status, headers, _body = split(answer)
    assert status == 503 and b"upgrade" not in headers
    tunnels = gw._service.app.tunnels
    assert tunnels.refused == 1 and tunnels.open == 1
    first.sendMessage(b"still served")
    yield watch.until(lambda: first.messages, "the first tunnel's echo")


class _HeldUpstream(Protocol):
    """An upstream that answers a handshake with 101 only when the test says so."""

    def __init__(self, box: dict[str, Any]) -> None:
        self.box = box
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if b"\r\n\r\n" in self.received:
            self.box["upstream"] = self

    def switch(self) -> None:
        accept = base64.b64encode(
            hashlib.sha1(KEY + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()
        )
        self.transport.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        )


class _RawClient(Protocol):
    def __init__(self) -> None:
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data


@pytest_twisted.inlineCallbacks
def test_a_handshake_in_flight_when_the_drain_starts_becomes_a_tunnel_until_the_deadline(
    gateways, watch
):
    box: dict[str, Any] = {}
    factory = Factory.forProtocol(lambda: _HeldUpstream(box))
    upstream_port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    try:
        url = f"http://127.0.0.1:{upstream_port.getHost().port}"
        gw = yield gateways([{"pattern": "/ws/*", "target": url}])
        port = gw.ports[0].getHost().port
        client = _RawClient()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
        client.transport.write(upgrade_head("/ws/held"))
        yield wait_until(reactor, lambda: "upstream" in box, what="the upstream's handshake")
        started = reactor.seconds()
        closing = gw.close()  # shutdown_timeout 2 s: going away at 1.5 s
        box["upstream"].switch()
        yield wait_until(reactor, lambda: b"\r\n\r\n" in client.received, what="the answer")
        assert client.received.startswith(b"HTTP/1.1 101 "), client.received[:80]
        # The tunnel lives until the going-away, which sends the client a 1001 close.
        yield wait_until(
            reactor,
            lambda: server_frames(client.received.split(b"\r\n\r\n", 1)[1]),
            timeout=10,
            what="the going-away close frame",
        )
        frames = server_frames(client.received.split(b"\r\n\r\n", 1)[1])
        assert frames[0][0] == CLOSE and frames[0][1][:2] == CLOSE_GOING_AWAY.to_bytes(2, "big")
        assert reactor.seconds() - started >= 1.5 - 0.2
        yield closing
    finally:
        yield upstream_port.stopListening()
