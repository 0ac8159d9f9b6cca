"""
The rate_limit policy of a route: keys, decisions on both backends, the answer's headers.

The local backend runs against a real LimitTable with a fake clock; the Redis backend
against a real redis-server (tests/redis_server.py), killed and restarted to exercise
``on_backend_error``.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator, Optional

import pytest
import pytest_twisted
from twisted.internet import defer, task
from twisted.internet import reactor as _reactor
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.web.http_headers import Headers

from bungate.config import ConfigError, GatewayConfig, parse_config
from bungate.config.policy import RateLimitConfig
from bungate.core.ratelimit import Decision, Rate
from bungate.http.policy.ratelimit import (
    ANONYMOUS,
    RateLimits,
    RouteLimit,
    check_rate_limits,
    limited_routes,
    redis_password,
    retry_after,
    whole_seconds,
)
from bungate.limit_table import LimitTable
from tests.redis_server import REDIS_SERVER, RedisServer

reactor: Any = _reactor
NOW = 1_700_000_000.0
HERE = "tests.http.policy.test_ratelimit"

needs_redis = pytest.mark.skipif(
    not os.access(REDIS_SERVER, os.X_OK) and not os.environ.get("CI"),
    reason=f"needs redis-server ({REDIS_SERVER})",
)


# --- helpers ------------------------------------------------------------------------------


def gateway(limit: Any = None, *, routes: Optional[list[Any]] = None, **top: Any) -> GatewayConfig:
    """A config of one route (``/api/*``) with ``limit`` as its own rate_limit."""
    if routes is None:
        route: dict[str, Any] = {"pattern": "/api/*", "target": "http://127.0.0.1:9"}
        if limit is not None:
            route["rate_limit"] = limit
        routes = [route]
    return parse_config({"routes": routes, **top}, source="gw.yaml")


class FakeRequest:
    """What the key functions read of a request."""

    def __init__(self, address: Any = None, headers: Optional[dict[bytes, list[bytes]]] = None):
        self.address = address
        self.requestHeaders = Headers(headers or {})

    def getClientAddress(self) -> Any:
        return self.address


def client(host: str = "203.0.113.7") -> FakeRequest:
    return FakeRequest(IPv4Address("TCP", host, 50000))


def jwt_caller(**claims: Any) -> Any:
    return SimpleNamespace(kind="jwt", subject=claims.get("sub"), claims=claims)


def api_key_caller(name: str) -> Any:
    return SimpleNamespace(kind="api_key", subject=name, claims=None)


@pytest.fixture
def clock() -> task.Clock:
    clock = task.Clock()
    clock.advance(NOW)
    return clock


@pytest.fixture
def shared() -> Iterator[LimitTable]:
    table, backing = LimitTable.create(slots=1024, stripes=4)
    yield table
    table.close()
    backing.close()


@pytest.fixture
def made() -> Iterator[list[RateLimits]]:
    """RateLimits made by a test, closed after it."""
    limits: list[RateLimits] = []
    yield limits
    for one in limits:
        closed: Any = one.close()
        pytest_twisted.blockon(closed)


def route_limit(
    made: list[RateLimits],
    limit: dict[str, Any],
    table: Optional[LimitTable],
    clock: Any = None,
    name: str = "0:/api/*",
    **top: Any,
) -> RouteLimit:
    config = gateway(limit, **top)
    limits = RateLimits(config, reactor, table, clock=clock)
    made.append(limits)
    [(_, _, effective)] = limited_routes(config)
    return limits.for_route(name, effective)


def now(limit: RouteLimit, key: bytes) -> Decision:
    """A local decision (made at once, not a Deferred)."""
    decision = limit.decide(key)
    assert isinstance(decision, Decision)
    return decision


def later(limit: RouteLimit, key: bytes) -> defer.Deferred[Decision]:
    """A Redis decision (a Deferred)."""
    decision = limit.decide(key)
    assert isinstance(decision, defer.Deferred)
    return decision


# user key functions, imported by their module:callable names
def tenant_key(request: Any, identity: Any) -> Any:
    tenant = request.requestHeaders.getRawHeaders(b"x-tenant")
    if tenant and tenant[0] == b"internal":
        return None  # not limited
    if tenant and tenant[0] == b"boom":
        raise RuntimeError("the key function failed")
    if tenant and tenant[0] == b"number":
        return 42  # not a key
    return tenant[0].decode() if tenant else "nobody"


NOT_CALLABLE = "a string"


# --- the headers and the refusal ----------------------------------------------------------


@pytest.mark.parametrize(
    "seconds, whole",
    [(0.0, 0), (0.000001, 1), (5.2, 6), (6.0, 6), (5.999999, 6), (6.000000000001, 6), (-1, 0)],
)
def test_whole_seconds_round_up_at_the_microsecond(seconds: float, whole: int) -> None:
    assert whole_seconds(seconds) == whole


def test_allowed_answers_carry_the_ratelimit_headers(
    made: list[RateLimits], shared: LimitTable, clock: task.Clock
) -> None:
    limit = route_limit(made, {"max": 10, "window": 60}, shared, clock)
    first = limit.decide(b"k")
    assert isinstance(first, Decision) and first.allowed
    assert limit.headers(first) == [
        (b"ratelimit-limit", b"10"),
        (b"ratelimit-remaining", b"9"),
        (b"ratelimit-reset", b"6"),  # one emission interval used: full again in 6 s
    ]
    clock.advance(1.5)
    second = limit.decide(b"k")
    assert isinstance(second, Decision)
    # 1.5 s refilled: 10.5 s to full, rounded up
    assert dict(limit.headers(second))[b"ratelimit-reset"] == b"11"


def test_a_refusal_is_a_429_with_retry_after_and_a_json_body(
    made: list[RateLimits], shared: LimitTable, clock: task.Clock
) -> None:
    limit = route_limit(made, {"max": 2, "window": 10, "headers": False}, shared, clock)
    allowed = [now(limit, b"k") for _ in range(2)]
    assert all(d.allowed for d in allowed)
    assert limit.headers(allowed[0]) == []  # headers: false, on allowed answers
    clock.advance(0.25)
    refused = limit.decide(b"k")
    assert isinstance(refused, Decision) and not refused.allowed
    assert refused.retry_after == pytest.approx(4.75)
    status, headers, body = limit.refusal(refused, b"req-1")
    assert status == 429
    assert headers == [
        (b"ratelimit-limit", b"2"),
        (b"ratelimit-remaining", b"0"),
        (b"ratelimit-reset", b"10"),  # 9.75 s, rounded up
        (b"retry-after", b"5"),  # 4.75 s, rounded up: a client waiting that long passes
    ]
    assert body == {"error": "rate_limited", "retry_after": 5, "request_id": "req-1"}
    assert limit.refusal(refused, "req-2")[2]["request_id"] == "req-2"
    assert "request_id" not in limit.refusal(refused, None)[2]
    assert "request_id" not in limit.refusal(refused, b"")[2]
    clock.advance(4.75)
    assert now(limit, b"k").allowed
    assert (limit.allowed, limit.refused) == (3, 1)


def test_retry_after_is_at_least_one_second(made: list[RateLimits]) -> None:
    limit = route_limit(made, {"max": 5}, None)
    nearly = Decision(allowed=False, limit=5, remaining=0, reset=0.2, retry_after=0.000001)
    assert retry_after(nearly) == 1
    assert dict(limit.headers(nearly))[b"retry-after"] == b"1"
    assert limit.refusal(nearly)[2]["retry_after"] == 1


# --- keys ---------------------------------------------------------------------------------


def key_of(made: list[RateLimits], key: str, request: Any, identity: Any = None) -> Any:
    limit = route_limit(made, {"max": 5, "key": key}, None)
    return limit.key_of(request, identity)


def test_ip_keys_are_the_client_address(made: list[RateLimits]) -> None:
    assert key_of(made, "ip", client("203.0.113.7")) == b"203.0.113.7"
    v6 = FakeRequest(IPv6Address("TCP", "2001:db8::1", 443))
    assert key_of(made, "ip", v6) == b"2001:db8::1"
    # no address (a UNIX socket, a test transport): the anonymous bucket
    assert key_of(made, "ip", FakeRequest(UNIXAddress(b"/run/gw.sock"))) == ANONYMOUS
    assert key_of(made, "ip", FakeRequest(None)) == ANONYMOUS


def test_header_keys_and_the_anonymous_bucket_of_requests_without_it(
    made: list[RateLimits],
) -> None:
    limit = route_limit(made, {"max": 5, "key": "header:X-Tenant"}, None)
    assert limit.key_of(FakeRequest(headers={b"X-Tenant": [b"acme"]})) == b"acme"
    assert limit.key_of(FakeRequest(headers={b"x-tenant": [b"a", b"b"]})) == b"a,b"
    assert limit.key_of(FakeRequest(headers={b"x-other": [b"acme"]})) == ANONYMOUS
    assert limit.key_of(FakeRequest()) == ANONYMOUS


def test_claim_keys_read_the_verified_token(made: list[RateLimits]) -> None:
    limit = route_limit(made, {"max": 5, "key": "claim:tenant"}, None)
    assert limit.key_of(client(), jwt_caller(tenant="acme")) == b"acme"
    assert limit.key_of(client(), jwt_caller(tenant="é")) == "é".encode()
    assert limit.key_of(client(), jwt_caller(tenant=42)) == b"42"
    assert limit.key_of(client(), jwt_caller(tenant=True)) == b"true"
    assert limit.key_of(client(), jwt_caller(tenant={"b": 1, "a": [2]})) == b'{"a":[2],"b":1}'
    # no such claim, no claims (an API key), no caller: the anonymous bucket
    assert limit.key_of(client(), jwt_caller(sub="bob")) == ANONYMOUS
    assert limit.key_of(client(), jwt_caller(tenant=None)) == ANONYMOUS
    assert limit.key_of(client(), api_key_caller("ci")) == ANONYMOUS
    assert limit.key_of(client(), None) == ANONYMOUS


def test_api_key_keys_are_the_name_of_the_callers_key(made: list[RateLimits]) -> None:
    limit = route_limit(made, {"max": 5, "key": "api_key"}, None)
    assert limit.key_of(client(), api_key_caller("billing")) == b"billing"
    assert limit.key_of(client(), jwt_caller(sub="billing")) == ANONYMOUS  # not an API key
    assert limit.key_of(client(), None) == ANONYMOUS


def test_a_module_callable_key_may_exempt_a_request(made: list[RateLimits]) -> None:
    limit = route_limit(made, {"max": 5, "key": f"{HERE}:tenant_key"}, None)
    assert limit.key_of(FakeRequest(headers={b"x-tenant": [b"acme"]})) == b"acme"
    assert limit.key_of(FakeRequest()) == b"nobody"
    assert limit.key_of(FakeRequest(headers={b"x-tenant": [b"internal"]})) is None
    assert limit.key_errors == 0


def test_a_failing_key_function_counts_for_the_anonymous_bucket(made: list[RateLimits]) -> None:
    limit = route_limit(made, {"max": 5, "key": f"{HERE}:tenant_key"}, None)
    assert limit.key_of(FakeRequest(headers={b"x-tenant": [b"boom"]})) == ANONYMOUS
    assert limit.key_of(FakeRequest(headers={b"x-tenant": [b"number"]})) == ANONYMOUS
    assert limit.key_errors == 2


@pytest.mark.parametrize(
    "key, problem",
    [
        ("no_such_module_here:key", "cannot import module 'no_such_module_here'"),
        (f"{HERE}:missing", "has no attribute 'missing'"),
        (f"{HERE}:NOT_CALLABLE", "is not callable"),
    ],
)
def test_a_key_that_cannot_be_resolved_is_a_config_error_naming_it(
    key: str, problem: str, made: list[RateLimits]
) -> None:
    config = gateway({"max": 5, "key": key})
    with pytest.raises(ConfigError) as caught:
        RateLimits(config, reactor, None)
    assert caught.value.key == "routes[0].rate_limit.key" and problem in caught.value.problem
    with pytest.raises(ConfigError):
        check_rate_limits(config)
    # inherited from the top level: named there
    top = gateway(rate_limit={"max": 5, "key": key})
    with pytest.raises(ConfigError) as caught:
        check_rate_limits(top)
    assert caught.value.key == "rate_limit.key"


# --- which routes are limited -------------------------------------------------------------


def test_routes_inherit_the_top_level_limit_unless_they_turn_it_off() -> None:
    config = gateway(
        routes=[
            {"pattern": "/a", "target": "http://127.0.0.1:9"},
            {"pattern": "/b", "target": "http://127.0.0.1:9", "rate_limit": False},
            {"pattern": "/c", "target": "http://127.0.0.1:9", "rate_limit": {"max": 1}},
        ],
        rate_limit={"max": 100},
    )
    found = [(i, where, limit.max) for i, where, limit in limited_routes(config)]
    assert found == [(0, "rate_limit", 100), (2, "routes[2].rate_limit", 1)]


# --- the local backend --------------------------------------------------------------------


def test_local_limits_of_two_workers_on_one_table_hold_together(
    made: list[RateLimits], shared: LimitTable, clock: task.Clock
) -> None:
    # the second worker maps its own descriptor of the master's file, as a worker does
    peer_fd = os.dup(shared._fd)
    peer = LimitTable.inherited(peer_fd)
    try:
        one = route_limit(made, {"max": 10, "window": 60}, shared, clock)
        two = route_limit(made, {"max": 10, "window": 60}, peer, clock)
        decisions = [now(one if n % 2 else two, b"203.0.113.7") for n in range(30)]
        assert sum(d.allowed for d in decisions) == 10
        assert one.refused + two.refused == 20
        clock.advance(6)  # one emission interval: one more request
        assert [now(two, b"203.0.113.7").allowed for _ in range(2)] == [True, False]
    finally:
        peer.close()


def test_routes_and_keys_have_budgets_of_their_own(
    made: list[RateLimits], shared: LimitTable, clock: task.Clock
) -> None:
    config = gateway(
        routes=[
            {"pattern": "/a", "target": "http://127.0.0.1:9", "rate_limit": {"max": 1}},
            {"pattern": "/b", "target": "http://127.0.0.1:9", "rate_limit": {"max": 1}},
        ]
    )
    limits = RateLimits(config, reactor, shared, clock=clock)
    made.append(limits)
    a, b = (
        limits.for_route(f"{i}:{config.routes[i].pattern}", limit)
        for i, _, limit in limited_routes(config)
    )
    assert now(a, b"k").allowed and now(b, b"k").allowed
    assert now(a, b"other").allowed
    assert not now(a, b"k").allowed and not now(b, b"k").allowed
    assert limits.refused == 2 and set(limits.routes) == {"0:/a", "1:/b"}


def test_without_a_shared_table_a_private_one_is_made_and_closed(
    made: list[RateLimits], clock: task.Clock
) -> None:
    limits = RateLimits(gateway({"max": 1}), reactor, None, clock=clock)
    table = limits.table
    assert table is not None and table.slots > 0
    limit = limits.for_route("0:/api/*", RateLimitConfig(max=1))
    assert now(limit, b"k").allowed and not now(limit, b"k").allowed
    closed: list[Any] = []
    limits.close().addBoth(closed.append)
    assert closed == [None] and limits.table is None
    assert limits.close().called  # twice is harmless
    with pytest.raises(RuntimeError):
        limits.for_route("x", RateLimitConfig(max=1))


def test_a_shared_table_is_left_open_and_no_table_is_made_without_a_local_limit(
    shared: LimitTable, clock: task.Clock
) -> None:
    limits = RateLimits(gateway({"max": 1}), reactor, shared, clock=clock)
    limits.close()
    assert shared.decide("r", b"k", Rate(1, 1), NOW).allowed  # still mapped
    unlimited = RateLimits(gateway(None), reactor, None, clock=clock)
    assert unlimited.table is None and unlimited.redis is None
    unlimited.close()


# --- the Redis password, and what the Redis backend needs ---------------------------------


def redis_config(**redis: Any) -> GatewayConfig:
    return gateway({"max": 5, "backend": "redis"}, redis={"url": "redis://127.0.0.1:9", **redis})


def test_the_redis_password_is_read_from_its_file_or_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = tmp_path / "redis.pw"
    secret.write_text("s3cr@t\n")
    assert redis_password(redis_config(password_file=str(secret)).redis, "gw.yaml") == "s3cr@t"
    secret.write_text("windows\r\n")
    assert redis_password(redis_config(password_file=str(secret)).redis, "gw.yaml") == "windows"
    monkeypatch.setenv("BUNGATE_TEST_REDIS_PW", "from-env")
    assert (
        redis_password(redis_config(password_env="BUNGATE_TEST_REDIS_PW").redis, "gw.yaml")
        == "from-env"
    )
    assert redis_password(redis_config().redis, "gw.yaml") is None


@pytest.mark.parametrize(
    "settings, key, problem",
    [
        ({"password_file": "/nonexistent/redis.pw"}, "redis.password_file", "cannot read"),
        ({"password_file": "EMPTY"}, "redis.password_file", "is empty"),
        ({"password_env": "BUNGATE_TEST_UNSET_PW"}, "redis.password_env", "is not set"),
        (
            {"password_file": "EMPTY", "password_env": "BUNGATE_TEST_UNSET_PW"},
            "redis.password_env",
            "not both",
        ),
    ],
)
def test_a_redis_password_that_cannot_be_read_is_a_config_error_naming_the_key(
    settings: dict[str, str], key: str, problem: str, tmp_path: Path, made: list[RateLimits]
) -> None:
    empty = tmp_path / "empty.pw"
    empty.write_text("")
    settings = {k: str(empty) if v == "EMPTY" else v for k, v in settings.items()}
    config = redis_config(**settings)
    for attempt in (lambda: RateLimits(config, reactor, None), lambda: check_rate_limits(config)):
        with pytest.raises(ConfigError) as caught:
            attempt()
        assert caught.value.key == key and problem in caught.value.problem
        assert caught.value.source == "gw.yaml"


def test_a_redis_backend_needs_redis_url(made: list[RateLimits]) -> None:
    config = gateway({"max": 5, "backend": "redis"})
    with pytest.raises(ConfigError) as caught:
        RateLimits(config, reactor, None)
    assert caught.value.key == "redis.url" and "rate_limit.backend: redis" in caught.value.problem
    # no route uses it: nothing needed, nothing connected
    assert RateLimits(gateway({"max": 5}), reactor, None).redis is None


# --- the Redis backend, against a real server ---------------------------------------------


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.close()


def redis_limit(
    made: list[RateLimits],
    server: RedisServer,
    limit: dict[str, Any],
    table: Optional[LimitTable] = None,
    **redis: Any,
) -> RouteLimit:
    settings = {"url": server.url, "command_timeout": 0.5, "connect_timeout": 1, **redis}
    return route_limit(made, {"backend": "redis", **limit}, table, redis=settings)


@defer.inlineCallbacks
def redis_decides_again(limit: RouteLimit, limits: RateLimits, timeout: float = 20.0) -> Any:
    """Decide on a probe key every 50 ms until Redis (not the fallback) decides."""
    deadline = reactor.seconds() + timeout
    while True:
        before = limits.backend_failures
        decision = yield limit.decide(b"probe")
        if limits.backend_failures == before:
            return decision
        assert reactor.seconds() < deadline, "Redis never came back"
        yield task.deferLater(reactor, 0.05, lambda: None)


@needs_redis
@pytest_twisted.inlineCallbacks
def test_two_gateways_sharing_one_redis_enforce_one_limit(
    redis: RedisServer, made: list[RateLimits]
) -> Any:
    # exactness, not timeouts: 200 scripts in flight may be slow on a loaded CI box
    machines = [
        redis_limit(made, redis, {"max": 50, "window": 3600}, command_timeout=5.0)
        for _ in range(2)
    ]
    decisions = yield defer.gatherResults(
        [later(machines[n % 2], b"203.0.113.7") for n in range(200)]
    )
    assert sum(d.allowed for d in decisions) == 50
    assert machines[0].refused + machines[1].refused == 150
    refused = next(d for d in decisions if not d.allowed)
    assert dict(machines[0].headers(refused))[b"retry-after"] == b"72"  # 3600 / 50
    [key] = redis.command("KEYS", "bungate:rl:*")
    assert key.startswith(b"bungate:rl:0:/api/*:")
    assert made[0].backend_failures == 0


@needs_redis
@pytest_twisted.inlineCallbacks
def test_the_password_file_logs_in_to_redis(tmp_path: Path, made: list[RateLimits]) -> Any:
    server = RedisServer(password="s3cr@t").start()
    try:
        secret = tmp_path / "redis.pw"
        secret.write_text("s3cr@t\n")
        limit = redis_limit(made, server, {"max": 5}, password_file=str(secret))
        decision = yield limit.decide(b"k")
        assert decision.allowed and decision.remaining == 4
        assert made[-1].backend_failures == 0
        secret.write_text("wrong\n")
        wrong = redis_limit(made, server, {"max": 5}, password_file=str(secret))
        yield wrong.decide(b"k")
        assert made[-1].backend_failures == 1  # refused by Redis: the fallback decided
    finally:
        server.close()


@needs_redis
@pytest_twisted.inlineCallbacks
def test_with_redis_down_allow_decides_locally_and_redis_decides_again_once_back(
    redis: RedisServer, made: list[RateLimits], shared: LimitTable
) -> Any:
    limit = redis_limit(made, redis, {"max": 5, "window": 3600}, shared)
    limits = made[-1]
    up = yield defer.gatherResults([later(limit, b"c") for _ in range(6)])
    assert [d.allowed for d in up] == [True] * 5 + [False]

    redis.kill()
    down = []
    for _ in range(10):
        down.append((yield limit.decide(b"c")))
    # the route's own limit, decided on this machine's table while Redis is gone
    assert sum(d.allowed for d in down) == 5
    assert limits.backend_failures == 10
    assert shared.used_slots() >= 1

    redis.start()  # empty, as after a crash: no script loaded, no budget kept
    yield redis_decides_again(limit, limits)
    failures = limits.backend_failures
    back = yield limit.decide(b"c")
    assert back.allowed and back.remaining == 4  # Redis's count, not the fallback's
    assert limits.backend_failures == failures


@needs_redis
@pytest_twisted.inlineCallbacks
def test_with_redis_down_deny_refuses_with_retry_after(
    redis: RedisServer, made: list[RateLimits]
) -> Any:
    limit = redis_limit(made, redis, {"max": 10, "window": 60, "on_backend_error": "deny"})
    limits = made[-1]
    first = yield limit.decide(b"c")
    assert first.allowed
    redis.kill()
    down = yield defer.gatherResults([later(limit, b"c") for _ in range(3)])
    assert not any(d.allowed for d in down)
    status, headers, body = limit.refusal(down[0], b"r-1")
    assert status == 429 and body["retry_after"] == 6  # one emission interval
    assert dict(headers)[b"ratelimit-reset"] == b"60"
    assert limits.backend_failures == 3 and limit.refused == 3
    redis.start()
    decision = yield redis_decides_again(limit, limits)
    assert decision.allowed
