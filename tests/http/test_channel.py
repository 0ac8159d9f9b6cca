"""
A client connection's limits: head and body timeouts (a fake clock drives them), the
connection cap against a slowloris, and what a refusal leaves (report, linger, close).
Real sockets on 127.0.0.1.
"""

from __future__ import annotations

import socket
from typing import Any

import attrs
import pytest
import pytest_twisted
from twisted.internet import reactor as _reactor
from twisted.internet import threads
from twisted.internet.task import Clock

from bungate.config import ServerConfig
from bungate.http.channel import LINGER
from bungate.http.site import GatewaySite, Limits, json_response
from bungate.testing import wait_until


def answer(request: Any) -> None:
    json_response(request, 200, {"ok": True})


class Harness:
    def __init__(self, **limits: Any) -> None:
        self.clock = Clock()
        self.rejected: list[tuple[int, str]] = []
        base = Limits.from_server(ServerConfig())
        self.site = GatewaySite(
            answer,
            self.clock,
            limits=attrs.evolve(base, **limits),
            on_reject=lambda channel, status, reason: self.rejected.append((status, reason)),
        )
        self.port = _reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.sockets: list[socket.socket] = []

    def connect(self, data: bytes = b"") -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port.getHost().port), timeout=10)
        self.sockets.append(s)
        if data:
            s.sendall(data)
        return s

    def open_channels(self) -> int:
        return len(self.site.channels)

    def close(self) -> Any:
        for s in self.sockets:
            s.close()
        return self.port.stopListening()


@pytest.fixture
def harness() -> Any:
    made: list[Harness] = []

    def make(**limits: Any) -> Harness:
        made.append(Harness(**limits))
        return made[-1]

    yield make
    for h in made:
        pytest_twisted.blockon(h.close())


def read_all(s: socket.socket) -> bytes:
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            return data
        data += chunk


@pytest_twisted.inlineCallbacks
def test_a_head_trickled_too_slowly_gets_408_then_the_connection_closes(harness: Any) -> Any:
    h = harness(header_timeout=60.0)
    s = h.connect(b"GET / HTTP/1.1\r\nHost: x\r\n")  # ... and never the blank line
    yield wait_until(_reactor, lambda: h.open_channels() == 1, 10)
    for _ in range(59):
        s.sendall(b"X-Slow: 1\r\n")  # a byte now and then: Twisted's idle timer would reset
        h.clock.advance(1)
    assert h.rejected == []
    h.clock.advance(2)
    assert h.rejected == [(408, "header_timeout")]
    h.clock.advance(LINGER)
    data = yield threads.deferToThread(read_all, s)
    assert data.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert b"Connection: close" in data and b"header_timeout" in data


@pytest_twisted.inlineCallbacks
def test_a_stalled_body_gets_408(harness: Any) -> Any:
    h = harness(body_timeout=5.0)
    s = h.connect(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
    yield wait_until(
        _reactor, lambda: any(c.body_since is not None for c in h.site.channels), 10
    )
    h.clock.advance(4)
    s.sendall(b"de")  # it moves: the clock restarts
    yield wait_until(_reactor, lambda: any(c.body_since == 4 for c in h.site.channels), 10)
    h.clock.advance(4)
    assert h.rejected == []
    h.clock.advance(2)
    assert h.rejected == [(408, "body_timeout")]


@pytest_twisted.inlineCallbacks
def test_idle_keepalive_time_does_not_count_against_the_next_head(harness: Any) -> Any:
    h = harness(header_timeout=5.0)
    s = h.connect(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    got = yield threads.deferToThread(s.recv, 65536)
    assert got.startswith(b"HTTP/1.1 200")
    h.clock.advance(30)  # idle between requests (the keep-alive timeout's business)
    assert h.rejected == []


@pytest_twisted.inlineCallbacks
def test_a_slowloris_never_keeps_a_normal_client_out(harness: Any) -> Any:
    h = harness(max_connections=5)
    slow = [h.connect(b"GET / HTTP/1.1\r\nHost: x\r\n") for _ in range(5)]
    yield wait_until(_reactor, lambda: h.open_channels() == 5, 10)
    for _ in range(3):  # more normal clients than the cap: each one is served
        client = h.connect(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = yield threads.deferToThread(read_all, client)
        assert data.startswith(b"HTTP/1.1 200"), data
    assert h.open_channels() <= 5

    def closed(s: socket.socket) -> bool:
        s.settimeout(0.5)
        try:
            return s.recv(1) == b""
        except ConnectionResetError:
            return True  # aborted: it got a reset
        except socket.timeout:
            return False

    evicted = yield threads.deferToThread(lambda: sum(1 for s in slow if closed(s)))
    assert evicted == 1  # the longest-waiting head made room; then the cap held


@pytest_twisted.inlineCallbacks
def test_at_the_cap_with_every_connection_busy_a_new_one_gets_503(harness: Any) -> Any:
    h = harness(max_connections=2)
    held: list[Any] = []
    h.site.dispatch = held.append  # requests that are never answered: busy connections
    h.connect(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n")
    h.connect(b"GET /2 HTTP/1.1\r\nHost: x\r\n\r\n")
    yield wait_until(_reactor, lambda: len(held) == 2, 10)
    extra = h.connect(b"GET /3 HTTP/1.1\r\nHost: x\r\n\r\n")
    yield wait_until(_reactor, lambda: (503, "too_many_connections") in h.rejected, 10)
    h.clock.advance(LINGER)
    data = yield threads.deferToThread(read_all, extra)
    assert data.startswith(b"HTTP/1.1 503")
    assert len(held) == 2
