"""
The keys a token is verified with: the algorithm tables, the :class:`KeySource`
protocol, and the two static sources, :class:`SecretKey` (an HMAC secret) and
:class:`PublicKeyFile` (one PEM public key or certificate). The key sets fetched from a
JWKS URL are in :mod:`bungate.core.auth.jwks`.

The names with a leading underscore are shared by the modules of this package only.
"""

from __future__ import annotations

from typing import Optional, Protocol, Tuple, Union

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt.algorithms import get_default_algorithms
from twisted.internet.defer import Deferred

__all__ = ["KeySource", "PublicKey", "PublicKeyFile", "SecretKey", "VerificationKey"]

PublicKey = Union[
    rsa.RSAPublicKey,
    ec.EllipticCurvePublicKey,
    ed25519.Ed25519PublicKey,
    ed448.Ed448PublicKey,
]
"""A public key that verifies an asymmetric signature."""

VerificationKey = Union[bytes, PublicKey]
"""What a :class:`KeySource` hands out: an HMAC secret or a public key."""

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
