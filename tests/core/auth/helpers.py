"""What the tests of bungate.core.auth share: keys made once, tokens minted and forged."""

from __future__ import annotations

import base64
import json
from typing import Any, Dict, List, Mapping, Optional, Union

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import RSAAlgorithm
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from bungate.core.auth import (
    AuthError,
    Claims,
    JwtSettings,
    JwtVerifier,
    SecretKey,
)

NOW = 1_700_000_000.0
SECRET = b"0123456789abcdef0123456789abcdef"  # 32 bytes, enough for HS256

# Keys are made once per test run: RSA generation is the slow part.
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_KEY_2 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
ED_KEY = ed25519.Ed25519PrivateKey.generate()


def public_pem(private: Any) -> bytes:
    pem: bytes = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem


def clock_at(seconds: float = NOW) -> Clock:
    clock = Clock()
    clock.advance(seconds)
    return clock


def claims(**overrides: Any) -> Dict[str, Any]:
    base: Dict[str, Any] = {"sub": "alice", "exp": NOW + 3600, "iat": NOW}
    base.update(overrides)
    return {name: value for name, value in base.items() if value is not None}


def mint(payload: Mapping[str, Any], key: Any, alg: str, **headers: Any) -> bytes:
    return jwt.encode(dict(payload), key, algorithm=alg, headers=headers or None).encode()


def mint_raw(payload: Any) -> bytes:
    """An HS256 token with any claims at all (PyJWT's encode() checks some of them)."""
    return jwt.api_jws.encode(json.dumps(payload).encode(), SECRET, algorithm="HS256").encode()


def b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def forge(header: Mapping[str, Any], payload: Mapping[str, Any], signature: bytes = b"") -> bytes:
    """A token put together by hand, as an attacker would."""
    signing_input = b64(json.dumps(header).encode()) + b"." + b64(json.dumps(payload).encode())
    return signing_input + b"." + b64(signature)


def outcome(result: Union[Claims, Deferred[Claims]]) -> Claims:
    """The claims of a verify() result, waiting for nothing: its Deferred must have fired."""
    if not isinstance(result, Deferred):
        return result
    fired: List[Any] = []
    result.addBoth(fired.append)
    assert fired, "the verification is still waiting"
    if isinstance(fired[0], Failure):
        fired[0].raiseException()
    value: Claims = fired[0]
    return value


def refusal(verifier: JwtVerifier, token: bytes) -> AuthError:
    with pytest.raises(AuthError) as info:
        outcome(verifier.verify(token))
    error = info.value
    text = token.decode("latin-1")
    assert not text or (text not in str(error) and text not in error.detail)
    assert error.__cause__ is None
    return error


def hs_verifier(clock: Optional[Clock] = None, **settings: Any) -> JwtVerifier:
    return JwtVerifier(
        JwtSettings(algorithms=("HS256",), **settings), clock or clock_at(), SecretKey(SECRET)
    )


def rsa_jwk(private: rsa.RSAPrivateKey, kid: Optional[str], **extra: Any) -> Dict[str, Any]:
    jwk = RSAAlgorithm.to_jwk(private.public_key(), as_dict=True)
    if kid is not None:
        jwk["kid"] = kid
    jwk.update(extra)
    return jwk


def jwks_document(*keys: Mapping[str, Any]) -> bytes:
    return json.dumps({"keys": list(keys)}).encode()
