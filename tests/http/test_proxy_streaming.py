"""
Streaming through the proxy's lean upstream client: backpressure from a slow client,
connection reuse afterwards, and relaying of body framing (length, chunked, none).
"""

from __future__ import annotations

import hashlib
import json
import socket
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor as _reactor
from twisted.internet import threads

from bungate import Gateway
from bungate.testing import wait_until
from tests.http.test_proxy import raw_request, split

SIZE = 32 * 1024 * 1024


@pytest.fixture
def gateway(upstream):
    gw = Gateway(
        {
            "server": {"host": "127.0.0.1", "port": 0},
            "logger": {"request_logging": False, "level": "error"},
            "routes": [{"pattern": "/*", "target": upstream.url, "timeout": 5}],
        }
    )
    pytest_twisted.blockon(gw.listen())
    gw.port = gw.ports[0].getHost().port
    yield gw
    pytest_twisted.blockon(gw.close())


def upstream_transports(gw: Any) -> list[Any]:
    """The gateway's connections to upstreams (in use or idle)."""
    found = []
    for target in gw.dispatcher.proxy.upstreams._targets.values():
        found.extend(c.transport for c in target.idle)
    return found


def _reading(transport: Any) -> bool:
    return transport in _reactor.getReaders()


@pytest_twisted.inlineCallbacks
def test_slow_client_pauses_the_upstream_and_the_connection_is_reused(gateway, upstream):
    sock = yield threads.deferToThread(socket.create_connection, ("127.0.0.1", gateway.port), 10)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    yield threads.deferToThread(
        sock.sendall, b"GET /big?size=%d HTTP/1.1\r\nHost: h\r\n\r\n" % SIZE
    )
    # The client reads nothing: the gateway must stop reading the upstream (the only
    # client connection to 127.0.0.1:upstream is the gateway's, in use by this request).
    yield wait_until(_reactor, lambda: upstream.requests, 5, what="the upstream request")

    def upstream_connection_paused() -> bool:
        conns = gateway.dispatcher.proxy.upstreams.connections
        return len(conns) == 1 and not _reading(next(iter(conns)).transport)

    yield wait_until(_reactor, upstream_connection_paused, 10, what="the upstream read to pause")

    def read_all() -> bytes:
        data = []
        got = 0
        sock.settimeout(20)
        while True:
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            data.append(chunk)
            got += len(chunk)
            if b"\r\n\r\n" in data[0] and got >= data[0].index(b"\r\n\r\n") + 4 + SIZE:
                break
        return b"".join(data)

    raw = yield threads.deferToThread(read_all)
    sock.close()
    status, headers, body = split(raw)
    assert status == 200 and headers[b"content-length"] == [b"%d" % SIZE]
    assert len(body) == SIZE and hashlib.sha1(body).digest() == hashlib.sha1(b"b" * SIZE).digest()

    # The connection went back to the pool reading again, and serves the next request.
    yield wait_until(_reactor, lambda: upstream_transports(gateway), 5, what="an idle connection")
    (pooled,) = upstream_transports(gateway)
    assert _reading(pooled)
    raw = yield threads.deferToThread(
        raw_request, gateway.port, b"GET /again HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
    )
    assert split(raw)[0] == 200
    assert upstream_transports(gateway) == [pooled]  # reused, not a new connection


@pytest_twisted.inlineCallbacks
def test_framing_is_relayed(gateway):
    # chunked upstream body -> chunked to an HTTP/1.1 client
    raw = yield threads.deferToThread(
        raw_request, gateway.port, b"GET /chunked HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
    )
    status, headers, body = split(raw)
    assert status == 200 and headers[b"transfer-encoding"] == [b"chunked"]
    assert b"part1-" in body and b"part2" in body
    # HEAD keeps the upstream's Content-Length and sends no body
    raw = yield threads.deferToThread(
        raw_request,
        gateway.port,
        b"HEAD /big?size=5000 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
    )
    status, headers, body = split(raw)
    assert status == 200 and body == b""
    # 204 and 304: no body, no chunking
    for code in (204, 304):
        raw = yield threads.deferToThread(
            raw_request,
            gateway.port,
            b"GET /status/%d HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n" % code,
        )
        status, headers, body = split(raw)
        assert status == code and body == b"" and b"transfer-encoding" not in headers


@pytest_twisted.inlineCallbacks
def test_keepalive_client_many_requests_one_upstream_connection(gateway, upstream):
    def many() -> list[int]:
        codes = []
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as s:
            f = s.makefile("rb")
            for i in range(50):
                s.sendall(b"GET /n%d HTTP/1.1\r\nHost: h\r\n\r\n" % i)
                status = int(f.readline().split()[1])
                length = 0
                while True:
                    line = f.readline()
                    if line in (b"\r\n", b""):
                        break
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                f.read(length)
                codes.append(status)
        return codes

    codes = yield threads.deferToThread(many)
    assert codes == [200] * 50
    peers = {r.getClientAddress().port for r in upstream.requests}
    assert len(peers) == 1, peers


@pytest_twisted.inlineCallbacks
def test_large_request_bodies_are_sent_from_twisteds_temporary_file(gateway, upstream):
    """Bodies over 100 KB are spooled to a file by twisted.web; both framings arrive whole."""
    body = bytes(range(256)) * 4096  # 1 MiB
    head = b"POST /echo HTTP/1.1\r\nHost: h\r\nConnection: close\r\n"
    raw = yield threads.deferToThread(
        raw_request, gateway.port, head + b"Content-Length: %d\r\n\r\n" % len(body) + body
    )
    status, _, answer = split(raw)
    assert status == 200
    assert json.loads(answer)["body"].encode("latin-1") == body
    chunks = b"".join(
        b"%x\r\n%s\r\n" % (len(body[i : i + 65536]), body[i : i + 65536])
        for i in range(0, len(body), 65536)
    )
    raw = yield threads.deferToThread(
        raw_request,
        gateway.port,
        head + b"Transfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n",
    )
    status, _, answer = split(raw)
    doc = json.loads(answer)
    assert status == 200 and doc["headers"]["content-length"] == [str(len(body))]
    assert doc["body"].encode("latin-1") == body
