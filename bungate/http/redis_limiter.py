"""
The rate-limit backend ``redis``: GCRA decisions shared by every gateway that uses one Redis.

Each decision is one server-side Lua script (:data:`GCRA_SCRIPT`) run atomically by
Redis on one key: it reads the key's TAT, applies :mod:`bungate.core.ratelimit`'s rule in
integer microseconds and writes the new TAT back, so two gateways never interleave on a
key and the limit is exact for the whole fleet. The clock is Redis's own (``TIME`` inside
the script), so the gateways' clocks do not matter; since Redis 5 scripts are replicated
by their effects (the ``SET``, not the script), so reading ``TIME`` in a script that
writes is allowed and replicas store the same TAT. Each write sets the key's expiry to
the bucket's life (``PX`` of ``TAT - now``): a key whose bucket is full again is gone,
so idle clients cost Redis nothing.

The script is loaded once with ``SCRIPT LOAD`` and run by its SHA-1 (``EVALSHA``). When
Redis answers ``NOSCRIPT`` (it restarted, or its script cache was flushed), the request
is run with ``EVAL``, which carries the script, and the script is loaded again.

When Redis is down, refuses the command, or does not answer within ``command_timeout``,
:meth:`RedisLimiter.decide` fails with :class:`RedisUnavailable` (at once while no
connection is up, after a first failure), and the caller applies its
``on_backend_error`` policy, :class:`FallbackPolicy`, which :func:`decide_or_fallback`
combines with the limiter. The connections are re-established in the background (backing
off from 0.1 s to :data:`RECONNECT_MAX_DELAY`), and the next decision after that goes to
Redis again: nothing to restart. A decision that timed out had been sent, and a server
that was only slow may still apply it: it then counts against the client's budget (never
for it), while the request itself was decided by the fallback.

Redis keys are ``<key_prefix><route>:<key_hash>``, the client key hashed
(:func:`~bungate.core.ratelimit.key_hash`, 16 hex digits) so that API keys are never
stored in Redis and keys have a bounded length.
"""

from __future__ import annotations

import hashlib
from typing import IO, Any, Optional, Protocol
from urllib.parse import unquote, urlsplit

import attrs
import txredisapi
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.ssl import optionsForClientTLS
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from bungate.core.ratelimit import MICROSECONDS, Decision, Rate, key_hash
from bungate.limit_table import LimitTable

__all__ = [
    "GCRA_SCRIPT",
    "ON_ERROR_ALLOW",
    "ON_ERROR_DENY",
    "RECONNECT_MAX_DELAY",
    "FallbackPolicy",
    "RedisAddress",
    "RedisLimiter",
    "RedisUnavailable",
    "decide_or_fallback",
    "parse_redis_url",
]

_log = Logger(namespace="bungate.ratelimit")

#: The longest wait between two attempts to reconnect to Redis (seconds).
RECONNECT_MAX_DELAY = 2.0
_RECONNECT_FIRST_DELAY = 0.1
#: ``on_backend_error: allow``: decide locally with the fallback limit.
ON_ERROR_ALLOW = "allow"
#: ``on_backend_error: deny``: refuse while Redis gives no decision.
ON_ERROR_DENY = "deny"
_FALLBACK_SLOTS = 4096

#: GCRA on one key (``KEYS[1]``), ``ARGV`` = emission interval T and capacity L in
#: microseconds, and the cost. Returns ``{allowed (0/1), remaining, reset_us,
#: retry_after_us}``. Integers are exact in Lua's doubles below 2**53; the divisions are
#: corrected so that they are exact integer divisions.
GCRA_SCRIPT = """\
if redis.replicate_commands then redis.replicate_commands() end
local interval = tonumber(ARGV[1])
local capacity = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local stored = tonumber(redis.call('GET', KEYS[1]) or '')
local base = now
if stored and stored > now then
  base = math.min(stored, now + capacity)
end
local function div(a, b)
  local q = math.floor(a / b)
  if q * b > a then q = q - 1 elseif (q + 1) * b <= a then q = q + 1 end
  return q
end
local new_tat = base + cost * interval
local allow_at = new_tat - capacity
if allow_at <= now then
  redis.call('SET', KEYS[1], string.format('%d', new_tat),
             'PX', math.ceil((new_tat - now) / 1000))
  return {1, div(now + capacity - new_tat, interval), new_tat - now, 0}
end
if stored ~= base then
  redis.call('SET', KEYS[1], string.format('%d', base), 'PX', math.ceil((base - now) / 1000))
end
return {0, div(now + capacity - base, interval), base - now, allow_at - now}
"""
_SCRIPT_SHA = hashlib.sha1(GCRA_SCRIPT.encode("utf-8")).hexdigest()


class RedisUnavailable(Exception):
    """
    Redis gave no decision: down, unreachable, too slow, or it refused the command.

    :param reason: what happened, for the log.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@attrs.frozen
class RedisAddress:
    """
    Where the Redis server is and how to log in, from a ``redis://`` URL.

    :param host: host name or address.
    :param port: TCP port.
    :param db: the database number (``SELECT``).
    :param username: the ACL user (Redis 6+), or ``None`` for the default user.
    :param password: the password, or ``None``.
    :param tls: whether to speak TLS (``rediss://``).
    """

    host: str
    port: int = 6379
    db: int = 0
    username: Optional[str] = None
    password: Optional[str] = attrs.field(default=None, repr=False)
    tls: bool = False


def parse_redis_url(url: str) -> RedisAddress:
    """
    Read ``redis://[[user]:password@]host[:port][/db]`` or the same with ``rediss://``.

    The user name and the password may be percent-encoded; an IPv6 address is written in
    brackets. The port defaults to 6379 and the database to 0.

    :param url: the URL.
    :returns: the address.
    :raises ValueError: for another scheme, a missing host, a bad port or database, or a
        query or fragment (not supported, rather than silently ignored).
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("redis", "rediss"):
        raise ValueError(f"a Redis URL starts with redis:// or rediss://, not {url!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"a Redis URL takes no query or fragment: {url!r}")
    host = parts.hostname
    if not host:
        raise ValueError(f"a Redis URL needs a host: {url!r}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"bad port in the Redis URL {url!r}") from None
    path = parts.path.strip("/")
    if path and not (path.isdigit() and path.isascii()):
        raise ValueError(f"the Redis database must be a number: {url!r}")
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    return RedisAddress(
        host=host,
        port=6379 if port is None else port,
        db=int(path) if path else 0,
        username=username,
        password=password,
        tls=scheme == "rediss",
    )


@implementer(IStreamClientEndpoint)
class _TLSEndpoint:
    """
    TLS around another endpoint, handing over the wrapped protocol itself.

    :func:`~twisted.internet.endpoints.wrapClientTLS` fires with the TLS protocol, and
    txredisapi's pool needs the Redis protocol inside it.
    """

    def __init__(self, creator: IOpenSSLClientConnectionCreator, wrapped: Any) -> None:
        self._endpoint: Any = wrapClientTLS(creator, wrapped)

    def connect(self, protocolFactory: IProtocolFactory) -> defer.Deferred[Any]:
        """
        Connect, then start TLS.

        :param protocolFactory: builds the Redis protocol.
        :returns: a Deferred firing with the Redis protocol.
        """
        d: defer.Deferred[Any] = self._endpoint.connect(protocolFactory)
        return d.addCallback(lambda tls: tls.wrappedProtocol)


class RedisLimiter:
    """
    GCRA decisions kept in Redis, exact across every gateway that shares it.

    :param url: ``redis://[[user]:password@]host:port/db``, or ``rediss://`` for TLS.
    :param pool_size: connections kept open (commands are spread over them).
    :param connect_timeout: seconds allowed to open one connection.
    :param command_timeout: seconds allowed for a decision, waiting for a connection
        included; past it :meth:`decide` fails with :class:`RedisUnavailable`.
    :param password: overrides the URL's password.
    :param key_prefix: prefix of every Redis key this limiter writes.
    :param tls: speak TLS even with a ``redis://`` URL.
    :param reactor: the running reactor (txredisapi schedules some of its own calls on
        the global one, so it must be that reactor).
    :param tls_options: how to check the server's certificate; by default against the
        platform's trusted authorities, for the URL's host name.
    :raises ValueError: for a bad URL or a pool size or timeout out of range.
    """

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 4,
        connect_timeout: float,
        command_timeout: float,
        password: Optional[str] = None,
        key_prefix: str = "bungate:rl:",
        tls: bool = False,
        reactor: IReactorTime,
        tls_options: Optional[IOpenSSLClientConnectionCreator] = None,
    ) -> None:
        address = parse_redis_url(url)
        if password is not None:
            address = attrs.evolve(address, password=password)
        if tls:
            address = attrs.evolve(address, tls=True)
        if pool_size < 1:
            raise ValueError(f"pool_size must be at least 1, not {pool_size}")
        if not connect_timeout > 0 or not command_timeout > 0:
            raise ValueError("connect_timeout and command_timeout must be more than 0")
        #: Where the server is.
        self.address = address
        #: Prefix of every Redis key this limiter writes.
        self.key_prefix = key_prefix
        self._reactor = reactor
        self._command_timeout = command_timeout
        #: Decisions that failed with :class:`RedisUnavailable` (for a metric).
        self.failures = 0
        #: Times the script was sent again after a ``NOSCRIPT`` (Redis restarted).
        self.script_reloads = 0
        self._down = False
        self._closed = False
        self._next = 0
        factory = txredisapi.RedisFactory(
            f"{address.host}:{address.port}",
            address.db or None,
            pool_size,
            isLazy=True,
            password=address.password,
            username=address.username,
            replyTimeout=command_timeout,
            convertNumbers=True,
        )
        factory.initialDelay = _RECONNECT_FIRST_DELAY
        factory.maxDelay = RECONNECT_MAX_DELAY
        endpoint: Any = HostnameEndpoint(
            reactor, address.host, address.port, timeout=connect_timeout
        )
        if address.tls:
            creator = tls_options or optionsForClientTLS(address.host)
            endpoint = _TLSEndpoint(creator, endpoint)
        # txredisapi fails this when it gives up for good (a wrong password, a database
        # that does not exist): say so once, rather than as an unhandled error.
        factory.deferred.addErrback(self._gave_up)
        factory.startConnecting(endpoint)
        self._factory = factory
        self._redis: Any = factory.handler
        # Load the script as soon as a connection is up; until then, or if this fails,
        # the first EVALSHA's NOSCRIPT loads it.
        self._redis.script_load(GCRA_SCRIPT).addErrback(lambda _: None)

    def _gave_up(self, failure: Failure) -> None:
        _log.error(
            "rate limit: gave up connecting to Redis at {host}:{port}: {error}",
            host=self.address.host,
            port=self.address.port,
            error=failure.getErrorMessage(),
        )

    def redis_key(self, route: str, key: bytes) -> str:
        """
        The Redis key that holds the TAT of ``key`` on ``route``.

        :param route: the route's name.
        :param key: the client key.
        :returns: ``<key_prefix><route>:<16 hex digits>``.
        """
        return f"{self.key_prefix}{route}:{key_hash(route, key):016x}"

    @property
    def connected(self) -> int:
        """
        Connections to Redis that are up now.

        :returns: from 0 to ``pool_size``.
        """
        return int(self._factory.size)

    def decide(self, route: str, key: bytes, rate: Rate, cost: int = 1) -> defer.Deferred[Decision]:
        """
        GCRA for one request of ``key`` on ``route``, decided by Redis.

        :param route: the route's name.
        :param key: what the route limits by.
        :param rate: the route's limit.
        :param cost: how many requests this one counts as, 1 to ``rate.burst``.
        :returns: a Deferred firing with the decision, or failing with
            :class:`RedisUnavailable` within ``command_timeout``.
        :raises ValueError: for a cost out of range.
        """
        if isinstance(cost, bool) or not isinstance(cost, int) or not 1 <= cost <= rate.burst:
            raise ValueError(
                f"cost must be an integer from 1 to the burst ({rate.burst}): {cost!r}"
            )
        if self._closed:
            return self._unavailable("the limiter is closed")
        if self._down and self._factory.size == 0:
            # Known down and still no connection: do not make the request wait.
            return self._unavailable("not connected")
        redis_key = self.redis_key(route, key)
        args = (rate.interval_us, rate.capacity_us, cost)
        d: defer.Deferred[Any]
        connection = self._connection()
        if connection is not None:
            # Straight onto a live connection (Redis pipelines commands on it): the
            # pool's wrapper would add an inlineCallbacks wait for a connection and a
            # second timer per command, about a fifth of this decision's CPU. The
            # protocol's own reply timeout (``command_timeout``) bounds the answer.
            d = connection.execute_command("EVALSHA", _SCRIPT_SHA, 1, redis_key, *args)
            d.addErrback(self._without_script, redis_key, args)
        else:  # none up yet (or all reconnecting): wait for one, within the timeout
            d = self._redis.evalsha(_SCRIPT_SHA, [redis_key], args)
            d.addErrback(self._without_script, redis_key, args)
            d.addTimeout(self._command_timeout, self._reactor)
        return d.addCallbacks(self._decided, self._failed, callbackArgs=(rate,))

    def _connection(self) -> Any:
        """A connected protocol of the pool, round robin; ``None`` when none is up."""
        pool = self._factory.pool
        count = len(pool)
        for _ in range(count):
            self._next = (self._next + 1) % count
            connection = pool[self._next]
            if connection.connected:
                return connection
        return None

    def _without_script(self, failure: Failure, redis_key: str, args: tuple[int, ...]) -> Any:
        """After a NOSCRIPT, run this request with EVAL and load the script again."""
        error = failure.value
        missing = isinstance(error, txredisapi.ScriptDoesNotExist) or (
            isinstance(error, txredisapi.ResponseError)
            and str(error.args[0] if error.args else "").startswith("NOSCRIPT")
        )
        if not missing:
            return failure
        self.script_reloads += 1
        self._redis.script_load(GCRA_SCRIPT).addErrback(lambda _: None)
        return self._redis.execute_command("EVAL", GCRA_SCRIPT, 1, redis_key, *args)

    def _decided(self, reply: Any, rate: Rate) -> Decision:
        self._down = False
        allowed, remaining, reset_us, retry_us = (int(n) for n in reply)
        return Decision(
            allowed=bool(allowed),
            limit=rate.max,
            remaining=remaining,
            reset=reset_us / MICROSECONDS,
            retry_after=retry_us / MICROSECONDS,
        )

    def _failed(self, failure: Failure) -> Decision:
        error = failure.value
        if isinstance(error, (defer.TimeoutError, defer.CancelledError, txredisapi.TimeoutError)):
            reason = f"no answer from Redis in {self._command_timeout}s"
        else:
            reason = f"{type(error).__name__}: {failure.getErrorMessage()}"
        if not isinstance(error, txredisapi.ResponseError):
            self._down = True  # not an answer: the connection or the server is at fault
        self.failures += 1
        raise RedisUnavailable(reason)

    def _unavailable(self, reason: str) -> defer.Deferred[Decision]:
        self.failures += 1
        return defer.fail(RedisUnavailable(reason))

    def close(self) -> defer.Deferred[None]:
        """
        Close the connections and stop reconnecting; decisions fail from now on.

        :returns: a Deferred firing once every connection is closed.
        """
        self._closed = True
        d: defer.Deferred[Any] = self._factory.disconnect()
        return d.addCallback(lambda _: None)


class Clock(Protocol):
    """What the fallback needs of a clock: wall-clock ``seconds()``, like the reactor's."""

    def seconds(self) -> float:
        """
        The current time.

        :returns: seconds since the epoch.
        """
        ...


class FallbackPolicy:
    """
    ``on_backend_error``: what a request gets while Redis gives no decision.

    - ``allow``: the request is decided locally, by GCRA in ``table`` (this machine's
      shared :class:`~bungate.limit_table.LimitTable`, or a private one), against
      ``rate`` if given, else the route's own rate. The limit then holds per machine
      instead of per fleet, but it still holds.
    - ``deny``: the request is refused, with ``Retry-After`` of one emission interval
      and ``RateLimit-Reset`` of one window (the real state is unknown).

    Each failure is counted in :attr:`failures` (for a metric) and logged at most once
    per ``log_interval`` seconds, with the number of failures since the last line.

    :param on_error: ``"allow"`` or ``"deny"``.
    :param clock: wall-clock ``seconds()`` (the reactor).
    :param table: where the local fallback limit is kept; ``None``: a private table of
        4096 slots, made on first use.
    :param rate: the fallback limit for every route; ``None``: each route's own rate.
    :param log_interval: seconds between two log lines about the outage.
    :raises ValueError: for an ``on_error`` that is neither.
    """

    def __init__(
        self,
        on_error: str,
        *,
        clock: Clock,
        table: Optional[LimitTable] = None,
        rate: Optional[Rate] = None,
        log_interval: float = 60.0,
    ) -> None:
        if on_error not in (ON_ERROR_ALLOW, ON_ERROR_DENY):
            raise ValueError(f"on_backend_error must be 'allow' or 'deny', not {on_error!r}")
        self.on_error = on_error
        self.rate = rate
        self.log_interval = log_interval
        #: Requests decided by this policy because Redis gave no decision.
        self.failures = 0
        self._clock = clock
        self._table = table
        self._private: Optional[IO[bytes]] = None
        self._logged_at: Optional[float] = None
        self._unreported = 0
        self._since_success = 0

    def decide(self, route: str, key: bytes, rate: Rate, error: BaseException) -> Decision:
        """
        The decision for a request whose Redis decision failed.

        :param route: the route's name.
        :param key: the client key.
        :param rate: the route's limit.
        :param error: why Redis gave no decision (for the log).
        :returns: the local decision (``allow``) or a refusal (``deny``).
        """
        now = self._clock.seconds()
        self.failures += 1
        self._unreported += 1
        self._since_success += 1
        if self._logged_at is None or now - self._logged_at >= self.log_interval:
            _log.warn(
                "rate limit: Redis gave no decision ({error}); on_backend_error={policy} "
                "applied to {count} request(s) since the last report",
                error=str(error),
                policy=self.on_error,
                count=self._unreported,
            )
            self._logged_at = now
            self._unreported = 0
        if self.on_error == ON_ERROR_DENY:
            return Decision(
                allowed=False,
                limit=rate.max,
                remaining=0,
                reset=rate.window,
                retry_after=rate.emission_interval,
            )
        return self._local().decide(route, key, self.rate or rate, now)

    def succeeded(self) -> None:
        """Redis decided again: log the end of the outage once."""
        if self._since_success:
            _log.info(
                "rate limit: Redis decides again, after {count} request(s) decided by "
                "on_backend_error={policy}",
                count=self._since_success,
                policy=self.on_error,
            )
            self._since_success = 0
            self._logged_at = None

    def _local(self) -> LimitTable:
        if self._table is None:
            self._table, self._private = LimitTable.create(slots=_FALLBACK_SLOTS, stripes=1)
        return self._table

    def close(self) -> None:
        """Release the private table, if one was made."""
        if self._private is not None and self._table is not None:
            self._table.close()
            self._private.close()
            self._table = self._private = None


def decide_or_fallback(
    limiter: RedisLimiter, fallback: FallbackPolicy, route: str, key: bytes, rate: Rate
) -> defer.Deferred[Decision]:
    """
    Ask Redis, and apply ``fallback`` when it gives no decision.

    :param limiter: the Redis backend.
    :param fallback: the route's ``on_backend_error`` policy.
    :param route: the route's name.
    :param key: the client key.
    :param rate: the route's limit.
    :returns: a Deferred that always fires with a decision.
    """

    def decided(decision: Decision) -> Decision:
        fallback.succeeded()
        return decision

    def unavailable(failure: Failure) -> Any:
        if not isinstance(failure.value, RedisUnavailable):
            return failure
        return fallback.decide(route, key, rate, failure.value)

    return limiter.decide(route, key, rate).addCallbacks(decided, unavailable)
