"""The Redis rate-limit backend against a real redis-server, and its fallback policy."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Iterator

import pytest
import pytest_twisted
from twisted.internet import defer, task
from twisted.internet import reactor as _reactor
from twisted.logger import globalLogPublisher

from bungate.core.ratelimit import Decision, Rate
from bungate.http.redis_limiter import (
    GCRA_SCRIPT,
    FallbackPolicy,
    RedisAddress,
    RedisLimiter,
    RedisUnavailable,
    decide_or_fallback,
    parse_redis_url,
)
from bungate.limit_table import LimitTable
from tests.redis_server import REDIS_SERVER, RedisServer, free_port

reactor: Any = _reactor

# Skipped on a machine without it, never in CI (.ci/run installs it and sets CI).
needs_redis = pytest.mark.skipif(
    not os.access(REDIS_SERVER, os.X_OK) and not os.environ.get("CI"),
    reason=f"needs redis-server ({REDIS_SERVER})",
)
COMMAND_TIMEOUT = 0.5
LONG = Rate(50, 3600)  # nothing refills during a test


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.close()


@pytest.fixture
def limiters() -> Iterator[list[RedisLimiter]]:
    """Limiters made by a test (with :func:`limiter`), closed after it."""
    made: list[RedisLimiter] = []
    yield made
    for one in made:
        closed: Any = one.close()
        pytest_twisted.blockon(closed)


def limiter(made: list[RedisLimiter], url: str, **options: Any) -> RedisLimiter:
    options.setdefault("connect_timeout", 1.0)
    options.setdefault("command_timeout", COMMAND_TIMEOUT)
    one = RedisLimiter(url, reactor=reactor, **options)
    made.append(one)
    return one


def sleep(seconds: float) -> defer.Deferred[None]:
    return task.deferLater(reactor, seconds, lambda: None)


@defer.inlineCallbacks
def first_decision(one: RedisLimiter, rate: Rate, timeout: float = 20.0) -> Any:
    """The first decision Redis gives again, trying every 50 ms for at most ``timeout``."""
    deadline = reactor.seconds() + timeout
    while True:
        try:
            decision = yield one.decide("r", b"probe", rate)
            return decision
        except RedisUnavailable:
            if reactor.seconds() > deadline:
                raise
        yield sleep(0.05)


@defer.inlineCallbacks
def failure_of(d: defer.Deferred[Any]) -> Any:
    """The exception ``d`` fails with (and an AssertionError if it succeeds)."""
    try:
        value = yield d
    except Exception as e:
        return e
    raise AssertionError(f"expected a failure, got {value!r}")


# --- URLs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url, expected",
    [
        ("redis://localhost", RedisAddress("localhost")),
        ("redis://10.1.2.3:6380/2", RedisAddress("10.1.2.3", 6380, 2)),
        ("redis://:s%40cret@cache:7000/0", RedisAddress("cache", 7000, 0, None, "s@cret")),
        ("redis://bob:pw@cache/", RedisAddress("cache", 6379, 0, "bob", "pw")),
        ("rediss://cache.example:6390/1", RedisAddress("cache.example", 6390, 1, tls=True)),
        ("REDIS://[::1]:6379", RedisAddress("::1")),
    ],
)
def test_redis_urls_are_read(url: str, expected: RedisAddress) -> None:
    assert parse_redis_url(url) == expected


@pytest.mark.parametrize(
    "url",
    [
        "http://localhost:6379",
        "localhost:6379",
        "redis://",
        "redis://:pw@/0",
        "redis://host:99999",
        "redis://host:port",
        "redis://host/db0",
        "redis://host/0?timeout=1",
        "redis://host/0#x",
    ],
)
def test_bad_redis_urls_are_refused(url: str) -> None:
    with pytest.raises(ValueError):
        parse_redis_url(url)


def test_the_password_is_not_shown() -> None:
    assert "s3cret" not in repr(parse_redis_url("redis://:s3cret@host"))


# --- against a real server ----------------------------------------------------------------


@needs_redis
@pytest_twisted.inlineCallbacks
def test_two_gateways_sharing_one_redis_let_exactly_the_limit_through(
    redis: RedisServer, limiters: list[RedisLimiter]
) -> Any:
    # Exactness, not timeouts, is tested here: 200 scripts in flight on a loaded CI box
    # may take longer than the suite's short timeout, and a timed-out one falls back.
    machines = [limiter(limiters, redis.url, command_timeout=5.0) for _ in range(2)]
    # 200 requests of one client, in flight at once, spread over the two machines
    results = yield defer.gatherResults(
        [machines[n % 2].decide("api", b"203.0.113.7", LONG) for n in range(200)]
    )
    allowed = [d for d in results if d.allowed]
    assert len(allowed) == 50
    assert sorted(d.remaining for d in allowed) == list(range(50))
    assert all(d.remaining == 0 and d.retry_after > 70 for d in results if not d.allowed)
    assert {d.limit for d in results} == {50}
    # one key in Redis, with the expiry of its bucket, the client key hashed
    [key] = redis.command("KEYS", "bungate:rl:*")
    assert key == machines[0].redis_key("api", b"203.0.113.7").encode()
    assert b"203.0.113.7" not in key
    assert 3_599_000 < redis.command("PTTL", key) <= 3_600_000
    assert int(redis.command("GET", key)) > 1_600_000_000 * 10**6  # microseconds


@needs_redis
@pytest_twisted.inlineCallbacks
def test_redis_decides_gcra_on_its_own_clock(
    redis: RedisServer, limiters: list[RedisLimiter]
) -> Any:
    one = limiter(limiters, redis.url)
    rate = Rate(10, 60)
    remaining = []
    for _ in range(10):
        decision = yield one.decide("r", b"k", rate)
        assert decision.allowed
        remaining.append(decision.remaining)
    assert remaining == list(range(9, -1, -1))
    refused = yield one.decide("r", b"k", rate)
    assert not refused.allowed
    assert 5.5 < refused.retry_after <= 6.0 and 59.5 < refused.reset <= 60.0
    cost = yield one.decide("r", b"other", rate, cost=4)
    assert cost.remaining == 6
    with pytest.raises(ValueError):
        one.decide("r", b"k", rate, cost=11)


@needs_redis
@pytest_twisted.inlineCallbacks
def test_an_idle_key_vanishes_from_redis_once_its_bucket_is_full(
    redis: RedisServer, limiters: list[RedisLimiter]
) -> Any:
    one = limiter(limiters, redis.url)
    rate = Rate(2, 0.2)
    for _ in range(3):
        yield one.decide("r", b"k", rate)
    key = one.redis_key("r", b"k")
    assert 0 < redis.command("PTTL", key) <= 200
    deadline = reactor.seconds() + 5
    while redis.command("EXISTS", key):
        assert reactor.seconds() < deadline, "the key never expired"
        yield sleep(0.02)
    fresh = yield one.decide("r", b"k", rate)
    assert fresh.allowed and fresh.remaining == 1


@needs_redis
@pytest_twisted.inlineCallbacks
def test_a_flushed_script_cache_is_survived_with_eval_and_a_reload(
    redis: RedisServer, limiters: list[RedisLimiter]
) -> Any:
    one = limiter(limiters, redis.url)
    first = yield one.decide("r", b"k", LONG)
    assert first.remaining == 49 and one.script_reloads == 0
    assert redis.command("SCRIPT", "FLUSH") == "OK"
    second = yield one.decide("r", b"k", LONG)
    assert second.allowed and second.remaining == 48
    assert one.script_reloads == 1
    sha = hashlib.sha1(GCRA_SCRIPT.encode()).hexdigest()
    assert redis.command("SCRIPT", "EXISTS", sha) == [1]
    third = yield one.decide("r", b"k", LONG)  # by EVALSHA again
    assert third.remaining == 47 and one.script_reloads == 1


@needs_redis
@pytest_twisted.inlineCallbacks
def test_killing_redis_fails_decisions_in_time_and_restarting_it_recovers(
    redis: RedisServer, limiters: list[RedisLimiter]
) -> Any:
    one = limiter(limiters, redis.url)
    clock = task.Clock()
    fallback = FallbackPolicy("allow", clock=clock, rate=Rate(3, 60))
    try:
        for _ in range(5):
            decision = yield decide_or_fallback(one, fallback, "api", b"c", LONG)
            assert decision.allowed
        assert fallback.failures == 0

        redis.kill()
        started = reactor.seconds()
        error = yield failure_of(one.decide("api", b"c", LONG))
        assert isinstance(error, RedisUnavailable)
        assert reactor.seconds() - started <= COMMAND_TIMEOUT + 1.0  # the reactor may be late
        # while it is down, decisions fail at once, and the fallback decides
        started = reactor.seconds()
        local = yield defer.gatherResults(
            [decide_or_fallback(one, fallback, "api", b"c", LONG) for _ in range(10)]
        )
        assert reactor.seconds() - started < COMMAND_TIMEOUT
        assert sum(d.allowed for d in local) == 3  # the local limit
        assert fallback.failures == 10
        assert one.failures >= 11

        # a new redis-server on the same port: empty, no script loaded
        redis.start()
        decision = yield first_decision(one, LONG)
        assert decision.allowed and decision.remaining == 49  # (the crash lost the data)
        assert one.script_reloads >= 1
        decision = yield decide_or_fallback(one, fallback, "api", b"c", LONG)
        assert decision.allowed and decision.remaining == 49
        assert fallback.failures == 10  # Redis decides again
    finally:
        fallback.close()


@needs_redis
@pytest_twisted.inlineCallbacks
def test_a_redis_slower_than_the_timeout_is_unavailable_until_it_answers_again(
    redis: RedisServer, limiters: list[RedisLimiter]
) -> Any:
    one = limiter(limiters, redis.url)
    yield one.decide("r", b"k", LONG)
    redis.pause()
    try:
        started = reactor.seconds()
        errors = yield defer.gatherResults(
            [failure_of(one.decide("r", b"k", LONG)) for _ in range(5)]
        )
        elapsed = reactor.seconds() - started
        assert all(isinstance(e, RedisUnavailable) for e in errors)
        assert "no answer from Redis in 0.5s" in str(errors[0])
        assert COMMAND_TIMEOUT - 0.05 <= elapsed <= COMMAND_TIMEOUT + 1.0  # the reactor may be late
    finally:
        redis.resume()
    decision = yield first_decision(one, LONG)
    assert decision.allowed
    # the five that timed out had been sent: the resumed server may still apply them, and
    # they then count against the client (never for it)
    after = yield one.decide("r", b"k", LONG)
    assert 50 - 2 - 5 <= after.remaining <= 50 - 2


@needs_redis
@pytest_twisted.inlineCallbacks
def test_redis_that_is_not_there_at_all_fails_within_the_timeout(
    limiters: list[RedisLimiter],
) -> Any:
    server = RedisServer()
    server.port = free_port()  # nothing listens there yet
    try:
        one = limiter(limiters, server.url)
        started = reactor.seconds()
        error = yield failure_of(one.decide("r", b"k", LONG))
        assert isinstance(error, RedisUnavailable)
        assert reactor.seconds() - started <= COMMAND_TIMEOUT + 1.0  # the reactor may be late
        # and it comes up later: no new limiter needed
        server.start()
        decision = yield first_decision(one, LONG)
        assert decision.allowed
    finally:
        server.close()


@needs_redis
@pytest_twisted.inlineCallbacks
def test_a_password_and_a_database_from_the_url(limiters: list[RedisLimiter]) -> Any:
    server = RedisServer(password="s3cr@t").start()
    try:
        url = f"redis://:s3cr%40t@127.0.0.1:{server.port}/3"
        one = limiter(limiters, url)
        decision = yield one.decide("r", b"k", LONG)
        assert decision.allowed
        key = one.redis_key("r", b"k")
        assert server.command("EXISTS", key, db=3) == 1
        assert server.command("EXISTS", key) == 0
        # the password argument wins over the URL's
        wrong = limiter(limiters, url, password="wrong")
        error = yield failure_of(wrong.decide("r", b"k", LONG))
        assert isinstance(error, RedisUnavailable)
    finally:
        server.close()


@needs_redis
@pytest_twisted.inlineCallbacks
def test_rediss_speaks_tls_and_checks_the_certificate(
    tmp_path: Path, limiters: list[RedisLimiter]
) -> Any:
    trustme = pytest.importorskip("trustme")
    from twisted.internet.ssl import Certificate, optionsForClientTLS

    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    cert_file, key_file, ca_file = (str(tmp_path / n) for n in ("cert.pem", "key.pem", "ca.pem"))
    cert.cert_chain_pems[0].write_to_path(cert_file)
    cert.private_key_pem.write_to_path(key_file)
    ca.cert_pem.write_to_path(ca_file)
    server = RedisServer(tls=(cert_file, key_file, ca_file)).start()
    try:
        trusted = optionsForClientTLS(
            "localhost", trustRoot=Certificate.loadPEM(ca.cert_pem.bytes())
        )
        one = limiter(limiters, server.url, tls_options=trusted)
        decision = yield one.decide("r", b"k", LONG)
        assert decision.allowed and decision.remaining == 49
        # without the private CA the certificate is refused: no decision
        untrusted = limiter(limiters, server.url)
        error = yield failure_of(untrusted.decide("r", b"k", LONG))
        assert isinstance(error, RedisUnavailable)
    finally:
        server.close()


# --- the fallback policy ------------------------------------------------------------------


@pytest.fixture
def warnings() -> Iterator[list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "bungate.ratelimit":
            events.append(event)

    observer: Any = observe

    globalLogPublisher.addObserver(observer)
    yield events
    globalLogPublisher.removeObserver(observer)


def test_fallback_deny_refuses_and_logs_once_per_interval(warnings: list[dict[str, Any]]) -> None:
    clock = task.Clock()
    policy = FallbackPolicy("deny", clock=clock, log_interval=60)
    rate = Rate(10, 60)
    down = RedisUnavailable("ConnectionError: Not connected")
    decisions: list[Decision] = []
    for _ in range(100):
        decisions.append(policy.decide("r", b"k", rate, down))
        clock.advance(1.0)
    assert not any(d.allowed for d in decisions)
    assert decisions[0].retry_after == 6.0 and decisions[0].limit == 10
    assert policy.failures == 100
    counts = [e["count"] for e in warnings]
    assert counts == [1, 60]  # at t=0, and at t=60 for the 60 since then
    assert "Not connected" in warnings[0]["error"]
    policy.succeeded()
    assert "decides again" in warnings[-1]["log_format"] and warnings[-1]["count"] == 100
    policy.decide("r", b"k", rate, down)  # a new outage is reported at once
    assert len(warnings) == 4


def test_fallback_allow_applies_the_local_limit(warnings: list[dict[str, Any]]) -> None:
    clock = task.Clock()
    clock.advance(1_700_000_000)
    table, backing = LimitTable.create(slots=64, stripes=1)
    try:
        down = RedisUnavailable("no answer")
        own_rate = FallbackPolicy("allow", clock=clock, table=table)
        rate = Rate(3, 60)
        assert [own_rate.decide("r", b"k", rate, down).allowed for _ in range(5)] == [
            True,
            True,
            True,
            False,
            False,
        ]
        fixed = FallbackPolicy("allow", clock=clock, table=table, rate=Rate(1, 60))
        assert [fixed.decide("r", b"other", rate, down).allowed for _ in range(3)] == [
            True,
            False,
            False,
        ]
        clock.advance(60)
        assert fixed.decide("r", b"other", rate, down).allowed
        assert fixed.failures == 4 and own_rate.failures == 5
    finally:
        table.close()
        backing.close()
    with pytest.raises(ValueError):
        FallbackPolicy("maybe", clock=clock)


@pytest_twisted.inlineCallbacks
def test_a_closed_limiter_fails_at_once() -> Any:
    one = RedisLimiter(
        "redis://127.0.0.1:9", connect_timeout=0.1, command_timeout=0.1, reactor=reactor
    )
    yield one.close()
    failures: list[Any] = []
    one.decide("r", b"k", LONG).addErrback(failures.append)
    assert failures and failures[0].check(RedisUnavailable)
