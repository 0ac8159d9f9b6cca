"""
Reading a configuration document into the typed schema of :mod:`bungate.config.schema`.

Every section is read by one generic loop over its fields' :class:`~bungate.config.schema.Spec`;
the few keys with a shape of their own (routes, URLs, the SNI table, ``metrics.listen``)
have a reader below, and a section may add a check across its fields. Every error is a
:class:`~bungate.config.errors.ConfigError` naming the source, the dotted key and what is
wrong, on one line. Nothing here touches the reactor.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Callable, Optional, TypeVar
from urllib.parse import urlsplit

import attrs
import yaml

from bungate.config.errors import ConfigError
from bungate.config.schema import (
    HTTP_METHODS,
    SPEC,
    ClusterConfig,
    GatewayConfig,
    LoadBalancerConfig,
    MetricsConfig,
    RedirectConfig,
    RouteConfig,
    Spec,
    StickySessionConfig,
    TargetConfig,
    TLSConfig,
)
from bungate.core.routing import PatternError, compile_pattern

__all__ = [
    "check_upstream_url",
    "load_config",
    "parse_config",
    "parse_route",
    "with_overrides",
]

T = TypeVar("T")

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
_HANDLER = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
_COOKIE_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
"""An RFC 6265 cookie name (an RFC 9110 token)."""
_KINDS: dict[type, str] = {dict: "a mapping", list: "a list", str: "a string"}


def _kind(value: object) -> str:
    return _KINDS.get(type(value), type(value).__name__)


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
        return self.data.get(name) is not None

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

    def path(self, name: str, default: str) -> str:
        value = self.string(name, default)
        assert value is not None
        if not value.startswith("/"):
            raise self.error(name, f"must be a path starting with '/', got {value!r}")
        return value

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.seen)
        if unknown:
            known = ", ".join(sorted(self.seen))
            raise self.error(unknown[0], f"unknown key (known keys here: {known})")


# --- the generic section reader ---------------------------------------------------------

#: ``(section class, field name) -> reader(r, name)``: keys with a shape of their own. A
#: reader returns the value, or ``attrs.NOTHING`` to keep the schema's default.
_CUSTOM: dict[tuple[type, str], Callable[[_Reader, str], Any]] = {}
#: ``section class -> check(r, value)``: rules across the fields of one section.
_CHECKS: dict[type, Callable[[_Reader, Any], None]] = {}


def _custom(cls: type, name: str) -> Callable[[Callable[[_Reader, str], Any]], Any]:
    def register(fn: Callable[[_Reader, str], Any]) -> Any:
        _CUSTOM[(cls, name)] = fn
        return fn

    return register


def _check(cls: type) -> Callable[[Callable[[_Reader, Any], None]], Any]:
    def register(fn: Callable[[_Reader, Any], None]) -> Any:
        _CHECKS[cls] = fn
        return fn

    return register


def _default(field: Any) -> Any:
    default = field.default
    if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
        return default.factory()
    return default


def _simple(r: _Reader, name: str, spec: Spec, default: Any, field: Any) -> Any:
    kind = spec.kind
    if kind == "bool":
        return r.boolean(name, default)
    if kind in ("int", "port"):
        return r.integer(name, default, spec.minimum or 0, spec.maximum)
    if kind == "seconds":
        return r.number(name, default, spec.minimum or 0.0, spec.maximum)
    if kind == "str":
        return r.string(name, default)
    if kind == "choice":
        return r.choice(name, default, spec.choices)
    if kind == "path":
        return r.path(name, default)
    if kind == "strings":
        value = r.strings(name)
        return default if value is None else value
    if kind == "section":
        return read_section(r.sub(name), field.default.factory)
    raise AssertionError(f"unknown field kind {kind!r}")


def read_section(r: _Reader, cls: type[T]) -> T:
    """
    Read one section: every field of ``cls`` by its spec, then the section's own check.

    :raises ConfigError: at the first bad or unknown key.
    """
    values: dict[str, Any] = {}
    for field in attrs.fields(cls):  # type: ignore[arg-type]
        spec: Optional[Spec] = field.metadata.get(SPEC)
        if spec is None:
            continue
        if spec.kind == "custom":
            value = _CUSTOM[(cls, field.name)](r, field.name)
            if value is not attrs.NOTHING:
                values[field.name] = value
        else:
            values[field.name] = _simple(r, field.name, spec, _default(field), field)
    result = cls(**values)
    check = _CHECKS.get(cls)
    if check is not None:
        check(r, result)
    r.done()
    return result


# --- keys with a shape of their own ------------------------------------------------------


def check_upstream_url(value: object) -> str:
    """
    Check an upstream URL: ``http`` or ``https``, a host, no query or fragment.

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


def _url(r: _Reader, name: str) -> Any:
    value = r.raw(name)
    if value is None:
        return attrs.NOTHING
    try:
        return check_upstream_url(value)
    except ValueError as e:
        raise r.error(name, str(e)) from None


def _names(r: _Reader, name: str) -> tuple[str, ...]:
    values = r.strings(name) or ()
    for v in values:
        if not _NAME.match(v):
            raise r.error(name, f"{v!r} is not a plugin name")
    return values


_custom(TargetConfig, "url")(_url)
_custom(RouteConfig, "target")(_url)
_custom(RouteConfig, "middlewares")(_names)
_custom(GatewayConfig, "middlewares")(_names)


@_custom(RedirectConfig, "allowed_hosts")
def _allowed_hosts(r: _Reader, name: str) -> tuple[str, ...]:
    return r.strings(name) or ()


@_custom(TLSConfig, "certificates")
def _certificates(r: _Reader, name: str) -> dict[str, tuple[str, str]]:
    certificates: dict[str, tuple[str, str]] = {}
    certs = r.sub(name)
    for host in certs.data:
        pair = certs.sub(host)
        c, k = pair.string("cert", None), pair.string("key", None)
        if c is None or k is None:
            raise pair.error("cert" if c is None else "key", "is required")
        pair.done()
        certificates[host.lower()] = (c, k)
    return certificates


@_custom(TLSConfig, "redirect_http")
def _redirect_http(r: _Reader, name: str) -> Any:
    if not r.has(name):
        r.raw(name)
        return attrs.NOTHING
    return read_section(r.sub(name), RedirectConfig)


@_check(TLSConfig)
def _tls_check(r: _Reader, tls: TLSConfig) -> None:
    if tls.enabled and (tls.cert is None or tls.key is None):
        raise r.error("cert" if tls.cert is None else "key", "is required when tls.enabled is true")


@_check(ClusterConfig)
def _cluster_check(r: _Reader, c: ClusterConfig) -> None:
    if c.heartbeat_timeout <= c.heartbeat_interval:
        raise r.error(
            "heartbeat_timeout",
            f"must be longer than heartbeat_interval ({c.heartbeat_interval})",
        )


@_custom(MetricsConfig, "listen")
def _listen(r: _Reader, name: str) -> Any:
    raw = r.raw(name)
    if raw is None:
        return attrs.NOTHING
    if isinstance(raw, int) and not isinstance(raw, bool):
        raw = f"127.0.0.1:{raw}"
    host, sep, port = str(raw).rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise r.error(name, f"must be host:port, got {raw!r}")
    return (host.strip("[]") or "127.0.0.1", int(port))


@_custom(StickySessionConfig, "cookie")
def _cookie(r: _Reader, name: str) -> Any:
    cookie = r.string(name, None)
    if cookie is None:
        return attrs.NOTHING
    if not _COOKIE_NAME.fullmatch(cookie):
        raise r.error(
            name, f"{cookie!r} is not a cookie name (letters, digits and !#$%&'*+-.^_`|~)"
        )
    return cookie


@_custom(LoadBalancerConfig, "strategy")
def _strategy(r: _Reader, name: str) -> Any:
    strategy = r.string(name, None)
    if strategy is None:
        return attrs.NOTHING
    if not _NAME.match(strategy):
        raise r.error(name, f"{strategy!r} is not a strategy name")
    return strategy


@_custom(LoadBalancerConfig, "targets")
def _targets(r: _Reader, name: str) -> tuple[TargetConfig, ...]:
    targets = []
    for i, item in enumerate(r.items(name)):
        tr = _Reader(r.source, f"{r.key(name)}[{i}]", item)
        if not tr.has("url"):
            raise tr.error("url", "is required")
        targets.append(read_section(tr, TargetConfig))
    if not targets:
        raise r.error(name, "needs at least one target")
    return tuple(targets)


@_custom(RouteConfig, "pattern")
def _pattern(r: _Reader, name: str) -> str:
    if not r.has(name):
        raise r.error(name, "is required")
    pattern = r.raw(name)
    if not isinstance(pattern, str):
        raise r.error(name, f"must be a path pattern string, got {pattern!r}")
    try:
        compile_pattern(pattern)
    except PatternError as e:
        raise r.error(name, str(e)) from None
    return pattern


@_custom(RouteConfig, "handler")
def _handler(r: _Reader, name: str) -> Any:
    handler = r.raw(name)
    if handler is None:
        return attrs.NOTHING
    if not callable(handler) and (not isinstance(handler, str) or not _HANDLER.match(handler)):
        raise r.error(name, f"must be an import string 'package.module:name', got {handler!r}")
    return handler


@_custom(RouteConfig, "methods")
def _methods(r: _Reader, name: str) -> Any:
    methods = r.strings(name)
    if methods is None:
        return attrs.NOTHING
    methods = tuple(m.upper() for m in methods)
    bad = [m for m in methods if m not in HTTP_METHODS]
    if bad:
        raise r.error(name, f"unknown HTTP method {bad[0]!r}")
    return methods


@_custom(RouteConfig, "load_balancer")
def _load_balancer(r: _Reader, name: str) -> Any:
    if not r.has(name):
        r.raw(name)
        return attrs.NOTHING
    return read_section(r.sub(name), LoadBalancerConfig)


@_check(RouteConfig)
def _route_check(r: _Reader, route: RouteConfig) -> None:
    given = [
        k
        for k, v in (
            ("target", route.target),
            ("handler", route.handler),
            ("load_balancer", route.load_balancer),
        )
        if v
    ]
    if len(given) != 1:
        problem = "needs one of target, handler or load_balancer"
        if given:
            problem = f"sets {' and '.join(given)}; a route takes exactly one of them"
        raise ConfigError(r.source, r.prefix, problem)
    if route.handler is not None and route.circuit_breaker.enabled:
        raise r.error("circuit_breaker", "guards upstreams; a handler route has none (use target)")


@_custom(GatewayConfig, "routes")
def _routes(r: _Reader, name: str) -> tuple[RouteConfig, ...]:
    return tuple(_route(r.source, i, item) for i, item in enumerate(r.items(name)))


def _route(source: str, index: int, item: object) -> RouteConfig:
    return read_section(_Reader(source, f"routes[{index}]", item), RouteConfig)


# --- entry points ------------------------------------------------------------------------


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
    config = read_section(_Reader(source, "", data), GatewayConfig)
    return attrs.evolve(config, source=source)


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


def with_overrides(
    config: GatewayConfig,
    *,
    port: Optional[int] = None,
    workers: Optional[int] = None,
    python: Optional[str] = None,
) -> GatewayConfig:
    """
    Apply command-line overrides (``--port``, ``--workers``, ``--python``) to a config.

    ``workers`` also turns cluster mode on.
    """
    server, cluster = config.server, config.cluster
    if port is not None:
        server = attrs.evolve(server, port=port)
    if workers is not None:
        cluster = attrs.evolve(cluster, workers=workers, enabled=True)
    if python is not None:
        cluster = attrs.evolve(cluster, python=python)
    return attrs.evolve(config, server=server, cluster=cluster)
