"""
Load-balanced routes on the request path: choose a target, account, retry, stick.

A route with ``load_balancer:`` gets one :class:`BalancedRoute` per worker, built when the
:class:`~bungate.http.dispatch.Dispatcher` adds the route. For every request it:

- picks a target with :meth:`~bungate.core.balancing.RouteBalancer.choose` (the client address
  for ``ip-hash``, the sticky cookie when sticky sessions are on);
- answers ``503 {"error": "no_healthy_upstream"}`` at once when no target may take the
  request (all unhealthy, or their circuits open), without touching any upstream;
- reports :meth:`~bungate.core.balancing.RouteBalancer.started` and
  :meth:`~bungate.core.balancing.RouteBalancer.finished` around each attempt (``ok`` is false
  for a 5xx, a timeout, a refused or broken connection; ``None`` when the client left);
- retries an idempotent request once on another available target when its first attempt
  could not connect (``refused``, ``dns``: nothing was sent, so nothing can be repeated);
- sets the sticky cookie (with ``Max-Age``) naming the target that answered.

Active health checks (:class:`~bungate.http.healthcheck.HealthChecker`) run in each worker
from the moment the reactor runs the dispatcher until :meth:`BalancedRoute.stop`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

from twisted.logger import Logger
from twisted.python.failure import Failure

from bungate.config import RouteConfig
from bungate.core.balancing import RouteBalancer, Upstream
from bungate.core.http1 import IDEMPOTENT
from bungate.http.healthcheck import HealthChecker, Probe
from bungate.http.middleware import lookup
from bungate.http.plugins import find_strategy
from bungate.http.proxy import ReverseProxy
from bungate.http.site import GatewayRequest, error_response
from bungate.http.upstream.pool import UpstreamConnectTimeout
from bungate.interfaces import IMiddleware, UpstreamRequest

__all__ = ["RETRY_KINDS", "BalancedRoute"]

#: Failure kinds where the request never left the gateway, so a retry cannot repeat it.
RETRY_KINDS = frozenset({"refused", "dns"})

log = Logger(namespace="bungate.balanced")


class BalancedRoute:
    """
    The per-worker runtime of one load-balanced route.

    :param proxy: forwards each attempt (:meth:`~bungate.http.proxy.ReverseProxy.forward`).
    :param route: the route's config; ``route.load_balancer`` must be set.
    :param key: the route's dotted config key (``routes[3]``), for errors.
    :param source: the config's source, for errors.
    :param clock: the breakers' and the health checks' clock.
    :param metrics: the worker's metrics (``upstream_request``, ``upstream_healthy``,
        ``circuit_state``), or ``None``.
    :param probe: the health-check probe (needed when health checks are enabled).
    :raises ConfigError: when the strategy is not installed.
    """

    def __init__(
        self,
        proxy: ReverseProxy,
        route: RouteConfig,
        key: str = "routes[?]",
        *,
        source: str = "<config>",
        clock: Any = None,
        metrics: Any = None,
        probe: Optional[Probe] = None,
    ) -> None:
        lb = route.load_balancer
        assert lb is not None
        self.proxy = proxy
        self.label = route.pattern
        self.clock: Any = clock if clock is not None else proxy.clock
        factory = lookup(source, f"{key}.load_balancer.strategy", find_strategy, lb.strategy)
        self.balancer = _PublishingBalancer(
            lb, route.circuit_breaker, factory(), self.clock, on_health=self._publish_health
        )
        self._targets = {u: u.url.encode("ascii") for u in self.balancer.upstreams}
        self._states = {u: u.breaker.state for u in self.balancer.upstreams}
        breaker = route.circuit_breaker
        self.timeout = min(route.timeout, breaker.timeout) if breaker.enabled else route.timeout
        sticky = lb.sticky_session
        self.sticky_cookie: Optional[bytes] = (
            sticky.cookie.encode("ascii") if sticky.enabled else None
        )
        self.sticky_max_age = max(0, int(sticky.ttl))
        self.metrics = metrics if hasattr(metrics, "upstream_request") else None
        self.checker: Optional[HealthChecker] = None
        if lb.health_check.enabled:
            if probe is None:
                raise ValueError(f"{key}: health checks need a probe")
            self.checker = HealthChecker(self.balancer, lb.health_check, probe, self.clock)
        self._stopped = False
        if self.metrics is not None:
            for u in self.balancer.upstreams:
                self.metrics.upstream_healthy(self.label, u.url, u.healthy)
                self.metrics.circuit_state(self.label, u.url, self._states[u])

    # --- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        """Start the active health checks (if enabled); idempotent."""
        if self.checker is not None and not self._stopped:
            self.checker.start()

    def stop(self) -> None:
        """Stop the health checks for good (the worker drains or closes)."""
        self._stopped = True
        if self.checker is not None:
            self.checker.stop()

    # --- the request path -------------------------------------------------------------

    def handle(
        self,
        request: GatewayRequest,
        upstream: Optional[UpstreamRequest] = None,
        chain: Optional[Sequence[IMiddleware]] = None,
    ) -> None:
        """
        Proxy one request to a target of this route.

        :param request: the incoming request (routed, past its middlewares).
        :param upstream: what the middlewares asked to send, or ``None`` (no middleware).
        :param chain: the middlewares whose ``process_response`` see the answer.
        """
        peer = getattr(request.getClientAddress(), "host", None) or ""  # type: ignore[no-untyped-call]
        sticky: Optional[str] = None
        if self.sticky_cookie is not None:
            raw = request.getCookie(self.sticky_cookie)  # type: ignore[no-untyped-call]
            if raw:
                sticky = raw.decode("latin-1")
        chosen = self.balancer.choose(peer, sticky)
        if chosen is None:
            self._unavailable(request)
            return
        self._attempt(request, upstream, chain, chosen, peer, sticky, retried=False)

    def _unavailable(self, request: GatewayRequest) -> None:
        upstreams = self.balancer.upstreams
        reason = "unhealthy" if all(not u.healthy for u in upstreams) else "circuit_open"
        if self.metrics is not None:
            self._publish_circuits()
        error_response(
            request,
            503,
            {
                "error": "no_healthy_upstream",
                "reason": reason,
                "route": self.label,
                "request_id": request.request_id.decode("latin-1"),
            },
        )

    def _attempt(
        self,
        request: GatewayRequest,
        upstream: Optional[UpstreamRequest],
        chain: Optional[Sequence[IMiddleware]],
        chosen: Upstream,
        peer: str,
        sticky: Optional[str],
        retried: bool,
    ) -> None:
        balancer = self.balancer
        balancer.started(chosen)
        if self.metrics is not None:
            self.metrics.upstream_request(self.label, chosen.url)
        sent_at = self.clock.seconds()

        def on_result(outcome: str, status: int) -> None:
            if outcome == "ok":
                ok: Optional[bool] = status < 500
            elif outcome == "client-gone":
                ok = None
            else:
                ok = False
            balancer.finished(chosen, ok, self.clock.seconds() - sent_at)
            if self.metrics is not None:
                self._publish_circuits()
            if outcome == "ok" and self.sticky_cookie is not None:
                value = balancer.sticky_value(chosen)
                if value != sticky:
                    request.addCookie(  # type: ignore[no-untyped-call]
                        self.sticky_cookie,
                        value.encode("ascii"),
                        max_age=b"%d" % self.sticky_max_age,
                        path=b"/",
                        httpOnly=True,
                        sameSite="lax",
                    )

        def on_failure(failure: Failure, kind: str) -> bool:
            # Never connected (refused, no such name, or the connect timed out): the
            # upstream cannot have seen the request, so another target may take it.
            if retried or not (kind in RETRY_KINDS or failure.check(UpstreamConnectTimeout)):
                return False
            method = upstream.method if upstream is not None else request.method
            if method not in IDEMPOTENT:
                return False
            other = balancer.choose(peer, None, exclude=(chosen,))
            if other is None:
                return False
            log.info(
                "Retrying {method} {uri} via {route} on {next}: {target} {kind}",
                method=method.decode("ascii", "replace"),
                uri=request.uri.decode("latin-1"),
                route=self.label,
                target=chosen.url,
                next=other.url,
                kind=kind,
                request_id=request.request_id.decode("latin-1"),
            )
            self._attempt(request, upstream, chain, other, peer, sticky, retried=True)
            return True

        self.proxy.forward(
            request,
            self._targets[chosen],
            route=self.label,
            timeout=self.timeout,
            upstream=upstream,
            chain=chain,
            on_result=on_result,
            on_failure=on_failure,
        )

    # --- metrics ----------------------------------------------------------------------

    def _publish_health(self, upstream: Upstream, healthy: bool) -> None:
        if self.metrics is not None:
            self.metrics.upstream_healthy(self.label, upstream.url, healthy)

    def _publish_circuits(self) -> None:
        """Publish breaker states that changed (open → half-open happens as time passes)."""
        assert self.metrics is not None
        states = self._states
        for u in self.balancer.upstreams:
            state = u.breaker.state
            if states[u] != state:
                states[u] = state
                self.metrics.circuit_state(self.label, u.url, state)


class _PublishingBalancer(RouteBalancer):
    """A :class:`RouteBalancer` that reports health changes (for the metrics)."""

    def __init__(self, *args: Any, on_health: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._on_health = on_health

    def set_healthy(self, upstream: Upstream, healthy: bool) -> None:
        """Put ``upstream`` in or out of rotation and publish the change."""
        changed = upstream.healthy != healthy
        super().set_healthy(upstream, healthy)
        if changed:
            self._on_health(upstream, healthy)
