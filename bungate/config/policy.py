"""
The access and traffic policy sections of the schema: ``auth``, ``rate_limit``, ``cors``,
``security_headers``, header rules, ``redis``; each usable at the top level (a default
for every route) and on a route (where ``false`` turns the default off).

Defaults are written here and nowhere else; the readers of the keys with a shape of
their own are registered with :mod:`bungate.config.sections`. Pure: no reactor, no I/O
(files named here are read by the workers, checked before they serve).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Optional, Union
from urllib.parse import urlsplit

import attrs

from bungate.config.errors import ConfigError
from bungate.config.fields import choice, custom, flag, seconds, strings, text, whole
from bungate.config.reader import Reader
from bungate.config.sections import custom_reader, each, read_section, section_check
from bungate.core.routing import PatternError, compile_pattern

__all__ = [
    "OFF",
    "ApiKeyConfig",
    "AuthConfig",
    "CorsConfig",
    "HeaderRules",
    "JwtConfig",
    "RateLimitConfig",
    "RedisConfig",
    "SecurityHeadersConfig",
    "inherit",
]

OFF = False
"""A route's ``auth: false`` (``rate_limit: false``, ...): no default from the top level."""

_HEADER = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_IMPORT = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
#: The gateway sets these itself; a header rule may not set or add them.
_GATEWAY_HEADERS = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "upgrade", "te", "trailer"}
)
#: ``forward_claims`` may not name these: they carry the gateway's own view.
_FORWARD_RESERVED = _GATEWAY_HEADERS | {
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-real-ip",
    "forwarded",
    "authorization",
    "cookie",
}


# --- auth ---------------------------------------------------------------------------------


@attrs.frozen
class ApiKeyConfig:
    """One API key and the caller it names."""

    key: str = attrs.field(repr=False)
    name: str = "api-key"


@attrs.frozen
class JwtConfig:
    """
    JSON Web Tokens: one key source (``secret``, ``secret_file``, ``secret_env``,
    ``public_key`` or ``jwks_uri``) and the claims a token must have.
    """

    algorithms: tuple[str, ...] = custom(())
    secret: Optional[str] = custom(None)
    secret_file: Optional[str] = text(None)
    secret_env: Optional[str] = text(None)
    #: a PEM file with the public key (RS*, PS*, ES*, EdDSA).
    public_key: Optional[str] = text(None)
    jwks_uri: Optional[str] = custom(None)
    #: seconds between two fetches of the JWKS at least (an unknown ``kid`` refetches).
    jwks_min_refresh: float = seconds(30.0, minimum=1.0)
    issuer: Optional[str] = text(None)
    audience: Optional[tuple[str, ...]] = custom(None)
    #: seconds of clock skew allowed on ``exp`` and ``nbf``.
    leeway: float = seconds(0.0, maximum=600.0)
    required_claims: tuple[str, ...] = strings(())
    required_scopes: tuple[str, ...] = strings(())
    require_expiry: bool = flag(True)


@attrs.frozen
class AuthConfig:
    """Who may call a route: a JWT, an API key, or either."""

    jwt: Optional[JwtConfig] = custom(None)
    api_keys: tuple[ApiKeyConfig, ...] = custom(())
    #: a file of keys, one per line: ``key`` or ``name key``.
    api_keys_file: Optional[str] = text(None)
    #: an environment variable holding keys, comma-separated, each ``key`` or ``name=key``.
    api_keys_env: Optional[str] = text(None)
    api_key_header: str = custom("X-API-Key")
    #: where the JWT is read: ``Authorization: Bearer`` by default.
    token_header: str = custom("Authorization")
    token_query: Optional[str] = text(None)
    token_cookie: Optional[str] = text(None)
    #: a request without credentials passes (one with bad credentials does not).
    optional: bool = flag(False)
    #: route patterns (as in ``routes[].pattern``) that need no credentials.
    exclude_paths: tuple[str, ...] = custom(())
    #: ``{claim: header}``: the caller's claims sent upstream (client copies removed).
    forward_claims: tuple[tuple[str, str], ...] = custom(())


@custom_reader(JwtConfig, "algorithms")
def _algorithms(r: Reader, name: str) -> Any:
    value = r.strings(name)
    if not value:
        raise r.error(name, "is required: list the algorithms tokens may use, e.g. [RS256]")
    from bungate.core.auth import JwtSettings

    try:
        JwtSettings(algorithms=value)
    except ValueError as e:
        raise r.error(name, str(e)) from None
    return value


@custom_reader(JwtConfig, "secret")
def _secret(r: Reader, name: str) -> Any:
    value = r.string(name, None)
    if value is None:
        return attrs.NOTHING
    return value


@custom_reader(JwtConfig, "jwks_uri")
def _jwks_uri(r: Reader, name: str) -> Any:
    value = r.string(name, None)
    if value is None:
        return attrs.NOTHING
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise r.error(name, f"must be an http:// or https:// URL, got {value!r}")
    return value


@custom_reader(JwtConfig, "audience")
def _audience(r: Reader, name: str) -> Any:
    raw = r.raw(name)
    if raw is None:
        return attrs.NOTHING
    if isinstance(raw, str):
        return (raw,) if raw else _refuse(r, name, "must not be empty")
    value = r.strings(name)
    if not value:
        raise r.error(name, "must name at least one audience")
    return value


@section_check(JwtConfig)
def _jwt_check(r: Reader, c: JwtConfig, failed: Any) -> None:
    sources = [
        n
        for n in ("secret", "secret_file", "secret_env", "public_key", "jwks_uri")
        if getattr(c, n) is not None
    ]
    if len(sources) != 1:
        if failed.any("secret", "secret_file", "secret_env", "public_key", "jwks_uri"):
            return
        found = ", ".join(sources) if sources else "none"
        raise r.error(
            "",
            "needs exactly one key source: secret, secret_file, secret_env, public_key or "
            f"jwks_uri (found: {found})",
        )
    if failed.any("algorithms") or not c.algorithms:
        return
    hmac = [a for a in c.algorithms if a.startswith("HS")]
    keyed = sources[0] in ("secret", "secret_file", "secret_env")
    if keyed and len(hmac) != len(c.algorithms):
        raise r.error(
            "algorithms", f"a secret verifies HS256/384/512 only, got {list(c.algorithms)}"
        )
    if not keyed and hmac:
        raise r.error(
            "algorithms",
            f"{sources[0]} holds public keys: HS* algorithms would let a token signed with "
            "the public key as an HMAC secret pass (algorithm confusion)",
        )
    if c.secret is not None and len(c.secret.encode()) < 32:
        raise r.error("secret", "is shorter than 32 bytes: use a long random secret")


@custom_reader(AuthConfig, "jwt")
def _jwt(r: Reader, name: str) -> Any:
    if r.raw(name) is None:
        return attrs.NOTHING
    return read_section(r.sub(name), JwtConfig)


@custom_reader(AuthConfig, "api_keys")
def _api_keys(r: Reader, name: str) -> Any:
    def one(key: str, item: object) -> ApiKeyConfig:
        where = key
        if isinstance(item, str):
            return _key(r, where, item, "api-key")
        if isinstance(item, Mapping):
            unknown = set(item) - {"key", "name"}
            if unknown:
                raise ConfigError(r.source, where, f"unknown keys {sorted(unknown)}")
            return _key(r, where, item.get("key"), item.get("name", "api-key"))
        raise ConfigError(r.source, where, "must be a key, or {key: ..., name: ...}")

    return each(r, name, one)


def _key(r: Reader, where: str, key: object, name: object) -> ApiKeyConfig:
    from bungate.core.auth import ApiKeys

    if not isinstance(name, str) or not name:
        raise ConfigError(r.source, where, "name must be a non-empty string")
    try:
        ApiKeys.parse([{"key": key, "name": name}])  # type: ignore[dict-item]
    except ValueError as e:
        raise ConfigError(r.source, where, str(e).replace("API key #0 ", "")) from None
    assert isinstance(key, str)
    return ApiKeyConfig(key, name)


def _header_name(r: Reader, name: str, default: str) -> Any:
    value = r.string(name, None)
    if value is None:
        return attrs.NOTHING
    if not _HEADER.match(value):
        raise r.error(name, f"{value!r} is not a header name")
    return value


custom_reader(AuthConfig, "api_key_header")(lambda r, name: _header_name(r, name, "X-API-Key"))
custom_reader(AuthConfig, "token_header")(lambda r, name: _header_name(r, name, "Authorization"))


@custom_reader(AuthConfig, "exclude_paths")
def _exclude_paths(r: Reader, name: str) -> Any:
    value = r.strings(name)
    if value is None:
        return attrs.NOTHING
    for i, pattern in enumerate(value):
        try:
            compile_pattern(pattern)
        except PatternError as e:
            raise ConfigError(r.source, f"{r.key(name)}[{i}]", str(e)) from None
    return value


@custom_reader(AuthConfig, "forward_claims")
def _forward_claims(r: Reader, name: str) -> Any:
    raw = r.raw(name)
    if raw is None:
        return attrs.NOTHING
    if not isinstance(raw, Mapping):
        raise r.error(name, "must map claims to header names, e.g. {sub: X-User-Id}")
    out = []
    for claim, header in raw.items():
        key = f"{r.key(name)}.{claim}"
        if not isinstance(claim, str) or not claim:
            raise ConfigError(r.source, key, "a claim name must be a non-empty string")
        if not isinstance(header, str) or not _HEADER.match(header):
            raise ConfigError(r.source, key, f"{header!r} is not a header name")
        if header.lower() in _FORWARD_RESERVED:
            raise ConfigError(r.source, key, f"{header} is set by the gateway itself")
        out.append((claim, header))
    return tuple(out)


@section_check(AuthConfig)
def _auth_check(r: Reader, c: AuthConfig, failed: Any) -> None:
    keyed = c.api_keys or c.api_keys_file is not None or c.api_keys_env is not None
    if c.jwt is None and not keyed and not failed.any("jwt", "api_keys"):
        raise r.error("", "needs jwt, api_keys, api_keys_file or api_keys_env")


# --- rate limits --------------------------------------------------------------------------


@attrs.frozen
class RateLimitConfig:
    """``max`` requests per ``window`` seconds per client key, GCRA (see core.ratelimit)."""

    max: int = whole(None, minimum=1)
    window: float = seconds(60.0, minimum=0.001, maximum=86400.0)
    #: requests allowed at once after a quiet spell; default ``max``.
    burst: Optional[int] = whole(None, minimum=1)
    #: ``ip``, ``header:NAME``, ``claim:NAME``, ``api_key`` or ``module:callable``.
    key: str = custom("ip")
    backend: str = choice("local", ("local", "redis"))
    #: with ``redis`` down or slow: ``allow`` (decided by a local limit) or ``deny``.
    on_backend_error: str = choice("allow", ("allow", "deny"))
    #: the ``RateLimit-*`` headers on allowed answers too (always on a 429).
    headers: bool = flag(True)


@custom_reader(RateLimitConfig, "key")
def _rate_key(r: Reader, name: str) -> Any:
    value = r.string(name, None)
    if value is None:
        return attrs.NOTHING
    if value in ("ip", "api_key"):
        return value
    kind, _, arg = value.partition(":")
    if kind == "header" and _HEADER.match(arg):
        return value
    if kind == "claim" and arg:
        return value
    if _IMPORT.match(value):
        return value
    raise r.error(
        name, f"must be ip, api_key, header:NAME, claim:NAME or module:callable, got {value!r}"
    )


@section_check(RateLimitConfig)
def _rate_check(r: Reader, c: RateLimitConfig, failed: Any) -> None:
    if c.max is None and not failed.any("max"):  # type: ignore[comparison-overlap]
        raise r.error("max", "is required: the requests allowed per window")


@attrs.frozen
class RedisConfig:
    """The Redis shared by every gateway for ``rate_limit.backend: redis``."""

    url: Optional[str] = custom(None)
    pool_size: int = whole(4, minimum=1, maximum=256)
    connect_timeout: float = seconds(1.0, minimum=0.001, maximum=60.0)
    command_timeout: float = seconds(0.25, minimum=0.001, maximum=60.0)
    #: read the password from this file (it wins over the URL's).
    password_file: Optional[str] = text(None)
    #: read the password from this environment variable.
    password_env: Optional[str] = text(None)
    #: speak TLS (also implied by a ``rediss://`` URL).
    tls: bool = flag(False)
    key_prefix: str = text("bungate:rl:")


@custom_reader(RedisConfig, "url")
def _redis_url(r: Reader, name: str) -> Any:
    value = r.string(name, None)
    if value is None:
        return attrs.NOTHING
    parts = urlsplit(value)
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise r.error(name, f"must be a redis:// or rediss:// URL, got {value!r}")
    return value


# --- CORS, response headers, header rules -------------------------------------------------


@attrs.frozen
class CorsConfig:
    """Cross-origin requests: preflights answered by the gateway, headers on answers."""

    #: exact origins, ``*``, or ``~REGEX`` (matched against the whole origin).
    origins: tuple[str, ...] = custom(("*",))
    methods: tuple[str, ...] = strings(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"))
    headers: tuple[str, ...] = strings(())
    expose_headers: tuple[str, ...] = strings(())
    credentials: bool = flag(False)
    max_age: float = seconds(600.0, maximum=86400.0)


@custom_reader(CorsConfig, "origins")
def _origins(r: Reader, name: str) -> Any:
    raw = r.raw(name)
    if raw is None:
        return attrs.NOTHING
    value = (raw,) if isinstance(raw, str) else r.strings(name)
    if not value:
        raise r.error(name, "must list at least one origin, or *")
    for i, origin in enumerate(value):
        key = f"{r.key(name)}[{i}]"
        if origin.startswith("~"):
            try:
                re.compile(origin[1:])
            except re.error as e:
                raise ConfigError(r.source, key, f"is not a regular expression: {e}") from None
        elif origin != "*":
            parts = urlsplit(origin)
            if parts.scheme not in ("http", "https") or not parts.hostname or parts.path:
                raise ConfigError(
                    r.source, key, f"must be scheme://host[:port], * or ~regex, got {origin!r}"
                )
    return tuple(value)


@section_check(CorsConfig)
def _cors_check(r: Reader, c: CorsConfig, failed: Any) -> None:
    if c.credentials and "*" in c.origins and not failed.any("origins", "credentials"):
        raise r.error(
            "credentials",
            "cannot be true with origins: '*' (browsers refuse it, and echoing any origin "
            "with credentials would let every site read the answers): list the origins",
        )


@attrs.frozen
class SecurityHeadersConfig:
    """Headers every answer gets; each set to ``false`` or ``""`` to leave it out."""

    enabled: bool = flag(False)
    #: ``Strict-Transport-Security``, on TLS listeners only.
    hsts: str = custom("max-age=31536000; includeSubDomains")
    content_type_options: str = custom("nosniff")
    frame_options: str = custom("DENY")
    referrer_policy: str = custom("strict-origin-when-cross-origin")
    content_security_policy: str = custom("")


def _header_value(r: Reader, name: str) -> Any:
    raw = r.raw(name)
    if raw is None:
        return attrs.NOTHING
    if raw is False:
        return ""
    if not isinstance(raw, str) or any(c in raw for c in "\r\n\0"):
        raise r.error(name, f"must be a header value (one line) or false, got {raw!r}")
    return raw


for _name in (
    "hsts",
    "content_type_options",
    "frame_options",
    "referrer_policy",
    "content_security_policy",
):
    custom_reader(SecurityHeadersConfig, _name)(_header_value)


@attrs.frozen
class HeaderRules:
    """Headers changed on the way: ``remove`` first, then ``set`` (replace), then ``add``."""

    add: tuple[tuple[str, str], ...] = custom(())
    set: tuple[tuple[str, str], ...] = custom(())
    remove: tuple[str, ...] = custom(())


def _pairs(r: Reader, name: str) -> Any:
    raw = r.raw(name)
    if raw is None:
        return attrs.NOTHING
    if not isinstance(raw, Mapping):
        raise r.error(name, "must map header names to values")
    out = []
    for header, value in raw.items():
        key = f"{r.key(name)}.{header}"
        if not isinstance(header, str) or not _HEADER.match(header):
            raise ConfigError(r.source, key, f"{header!r} is not a header name")
        if header.lower() in _GATEWAY_HEADERS:
            raise ConfigError(r.source, key, f"{header} is managed by the gateway itself")
        if not isinstance(value, (str, int)) or any(c in str(value) for c in "\r\n\0"):
            raise ConfigError(r.source, key, f"must be a one-line value, got {value!r}")
        out.append((header, str(value)))
    return tuple(out)


custom_reader(HeaderRules, "add")(_pairs)
custom_reader(HeaderRules, "set")(_pairs)


@custom_reader(HeaderRules, "remove")
def _remove(r: Reader, name: str) -> Any:
    value = r.strings(name)
    if value is None:
        return attrs.NOTHING
    for i, header in enumerate(value):
        if not _HEADER.match(header):
            raise ConfigError(r.source, f"{r.key(name)}[{i}]", f"{header!r} is not a header name")
    return value


# --- reading a policy key: a section, or false ------------------------------------------------


def read_policy(r: Reader, name: str, cls: type) -> Any:
    """``name`` as ``cls``'s section, ``False`` for ``false``, or the default (absent)."""
    raw = r.raw(name)
    if raw is None:
        return attrs.NOTHING
    if raw is False:
        return OFF
    if raw is True and cls is SecurityHeadersConfig:
        return SecurityHeadersConfig(enabled=True)
    if not isinstance(raw, Mapping):
        raise r.error(name, f"must be a mapping, or false, got {raw!r}")
    return read_section(r.sub(name), cls)


Policy = Union[Any, bool, None]


def inherit(route_value: Any, default: Any) -> Any:
    """A route's policy: its own; none when it says ``false``; else the top level's."""
    if route_value is OFF:
        return None
    return route_value if route_value is not None else default


def _refuse(r: Reader, name: str, problem: str) -> Any:
    raise r.error(name, problem)
