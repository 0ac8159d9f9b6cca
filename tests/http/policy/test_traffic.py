"""
CORS, header rules, rewrites, hooks, function middlewares, trusted proxies and the PROXY
protocol, as raw bytes against a gateway in this process, with what the upstream
received checked byte for byte.
"""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, threads
from twisted.internet import reactor as _reactor

from bungate import Gateway
from bungate.testing import CapturingUpstream
from tests.http.test_proxy import raw_request, split

reactor: Any = _reactor


@pytest.fixture
def capture() -> Any:
    upstream = CapturingUpstream(reactor).start()
    yield upstream
    pytest_twisted.blockon(upstream.stop())


def build(config: dict[str, Any], routes: list[dict[str, Any]] = ()) -> Gateway:  # type: ignore[assignment]
    base: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": 0},
        "logger": {"request_logging": False, "level": "error"},
    }
    for name, value in config.items():
        base[name] = {**base.get(name, {}), **value} if isinstance(value, dict) else value
    gw = Gateway(base)
    for route in routes:
        route = dict(route)
        gw.add_route(route.pop("pattern"), **route)
    return gw


@pytest.fixture
def gateways() -> Any:
    """``gw = yield gateways(config, routes)``: a listening gateway, closed afterwards."""
    made: list[Gateway] = []

    def make(config: dict[str, Any], routes: list[dict[str, Any]] = ()) -> Any:  # type: ignore[assignment]
        gw = build(config, routes)
        made.append(gw)

        def listening(_: Any) -> Gateway:
            gw.port = gw.ports[0].getHost().port  # type: ignore[attr-defined]
            return gw

        return gw.listen().addCallback(listening)

    yield make
    for gw in made:
        pytest_twisted.blockon(gw.close())


def get(path: bytes, *headers: bytes) -> bytes:
    """A GET of ``path`` with ``headers`` (``b"Name: value"`` each), closing after it."""
    lines = b"".join(h + b"\r\n" for h in headers)
    return b"GET " + path + b" HTTP/1.1\r\nHost: gw\r\n" + lines + b"Connection: close\r\n\r\n"


def send(gw: Any, data: bytes) -> defer.Deferred[Any]:
    return threads.deferToThread(lambda: split(raw_request(gw.port, data)))


# --- CORS ----------------------------------------------------------------------------------

CORS = {"origins": ["https://app.example", "~https://[a-z]+\\.example\\.org"], "max_age": 60}


@pytest_twisted.inlineCallbacks
def test_a_preflight_is_answered_without_the_upstream(gateways, capture):
    gw = yield gateways(
        {},
        [
            {
                "pattern": "/api/*",
                "target": capture.url,
                "cors": {**CORS, "headers": ["X-Token"]},
                "methods": ["GET", "POST"],
            }
        ],
    )
    status, headers, _ = yield send(
        gw,
        b"OPTIONS /api/x HTTP/1.1\r\nHost: gw\r\nOrigin: https://app.example\r\n"
        b"Access-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: x-token\r\n"
        b"Connection: close\r\n\r\n",
    )
    assert status == 204
    assert headers[b"access-control-allow-origin"] == [b"https://app.example"]
    assert headers[b"access-control-allow-methods"] == [b"GET, HEAD, POST, PUT, PATCH, DELETE"]
    assert headers[b"access-control-allow-headers"] == [b"X-Token"]
    assert headers[b"access-control-max-age"] == [b"60"]
    assert b"Origin" in headers[b"vary"][0]
    assert capture.requests == []


@pytest.mark.parametrize(
    "origin, method, extra, reason",
    [
        (b"https://evil.example", b"GET", b"", b"cors_origin_not_allowed"),
        (b"https://app.example", b"TRACE", b"", b"cors_method_not_allowed"),
        (
            b"https://app.example",
            b"GET",
            b"Access-Control-Request-Headers: x-other\r\n",
            b"cors_header_not_allowed",
        ),
        # A regex origin is matched against the whole origin, not a substring.
        (b"https://a.example.org.evil.example", b"GET", b"", b"cors_origin_not_allowed"),
    ],
)
@pytest_twisted.inlineCallbacks
def test_a_preflight_outside_the_config_is_refused_saying_why(
    gateways, capture, origin, method, extra, reason
):
    gw = yield gateways(
        {}, [{"pattern": "/api/*", "target": capture.url, "cors": {**CORS, "headers": ["X-Token"]}}]
    )
    status, headers, body = yield send(
        gw,
        b"OPTIONS /api/x HTTP/1.1\r\nHost: gw\r\nOrigin: " + origin + b"\r\n"
        b"Access-Control-Request-Method: "
        + method
        + b"\r\n"
        + extra
        + b"Connection: close\r\n\r\n",
    )
    assert status == 403 and json.loads(body)["error"] == reason.decode()
    assert b"access-control-allow-origin" not in headers
    assert capture.requests == []


@pytest_twisted.inlineCallbacks
def test_answers_to_allowed_origins_carry_cors_headers_and_vary(gateways, capture):
    gw = yield gateways(
        {"cors": {**CORS, "credentials": True, "expose_headers": ["X-Total"]}},
        [{"pattern": "/api/*", "target": capture.url}],
    )
    status, headers, _ = yield send(
        gw,
        get(b"/api/x", b"Origin: https://shop.example.org"),
    )
    assert status == 200
    assert headers[b"access-control-allow-origin"] == [b"https://shop.example.org"]
    assert headers[b"access-control-allow-credentials"] == [b"true"]
    assert headers[b"access-control-expose-headers"] == [b"X-Total"]
    assert headers[b"vary"] == [b"Origin"]
    status, headers, _ = yield send(
        gw,
        get(b"/api/x", b"Origin: https://evil.example"),
    )
    assert status == 200 and b"access-control-allow-origin" not in headers
    assert headers[b"vary"] == [b"Origin"]


@pytest_twisted.inlineCallbacks
def test_a_route_can_turn_the_top_level_cors_off(gateways, capture):
    gw = yield gateways(
        {"cors": {"origins": "*"}},
        [
            {"pattern": "/internal/*", "target": capture.url, "cors": False},
            {"pattern": "/api/*", "target": capture.url},
        ],
    )
    _, headers, _ = yield send(
        gw,
        get(b"/api/x", b"Origin: https://a.example"),
    )
    assert headers[b"access-control-allow-origin"] == [b"*"]
    _, headers, _ = yield send(
        gw,
        get(b"/internal/x", b"Origin: https://a.example"),
    )
    assert b"access-control-allow-origin" not in headers


# --- header rules, rewrites, security headers ---------------------------------------------


@pytest_twisted.inlineCallbacks
def test_header_rules_strip_prefix_and_rewrites_reach_the_upstream(gateways, capture):
    gw = yield gateways(
        {},
        [
            {
                "pattern": "/api/v1/*",
                "target": capture.url,
                "strip_prefix": True,
                "path_rewrite": {"^/old/": "/new/"},
                "request_headers": {
                    "set": {"X-Env": "prod"},
                    "add": {"X-Tag": "gw"},
                    "remove": ["X-Debug"],
                },
                "response_headers": {
                    "set": {"Cache-Control": "no-store"},
                    "remove": ["X-Powered-By"],
                },
            }
        ],
    )
    status, headers, _ = yield send(
        gw,
        b"GET /api/v1/old/items?x=1 HTTP/1.1\r\nHost: gw\r\nX-Debug: 1\r\nX-Env: dev\r\n"
        b"X-Tag: client\r\nConnection: close\r\n\r\n",
    )
    assert status == 200
    seen = capture.requests[-1]
    assert seen.target == b"/new/items?x=1"
    assert seen.header(b"x-env") == [b"prod"] and seen.header(b"x-debug") == []
    assert seen.header(b"x-tag") == [b"client", b"gw"]
    assert headers[b"cache-control"] == [b"no-store"] and b"x-powered-by" not in headers


@pytest_twisted.inlineCallbacks
def test_a_rewrite_cannot_make_a_walk_past_the_route_table(gateways, capture):
    # The regex turns /api/x/.. into a dot segment: the result is normalized again.
    gw = yield gateways(
        {}, [{"pattern": "/api/*", "target": capture.url, "path_rewrite": {"X": ".."}}]
    )
    yield send(gw, b"GET /api/a/X/b HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
    assert capture.requests[-1].target == b"/api/b"


@pytest_twisted.inlineCallbacks
def test_security_headers_fill_in_what_the_answer_lacks(gateways, capture):
    gw = yield gateways(
        {
            "security_headers": {
                "enabled": True,
                "frame_options": False,
                "content_security_policy": "default-src 'self'",
            }
        },
        [{"pattern": "/api/*", "target": capture.url}],
    )
    _, headers, _ = yield send(gw, b"GET /api/x HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
    assert headers[b"x-content-type-options"] == [b"nosniff"]
    assert headers[b"content-security-policy"] == [b"default-src 'self'"]
    assert b"x-frame-options" not in headers
    assert b"strict-transport-security" not in headers  # not over TLS
    # The gateway's own answers get them too.
    _, headers, _ = yield send(
        gw, b"GET /nowhere HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"
    )
    assert headers.get(b"x-content-type-options") in (None, [b"nosniff"])


# --- hooks and function middlewares --------------------------------------------------------

seen_hooks: list[Any] = []


def before(request: Any, upstream: Any) -> None:
    upstream.headers.setRawHeaders(b"x-before", [b"1"])
    seen_hooks.append(("before", request.path))


def after(request: Any, status: int, headers: Any) -> None:
    headers.setRawHeaders(b"x-after", [b"%d" % status])


def on_error(request: Any, status: int, failure: Any) -> bool:
    request.setResponseCode(503)
    request.responseHeaders.setRawHeaders(b"content-type", [b"text/plain"])
    request.responseHeaders.setRawHeaders(b"content-length", [b"17"])
    request.write(b"sorry, try later\n")
    request.finish()
    return True


def deny_without_ticket(request: Any, upstream: Any) -> Any:
    if not request.requestHeaders.hasHeader(b"x-ticket"):
        request.setResponseCode(402)
        request.finish()
        return True
    return defer.succeed(None)


async def tag_async(request: Any, upstream: Any) -> None:
    upstream.headers.setRawHeaders(b"x-async", [b"yes"])


def explode(request: Any, upstream: Any) -> None:
    raise RuntimeError("a middleware bug")


@pytest_twisted.inlineCallbacks
def test_hooks_and_function_middlewares(gateways, capture):
    gw = yield gateways(
        {},
        [
            {
                "pattern": "/api/*",
                "target": capture.url,
                "hooks": {"before_request": before, "after_response": after},
                "middlewares": [deny_without_ticket, tag_async],
            },
            {"pattern": "/down/*", "target": "http://127.0.0.1:1", "hooks": {"on_error": on_error}},
            {"pattern": "/buggy/*", "target": capture.url, "middlewares": [explode]},
        ],
    )
    status, headers, _ = yield send(
        gw, b"GET /api/x HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"
    )
    assert status == 402 and headers[b"x-after"] == [b"402"]
    assert capture.requests == []
    status, headers, _ = yield send(
        gw, b"GET /api/x HTTP/1.1\r\nHost: gw\r\nX-Ticket: 1\r\nConnection: close\r\n\r\n"
    )
    assert status == 200 and headers[b"x-after"] == [b"200"]
    assert capture.requests[-1].header(b"x-before") == [b"1"]
    assert capture.requests[-1].header(b"x-async") == [b"yes"]
    status, _, body = yield send(
        gw, b"GET /down/x HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"
    )
    assert (status, body) == (503, b"sorry, try later\n")
    status, _, body = yield send(
        gw, b"GET /buggy/x HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"
    )
    assert status == 500 and b"a middleware bug" not in body and b"request_id" in body


def test_a_middleware_import_string_that_does_not_import_stops_the_gateway():
    from bungate.config import ConfigError

    routes = [{"pattern": "/x/*", "target": "http://127.0.0.1:9", "middlewares": ["nosuch.mw:f"]}]
    gw = build({}, routes)
    failures: list[Any] = []
    gw.listen().addErrback(failures.append)  # fails at once: nothing listens
    error = failures[0].value
    assert isinstance(error, ConfigError)
    assert error.key.endswith("middlewares[0]") and "nosuch" in str(error)


# --- the real client address ------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_a_trusted_proxy_names_the_client_and_an_untrusted_one_cannot(gateways, capture):
    gw = yield gateways(
        {"server": {"trusted_proxies": ["127.0.0.0/8"]}},
        [{"pattern": "/api/*", "target": capture.url}],
    )
    yield send(
        gw,
        b"GET /api/x HTTP/1.1\r\nHost: gw\r\nX-Forwarded-For: 203.0.113.9, 10.0.0.2\r\n"
        b"X-Forwarded-Proto: https\r\nConnection: close\r\n\r\n",
    )
    seen = capture.requests[-1]
    # 10.0.0.2 is not trusted: it is the client (right-most untrusted hop), not 203.0.113.9.
    assert seen.header(b"x-real-ip") == [b"10.0.0.2"]
    assert seen.header(b"x-forwarded-for") == [b"203.0.113.9, 10.0.0.2, 127.0.0.1"]
    assert seen.header(b"x-forwarded-proto") == [b"https"]
    gw2 = yield gateways(
        {"server": {"trusted_proxies": ["10.0.0.0/8"]}},
        [{"pattern": "/api/*", "target": capture.url}],
    )
    yield send(
        gw2,
        get(b"/api/x", b"X-Forwarded-For: 203.0.113.9"),
    )
    seen = capture.requests[-1]
    assert seen.header(b"x-real-ip") == [b"127.0.0.1"]
    assert seen.header(b"x-forwarded-for") == [b"127.0.0.1"]


def proxy_v1(src: bytes, data: bytes) -> bytes:
    return b"PROXY TCP4 " + src + b" 127.0.0.1 40000 80\r\n" + data


@pytest_twisted.inlineCallbacks
def test_the_proxy_protocol_gives_the_client_address_and_a_connection_without_it_is_closed(
    gateways, capture
):
    gw = yield gateways(
        {"server": {"proxy_protocol": True}}, [{"pattern": "/api/*", "target": capture.url}]
    )
    status, _, _ = yield send(
        gw,
        proxy_v1(b"198.51.100.7", b"GET /api/x HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"),
    )
    assert status == 200
    assert capture.requests[-1].header(b"x-real-ip") == [b"198.51.100.7"]
    assert capture.requests[-1].header(b"x-forwarded-for") == [b"198.51.100.7"]
    # v2, binary: signature, version/command, TCP over IPv4, addresses and ports.
    v2 = (
        b"\r\n\r\n\x00\r\nQUIT\n"
        + b"\x21\x11\x00\x0c"
        + socket.inet_aton("192.0.2.44")
        + socket.inet_aton("127.0.0.1")
        + b"\x9c\x40\x00\x50"
    )
    status, _, _ = yield send(
        gw, v2 + b"GET /api/y HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"
    )
    assert status == 200 and capture.requests[-1].header(b"x-real-ip") == [b"192.0.2.44"]
    before = len(capture.requests)
    answer = yield threads.deferToThread(
        raw_request, gw.port, b"GET /api/z HTTP/1.1\r\nHost: gw\r\n\r\n"
    )
    assert answer in (b"", b"<RESET>") and len(capture.requests) == before
