"""
Reading a configuration document into the typed schema of :mod:`bungate.config.schema`.

Every section is read by one generic loop over its fields' :class:`~bungate.config.schema.Spec`;
the few keys with a shape of their own (routes, URLs, the SNI table, ``metrics.listen``)
have a reader below, and a section may add a check across its fields. Every error is a
:class:`~bungate.config.errors.ConfigError` naming the source, the dotted key and what is
wrong, on one line.

A document is read to the end: a bad value is reported and the field's default stands in
for it so the rest can be read, and :func:`parse_config` raises every problem at once (a
:class:`~bungate.config.errors.ConfigErrors` when there are several), in the order they
appear in the document. :func:`warnings` names what is valid but probably not meant.
Nothing here touches the reactor.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, TypeVar
from urllib.parse import urlsplit

import attrs

from bungate.config.errors import ConfigError, combine
from bungate.config.order import in_document_order
from bungate.config.policy import (
    AuthConfig,
    CorsConfig,
    RateLimitConfig,
    SecurityHeadersConfig,
    read_policy,
)
from bungate.config.reader import Reader as _Reader
from bungate.config.reader import closest_key, format_number
from bungate.config.schema import (
    HTTP_METHODS,
    ClusterConfig,
    GatewayConfig,
    LoadBalancerConfig,
    MetricsConfig,
    RedirectConfig,
    RouteConfig,
    ServerConfig,
    StickySessionConfig,
    TargetConfig,
    TLSConfig,
)
from bungate.config.sections import Failures as _Failures
from bungate.config.sections import custom_reader as _custom
from bungate.config.sections import each as _each
from bungate.config.sections import read_section
from bungate.config.sections import section_check as _check
from bungate.core.clientaddr import TrustedProxies
from bungate.core.routing import PatternError, compile_pattern
from bungate.core.target import TargetError, normalize_path

__all__ = [
    "check_patterns",
    "check_upstream_url",
    "parse_config",
    "parse_route",
]

T = TypeVar("T")

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
_HANDLER = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
_COOKIE_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
"""An RFC 6265 cookie name (an RFC 9110 token)."""
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


def _names(r: _Reader, name: str) -> tuple[Any, ...]:
    """Middlewares: plugin names, ``module:callable`` strings or (from Python) objects."""
    raw = r.raw(name)
    if raw is None:
        return ()
    items = raw if isinstance(raw, (list, tuple)) else [raw]
    out: list[Any] = []
    for i, v in enumerate(items):
        key = f"{r.key(name)}[{i}]"
        if isinstance(v, str):
            if not (_NAME.match(v) or _HANDLER.match(v)):
                raise ConfigError(
                    r.source, key, f"{v!r} is neither a plugin name nor a module:callable"
                )
        elif not callable(v) and not hasattr(v, "process_request"):
            raise ConfigError(
                r.source, key, f"must be a name, module:callable or callable, got {v!r}"
            )
        out.append(v)
    return tuple(out)


_custom(RouteConfig, "target")(_url)
_custom(RouteConfig, "middlewares")(_names)
_custom(GatewayConfig, "middlewares")(_names)

HOOKS = ("before_request", "after_response", "on_error")


def _hooks(r: _Reader, name: str) -> Any:
    raw = r.raw(name)
    if raw is None:
        return attrs.NOTHING
    if not isinstance(raw, Mapping):
        raise r.error(name, f"must map {', '.join(HOOKS)} to module:callable")
    out = []
    for hook, value in raw.items():
        key = f"{r.key(name)}.{hook}"
        if hook not in HOOKS:
            known = closest_key(str(hook), HOOKS)
            hint = f"; did you mean {known}?" if known else f" (known: {', '.join(HOOKS)})"
            raise ConfigError(r.source, key, f"unknown hook{hint}")
        if isinstance(value, str):
            if not _HANDLER.match(value):
                raise ConfigError(r.source, key, f"must be module:callable, got {value!r}")
        elif not callable(value):
            raise ConfigError(
                r.source, key, f"must be module:callable or a callable, got {value!r}"
            )
        out.append((hook, value))
    return tuple(out)


_custom(RouteConfig, "hooks")(_hooks)
_custom(GatewayConfig, "hooks")(_hooks)


def _policy(cls: type) -> Any:
    return lambda r, name: read_policy(r, name, cls)


for _cls in (RouteConfig, GatewayConfig):
    _custom(_cls, "auth")(_policy(AuthConfig))
    _custom(_cls, "rate_limit")(_policy(RateLimitConfig))
    _custom(_cls, "cors")(_policy(CorsConfig))


@_custom(RouteConfig, "security_headers")
def _route_security(r: _Reader, name: str) -> Any:
    return read_policy(r, name, SecurityHeadersConfig)


@_custom(GatewayConfig, "security_headers")
def _security(r: _Reader, name: str) -> Any:
    value = read_policy(r, name, SecurityHeadersConfig)
    if value is False:
        return SecurityHeadersConfig(enabled=False)
    return value


@_custom(RouteConfig, "path_rewrite")
def _path_rewrite(r: _Reader, name: str) -> Any:
    raw = r.raw(name)
    if raw is None:
        return attrs.NOTHING
    if not isinstance(raw, Mapping):
        raise r.error(name, "must map regular expressions to replacements, e.g. {'^/v1/': '/'}")
    out = []
    for pattern, replacement in raw.items():
        key = f"{r.key(name)}.{pattern}"
        try:
            re.compile(str(pattern))
        except re.error as e:
            raise ConfigError(r.source, key, f"is not a regular expression: {e}") from None
        if not isinstance(replacement, str):
            raise ConfigError(
                r.source, key, f"the replacement must be a string, got {replacement!r}"
            )
        out.append((str(pattern), replacement))
    return tuple(out)


@_custom(TLSConfig, "alpn")
def _alpn(r: _Reader, name: str) -> Any:
    value = r.strings(name)
    if value is None:
        return attrs.NOTHING
    known = ("h2", "http/1.1")
    for i, protocol in enumerate(value):
        if protocol not in known:
            raise ConfigError(
                r.source, f"{r.key(name)}[{i}]", f"must be h2 or http/1.1, got {protocol!r}"
            )
    if not value:
        raise r.error(name, "must offer at least one protocol")
    return value


@_custom(ServerConfig, "trusted_proxies")
def _trusted_proxies(r: _Reader, name: str) -> Any:
    value = r.strings(name)
    if value is None:
        return attrs.NOTHING
    for i, entry in enumerate(value):
        try:
            TrustedProxies.parse([entry])
        except ValueError as e:
            raise ConfigError(r.source, f"{r.key(name)}[{i}]", str(e)) from None
    return value


@_custom(ServerConfig, "eager_writes")
def _eager_writes(r: _Reader, name: str) -> Any:
    value = r.raw(name)
    if value is None:
        return attrs.NOTHING
    if isinstance(value, bool):  # YAML reads on/off as booleans
        return "on" if value else "off"
    if value not in ("auto", "on", "off"):
        raise r.error(name, f"must be auto, true or false; got {value!r}")
    return value


@_custom(ServerConfig, "server_header")
def _server_header(r: _Reader, name: str) -> Any:
    value = r.raw(name)
    if value is None:
        return attrs.NOTHING
    if value is False:
        return ""
    if not isinstance(value, str) or not all(0x20 <= ord(c) < 0x7F for c in value):
        raise r.error(name, f"must be printable ASCII text or false, got {value!r}")
    return value.strip()


@_custom(TargetConfig, "url")
def _target_url(r: _Reader, name: str) -> Any:
    if not r.has(name):
        raise r.error(name, "is required")
    return _url(r, name)


@_custom(RedirectConfig, "allowed_hosts")
def _allowed_hosts(r: _Reader, name: str) -> tuple[str, ...]:
    return r.strings(name) or ()


def _certificate_pair(r: _Reader) -> tuple[str, str]:
    paths: list[str] = []
    errors: list[ConfigError] = []
    for name in ("cert", "key"):
        try:
            value = r.string(name, None)
            if value is None:
                raise r.error(name, "is required")
            paths.append(value)
        except ConfigError as e:
            errors.append(e)
    try:
        r.done()
    except ConfigError as e:
        errors.append(e)
    if errors:
        raise combine(errors)
    return paths[0], paths[1]


@_custom(TLSConfig, "certificates")
def _certificates(r: _Reader, name: str) -> dict[str, tuple[str, str]]:
    certificates: dict[str, tuple[str, str]] = {}
    errors: list[ConfigError] = []
    certs = r.sub(name)
    for host in certs.data:
        try:
            certificates[host.lower()] = _certificate_pair(certs.sub(host))
        except ConfigError as e:
            errors.append(e)
    if errors:
        raise combine(errors)
    return certificates


@_custom(TLSConfig, "redirect_http")
def _redirect_http(r: _Reader, name: str) -> Any:
    if not r.has(name):
        r.raw(name)
        return attrs.NOTHING
    return read_section(r.sub(name), RedirectConfig)


@_check(TLSConfig)
def _tls_check(r: _Reader, tls: TLSConfig, failed: _Failures) -> None:
    if not tls.enabled or failed.any("enabled"):
        return
    missing = [
        name
        for name, value in (("cert", tls.cert), ("key", tls.key))
        if value is None and not failed.any(name)
    ]
    if missing:
        also = f" (and so is {r.key(missing[1])})" if len(missing) > 1 else ""
        raise r.error(missing[0], f"is required when tls.enabled is true{also}")


@_check(ClusterConfig)
def _cluster_check(r: _Reader, c: ClusterConfig, failed: _Failures) -> None:
    if failed.any("heartbeat_interval", "heartbeat_timeout"):
        return
    if c.heartbeat_timeout <= c.heartbeat_interval:
        raise r.error(
            "heartbeat_timeout",
            f"must be longer than heartbeat_interval ({c.heartbeat_interval})",
        )
    if c.warmup is not None and not failed.any("warmup", "ready_timeout"):
        if c.warmup >= c.ready_timeout:
            raise r.error(
                "warmup",
                f"must be shorter than ready_timeout ({format_number(c.ready_timeout)} s): "
                "a worker warms up before it reports ready",
            )


@_custom(ClusterConfig, "warmup")
def _warmup(r: _Reader, name: str) -> Any:
    value = r.raw(name)
    if value is None:
        return attrs.NOTHING
    if value == "auto":
        return None
    if value is False or value == "off":
        return 0.0
    return r.number(name, 0.0, 0.0, 60.0, duration=True)


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
    def read(key: str, item: object) -> TargetConfig:
        return read_section(_Reader(r.source, key, item), TargetConfig)

    targets = _each(r, name, read)
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


def _misspelt(r: _Reader, names: tuple[str, ...]) -> bool:
    """Whether a key of ``r`` that no reader asked for is probably one of ``names``."""
    return any(closest_key(k, r.seen) in names for k in r.data if k not in r.seen)


@_check(RouteConfig)
def _route_check(r: _Reader, route: RouteConfig, failed: _Failures) -> None:
    # A key whose value was refused was still written: it counts as given.
    given = [
        k
        for k, v in (
            ("target", route.target),
            ("handler", route.handler),
            ("load_balancer", route.load_balancer),
        )
        if v or failed.any(k)
    ]
    if not given and _misspelt(r, ("target", "handler", "load_balancer")):
        return  # the unknown-key error names the key meant; "needs one of" would add nothing
    if len(given) != 1:
        problem = "needs one of target, handler or load_balancer"
        if given:
            problem = f"sets {' and '.join(given)}; a route takes exactly one of them"
        raise ConfigError(r.source, r.prefix, problem)
    if failed.any("handler", "circuit_breaker.enabled"):
        return
    if route.handler is not None and route.circuit_breaker.enabled:
        raise r.error("circuit_breaker", "guards upstreams; a handler route has none (use target)")


def _pattern_errors(server: ServerConfig, routes: Any, source: str) -> list[ConfigError]:
    """The problems :func:`check_patterns` raises, for ``(index, route)`` pairs."""
    errors: list[ConfigError] = []
    seen: dict[str, int] = {}
    for i, route in routes:
        key = f"routes[{i}].pattern"
        pattern = route.pattern
        try:
            normal = normalize_path(
                pattern.encode("utf-8"),
                merge_slashes=server.merge_slashes,
                encoded_slashes=server.encoded_slashes,
                path_params=server.path_params,
            ).decode("ascii")
        except TargetError as e:
            errors.append(ConfigError(source, key, f"{pattern!r} can never match: {e.message}"))
            continue
        if normal != pattern:
            errors.append(
                ConfigError(
                    source,
                    key,
                    f"{pattern!r} is not a normalized path (requests are matched on their "
                    f"normalized form); write it as {normal!r}",
                )
            )
        elif pattern in seen:
            errors.append(
                ConfigError(
                    source, key, f"{pattern!r} is already routed by routes[{seen[pattern]}]"
                )
            )
        else:
            seen[pattern] = i
    return errors


def check_patterns(server: ServerConfig, routes: Any, source: str, first: int = 0) -> None:
    """
    Every route pattern is written as the normalized path a request is matched on (so
    no pattern can never match), and no pattern is routed twice.

    :param first: the index of ``routes[0]`` in the config (for errors).
    :raises ConfigError: naming ``routes[i].pattern`` (a
        :class:`~bungate.config.errors.ConfigErrors` when several patterns are wrong).
    """
    errors = _pattern_errors(server, enumerate(routes, first), source)
    if errors:
        raise combine(errors)


@_check(GatewayConfig)
def _gateway_check(r: _Reader, config: GatewayConfig, failed: _Failures) -> None:
    if failed.any("server.merge_slashes", "server.encoded_slashes", "server.path_params"):
        return
    # A route whose pattern was refused (or that could not be read) has none to check.
    routes = [(i, route) for i, route in enumerate(config.routes) if route.pattern is not None]
    errors = _pattern_errors(config.server, routes, r.source)
    if errors:
        raise combine(errors)


@_custom(GatewayConfig, "routes")
def _routes(r: _Reader, name: str) -> tuple[RouteConfig, ...]:
    def read(key: str, item: object) -> RouteConfig:
        return read_section(_Reader(r.source, key, item), RouteConfig)

    # A route that is not a mapping is held by a patternless one: later routes keep their index.
    return _each(r, name, read, unread=RouteConfig())


def _route(source: str, index: int, item: object) -> RouteConfig:
    return read_section(_Reader(source, f"routes[{index}]", item), RouteConfig)


# --- entry points ------------------------------------------------------------------------


def parse_route(source: str, index: int, item: Mapping[str, Any]) -> RouteConfig:
    """
    Validate one route mapping (used by ``Gateway.add_route``).

    :raises ConfigError: naming every problem of the route (a
        :class:`~bungate.config.errors.ConfigErrors` when there are several).
    """
    try:
        return _route(source, index, item)
    except ConfigError as e:
        raise in_document_order(e, item, f"routes[{index}]") from None


def parse_config(data: object, source: str = "<dict>") -> GatewayConfig:
    """
    Validate a configuration mapping, reporting every problem in it at once.

    :param data: the decoded YAML document or a dict built in Python.
    :param source: named in every error (the file path when loaded from a file).
    :raises ConfigError: the problem, when there is one; a
        :class:`~bungate.config.errors.ConfigErrors` holding them all, in the order their
        keys appear in ``data``, when there are several.
    """
    try:
        config = read_section(_Reader(source, "", data), GatewayConfig)
    except ConfigError as e:
        raise in_document_order(e, data) from None
    return attrs.evolve(config, source=source)
