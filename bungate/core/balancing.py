"""
Load balancing: the runtime state of a route's targets and the built-in strategies.

A :class:`RouteBalancer` holds one :class:`Upstream` per configured target and picks one
for each request with a strategy (an :class:`~bungate.interfaces.IBalancer`), among the
targets that are healthy and whose circuit breaker lets a request through.

The eight built-in strategies are small classes below; each class is its own plugin
factory (it provides :class:`~bungate.interfaces.IBalancerFactory` and
:class:`~twisted.plugin.IPlugin`), registered through :mod:`bungate.plugins.bungate_builtin`
exactly like a third-party strategy.

Pure logic: the clock and the random source are passed in.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Collection, Sequence
from typing import Optional, Protocol

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.plugin import IPlugin
from zope.interface import implementer, provider

from bungate.core.breaker import BreakerSettings, CircuitBreaker
from bungate.interfaces import IBalancer, IBalancerFactory

__all__ = [
    "EWMA_ALPHA",
    "BalancerSettings",
    "IpHash",
    "Latency",
    "LeastConnections",
    "PowerOfTwoChoices",
    "RandomChoice",
    "RoundRobin",
    "RouteBalancer",
    "TargetSettings",
    "Upstream",
    "Weighted",
    "WeightedLeastConnections",
    "sticky_value",
]

#: Weight of the newest sample in an upstream's latency average.
EWMA_ALPHA = 0.3

_log = Logger(namespace="bungate.balancing")


class Upstream:
    """
    The runtime state of one target of a route.

    :param url: the target's base URL (no trailing slash).
    :param weight: its configured weight (at least 1).
    :param breaker: its circuit breaker.
    :ivar healthy: false while active health checks consider it down.
    :ivar active: requests in flight to it.
    :ivar latency: exponentially weighted moving average of its response time in
        seconds; ``None`` before its first answer.
    :ivar requests: requests sent to it so far.
    :ivar failures: requests to it that failed so far.
    """

    def __init__(self, url: str, weight: int, breaker: CircuitBreaker) -> None:
        self.url = url
        self.weight = weight
        self.breaker = breaker
        self.healthy = True
        self.active = 0
        self.latency: Optional[float] = None
        self.requests = 0
        self.failures = 0

    @property
    def available(self) -> bool:
        """Healthy, and its circuit breaker would let a request through now."""
        return self.healthy and self.breaker.would_allow()

    def __repr__(self) -> str:
        return (
            f"<Upstream {self.url} weight={self.weight} healthy={self.healthy} "
            f"active={self.active} breaker={self.breaker.state}>"
        )


def sticky_value(upstream: Upstream) -> str:
    """
    The sticky-session cookie value that names ``upstream``.

    An opaque digest of the target URL, so the cookie does not reveal internal addresses
    and stays valid across workers and restarts as long as the target is configured.

    :param upstream: the target.
    :returns: 16 hex digits.
    """
    return hashlib.sha256(upstream.url.encode("utf-8")).hexdigest()[:16]


# --- the built-in strategies -------------------------------------------------------------


class _Rotation:
    """A counter that cycles through ties, so equal candidates share the load."""

    def __init__(self) -> None:
        self._next = 0

    def among(self, tied: Sequence[Upstream]) -> Upstream:
        chosen = tied[self._next % len(tied)]
        self._next += 1
        return chosen


@implementer(IBalancer)
@provider(IPlugin, IBalancerFactory)
class RoundRobin:
    """``round-robin``: each available target in turn."""

    name = "round-robin"

    def __init__(self) -> None:
        self._rotation = _Rotation()

    def pick(self, candidates: Sequence[Upstream], client_ip: str, rng: random.Random) -> Upstream:
        """The next candidate in turn (:meth:`IBalancer.pick`)."""
        return self._rotation.among(candidates)


@implementer(IBalancer)
@provider(IPlugin, IBalancerFactory)
class LeastConnections:
    """``least-connections``: the target with the fewest requests in flight; ties in turn."""

    name = "least-connections"

    def __init__(self) -> None:
        self._rotation = _Rotation()

    def pick(self, candidates: Sequence[Upstream], client_ip: str, rng: random.Random) -> Upstream:
        """A candidate with the fewest requests in flight (:meth:`IBalancer.pick`)."""
        least = min(u.active for u in candidates)
        return self._rotation.among([u for u in candidates if u.active == least])


class _SmoothWeights:
    """
    nginx's smooth weighted round robin: every pick, each candidate's current weight grows
    by its weight; the largest wins and is lowered by the total. Over any ``sum(weights)``
    picks each target is chosen ``weight`` times, interleaved (5:1:1 gives a a b a c a a).
    """

    def __init__(self) -> None:
        self._current: dict[Upstream, int] = {}

    def among(self, candidates: Sequence[Upstream]) -> Upstream:
        total = 0
        best: Optional[Upstream] = None
        best_current = 0
        for u in candidates:
            current = self._current.get(u, 0) + u.weight
            self._current[u] = current
            total += u.weight
            if best is None or current > best_current:
                best, best_current = u, current
        assert best is not None
        self._current[best] = best_current - total
        return best


@implementer(IBalancer)
@provider(IPlugin, IBalancerFactory)
class Weighted:
    """``weighted``: smooth weighted round robin (as nginx), proportional to ``weight``."""

    name = "weighted"

    def __init__(self) -> None:
        self._weights = _SmoothWeights()

    def pick(self, candidates: Sequence[Upstream], client_ip: str, rng: random.Random) -> Upstream:
        """The next candidate by smooth weighted round robin (:meth:`IBalancer.pick`)."""
        return self._weights.among(candidates)


@implementer(IBalancer)
@provider(IPlugin, IBalancerFactory)
class RandomChoice:
    """``random``: a uniformly random available target."""

    name = "random"

    def pick(self, candidates: Sequence[Upstream], client_ip: str, rng: random.Random) -> Upstream:
        """A uniformly random candidate, drawn from ``rng`` (:meth:`IBalancer.pick`)."""
        return candidates[rng.randrange(len(candidates))]


def _score(client_ip: str, url: str) -> bytes:
    return hashlib.blake2b(f"{client_ip}\0{url}".encode(), digest_size=8).digest()


@implementer(IBalancer)
@provider(IPlugin, IBalancerFactory)
class IpHash:
    """
    ``ip-hash``: the same client address always goes to the same target while it is
    available (rendezvous hashing: each client ranks the targets by a hash of its address
    and the target URL and takes the first available one). The ranking uses a fixed hash,
    so every worker and every restart agrees; when a target leaves, only its clients move,
    and they come back when it returns.
    """

    name = "ip-hash"

    def pick(self, candidates: Sequence[Upstream], client_ip: str, rng: random.Random) -> Upstream:
        """The candidate ranked first for ``client_ip`` (:meth:`IBalancer.pick`)."""
        return max(candidates, key=lambda u: _score(client_ip, u.url))


@implementer(IBalancer)
@provider(IPlugin, IBalancerFactory)
class PowerOfTwoChoices:
    """
    ``p2c``: power of two choices. Draw two different targets at random and take the one
    with fewer requests in flight (either on a tie). Never the busier of the two.
    """

    name = "p2c"

    def pick(self, candidates: Sequence[Upstream], client_ip: str, rng: random.Random) -> Upstream:
        """The less busy of two random candidates (:meth:`IBalancer.pick`)."""
        if len(candidates) == 1:
            return candidates[0]
        i, j = rng.sample(range(len(candidates)), 2)
        a, b = candidates[i], candidates[j]
        return b if b.active < a.active else a


@implementer(IBalancer)
@provider(IPlugin, IBalancerFactory)
class Latency:
    """
    ``latency``: the target with the lowest average response time (EWMA). A target that
    has not answered yet counts as 0 s, so every target gets tried; ties go to the one with
    fewer requests in flight, then in turn.
    """

    name = "latency"

    def __init__(self) -> None:
        self._rotation = _Rotation()

    def pick(self, candidates: Sequence[Upstream], client_ip: str, rng: random.Random) -> Upstream:
        """A candidate with the lowest average latency (:meth:`IBalancer.pick`)."""

        def key(u: Upstream) -> tuple[float, int]:
            return (u.latency or 0.0, u.active)

        best = min(key(u) for u in candidates)
        return self._rotation.among([u for u in candidates if key(u) == best])


@implementer(IBalancer)
@provider(IPlugin, IBalancerFactory)
class WeightedLeastConnections:
    """
    ``weighted-least-connections``: the target with the fewest requests in flight per unit
    of weight (``active / weight``); ties are shared by smooth weighted round robin, as
    nginx's ``least_conn`` does, so an idle fleet still gets load in proportion to weight.
    """

    name = "weighted-least-connections"

    def __init__(self) -> None:
        self._weights = _SmoothWeights()

    def pick(self, candidates: Sequence[Upstream], client_ip: str, rng: random.Random) -> Upstream:
        """A candidate with the fewest requests in flight per weight (:meth:`IBalancer.pick`)."""
        # Compare active_a / weight_a with active_b / weight_b without floats.
        best = candidates[0]
        for u in candidates[1:]:
            if u.active * best.weight < best.active * u.weight:
                best = u
        tied = [u for u in candidates if u.active * best.weight == best.active * u.weight]
        return self._weights.among(tied)


# --- a route's balancer ------------------------------------------------------------------


class TargetSettings(Protocol):
    """What a balancer reads of one configured target."""

    @property
    def url(self) -> str:
        """The target's base URL."""
        ...

    @property
    def weight(self) -> int:
        """Its weight, at least 1."""
        ...


class BalancerSettings(Protocol):
    """What a balancer reads of its route's ``load_balancer`` section."""

    @property
    def targets(self) -> Sequence[TargetSettings]:
        """The targets, in config order."""
        ...


class RouteBalancer:
    """
    Spreads one route's requests over its targets.

    For each request the proxy calls :meth:`choose`, then :meth:`started` right before
    sending to the chosen upstream and :meth:`finished` when the outcome is known.

    :param config: the route's ``load_balancer`` section.
    :param breaker: the route's ``circuit_breaker`` section (one breaker per target).
    :param strategy: the strategy (a provider of :class:`~bungate.interfaces.IBalancer`),
        e.g. ``find_strategy(config.strategy)()``.
    :param clock: provides ``seconds()`` for the breakers.
    :param rng: the random source handed to the strategy; a fresh
        :class:`random.Random` when not given.
    :ivar upstreams: one :class:`Upstream` per configured target, in config order.
    """

    def __init__(
        self,
        config: BalancerSettings,
        breaker: BreakerSettings,
        strategy: IBalancer,
        clock: IReactorTime,
        rng: Optional[random.Random] = None,
    ) -> None:
        self.config = config
        self.strategy = strategy
        self.clock = clock
        self.rng = rng if rng is not None else random.Random()
        self.upstreams: tuple[Upstream, ...] = tuple(
            Upstream(t.url, t.weight, CircuitBreaker(breaker, clock, name=t.url))
            for t in config.targets
        )
        self._by_sticky = {sticky_value(u): u for u in self.upstreams}

    def available(self, exclude: Collection[Upstream] = ()) -> list[Upstream]:
        """
        The upstreams that may take a request now.

        :param exclude: upstreams to leave out (e.g. the one a retry moves away from).
        """
        return [u for u in self.upstreams if u.available and u not in exclude]

    def all_down(self) -> bool:
        """True when no upstream may take a request (answer 503 at once)."""
        return not any(u.available for u in self.upstreams)

    def sticky_value(self, upstream: Upstream) -> str:
        """The sticky cookie value naming ``upstream``; see :func:`sticky_value`."""
        return sticky_value(upstream)

    def choose(
        self,
        client_ip: str,
        sticky: Optional[str] = None,
        exclude: Collection[Upstream] = (),
    ) -> Optional[Upstream]:
        """
        Pick the upstream for one request.

        Only healthy upstreams whose breaker allows a request are considered. When
        ``sticky`` names an upstream (see :func:`sticky_value`) that is available and not
        excluded, it is chosen; otherwise the strategy picks. A half-open breaker's single
        trial request is taken by this call, so call it once per request you will send.

        :param client_ip: the client's address (used by ``ip-hash``).
        :param sticky: the value of the route's sticky cookie, if the request has one
            and sticky sessions are enabled.
        :param exclude: upstreams not to choose (a retry passes the one that failed).
        :returns: the upstream, or ``None`` when none is available.
        """
        if sticky is not None:
            wanted = self._by_sticky.get(sticky)
            if (
                wanted is not None
                and wanted.available
                and wanted not in exclude
                and wanted.breaker.allow()
            ):
                return wanted
        candidates = self.available(exclude)
        while candidates:
            chosen: Upstream = self.strategy.pick(candidates, client_ip, self.rng)
            if chosen.breaker.allow():
                return chosen
            # Cannot happen with the built-in breaker (available() asked it already), but a
            # strategy may misbehave: never loop for ever.
            candidates = [u for u in candidates if u is not chosen]
        return None

    def started(self, upstream: Upstream) -> None:
        """
        A request is being sent to ``upstream``.

        :param upstream: what :meth:`choose` returned.
        """
        upstream.active += 1
        upstream.requests += 1

    def finished(self, upstream: Upstream, ok: Optional[bool], latency: float) -> None:
        """
        The request sent to ``upstream`` is over.

        :param upstream: what :meth:`choose` returned.
        :param ok: ``True`` when the upstream answered (any status below 500); ``False``
            on a 5xx, a timeout, a refused or broken connection (counts against the
            breaker); ``None`` when there is no verdict (the client went away first):
            only the in-flight count changes.
        :param latency: seconds from sending the request to the response headers; used
            for the latency average when ``ok`` is true.
        """
        upstream.active = max(0, upstream.active - 1)
        if ok is None:
            upstream.breaker.record_abandoned()
            return
        if ok:
            if upstream.latency is None:
                upstream.latency = latency
            else:
                upstream.latency = EWMA_ALPHA * latency + (1 - EWMA_ALPHA) * upstream.latency
            upstream.breaker.record_success()
        else:
            upstream.failures += 1
            upstream.breaker.record_failure()

    def set_healthy(self, upstream: Upstream, healthy: bool) -> None:
        """
        Put ``upstream`` in or out of rotation (called by the health checker).

        :param upstream: one of :attr:`upstreams`.
        :param healthy: its new state.
        """
        if upstream.healthy == healthy:
            return
        upstream.healthy = healthy
        if healthy:
            _log.info("target {target} is healthy again: back in rotation", target=upstream.url)
        else:
            _log.warn("target {target} is unhealthy: out of rotation", target=upstream.url)
