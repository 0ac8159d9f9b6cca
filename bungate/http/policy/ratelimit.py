"""
The ``rate_limit`` policy of a route: which client a request counts for, whether it may
pass, and what the answer tells the client (internal).

One :class:`RateLimits` per worker process holds the backends: the fleet's shared
:class:`~bungate.limit_table.LimitTable` for ``backend: local`` (exact across the workers
of one master) and one :class:`~bungate.http.redis_limiter.RedisLimiter` for ``backend:
redis`` (exact across every gateway sharing the Redis), made only when a route uses it,
with a :class:`~bungate.http.redis_limiter.FallbackPolicy` per ``on_backend_error``. The
dispatcher asks it once per limited route for a :class:`RouteLimit`, and for each request:

1. :meth:`RouteLimit.key_of` ``(request, identity)``: the client key, or ``None`` (a
   ``module:callable`` key said the request is not limited);
2. :meth:`RouteLimit.decide` ``(key)``: a :class:`~bungate.core.ratelimit.Decision`, at
   once for ``local``, as a Deferred for ``redis`` (one that always fires with a
   decision: the fallback decides while Redis does not);
3. if allowed, :meth:`RouteLimit.headers` for the answer; if refused,
   :meth:`RouteLimit.refusal`: ``429`` with its headers and JSON body.

Keys, by ``rate_limit.key``:

- ``ip``: the client address as ``request.getClientAddress().host`` gives it (the
  dispatcher makes that the real client behind trusted proxies); no address: the
  anonymous bucket;
- ``header:NAME``: the header's value (several lines of it joined with ``,``, as one
  field value);
- ``claim:NAME``: the claim of the caller's verified token (``identity.claims``): a string
  as it is, a number or boolean as JSON, anything else as canonical JSON;
- ``api_key``: the name of the caller's API key (``identity.subject`` when
  ``identity.kind == "api_key"``), so every key of one name shares its budget;
- ``module:callable``: ``f(request, identity)`` returning ``str`` or ``bytes`` (the
  key), or ``None`` (this request is not limited). Resolved when the limits are built
  (an import that fails is a :class:`~bungate.config.ConfigError` naming the key). An
  exception it raises, or a result of another type, is logged and counted
  (:attr:`RouteLimit.key_errors`) and the request counts for the anonymous bucket.

**The anonymous bucket.** A request that lacks what its route limits by (no header, no
such claim, no API key, no identity at all) counts for one bucket shared by all such
requests of the route, the key ``b""``: omitting the header must not be a way around the
limit. A route keyed on a header or a claim that legitimate clients may lack should say
so with a ``module:callable`` key that returns ``None`` for them.

Answers follow the IETF ``RateLimit`` header fields draft as most clients read it:
``RateLimit-Limit`` (the rate's ``max``), ``RateLimit-Remaining`` (requests that would
pass now), ``RateLimit-Reset`` (whole seconds until the bucket is full, rounded up), and
on a refusal ``Retry-After`` (whole seconds, rounded up, at least 1: a client that waits
that long is allowed). ``rate_limit.headers: false`` leaves them off allowed answers; a
``429`` always has them.

Times: ``local`` decisions use wall-clock time (``time.time()``, the clock every worker
of the machine shares; the table holds absolute times), ``redis`` ones Redis's own clock.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from typing import IO, Any, Callable, Optional, Protocol, Union

from twisted.internet import defer
from twisted.logger import Logger

from bungate.config import ConfigError, GatewayConfig
from bungate.config.policy import RateLimitConfig, RedisConfig, inherit
from bungate.core.ratelimit import MICROSECONDS, Decision, Rate
from bungate.http.handlers import resolve_handler
from bungate.http.redis_limiter import (
    Clock,
    FallbackPolicy,
    RedisLimiter,
    decide_or_fallback,
)
from bungate.limit_table import LimitTable

__all__ = [
    "ANONYMOUS",
    "STATUS",
    "Identity",
    "KeyFunction",
    "RateLimits",
    "RouteLimit",
    "check_rate_limits",
    "limited_routes",
    "redis_password",
    "retry_after",
    "whole_seconds",
]

_log = Logger(namespace="bungate.ratelimit")

#: The key of the requests that lack what their route limits by (one shared bucket).
ANONYMOUS = b""
#: The status of a refused request.
STATUS = 429
#: What a route's key is computed by: ``f(request, identity)``.
KeyFunction = Callable[[Any, Any], Optional[bytes]]

_LOCAL = "local"
_REDIS = "redis"


class Identity(Protocol):
    """
    What the ``claim:NAME`` and ``api_key`` keys read of the caller the auth policy found
    (read with :func:`getattr`, so any object with these attributes will do).
    """

    #: how the caller proved who it is: ``"api_key"``, ``"jwt"``...
    kind: str
    #: the caller's name: the API key's name, the token's ``sub``.
    subject: Optional[str]
    #: the verified token's claims, or ``None`` (an API key has none).
    claims: Optional[Mapping[str, Any]]


class _WallClock:
    """``time.time()`` as a :class:`~bungate.http.redis_limiter.Clock`."""

    def seconds(self) -> float:
        """
        The current time.

        :returns: seconds since the epoch.
        """
        return time.time()


def whole_seconds(seconds: float) -> int:
    """
    A duration in whole seconds, rounded up (to the microsecond first, so that a float
    such as ``6.000000000001`` is 6, not 7).

    :param seconds: the duration, not negative.
    :returns: the smallest whole number of seconds at least as long.
    """
    us = max(0, round(seconds * MICROSECONDS))
    return -(-us // MICROSECONDS)


def limited_routes(config: GatewayConfig) -> list[tuple[int, str, RateLimitConfig]]:
    """
    The routes of ``config`` that have a rate limit, their own or the top level's.

    :param config: the validated config.
    :returns: ``(index, key, limit)`` for each, ``key`` being where the limit was
        written (``routes[3].rate_limit`` or ``rate_limit``), for messages.
    """
    out = []
    for index, route in enumerate(config.routes):
        limit = inherit(route.rate_limit, config.rate_limit)
        if isinstance(limit, RateLimitConfig):
            own = isinstance(route.rate_limit, RateLimitConfig)
            out.append((index, f"routes[{index}].rate_limit" if own else "rate_limit", limit))
    return out


def redis_password(redis: RedisConfig, source: str) -> Optional[str]:
    """
    The Redis password from ``redis.password_file`` or ``redis.password_env``.

    The file's content is the password, without its final line break.

    :param redis: the ``redis`` section.
    :param source: where the config was read from, for errors.
    :returns: the password, or ``None`` when neither is set (the URL's, if any, is used).
    :raises ConfigError: naming the key, when both are set, the file cannot be read or
        is empty, or the variable is not set or empty.
    """
    if redis.password_file is not None and redis.password_env is not None:
        raise ConfigError(
            source, "redis.password_env", "give password_file or password_env, not both"
        )
    if redis.password_file is not None:
        try:
            with open(redis.password_file, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            problem = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise ConfigError(
                source,
                "redis.password_file",
                f"cannot read {redis.password_file!r}: {problem}",
            ) from None
        password = text[:-1] if text.endswith("\n") else text
        password = password[:-1] if password.endswith("\r") else password
        if not password:
            raise ConfigError(source, "redis.password_file", f"{redis.password_file!r} is empty")
        return password
    if redis.password_env is not None:
        value = os.environ.get(redis.password_env)
        if not value:
            raise ConfigError(
                source,
                "redis.password_env",
                f"the environment variable {redis.password_env} is not set or empty",
            )
        return value
    return None


def _key_function(spec: str, source: str, where: str) -> KeyFunction:
    """The function computing a route's key from the request and the caller."""
    if spec == "ip":
        return _by_address
    if spec == "api_key":
        return _by_api_key
    kind, _, name = spec.partition(":")
    if kind == "header":
        header = name.lower().encode("latin-1")
        return lambda request, identity: _by_header(request, header)
    if kind == "claim":
        return lambda request, identity: _by_claim(identity, name)
    try:
        user = resolve_handler(spec)
    except ValueError as e:
        raise ConfigError(source, f"{where}.key", str(e)) from None
    return lambda request, identity: _user_key(user, request, identity)


def check_rate_limits(config: GatewayConfig) -> None:
    """
    What the rate limits of ``config`` need before a worker serves it, checked without
    connecting anywhere: every ``module:callable`` key imports, and with a ``redis``
    backend, ``redis.url`` is set and the password can be read.

    :param config: the validated config.
    :raises ConfigError: naming the key of the first problem.
    """
    redis = False
    for _index, where, limit in limited_routes(config):
        _key_function(limit.key, config.source, where)
        redis = redis or limit.backend == _REDIS
    if redis:
        _redis_settings(config)


def _redis_settings(config: GatewayConfig) -> tuple[str, Optional[str]]:
    url = config.redis.url
    if url is None:
        raise ConfigError(config.source, "redis.url", "is required by rate_limit.backend: redis")
    return url, redis_password(config.redis, config.source)


class RateLimits:
    """
    The rate-limit backends of one process, shared by its routes.

    Building it checks every limit of ``config`` (:func:`check_rate_limits`) and, if a
    route uses ``backend: redis``, starts connecting to Redis.

    :param config: the validated config; its ``redis`` section configures the Redis
        backend, its routes say which backends are needed now (a route added later with
        a backend not yet made makes it in :meth:`for_route`).
    :param reactor: the running reactor (the Redis client's).
    :param table: the fleet's shared table (the worker's inherited one, or a single
        process's own); ``None``: a private table, made when a route needs it (its limits
        are then this process's alone).
    :param clock: wall-clock ``seconds()`` for ``local`` decisions and the fallback;
        default ``time.time()``.
    :param redis_limiter: a Redis backend to use instead of one made from
        ``config.redis`` (this object closes it in :meth:`close` all the same).
    :raises ConfigError: naming the key, for a key that cannot be imported, a missing
        or unusable ``redis.url`` or an unreadable Redis password.
    """

    def __init__(
        self,
        config: GatewayConfig,
        reactor: Any,
        table: Optional[LimitTable],
        *,
        clock: Optional[Clock] = None,
        redis_limiter: Optional[RedisLimiter] = None,
    ) -> None:
        self.config = config
        self.reactor = reactor
        self.clock: Clock = clock if clock is not None else _WallClock()
        self._table = table
        self._private: Optional[IO[bytes]] = None
        self._redis = redis_limiter
        self._fallbacks: dict[str, FallbackPolicy] = {}
        #: every :class:`RouteLimit` made, by route name (the last one of a name).
        self.routes: dict[str, RouteLimit] = {}
        self._closed = False
        check_rate_limits(config)
        # local first: a private table, if one is made, is then the fallback's too
        limits = [limit for _, _, limit in limited_routes(config)]
        for limit in sorted(limits, key=lambda limit: limit.backend == _REDIS):
            self._backend(limit)

    # --- backends -----------------------------------------------------------------------

    @property
    def table(self) -> Optional[LimitTable]:
        """
        The table ``local`` limits are decided on, once one is needed or if shared.

        :returns: the table, or ``None``.
        """
        return self._table

    @property
    def redis(self) -> Optional[RedisLimiter]:
        """
        The Redis backend, once a route uses it.

        :returns: the limiter, or ``None``.
        """
        return self._redis

    def _local(self) -> LimitTable:
        if self._table is None:
            self._table, self._private = LimitTable.create()
        return self._table

    def _redis_limiter(self) -> RedisLimiter:
        if self._redis is None:
            url, password = _redis_settings(self.config)
            redis = self.config.redis
            try:
                self._redis = RedisLimiter(
                    url,
                    pool_size=redis.pool_size,
                    connect_timeout=redis.connect_timeout,
                    command_timeout=redis.command_timeout,
                    password=password,
                    key_prefix=redis.key_prefix,
                    tls=redis.tls,
                    reactor=self.reactor,
                )
            except ValueError as e:
                raise ConfigError(self.config.source, "redis.url", str(e)) from None
        return self._redis

    def _fallback(self, on_error: str) -> FallbackPolicy:
        policy = self._fallbacks.get(on_error)
        if policy is None:
            # The shared table, when there is one: while Redis is down, the limit then
            # holds per machine (every worker of it together), not per worker.
            policy = FallbackPolicy(on_error, clock=self.clock, table=self._table)
            self._fallbacks[on_error] = policy
        return policy

    def _backend(self, limit: RateLimitConfig) -> None:
        if self._closed:
            raise RuntimeError("the rate limits are closed")
        if limit.backend == _REDIS:
            self._redis_limiter()
            self._fallback(limit.on_backend_error)
        else:
            self._local()

    # --- routes -------------------------------------------------------------------------

    def for_route(
        self, route_name: str, limit: RateLimitConfig, *, where: str = "rate_limit"
    ) -> RouteLimit:
        """
        The policy of one route.

        :param route_name: the route's name: part of every key stored, so it must be the
            same in every worker and on every gateway sharing a Redis, and differ between
            routes (e.g. ``f"{index}:{pattern}"``).
        :param limit: the route's effective limit (:func:`~bungate.config.policy.inherit`).
        :param where: where ``limit`` was written, for the message of a bad key.
        :returns: the route's policy.
        :raises ConfigError: as for the constructor.
        """
        key = _key_function(limit.key, self.config.source, where)
        self._backend(limit)
        route = RouteLimit(self, route_name, limit, key)
        self.routes[route_name] = route
        return route

    # --- counts -------------------------------------------------------------------------

    @property
    def refused(self) -> int:
        """
        Requests refused so far, by every route.

        :returns: the count.
        """
        return sum(r.refused for r in self.routes.values())

    @property
    def backend_failures(self) -> int:
        """
        Requests decided by ``on_backend_error`` because Redis gave no decision.

        :returns: the count.
        """
        return sum(p.failures for p in self._fallbacks.values())

    @property
    def evictions(self) -> int:
        """
        Live keys this process evicted from the table (its probe sequence was full).

        :returns: the count.
        """
        return self._table.evictions if self._table is not None else 0

    # --- closing ------------------------------------------------------------------------

    def close(self) -> defer.Deferred[None]:
        """
        Close the Redis connections, and the private tables (a shared one is left to
        its owner). Decisions must not be asked for afterwards.

        :returns: a Deferred firing once the Redis connections are closed.
        """
        if self._closed:
            return defer.succeed(None)
        self._closed = True
        for policy in self._fallbacks.values():
            policy.close()
        if self._private is not None and self._table is not None:
            self._table.close()
            self._private.close()
            self._table = self._private = None
        if self._redis is not None:
            return self._redis.close()
        return defer.succeed(None)


class RouteLimit:
    """
    One route's rate limit: made by :meth:`RateLimits.for_route`.

    :param limits: the process's backends.
    :param name: the route's name.
    :param config: the route's ``rate_limit``.
    :param key: computes the client key.
    """

    def __init__(
        self, limits: RateLimits, name: str, config: RateLimitConfig, key: KeyFunction
    ) -> None:
        #: the route's name (in the keys stored).
        self.name = name
        #: the route's ``rate_limit``.
        self.config = config
        #: the limit itself.
        self.rate = Rate(config.max, config.window, config.burst)
        #: ``"local"`` or ``"redis"``.
        self.backend = config.backend
        #: requests allowed so far.
        self.allowed = 0
        #: requests refused so far (a ``deny`` fallback's refusals included).
        self.refused = 0
        #: requests whose ``module:callable`` key failed (they used the anonymous bucket).
        self.key_errors = 0
        self._limits = limits
        self._key = key
        self._clock = limits.clock
        if config.backend == _REDIS:
            self._redis: Optional[RedisLimiter] = limits._redis_limiter()
            self._fallback: Optional[FallbackPolicy] = limits._fallback(config.on_backend_error)
            self._table: Optional[LimitTable] = None
        else:
            self._redis = self._fallback = None
            self._table = limits._local()

    @property
    def send_headers(self) -> bool:
        """
        Whether allowed answers carry the ``RateLimit-*`` headers (``rate_limit.headers``;
        a refusal always does).

        :returns: the route's setting.
        """
        return self.config.headers

    def key_of(self, request: Any, identity: Optional[Any] = None) -> Optional[bytes]:
        """
        The client key of ``request`` (see the module's documentation).

        :param request: the request (``getClientAddress()``, ``requestHeaders``).
        :param identity: the caller the auth policy found (:class:`Identity`), or ``None``.
        :returns: the key (:data:`ANONYMOUS` when the request lacks what the route limits
            by), or ``None`` when a ``module:callable`` key exempts the request.
        """
        try:
            return self._key(request, identity)
        except Exception:
            self.key_errors += 1
            _log.failure(
                "rate limit: the key {key} of route {route} failed; the request counts "
                "for the anonymous bucket",
                key=self.config.key,
                route=self.name,
            )
            return ANONYMOUS

    def decide(self, key: bytes) -> Union[Decision, defer.Deferred[Decision]]:
        """
        Whether one more request of ``key`` may pass.

        :param key: the client key (:meth:`key_of`).
        :returns: the decision (``local``), or a Deferred that always fires with one
            (``redis``: the ``on_backend_error`` fallback decides when Redis does not).
        """
        if self._table is not None:
            return self._count(self._table.decide(self.name, key, self.rate, self._clock.seconds))
        assert self._redis is not None and self._fallback is not None
        d = decide_or_fallback(self._redis, self._fallback, self.name, key, self.rate)
        return d.addCallback(self._count)

    def _count(self, decision: Decision) -> Decision:
        if decision.allowed:
            self.allowed += 1
        else:
            self.refused += 1
        return decision

    def headers(self, decision: Decision) -> list[tuple[bytes, bytes]]:
        """
        The ``RateLimit-*`` headers for an answer decided by ``decision``, and
        ``Retry-After`` on a refusal; none on an allowed answer with ``headers: false``.

        :param decision: the request's decision.
        :returns: ``(name, value)`` pairs, names in lower case.
        """
        if decision.allowed and not self.config.headers:
            return []
        out = [
            (b"ratelimit-limit", b"%d" % decision.limit),
            (b"ratelimit-remaining", b"%d" % max(0, decision.remaining)),
            (b"ratelimit-reset", b"%d" % whole_seconds(decision.reset)),
        ]
        if not decision.allowed:
            out.append((b"retry-after", b"%d" % retry_after(decision)))
        return out

    def refusal(
        self, decision: Decision, request_id: Union[bytes, str, None] = None
    ) -> tuple[int, list[tuple[bytes, bytes]], dict[str, Any]]:
        """
        The answer to a refused request.

        :param decision: its decision (not allowed).
        :param request_id: the request's id, if any, for the body.
        :returns: ``(429, headers, body)``: the headers of :meth:`headers`, and the JSON
            body ``{"error": "rate_limited", "retry_after": n, "request_id": ...}``
            (``request_id`` left out when there is none).
        """
        body: dict[str, Any] = {"error": "rate_limited", "retry_after": retry_after(decision)}
        if isinstance(request_id, bytes):
            request_id = request_id.decode("latin-1")
        if request_id:
            body["request_id"] = request_id
        return STATUS, self.headers(decision), body


def retry_after(decision: Decision) -> int:
    """
    ``Retry-After`` for a refused request: whole seconds, rounded up, at least 1.

    :param decision: the refusal.
    :returns: seconds.
    """
    return max(1, whole_seconds(decision.retry_after))


# --- the keys -----------------------------------------------------------------------------


def _by_address(request: Any, identity: Any) -> bytes:
    host = getattr(request.getClientAddress(), "host", None)
    if isinstance(host, bytes):
        return host
    return str(host).encode("utf-8") if host else ANONYMOUS


def _by_header(request: Any, header: bytes) -> bytes:
    values = request.requestHeaders.getRawHeaders(header)
    if not values:
        return ANONYMOUS
    return b",".join(v if isinstance(v, bytes) else str(v).encode("utf-8") for v in values)


def _by_claim(identity: Any, name: str) -> bytes:
    claims = getattr(identity, "claims", None)
    if not isinstance(claims, Mapping):
        return ANONYMOUS
    value = claims.get(name)
    if value is None:
        return ANONYMOUS
    if isinstance(value, str):
        return value.encode("utf-8")
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str).encode("utf-8")


def _by_api_key(request: Any, identity: Any) -> bytes:
    if getattr(identity, "kind", None) != "api_key":
        return ANONYMOUS
    subject = getattr(identity, "subject", None)
    return subject.encode("utf-8") if isinstance(subject, str) and subject else ANONYMOUS


def _user_key(user: Callable[..., Any], request: Any, identity: Any) -> Optional[bytes]:
    value = user(request, identity)
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    raise TypeError(f"a rate-limit key must be str, bytes or None, not {type(value).__name__}")
