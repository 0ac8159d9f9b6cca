"""
Wiring between the gateway and its optional parts: logging, metrics, TLS, health.

Each function turns the config into the objects a role needs, so :mod:`bungate.gateway`
stays about roles and lifecycle. Nothing here is imported by the pure modules.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable, Optional

from twisted.logger import globalLogBeginner

from bungate.config import GatewayConfig

__all__ = [
    "check_startup",
    "extra_factory",
    "for_master",
    "for_worker",
    "listen_extras_single",
    "start_logging",
    "upstream_tls",
    "wrap_tls",
]

_logging_started = [False]
_output: list[Any] = [None]


def set_output(stream: Any) -> None:
    """
    Where this process's log lines go: ``twist``'s log file.

    Only ``twist`` (:mod:`bungate.tap`) calls this, and ``twist`` begins logging itself,
    with the observer the tap chose, after the service has started. From then on
    :func:`start_logging` does nothing in this process, or every event would be written
    twice (by our observer and by twist's).
    """
    _output[0] = stream
    _logging_started[0] = True


def write_line(line: str) -> None:
    """Write an already formatted log line (a worker's) to this process's log output."""
    stream = _output[0] or sys.__stdout__
    if stream is None:
        # No log file and no stdout at all (e.g. started with fd 1 closed): the line has
        # nowhere to go, as when writing fails below.
        return
    try:
        stream.write(line + "\n")
        stream.flush()
    except (OSError, ValueError):
        pass


def start_logging(config: GatewayConfig, worker_id: Optional[str]) -> None:
    """
    Send twisted.logger events to stdout in the configured format and level.

    Skipped when something else (``twist``'s runner, a test harness) already began
    logging or will begin it (see :func:`set_output`), so lines are never written twice.
    """
    from bungate.logging import start_logging as begin

    if _logging_started[0] or getattr(globalLogBeginner, "_temporaryObserver", True) is None:
        return
    _logging_started[0] = True
    _output[0] = sys.__stdout__
    begin(config.logger, worker_id, sys.__stdout__)


def for_master(config: GatewayConfig) -> Any:
    """The master's fleet metrics (creating the shared multiprocess directory), or None."""
    if not config.metrics.enabled:
        return None
    from bungate.metrics import MasterMetrics, multiprocess_dir, prepare_multiprocess_dir

    if multiprocess_dir() is None:
        prepare_multiprocess_dir()
    return MasterMetrics()


def for_worker(
    config: GatewayConfig, worker_id: Optional[str]
) -> tuple[Any, Any, Optional[Callable[..., None]]]:
    """
    A worker's (or single process's) request metrics, ``/metrics`` resource and
    access-log function; each may be ``None`` when disabled.
    """
    metrics = resource = None
    if config.metrics.enabled:
        from bungate.metrics import GatewayMetrics, MetricsResource

        metrics = GatewayMetrics()
        resource = MetricsResource()
    access = None
    if config.logger.request_logging:
        from bungate.logging import access_logger, log_access

        alog = access_logger()

        def access(request: Any, status: int, duration: float) -> None:
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

    return metrics, resource, access


def _name_master_copies() -> None:
    """
    In a worker, name the operator's files in TLS messages instead of the master's
    copies (the master passes ``{copy: original}`` in ``BUNGATE_TLS_COPIES``).
    """
    from bungate.tls import name_copies

    try:
        copies = json.loads(os.environ.get("BUNGATE_TLS_COPIES") or "{}")
    except ValueError:
        return
    if isinstance(copies, dict):
        name_copies({str(k): str(v) for k, v in copies.items()})


def upstream_tls(config: GatewayConfig) -> Any:
    """The HTTPS policy for upstream connections (verification, per-route CAs)."""
    from bungate.tls import upstream_tls_policy

    _name_master_copies()
    return upstream_tls_policy(config.routes, config.source)


def wrap_tls(config: GatewayConfig, site: Any) -> Any:
    """The site itself, or the site behind TLS when ``server.tls.enabled``."""
    if not config.server.tls.enabled:
        return site
    from bungate.tls import server_tls_factory

    _name_master_copies()
    return server_tls_factory(config.server.tls, site)


def extra_factory(gateway: Any, name: str) -> Any:
    """The factory for an extra listener: ``redirect`` (HTTP → HTTPS) or ``metrics``."""
    config: GatewayConfig = gateway.config
    if name == "redirect" and config.server.tls.redirect_http is not None:
        from twisted.web.server import Site

        from bungate.tls import RedirectResource

        redirect = config.server.tls.redirect_http
        return Site(RedirectResource(config.server.port, redirect.allowed_hosts))
    if name == "metrics" and config.metrics.enabled:
        from bungate.metrics import metrics_site

        return metrics_site(config.metrics.path)
    return None


def listen_extras_single(gateway: Any, reactor: Any) -> None:
    """In a single process, bind the extra listeners the config asks for."""
    from bungate.cluster.sockets import bind_listener

    config: GatewayConfig = gateway.config
    wanted = []
    if config.server.tls.enabled and config.server.tls.redirect_http is not None:
        wanted.append(("redirect", config.server.host, config.server.tls.redirect_http.port))
    if config.metrics.enabled and config.metrics.listen is not None:
        wanted.append(("metrics", *config.metrics.listen))
    for name, host, port in wanted:
        factory = extra_factory(gateway, name)
        sock = bind_listener(host, port, config.server.backlog)
        try:
            gateway.ports.append(reactor.adoptStreamPort(sock.fileno(), sock.family, factory))
        finally:
            sock.close()


def check_startup(config: GatewayConfig, manager: Any = None) -> None:
    """
    Everything the master checks before it spawns a worker: certificates, CA files,
    handler imports and plugin names. Raises :class:`~bungate.config.ConfigError`.

    With the master's ``manager``, the manager first copies the certificate, key and CA
    files for its workers and these checks run on the copies (see
    :meth:`~bungate.cluster.manager.ClusterManager.accept_config`); every reload is then
    checked the same way.
    """
    if manager is not None:
        manager.validate_config = check_startup
        manager.accept_config(config)
        return
    from bungate.balanced import check_plugins
    from bungate.config import ConfigError
    from bungate.proxy import resolve_handler
    from bungate.tls import check_tls, check_upstream_tls

    check_tls(config.server.tls, config.source)
    check_upstream_tls(config.routes, config.source)
    for i, route in enumerate(config.routes):
        if route.handler is not None:
            try:
                resolve_handler(route.handler)
            except ValueError as e:
                raise ConfigError(config.source, f"routes[{i}].handler", str(e)) from None
    check_plugins(config)
