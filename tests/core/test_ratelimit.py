"""Tests for GCRA (bungate.core.ratelimit): its guarantees, on a Clock and on plain floats."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from typing import Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from bungate.core.ratelimit import (
    MICROSECONDS,
    Decision,
    Rate,
    decide,
    decide_us,
    key_hash,
    seconds_to_us,
)


class Bucket:
    """One key limited by GCRA, its TAT kept the way a store keeps it."""

    def __init__(self, rate: Rate, clock: Clock) -> None:
        self.rate = rate
        self.clock = clock
        self.tat: Optional[float] = None

    def hit(self, cost: int = 1) -> Decision:
        decision, self.tat = decide(self.rate, self.tat, self.clock.seconds(), cost)
        return decision


class FixedWindow:
    """The counter GCRA replaces: ``max`` per calendar window, reset at each window edge."""

    def __init__(self, max: int, window: float, clock: Clock) -> None:
        self.max = max
        self.window = window
        self.clock = clock
        self.index = -1
        self.count = 0

    def hit(self) -> bool:
        index = math.floor(self.clock.seconds() / self.window)
        if index != self.index:
            self.index, self.count = index, 0
        if self.count < self.max:
            self.count += 1
            return True
        return False


def at_once(bucket: Bucket, attempts: int) -> int:
    """How many of ``attempts`` requests made in one instant pass."""
    return sum(bucket.hit().allowed for _ in range(attempts))


# --- Rate ---------------------------------------------------------------------------------


def test_a_rate_defaults_its_burst_to_max_and_derives_t_and_tau() -> None:
    rate = Rate(100, 60)
    assert rate.burst == 100
    assert rate.emission_interval == 0.6
    assert rate.interval_us == 600_000
    assert rate.tolerance == pytest.approx(99 * 0.6)
    assert rate.capacity_us == 60 * MICROSECONDS
    assert Rate(100, 60, burst=10).tolerance == pytest.approx(9 * 0.6)
    assert Rate(100, 60) == Rate(100, 60.0, None)


def test_t_is_rounded_up_to_the_microsecond_so_the_rate_is_never_exceeded() -> None:
    assert Rate(7, 60).interval_us == 8_571_429  # 8571428.57...
    assert Rate(3, 1).interval_us == 333_334
    assert Rate(1, 0.3).interval_us == 300_000  # 0.3 s is taken as 300000 us, not 300001
    assert Rate(3, 0.000001).interval_us == 1


@pytest.mark.parametrize(
    "args, error",
    [
        ((0, 60), ValueError),
        ((-1, 60), ValueError),
        ((10, 0), ValueError),
        ((10, -1), ValueError),
        ((10, float("inf")), ValueError),
        ((10, float("nan")), ValueError),
        ((10, 1e-9), ValueError),
        ((10, 60, 0), ValueError),
        ((1, 1e12, 1), ValueError),  # a bucket of 30000 years
        ((10.0, 60), TypeError),
        ((True, 60), TypeError),
        ((10, "60"), TypeError),
        ((10, 60, 2.5), TypeError),
    ],
)
def test_a_rate_out_of_range_is_refused(args: tuple, error: type) -> None:
    with pytest.raises(error):
        Rate(*args)


def test_a_cost_out_of_range_is_refused() -> None:
    rate = Rate(10, 60, burst=5)
    for cost in (0, -1, 6, True):
        with pytest.raises(ValueError):
            decide(rate, None, 0.0, cost)


# --- the guarantees -----------------------------------------------------------------------


@pytest.mark.parametrize("rate", [Rate(100, 60), Rate(7, 60), Rate(3, 1, burst=5), Rate(1, 1)])
def test_never_more_than_burst_at_one_instant(rate: Rate) -> None:
    clock = Clock()
    clock.advance(1000)
    bucket = Bucket(rate, clock)
    assert at_once(bucket, rate.burst * 3) == rate.burst
    clock.advance(0.000001)  # and not one more a microsecond later
    assert at_once(bucket, 10) == 0


def test_a_fixed_window_lets_twice_the_limit_through_at_its_edge_gcra_does_not() -> None:
    clock = Clock()
    clock.advance(59.5)  # half a second before the window edge at t=60
    fixed, gcra = FixedWindow(100, 60, clock), Bucket(Rate(100, 60), clock)
    sent = 100
    fixed_passed = sum(fixed.hit() for _ in range(sent))
    gcra_passed = at_once(gcra, sent)
    clock.advance(1.0)  # t=60.5: a new fixed window
    fixed_passed += sum(fixed.hit() for _ in range(sent))
    gcra_passed += at_once(gcra, sent)
    # one second, 200 sent: the fixed window allowed 2x its limit, GCRA its burst plus
    # what one second earns at 100/min (1.67, so 1)
    assert fixed_passed == 200
    assert gcra_passed == 101
    assert gcra_passed <= 100 + 1.0 * 100 / 60


@settings(max_examples=150, deadline=None)
@given(
    max_=st.integers(1, 20),
    window=st.sampled_from([0.5, 1.0, 7.0, 60.0]),
    extra_burst=st.integers(-19, 10),
    steps=st.lists(
        st.tuples(st.floats(0, 3.0), st.integers(1, 6)),  # (gap in windows, attempts)
        min_size=1,
        max_size=80,
    ),
)
def test_any_interval_of_t_seconds_holds_at_most_burst_plus_t_max_over_window(
    max_: int, window: float, extra_burst: int, steps: list[tuple[float, int]]
) -> None:
    rate = Rate(max_, window, burst=max(1, max_ + extra_burst))
    clock = Clock()
    bucket = Bucket(rate, clock)
    allowed_at: list[int] = []
    for gap, attempts in steps:
        clock.advance(gap * window / max_)
        for _ in range(attempts):
            if bucket.hit().allowed:
                allowed_at.append(seconds_to_us(clock.seconds()))
    window_us = seconds_to_us(window)
    for i in range(len(allowed_at)):
        for j in range(i, len(allowed_at)):
            count = j - i + 1
            t_us = allowed_at[j] - allowed_at[i]
            # count <= burst + t * max / window, in exact integers
            assert (count - rate.burst) * window_us <= t_us * max_


@pytest.mark.parametrize("rate", [Rate(60, 60, burst=1), Rate(50, 1), Rate(7, 60, burst=2)])
def test_a_client_at_exactly_the_rate_is_never_refused(rate: Rate) -> None:
    clock = Clock()
    bucket = Bucket(rate, clock)
    for _ in range(500):
        assert bucket.hit().allowed
        clock.advance(rate.emission_interval)


def test_refused_requests_consume_no_budget() -> None:
    rate = Rate(10, 60)
    clock = Clock()
    bucket = Bucket(rate, clock)
    assert at_once(bucket, 10) == 10
    tat = bucket.tat
    for _ in range(1000):
        clock.advance(0.001)
        decision = bucket.hit()
        assert not decision.allowed
        assert bucket.tat == tat
    # the one request earned every 6 s comes exactly on time, hammering or not
    clock.advance(6.0 - 1.0)
    assert bucket.hit().allowed
    assert not bucket.hit().allowed


@pytest.mark.parametrize(
    "rate, start",
    [
        (Rate(10, 60), 0.0),
        (Rate(7, 60), 12.345),
        (Rate(3, 1, burst=5), 1_700_000_000.123456),  # wall-clock times
        (Rate(100, 3600, burst=3), 2_500_000_000.654321),  # after 2041: float round trip
    ],
)
def test_retry_after_is_exact(rate: Rate, start: float) -> None:
    tat: Optional[float] = None
    now = start
    for _ in range(rate.burst):
        decision, tat = decide(rate, tat, now)
        assert decision.allowed and decision.retry_after == 0.0
    refused, same = decide(rate, tat, now)
    assert not refused.allowed and same == tat
    assert refused.retry_after == pytest.approx(rate.emission_interval)
    for _ in range(3):
        just_before = now + refused.retry_after - 0.000001
        early, _ = decide(rate, tat, just_before)
        assert not early.allowed
        assert early.retry_after == pytest.approx(0.000001, abs=1e-9)
        now += refused.retry_after
        on_time, tat = decide(rate, tat, now)
        assert on_time.allowed
        refused, _ = decide(rate, tat, now)
        assert not refused.allowed


def test_remaining_and_reset_tell_what_the_bucket_holds() -> None:
    rate = Rate(10, 60)
    clock = Clock()
    bucket = Bucket(rate, clock)
    first = bucket.hit()
    assert (first.limit, first.remaining, first.reset) == (10, 9, 6.0)
    for expected in range(8, -1, -1):
        assert bucket.hit().remaining == expected
    full = bucket.hit()
    assert not full.allowed and full.remaining == 0 and full.reset == 60.0
    clock.advance(13.0)  # two requests earned, one second towards the third
    decision = bucket.hit()
    assert decision.allowed and decision.remaining == 1 and decision.reset == pytest.approx(53.0)
    # remaining is what really passes right now
    assert at_once(bucket, 10) == 1


def test_a_key_idle_for_a_window_is_fully_reset() -> None:
    rate = Rate(20, 10)
    clock = Clock()
    clock.advance(5)
    bucket = Bucket(rate, clock)
    assert at_once(bucket, 50) == 20
    clock.advance(10.0)
    assert bucket.tat is not None and bucket.tat <= clock.seconds()
    fresh, _ = decide(rate, None, clock.seconds())
    assert bucket.hit() == fresh
    assert at_once(bucket, 50) == 19


def test_a_key_idle_for_burst_t_is_reset_when_burst_exceeds_max() -> None:
    rate = Rate(10, 10, burst=30)  # refills in 30 s, not 10
    clock = Clock()
    bucket = Bucket(rate, clock)
    assert at_once(bucket, 100) == 30
    clock.advance(10.0)
    assert at_once(bucket, 100) == 10
    clock.advance(30.0)
    assert at_once(bucket, 100) == 30


def test_a_clock_going_backwards_gives_nothing_extra_and_locks_out_for_one_bucket_at_most() -> None:
    rate = Rate(10, 60)
    tat: Optional[float] = None
    now = 10_000.0
    for _ in range(10):
        decision, tat = decide(rate, tat, now)
    # a small step back looks like more requests in the same instant: refused
    decision, tat = decide(rate, tat, now - 1.0)
    assert not decision.allowed
    # a big jump back (an hour) neither frees the budget nor locks the key for an hour
    now = 10_000.0 - 3600
    decision, tat = decide(rate, tat, now)
    assert not decision.allowed
    assert decision.retry_after == 6.0 and decision.reset == 60.0
    assert tat == now + 60.0  # the stored TAT is pulled back to a full bucket from now
    passed = 0
    for _ in range(10):
        now += 6.0
        decision, tat = decide(rate, tat, now)
        passed += decision.allowed
        decision, tat = decide(rate, tat, now)
        passed += decision.allowed
    assert passed == 10  # the sustained rate, no burst came back


def test_a_request_of_cost_n_counts_n() -> None:
    rate = Rate(10, 60)
    clock = Clock()
    bucket = Bucket(rate, clock)
    assert bucket.hit(cost=4).remaining == 6
    assert bucket.hit(cost=6).remaining == 0
    refused = bucket.hit(cost=3)
    assert not refused.allowed and refused.retry_after == 18.0
    clock.advance(18.0)
    assert bucket.hit(cost=3).allowed


def test_decide_us_is_the_same_rule_on_integer_microseconds() -> None:
    rate = Rate(7, 60, burst=3)
    tat_s: Optional[float] = None
    tat_us: Optional[int] = None
    now = 1_700_000_000.0
    for step in range(200):
        now += (step % 5) * 1.7
        by_seconds, tat_s = decide(rate, tat_s, now)
        by_us, tat_us = decide_us(rate, tat_us, seconds_to_us(now))
        assert by_seconds == by_us
        assert seconds_to_us(tat_s) == tat_us


# --- key_hash -----------------------------------------------------------------------------


def test_key_hash_is_stable_63_bit_and_never_zero() -> None:
    # the same in every process and every run: a worker and its peers must agree
    assert key_hash("api", b"10.0.0.1") == 1039796081966307119
    script = "from bungate.core.ratelimit import key_hash; print(key_hash('api', b'10.0.0.1'))"
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.stdout.strip() == "1039796081966307119", out.stderr
    hashes = {key_hash(route, key) for route in ("a", "ab", "") for key in (b"", b"c", b"bc")}
    assert len(hashes) == 9  # ("a", b"bc") and ("ab", b"c") differ
    assert all(0 < h < 2**63 for h in hashes)
