"""
The configuration schema: frozen attrs classes, one per section of the YAML file.

This is the only place a default is written. Each field carries a :class:`Spec` in its
metadata saying how the parser reads it (kind, bounds, choices), so a new key is added in
one line here and :mod:`bungate.config.parse` reads, checks and documents it from that.
The YAML key of a field is its name. Durations are seconds: a bare number, or a string
with a unit (``"500ms"``, ``"30s"``, ``"2m"``, ``"1h"``); each has a maximum, so that a
millisecond value copied from the spec bungate ports is refused rather than read as hours.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Callable, Optional, Union

import attrs

__all__ = [
    "BUILTIN_STRATEGIES",
    "DEFAULT_CONFIG",
    "HTTP_METHODS",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "MAX_SECONDS",
    "SPEC",
    "TLS_VERSIONS",
    "CircuitBreakerConfig",
    "ClusterConfig",
    "GatewayConfig",
    "HealthCheckConfig",
    "HealthConfig",
    "LoadBalancerConfig",
    "LoggerConfig",
    "MetricsConfig",
    "RedirectConfig",
    "RouteConfig",
    "ServerConfig",
    "Spec",
    "StickySessionConfig",
    "TLSConfig",
    "TargetConfig",
]

HTTP_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"}
)
LOG_LEVELS = ("debug", "info", "warn", "error", "critical")
LOG_FORMATS = ("text", "json")
TLS_VERSIONS = ("TLSv1.2", "TLSv1.3")
BUILTIN_STRATEGIES = (
    "round-robin",
    "least-connections",
    "weighted",
    "random",
    "ip-hash",
    "p2c",
    "latency",
    "weighted-least-connections",
)

SPEC = "bungate"
"""The metadata key under which a field's :class:`Spec` is stored."""


@attrs.frozen
class Spec:
    """
    How the parser reads one field.

    :ivar kind: ``bool``, ``int``, ``seconds`` (a duration: a number of seconds or a
        string with a unit), ``str``, ``choice``, ``path``, ``port``, ``strings``,
        ``section`` (a nested section class) or ``custom`` (read by a function of its own
        in :mod:`bungate.config.parse`).
    :ivar minimum: the lowest value allowed (numbers).
    :ivar maximum: the highest value allowed (numbers), or ``None``.
    :ivar choices: the allowed values (``choice``).
    """

    kind: str
    minimum: Any = None
    maximum: Any = None
    choices: tuple[str, ...] = ()


def _field(spec: Spec, default: Any = attrs.NOTHING, factory: Any = None) -> Any:
    if factory is not None:
        return attrs.field(factory=factory, metadata={SPEC: spec})
    return attrs.field(default=default, metadata={SPEC: spec})


def flag(default: bool) -> Any:
    """A ``true``/``false`` key."""
    return _field(Spec("bool"), default)


def whole(
    default: Any, minimum: int = 0, maximum: Optional[int] = None, factory: Any = None
) -> Any:
    """A whole-number key."""
    return _field(Spec("int", minimum, maximum), default, factory)


#: The longest timeout or delay that makes sense: an hour. A bare number above a
#: duration's maximum that fits once divided by 1000 is refused as likely milliseconds.
MAX_SECONDS = 3600.0


def seconds(default: float, minimum: float = 0.0, maximum: Optional[float] = MAX_SECONDS) -> Any:
    """
    A duration in seconds, at most ``maximum`` (``None``: no limit). Give a long-lived
    duration a larger maximum rather than none, so that milliseconds are still caught.
    """
    return _field(Spec("seconds", minimum, maximum), default)


def text(default: Optional[str]) -> Any:
    """A non-empty string key."""
    return _field(Spec("str"), default)


def choice(default: str, choices: tuple[str, ...]) -> Any:
    """One of a fixed set of strings."""
    return _field(Spec("choice", choices=choices), default)


def path(default: str) -> Any:
    """A URL path starting with ``/``."""
    return _field(Spec("path"), default)


def port(default: int) -> Any:
    """A TCP port, 0..65535 (0 picks a free one)."""
    return _field(Spec("port", 0, 65535), default)


def strings(default: Optional[tuple[str, ...]] = None) -> Any:
    """A list of non-empty strings."""
    return _field(Spec("strings"), default)


def section(cls: type) -> Any:
    """A nested section, read with the same rules."""
    return _field(Spec("section"), factory=cls)


def custom(default: Any = None, factory: Any = None) -> Any:
    """A key with a reader of its own in :mod:`bungate.config.parse`."""
    return _field(Spec("custom"), default, factory)


def _cpu_count() -> int:
    return max(1, os.cpu_count() or 1)


# --- sections -------------------------------------------------------------------------


@attrs.frozen
class RedirectConfig:
    """A plain-HTTP listener that answers 308 towards the HTTPS port."""

    port: int = port(80)
    allowed_hosts: tuple[str, ...] = custom(())


@attrs.frozen
class TLSConfig:
    """HTTPS termination in the workers."""

    enabled: bool = flag(False)
    cert: Optional[str] = text(None)
    key: Optional[str] = text(None)
    min_version: str = choice("TLSv1.2", TLS_VERSIONS)
    ciphers: Optional[str] = text(None)
    #: SNI host name -> (cert, key) paths.
    certificates: Mapping[str, tuple[str, str]] = custom(factory=dict)
    redirect_http: Optional[RedirectConfig] = custom(None)


@attrs.frozen
class ServerConfig:
    """Where the gateway listens and request limits."""

    host: str = text("0.0.0.0")
    port: int = port(3000)
    max_body_size: int = whole(10 * 1024 * 1024)
    max_header_size: int = whole(16 * 1024, minimum=1024)
    max_uri_length: int = whole(8 * 1024, minimum=256)
    client_header_timeout: float = seconds(60.0, minimum=0.1)
    client_body_timeout: float = seconds(60.0, minimum=0.1)
    keepalive_timeout: float = seconds(75.0, minimum=0.1)
    max_connections_per_worker: int = whole(4096, minimum=1)
    backlog: int = whole(1024, minimum=1)
    keepalive_requests: int = whole(1000)
    #: ``//a`` is ``/a`` (nginx's merge_slashes).
    merge_slashes: bool = flag(True)
    #: ``%2F`` / ``%5C`` in a path: ``refuse`` (400) or ``keep`` (encoded, inside a segment).
    encoded_slashes: str = choice("refuse", ("refuse", "keep"))
    #: ``;`` in a path: ``refuse`` (400) or ``keep``.
    path_params: str = choice("refuse", ("refuse", "keep"))
    #: header names with ``_`` reach upstreams (nginx's underscores_in_headers).
    underscores_in_headers: bool = flag(False)
    #: the ``Server`` header of every answer (``""`` or ``false``: none).
    server_header: str = custom("bungate")
    #: ``auto`` (on where measured to pay: PyPy), ``on`` or ``off`` (YAML's ``true`` /
    #: ``false`` too): see :mod:`bungate.http.transport`.
    eager_writes: str = custom("auto")
    tls: TLSConfig = section(TLSConfig)


@attrs.frozen
class ClusterConfig:
    """The master/worker fleet (durations in seconds)."""

    enabled: bool = flag(False)
    workers: int = whole(None, minimum=1, maximum=1024, factory=_cpu_count)
    restart_workers: bool = flag(True)
    max_restarts: int = whole(10)
    restart_delay: float = seconds(1.0)
    max_restart_delay: float = seconds(30.0)
    respawn_threshold: int = whole(5)
    #: an hour, not more: a crash loop shows within minutes, the lifetime limit is
    #: max_restarts, and the spec's 60000 (ms) must not pass as 16 hours.
    respawn_threshold_time: float = seconds(60.0)
    shutdown_timeout: float = seconds(30.0)
    exit_on_shutdown: bool = flag(True)
    ready_timeout: float = seconds(30.0, minimum=0.1)
    heartbeat_interval: float = seconds(5.0, minimum=0.05)
    heartbeat_timeout: float = seconds(30.0, minimum=0.1)
    python: Optional[str] = text(None)
    allowed_env: Optional[tuple[str, ...]] = strings(None)
    #: when every slot has failed: ``exit`` (close the listeners, exit 3, let systemd or
    #: Kubernetes restart the gateway) or ``retry`` (start failed slots again after
    #: ``max_restart_delay``, as nginx keeps trying).
    on_all_failed: str = choice("exit", ("exit", "retry"))
    #: seconds a new worker exercises its request path on a private port before it
    #: reports READY (the JIT compiles it while the old workers still serve): ``None``
    #: (``auto``) is 3 s on PyPy and none on CPython; ``0`` (``off``) none.
    warmup: Optional[float] = custom(None)


@attrs.frozen
class LoggerConfig:
    """Log level, format and access logging."""

    level: str = choice("info", LOG_LEVELS)
    request_logging: bool = flag(True)
    format: str = choice("text", LOG_FORMATS)
    #: append the log (the master's and its workers' lines) to this file instead of
    #: stdout; reopened by path on SIGUSR1 (logrotate). ``twist --logfile`` wins over it.
    file: Optional[str] = text(None)


@attrs.frozen
class MetricsConfig:
    """Prometheus metrics."""

    enabled: bool = flag(False)
    path: str = path("/metrics")
    #: ``(host, port)`` of a listener of its own, or ``None`` to serve on the main port.
    listen: Optional[tuple[str, int]] = custom(None)


@attrs.frozen
class HealthConfig:
    """The built-in health endpoint of each worker."""

    enabled: bool = flag(True)
    path: str = path("/health")
    #: list the fleet's workers (pids, connections, requests) to anyone who asks.
    details: bool = flag(False)


@attrs.frozen
class TargetConfig:
    """One upstream of a load-balanced route."""

    url: str = custom()
    weight: int = whole(1, minimum=1)


@attrs.frozen
class HealthCheckConfig:
    """Active health checks of a route's targets."""

    enabled: bool = flag(False)
    path: str = path("/health")
    interval: float = seconds(10.0, minimum=0.01)
    timeout: float = seconds(2.0, minimum=0.01)
    healthy_threshold: int = whole(2, minimum=1)
    unhealthy_threshold: int = whole(3, minimum=1)
    expected_status: int = whole(200, minimum=100, maximum=599)


@attrs.frozen
class StickySessionConfig:
    """Cookie-based session affinity."""

    enabled: bool = flag(False)
    cookie: str = custom("bungate_sticky")
    #: a cookie's lifetime: up to a week (affinity lasting longer outlives deploys);
    #: still catches the spec's 3600000 (ms).
    ttl: float = seconds(3600.0, minimum=1.0, maximum=7 * 24 * 3600.0)


@attrs.frozen
class LoadBalancerConfig:
    """How a route spreads requests over several targets."""

    strategy: str = custom("round-robin")
    targets: tuple[TargetConfig, ...] = custom(())
    health_check: HealthCheckConfig = section(HealthCheckConfig)
    sticky_session: StickySessionConfig = section(StickySessionConfig)


@attrs.frozen
class CircuitBreakerConfig:
    """Per-target circuit breaker."""

    enabled: bool = flag(False)
    failure_threshold: int = whole(5, minimum=1)
    reset_timeout: float = seconds(30.0)
    timeout: float = seconds(10.0, minimum=0.001)


@attrs.frozen
class RouteConfig:
    """
    One route. Exactly one of ``target``, ``handler`` or ``load_balancer`` is set.

    ``handler`` is either an import string (``pkg.mod:func``) from a file, or a
    callable given through the Python API.
    """

    pattern: str = custom()
    target: Optional[str] = custom(None)
    handler: Union[str, Callable[..., Any], None] = custom(None)
    methods: Optional[tuple[str, ...]] = custom(None)
    timeout: float = seconds(30.0, minimum=0.001)
    load_balancer: Optional[LoadBalancerConfig] = custom(None)
    circuit_breaker: CircuitBreakerConfig = section(CircuitBreakerConfig)
    middlewares: tuple[str, ...] = custom(())
    tls_verify: bool = flag(True)
    ca_file: Optional[str] = text(None)


@attrs.frozen
class GatewayConfig:
    """The whole configuration; ``source`` says where it was read from."""

    server: ServerConfig = section(ServerConfig)
    cluster: ClusterConfig = section(ClusterConfig)
    logger: LoggerConfig = section(LoggerConfig)
    metrics: MetricsConfig = section(MetricsConfig)
    health: HealthConfig = section(HealthConfig)
    routes: tuple[RouteConfig, ...] = custom(())
    middlewares: tuple[str, ...] = custom(())
    #: where the config was read from (a file path, or ``<dict>``); not a YAML key.
    source: str = "<defaults>"


# --- the built-in default config (used by `twist bungate` without --config) ------------

DEFAULT_CONFIG: Mapping[str, Any] = {
    "server": {"host": "0.0.0.0", "port": 3000},
    "cluster": {"enabled": True},
    "routes": [
        {"pattern": "/echo/*", "handler": "bungate.handlers:echo"},
    ],
}
"""The document ``twist bungate`` serves when no ``--config`` is given."""
