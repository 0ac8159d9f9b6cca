"""
Who is calling: the verification of JSON Web Tokens and API keys.

This is the policy only; reading the configuration and answering the client are done by
the middleware. Pure logic: no reactor and no I/O here. The clock is passed in, and the
JWKS document is fetched by a function the caller provides.

Failures are :class:`AuthError`. Their statuses follow RFC 6750: every problem with the
token itself (missing, unreadable, badly signed, expired, for someone else, lacking a
registered claim) is ``401`` (``invalid_token``); ``403`` (``insufficient_scope``) is only
for a token that proved a valid identity but lacks a scope or a private claim the route
requires. Messages never include the token or a key.

JWT verification, in order: the token's size; its header (``alg`` must be one of the
configured algorithms, ``none`` never is; ``kid`` a string); the key for ``alg`` and
``kid``; the signature (by PyJWT); then the claims, with the clock passed in: ``exp``
(required unless ``require_expiry`` is off; the token is expired from the instant
``now >= exp + leeway``), ``nbf`` (valid from ``now >= nbf - leeway``), ``iat`` (must be a
number, not checked against the clock), ``iss`` (exactly equal), ``aud`` (one of the
token's audiences is one of ours; a token naming an audience is refused when none is
configured, as RFC 7519 section 4.1.3 requires), the required claims, the required scopes.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import re
from types import MappingProxyType
from typing import (
    Any,
    Callable,
    Dict,
    FrozenSet,
    Iterable,
    List,
    Mapping,
    Optional,
    Protocol,
    Sequence,
    Tuple,
    Union,
)

import attrs
import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt.algorithms import get_default_algorithms
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.python.failure import Failure

__all__ = [
    "REGISTERED_CLAIMS",
    "ApiKeys",
    "AuthError",
    "Claims",
    "Clock",
    "JwksKeys",
    "JwtSettings",
    "JwtVerifier",
    "KeySource",
    "PublicKey",
    "PublicKeyFile",
    "SecretKey",
    "VerificationKey",
    "cache_lifetime",
    "extract_token",
    "parse_api_key_file",
]

PublicKey = Union[
    rsa.RSAPublicKey,
    ec.EllipticCurvePublicKey,
    ed25519.Ed25519PublicKey,
    ed448.Ed448PublicKey,
]
"""A public key that verifies an asymmetric signature."""

VerificationKey = Union[bytes, PublicKey]
"""What a :class:`KeySource` hands out: an HMAC secret or a public key."""

REGISTERED_CLAIMS: FrozenSet[str] = frozenset({"iss", "sub", "aud", "exp", "nbf", "iat", "jti"})
"""
The claims of RFC 7519 section 4.1. A required one that is missing is a defect of the
token (401); any other required claim that is missing is a lack of permission (403).
"""

_HMAC = {"HS256": 32, "HS384": 48, "HS512": 64}  # algorithm -> minimum secret length
_RSA = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_EC_CURVES = {
    "ES256": "secp256r1",
    "ES384": "secp384r1",
    "ES512": "secp521r1",
    "ES256K": "secp256k1",
}
_ALGORITHMS = frozenset(_HMAC) | _RSA | frozenset(_EC_CURVES) | {"EdDSA"}
_MIN_RSA_BITS = 2048
_SEGMENT = re.compile(rb"[A-Za-z0-9_-]+={0,2}\Z")


class Clock(Protocol):
    """What needs a clock here: an :class:`~twisted.internet.interfaces.IReactorTime`."""

    def seconds(self) -> float:
        """
        :returns: the current time, in seconds since the epoch.
        """
        ...


class AuthError(Exception):
    """
    Why a caller was not let in.

    Reasons: ``missing_token``, ``malformed``, ``bad_signature``, ``expired``,
    ``not_yet_valid``, ``bad_issuer``, ``bad_audience``, ``missing_claim``, ``unknown_key``,
    ``algorithm_not_allowed`` (all 401), and ``missing_claim`` for a private claim or
    ``insufficient_scope`` (403).

    :param reason: one of the reasons above, for logs, metrics and the error body.
    :param status: the HTTP status to answer with, 401 or 403.
    :param detail: a human explanation; never contains the token or a key.
    """

    def __init__(self, reason: str, status: int = 401, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.status = status
        self.detail = detail

    @property
    def oauth_error(self) -> Optional[str]:
        """
        The RFC 6750 ``error`` for the ``WWW-Authenticate`` challenge.

        :returns: ``None`` for a request with no token (the RFC wants no error code
            then), ``"insufficient_scope"`` for a 403, else ``"invalid_token"``.
        """
        if self.reason == "missing_token":
            return None
        return "insufficient_scope" if self.status == 403 else "invalid_token"


def _fits(key: VerificationKey, algorithm: str) -> bool:
    """Whether ``key`` is of the type (and curve) that ``algorithm`` verifies with."""
    if algorithm in _HMAC:
        return isinstance(key, bytes)
    if algorithm in _RSA:
        return isinstance(key, rsa.RSAPublicKey)
    curve = _EC_CURVES.get(algorithm)
    if curve is not None:
        return isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == curve
    if algorithm == "EdDSA":
        return isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey))
    return False


def _check_public_key(key: object) -> PublicKey:
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < _MIN_RSA_BITS:
            raise ValueError(f"RSA key of {key.key_size} bits; at least {_MIN_RSA_BITS} needed")
        return key
    if isinstance(key, (ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        return key
    raise ValueError(f"unsupported public key type {type(key).__name__}")


class KeySource(Protocol):
    """
    Where a :class:`JwtVerifier` gets its keys.

    The verifier asks :meth:`refresh_due` and :meth:`key` on every token, so both must be
    cheap; :meth:`refresh` is called only when a key is missing or the keys are stale.
    """

    def check_algorithms(self, algorithms: Tuple[str, ...]) -> None:
        """
        Called once by the verifier with its configured algorithms.

        :param algorithms: the algorithms the verifier accepts.
        :raises ValueError: when the source cannot serve them (an HMAC secret for RS256,
            a public key for HS256, a secret too short for its hash).
        """
        ...

    def refresh_due(self) -> bool:
        """
        :returns: true when the keys are stale and a refresh may start now; the verifier
            then waits for :meth:`refresh` before it uses them.
        """
        ...

    def key(self, kid: Optional[str], algorithm: str) -> Optional[VerificationKey]:
        """
        The known key for a token's header.

        :param kid: the token's ``kid``, if it has one.
        :param algorithm: the token's ``alg``, already one of the configured algorithms.
        :returns: the key, or ``None`` when none known fits.
        """
        ...

    def refresh(self) -> Optional[Deferred[None]]:
        """
        Get the keys anew, or join the refresh under way.

        :returns: a Deferred that fires with ``None`` (never fails) when the refresh has
            ended, whether it worked or not; ``None`` when no refresh can happen now.
        """
        ...


class _StaticKey:
    """A key source of one key, known from the start."""

    _key: VerificationKey

    def refresh_due(self) -> bool:
        """
        :returns: false: a static key is never stale.
        """
        return False

    def key(self, kid: Optional[str], algorithm: str) -> Optional[VerificationKey]:
        """
        :param kid: ignored: there is one key.
        :param algorithm: the token's ``alg``.
        :returns: the key when it fits ``algorithm``.
        """
        return self._key if _fits(self._key, algorithm) else None

    def refresh(self) -> Optional[Deferred[None]]:
        """
        :returns: ``None``: there is nothing to refresh.
        """
        return None


class SecretKey(_StaticKey):
    """
    A shared HMAC secret, for the ``HS*`` algorithms. The token's ``kid`` is ignored.

    :param secret: the secret; at least as long as the hash output of every configured
        algorithm (RFC 7518 section 3.2: 32 bytes for HS256, 64 for HS512).
    :raises ValueError: when the secret is empty or is a PEM/SSH/DER key, which would make
        a public key the HMAC secret.
    """

    def __init__(self, secret: bytes) -> None:
        if not isinstance(secret, bytes):
            raise ValueError("the HMAC secret must be bytes")
        try:
            self._secret: bytes = get_default_algorithms()["HS256"].prepare_key(secret)
        except jwt.InvalidKeyError:
            raise ValueError("the HMAC secret is empty or is an asymmetric key") from None
        self._key = self._secret

    def __repr__(self) -> str:
        return "SecretKey(<secret>)"

    def check_algorithms(self, algorithms: Tuple[str, ...]) -> None:
        """
        :param algorithms: the verifier's algorithms.
        :raises ValueError: when one is not an ``HS*`` algorithm, or the secret is shorter
            than its hash.
        """
        for algorithm in algorithms:
            if algorithm not in _HMAC:
                raise ValueError(f"an HMAC secret cannot verify {algorithm}")
            if len(self._secret) < _HMAC[algorithm]:
                raise ValueError(
                    f"the HMAC secret is {len(self._secret)} bytes; {algorithm} needs at least "
                    f"{_HMAC[algorithm]}"
                )


class PublicKeyFile(_StaticKey):
    """
    One public key in PEM form (a ``PUBLIC KEY`` or ``RSA PUBLIC KEY`` block, or a
    certificate whose key is used), parsed once. The token's ``kid`` is ignored.

    :param pem: the PEM text.
    :raises ValueError: when it is not a public key or certificate, or is an RSA key of
        fewer than 2048 bits, or of an unsupported type.
    """

    def __init__(self, pem: bytes) -> None:
        loaded: object
        try:
            if b"-----BEGIN CERTIFICATE-----" in pem:
                loaded = x509.load_pem_x509_certificate(pem).public_key()
            else:
                loaded = serialization.load_pem_public_key(pem)
        except ValueError:
            raise ValueError("not a PEM public key or certificate") from None
        self._key = _check_public_key(loaded)

    def check_algorithms(self, algorithms: Tuple[str, ...]) -> None:
        """
        :param algorithms: the verifier's algorithms.
        :raises ValueError: when the key cannot verify one of them (every configured
            algorithm must be usable with the one key).
        """
        for algorithm in algorithms:
            if not _fits(self._key, algorithm):
                raise ValueError(
                    f"a {type(self._key).__name__} (this key) cannot verify {algorithm}"
                )


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


def cache_lifetime(headers: Mapping[str, str]) -> Optional[float]:
    """
    How long a JWKS response may be used, from its ``Cache-Control`` header.

    ``no-store`` and ``no-cache`` mean 0 (refetch as soon as the rate limit allows); an
    invalid ``max-age`` also means 0, as RFC 9111 section 4.2.1 says to treat it as stale.
    ``Expires`` is not read.

    :param headers: the response headers, names in any case.
    :returns: the lifetime in seconds, or ``None`` when the response does not say (the
        caller's default applies).
    """
    value = None
    for name, header in headers.items():
        if name.lower() == "cache-control":
            value = header if value is None else f"{value},{header}"
    if value is None:
        return None
    lifetime: Optional[float] = None
    for part in value.split(","):
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
    return lifetime


def _algorithms(value: Any) -> Tuple[str, ...]:
    if isinstance(value, (str, bytes)):
        return (value,) if isinstance(value, str) else ()
    return tuple(value)


def _check_algorithms(instance: Any, attribute: Any, algorithms: Tuple[str, ...]) -> None:
    if not algorithms:
        raise ValueError("algorithms: at least one is needed")
    for algorithm in algorithms:
        if not isinstance(algorithm, str):
            raise ValueError(f"algorithms: {algorithm!r} is not a name")
        if algorithm.lower() == "none":
            raise ValueError("algorithms: 'none' (unsigned tokens) is refused")
        if algorithm not in _ALGORITHMS:
            raise ValueError(
                f"algorithms: unknown {algorithm!r}; known: {', '.join(sorted(_ALGORITHMS))}"
            )
    if any(a in _HMAC for a in algorithms) and not all(a in _HMAC for a in algorithms):
        # With both, a token signed with HMAC using the public key as the secret could
        # pass: the algorithm-confusion attack.
        raise ValueError("algorithms: HMAC (HS*) and public-key algorithms cannot be mixed")


def _optional_names(value: Any) -> Optional[Tuple[str, ...]]:
    if value is None:
        return None
    return (value,) if isinstance(value, str) else tuple(value)


def _names(value: Any) -> Tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


def _check_names(instance: Any, attribute: Any, value: Optional[Tuple[str, ...]]) -> None:
    if value is None:
        return
    if attribute.name == "audience" and not value:
        raise ValueError("audience: give at least one, or None to accept no audience")
    for name in value:
        if not isinstance(name, str) or not name:
            raise ValueError(f"{attribute.name}: {name!r} is not a non-empty string")


def _check_leeway(instance: Any, attribute: Any, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and 0 <= value):
        raise ValueError(f"leeway must be a finite number >= 0, not {value!r}")


@attrs.frozen
class JwtSettings:
    """
    What a token must be to pass.

    :ivar algorithms: the accepted ``alg`` values; required, not ``none``, and not HMAC
        mixed with public-key algorithms.
    :ivar issuer: the required ``iss``, exactly; ``None`` to not check it.
    :ivar audience: the accepted ``aud`` values (a token passes when one of its audiences
        is among them); ``None`` to accept only tokens without ``aud``.
    :ivar leeway: seconds of clock skew allowed on ``exp`` and ``nbf``.
    :ivar required_claims: claims the token must carry (any value but ``null``); a
        missing one of :data:`REGISTERED_CLAIMS` is a 401, any other a 403.
    :ivar required_scopes: scopes that must all be in the token's ``scope`` (a
        space-separated string) or ``scp`` (a list or string) claim; else 403.
    :ivar require_expiry: refuse tokens without ``exp`` (401), which would never expire.
    :ivar max_token_bytes: refuse longer tokens before any parsing.
    :raises ValueError: on construction, for any of the above broken.
    """

    algorithms: Tuple[str, ...] = attrs.field(converter=_algorithms, validator=_check_algorithms)
    issuer: Optional[str] = None
    audience: Optional[Tuple[str, ...]] = attrs.field(
        default=None, converter=_optional_names, validator=_check_names
    )
    leeway: float = attrs.field(default=0.0, validator=_check_leeway)
    required_claims: Tuple[str, ...] = attrs.field(
        default=(), converter=_names, validator=_check_names
    )
    required_scopes: Tuple[str, ...] = attrs.field(
        default=(), converter=_names, validator=_check_names
    )
    require_expiry: bool = True
    max_token_bytes: int = 8192


@attrs.frozen
class Claims:
    """
    A verified token.

    :ivar payload: its claims (read-only).
    :ivar header: its JOSE header (read-only).
    """

    payload: Mapping[str, Any] = attrs.field(converter=MappingProxyType)
    header: Mapping[str, Any] = attrs.field(converter=MappingProxyType)

    @property
    def subject(self) -> Optional[str]:
        """
        :returns: the ``sub`` claim when it is a string, else ``None``.
        """
        sub = self.payload.get("sub")
        return sub if isinstance(sub, str) else None

    @property
    def scopes(self) -> FrozenSet[str]:
        """
        :returns: the scopes of the ``scope`` claim (space-separated) and ``scp`` claim
            (a list of strings, or a space-separated string).
        """
        return _scopes(self.payload)


def _scopes(payload: Mapping[str, Any]) -> FrozenSet[str]:
    found: List[str] = []
    for name in ("scope", "scp"):
        value = payload.get(name)
        if isinstance(value, str):
            found.extend(value.split())
        elif isinstance(value, list):
            found.extend(item for item in value if isinstance(item, str))
    return frozenset(found)


def _number(payload: Mapping[str, Any], name: str) -> Optional[float]:
    value = payload.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AuthError("malformed", detail=f"the {name} claim is not a number")
    if not math.isfinite(value):
        raise AuthError("malformed", detail=f"the {name} claim is not a finite number")
    return float(value)


class JwtVerifier:
    """
    Verifies JSON Web Tokens against :class:`JwtSettings`.

    :meth:`verify` answers at once when the key is known (a static key, or a cached JWKS
    key): no Deferred is made. Only when the key source has to be refreshed does it
    return a Deferred.

    :param settings: the policy.
    :param clock: provides ``seconds()``, for ``exp`` and ``nbf``.
    :param keys: where the keys come from.
    :raises ValueError: when ``keys`` cannot serve the configured algorithms.
    """

    def __init__(self, settings: JwtSettings, clock: Clock, keys: KeySource) -> None:
        keys.check_algorithms(settings.algorithms)
        self.settings = settings
        self._clock = clock
        self._keys = keys
        self._allowed = frozenset(settings.algorithms)
        self._jws = jwt.PyJWS(algorithms=list(settings.algorithms))
        self._audience = frozenset(settings.audience) if settings.audience is not None else None

    def verify(self, token: bytes) -> Union[Claims, Deferred[Claims]]:
        """
        Verify a token.

        :param token: the token as presented (``header.payload.signature``).
        :returns: the claims when the key was at hand; else a Deferred that fires with
            them, or fails with :class:`AuthError`, once the keys are refreshed.
        :raises AuthError: when the token is refused without a refresh.
        """
        algorithm, kid = self._read_header(token)
        keys = self._keys
        key = None if keys.refresh_due() else keys.key(kid, algorithm)
        if key is not None:
            return self._check(token, key, algorithm)
        pending = keys.refresh()
        if pending is None:
            raise AuthError("unknown_key", detail="no key for the token's kid and alg")
        return pending.addCallback(self._after_refresh, token, kid, algorithm)

    def verify_deferred(self, token: bytes) -> Deferred[Claims]:
        """
        :meth:`verify`, always as a Deferred (one more allocation per call).

        :param token: the token as presented.
        :returns: a Deferred that fires with the claims or fails with :class:`AuthError`.
        """
        try:
            result = self.verify(token)
        except AuthError:
            return fail()
        if isinstance(result, Deferred):
            return result
        return succeed(result)

    def _after_refresh(
        self, ignored: None, token: bytes, kid: Optional[str], algorithm: str
    ) -> Claims:
        key = self._keys.key(kid, algorithm)
        if key is None:
            raise AuthError("unknown_key", detail="no key for the token's kid and alg")
        return self._check(token, key, algorithm)

    def _read_header(self, token: bytes) -> Tuple[str, Optional[str]]:
        if not token:
            raise AuthError("missing_token", detail="empty token")
        if len(token) > self.settings.max_token_bytes:
            raise AuthError("malformed", detail="token too long")
        # The header is read here only to choose the key; PyJWT reads the whole token again,
        # strictly, and checks that its alg is this one. The header is signed, so a token
        # cannot make a key it was not signed with pass.
        head, dot, _ = token.partition(b".")
        if not dot or _SEGMENT.match(head) is None:
            raise AuthError("malformed", detail="unreadable token header")
        head = head.rstrip(b"=")
        try:
            header = json.loads(base64.urlsafe_b64decode(head + b"=" * (-len(head) % 4)))
        except (ValueError, RecursionError):
            raise AuthError("malformed", detail="unreadable token header") from None
        if not isinstance(header, dict):
            raise AuthError("malformed", detail="the token header is not a JSON object")
        algorithm = header.get("alg")
        if not isinstance(algorithm, str) or algorithm not in self._allowed:
            raise AuthError("algorithm_not_allowed", detail="alg is not an accepted algorithm")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise AuthError("malformed", detail="kid is not a string")
        return algorithm, kid

    def _check(self, token: bytes, key: VerificationKey, algorithm: str) -> Claims:
        try:
            decoded = self._jws.decode_complete(token, key=key, algorithms=[algorithm])
        except jwt.InvalidSignatureError:
            raise AuthError("bad_signature", detail="signature verification failed") from None
        except jwt.InvalidAlgorithmError:
            raise AuthError("algorithm_not_allowed", detail="alg not accepted") from None
        except jwt.InvalidKeyError:
            raise AuthError("unknown_key", detail="the key does not fit the token") from None
        except (jwt.PyJWTError, ValueError, TypeError):
            raise AuthError("malformed", detail="unreadable token") from None
        try:
            payload = json.loads(decoded["payload"])
        except (ValueError, RecursionError):
            raise AuthError("malformed", detail="the claims are not JSON") from None
        if not isinstance(payload, dict):
            raise AuthError("malformed", detail="the claims are not a JSON object")
        self._check_claims(payload)
        return Claims(payload=payload, header=decoded["header"])

    def _check_claims(self, payload: Dict[str, Any]) -> None:
        settings = self.settings
        now = self._clock.seconds()
        leeway = settings.leeway
        exp = _number(payload, "exp")
        nbf = _number(payload, "nbf")
        _number(payload, "iat")
        if exp is None:
            if settings.require_expiry:
                raise AuthError("missing_claim", detail="the token has no exp")
        elif now >= exp + leeway:
            raise AuthError("expired", detail="the token has expired")
        if nbf is not None and now < nbf - leeway:
            raise AuthError("not_yet_valid", detail="the token is not valid yet (nbf)")
        if settings.issuer is not None and payload.get("iss") != settings.issuer:
            raise AuthError("bad_issuer", detail="iss is not the accepted issuer")
        self._check_audience(payload)
        missing = [name for name in settings.required_claims if payload.get(name) is None]
        for name in missing:
            if name in REGISTERED_CLAIMS:
                raise AuthError("missing_claim", detail=f"the token has no {name}")
        # From here on the identity is proven: what is lacking is permission.
        if missing:
            raise AuthError("missing_claim", 403, detail=f"the token has no {missing[0]}")
        if settings.required_scopes:
            lacking = [s for s in settings.required_scopes if s not in _scopes(payload)]
            if lacking:
                raise AuthError(
                    "insufficient_scope", 403, detail=f"scope {' '.join(lacking)} is required"
                )

    def _check_audience(self, payload: Dict[str, Any]) -> None:
        if "aud" not in payload:
            if self._audience is not None:
                raise AuthError("bad_audience", detail="the token has no aud")
            return
        aud = payload["aud"]
        audiences = [aud] if isinstance(aud, str) else aud
        if not isinstance(audiences, list) or not all(isinstance(a, str) for a in audiences):
            raise AuthError("malformed", detail="aud is not a string or list of strings")
        if self._audience is None:
            raise AuthError("bad_audience", detail="the token names an audience; none accepted")
        if self._audience.isdisjoint(audiences):
            raise AuthError("bad_audience", detail="aud is not an accepted audience")


_DEFAULT_NAME = "api-key"
_KEY_TEXT = re.compile(r"[\x21-\x7e]+\Z")


@attrs.frozen
class ApiKeys:
    """
    The API keys that let callers in, each with the caller's name.

    Only the SHA-256 digests of the keys are kept. :meth:`match` compares the digest of
    the presented key with every stored digest using :func:`hmac.compare_digest`, without
    stopping at the first hit: the time taken depends neither on which key matched, nor
    on how much of a key is right, nor on the presented key's length.

    :ivar digests: ``(sha256(key), name)`` pairs, in configuration order.
    """

    digests: Tuple[Tuple[bytes, str], ...] = attrs.field(repr=False)

    @classmethod
    def parse(
        cls,
        entries: Iterable[Union[str, Mapping[str, str]]],
        *,
        default_name: str = _DEFAULT_NAME,
        min_length: int = 16,
    ) -> ApiKeys:
        """
        Read the configured keys.

        :param entries: each a key string, or a mapping ``{"key": ..., "name": ...}``
            (``name`` optional).
        :param default_name: the name of keys given without one.
        :param min_length: the shortest key accepted (short keys can be guessed).
        :returns: the keys.
        :raises ValueError: for an empty, short, duplicated or non-printable-ASCII key
            (whitespace included, which usually means a stray newline), an entry of
            another shape, or an empty name. Messages name the entry by position and name,
            never by its key.
        """
        items: List[Tuple[object, object, str]] = []
        for index, entry in enumerate(entries):
            if isinstance(entry, str):
                items.append((entry, default_name, f"API key #{index}"))
            elif isinstance(entry, Mapping):
                unknown = set(entry) - {"key", "name"}
                if unknown:
                    raise ValueError(f"API key #{index}: unknown fields {sorted(unknown)}")
                items.append(
                    (entry.get("key"), entry.get("name", default_name), f"API key #{index}")
                )
            else:
                raise ValueError(f"API key #{index}: expected a string or a mapping")
        return cls._build(items, min_length)

    @classmethod
    def _build(cls, items: Iterable[Tuple[object, object, str]], min_length: int) -> ApiKeys:
        digests: List[Tuple[bytes, str]] = []
        seen = set()
        for key, name, where in items:
            if not isinstance(name, str) or not name:
                raise ValueError(f"{where}: the name must be a non-empty string")
            label = f"{where} ({name!r})"
            if not isinstance(key, str) or not key:
                raise ValueError(f"{label}: the key is missing or empty")
            if _KEY_TEXT.match(key) is None:
                raise ValueError(f"{label}: the key must be printable ASCII, no whitespace")
            if len(key) < min_length:
                raise ValueError(f"{label}: the key is shorter than {min_length} characters")
            digest = hashlib.sha256(key.encode("ascii")).digest()
            if digest in seen:
                raise ValueError(f"{label}: the same key is given twice")
            seen.add(digest)
            digests.append((digest, name))
        return cls(digests=tuple(digests))

    def match(self, presented: bytes) -> Optional[str]:
        """
        The caller a presented key belongs to.

        :param presented: the key as the client sent it.
        :returns: the key's name, or ``None`` when it is no configured key (or empty).
        """
        if not presented:
            return None
        digest = hashlib.sha256(presented).digest()
        found: Optional[str] = None
        for stored, name in self.digests:
            if hmac.compare_digest(digest, stored) and found is None:
                found = name
        return found


def parse_api_key_file(
    text: str, *, default_name: str = _DEFAULT_NAME, min_length: int = 16
) -> ApiKeys:
    """
    Read a file of API keys: one per line, as ``key`` or ``name key``; blank lines and
    lines starting with ``#`` are skipped.

    :param text: the file's content.
    :param default_name: the name of keys given without one.
    :param min_length: the shortest key accepted.
    :returns: the keys.
    :raises ValueError: for a line of more than two fields, or a key :meth:`ApiKeys.parse`
        refuses; the message gives the line number, never the key.
    """
    items: List[Tuple[object, object, str]] = []
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        fields = stripped.split()
        if len(fields) > 2:
            raise ValueError(f"line {number}: expected 'key' or 'name key'")
        key, name = (fields[0], default_name) if len(fields) == 1 else (fields[1], fields[0])
        items.append((key, name, f"line {number}"))
    return ApiKeys._build(items, min_length)


_B64TOKEN = re.compile(rb"[A-Za-z0-9\-._~+/]+=*\Z")


def _single(values: Optional[Sequence[bytes]], where: str) -> Optional[bytes]:
    if not values:
        return None
    if len(values) > 1:
        raise AuthError("malformed", detail=f"more than one {where}")
    return values[0]


def extract_token(
    headers: Mapping[bytes, Sequence[bytes]],
    query: Mapping[bytes, Sequence[bytes]],
    cookies: Mapping[bytes, bytes],
    *,
    header: Optional[bytes] = b"authorization",
    query_param: Optional[bytes] = None,
    cookie: Optional[bytes] = None,
) -> Optional[bytes]:
    """
    Find the token (or API key) a request carries.

    From ``Authorization``, the value must be ``Bearer <token>`` (scheme in any case,
    token in RFC 6750 ``b64token`` syntax); another scheme, such as ``Basic``, is not a
    token and is ignored. From any other header, a query parameter or a cookie, the whole
    (stripped) value is the token.

    :param headers: request headers by lower-case name, each with all its values
        (as ``twisted.web.http_headers.Headers`` keeps them).
    :param query: query parameters, each with all its values (``request.args``).
    :param cookies: cookie values by name.
    :param header: the header to read, or ``None`` to read none.
    :param query_param: the query parameter to read, or ``None`` (the default: tokens in
        URLs end up in logs).
    :param cookie: the cookie to read, or ``None``.
    :returns: the token, or ``None`` when no configured place carries one.
    :raises AuthError: ``malformed`` when a place carries it twice (two ``Authorization``
        headers), when it is empty or a broken ``Bearer`` value, or when more than one
        place carries a token (RFC 6750 section 2: one method only).
    """
    found: List[bytes] = []
    if header is not None:
        name = header.lower()
        value = _single(headers.get(name), f"{name.decode('latin-1')} header")
        if value is not None:
            if name == b"authorization":
                scheme, _, credentials = value.strip().partition(b" ")
                if scheme.lower() == b"bearer":
                    credentials = credentials.strip(b" ")
                    if _B64TOKEN.match(credentials) is None:
                        raise AuthError("malformed", detail="broken Bearer credentials")
                    found.append(credentials)
            else:
                found.append(value.strip())
    if query_param is not None:
        value = _single(query.get(query_param), "token query parameter")
        if value is not None:
            found.append(value.strip())
    if cookie is not None:
        value = cookies.get(cookie)
        if value is not None:
            found.append(value.strip())
    if len(found) > 1:
        raise AuthError("malformed", detail="the token is given in more than one place")
    if found and not found[0]:
        raise AuthError("malformed", detail="empty token")
    return found[0] if found else None
