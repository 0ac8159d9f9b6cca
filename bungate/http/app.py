"""
The HTTP side of a worker (or of a single process): the dispatcher, the site, the TLS
wrapper, the factories of the extra listeners, and the checks a config must pass before
anything serves it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Optional

from twisted.internet import defer
from twisted.web.server import Site

from bungate.config import ConfigError, GatewayConfig, RouteConfig
from bungate.http.dispatch import Dispatcher
from bungate.http.handlers import resolve_handler
from bungate.http.middleware import check_plugins
from bungate.http.redirect import RedirectResource
from bungate.http.site import GatewayRequest, GatewaySite
from bungate.http.tls import server_tls_factory
from bungate.http.upstream.tls import upstream_tls_policy
from bungate.ops.logging import access_logger, log_access
from bungate.ops.metrics import GatewayMetrics, MetricsResource, metrics_site
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


class GatewayApp:
    """
    What serves HTTP in one process.

    :param config: the validated config.
    :param reactor: the reactor.
    :param status: returns the process's health document (``/health``).
    :param worker_id: this worker's id, for the access log (``None`` in a single process).
    :param names: ``{copy: original}`` of the certificate copies the config points at.
    """

    def __init__(
        self,
        config: GatewayConfig,
        reactor: Any,
        *,
        status: Callable[[], dict[str, Any]],
        worker_id: Optional[str] = None,
        names: Mapping[str, str] = {},
    ) -> None:
        self.config = config
        self.names = dict(names)
        metrics = resource = None
        if config.metrics.enabled:
            metrics = GatewayMetrics()
            resource = MetricsResource()
        self.dispatcher = Dispatcher(
            config,
            reactor,
            status=status,
            metrics=metrics,
            metrics_resource=resource,
            tls_policy=upstream_tls_policy(config.routes, config.source, self.names),
            access_log=_access_log(worker_id) if config.logger.request_logging else None,
        )
        self.site = GatewaySite(
            self.dispatcher,
            reactor,
            max_body_size=config.server.max_body_size,
            on_done=self.dispatcher.on_done,
            keepalive_requests=config.server.keepalive_requests,
        )

    def add_route(self, route: RouteConfig) -> None:
        """Serve one more validated route."""
        self.dispatcher.add(route)

    def main_factory(self) -> Any:
        """The factory of the main listener: the site, behind TLS when enabled."""
        if not self.config.server.tls.enabled:
            return self.site
        return server_tls_factory(self.config.server.tls, self.site, self.names)

    def extra_factory(self, name: str) -> Optional[Any]:
        """The factory of an extra listener: ``redirect`` (HTTP → HTTPS) or ``metrics``."""
        config = self.config
        if name == "redirect" and config.server.tls.redirect_http is not None:
            redirect = config.server.tls.redirect_http
            return Site(RedirectResource(config.server.port, redirect.allowed_hosts))
        if name == "metrics" and config.metrics.enabled:
            return metrics_site(config.metrics.path)
        return None

    def close(self, ports: list[Any], timeout: float) -> defer.Deferred[Any]:
        """
        Stop the background work (health checks) and the listening ``ports``, let
        in-flight requests finish and close every client connection (at the latest after
        ``timeout`` seconds), then the idle upstream connections.
        """
        self.dispatcher.close()
        stops = [defer.maybeDeferred(p.stopListening) for p in ports]
        d: defer.Deferred[Any] = defer.gatherResults(stops)
        d.addCallback(lambda _: self.site.drain(timeout))
        d.addCallback(lambda _: self.dispatcher.close_connections())
        return d


def _access_log(worker_id: Optional[str]) -> Callable[[GatewayRequest, int, float], None]:
    alog = access_logger()

    def access(request: GatewayRequest, status: int, duration: float) -> None:
        log_access(
            alog,
            method=request.method,
            path=request.uri,  # as received, with the query string
            status=status,
            duration=duration,
            bytes_sent=request.sentLength,
            route=request.route,
            upstream=request.upstream,
            request_id=request.request_id,
            worker_id=worker_id,
        )

    return access
