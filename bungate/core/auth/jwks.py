"""
JSON Web Key Sets: :class:`JwksKeys`, the key source that fetches a JWKS document through
a function the caller provides and caches it, and :func:`cache_lifetime`, which reads how
long a fetched document may be used from its HTTP headers.
"""

from __future__ import annotations

import datetime
import json
import math
import re
from email.utils import parsedate_to_datetime
from typing import Callable, Dict, FrozenSet, List, Mapping, Optional, Tuple

import attrs
import jwt
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.python.failure import Failure

from bungate.core.auth.errors import Clock
from bungate.core.auth.keys import (
    _ALGORITHMS,
    _HMAC,
    PublicKey,
    VerificationKey,
    _check_public_key,
    _fits,
)

__all__ = ["JwksKeys", "cache_lifetime"]


@attrs.frozen
class _Jwk:
    kid: Optional[str]
    alg: Optional[str]
    key: PublicKey


def _parse_jwks(document: bytes) -> Tuple[Dict[Optional[str], Tuple[_Jwk, ...]], int]:
    """
    The usable signing keys of a JWKS document, by ``kid``, and how many were skipped.

    :raises ValueError: when the document is not a JSON object with a ``keys`` list.
    """
    try:
        parsed = json.loads(document)
    except (ValueError, RecursionError):
        raise ValueError("the JWKS document is not JSON") from None
    if not isinstance(parsed, dict) or not isinstance(parsed.get("keys"), list):
        raise ValueError("the JWKS document has no 'keys' list")
    found: Dict[Optional[str], List[_Jwk]] = {}
    skipped = 0
    for entry in parsed["keys"]:
        jwk = _parse_jwk(entry)
        if jwk is None:
            skipped += 1
        else:
            found.setdefault(jwk.kid, []).append(jwk)
    return {kid: tuple(keys) for kid, keys in found.items()}, skipped


def _parse_jwk(entry: object) -> Optional[_Jwk]:
    if not isinstance(entry, dict):
        return None
    kid, alg, kty = entry.get("kid"), entry.get("alg"), entry.get("kty")
    if kid is not None and not isinstance(kid, str):
        return None
    if alg is not None and alg not in _ALGORITHMS:
        return None  # "none", an HMAC or unknown algorithm
    if kty == "oct":
        return None  # a shared secret published in a key set is no secret
    if entry.get("use", "sig") != "sig":
        return None
    key_ops = entry.get("key_ops")
    if key_ops is not None and (not isinstance(key_ops, list) or "verify" not in key_ops):
        return None
    try:
        loaded: object = jwt.PyJWK(entry).key
        if hasattr(loaded, "public_key"):
            # A set that leaks private keys still only needs their public halves here.
            loaded = loaded.public_key()
        key = _check_public_key(loaded)
    except Exception:
        return None  # PyJWT raises several kinds for a key it cannot read
    if alg is not None and not _fits(key, alg):
        return None
    return _Jwk(kid=kid, alg=alg, key=key)


class JwksKeys:
    """
    The keys of a JSON Web Key Set, looked up by the token's ``kid``.

    - The set is fetched on first use, and again once its lifetime (the ``max-age`` the
      fetch reports, else ``default_ttl``, at most ``max_ttl``) has passed.
    - A token whose ``kid`` is unknown triggers a fetch (key rotation).
    - Fetches start at most once per ``min_refetch_interval`` seconds, however many
      unknown ``kid`` values are presented; requests that miss while a fetch is under way
      share it.
    - When a fetch fails, or returns a document that cannot be read, the last good set is
      kept and used; a ``kid`` it does not have is refused.
    - A key is used only for the algorithm it fits: its ``kty`` (and ``crv``) must suit the
      token's ``alg``, and its own ``alg``, when it has one, must equal it. Keys with
      ``kty: oct``, ``use`` other than ``sig``, or ``key_ops`` without ``verify``, and RSA
      keys under 2048 bits, are never used.
    - A token without ``kid`` is matched only when the set holds exactly one key without a
      ``kid`` that fits the algorithm.

    :param fetch: gets the JWKS document; its Deferred fires with the body and the HTTP
        cache lifetime in seconds (see :func:`cache_lifetime`), or ``None`` for none. It
        must time out by itself: a fetch that never ends holds the waiting requests.
    :param clock: provides ``seconds()``.
    :param min_refetch_interval: the least number of seconds between two fetch starts.
    :param default_ttl: the lifetime of a set fetched without one.
    :param max_ttl: the longest lifetime believed.
    :raises ValueError: when an interval or lifetime is negative or not finite.
    """

    def __init__(
        self,
        fetch: Callable[[], Deferred[Tuple[bytes, Optional[float]]]],
        clock: Clock,
        *,
        min_refetch_interval: float = 30.0,
        default_ttl: float = 300.0,
        max_ttl: float = 86400.0,
    ) -> None:
        for name, value in (
            ("min_refetch_interval", min_refetch_interval),
            ("default_ttl", default_ttl),
            ("max_ttl", max_ttl),
        ):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, not {value!r}")
        self._fetch = fetch
        self._clock = clock
        self._min_interval = float(min_refetch_interval)
        self._default_ttl = float(default_ttl)
        self._max_ttl = float(max_ttl)
        self._keys: Dict[Optional[str], Tuple[_Jwk, ...]] = {}
        self._expires = -math.inf
        self._last_start: Optional[float] = None
        self._waiters: Optional[List[Deferred[None]]] = None
        self.fetches = 0
        """How many fetches were started."""
        self.last_error: Optional[str] = None
        """Why the last fetch failed, or ``None`` when it worked."""
        self.skipped_keys = 0
        """How many keys of the current set are not usable (wrong type, use, size...)."""

    @property
    def key_ids(self) -> FrozenSet[Optional[str]]:
        """
        :returns: the ``kid`` values of the current set (``None`` for keys without one).
        """
        return frozenset(self._keys)

    def check_algorithms(self, algorithms: Tuple[str, ...]) -> None:
        """
        :param algorithms: the verifier's algorithms.
        :raises ValueError: for an ``HS*`` algorithm: a key set holds public keys only.
        """
        for algorithm in algorithms:
            if algorithm in _HMAC:
                raise ValueError(f"a JWKS cannot hold keys for {algorithm}")

    def _may_start(self, now: float) -> bool:
        return self._waiters is None and (
            self._last_start is None or now - self._last_start >= self._min_interval
        )

    def refresh_due(self) -> bool:
        """
        :returns: true when the set's lifetime has passed (or it was never fetched) and a
            fetch may start now.
        """
        now = self._clock.seconds()
        return now >= self._expires and self._may_start(now)

    def key(self, kid: Optional[str], algorithm: str) -> Optional[VerificationKey]:
        """
        :param kid: the token's ``kid``.
        :param algorithm: the token's ``alg``.
        :returns: the key of the current set (stale or not) that fits, or ``None``.
        """
        keys = self._keys.get(kid)
        if keys is None:
            return None
        fitting = [
            jwk.key
            for jwk in keys
            if (jwk.alg is None or jwk.alg == algorithm) and _fits(jwk.key, algorithm)
        ]
        if kid is None and len(fitting) != 1:
            return None  # without a kid, only an unambiguous key will do
        return fitting[0] if fitting else None

    def refresh(self) -> Optional[Deferred[None]]:
        """
        Fetch the set anew, unless one was started less than ``min_refetch_interval`` ago;
        join the fetch under way if there is one.

        :returns: a Deferred that fires with ``None`` when the fetch has ended (it never
            fails: a failed fetch keeps the last good set), or ``None`` when the rate limit
            allows no fetch now.
        """
        waiter: Deferred[None] = Deferred()
        if self._waiters is not None:
            self._waiters.append(waiter)
            return waiter
        now = self._clock.seconds()
        if not self._may_start(now):
            return None
        self._last_start = now
        self._waiters = [waiter]
        self.fetches += 1
        fetched: Deferred[Tuple[bytes, Optional[float]]] = maybeDeferred(self._fetch)
        fetched.addCallbacks(self._fetched, self._failed)
        return waiter

    def _fetched(self, result: Tuple[bytes, Optional[float]]) -> None:
        try:
            document, lifetime = result
            keys, skipped = _parse_jwks(document)
        except Exception as error:  # whatever the document, the last good set stays
            self._give_up(f"{type(error).__name__}: {error}")
            return
        ttl = self._default_ttl if lifetime is None else lifetime
        if not (isinstance(ttl, (int, float)) and ttl >= 0):
            ttl = 0.0  # a nonsense lifetime: stale at once, refetched as the limit allows
        self._keys = keys
        self.skipped_keys = skipped
        self._expires = self._clock.seconds() + min(float(ttl), self._max_ttl)
        self.last_error = None
        self._release()

    def _failed(self, reason: Failure) -> None:
        self._give_up(f"{type(reason.value).__name__}: {reason.getErrorMessage()}")

    def _give_up(self, error: str) -> None:
        self.last_error = error
        self._release()

    def _release(self) -> None:
        waiters, self._waiters = self._waiters or [], None
        for waiter in waiters:
            waiter.callback(None)


_CACHE_DIRECTIVE = re.compile(r'\s*([!#$%&\'*+.^_`|~0-9A-Za-z-]+)\s*(?:=\s*("[^"]*"|[^,\s]*))?')


def cache_lifetime(headers: Mapping[str, str], now: Optional[float] = None) -> Optional[float]:
    """
    How long a JWKS response may be used, from its ``Cache-Control`` header, else from its
    ``Expires`` header (RFC 9111 section 4.2.1: ``max-age`` wins over ``Expires``).

    - ``no-store`` and ``no-cache`` mean 0 (refetch as soon as the rate limit allows); an
      invalid ``max-age`` also means 0, as RFC 9111 section 4.2.1 says to treat it as
      stale. Of several ``max-age``, the smallest counts.
    - ``Expires`` counts from the response's ``Date``, or from ``now`` when the response
      has no readable ``Date``; without either it is not read. An ``Expires`` that is not
      a date (``0`` is common) or is in the past means 0 (RFC 9111 section 5.3).

    :param headers: the response headers, names in any case (a repeated
        ``Cache-Control`` joined with commas, or given under names differing in case).
    :param now: when the response was received, in seconds since the epoch.
    :returns: the lifetime in seconds, or ``None`` when the response does not say (the
        caller's default applies).
    """
    control: Optional[str] = None
    expires: Optional[str] = None
    date: Optional[str] = None
    for name, header in headers.items():
        lower = name.lower()
        if lower == "cache-control":
            control = header if control is None else f"{control},{header}"
        elif lower == "expires":
            expires = header
        elif lower == "date":
            date = header
    lifetime: Optional[float] = None
    for part in control.split(",") if control is not None else ():
        match = _CACHE_DIRECTIVE.match(part)
        if match is None:
            continue
        directive = match.group(1).lower()
        if directive in ("no-store", "no-cache"):
            return 0.0
        if directive == "max-age":
            argument = (match.group(2) or "").strip('"')
            seconds = float(argument) if argument.isdigit() else 0.0
            lifetime = seconds if lifetime is None else min(lifetime, seconds)
    if lifetime is not None or expires is None:
        return lifetime
    base = _http_date(date) if date is not None else None
    if base is None:
        base = now
    if base is None:
        return None
    expiry = _http_date(expires)
    if expiry is None:
        return 0.0
    return max(0.0, expiry - base)


def _http_date(value: str) -> Optional[float]:
    """An HTTP date as seconds since the epoch, or ``None`` when it is not one."""
    try:
        moment = parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError, OverflowError):  # TypeError before 3.10
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    try:
        return moment.timestamp()
    except (OverflowError, ValueError, OSError):
        return None
