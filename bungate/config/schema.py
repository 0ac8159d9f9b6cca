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

from bungate.config.fields import (
    MAX_SECONDS,
    SPEC,
    Spec,
    choice,
    custom,
    flag,
    path,
    port,
    seconds,
    section,
    strings,
    text,
    whole,
)
from bungate.config.policy import (
    AuthConfig,
    CorsConfig,
    HeaderRules,
    RateLimitConfig,
    RedisConfig,
    SecurityHeadersConfig,
)

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
    #: the application protocols ALPN offers, in the server's order of preference.
    alpn: tuple[str, ...] = custom(("h2", "http/1.1"))


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
    #: addresses and CIDR networks of the proxies in front of the gateway, whose
    #: forwarding header names the client (nobody by default: the peer is the client).
    trusted_proxies: tuple[str, ...] = custom(())
    #: the header trusted proxies name the client in: ``x-forwarded-for`` or ``forwarded``.
    forwarded_header: str = choice("x-forwarded-for", ("x-forwarded-for", "forwarded"))
    #: every connection starts with a PROXY protocol v1/v2 header (HAProxy, AWS NLB).
    proxy_protocol: bool = flag(False)
    #: open WebSocket (and other upgraded) tunnels per worker, at most.
    max_tunnels_per_worker: int = whole(1024, minimum=1)
    #: HTTP/2 with prior knowledge (h2c) on plain listeners, beside HTTP/1.1.
    http2_cleartext: bool = flag(False)
    #: concurrent HTTP/2 streams per connection, at most.
    http2_max_streams: int = whole(128, minimum=1, maximum=1000)
    tls: TLSConfig = section(TLSConfig)
    #: run the workers, and the master once its sockets are bound, as this user (the
    #: master must start as root); its primary group unless ``group`` is given.
    user: Optional[str] = text(None)
    #: the group of the workers and of the master after binding (default: the user's).
    group: Optional[str] = text(None)


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
    #: a UNIX socket (mode 0600) where the master serves its control API (``bungate``
    #: status, scale, roll, reload, stop, signal); ``None``: no control API.
    control_socket: Optional[str] = text(None)
    #: replace a worker once it has received this many requests (0: never), surge-first.
    max_requests: int = whole(0)
    #: add a random 0..this to each worker's ``max_requests``, so they do not recycle at once.
    max_requests_jitter: int = whole(0)
    #: replace a worker whose resident memory exceeds this many MiB (0: never), surge-first.
    max_worker_rss: int = whole(0)


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
    #: the route's policy; ``false`` turns the top-level default off for this route.
    auth: Union[AuthConfig, bool, None] = custom(None)
    rate_limit: Union[RateLimitConfig, bool, None] = custom(None)
    cors: Union[CorsConfig, bool, None] = custom(None)
    security_headers: Union[SecurityHeadersConfig, bool, None] = custom(None)
    #: drop the pattern's fixed prefix from the path sent upstream (``/api/*`` sends
    #: ``/api/users`` as ``/users``).
    strip_prefix: bool = flag(False)
    #: ``{regex: replacement}``, applied in order to the normalized path sent upstream.
    path_rewrite: tuple[tuple[str, str], ...] = custom(())
    request_headers: HeaderRules = section(HeaderRules)
    response_headers: HeaderRules = section(HeaderRules)
    #: ``before_request``, ``after_response``, ``on_error``: ``module:callable`` (or a
    #: callable, from Python).
    hooks: tuple[tuple[str, Any], ...] = custom(())
    #: proxy ``Upgrade: websocket`` requests (the upstream's 101 opens a tunnel).
    websocket: bool = flag(True)
    websocket_idle_timeout: float = seconds(3600.0, minimum=1.0, maximum=7 * 24 * 3600.0)


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
    #: the defaults of every route (a route's own, or its ``false``, wins).
    auth: Optional[AuthConfig] = custom(None)
    rate_limit: Optional[RateLimitConfig] = custom(None)
    cors: Optional[CorsConfig] = custom(None)
    security_headers: SecurityHeadersConfig = custom(factory=SecurityHeadersConfig)
    hooks: tuple[tuple[str, Any], ...] = custom(())
    redis: RedisConfig = section(RedisConfig)
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
