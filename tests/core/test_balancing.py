"""Tests for bungate.balancing: every built-in strategy and the route balancer."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from twisted.internet.task import Clock

from bungate.config import CircuitBreakerConfig, LoadBalancerConfig, TargetConfig
from bungate.core.balancing import (
    IpHash,
    Latency,
    LeastConnections,
    PowerOfTwoChoices,
    RandomChoice,
    RoundRobin,
    RouteBalancer,
    Upstream,
    Weighted,
    WeightedLeastConnections,
    sticky_value,
)
from bungate.interfaces import IBalancer

URLS = ("http://10.0.0.1:8080", "http://10.0.0.2:8080", "http://10.0.0.3:8080")
ALL = (
    RoundRobin,
    LeastConnections,
    Weighted,
    RandomChoice,
    IpHash,
    PowerOfTwoChoices,
    Latency,
    WeightedLeastConnections,
)


def balancer(
    strategy,
    weights=(1, 1, 1),
    breaker: CircuitBreakerConfig = CircuitBreakerConfig(),
    seed: int = 1,
) -> RouteBalancer:
    config = LoadBalancerConfig(
        strategy=strategy.name,
        targets=tuple(TargetConfig(url=u, weight=w) for u, w in zip(URLS, weights)),
    )
    return RouteBalancer(config, breaker, strategy(), Clock(), random.Random(seed))


def picks(b: RouteBalancer, n: int, client_ip: str = "192.0.2.1") -> Counter[str]:
    counts: Counter[str] = Counter()
    for _ in range(n):
        u = b.choose(client_ip)
        assert u is not None
        counts[u.url] += 1
    return counts


@pytest.mark.parametrize("strategy", ALL, ids=lambda s: s.name)
def test_every_strategy_provides_ibalancer_and_skips_unavailable(strategy) -> None:
    b = balancer(strategy, weights=(3, 1, 1))
    assert IBalancer.providedBy(b.strategy)
    b.set_healthy(b.upstreams[1], False)
    counts = picks(b, 300)
    assert URLS[1] not in counts
    assert set(counts) <= {URLS[0], URLS[2]}


def test_round_robin_is_even_and_in_order() -> None:
    b = balancer(RoundRobin)
    assert [b.choose("x").url for _ in range(6)] == list(URLS) * 2  # type: ignore[union-attr]
    assert set(picks(b, 3000).values()) == {1000}


def test_weighted_three_to_one_over_10000_picks() -> None:
    b = balancer(Weighted, weights=(3, 1))
    counts = picks(b, 10_000)
    assert counts[URLS[0]] / counts[URLS[1]] == pytest.approx(3.0, rel=0.02)


def test_weighted_is_smooth_like_nginx() -> None:
    b = balancer(Weighted, weights=(5, 1, 1))
    order = [URLS.index(b.choose("x").url) for _ in range(7)]  # type: ignore[union-attr]
    assert order == [0, 0, 1, 0, 2, 0, 0]


def test_random_is_roughly_uniform() -> None:
    counts = picks(balancer(RandomChoice, seed=7), 9000)
    for url in URLS:
        assert counts[url] == pytest.approx(3000, rel=0.1)


def test_ip_hash_is_stable_per_client_and_spreads_clients() -> None:
    b = balancer(IpHash)
    for i in range(50):
        ip = f"198.51.100.{i}"
        assert len(picks(b, 20, ip)) == 1
    spread = Counter(b.choose(f"10.1.{i // 256}.{i % 256}").url for i in range(3000))  # type: ignore[union-attr]
    for url in URLS:
        assert spread[url] == pytest.approx(1000, rel=0.15)


def test_ip_hash_moves_only_the_clients_of_a_down_target() -> None:
    b = balancer(IpHash)
    ips = [f"203.0.113.{i}" for i in range(200)]
    before = {ip: b.choose(ip) for ip in ips}
    b.set_healthy(b.upstreams[2], False)
    after = {ip: b.choose(ip) for ip in ips}
    for ip in ips:
        if before[ip] is not b.upstreams[2]:
            assert after[ip] is before[ip]
        else:
            assert after[ip] is not b.upstreams[2]
    b.set_healthy(b.upstreams[2], True)
    assert {ip: b.choose(ip) for ip in ips} == before


def test_ip_hash_agrees_across_instances() -> None:
    # Workers are separate processes: the hash must not depend on PYTHONHASHSEED.
    one, two = balancer(IpHash, seed=1), balancer(IpHash, seed=2)
    for i in range(100):
        assert one.choose(f"10.9.9.{i}").url == two.choose(f"10.9.9.{i}").url  # type: ignore[union-attr]


def test_p2c_never_picks_the_busier_of_its_two() -> None:
    strategy = PowerOfTwoChoices()
    rng = random.Random(3)
    ups = [Upstream(u, 1, None) for u in URLS]  # type: ignore[arg-type]
    for u, active in zip(ups, (5, 0, 2)):
        u.active = active
    # Replay the strategy's draws with a twin random source to know its two candidates.
    twin = random.Random(3)
    counts: Counter[str] = Counter()
    for _ in range(2000):
        i, j = twin.sample(range(3), 2)
        chosen = strategy.pick(ups, "x", rng)
        assert chosen in (ups[i], ups[j])
        assert chosen.active == min(ups[i].active, ups[j].active)
        counts[chosen.url] += 1
    # The busiest target is never chosen: it is always the busier of any pair.
    assert counts[URLS[0]] == 0
    assert counts[URLS[1]] > counts[URLS[2]] > 0


def test_p2c_single_candidate() -> None:
    u = Upstream(URLS[0], 1, None)  # type: ignore[arg-type]
    assert PowerOfTwoChoices().pick([u], "x", random.Random(0)) is u


def test_least_connections_picks_fewest_in_flight() -> None:
    b = balancer(LeastConnections)
    b.upstreams[0].active = 2
    b.upstreams[1].active = 1
    b.upstreams[2].active = 3
    assert b.choose("x") is b.upstreams[1]


def test_least_connections_shares_ties_in_turn() -> None:
    counts = picks(balancer(LeastConnections), 300)
    assert set(counts.values()) == {100}


def test_least_connections_follows_in_flight_accounting() -> None:
    b = balancer(LeastConnections)
    held = []
    for _ in range(6):
        u = b.choose("x")
        assert u is not None
        b.started(u)
        held.append(u)
    assert [u.active for u in b.upstreams] == [2, 2, 2]
    b.finished(held[0], True, 0.01)
    assert b.choose("x") is held[0]


def test_latency_prefers_lowest_ewma() -> None:
    b = balancer(Latency)
    for u, seconds in zip(b.upstreams, (0.3, 0.05, 0.2)):
        b.started(u)
        b.finished(u, True, seconds)
    assert {b.choose("x").url for _ in range(10)} == {URLS[1]}  # type: ignore[union-attr]


def test_latency_tries_unmeasured_targets_first() -> None:
    b = balancer(Latency)
    b.finished(b.upstreams[0], True, 0.01)
    chosen = {b.choose("x").url for _ in range(4)}  # type: ignore[union-attr]
    assert chosen == {URLS[1], URLS[2]}


def test_ewma_moves_towards_new_samples() -> None:
    b = balancer(Latency)
    u = b.upstreams[0]
    b.finished(u, True, 1.0)
    assert u.latency == 1.0
    b.finished(u, True, 0.0)
    assert u.latency == pytest.approx(0.7)
    b.finished(u, False, 100.0)
    assert u.latency == pytest.approx(0.7)


def test_weighted_least_connections_uses_active_per_weight() -> None:
    b = balancer(WeightedLeastConnections, weights=(4, 1, 1))
    b.upstreams[0].active = 3  # 0.75 per weight
    b.upstreams[1].active = 1  # 1.0
    b.upstreams[2].active = 0  # 0.0
    assert b.choose("x") is b.upstreams[2]
    b.upstreams[2].active = 1
    assert b.choose("x") is b.upstreams[0]


def test_weighted_least_connections_idle_fleet_follows_weights() -> None:
    counts = picks(balancer(WeightedLeastConnections, weights=(3, 1)), 4000)
    assert counts[URLS[0]] == 3000 and counts[URLS[1]] == 1000


def test_open_breaker_is_skipped_and_returns_after_reset() -> None:
    config = CircuitBreakerConfig(enabled=True, failure_threshold=2, reset_timeout=5)
    b = balancer(RoundRobin, breaker=config)
    bad = b.upstreams[0]
    for _ in range(2):
        b.started(bad)
        b.finished(bad, False, 1.0)
    assert bad.breaker.state == "open"
    assert URLS[0] not in picks(b, 100)
    b.clock.advance(5)  # type: ignore[attr-defined]
    chosen = [b.choose("x") for _ in range(3)]
    assert chosen.count(bad) == 1  # exactly one trial while half-open
    assert URLS[0] not in picks(b, 10)
    b.finished(bad, True, 0.01)
    assert URLS[0] in picks(b, 3)


def test_all_down_and_none() -> None:
    b = balancer(RoundRobin)
    assert not b.all_down()
    for u in b.upstreams:
        b.set_healthy(u, False)
    assert b.all_down()
    assert b.choose("x") is None
    b.set_healthy(b.upstreams[1], True)
    assert b.choose("x") is b.upstreams[1]


def test_exclude_for_a_retry() -> None:
    b = balancer(RoundRobin)
    first = b.choose("x")
    assert first is not None
    for _ in range(10):
        assert b.choose("x", exclude=[first]) is not first
    assert b.choose("x", exclude=b.upstreams) is None


def test_sticky_value_selects_its_target_while_available() -> None:
    b = balancer(RoundRobin)
    target = b.upstreams[2]
    value = b.sticky_value(target)
    assert value == sticky_value(target)
    assert URLS[2].split("//")[1] not in value
    assert all(b.choose("x", sticky=value) is target for _ in range(10))
    b.set_healthy(target, False)
    assert all(b.choose("x", sticky=value) is not target for _ in range(10))
    assert b.choose("x", sticky=value) is not None
    b.set_healthy(target, True)
    assert b.choose("x", sticky=value, exclude=[target]) is not target
    assert b.choose("x", sticky="not-a-target") is not None


def test_finished_without_verdict_only_releases() -> None:
    config = CircuitBreakerConfig(enabled=True, failure_threshold=1)
    b = balancer(RoundRobin, breaker=config)
    u = b.upstreams[0]
    b.started(u)
    b.finished(u, None, 5.0)
    assert u.active == 0 and u.latency is None and u.breaker.state == "closed"
    b.finished(u, None, 5.0)
    assert u.active == 0
