"""
The gateway's configuration: a strict schema of frozen attrs classes.

Every value comes from YAML (``load_config``) or a plain mapping (``parse_config``).
Nothing here touches the reactor. Every error is a :class:`ConfigError` whose message
names the source, the dotted key and what is wrong, on one line, so an operator can fix
the file without reading a traceback.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any, Callable, Optional, Union
from urllib.parse import urlsplit

import attrs
import yaml

__all__ = [
    "DEFAULT_CONFIG",
    "CircuitBreakerConfig",
    "ClusterConfig",
    "ConfigError",
    "GatewayConfig",
    "HealthCheckConfig",
    "HealthConfig",
    "LoadBalancerConfig",
    "LoggerConfig",
    "MetricsConfig",
    "RedirectConfig",
    "RouteConfig",
    "ServerConfig",
    "StickySessionConfig",
    "TLSConfig",
    "TargetConfig",
    "load_config",
    "parse_config",
    "parse_duration_free_url",
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
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
_HANDLER = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


class ConfigError(ValueError):
    """
    A configuration value is missing, unknown or wrong.

    :param source: where the config came from (a file path or ``<dict>``).
    :param key: the dotted key, e.g. ``routes[0].target``.
    :param problem: what is wrong, in words.
    """

    def __init__(self, source: str, key: str, problem: str) -> None:
        self.source = source
        self.key = key
        self.problem = problem
        where = f"{source}: {key}" if key else source
        super().__init__(f"{where}: {problem}")


def _cpu_count() -> int:
    return max(1, os.cpu_count() or 1)


# --- sections -------------------------------------------------------------------------


@attrs.frozen
class RedirectConfig:
    """A plain-HTTP listener that answers 308 towards the HTTPS port."""

    port: int = 80
    allowed_hosts: tuple[str, ...] = ()


@attrs.frozen
class TLSConfig:
    """HTTPS termination in the workers."""

    enabled: bool = False
    cert: Optional[str] = None
    key: Optional[str] = None
    min_version: str = "TLSv1.2"
    ciphers: Optional[str] = None
    certificates: Mapping[str, tuple[str, str]] = attrs.field(factory=dict)
    redirect_http: Optional[RedirectConfig] = None


@attrs.frozen
class ServerConfig:
    """Where the gateway listens and request limits."""

    host: str = "0.0.0.0"
    port: int = 3000
    max_body_size: int = 10 * 1024 * 1024
    backlog: int = 1024
    keepalive_requests: int = 1000
    tls: TLSConfig = attrs.field(factory=TLSConfig)


@attrs.frozen
class ClusterConfig:
    """The master/worker fleet (durations in seconds)."""

    enabled: bool = False
    workers: int = attrs.field(factory=_cpu_count)
    restart_workers: bool = True
    max_restarts: int = 10
    restart_delay: float = 1.0
    max_restart_delay: float = 30.0
    respawn_threshold: int = 5
    respawn_threshold_time: float = 60.0
    shutdown_timeout: float = 30.0
    exit_on_shutdown: bool = True
    ready_timeout: float = 30.0
    heartbeat_interval: float = 5.0
    heartbeat_timeout: float = 30.0
    python: Optional[str] = None
    allowed_env: Optional[tuple[str, ...]] = None


@attrs.frozen
class LoggerConfig:
    """Log level, format and access logging."""

    level: str = "info"
    request_logging: bool = True
    format: str = "text"


@attrs.frozen
class MetricsConfig:
    """Prometheus metrics."""

    enabled: bool = False
    path: str = "/metrics"
    listen: Optional[tuple[str, int]] = None


@attrs.frozen
class HealthConfig:
    """The built-in health endpoint of each worker."""

    enabled: bool = True
    path: str = "/health"


@attrs.frozen
class TargetConfig:
    """One upstream of a load-balanced route."""

    url: str
    weight: int = 1


@attrs.frozen
class HealthCheckConfig:
    """Active health checks of a route's targets."""

    enabled: bool = False
    path: str = "/health"
    interval: float = 10.0
    timeout: float = 2.0
    healthy_threshold: int = 2
    unhealthy_threshold: int = 3
    expected_status: int = 200


@attrs.frozen
class StickySessionConfig:
    """Cookie-based session affinity."""

    enabled: bool = False
    cookie: str = "bungate_sticky"
    ttl: float = 3600.0


@attrs.frozen
class LoadBalancerConfig:
    """How a route spreads requests over several targets."""

    strategy: str = "round-robin"
    targets: tuple[TargetConfig, ...] = ()
    health_check: HealthCheckConfig = attrs.field(factory=HealthCheckConfig)
    sticky_session: StickySessionConfig = attrs.field(factory=StickySessionConfig)


@attrs.frozen
class CircuitBreakerConfig:
    """Per-target circuit breaker."""

    enabled: bool = False
    failure_threshold: int = 5
    reset_timeout: float = 30.0
    timeout: float = 10.0


@attrs.frozen
class RouteConfig:
    """
    One route. Exactly one of ``target``, ``handler`` or ``load_balancer`` is set.

    ``handler`` is either an import string (``pkg.mod:func``) from a file, or a
    callable given through the Python API.
    """

    pattern: str
    target: Optional[str] = None
    handler: Union[str, Callable[..., Any], None] = None
    methods: Optional[tuple[str, ...]] = None
    timeout: float = 30.0
    load_balancer: Optional[LoadBalancerConfig] = None
    circuit_breaker: CircuitBreakerConfig = attrs.field(factory=CircuitBreakerConfig)
    middlewares: tuple[str, ...] = ()
    tls_verify: bool = True
    ca_file: Optional[str] = None


@attrs.frozen
class GatewayConfig:
    """The whole configuration; ``source`` says where it was read from."""

    server: ServerConfig = attrs.field(factory=ServerConfig)
    cluster: ClusterConfig = attrs.field(factory=ClusterConfig)
    logger: LoggerConfig = attrs.field(factory=LoggerConfig)
    metrics: MetricsConfig = attrs.field(factory=MetricsConfig)
    health: HealthConfig = attrs.field(factory=HealthConfig)
    routes: tuple[RouteConfig, ...] = ()
    middlewares: tuple[str, ...] = ()
    source: str = "<defaults>"
    raw: Mapping[str, Any] = attrs.field(factory=dict, eq=False, repr=False)


_COOKIE_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
"""An RFC 6265 cookie name (an RFC 9110 token)."""


# --- the built-in default config (used by `twist bungate` without --config) ------------

DEFAULT_CONFIG: Mapping[str, Any] = {
    "server": {"host": "0.0.0.0", "port": 3000},
    "cluster": {"enabled": True},
    "routes": [
        {"pattern": "/echo/*", "handler": "bungate.handlers:echo"},
    ],
}


# --- parsing --------------------------------------------------------------------------


class _Reader:
    """Reads typed values out of one mapping, naming the key on every error."""

    def __init__(self, source: str, prefix: str, data: object) -> None:
        self.source = source
        self.prefix = prefix
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(source, prefix, f"must be a mapping, got {_kind(data)}")
        for key in data:
            if not isinstance(key, str):
                raise ConfigError(source, prefix, f"keys must be strings, got {key!r}")
        self.data: Mapping[str, Any] = data
        self.seen: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def error(self, name: str, problem: str) -> ConfigError:
        return ConfigError(self.source, self.key(name), problem)

    def has(self, name: str) -> bool:
        return name in self.data

    def raw(self, name: str) -> Any:
        self.seen.add(name)
        return self.data.get(name)

    def sub(self, name: str) -> _Reader:
        return _Reader(self.source, self.key(name), self.raw(name))

    def boolean(self, name: str, default: bool) -> bool:
        value = self.raw(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.error(name, f"must be true or false, got {value!r}")
        return value

    def integer(
        self, name: str, default: int, minimum: int = 0, maximum: Optional[int] = None
    ) -> int:
        value = self.raw(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(name, f"must be a whole number, got {value!r}")
        return int(self._bounded(name, value, minimum, maximum))

    def number(
        self, name: str, default: float, minimum: float = 0.0, maximum: Optional[float] = None
    ) -> float:
        value = self.raw(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(name, f"must be a number of seconds, got {value!r}")
        return float(self._bounded(name, value, minimum, maximum))

    def _bounded(self, name: str, value: Any, minimum: Any, maximum: Any) -> Any:
        if value < minimum:
            raise self.error(name, f"must be at least {minimum}, got {value!r}")
        if maximum is not None and value > maximum:
            raise self.error(name, f"must be at most {maximum}, got {value!r}")
        return value

    def string(self, name: str, default: Optional[str]) -> Optional[str]:
        value = self.raw(name)
        if value is None:
            return default
        if not isinstance(value, str) or not value:
            raise self.error(name, f"must be a non-empty string, got {value!r}")
        return value

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.string(name, default)
        assert value is not None
        if value not in choices:
            raise self.error(name, f"must be one of {', '.join(choices)}; got {value!r}")
        return value

    def strings(self, name: str) -> Optional[tuple[str, ...]]:
        value = self.raw(name)
        if value is None:
            return None
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
            raise self.error(name, f"must be a list of strings, got {value!r}")
        return tuple(value)

    def items(self, name: str) -> list[Any]:
        value = self.raw(name)
        if value is None:
            return []
        if not isinstance(value, (list, tuple)):
            raise self.error(name, f"must be a list, got {_kind(value)}")
        return list(value)

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.seen)
        if unknown:
            known = ", ".join(sorted(self.seen))
            raise self.error(unknown[0], f"unknown key (known keys here: {known})")


_KINDS: dict[type, str] = {dict: "a mapping", list: "a list", str: "a string"}


def _kind(value: object) -> str:
    return _KINDS.get(type(value), type(value).__name__)


def _port(reader: _Reader, name: str, default: int) -> int:
    return reader.integer(name, default, minimum=0, maximum=65535)


def _path(reader: _Reader, name: str, default: str) -> str:
    value = reader.string(name, default)
    assert value is not None
    if not value.startswith("/"):
        raise reader.error(name, f"must be a path starting with '/', got {value!r}")
    return value


def parse_duration_free_url(value: object) -> str:
    """
    Check an upstream URL: ``http`` or ``https``, a host, no fragment.

    :returns: the URL without a trailing slash.
    :raises ValueError: with the reason.
    """
    if not isinstance(value, str) or not value:
        raise ValueError(f"must be an http:// or https:// URL, got {value!r}")
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as e:
        raise ValueError(f"is not a valid URL ({e}): {value!r}") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"must be an http:// or https:// URL, got {value!r}")
    if not parts.hostname:
        raise ValueError(f"has no host: {value!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"must not carry a query or fragment: {value!r}")
    if port == 0:
        raise ValueError(f"has port 0: {value!r}")
    return value.rstrip("/")


def _url(reader: _Reader, name: str) -> Optional[str]:
    value = reader.raw(name)
    if value is None:
        return None
    try:
        return parse_duration_free_url(value)
    except ValueError as e:
        raise reader.error(name, str(e)) from None


def _check_pattern(reader: _Reader, name: str, pattern: object) -> str:
    # Local import: routing depends on nothing here, and this keeps one source of truth
    # for what a valid pattern is.
    from bungate.routing import PatternError, compile_pattern

    if not isinstance(pattern, str):
        raise reader.error(name, f"must be a path pattern string, got {pattern!r}")
    try:
        compile_pattern(pattern)
    except PatternError as e:
        raise reader.error(name, str(e)) from None
    return pattern


def _tls(r: _Reader) -> TLSConfig:
    enabled = r.boolean("enabled", False)
    cert = r.string("cert", None)
    key = r.string("key", None)
    min_version = r.choice("min_version", "TLSv1.2", TLS_VERSIONS)
    ciphers = r.string("ciphers", None)
    certificates: dict[str, tuple[str, str]] = {}
    certs = r.sub("certificates")
    for host in certs.data:
        pair = certs.sub(host)
        c, k = pair.string("cert", None), pair.string("key", None)
        if c is None or k is None:
            raise pair.error("cert" if c is None else "key", "is required")
        pair.done()
        certificates[host.lower()] = (c, k)
    redirect = None
    if r.has("redirect_http") and r.data["redirect_http"] is not None:
        rr = r.sub("redirect_http")
        redirect = RedirectConfig(
            port=_port(rr, "port", 80), allowed_hosts=tuple(rr.strings("allowed_hosts") or ())
        )
        rr.done()
    else:
        r.raw("redirect_http")
    if enabled and (cert is None or key is None):
        raise r.error("cert" if cert is None else "key", "is required when tls.enabled is true")
    r.done()
    return TLSConfig(
        enabled=enabled,
        cert=cert,
        key=key,
        min_version=min_version,
        ciphers=ciphers,
        certificates=certificates,
        redirect_http=redirect,
    )


def _server(r: _Reader) -> ServerConfig:
    server = ServerConfig(
        host=r.string("host", "0.0.0.0") or "0.0.0.0",
        port=_port(r, "port", 3000),
        max_body_size=r.integer("max_body_size", 10 * 1024 * 1024, minimum=0),
        backlog=r.integer("backlog", 1024, minimum=1),
        keepalive_requests=r.integer("keepalive_requests", 1000, minimum=0),
        tls=_tls(r.sub("tls")),
    )
    r.done()
    return server


def _cluster(r: _Reader) -> ClusterConfig:
    c = ClusterConfig(
        enabled=r.boolean("enabled", False),
        workers=r.integer("workers", _cpu_count(), minimum=1, maximum=1024),
        restart_workers=r.boolean("restart_workers", True),
        max_restarts=r.integer("max_restarts", 10),
        restart_delay=r.number("restart_delay", 1.0),
        max_restart_delay=r.number("max_restart_delay", 30.0),
        respawn_threshold=r.integer("respawn_threshold", 5),
        respawn_threshold_time=r.number("respawn_threshold_time", 60.0),
        shutdown_timeout=r.number("shutdown_timeout", 30.0),
        exit_on_shutdown=r.boolean("exit_on_shutdown", True),
        ready_timeout=r.number("ready_timeout", 30.0, minimum=0.1),
        heartbeat_interval=r.number("heartbeat_interval", 5.0, minimum=0.05),
        heartbeat_timeout=r.number("heartbeat_timeout", 30.0, minimum=0.1),
        python=r.string("python", None),
        allowed_env=r.strings("allowed_env"),
    )
    if c.heartbeat_timeout <= c.heartbeat_interval:
        raise r.error(
            "heartbeat_timeout",
            f"must be longer than heartbeat_interval ({c.heartbeat_interval})",
        )
    r.done()
    return c


def _logger(r: _Reader) -> LoggerConfig:
    c = LoggerConfig(
        level=r.choice("level", "info", LOG_LEVELS),
        request_logging=r.boolean("request_logging", True),
        format=r.choice("format", "text", LOG_FORMATS),
    )
    r.done()
    return c


def _metrics(r: _Reader) -> MetricsConfig:
    enabled = r.boolean("enabled", False)
    path = _path(r, "path", "/metrics")
    listen = None
    raw = r.raw("listen")
    if raw is not None:
        if isinstance(raw, int) and not isinstance(raw, bool):
            raw = f"127.0.0.1:{raw}"
        host, sep, port = str(raw).rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise r.error("listen", f"must be host:port, got {raw!r}")
        listen = (host.strip("[]") or "127.0.0.1", int(port))
    r.done()
    return MetricsConfig(enabled=enabled, path=path, listen=listen)


def _health(r: _Reader) -> HealthConfig:
    c = HealthConfig(enabled=r.boolean("enabled", True), path=_path(r, "path", "/health"))
    r.done()
    return c


def _names(r: _Reader, name: str) -> tuple[str, ...]:
    values = r.strings(name) or ()
    for v in values:
        if not _NAME.match(v):
            raise r.error(name, f"{v!r} is not a plugin name")
    return values


def _load_balancer(r: _Reader) -> LoadBalancerConfig:
    strategy = r.string("strategy", "round-robin")
    assert strategy is not None
    if not _NAME.match(strategy):
        raise r.error("strategy", f"{strategy!r} is not a strategy name")
    targets = []
    for i, item in enumerate(r.items("targets")):
        tr = _Reader(r.source, f"{r.key('targets')}[{i}]", item)
        url = _url(tr, "url")
        if url is None:
            raise tr.error("url", "is required")
        targets.append(TargetConfig(url=url, weight=tr.integer("weight", 1, minimum=1)))
        tr.done()
    if not targets:
        raise r.error("targets", "needs at least one target")
    hr = r.sub("health_check")
    health = HealthCheckConfig(
        enabled=hr.boolean("enabled", False),
        path=_path(hr, "path", "/health"),
        interval=hr.number("interval", 10.0, minimum=0.01),
        timeout=hr.number("timeout", 2.0, minimum=0.01),
        healthy_threshold=hr.integer("healthy_threshold", 2, minimum=1),
        unhealthy_threshold=hr.integer("unhealthy_threshold", 3, minimum=1),
        expected_status=hr.integer("expected_status", 200, minimum=100, maximum=599),
    )
    hr.done()
    sr = r.sub("sticky_session")
    cookie = sr.string("cookie", "bungate_sticky") or "bungate_sticky"
    if not _COOKIE_NAME.fullmatch(cookie):
        raise sr.error(
            "cookie", f"{cookie!r} is not a cookie name (letters, digits and !#$%&'*+-.^_`|~)"
        )
    sticky = StickySessionConfig(
        enabled=sr.boolean("enabled", False),
        cookie=cookie,
        ttl=sr.number("ttl", 3600.0, minimum=1.0),
    )
    sr.done()
    r.done()
    return LoadBalancerConfig(
        strategy=strategy, targets=tuple(targets), health_check=health, sticky_session=sticky
    )


def _circuit_breaker(r: _Reader) -> CircuitBreakerConfig:
    c = CircuitBreakerConfig(
        enabled=r.boolean("enabled", False),
        failure_threshold=r.integer("failure_threshold", 5, minimum=1),
        reset_timeout=r.number("reset_timeout", 30.0),
        timeout=r.number("timeout", 10.0, minimum=0.001),
    )
    r.done()
    return c


def _route(source: str, index: int, item: object) -> RouteConfig:
    r = _Reader(source, f"routes[{index}]", item)
    if not r.has("pattern"):
        raise r.error("pattern", "is required")
    pattern = _check_pattern(r, "pattern", r.raw("pattern"))
    target = _url(r, "target")
    handler = r.raw("handler")
    if handler is not None and not callable(handler):
        if not isinstance(handler, str) or not _HANDLER.match(handler):
            raise r.error(
                "handler", f"must be an import string 'package.module:name', got {handler!r}"
            )
    methods = r.strings("methods")
    if methods is not None:
        methods = tuple(m.upper() for m in methods)
        bad = [m for m in methods if m not in HTTP_METHODS]
        if bad:
            raise r.error("methods", f"unknown HTTP method {bad[0]!r}")
    timeout = r.number("timeout", 30.0, minimum=0.001)
    lb = _load_balancer(r.sub("load_balancer")) if r.has("load_balancer") else None
    r.raw("load_balancer")
    breaker = _circuit_breaker(r.sub("circuit_breaker"))
    middlewares = _names(r, "middlewares")
    tls_verify = r.boolean("tls_verify", True)
    ca_file = r.string("ca_file", None)
    given = [k for k, v in (("target", target), ("handler", handler), ("load_balancer", lb)) if v]
    if len(given) != 1:
        problem = "needs one of target, handler or load_balancer"
        if given:
            problem = f"sets {' and '.join(given)}; a route takes exactly one of them"
        raise ConfigError(source, f"routes[{index}]", problem)
    if handler is not None and breaker.enabled:
        raise r.error(
            "circuit_breaker", "guards upstreams; a handler route has none (use target)"
        )
    r.done()
    return RouteConfig(
        pattern=pattern,
        target=target,
        handler=handler,
        methods=methods,
        timeout=timeout,
        load_balancer=lb,
        circuit_breaker=breaker,
        middlewares=middlewares,
        tls_verify=tls_verify,
        ca_file=ca_file,
    )


def parse_route(source: str, index: int, item: Mapping[str, Any]) -> RouteConfig:
    """Validate one route mapping (used by ``Gateway.add_route``)."""
    return _route(source, index, item)


def parse_config(data: object, source: str = "<dict>") -> GatewayConfig:
    """
    Validate a configuration mapping.

    :param data: the decoded YAML document or a dict built in Python.
    :param source: named in every error (the file path when loaded from a file).
    :raises ConfigError: on the first problem found.
    """
    root = _Reader(source, "", data)
    config = GatewayConfig(
        server=_server(root.sub("server")),
        cluster=_cluster(root.sub("cluster")),
        logger=_logger(root.sub("logger")),
        metrics=_metrics(root.sub("metrics")),
        health=_health(root.sub("health")),
        routes=tuple(_route(source, i, item) for i, item in enumerate(root.items("routes"))),
        middlewares=_names(root, "middlewares"),
        source=source,
        raw=dict(root.data),
    )
    root.done()
    return config


def load_config(path: str) -> GatewayConfig:
    """
    Read and validate a YAML config file.

    :raises ConfigError: when the file is missing, unreadable, not YAML or not valid.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(path, "", f"cannot read the config file: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(path, "", f"is not valid YAML{where}: {problem}") from None
    return parse_config({} if data is None else data, source=path)


def with_overrides(config: GatewayConfig, **changes: Any) -> GatewayConfig:
    """
    Apply command-line overrides (``port``, ``workers``, ``python``) to a config.

    The raw mapping is updated too, so a worker rebuilt from it sees the same values.
    """
    raw: dict[str, Any] = {
        k: (dict(v) if isinstance(v, Mapping) else v) for k, v in config.raw.items()
    }
    server, cluster = config.server, config.cluster
    if changes.get("port") is not None:
        server = attrs.evolve(server, port=changes["port"])
        raw.setdefault("server", {})["port"] = changes["port"]
    if changes.get("workers") is not None:
        cluster = attrs.evolve(cluster, workers=changes["workers"], enabled=True)
        raw.setdefault("cluster", {}).update(workers=changes["workers"], enabled=True)
    if changes.get("python") is not None:
        cluster = attrs.evolve(cluster, python=changes["python"])
        raw.setdefault("cluster", {})["python"] = changes["python"]
    return attrs.evolve(config, server=server, cluster=cluster, raw=raw)
