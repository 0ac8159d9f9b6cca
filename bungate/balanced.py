"""
Load-balanced routes on the request path: choose a target, account, retry, stick.

A route with ``load_balancer:`` gets one :class:`BalancedRoute` per worker, built when the
:class:`~bungate.proxy.Dispatcher` adds the route. For every request it:

- picks a target with :meth:`~bungate.balancing.RouteBalancer.choose` (the client address
  for ``ip-hash``, the sticky cookie when sticky sessions are on);
- answers ``503 {"error": "no_healthy_upstream"}`` at once when no target may take the
  request (all unhealthy, or their circuits open), without touching any upstream;
- reports :meth:`~bungate.balancing.RouteBalancer.started` and
  :meth:`~bungate.balancing.RouteBalancer.finished` around each attempt (``ok`` is false
  for a 5xx, a timeout, a refused or broken connection; ``None`` when the client left);
- retries an idempotent request once on another available target when its first attempt
  could not connect (``refused``, ``dns``: nothing was sent, so nothing can be repeated);
- sets the sticky cookie (with ``Max-Age``) naming the target that answered.

Active health checks (:class:`~bungate.healthcheck.HealthChecker`) run in each worker
from the moment the reactor runs the dispatcher until :meth:`BalancedRoute.stop`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Optional

from twisted.logger import Logger
from twisted.python.failure import Failure

from bungate.balancing import RouteBalancer, Upstream
from bungate.config import ConfigError, GatewayConfig, RouteConfig
from bungate.extensions import find_middleware, find_strategy
from bungate.healthcheck import HealthChecker, Probe
from bungate.interfaces import UpstreamRequest
from bungate.upstream import UpstreamConnectTimeout
from bungate.web import GatewayRequest, json_response

if TYPE_CHECKING:  # pragma: no cover
    from bungate.proxy import Dispatcher, _Route

__all__ = ["IDEMPOTENT_METHODS", "RETRY_KINDS", "BalancedRoute", "check_plugins"]

#: Methods that may be sent again (RFC 9110 9.2.2).
IDEMPOTENT_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})

#: Failure kinds where the request never left the gateway, so a retry cannot repeat it.
RETRY_KINDS = frozenset({"refused", "dns"})

log = Logger(namespace="bungate.balanced")


def check_plugins(config: GatewayConfig) -> None:
    """
    Look up every strategy and middleware the config names.

    The master calls this before it spawns a worker, so a typo stops the gateway at
    start instead of in every worker.

    :param config: the validated config.
    :raises ConfigError: naming the key of the first unknown name, with the list of
        installed plugins of that kind.
    """
    for j, name in enumerate(config.middlewares):
        _lookup(config.source, f"middlewares[{j}]", find_middleware, name)
    for i, route in enumerate(config.routes):
        if route.load_balancer is not None:
            _lookup(
                config.source,
                f"routes[{i}].load_balancer.strategy",
                find_strategy,
                route.load_balancer.strategy,
            )
        for j, name in enumerate(route.middlewares):
            _lookup(config.source, f"routes[{i}].middlewares[{j}]", find_middleware, name)


def _lookup(source: str, key: str, find: Any, name: str) -> Any:
    try:
        return find(name)
    except LookupError as e:
        raise ConfigError(source, key, str(e.args[0] if e.args else e)) from None


def make_middlewares(source: str, key: str, names: Iterable[str]) -> list[Any]:
    """
    Make the middlewares a config list names (one fresh object per name).

    :param source: the config's source, for errors.
    :param key: the list's dotted key, e.g. ``routes[2].middlewares``.
    :param names: the names, in order.
    :raises ConfigError: for the first unknown name.
    """
    return [_lookup(source, f"{key}[{j}]", find_middleware, n)() for j, n in enumerate(names)]


class BalancedRoute:
    """
    The per-worker runtime of one load-balanced route.

    :param dispatcher: the worker's dispatcher: it proxies each attempt
        (:meth:`~bungate.proxy.Dispatcher._proxy`) and owns the clock, the Agent and the
        metrics.
    :param route: the route's config; ``route.load_balancer`` must be set.
    :param key: the route's dotted config key (``routes[3]``), for errors.
    :param probe: the health-check probe; ``agent_probe(dispatcher.agent, reactor)`` by
        default.
    :raises ConfigError: when the strategy is not installed.
    """

    def __init__(
        self,
        dispatcher: Dispatcher,
        route: RouteConfig,
        key: str = "routes[?]",
        probe: Optional[Probe] = None,
    ) -> None:
        lb = route.load_balancer
        assert lb is not None
        self.dispatcher = dispatcher
        self.label = route.pattern
        self.clock: Any = dispatcher.clock
        factory = _lookup(
            dispatcher.config.source, f"{key}.load_balancer.strategy", find_strategy, lb.strategy
        )
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
        metrics = dispatcher.metrics
        self.metrics = metrics if hasattr(metrics, "upstream_request") else None
        self.checker: Optional[HealthChecker] = None
        if lb.health_check.enabled:
            if probe is None:
                from bungate.healthcheck import agent_probe

                probe = agent_probe(dispatcher.agent, dispatcher.reactor)
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
        self, request: GatewayRequest, route: _Route, upstream: Optional[UpstreamRequest]
    ) -> None:
        """
        Proxy one request to a target of this route.

        :param request: the incoming request (routed, past its middlewares).
        :param route: the dispatcher's route entry.
        :param upstream: what the middlewares asked to send, or ``None`` (no middleware).
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
        self._attempt(request, route, upstream, chosen, peer, sticky, retried=False)

    def _unavailable(self, request: GatewayRequest) -> None:
        upstreams = self.balancer.upstreams
        reason = "unhealthy" if all(not u.healthy for u in upstreams) else "circuit_open"
        if self.metrics is not None:
            self._publish_circuits()
        json_response(
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
        route: _Route,
        upstream: Optional[UpstreamRequest],
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
            if method not in IDEMPOTENT_METHODS:
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
            self._attempt(request, route, upstream, other, peer, sticky, retried=True)
            return True

        self.dispatcher._proxy(
            request,
            route,
            self._targets[chosen],
            on_result=on_result,
            on_failure=on_failure,
            upstream=upstream,
            timeout=self.timeout,
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
