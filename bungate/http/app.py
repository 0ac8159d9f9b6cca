"""
The HTTP side of a worker (or of a single process): the dispatcher, the site, the TLS
wrapper, the factories of the extra listeners, and the checks a config must pass before
anything serves it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Optional

from twisted.internet import defer

from bungate.config import ConfigError, GatewayConfig, RouteConfig
from bungate.http.dispatch import Dispatcher
from bungate.http.handlers import resolve_handler
from bungate.http.metrics import MetricsResource, metrics_site
from bungate.http.middleware import check_plugins
from bungate.http.policy.ratelimit import RateLimits, check_rate_limits
from bungate.http.proxy import ReverseProxy
from bungate.http.redirect import RedirectResource
from bungate.http.site import GatewayRequest, GatewaySite, Limits, SideSite
from bungate.http.tls import server_tls_factory
from bungate.http.transport import eager_writes
from bungate.http.tunnels import Tunnels
from bungate.http.upstream.tls import upstream_tls_policy
from bungate.ops.logging import access_logger, log_access
from bungate.ops.metrics import GatewayMetrics
from bungate.ops.tlsfiles import check_tls, check_upstream_tls

__all__ = ["GatewayApp", "check_config"]


def check_config(config: GatewayConfig, names: Mapping[str, str] = {}) -> None:
    """
    Everything a config must pass before a worker serves it: certificates, CA files,
    handler imports and plugin names.

    :param names: ``{copy: original}`` when the config points at the master's copies.
    :raises ConfigError: naming the key of the first problem.
    """
    check_tls(config.server.tls, config.source, names)
    check_upstream_tls(config.routes, config.source, names)
    for i, route in enumerate(config.routes):
        if route.handler is not None:
            try:
                resolve_handler(route.handler)
            except ValueError as e:
                raise ConfigError(config.source, f"routes[{i}].handler", str(e)) from None
    check_plugins(config)
    check_rate_limits(config)
    check_policies(config, names)


def check_policies(config: GatewayConfig, names: Mapping[str, str] = {}) -> None:
    """
    Build every route's policy once, without serving and without the network: secret
    and key files, environment variables, hook and middleware imports, rate-limit keys.

    :raises ConfigError: naming the key of the first problem.
    """
    from twisted.internet.task import Clock

    from bungate.http.policy.route import RoutePolicy

    clock = Clock()

    def no_fetch() -> defer.Deferred[Any]:
        return defer.Deferred()  # a JWKS is fetched by the workers, not by a check

    for i, route in enumerate(config.routes):
        policy = RoutePolicy(
            route, config, i, reactor=clock, limits=_CheckLimits(), names=names, fetch=no_fetch
        )
        policy.close()


class _CheckLimits:
    """Rate limits for a check: the keys are resolved, nothing is connected."""

    def for_route(self, name: str, limit: Any, **_: Any) -> Any:
        return limit


class GatewayApp:
    """
    What serves HTTP in one process.

    :param config: the validated config.
    :param reactor: the reactor.
    :param status: returns the process's health document (``/health``).
    :param worker_id: this worker's id, for the access log (``None`` in a single process).
    :param names: ``{copy: original}`` of the certificate copies the config points at.
    :param limit_table: see :attr:`limit_table`.
    """

    def __init__(
        self,
        config: GatewayConfig,
        reactor: Any,
        *,
        status: Callable[[], dict[str, Any]],
        worker_id: Optional[str] = None,
        names: Mapping[str, str] = {},
        limit_table: Optional[Any] = None,
    ) -> None:
        self.config = config
        self.reactor = reactor
        #: the fleet's shared rate-limit table (``rate_limit.backend: local``), or
        #: ``None`` (a private one is made when a route needs it).
        self.limit_table = limit_table
        self.names = dict(names)
        self.logs = config.logger.request_logging
        #: whether connections use the eager writes (``server.eager_writes``).
        self.eager = eager_writes(config.server.eager_writes)
        metrics = resource = None
        if config.metrics.enabled:
            metrics = GatewayMetrics()
            resource = MetricsResource()
        tls_policy = upstream_tls_policy(config.routes, config.source, self.names)
        self.dispatcher = Dispatcher(
            config,
            reactor,
            status=status,
            metrics=metrics,
            metrics_resource=resource,
            access_log=_access_log(worker_id) if self.logs else None,
            proxy=ReverseProxy(
                reactor,
                metrics=metrics,
                tls_policy=tls_policy,
                eager=self.eager,
                underscores=config.server.underscores_in_headers,
            ),
            tls_policy=tls_policy,
            limits=RateLimits(config, reactor, limit_table),
            names=self.names,
        )
        #: the WebSocket tunnels of this process.
        self.tunnels = Tunnels(
            reactor, max_open=config.server.max_tunnels_per_worker, idle_timeout=3600.0
        )
        if metrics is not None:
            _count_tunnels(self.tunnels, metrics)
        self.dispatcher.proxy.tunnels = self.tunnels
        self.site = GatewaySite(
            self.dispatcher,
            reactor,
            limits=Limits.from_server(config.server),
            on_done=self.dispatcher.on_done,
            on_reject=_rejected(metrics, self.logs, worker_id),
        )

    def add_route(self, route: RouteConfig) -> None:
        """Serve one more validated route."""
        self.dispatcher.add(route)

    def reconfigure(self, config: GatewayConfig) -> list[str]:
        """
        Serve ``config``'s routes (and middlewares, upstream trust) from now on; requests
        in flight finish with the old ones.

        :returns: the keys that differ but cannot change in a running worker (listeners,
            limits, TLS): they take new workers.
        """
        old = self.dispatcher
        metrics, resource = old.metrics, old.metrics_resource
        tls_policy = upstream_tls_policy(config.routes, config.source, self.names)
        dispatcher = Dispatcher(
            config,
            old.reactor,
            status=old.status,
            metrics=metrics,
            metrics_resource=resource,
            access_log=old.access_log,
            proxy=ReverseProxy(
                old.reactor,
                metrics=metrics,
                tls_policy=tls_policy,
                eager=self.eager,
                underscores=config.server.underscores_in_headers,
            ),
            tls_policy=tls_policy,
            limits=RateLimits(config, old.reactor, self.limit_table),
            names=self.names,
        )
        dispatcher.proxy.tunnels = self.tunnels
        self.dispatcher = dispatcher
        self.site.dispatch = dispatcher
        self.site.on_done = dispatcher.on_done
        old.close()
        old.reactor.callLater(60.0, old.close_connections)  # after its requests finished
        fixed = [
            name
            for name in ("server", "metrics", "health", "logger")
            if getattr(config, name) != getattr(self.config, name)
        ]
        self.config = config
        return fixed

    def main_factory(self) -> Any:
        """
        The factory of the main listener: the site, behind TLS when enabled, behind the
        PROXY protocol (``server.proxy_protocol``: its header comes before TLS).
        """
        factory: Any = self.site
        if self.config.server.tls.enabled:
            factory = server_tls_factory(self.config.server.tls, self.site, self.names)
        if self.config.server.proxy_protocol:
            # Twisted's own v1/v2 parser; a connection without a valid header is closed.
            # The address it carries is the client's (the balancer in front is trusted by
            # being configured so), and replaces the peer everywhere.
            from twisted.protocols.haproxy._wrapper import HAProxyWrappingFactory

            factory = HAProxyWrappingFactory(factory)
        return factory

    def extra_factory(self, name: str) -> Optional[Any]:
        """The factory of an extra listener: ``redirect`` (HTTP → HTTPS) or ``metrics``."""
        config = self.config
        if name == "redirect" and config.server.tls.redirect_http is not None:
            redirect = config.server.tls.redirect_http
            return SideSite(
                RedirectResource(config.server.port, redirect.allowed_hosts),
                self.site.limits.server_header,
            )
        if name == "metrics" and config.metrics.enabled:
            return metrics_site(config.metrics.path, server_header=self.site.limits.server_header)
        return None

    def close(self, ports: list[Any], timeout: float) -> defer.Deferred[Any]:
        """
        Stop the background work (health checks) and the listening ``ports``, let
        in-flight requests finish and close every client connection (at the latest after
        ``timeout`` seconds), then the idle upstream connections.
        """
        self.dispatcher.close()
        # Open tunnels run until the deadline, then end with a 1001 close frame within a
        # grace before it. New connections go to other workers (the ports close now); a
        # handshake this worker accepted before, or one on a connection it still serves,
        # is an in-flight request like any other: it becomes a tunnel with the same
        # deadline rather than a 503. Only once the going-away began are upgrades refused.
        grace = min(5.0, timeout / 4)
        going_away = self.reactor.callLater(
            max(0.0, timeout - grace), self.tunnels.going_away_all, grace
        )
        stops = [defer.maybeDeferred(p.stopListening) for p in ports]
        d: defer.Deferred[Any] = defer.gatherResults(stops)
        d.addCallback(lambda _: self.site.drain(timeout))
        d.addCallback(lambda _: self.dispatcher.close_connections())

        def drained(result: Any) -> Any:
            if going_away.active():  # every connection, tunnels included, ended first
                going_away.cancel()
            return result

        return d.addBoth(drained)


AccessLog = Callable[..., None]


def _peer(transport: Any) -> Optional[str]:
    peer = getattr(transport.getPeer(), "host", None) if transport is not None else None
    return str(peer) if peer is not None else None


def _client(request: GatewayRequest) -> Optional[str]:
    host = getattr(request.getClientAddress(), "host", None)
    return str(host) if host is not None else None


def _access_log(worker_id: Optional[str]) -> AccessLog:
    alog = access_logger()

    def access(request: GatewayRequest, status: int, duration: float) -> None:
        log_access(
            alog,
            method=request.method,
            path=request.uri,  # normalized once dispatched, with the query string
            status=status,
            duration=duration,
            bytes_sent=request.sentLength,
            route=request.route,
            upstream=request.upstream,
            request_id=request.request_id,
            worker_id=worker_id,
            client=_client(request) if request.refused else None,
            reason=request.refused,
        )

    return access


def _rejected(
    metrics: Any, logs: bool, worker_id: Optional[str]
) -> Callable[[Any, int, str], None]:
    """What a connection's own refusal (400, 408, 413, 414, 431, 503) leaves: a count, a line."""

    def rejected(channel: Any, status: int, reason: str) -> None:
        if metrics is not None:
            metrics.request_rejected(status, reason)
        if logs:
            requests = channel.requests
            request = requests[-1] if requests else None
            log_access(
                access_logger(),
                method=getattr(channel, "_command", b"-"),
                path=getattr(channel, "_path", b"-"),
                status=status,
                duration=0.0,
                bytes_sent=0,
                route=None,
                upstream=None,
                request_id=getattr(request, "request_id", b"") or b"-",
                worker_id=worker_id,
                client=_peer(channel.transport),
                reason=reason,
            )

    return rejected


def _count_tunnels(tunnels: Tunnels, metrics: GatewayMetrics) -> None:
    """Count ``tunnels``' openings, refusals, closes and bytes in ``metrics``."""
    tunnels.on_opened = lambda _tunnel: metrics.tunnel_opened()
    tunnels.on_refused = metrics.tunnel_refused
    tunnels.on_closed = lambda tunnel, reason: metrics.tunnel_closed(
        reason, tunnel.client_to_upstream, tunnel.upstream_to_client
    )
