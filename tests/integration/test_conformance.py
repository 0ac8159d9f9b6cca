"""
Edge conformance, as an attacker tries it: raw request bytes over a socket, and exactly
what each upstream received, on one process and on a two-worker cluster.

Routes: ``/admin/*`` (GET only) goes to upstream A, everything else (``/*``) to upstream B.
A walk past the route table shows as a request on B with an /admin path, or a non-GET on
A; every case says what A and B must have seen.
"""

from __future__ import annotations

import socket
from typing import Any, Optional

import attrs
import pytest
import pytest_twisted
from twisted.internet import reactor as _reactor
from twisted.internet import threads

from bungate import Gateway
from bungate.testing import CapturingUpstream, GatewayProcess, wait_until

TIMEOUT = 10


@attrs.frozen
class Case:
    """One raw request, the status it must get, and what reaches the upstreams."""

    name: str
    raw: bytes
    status: int
    upstream: Optional[str] = None  # "A" or "B": who receives it (None: nobody)
    path: Optional[bytes] = None  # the target that upstream must receive
    reason: Optional[bytes] = None  # a word the refusal's body must hold


def get(target: bytes, *headers: bytes, method: bytes = b"GET", host: bytes = b"gw.test") -> bytes:
    lines = [method + b" " + target + b" HTTP/1.1"]
    if host:
        lines.append(b"Host: " + host)
    lines += [*headers, b"Connection: close"]
    return b"\r\n".join(lines) + b"\r\n\r\n"


CASES = [
    # --- walking past the route table -------------------------------------------------
    Case("plain", get(b"/admin/users"), 200, "A", b"/admin/users"),
    Case(
        "absolute-form is routed on its path, its authority is the Host",
        get(b"http://any.host/admin/users", host=b"other.test"),
        200,
        "A",
        b"/admin/users",
    ),
    Case("encoded dot segments", get(b"/public/%2e%2e/admin/x"), 200, "A", b"/admin/x"),
    Case("mixed-case encoded dots", get(b"/public/.%2E/admin/x"), 200, "A", b"/admin/x"),
    Case("encoded unreserved", get(b"/%61dmin/x"), 200, "A", b"/admin/x"),
    Case("duplicate slashes", get(b"//admin//x"), 200, "A", b"/admin/x"),
    Case("encoded slash", get(b"/admin%2Fx"), 400, reason=b"encoded_slash"),
    Case("encoded slash in a dot walk", get(b"/public/..%2fadmin/x"), 400, reason=b"encoded"),
    Case("encoded backslash", get(b"/admin%5cx"), 400, reason=b"encoded_slash"),
    Case("raw backslash", get(b"/public\\..\\admin"), 400),
    Case("fragment", get(b"/admin/x#y"), 400, reason=b"fragment"),
    Case("path parameters", get(b"/admin;x/users"), 400, reason=b"path_params"),
    Case("above the root", get(b"/a/../../etc/passwd"), 400, reason=b"above_root"),
    Case("encoded NUL", get(b"/admin/%00"), 400, reason=b"control"),
    Case("method rule holds", get(b"/admin/x", method=b"POST"), 405),
    Case("method rule holds encoded", get(b"/%61dmin/x", method=b"DELETE"), 405),
    Case("asterisk-form for OPTIONS", get(b"*", method=b"OPTIONS"), 204),
    Case("asterisk-form for GET", get(b"*"), 400, reason=b"asterisk"),
    Case("CONNECT", get(b"gw.test:443", method=b"CONNECT"), 405, reason=b"connect"),
    Case("TRACE", get(b"/public/x", method=b"TRACE"), 405),
    # --- Host -----------------------------------------------------------------------------
    Case("no Host in HTTP/1.1", get(b"/public/x", host=b""), 400, reason=b"missing_host"),
    Case(
        "two Hosts", get(b"/public/x", b"Host: evil.test"), 400, reason=b"repeated_host"
    ),
    Case("a Host that is no host", get(b"/public/x", host=b"a b"), 400),
    Case("a Host with a path", get(b"/public/x", host=b"evil.test/x"), 400, reason=b"bad_host"),
    Case(
        "HTTP/1.0 without Host",
        b"GET /public/x HTTP/1.0\r\n\r\n",
        200,
        "B",
        b"/public/x",
    ),
    # --- framing and limits -----------------------------------------------------------
    Case("bare LF", b"GET /public/x HTTP/1.1\nHost: gw.test\n\n", 400, reason=b"bare_lf"),
    Case("request line too long", get(b"/public/" + b"a" * 9000), 414),
    Case("header section too large", get(b"/public/x", b"X-Big: " + b"b" * 17000), 431),
    Case(
        "Content-Length over the limit",
        get(b"/public/x", b"Content-Length: 100000", method=b"POST"),
        413,
    ),
    Case(
        "100-continue with an over-limit length",
        get(b"/public/x", b"Content-Length: 100000", b"Expect: 100-continue", method=b"POST"),
        413,
    ),
    Case(
        "chunked over the limit",
        get(b"/public/x", b"Transfer-Encoding: chunked", method=b"POST")
        + b"800\r\n"
        + b"c" * 2048
        + b"\r\n",
        413,
    ),
    Case(
        "CL and TE together",
        get(b"/public/x", b"Content-Length: 4", b"Transfer-Encoding: chunked", method=b"POST")
        + b"0\r\n\r\n",
        400,
    ),
]


def exchange(port: int, raw: bytes) -> bytes:
    """Blocking: send ``raw``, read until the gateway closes (or stops answering)."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
        s.sendall(raw)
        data = b""
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        except (ConnectionResetError, socket.timeout):
            pass
    return data


def parse(data: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    if lines[0].startswith(b"HTTP/1.1 100"):  # an interim answer: skip it
        return parse(body)
    status = int(lines[0].split(b" ")[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines[1:])}
    return status, headers, body


@pytest.fixture(scope="module")
def upstreams() -> Any:
    a, b = CapturingUpstream(_reactor).start(), CapturingUpstream(_reactor).start()
    yield {"A": a, "B": b}
    pytest_twisted.blockon(a.stop())
    pytest_twisted.blockon(b.stop())


def gateway_config(upstreams: Any) -> dict[str, Any]:
    return {
        "server": {"host": "127.0.0.1", "port": 0, "max_body_size": 1000},
        "logger": {"level": "info", "request_logging": True},
        "metrics": {"enabled": True},
        "routes": [
            {"pattern": "/admin/*", "target": upstreams["A"].url, "methods": ["GET"]},
            {"pattern": "/*", "target": upstreams["B"].url},
        ],
    }


@pytest.fixture(scope="module", params=["single", "cluster"])
def gateway_port(request: Any, upstreams: Any) -> Any:
    config = gateway_config(upstreams)
    if request.param == "single":
        gw = Gateway(config)
        pytest_twisted.blockon(gw.listen())
        yield gw.ports[0].getHost().port
        pytest_twisted.blockon(gw.close())
        return
    config["cluster"] = {"enabled": True, "workers": 2, "shutdown_timeout": 5}
    process = GatewayProcess(_reactor, config)
    pytest_twisted.blockon(process.start())
    yield process.port
    try:
        pytest_twisted.blockon(process.stop())
    finally:
        process.cleanup()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
@pytest_twisted.inlineCallbacks
def test_edge_case(case: Case, gateway_port: int, upstreams: Any) -> Any:
    before = {name: len(u.requests) for name, u in upstreams.items()}
    data = yield threads.deferToThread(exchange, gateway_port, case.raw)
    status, headers, body = parse(data)
    assert status == case.status, (case.name, data[:300])
    if case.reason is not None:
        assert case.reason in body, (case.name, body)
    if case.upstream is not None:
        other = "B" if case.upstream == "A" else "A"
        got = upstreams[case.upstream]
        yield wait_until(_reactor, lambda: len(got.requests) > before[case.upstream], TIMEOUT)
        assert got.requests[-1].target == case.path
        assert len(upstreams[other].requests) == before[other]
    else:
        assert {n: len(u.requests) for n, u in upstreams.items()} == before, case.name
    if status >= 400:
        assert headers.get(b"connection") == b"close" or status in (404, 405)


@pytest_twisted.inlineCallbacks
def test_the_upstream_gets_only_the_headers_it_should(gateway_port: int, upstreams: Any) -> Any:
    raw = get(
        b"http://any.host/public/h",
        b"X-Forwarded-Host: forged.test",
        b"X-Request-Id: req-1",
        b"X_Forwarded_For: 6.6.6.6",
        b"X-Caller: forged",
        b"Connection: X-Caller",
        b"Keep-Alive: timeout=5",
        b"TE: trailers",
        host=b"other.test",
    )
    data = yield threads.deferToThread(exchange, gateway_port, raw)
    status, headers, body = parse(data)
    assert status == 200 and body == b"ok"
    seen = upstreams["B"].requests[-1]
    names = [n.lower() for n, _ in seen.headers]
    assert seen.header(b"x-forwarded-host") == [b"any.host"]  # the authority, not forged
    assert seen.header(b"host") == [upstreams["B"].url.split("//")[1].encode()]
    assert b"x_forwarded_for" not in names  # underscores dropped (CGI would read XFF)
    assert b"x-caller" not in names  # the client named it hop-by-hop
    assert b"keep-alive" not in names and b"te" not in names and b"connection" not in names
    assert seen.header(b"x-request-id") == [b"req-1"]
    # The upstream's own Server and its internal controls stay behind.
    assert headers[b"server"] == b"bungate"
    assert b"x-accel-redirect" not in headers
    assert headers[b"x-powered-by"] == b"upstream"  # (not on nginx's default list)


@pytest_twisted.inlineCallbacks
def test_refusals_are_counted_by_reason(gateway_port: int) -> Any:
    yield threads.deferToThread(exchange, gateway_port, get(b"/admin%2Fx"))
    yield threads.deferToThread(exchange, gateway_port, get(b"/admin/x", method=b"POST"))
    data = yield threads.deferToThread(exchange, gateway_port, get(b"/metrics"))
    status, _, body = parse(data)
    assert status == 200
    text = body.decode()
    assert 'bungate_requests_rejected_total{reason="encoded_slash",status="400"}' in text
    assert 'bungate_requests_rejected_total{reason="method_not_allowed",status="405"}' in text


@pytest_twisted.inlineCallbacks
def test_every_refusal_leaves_an_access_line_with_the_client_and_the_reason(
    upstreams: Any,
) -> Any:
    config = gateway_config(upstreams)
    config["cluster"] = {"enabled": True, "workers": 1, "shutdown_timeout": 5}
    process = GatewayProcess(_reactor, config)
    yield process.start()
    try:
        mark = process.mark()
        for raw in (
            get(b"/admin%2Fx"),  # refused by the dispatcher
            get(b"/public/" + b"a" * 9000),  # refused by the connection itself
            b"GET /x HTTP/1.1\nHost: a\n\n",
        ):
            yield threads.deferToThread(exchange, process.port, raw)
        for reason in ("encoded_slash", "uri_too_long", "bare_lf"):
            line = yield process.wait_for(rf"refused={reason}", since=mark)
            assert "client=127.0.0.1" in line.string
    finally:
        yield process.stop()
        process.cleanup()
