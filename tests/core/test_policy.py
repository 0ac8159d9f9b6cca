"""The restart policy: pure logic, driven by explicit times."""

from __future__ import annotations

import random

from bungate.config import ClusterConfig
from bungate.core.policy import RestartPolicy


def policy(**kw):
    """A policy with the ``cluster`` section's defaults for what ``kw`` leaves out."""
    cluster = ClusterConfig()
    kw.setdefault("rng", random.Random(7))
    kw.setdefault("max_restarts", cluster.max_restarts)
    kw.setdefault("threshold", cluster.respawn_threshold)
    kw.setdefault("window", cluster.respawn_threshold_time)
    kw.setdefault("base_delay", cluster.restart_delay)
    kw.setdefault("max_delay", cluster.max_restart_delay)
    return RestartPolicy(**kw)


def test_first_respawn_is_immediate_then_doubles_with_bounded_jitter():
    p = policy(max_restarts=100, threshold=100, window=1000, base_delay=1.0, jitter=0.25)
    delays = [p.decide(now=float(i)).delay for i in range(6)]
    assert delays[0] == 0.0
    for got, base in zip(delays[1:], [1, 2, 4, 8, 16]):
        assert base <= got <= base * 1.25


def test_delay_is_capped():
    p = policy(max_restarts=100, threshold=100, window=10_000, base_delay=1.0, max_delay=30.0)
    delays = [p.decide(now=float(i)).delay for i in range(12)]
    assert max(delays) == 30.0
    assert delays[-1] == 30.0


def test_lifetime_limit_counts_across_respawns():
    p = policy(max_restarts=3, threshold=100, window=1.0)
    # Far apart in time: only the lifetime limit can trip.
    results = [p.decide(now=i * 100.0) for i in range(4)]
    assert [r.respawn for r in results] == [True, True, True, False]
    assert "max_restarts (3)" in results[-1].reason
    assert p.restarts == 3


def test_window_threshold_trips_inside_the_window_only():
    p = policy(max_restarts=100, threshold=3, window=60.0)
    assert all(p.decide(now=t).respawn for t in (0.0, 1.0, 2.0))
    refused = p.decide(now=3.0)
    assert not refused.respawn
    assert "within 60s" in refused.reason
    # Once the old restarts slide out of the window, respawns are allowed again.
    assert p.decide(now=62.5).respawn


def test_a_long_lived_worker_restarts_the_backoff_streak():
    p = policy(max_restarts=100, threshold=100, window=60.0, base_delay=1.0, jitter=0.0)
    assert p.decide(now=0.0).delay == 0.0
    assert p.decide(now=1.0, uptime=1.0).delay == 1.0
    # This one ran for two minutes before dying: immediate again.
    assert p.decide(now=200.0, uptime=120.0).delay == 0.0
