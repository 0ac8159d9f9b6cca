"""
In-process tests of load-balanced routes: a single-process Gateway (or Dispatcher) and
several real UpstreamServer instances on 127.0.0.1, all in the test reactor.

Stopping an upstream here means what a dying upstream process does: it stops listening
(new connections are refused) and closes the connections it has (the gateway's pooled
keep-alive connections go away). ``UpstreamServer.stop`` alone only stops listening, and
the gateway would keep using its cached connections to the "stopped" server.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from prometheus_client import CollectorRegistry
from twisted.internet import defer
from twisted.internet import reactor as _reactor
from twisted.web.http_headers import Headers

from bungate.config import ConfigError, parse_config
from bungate.gateway import Gateway
from bungate.http.app import check_config as check_startup
from bungate.http.balanced import BalancedRoute
from bungate.http.dispatch import Dispatcher
from bungate.http.site import GatewaySite
from bungate.ops.metrics import GatewayMetrics
from bungate.testing import UpstreamServer, wait_until
from tests.conftest import run_with_plugin

reactor: Any = _reactor


# --- helpers ----------------------------------------------------------------------------


def start_upstream(name: str, port: int = 0) -> UpstreamServer:
    """A real upstream on 127.0.0.1 (``kill()`` makes it die like a process)."""
    return UpstreamServer(reactor, name=name).start(port=port)


def kill(server: UpstreamServer) -> Any:
    """Stop listening (refuse new connections) and close every open connection."""
    return server.kill()


def served(server: UpstreamServer, since: int = 0) -> int:
    """Requests the upstream answered (health probes left out)."""
    return sum(1 for r in server.requests[since:] if r.path != b"/health")


def lb_route(urls: list[str], pattern: str = "/*", **more: Any) -> dict[str, Any]:
    lb = {"strategy": "round-robin", "targets": [{"url": u} for u in urls]}
    lb.update(more.pop("lb", {}))
    return {"pattern": pattern, "load_balancer": lb, **more}


def gateway_config(*routes: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {
        "server": {"host": "127.0.0.1", "port": 0},
        "cluster": {"enabled": False},
        "logger": {"request_logging": False},
        "routes": list(routes),
        **top,
    }


@defer.inlineCallbacks
def start_gateway(config: dict[str, Any]) -> Any:
    gw = Gateway(config, reactor=reactor, manage_logging=False)
    yield gw.listen()
    gw.base = f"http://127.0.0.1:{gw.ports[0].getHost().port}"  # type: ignore[attr-defined]
    return gw


@defer.inlineCallbacks
def get(url: str, method: str = "GET", **kwargs: Any) -> Any:
    response = yield treq.request(method, url, persistent=False, **kwargs)
    body = yield response.content()
    return response, body


@defer.inlineCallbacks
def get_json(url: str, **kwargs: Any) -> Any:
    response, body = yield get(url, **kwargs)
    assert response.code == 200, (response.code, body)
    return json.loads(body)


def balanced_route(gw: Gateway, index: int = 0) -> BalancedRoute:
    assert gw.dispatcher is not None
    route: BalancedRoute = gw.dispatcher.balanced[index]
    return route


# --- balancing and retries -----------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_round_robin_spreads_over_three_upstreams() -> Any:
    servers = [start_upstream(f"u{i}") for i in range(3)]
    gw = yield start_gateway(gateway_config(lb_route([s.url for s in servers])))
    try:
        names = []
        for _ in range(30):
            doc = yield get_json(gw.base + "/spread")
            names.append(doc["server"])
        assert [names.count(f"u{i}") for i in range(3)] == [10, 10, 10]
        assert [served(s) for s in servers] == [10, 10, 10]
        # in-flight accounting went back to zero, every request counted once
        upstreams = balanced_route(gw).balancer.upstreams
        assert [u.active for u in upstreams] == [0, 0, 0]
        assert [u.requests for u in upstreams] == [10, 10, 10]
    finally:
        yield gw.close()
        for s in servers:
            yield s.stop()


@pytest_twisted.inlineCallbacks
def test_stopped_upstream_share_moves_with_no_failed_get() -> Any:
    servers = [start_upstream(f"u{i}") for i in range(3)]
    gw = yield start_gateway(gateway_config(lb_route([s.url for s in servers])))
    try:
        for _ in range(9):  # every upstream has a pooled connection now
            yield get_json(gw.base + "/warm")
        yield kill(servers[1])
        mark = [len(s.requests) for s in servers]
        codes = []
        for _ in range(30):
            response, _ = yield get(gw.base + "/after")
            codes.append(response.code)
        assert codes == [200] * 30  # each attempt refused by u1 was retried elsewhere
        after = [served(s, m) for s, m in zip(servers, mark)]
        assert after[1] == 0
        assert after[0] + after[2] == 30
        # both got part of it (round robin over a changing candidate list is uneven:
        # the retry takes the rotation's next slot among the two that are left)
        assert min(after[0], after[2]) >= 5
        u1 = balanced_route(gw).balancer.upstreams[1]
        assert u1.failures >= 1  # the refused attempts were reported to the balancer
        assert u1.active == 0
    finally:
        yield gw.close()
        for s in (servers[0], servers[2]):
            yield s.stop()


@pytest_twisted.inlineCallbacks
def test_refused_post_is_not_retried() -> Any:
    servers = [start_upstream(f"u{i}") for i in range(2)]
    gw = yield start_gateway(gateway_config(lb_route([s.url for s in servers])))
    try:
        yield kill(servers[0])
        codes = []
        for _ in range(4):
            response, body = yield get(gw.base + "/write", method="POST", data=b"x")
            codes.append(response.code)
            if response.code == 502:
                assert json.loads(body)["reason"] == "refused"
        # round robin: every other POST went to the dead target and was not repeated
        assert sorted(codes) == [200, 200, 502, 502]
        assert served(servers[1]) == 2
        # an idempotent PUT is retried
        codes = []
        for _ in range(4):
            response, _ = yield get(gw.base + "/put", method="PUT", data=b"x")
            codes.append(response.code)
        assert codes == [200] * 4
    finally:
        yield gw.close()
        yield servers[1].stop()


def blackhole() -> tuple[socket.socket, list[socket.socket], str]:
    """
    A listening socket that never accepts, with its accept queue full: Linux drops further
    SYNs, so a connect to it hangs (like a firewalled host) instead of being refused.
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    address = listener.getsockname()
    fillers = []
    for _ in range(8):  # the queue holds backlog + 1; a few more in case of slack
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(address)
        fillers.append(s)
    return listener, fillers, f"http://127.0.0.1:{address[1]}"


@pytest_twisted.inlineCallbacks
def test_connect_timeout_is_retried_on_another_target() -> Any:
    listener, fillers, dead_url = blackhole()
    good = start_upstream("good")
    route = lb_route([dead_url, good.url], timeout=0.3)
    gw = yield start_gateway(gateway_config(route))
    try:
        codes = []
        for _ in range(4):  # round-robin: every other first attempt goes to the black hole
            response, _ = yield get(gw.base + "/x")
            codes.append(response.code)
        assert codes == [200] * 4, codes
        # a POST is never sent twice: it gets the 504
        codes = []
        for _ in range(2):
            response, _ = yield get(gw.base + "/x", method="POST")
            codes.append(response.code)
        assert sorted(codes) == [200, 504], codes
    finally:
        yield gw.close()
        yield good.stop()
        for s in [listener, *fillers]:
            s.close()


@pytest_twisted.inlineCallbacks
def test_all_upstreams_down_answers_503_json_at_once() -> Any:
    servers = [start_upstream(f"u{i}") for i in range(3)]
    health = {"enabled": True, "interval": 0.05, "timeout": 1, "unhealthy_threshold": 1}
    config = gateway_config(lb_route([s.url for s in servers], lb={"health_check": health}))
    gw = yield start_gateway(config)
    try:
        upstreams = balanced_route(gw).balancer.upstreams
        for s in servers:
            yield kill(s)
        yield wait_until(
            reactor, lambda: not any(u.healthy for u in upstreams), what="all unhealthy"
        )
        for method in ("GET", "POST"):
            response, body = yield get(gw.base + "/x", method=method)
            assert response.code == 503
            assert response.headers.getRawHeaders(b"content-type") == [b"application/json"]
            doc = json.loads(body)
            assert doc["error"] == "no_healthy_upstream"
            assert doc["reason"] == "unhealthy"
            assert doc["route"] == "/*"
            assert doc["request_id"]
        assert [u.requests for u in upstreams] == [0, 0, 0]
    finally:
        yield gw.close()


# --- circuit breaker ---------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_breaker_opens_and_answers_503_without_touching_the_upstream() -> Any:
    server = start_upstream("only")
    breaker = {"enabled": True, "failure_threshold": 2, "reset_timeout": 0.3}
    config = gateway_config(lb_route([server.url], circuit_breaker=breaker))
    gw = yield start_gateway(config)
    try:
        for _ in range(2):
            response, _ = yield get(gw.base + "/status/500")
            assert response.code == 500  # relayed: the upstream did answer
        assert served(server) == 2
        upstream = balanced_route(gw).balancer.upstreams[0]
        assert upstream.breaker.state == "open"
        for _ in range(5):
            response, body = yield get(gw.base + "/status/200")
            assert response.code == 503
            doc = json.loads(body)
            assert (doc["error"], doc["reason"]) == ("no_healthy_upstream", "circuit_open")
        assert served(server) == 2  # the open circuit kept every request away
        # after reset_timeout one trial goes through; its success closes the circuit
        yield wait_until(reactor, lambda: upstream.breaker.state == "half-open", timeout=5)
        response, _ = yield get(gw.base + "/status/200")
        assert response.code == 200
        assert upstream.breaker.state == "closed"
        assert served(server) == 3
    finally:
        yield gw.close()
        yield server.stop()


@pytest_twisted.inlineCallbacks
def test_breaker_on_a_plain_target_route() -> Any:
    server = start_upstream("plain")
    breaker = {"enabled": True, "failure_threshold": 2, "reset_timeout": 60}
    route = {"pattern": "/*", "target": server.url, "circuit_breaker": breaker}
    gw = yield start_gateway(gateway_config(route))
    try:
        for _ in range(2):
            response, _ = yield get(gw.base + "/status/502")
            assert response.code == 502
        response, body = yield get(gw.base + "/status/200")
        assert response.code == 503
        assert json.loads(body)["reason"] == "circuit_open"
        assert served(server) == 2
    finally:
        yield gw.close()
        yield server.stop()


@pytest_twisted.inlineCallbacks
def test_open_circuit_sends_traffic_to_the_other_targets() -> Any:
    bad, good = start_upstream("bad"), start_upstream("good")
    breaker = {"enabled": True, "failure_threshold": 1, "reset_timeout": 60}
    # the same path on both: "bad" refuses connections, "good" answers
    urls = [bad.url, good.url]
    yield kill(bad)
    config = gateway_config(lb_route(urls, circuit_breaker=breaker))
    gw = yield start_gateway(config)
    try:
        for _ in range(6):
            doc = yield get_json(gw.base + "/x")
            assert doc["server"] == "good"
        upstreams = balanced_route(gw).balancer.upstreams
        assert upstreams[0].breaker.state == "open"
        assert upstreams[0].requests == 1  # tried once, then the circuit kept it out
    finally:
        yield gw.close()
        yield good.stop()


# --- health checks -------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_health_check_takes_an_upstream_out_and_back() -> Any:
    servers = [start_upstream(f"u{i}") for i in range(2)]
    health = {
        "enabled": True,
        "interval": 0.05,
        "timeout": 1,
        "unhealthy_threshold": 2,
        "healthy_threshold": 2,
    }
    config = gateway_config(lb_route([s.url for s in servers], lb={"health_check": health}))
    gw = yield start_gateway(config)
    try:
        upstreams = balanced_route(gw).balancer.upstreams
        # probes are running: both upstreams see GET /health
        yield wait_until(
            reactor,
            lambda: all(any(r.path == b"/health" for r in s.requests) for s in servers),
            what="first probes",
        )
        port = servers[0].port.getHost().port
        yield kill(servers[0])
        yield wait_until(reactor, lambda: not upstreams[0].healthy, what="u0 unhealthy")
        mark = len(servers[1].requests)
        for _ in range(6):
            doc = yield get_json(gw.base + "/x")
            assert doc["server"] == "u1"
        assert served(servers[1], mark) == 6
        assert upstreams[0].requests == 0  # never tried: out of rotation
        # it comes back on the same port and returns after healthy_threshold passes
        revived = start_upstream("u0-again", port=port)
        servers[0] = revived
        yield wait_until(reactor, lambda: upstreams[0].healthy, what="u0 healthy again")
        names = []
        for _ in range(6):
            doc = yield get_json(gw.base + "/x")
            names.append(doc["server"])
        assert sorted(set(names)) == ["u0-again", "u1"]
    finally:
        yield gw.close()
        probes = [len(s.requests) for s in servers]
        # close() stopped the probes: nothing more arrives
        for s in servers:
            yield s.stop()
        assert not balanced_route(gw).checker._loop  # type: ignore[union-attr]
        assert [len(s.requests) for s in servers] == probes


# --- sticky sessions -----------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_sticky_cookie_pins_a_client_to_its_target() -> Any:
    servers = [start_upstream(f"u{i}") for i in range(3)]
    sticky = {"enabled": True, "cookie": "pin", "ttl": 120}
    gw = yield start_gateway(
        gateway_config(lb_route([s.url for s in servers], lb={"sticky_session": sticky}))
    )
    try:
        response, body = yield get(gw.base + "/first")
        first = json.loads(body)["server"]
        cookies = response.headers.getRawHeaders(b"set-cookie")
        assert cookies is not None and len(cookies) == 1
        cookie = cookies[0].decode()
        assert cookie.startswith("pin=")
        assert "Max-Age=120" in cookie
        assert "Path=/" in cookie and "HttpOnly" in cookie
        value = cookie.split(";")[0].split("=", 1)[1]
        assert first not in value  # opaque, not the target URL
        for _ in range(6):
            response, body = yield get(
                gw.base + "/again", headers={b"cookie": [f"pin={value}".encode()]}
            )
            assert json.loads(body)["server"] == first
            assert response.headers.getRawHeaders(b"set-cookie") is None  # already pinned
        # without the cookie the strategy spreads again
        names = set()
        for _ in range(3):
            doc = yield get_json(gw.base + "/free")
            names.add(doc["server"])
        assert len(names) == 3
    finally:
        yield gw.close()
        for s in servers:
            yield s.stop()


@pytest_twisted.inlineCallbacks
def test_sticky_target_gone_moves_and_repins() -> Any:
    servers = [start_upstream(f"u{i}") for i in range(2)]
    sticky = {"enabled": True}
    gw = yield start_gateway(
        gateway_config(lb_route([s.url for s in servers], lb={"sticky_session": sticky}))
    )
    try:
        response, body = yield get(gw.base + "/a")
        pinned = json.loads(body)["server"]
        value = response.headers.getRawHeaders(b"set-cookie")[0].split(b";")[0]
        assert value.startswith(b"bungate_sticky=")
        yield kill(servers[int(pinned[1])])
        response, body = yield get(gw.base + "/b", headers={b"cookie": [value]})
        assert response.code == 200
        assert json.loads(body)["server"] != pinned
        repinned = response.headers.getRawHeaders(b"set-cookie")[0].split(b";")[0]
        assert repinned != value
    finally:
        yield gw.close()
        for s in servers:
            if s.port.connected:
                yield s.stop()


# --- metrics -------------------------------------------------------------------------------


def _sample(registry: CollectorRegistry, name: str, **labels: str) -> Any:
    return registry.get_sample_value(name, labels)


@pytest_twisted.inlineCallbacks
def test_upstream_metrics() -> Any:
    servers = [start_upstream(f"u{i}") for i in range(2)]
    registry = CollectorRegistry()
    breaker = {"enabled": True, "failure_threshold": 1, "reset_timeout": 60}
    config = parse_config(
        gateway_config(
            lb_route([s.url for s in servers], circuit_breaker=breaker),
            metrics={"enabled": True},
        )
    )
    metrics = GatewayMetrics(registry=registry)
    dispatcher = Dispatcher(config, reactor, metrics=metrics)
    site = GatewaySite(dispatcher, reactor, on_done=dispatcher.on_done)
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    base = f"http://127.0.0.1:{port.getHost().port}"
    urls = [s.url for s in servers]
    try:
        for url in urls:
            assert _sample(registry, "bungate_upstream_healthy", route="/*", target=url) == 1
            assert _sample(registry, "bungate_circuit_state", route="/*", target=url) == 0
        for _ in range(4):
            yield get_json(base + "/m")
        for url in urls:
            assert _sample(registry, "bungate_upstream_requests_total", route="/*", target=url) == 2
        response, _ = yield get(base + "/status/503")  # to u0: a failure opens its circuit
        assert response.code == 503
        assert _sample(registry, "bungate_circuit_state", route="/*", target=urls[0]) == 2
        assert _sample(registry, "bungate_circuit_state", route="/*", target=urls[1]) == 0
        # health changes are published too
        balanced = dispatcher.balanced[0]
        balanced.balancer.set_healthy(balanced.balancer.upstreams[1], False)
        assert _sample(registry, "bungate_upstream_healthy", route="/*", target=urls[1]) == 0
    finally:
        dispatcher.close()
        yield port.stopListening()
        yield dispatcher.close_connections()
        for s in servers:
            yield s.stop()


# --- startup checks ------------------------------------------------------------------------


def test_unknown_strategy_is_a_startup_error_listing_installed_ones() -> None:
    config = parse_config(
        gateway_config(
            {"pattern": "/a", "target": "http://127.0.0.1:1"},
            lb_route(["http://127.0.0.1:1"], lb={"strategy": "round-robbin"}),
        )
    )
    with pytest.raises(ConfigError) as e:
        check_startup(config)
    assert e.value.key == "routes[1].load_balancer.strategy"
    assert "'round-robbin'" in e.value.problem
    assert "round-robin" in e.value.problem and "least-connections" in e.value.problem
    # a worker (or a single process) refuses it the same way
    with pytest.raises(ConfigError, match=r"routes\[1\]\.load_balancer\.strategy"):
        Dispatcher(config, reactor)


def test_unknown_middleware_is_a_startup_error() -> None:
    config = parse_config(gateway_config(lb_route(["http://127.0.0.1:1"]), middlewares=["nope"]))
    with pytest.raises(ConfigError) as e:
        check_startup(config)
    assert e.value.key == "middlewares[0]"
    assert "unknown middleware 'nope'; installed:" in e.value.problem
    route = {"pattern": "/a", "target": "http://127.0.0.1:1", "middlewares": ["x-ok", "nah"]}
    config = parse_config(gateway_config(route))
    with pytest.raises(ConfigError) as e:
        check_startup(config)
    assert e.value.key == "routes[0].middlewares[0]"


def test_fast_path_routes_carry_no_middleware_or_balancer() -> None:
    config = parse_config(gateway_config({"pattern": "/*", "target": "http://127.0.0.1:1"}))
    dispatcher = Dispatcher(config, reactor)
    match = dispatcher.router.match("/x")
    assert match is not None
    assert match.route.chain is None
    assert match.route.balanced is None
    assert dispatcher.middlewares == []


# --- middlewares (in process, with plugins looked up through a stub registry) ----------------


class Deny:
    name = "deny"

    def process_request(self, request: Any, upstream: Any) -> Any:
        if request.getHeader(b"x-deny"):
            request.setResponseCode(403)
            request.setHeader(b"content-type", b"text/plain")
            request.write(b"denied by middleware")
            request.finish()
            return True
        return None

    def process_response(self, request: Any, status: int, headers: Headers) -> None:
        headers.addRawHeader(b"x-order", b"deny")


class SlowTag:
    """Asynchronous: answers through a Deferred a little later."""

    name = "slow-tag"

    def process_request(self, request: Any, upstream: Any) -> Any:
        d: defer.Deferred[None] = defer.Deferred()

        def later() -> None:
            upstream.headers.setRawHeaders(b"x-tag", [b"on"])
            upstream.headers.removeHeader(b"x-secret")
            upstream.path = b"/rewritten" + upstream.path
            d.callback(None)

        reactor.callLater(0.01, later)
        return d

    def process_response(self, request: Any, status: int, headers: Headers) -> None:
        headers.addRawHeader(b"x-order", b"slow-tag")
        headers.setRawHeaders(b"x-seen", [str(status).encode()])


class Broken:
    name = "broken"

    def process_request(self, request: Any, upstream: Any) -> Any:
        if request.getHeader(b"x-break"):
            raise RuntimeError("boom")
        if request.getHeader(b"x-smuggle"):
            upstream.path = b"/x HTTP/1.1\r\nHost: h\r\n\r\nGET /smuggled"
        return None

    def process_response(self, request: Any, status: int, headers: Headers) -> None:
        pass


@pytest.fixture
def stub_middlewares(monkeypatch: pytest.MonkeyPatch) -> None:
    known = {m.name: m for m in (Deny, SlowTag, Broken)}

    def find(name: str) -> Any:
        try:
            return known[name]
        except KeyError:
            raise LookupError(f"unknown middleware {name!r}; installed: {sorted(known)}") from None

    monkeypatch.setattr("bungate.http.middleware.find_middleware", find)


@pytest_twisted.inlineCallbacks
def test_middlewares_answer_adjust_and_fail(stub_middlewares: None) -> Any:
    servers = [start_upstream(f"u{i}") for i in range(2)]
    routes = [
        lb_route([s.url for s in servers], pattern="/lb/*", middlewares=["slow-tag", "broken"]),
        {"pattern": "/plain/*", "target": servers[0].url},
        {"pattern": "/h", "handler": "bungate.handlers:echo", "methods": ["GET"]},
    ]
    gw = yield start_gateway(gateway_config(*routes, middlewares=["deny"]))
    try:
        # a gateway-wide middleware answers itself: nothing is proxied
        for path in ("/lb/x", "/plain/x", "/nowhere"):
            response, body = yield get(gw.base + path, headers={b"x-deny": [b"1"]})
            assert (response.code, body) == (403, b"denied by middleware")
        assert [served(s) for s in servers] == [0, 0]
        # the route's async middleware changed the upstream request; responses seen in
        # reverse order (route middlewares first, then the gateway-wide ones)
        response, body = yield get(gw.base + "/lb/x?q=1", headers={b"x-secret": [b"s"]})
        doc = json.loads(body)
        assert response.code == 200
        assert doc["uri"] == "/rewritten/lb/x?q=1"
        assert doc["headers"]["x-tag"] == ["on"]
        assert "x-secret" not in doc["headers"]
        assert doc["headers"]["x-forwarded-for"] == ["127.0.0.1"]
        assert response.headers.getRawHeaders(b"x-order") == [b"slow-tag", b"deny"]
        assert response.headers.getRawHeaders(b"x-seen") == [b"200"]
        # only the gateway-wide middleware on the plain route
        response, body = yield get(gw.base + "/plain/y")
        assert json.loads(body)["headers"].get("x-tag") is None
        assert response.headers.getRawHeaders(b"x-order") == [b"deny"]
        # gateway-wide middlewares let an unknown path through to the 404, a wrong
        # method to the 405
        response, _ = yield get(gw.base + "/nowhere")
        assert response.code == 404
        response, _ = yield get(gw.base + "/h", method="POST")
        assert response.code == 405
        # a failing middleware is a 500, logged, nothing proxied
        before = [served(s) for s in servers]
        response, body = yield get(gw.base + "/lb/x", headers={b"x-break": [b"1"]})
        assert response.code == 500
        assert json.loads(body)["error"] == "middleware_error"
        assert [served(s) for s in servers] == before
        # a middleware cannot split the upstream request line
        response, body = yield get(gw.base + "/lb/x", headers={b"x-smuggle": [b"1"]})
        assert response.code == 500
        assert json.loads(body)["error"] == "middleware_error"
        assert [served(s) for s in servers] == before
    finally:
        yield gw.close()
        for s in servers:
            yield s.stop()


# --- middlewares from a real plugin package (a subprocess) ---------------------------------

PLUGIN = '''
"""A third-party middleware plugin module, dropped into bungate/plugins/."""
from twisted.plugin import IPlugin
from zope.interface import implementer, provider

from bungate.interfaces import IMiddleware, IMiddlewareFactory


@implementer(IMiddleware)
@provider(IPlugin, IMiddlewareFactory)
class Gatekeeper:
    name = "test-gatekeeper"

    def process_request(self, request, upstream):
        if request.getHeader(b"x-api-key") != b"let-me-in":
            request.setResponseCode(401)
            request.setHeader(b"content-type", b"application/json")
            request.write(b'{"error": "no key"}')
            request.finish()
            return True
        upstream.headers.removeHeader(b"x-api-key")
        upstream.headers.setRawHeaders(b"x-caller", [b"alice"])
        return None

    def process_response(self, request, status, headers):
        headers.setRawHeaders(b"x-gatekeeper", [b"passed %d" % status])
'''

SCRIPT = """
import json, sys
from twisted.internet import defer, task
import treq
from bungate.gateway import Gateway
from bungate.testing import UpstreamServer


@defer.inlineCallbacks
def main(reactor):
    ups = [UpstreamServer(reactor, name=f"u{i}").start() for i in range(2)]
    gw = Gateway({
        "server": {"host": "127.0.0.1", "port": 0},
        "cluster": {"enabled": False},
        "logger": {"request_logging": False},
        "routes": [{
            "pattern": "/api/*",
            "middlewares": ["test-gatekeeper"],
            "load_balancer": {"targets": [{"url": u.url} for u in ups]},
        }],
    }, reactor=reactor, manage_logging=False)
    yield gw.listen()
    base = "http://127.0.0.1:%d" % gw.ports[0].getHost().port
    out = {}
    r = yield treq.get(base + "/api/x", persistent=False)
    out["denied"] = [r.code, (yield r.text()), sum(len(u.requests) for u in ups)]
    seen = []
    for _ in range(2):
        r = yield treq.get(base + "/api/x", headers={"x-api-key": "let-me-in"}, persistent=False)
        doc = yield r.json()
        seen.append([r.code, doc["server"], doc["headers"].get("x-caller"),
                     "x-api-key" in doc["headers"],
                     r.headers.getRawHeaders("x-gatekeeper")])
    out["passed"] = seen
    yield gw.close()
    for u in ups:
        yield u.stop()
    print(json.dumps(out))


task.react(main)
"""


def test_third_party_middleware_plugin_answers_and_adds_upstream_header(tmp_path: Path) -> None:
    out = run_with_plugin(tmp_path, "test_gatekeeper", PLUGIN, SCRIPT)
    assert out["denied"] == [401, '{"error": "no key"}', 0]
    assert [p[0] for p in out["passed"]] == [200, 200]
    assert sorted(p[1] for p in out["passed"]) == ["u0", "u1"]  # balanced
    for _, _, caller, key_forwarded, tag in out["passed"]:
        assert caller == ["alice"]
        assert key_forwarded is False
        assert tag == ["passed 200"]


@pytest_twisted.inlineCallbacks
def test_a_client_connection_header_cannot_remove_what_a_middleware_added(
    stub_middlewares: None,
) -> Any:
    servers = [start_upstream("u0")]
    route = lb_route([servers[0].url], pattern="/lb/*", middlewares=["slow-tag"])
    gw = yield start_gateway(gateway_config(route))
    try:
        # The client names X-Tag hop-by-hop: that removes the client's own copy (before the
        # middleware runs), never the one the middleware adds.
        response, body = yield get(
            gw.base + "/lb/x",
            headers={b"connection": [b"x-tag, x-other"], b"x-tag": [b"forged"], b"x-other": [b"1"]},
        )
        doc = json.loads(body)
        assert response.code == 200
        assert doc["headers"]["x-tag"] == ["on"]
        assert "x-other" not in doc["headers"]
    finally:
        yield gw.close()
        for s in servers:
            yield s.stop()
