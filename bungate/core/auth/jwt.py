"""
JSON Web Tokens: what a token must be (:class:`JwtSettings`), what a verified one holds
(:class:`Claims`), and the check itself (:class:`JwtVerifier`).

Verification, in order: the token's size; its header (``alg`` must be one of the
configured algorithms, ``none`` never is; ``kid`` a string); the key for ``alg`` and
``kid``; the signature (by PyJWT); then the claims, with the clock passed in: ``exp``
(required unless ``require_expiry`` is off; the token is expired from the instant
``now >= exp + leeway``), ``nbf`` (valid from ``now >= nbf - leeway``), ``iat`` (must be a
number, not checked against the clock), ``iss`` (exactly equal), ``aud`` (one of the
token's audiences is one of ours; a token naming an audience is refused when none is
configured, as RFC 7519 section 4.1.3 requires), the required claims, the required scopes.

This module is named after the format; inside it, ``jwt`` is PyJWT.
"""

from __future__ import annotations

import base64
import json
import math
import re
from types import MappingProxyType
from typing import Any, Dict, FrozenSet, List, Mapping, Optional, Tuple, Union

import attrs
import jwt
from twisted.internet.defer import Deferred, fail, succeed

from bungate.core.auth.errors import AuthError, Clock
from bungate.core.auth.keys import _ALGORITHMS, _HMAC, KeySource, VerificationKey

__all__ = ["REGISTERED_CLAIMS", "Claims", "JwtSettings", "JwtVerifier"]

REGISTERED_CLAIMS: FrozenSet[str] = frozenset({"iss", "sub", "aud", "exp", "nbf", "iat", "jti"})
"""
The claims of RFC 7519 section 4.1. A required one that is missing is a defect of the
token (401); any other required claim that is missing is a lack of permission (403).
"""

_SEGMENT = re.compile(rb"[A-Za-z0-9_-]+={0,2}\Z")


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

    def __init__(
        self, settings: JwtSettings, clock: Clock, keys: KeySource, cache_size: int = 4096
    ) -> None:
        keys.check_algorithms(settings.algorithms)
        self.settings = settings
        #: tokens already verified: ``token -> (algorithm, kid, key, claims)``. The
        #: signature and the parsing are skipped for a token seen before, never the
        #: claims (``exp``, ``nbf``... are checked again against the clock), and only
        #: while the key that verified it is still the one for its ``kid`` and ``alg``
        #: (a JWKS rotation or a key removed makes it a miss).
        self._verified: Dict[bytes, Tuple[str, Optional[str], Any, Claims]] = {}
        self._cache_size = cache_size
        #: hits of that cache (for a metric).
        self.cache_hits = 0
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
        keys = self._keys
        seen = self._verified.get(token)
        if seen is not None and not keys.refresh_due():
            algorithm, kid, key, claims = seen
            if keys.key(kid, algorithm) is key:
                self._check_claims(claims.payload)  # the clock moved on: exp, nbf again
                self.cache_hits += 1
                return claims
            del self._verified[token]
        algorithm, kid = self._read_header(token)
        key = None if keys.refresh_due() else keys.key(kid, algorithm)
        if key is not None:
            claims = self._check(token, key, algorithm)
            self._remember(token, algorithm, kid, key, claims)
            return claims
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
        claims = self._check(token, key, algorithm)
        self._remember(token, algorithm, kid, key, claims)
        return claims

    def _remember(
        self, token: bytes, algorithm: str, kid: Optional[str], key: Any, claims: Claims
    ) -> None:
        verified = self._verified
        if len(verified) >= self._cache_size:
            del verified[next(iter(verified))]  # the oldest: dicts keep insertion order
        verified[token] = (algorithm, kid, key, claims)

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

    def _check_claims(self, payload: Mapping[str, Any]) -> None:
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

    def _check_audience(self, payload: Mapping[str, Any]) -> None:
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
