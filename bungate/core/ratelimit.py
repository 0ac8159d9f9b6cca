"""
Rate limiting by GCRA, the generic cell rate algorithm: one stored number per key.

A :class:`Rate` of ``max`` requests per ``window`` seconds, with bursts of up to
``burst`` requests, is enforced by remembering for each key a single time, its
*theoretical arrival time* (TAT): the moment the key's bucket will be full again if no
more requests arrive. Every allowed request pushes the TAT one emission interval
``T = window / max`` further; a request is refused when it would push the TAT more than
``burst * T`` beyond now. This is the leaky bucket, computed in closed form instead of by
a counter that drains, so a decision is a read, a comparison and a write of one number.

Why GCRA rather than a counter per window: a fixed window lets ``max`` requests through
at the end of one window and ``max`` more at the start of the next, twice the limit in an
instant; a sliding window needs a log or two counters per key. GCRA bounds every interval
(at most ``burst + t * max / window`` requests in any ``t`` seconds), stores one 64-bit
number per key, refills smoothly, and a refused request costs nothing.

The exact formulation (all times in integer microseconds, see below)::

    T        = ceil(window_us / max)          # emission interval
    L        = burst * T                      # bucket capacity, as time
    base     = max(TAT, now)                  # an absent key has TAT = now
    base     = min(base, now + L)             # the clock went back: bucket empty, no worse
    new_TAT  = base + cost * T
    allowed  = new_TAT - L <= now             # i.e. base - now <= (burst - cost) * T
    store      new_TAT if allowed, else base (TAT unchanged unless the clock went back)

which for ``cost = 1`` is the textbook virtual-scheduling test ``TAT - now <= tau`` with
tolerance ``tau = (burst - 1) * T``. From the same numbers:

- ``remaining = (now + L - TAT') // T`` with ``TAT'`` the TAT after the decision: the
  requests that would be allowed right now;
- ``reset = TAT' - now``: seconds until the bucket is full (0 when it is);
- ``retry_after = new_TAT - L - now`` when refused: the first instant this request would
  be allowed (0 when allowed).

Time is counted in whole microseconds and the arithmetic is on integers, so the
decisions are exact (the ``burst``-th request in one instant is never refused by a
rounding of ``T + T + ...``) and the same in Python and in the Redis script
(:mod:`bungate.http.redis_limiter`), whose Lua numbers hold integers exactly up to
2**53 microseconds (285 years). ``window`` is taken to the microsecond and ``T`` is
rounded *up*, so the enforced rate is never above the configured one (it is below by at
most one microsecond per request).

A key whose TAT is in the past is in the same state as an absent key, so a store can
forget it: with the default ``burst = max``, a key idle for ``window`` seconds is
reset to a full bucket (in general after ``burst * T`` seconds).

Pure logic: standard library and attrs only, the clock is passed in.
"""

from __future__ import annotations

import hashlib
import math
from typing import Optional

import attrs

__all__ = [
    "MICROSECONDS",
    "Decision",
    "Rate",
    "decide",
    "decide_us",
    "key_hash",
    "seconds_to_us",
]

#: Microseconds in a second: the unit of the integer times of :func:`decide_us`.
MICROSECONDS = 1_000_000
# A bucket spanning more than this many microseconds (71 years) is refused, so that
# "now + capacity" stays exact in a double (the Redis script) for centuries of wall time.
_MAX_CAPACITY_US = 2**51


def seconds_to_us(seconds: float) -> int:
    """
    A time in seconds as whole microseconds (to the nearest).

    :param seconds: a time or a duration in seconds.
    :returns: the nearest whole number of microseconds.
    """
    return round(seconds * MICROSECONDS)


def _stored_tat_to_us(tat: float) -> int:
    """
    Inverse of ``tat_us / MICROSECONDS`` exactly, for a TAT that :func:`decide` returned.

    ``round(x * 10**6)`` can miss by one for wall-clock times after 2041 (the product is
    rounded), so the neighbours are tried: ``k / 10**6`` is distinct for every ``k`` below
    2**53, and only the right one gives back ``tat``.
    """
    guess = round(tat * MICROSECONDS)
    if guess / MICROSECONDS == tat:
        return guess
    for candidate in (guess - 1, guess + 1):
        if candidate / MICROSECONDS == tat:
            return candidate
    return guess


def _check_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"rate {name} must be an integer, not {value!r}")
    if value < 1:
        raise ValueError(f"rate {name} must be at least 1, not {value}")
    return value


@attrs.frozen(init=False)
class Rate:
    """
    A limit: ``max`` requests per ``window`` seconds, in bursts of up to ``burst``.

    :param max: requests per window, at least 1.
    :param window: the window in seconds, more than 0 (taken to the microsecond).
    :param burst: the most requests allowed at one instant from a full bucket, at
        least 1; ``None`` (the default) means ``max``.
    :raises ValueError: for a value out of range.
    :raises TypeError: for a count that is not an integer.
    """

    #: Requests per window.
    max: int
    #: The window, in seconds.
    window: float
    #: The most requests at one instant.
    burst: int
    #: The emission interval ``T`` in whole microseconds: ``ceil(window_us / max)``.
    interval_us: int

    def __init__(self, max: int, window: float, burst: Optional[int] = None) -> None:
        max = _check_count("max", max)
        burst = max if burst is None else _check_count("burst", burst)
        if isinstance(window, bool) or not isinstance(window, (int, float)):
            raise TypeError(f"rate window must be a number of seconds, not {window!r}")
        if not math.isfinite(window) or window <= 0:
            raise ValueError(f"rate window must be more than 0 seconds, not {window}")
        window_us = seconds_to_us(window)
        if window_us < 1:
            raise ValueError(f"rate window must be at least one microsecond, not {window}")
        interval_us = -(-window_us // max)
        if burst * interval_us > _MAX_CAPACITY_US:
            raise ValueError(f"rate burst * window / max is too long ({burst} * {window}/{max})")
        self.__attrs_init__(max, float(window), burst, interval_us)

    @property
    def emission_interval(self) -> float:
        """
        ``T``, the time one request uses up.

        :returns: seconds between requests at the sustained rate.
        """
        return self.interval_us / MICROSECONDS

    @property
    def tolerance(self) -> float:
        """
        ``tau = (burst - 1) * T``, how far ahead of now a TAT may be for a request to pass.

        :returns: seconds.
        """
        return (self.burst - 1) * self.interval_us / MICROSECONDS

    @property
    def capacity_us(self) -> int:
        """
        ``L = burst * T``, the bucket as time: an idle key is fully reset after it.

        :returns: microseconds.
        """
        return self.burst * self.interval_us


@attrs.frozen
class Decision:
    """
    The verdict on one request, with what the ``RateLimit-*`` headers tell the client.

    :param allowed: whether the request may pass.
    :param limit: the rate's ``max``, for ``RateLimit-Limit``.
    :param remaining: requests (of cost 1) that would be allowed right now, after this
        one, for ``RateLimit-Remaining``.
    :param reset: seconds until the bucket is full again, for ``RateLimit-Reset``.
    :param retry_after: seconds until this request would be allowed (0 when allowed),
        for ``Retry-After``.
    """

    allowed: bool
    limit: int
    remaining: int
    reset: float
    retry_after: float


def decide_us(rate: Rate, tat: Optional[int], now: int, cost: int = 1) -> tuple[Decision, int]:
    """
    GCRA on integer microseconds (the module's formulation; exact).

    :param rate: the limit.
    :param tat: the key's stored theoretical arrival time, or ``None`` for a key never
        seen (or forgotten: same thing).
    :param now: the current time.
    :param cost: how many requests this one counts as, 1 to ``rate.burst``.
    :returns: the decision and the TAT to store: the new one when allowed; when refused
        the stored one, unchanged (moved back to ``now + L`` if the clock went back).
    :raises ValueError: for a cost out of range.
    """
    if isinstance(cost, bool) or not isinstance(cost, int) or not 1 <= cost <= rate.burst:
        raise ValueError(f"cost must be an integer from 1 to the burst ({rate.burst}): {cost!r}")
    interval = rate.interval_us
    capacity = rate.burst * interval
    if tat is None or tat < now:
        base = now
    elif tat > now + capacity:
        base = now + capacity
    else:
        base = tat
    new_tat = base + cost * interval
    allow_at = new_tat - capacity
    if allow_at <= now:
        return (
            Decision(
                allowed=True,
                limit=rate.max,
                remaining=(now + capacity - new_tat) // interval,
                reset=(new_tat - now) / MICROSECONDS,
                retry_after=0.0,
            ),
            new_tat,
        )
    return (
        Decision(
            allowed=False,
            limit=rate.max,
            remaining=(now + capacity - base) // interval,
            reset=(base - now) / MICROSECONDS,
            retry_after=(allow_at - now) / MICROSECONDS,
        ),
        base,
    )


def decide(rate: Rate, tat: Optional[float], now: float, cost: int = 1) -> tuple[Decision, float]:
    """
    GCRA on times in seconds: :func:`decide_us` with the times taken to the microsecond.

    :param rate: the limit.
    :param tat: the TAT this function returned for the key last time, or ``None``.
    :param now: the current time in seconds (any clock, the same for every call on a key).
    :param cost: how many requests this one counts as, 1 to ``rate.burst``.
    :returns: the decision and the TAT to store (unchanged when refused). A request made
        at ``now + decision.retry_after`` is allowed, one a microsecond earlier is not.
    :raises ValueError: for a cost out of range.
    """
    stored = None if tat is None else _stored_tat_to_us(tat)
    decision, new_tat = decide_us(rate, stored, seconds_to_us(now), cost)
    return decision, new_tat / MICROSECONDS


def key_hash(route: str, key: bytes) -> int:
    """
    A stable 63-bit hash of a route and a client key, the same in every process.

    (BLAKE2b, not :func:`hash`, which is salted per process.) Two different pairs share
    a hash with a probability of about ``n**2 / 2**64`` for ``n`` live keys, in which
    case they share a budget.

    :param route: the route's name.
    :param key: what the route limits by (a client address, an API key...).
    :returns: an integer from 1 to ``2**63 - 1`` (never 0, which marks a free slot in
        :class:`bungate.limit_table.LimitTable`).
    """
    encoded = route.encode("utf-8")
    digest = hashlib.blake2b(digest_size=8, person=b"bungate-rl")
    digest.update(len(encoded).to_bytes(4, "big"))
    digest.update(encoded)
    digest.update(key)
    return (int.from_bytes(digest.digest(), "big") >> 1) or 1
