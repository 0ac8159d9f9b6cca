"""The reverse proxy, single process, against a real upstream on 127.0.0.1."""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import defer, threads
from twisted.internet import reactor as _reactor
from twisted.internet.task import Clock

from bungate import Gateway, Response
from bungate.testing import wait_until


def raw_request(
    port: int, data: bytes, read_until_close: bool = True, timeout: float = 10.0
) -> bytes:
    """Send exact bytes and read the answer (in a thread, so the reactor keeps serving)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                chunks.append(b"<RESET>")
                break
            if not chunk:
                break
            chunks.append(chunk)
            if not read_until_close and b"\r\n\r\n" in b"".join(chunks):
                break
    return b"".join(chunks)


def split(response: bytes):
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    headers: dict[bytes, list[bytes]] = {}
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        headers.setdefault(k.strip().lower(), []).append(v.strip())
    return status, headers, body


def echo(request):
    return {"params": request.params, "method": request.method.decode()}


async def async_handler(request):
    return Response({"async": True}, status=201, headers={"x-handler": "yes"})


def deferred_handler(request):
    return defer.succeed("text from a deferred")


def broken_handler(request):
    raise RuntimeError("boom")


@pytest.fixture
def gateway(upstream):
    gw = Gateway(
        {
            "server": {"host": "127.0.0.1", "port": 0, "max_body_size": 1000},
            "logger": {"request_logging": False, "level": "error"},
            "health": {"details": True},
            "routes": [
                {"pattern": "/api/*", "target": upstream.url, "timeout": 0.5},
                {"pattern": "/only-get", "target": upstream.url, "methods": ["GET"]},
                {"pattern": "/down/*", "target": "http://127.0.0.1:1"},
                {"pattern": "/prefixed/*", "target": upstream.url + "/base"},
            ],
        }
    )
    gw.add_route("/users/:id", handler=echo)
    gw.add_route("/async", handler=async_handler)
    gw.add_route("/deferred", handler=deferred_handler)
    gw.add_route("/broken", handler=broken_handler)
    gw.add_route("/bytes", handler=lambda r: b"\x00\x01")
    pytest_twisted.blockon(gw.listen())
    gw.port = gw.ports[0].getHost().port
    gw.url = f"http://127.0.0.1:{gw.port}"
    yield gw
    pytest_twisted.blockon(gw.close())


@pytest_twisted.inlineCallbacks
def test_the_normalized_path_and_the_query_byte_for_byte_are_forwarded(gateway, upstream):
    # The path as the gateway matched it (an encoded unreserved character decoded, an
    # encoded space kept), the query exactly as sent (see docs/routing.md).
    target = b"/api/a%20b/%7Euser?x=1&y=%20&y=2&empty=&z=%2F"
    raw = yield threads.deferToThread(
        raw_request,
        gateway.port,
        b"GET " + target + b" HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n\r\n",
    )
    status, _, body = split(raw)
    assert status == 200
    doc = json.loads(body)
    assert doc["uri"] == "/api/a%20b/~user?x=1&y=%20&y=2&empty=&z=%2F"
    assert doc["headers"]["x-forwarded-host"] == ["example.test"]
    assert doc["headers"]["x-forwarded-proto"] == ["http"]
    assert doc["headers"]["x-forwarded-for"] == ["127.0.0.1"]
    assert doc["headers"]["host"] == [upstream.url.split("//")[1]]


@pytest_twisted.inlineCallbacks
def test_target_base_path_is_prepended(gateway):
    r = yield treq.get(gateway.url + "/prefixed/x?q=1", persistent=False)
    assert json.loads((yield r.content()))["uri"] == "/base/prefixed/x?q=1"


@pytest_twisted.inlineCallbacks
def test_a_clients_forwarding_headers_are_replaced_and_hop_by_hop_ones_dropped(gateway):
    """No trusted proxies: a client cannot name its own address, or pretend TLS."""
    req = (
        b"GET /api/h HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 10.1.1.1\r\n"
        b"X-Real-IP: 10.2.2.2\r\nForwarded: for=10.3.3.3\r\nX-Forwarded-Proto: https\r\n"
        b"Connection: close, X-Secret-Hop\r\nX-Secret-Hop: 1\r\nKeep-Alive: 5\r\nTE: trailers\r\n"
        b"Proxy-Authorization: Basic eA==\r\nX-Normal: yes\r\n\r\n"
    )
    body = split((yield threads.deferToThread(raw_request, gateway.port, req)))[2]
    headers = json.loads(body)["headers"]
    assert headers["x-forwarded-for"] == ["127.0.0.1"]
    assert headers["x-real-ip"] == ["127.0.0.1"]
    assert headers["x-forwarded-proto"] == ["http"]
    assert "forwarded" not in headers
    assert headers["x-normal"] == ["yes"]
    for dropped in ("x-secret-hop", "keep-alive", "te", "proxy-authorization"):
        assert dropped not in headers


@pytest_twisted.inlineCallbacks
def test_dot_segments_are_resolved_before_routing_so_the_resolved_routes_rules_hold(
    gateway, upstream
):
    def send(method: bytes, target: bytes) -> Any:
        request = method + b" " + target + b" HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
        return threads.deferToThread(raw_request, gateway.port, request)

    raw = yield send(b"GET", b"/api/x/../echo")
    assert split(raw)[0] == 200 and json.loads(split(raw)[2])["uri"] == "/api/echo"
    raw = yield send(b"GET", b"/api/./x/%2e/y")
    assert json.loads(split(raw)[2])["uri"] == "/api/x/y"
    # /api/../only-get is /only-get: its route (GET only) decides, not /api/*'s.
    raw = yield send(b"POST", b"/api/../only-get")
    assert split(raw)[0] == 405
    raw = yield send(b"GET", b"/api/../../etc/passwd")  # above the root: refused
    assert split(raw)[0] == 400 and b"dot_segment_above_root" in split(raw)[2]
    assert [r.path for r in upstream.requests] == [b"/api/echo", b"/api/x/y"]


@pytest_twisted.inlineCallbacks
def test_set_cookie_and_hop_by_hop_on_a_direct_route(upstream):
    gw = Gateway(
        {
            "server": {"host": "127.0.0.1", "port": 0},
            "logger": {"request_logging": False},
            "routes": [{"pattern": "/*", "target": upstream.url}],
        }
    )
    yield gw.listen()
    port = gw.ports[0].getHost().port
    try:
        raw = yield threads.deferToThread(
            raw_request, port, b"GET /cookies HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
        )
        status, headers, body = split(raw)
        assert status == 200 and body == b"cookies"
        assert headers[b"set-cookie"] == [b"a=1; Path=/", b"b=2; Path=/"]
        assert headers[b"x-custom"] == [b"kept"]
        assert b"keep-alive" not in headers and b"x-drop-me" not in headers
        assert headers[b"connection"] == [b"close"]  # ours, because the client asked
        # redirects pass through, never followed
        raw = yield threads.deferToThread(
            raw_request, port, b"GET /redirect HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
        )
        status, headers, _ = split(raw)
        assert status == 302 and headers[b"location"] == [b"/elsewhere"]
        # compressed bodies untouched
        raw = yield threads.deferToThread(
            raw_request,
            port,
            b"GET /gzip HTTP/1.1\r\nHost: h\r\nAccept-Encoding: gzip\r\nConnection: close\r\n\r\n",
        )
        status, headers, body = split(raw)
        assert headers[b"content-encoding"] == [b"gzip"]
        assert body == b"\x1f\x8b\x08\x00fakegzipbytes"
        # HEAD, 204 and 304: no body
        for req, code in [
            (b"HEAD /status/200 HTTP/1.1", 200),
            (b"GET /status/204 HTTP/1.1", 204),
            (b"GET /status/304 HTTP/1.1", 304),
        ]:
            raw = yield threads.deferToThread(
                raw_request, port, req + b"\r\nHost: h\r\nConnection: close\r\n\r\n"
            )
            status, headers, body = split(raw)
            assert (status, body) == (code, b"")
        # chunked upstream responses are relayed whole
        r = yield treq.get(f"http://127.0.0.1:{port}/chunked", persistent=False)
        assert (yield r.content()) == b"part1-part2"
        # a 1 MiB streamed body arrives intact
        r = yield treq.get(f"http://127.0.0.1:{port}/big?size=1048576", persistent=False)
        assert len((yield r.content())) == 1048576
    finally:
        yield gw.close()


@pytest_twisted.inlineCallbacks
def test_request_bodies_forwarded_and_capped(gateway, upstream):
    r = yield treq.post(gateway.url + "/api/post", data=b"x" * 900, persistent=False)
    doc = json.loads((yield r.content()))
    assert (doc["method"], doc["body_len"]) == ("POST", 900)
    # chunked upload
    req = (
        b"POST /api/chunk HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    )
    doc = json.loads(split((yield threads.deferToThread(raw_request, gateway.port, req)))[2])
    assert doc["body"] == "hello world"
    # over the limit, announced or chunked: 413 and nothing reaches the upstream
    before = len(upstream.requests)
    r = yield treq.post(gateway.url + "/api/big", data=b"x" * 1001, persistent=False)
    assert r.code == 413
    assert json.loads((yield r.content()))["error"] == "payload_too_large"
    chunk = b"258\r\n" + b"y" * 600 + b"\r\n"
    big_chunks = (
        b"POST /api/c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
        + chunk * 2
        + b"0\r\n\r\n"
    )
    status, headers, _ = split((yield threads.deferToThread(raw_request, gateway.port, big_chunks)))
    assert status == 413 and headers[b"connection"] == [b"close"]
    assert len(upstream.requests) == before


@pytest_twisted.inlineCallbacks
def test_errors_are_small_json_documents(gateway):
    r = yield treq.get(gateway.url + "/nowhere", persistent=False)
    assert r.code == 404 and json.loads((yield r.content()))["error"] == "not_found"
    r = yield treq.post(gateway.url + "/only-get", data=b"", persistent=False)
    assert r.code == 405 and r.headers.getRawHeaders(b"allow") == [b"GET"]
    yield r.content()
    r = yield treq.get(gateway.url + "/down/x", persistent=False)
    doc = json.loads((yield r.content()))
    assert r.code == 502 and doc["reason"] == "refused" and doc["request_id"]
    r = yield treq.get(gateway.url + "/api/slow?delay=5", persistent=False)
    assert r.code == 504 and json.loads((yield r.content()))["reason"] == "timeout"


@pytest_twisted.inlineCallbacks
def test_upstream_reset_mid_body_cuts_the_client_connection(gateway):
    raw = yield threads.deferToThread(
        raw_request, gateway.port, b"GET /api/reset-mid-body HTTP/1.1\r\nHost: h\r\n\r\n"
    )
    status, headers, body = split(raw)
    assert status == 200 and headers[b"content-length"] == [b"100000"]
    assert len(body.replace(b"<RESET>", b"")) < 100000  # truncated, and the socket closed


@pytest_twisted.inlineCallbacks
def test_upstream_stalled_mid_body_is_cut_after_the_route_timeout(gateway, upstream):
    raw = yield threads.deferToThread(
        raw_request, gateway.port, b"GET /api/stall-mid-body HTTP/1.1\r\nHost: h\r\n\r\n"
    )
    status, headers, body = split(raw)
    assert status == 200 and headers[b"content-length"] == [b"100000"]
    assert len(body.replace(b"<RESET>", b"")) == 1000  # what came, then the cut
    yield wait_until(_reactor, lambda: upstream.cancelled, 5, what="the upstream to be dropped")


@pytest_twisted.inlineCallbacks
def test_the_route_timeout_restarts_when_the_head_arrives(gateway, upstream):
    """
    The timeout (0.5 s) bounds the wait for the head, then each wait for more body: a
    head at 0.4 s and the rest of the body 0.4 s later is on time (one timer serves both
    phases; a fake clock drives it, the sockets are real).
    """
    clock = Clock()
    gateway.dispatcher.proxy.clock = clock
    response = treq.get(gateway.url + "/api/hold", persistent=False)
    yield wait_until(_reactor, lambda: any(r.path == b"/api/hold" for r in upstream.requests), 5)
    held = upstream.requests[-1]
    clock.advance(0.4)
    upstream_side = held.channel.transport
    upstream_side.write(b"HTTP/1.1 203 OK\r\nContent-Length: 4\r\n\r\n")  # the head alone

    def head_taken() -> bool:  # the gateway holds it until the body comes
        return any(r.code == 203 for c in gateway.site.channels for r in c.requests)

    yield wait_until(_reactor, head_taken, 5, what="the gateway to read the head")
    clock.advance(0.4)  # 0.8 s after the request: past the head's deadline, not the body's
    upstream_side.write(b"abcd")
    r = yield response.addTimeout(5, _reactor)
    body = yield r.content().addTimeout(5, _reactor)
    assert r.code == 203 and body == b"abcd"
    upstream_side.loseConnection()


@pytest_twisted.inlineCallbacks
def test_client_disconnect_cancels_the_upstream_request(gateway, upstream):
    def hang_up():
        s = socket.create_connection(("127.0.0.1", gateway.port))
        s.sendall(b"GET /api/slow?delay=3 HTTP/1.1\r\nHost: h\r\n\r\n")
        return s

    s = yield threads.deferToThread(hang_up)
    yield wait_until(_reactor, lambda: any(r.path == b"/api/slow" for r in upstream.requests), 5)
    s.close()
    yield wait_until(
        _reactor, lambda: upstream.cancelled, 5, what="the upstream request to be cancelled"
    )


@pytest_twisted.inlineCallbacks
def test_handlers(gateway):
    r = yield treq.get(gateway.url + "/users/42", persistent=False)
    assert json.loads((yield r.content())) == {"params": {"id": "42"}, "method": "GET"}
    r = yield treq.get(gateway.url + "/async", persistent=False)
    assert (r.code, r.headers.getRawHeaders(b"x-handler")) == (201, [b"yes"])
    assert json.loads((yield r.content())) == {"async": True}
    r = yield treq.get(gateway.url + "/deferred", persistent=False)
    assert (yield r.text()) == "text from a deferred"
    r = yield treq.get(gateway.url + "/bytes", persistent=False)
    assert (yield r.content()) == b"\x00\x01"
    r = yield treq.get(gateway.url + "/broken", persistent=False)
    assert r.code == 500 and json.loads((yield r.content())) == {"error": "internal_error"}


@pytest_twisted.inlineCallbacks
def test_request_id_is_kept_or_made(gateway):
    r = yield treq.get(
        gateway.url + "/api/x", headers={"X-Request-Id": "abc-123"}, persistent=False
    )
    doc = json.loads((yield r.content()))
    assert doc["headers"]["x-request-id"] == ["abc-123"]
    assert r.headers.getRawHeaders(b"x-request-id") == [b"abc-123"]
    r = yield treq.get(gateway.url + "/api/x", persistent=False)
    yield r.content()
    assert len(r.headers.getRawHeaders(b"x-request-id")[0]) >= 16


@pytest_twisted.inlineCallbacks
def test_health_endpoint(gateway):
    r = yield treq.get(gateway.url + "/health", persistent=False)
    doc = json.loads((yield r.content()))
    assert r.code == 200 and doc["status"] == "ok" and "uptime" in doc and doc["pid"]


@pytest_twisted.inlineCallbacks
def test_health_tells_only_its_status_unless_details_are_asked_for(upstream):
    gw = Gateway({"server": {"host": "127.0.0.1", "port": 0}, "logger": {"level": "error"}})
    yield gw.listen()
    try:
        url = f"http://127.0.0.1:{gw.ports[0].getHost().port}/health"
        r = yield treq.get(url, persistent=False)
        assert r.code == 200 and json.loads((yield r.content())) == {"status": "ok"}
    finally:
        yield gw.close()


@pytest_twisted.inlineCallbacks
def test_close_waits_for_in_flight_requests(upstream):
    gw = Gateway(
        {
            "server": {"host": "127.0.0.1", "port": 0},
            "logger": {"request_logging": False},
            "routes": [{"pattern": "/*", "target": upstream.url}],
        }
    )
    yield gw.listen()
    url = f"http://127.0.0.1:{gw.ports[0].getHost().port}"
    port = gw.ports[0].getHost().port
    pending = threads.deferToThread(
        raw_request, port, b"GET /slow?delay=0.5 HTTP/1.1\r\nHost: h\r\n\r\n"
    )
    yield wait_until(_reactor, lambda: upstream.requests, 5)
    closed = gw.close()
    # The in-flight request completes; its response tells the keep-alive client to close.
    status, headers, body = split((yield pending))
    assert status == 200 and b"slow done" in body
    assert headers[b"connection"] == [b"close"]
    yield closed
    assert url


@pytest.mark.parametrize("limit, answered", [(3, 3), (0, 4)])
@pytest_twisted.inlineCallbacks
def test_keepalive_requests_ends_a_connection_after_its_last_request(limit, answered):
    """As nginx's keepalive_requests: the limit-th answer says close, and the server closes."""
    gw = Gateway(
        {
            "server": {"host": "127.0.0.1", "port": 0, "keepalive_requests": limit},
            "logger": {"request_logging": False, "level": "error"},
        }
    )
    gw.add_route("/users/:id", handler=echo)
    yield gw.listen()
    try:
        port = gw.ports[0].getHost().port
        pipelined = b"".join(
            b"GET /users/%d HTTP/1.1\r\nHost: h\r\n%s\r\n"
            % (i, b"Connection: close\r\n" if i == 4 else b"")
            for i in range(1, 5)
        )
        raw = yield threads.deferToThread(raw_request, port, pipelined)
    finally:
        yield gw.close()
    answers = raw.split(b"HTTP/1.1 200 ")[1:]
    assert len(answers) == answered
    closes = [b"connection: close" in a.lower() for a in answers]
    assert closes == [False] * (answered - 1) + [True]
    assert json.loads(answers[-1].partition(b"\r\n\r\n")[2])["params"] == {"id": str(answered)}
