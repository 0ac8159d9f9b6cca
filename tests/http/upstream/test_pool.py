"""The lean upstream client, against real servers on 127.0.0.1."""

from __future__ import annotations

import json

import pytest
import pytest_twisted
from twisted.internet import defer, protocol
from twisted.internet import reactor as _reactor

from bungate.core.http1 import serialize_head
from bungate.http.upstream.pool import UpstreamClient, UpstreamError, UpstreamReset
from bungate.testing import wait_until


class Recorder:
    def __init__(self):
        self.head = None
        self.body = b""
        self.done = defer.Deferred()

    def upstream_head(self, code, phrase, headers, length, producer):
        self.head = (code, phrase, headers, length)

    def upstream_data(self, data):
        self.body += data

    def upstream_done(self):
        self.done.callback(self)

    def upstream_failed(self, reason, head_sent):
        self.done.errback(reason)


@pytest.fixture
def client():
    c = UpstreamClient(_reactor, idle_timeout=30)
    yield c
    pytest_twisted.blockon(c.close())


def send(client, base, method=b"GET", target=b"/", headers=(), body=None):
    host, prefix = client.head_for(base)
    head = serialize_head(method, prefix + target, [(b"Host", host), *headers])
    rec = Recorder()
    client.request(base, method, head, body, rec)
    return rec.done


@pytest_twisted.inlineCallbacks
def test_get_and_keepalive_reuse(client, upstream):
    base = upstream.url.encode()
    rec = yield send(client, base, target=b"/x?y=1")
    code, _, _headers, length = rec.head
    assert code == 200 and length == len(rec.body)
    assert json.loads(rec.body)["uri"] == "/x?y=1"
    first = upstream.requests[-1].getClientAddress().port
    yield send(client, base, target=b"/again")
    assert upstream.requests[-1].getClientAddress().port == first, (
        "the pooled connection was not reused"
    )


@pytest_twisted.inlineCallbacks
def test_bodies_chunked_head_and_no_body_statuses(client, upstream):
    base = upstream.url.encode()
    rec = yield send(client, base, b"POST", b"/p", [(b"Content-Length", b"5")], b"hello")
    assert json.loads(rec.body)["body"] == "hello"
    rec = yield send(client, base, target=b"/chunked")
    assert rec.body == b"part1-part2" and rec.head[3] is None
    rec = yield send(client, base, target=b"/big?size=300000")
    assert len(rec.body) == 300000
    rec = yield send(client, base, b"HEAD", b"/x")
    assert rec.head[0] == 200 and rec.body == b""
    for code in (204, 304):
        rec = yield send(client, base, target=b"/status/%d" % code)
        assert rec.head[0] == code and rec.body == b""


@pytest_twisted.inlineCallbacks
def test_refused_and_reset(client, upstream):
    with pytest.raises(Exception) as e:
        yield send(client, b"http://127.0.0.1:1")
    assert "refused" in str(e.value).lower() or "Refused" in type(e.value).__name__
    with pytest.raises(UpstreamReset):
        yield send(client, upstream.url.encode(), target=b"/reset-mid-body")


class OneShotServer(protocol.Protocol):
    """Answers one request with keep-alive, then silently closes (a stale pooled conn)."""

    def dataReceived(self, data):
        if b"\r\n\r\n" in data:
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            _reactor.callLater(0, self.transport.loseConnection)


@pytest_twisted.inlineCallbacks
def test_stale_pooled_connection_is_retried_for_idempotent_requests(client):
    factory = protocol.Factory.forProtocol(OneShotServer)
    port = _reactor.listenTCP(0, factory, interface="127.0.0.1")
    try:
        base = f"http://127.0.0.1:{port.getHost().port}".encode()
        rec = yield send(client, base)
        assert rec.body == b"ok"
        # wait until the server's close reached us... or not: either way the GET must work
        rec = yield send(client, base)
        assert rec.body == b"ok"
    finally:
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_cancel_aborts_without_calling_the_sink_again(client, upstream):
    host, _ = client.head_for(upstream.url.encode())
    rec = Recorder()
    exchange = client.request(
        upstream.url.encode(),
        b"GET",
        serialize_head(b"GET", b"/slow?delay=5", [(b"Host", host)]),
        None,
        rec,
    )
    yield wait_until(_reactor, lambda: any(r.path == b"/slow" for r in upstream.requests), 5)
    exchange.cancel()
    yield wait_until(_reactor, lambda: upstream.cancelled, 5, what="the upstream to see the abort")
    assert not rec.done.called


class CannedServer(protocol.Protocol):
    """Answers every request with the factory's canned bytes."""

    def dataReceived(self, data):
        if b"\r\n\r\n" in data:
            self.transport.write(self.factory.answer)


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc",
        b"HTTP/1.1 2xx OK\r\n\r\n",
        b"SMTP ready\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
    ],
)
@pytest_twisted.inlineCallbacks
def test_malformed_answers_fail_the_exchange(client, answer):
    factory = protocol.Factory.forProtocol(CannedServer)
    factory.answer = answer
    port = _reactor.listenTCP(0, factory, interface="127.0.0.1")
    try:
        base = f"http://127.0.0.1:{port.getHost().port}".encode()
        with pytest.raises(UpstreamError):
            yield send(client, base)
    finally:
        yield port.stopListening()


HALF = b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc"


class DyingServer(protocol.Protocol):
    """Sends half an answer (or nothing), then closes (FIN) or aborts (RST)."""

    def dataReceived(self, data):
        if b"\r\n\r\n" in data:
            self.transport.write(self.factory.answer)
            if self.factory.abort:
                self.transport.abortConnection()
            else:
                self.transport.loseConnection()


@pytest.mark.parametrize(
    ("answer", "abort", "said"),
    [
        (b"", False, "upstream closed the connection before answering"),
        (HALF, False, "in the middle of its response"),
        (HALF, True, "reset or lost"),
    ],
)
@pytest_twisted.inlineCallbacks
def test_an_upstream_that_dies_is_not_said_to_have_closed_cleanly(client, answer, abort, said):
    factory = protocol.Factory.forProtocol(DyingServer)
    factory.answer, factory.abort = answer, abort
    port = _reactor.listenTCP(0, factory, interface="127.0.0.1")
    try:
        base = f"http://127.0.0.1:{port.getHost().port}".encode()
        with pytest.raises(UpstreamReset) as caught:
            yield send(client, base, b"POST", b"/", [(b"Content-Length", b"0")], b"")
        assert said in str(caught.value) and "cleanly" not in str(caught.value)
    finally:
        yield port.stopListening()
