"""Tests for bungate.breaker: the circuit breaker's transitions on a fake clock."""

from __future__ import annotations

from twisted.internet.task import Clock

from bungate.config import CircuitBreakerConfig
from bungate.core.breaker import CircuitBreaker


def breaker(threshold: int = 3, reset: float = 30.0, enabled: bool = True):
    clock = Clock()
    config = CircuitBreakerConfig(enabled=enabled, failure_threshold=threshold, reset_timeout=reset)
    return CircuitBreaker(config, clock, name="http://t"), clock


def test_closed_until_threshold_consecutive_failures() -> None:
    b, _ = breaker(threshold=3)
    b.record_failure()
    b.record_failure()
    assert b.state == "closed" and b.allow()
    b.record_failure()
    assert b.state == "open"
    assert not b.allow()
    assert not b.would_allow()


def test_success_resets_the_count() -> None:
    b, _ = breaker(threshold=3)
    b.record_failure()
    b.record_failure()
    b.record_success()
    b.record_failure()
    b.record_failure()
    assert b.state == "closed"


def test_half_open_after_reset_timeout_allows_exactly_one_trial() -> None:
    b, clock = breaker(threshold=1, reset=30.0)
    b.record_failure()
    clock.advance(29.9)
    assert b.state == "open" and not b.allow()
    clock.advance(0.1)
    assert b.state == "half-open"
    assert b.would_allow()
    assert b.allow()
    assert not b.would_allow()
    assert not b.allow()
    assert b.state == "half-open"


def test_trial_success_closes() -> None:
    b, clock = breaker(threshold=1, reset=10.0)
    b.record_failure()
    clock.advance(10)
    assert b.allow()
    b.record_success()
    assert b.state == "closed"
    assert all(b.allow() for _ in range(5))


def test_trial_failure_reopens_for_another_reset_timeout() -> None:
    b, clock = breaker(threshold=2, reset=10.0)
    b.record_failure()
    b.record_failure()
    clock.advance(10)
    assert b.allow()
    b.record_failure()
    assert b.state == "open"
    clock.advance(9)
    assert not b.allow()
    clock.advance(1)
    assert b.allow()


def test_abandoned_trial_frees_the_slot() -> None:
    b, clock = breaker(threshold=1, reset=10.0)
    b.record_failure()
    clock.advance(10)
    assert b.allow()
    b.record_abandoned()
    assert b.allow()


def test_lost_trial_is_given_up_after_reset_timeout() -> None:
    b, clock = breaker(threshold=1, reset=10.0)
    b.record_failure()
    clock.advance(10)
    assert b.allow()
    clock.advance(9)
    assert not b.allow()
    clock.advance(1)
    assert b.allow()


def test_disabled_always_allows() -> None:
    b, _ = breaker(threshold=1, enabled=False)
    for _ in range(10):
        b.record_failure()
    assert b.state == "closed"
    assert b.allow() and b.would_allow()
