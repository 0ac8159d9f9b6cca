"""Tests for bungate.healthcheck with a fake probe and a fake clock."""

from __future__ import annotations

import random
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from bungate.config import (
    CircuitBreakerConfig,
    HealthCheckConfig,
    LoadBalancerConfig,
    TargetConfig,
)
from bungate.core.balancing import RoundRobin, RouteBalancer
from bungate.http.healthcheck import HealthChecker

A, B = "http://10.0.0.1:8080", "http://10.0.0.2:8080"


class FakeProbe:
    """Answers each URL with what the test sets: a status, an error, or nothing (hang)."""

    def __init__(self) -> None:
        self.answers: dict[str, Any] = {}
        self.calls: list[tuple[str, float]] = []
        self.hanging: list[Deferred[int]] = []

    def __call__(self, url: str, timeout: float) -> Deferred[int]:
        self.calls.append((url, timeout))
        answer = self.answers.get(url, 200)
        if answer == "hang":
            d: Deferred[int] = Deferred()
            self.hanging.append(d)
            return d
        if isinstance(answer, Exception):
            return fail(answer)
        return succeed(answer)


def setup(**health: Any):
    settings: dict[str, Any] = dict(
        enabled=True,
        path="/healthz",
        interval=10,
        timeout=2,
        healthy_threshold=2,
        unhealthy_threshold=3,
    )
    settings.update(health)
    config = HealthCheckConfig(**settings)
    lb = LoadBalancerConfig(targets=(TargetConfig(A), TargetConfig(B)), health_check=config)
    clock = Clock()
    balancer = RouteBalancer(lb, CircuitBreakerConfig(), RoundRobin(), clock, random.Random(0))
    probe = FakeProbe()
    checker = HealthChecker(balancer, config, probe, clock)
    return checker, balancer, probe, clock


def test_probes_every_target_now_and_every_interval() -> None:
    checker, _, probe, clock = setup()
    checker.start()
    assert probe.calls == [(A + "/healthz", 2), (B + "/healthz", 2)]
    clock.advance(9.9)
    assert len(probe.calls) == 2
    clock.advance(0.1)
    assert len(probe.calls) == 4
    checker.stop()
    clock.advance(100)
    assert len(probe.calls) == 4


def test_unhealthy_after_threshold_consecutive_failures() -> None:
    checker, balancer, probe, clock = setup()
    a = balancer.upstreams[0]
    probe.answers[A + "/healthz"] = 500
    checker.start()  # failure 1
    clock.advance(10)  # 2
    assert a.healthy
    clock.advance(10)  # 3
    assert not a.healthy
    assert balancer.upstreams[1].healthy
    assert all(balancer.choose("x") is balancer.upstreams[1] for _ in range(5))


def test_a_pass_resets_the_failure_count() -> None:
    checker, balancer, probe, clock = setup()
    url = A + "/healthz"
    probe.answers[url] = ConnectionRefusedError()
    checker.start()
    clock.advance(10)
    probe.answers[url] = 200
    clock.advance(10)
    probe.answers[url] = ConnectionRefusedError()
    clock.advance(10)
    clock.advance(10)
    assert balancer.upstreams[0].healthy
    clock.advance(10)
    assert not balancer.upstreams[0].healthy


def test_healthy_again_after_healthy_threshold_passes() -> None:
    checker, balancer, probe, clock = setup()
    url = A + "/healthz"
    probe.answers[url] = ConnectionRefusedError()
    checker.start()
    clock.advance(10)
    clock.advance(10)
    a = balancer.upstreams[0]
    assert not a.healthy
    probe.answers[url] = 200
    clock.advance(10)
    assert not a.healthy
    clock.advance(10)
    assert a.healthy


def test_expected_status_is_configurable() -> None:
    checker, balancer, probe, clock = setup(expected_status=204)
    probe.answers[B + "/healthz"] = 204
    checker.start()
    clock.advance(10)
    clock.advance(10)
    assert not balancer.upstreams[0].healthy  # answers 200, not 204
    assert balancer.upstreams[1].healthy


def test_a_hanging_probe_times_out_and_counts_as_failure() -> None:
    checker, balancer, probe, clock = setup()
    probe.answers[A + "/healthz"] = "hang"
    checker.start()
    clock.advance(2)
    assert probe.hanging[0].called  # cancelled by the timeout
    clock.advance(8)
    clock.advance(10)
    assert balancer.upstreams[0].healthy  # third probe still out
    clock.advance(2)
    assert not balancer.upstreams[0].healthy
    assert len([c for c in probe.calls if c[0].startswith(A)]) == 3


def test_a_target_still_being_probed_is_not_probed_twice() -> None:
    checker, _, probe, clock = setup(timeout=30.0)
    probe.answers[A + "/healthz"] = "hang"
    checker.start()
    clock.advance(10)
    clock.advance(10)
    assert len([c for c in probe.calls if c[0].startswith(A)]) == 1
    assert len([c for c in probe.calls if c[0].startswith(B)]) == 3


def test_a_probe_that_raises_counts_as_failure() -> None:
    checker, balancer, _, clock = setup()

    def broken(url: str, timeout: float) -> Deferred[int]:
        raise ValueError("bad url")

    checker._request = broken  # type: ignore[assignment]
    checker.start()
    clock.advance(10)
    clock.advance(10)
    assert not any(u.healthy for u in balancer.upstreams)


def test_stop_cancels_probes_in_flight() -> None:
    checker, balancer, probe, _ = setup()
    probe.answers[A + "/healthz"] = "hang"
    checker.start()
    checker.stop()
    assert probe.hanging[0].called
    assert balancer.upstreams[0].healthy
