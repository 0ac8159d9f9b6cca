"""Tests for bungate.core.auth.jwt and .keys: settings, key sources, signatures, claims."""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any, Dict, List, Optional, Tuple

import jwt
import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from twisted.internet.defer import Deferred, succeed

from bungate.core.auth import (
    AuthError,
    Claims,
    JwksKeys,
    JwtSettings,
    JwtVerifier,
    KeySource,
    PublicKeyFile,
    SecretKey,
)
from tests.core.auth.helpers import (
    EC_KEY,
    ED_KEY,
    NOW,
    RSA_KEY,
    RSA_KEY_2,
    SECRET,
    b64,
    claims,
    clock_at,
    forge,
    hs_verifier,
    jwks_document,
    mint,
    mint_raw,
    outcome,
    public_pem,
    refusal,
    rsa_jwk,
)

# --- settings -----------------------------------------------------------------------------


@pytest.mark.parametrize("algorithms", [("none",), ("NONE",), ("RS256", "none")])
def test_settings_refuse_alg_none(algorithms: Tuple[str, ...]) -> None:
    with pytest.raises(ValueError, match="none"):
        JwtSettings(algorithms=algorithms)


@pytest.mark.parametrize("algorithms", [("HS256", "RS256"), ("ES256", "HS512")])
def test_settings_refuse_hmac_mixed_with_public_key_algorithms(
    algorithms: Tuple[str, ...],
) -> None:
    with pytest.raises(ValueError, match="mixed"):
        JwtSettings(algorithms=algorithms)


@pytest.mark.parametrize(
    "settings",
    [
        {"algorithms": ()},
        {"algorithms": ("XS256",)},
        {"algorithms": ("RS256",), "leeway": -1},
        {"algorithms": ("RS256",), "leeway": float("inf")},
        {"algorithms": ("RS256",), "audience": ()},
        {"algorithms": ("RS256",), "required_claims": ("",)},
    ],
)
def test_settings_refuse_nonsense(settings: Dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        JwtSettings(**settings)


def test_settings_take_a_single_string() -> None:
    settings = JwtSettings(algorithms="RS256", audience="api")  # type: ignore[arg-type]
    assert settings.algorithms == ("RS256",) and settings.audience == ("api",)


# --- key sources --------------------------------------------------------------------------


def test_secret_key_refuses_what_it_cannot_serve() -> None:
    with pytest.raises(ValueError):
        SecretKey(b"")
    with pytest.raises(ValueError, match="asymmetric"):
        SecretKey(public_pem(RSA_KEY))  # a public key as HMAC secret: the confusion hole
    with pytest.raises(ValueError, match="RS256"):
        JwtVerifier(JwtSettings(algorithms=("RS256",)), clock_at(), SecretKey(SECRET))
    with pytest.raises(ValueError, match="HS512 needs at least 64"):
        JwtVerifier(JwtSettings(algorithms=("HS512",)), clock_at(), SecretKey(SECRET))
    assert "0123" not in repr(SecretKey(SECRET))


def test_public_key_file_refuses_what_it_cannot_serve() -> None:
    with pytest.raises(ValueError, match="PEM"):
        PublicKeyFile(b"not a key")
    with pytest.raises(ValueError, match="PEM"):
        PublicKeyFile(
            RSA_KEY.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(ValueError, match="2048"):
        PublicKeyFile(public_pem(weak))
    for algorithms, pem in [
        (("ES256",), public_pem(RSA_KEY)),
        (("RS256",), public_pem(EC_KEY)),
        (("ES384",), public_pem(EC_KEY)),  # a P-256 key cannot verify ES384
        (("HS256",), public_pem(RSA_KEY)),
        (("RS256", "EdDSA"), public_pem(RSA_KEY)),
    ]:
        with pytest.raises(ValueError, match="cannot verify"):
            JwtVerifier(JwtSettings(algorithms=algorithms), clock_at(), PublicKeyFile(pem))


def test_public_key_file_reads_a_certificate() -> None:
    ca = trustme.CA()  # an ECDSA P-256 CA
    private = serialization.load_pem_private_key(ca.private_key_pem.bytes(), password=None)
    verifier = JwtVerifier(
        JwtSettings(algorithms=("ES256",)), clock_at(), PublicKeyFile(ca.cert_pem.bytes())
    )
    assert outcome(verifier.verify(mint(claims(), private, "ES256"))).subject == "alice"


# --- signatures and algorithms ------------------------------------------------------------

SIGNERS: List[Tuple[str, Any, KeySource]] = [
    ("HS256", SECRET, SecretKey(SECRET)),
    ("RS256", RSA_KEY, PublicKeyFile(public_pem(RSA_KEY))),
    ("PS256", RSA_KEY, PublicKeyFile(public_pem(RSA_KEY))),
    ("ES256", EC_KEY, PublicKeyFile(public_pem(EC_KEY))),
    ("EdDSA", ED_KEY, PublicKeyFile(public_pem(ED_KEY))),
]


@pytest.mark.parametrize("alg, signing, source", SIGNERS, ids=[s[0] for s in SIGNERS])
def test_valid_token_passes_synchronously(alg: str, signing: Any, source: KeySource) -> None:
    verifier = JwtVerifier(JwtSettings(algorithms=(alg,)), clock_at(), source)
    result = verifier.verify(mint(claims(scope="read write"), signing, alg, kid="ignored"))
    assert isinstance(result, Claims)  # a known key costs no Deferred
    assert result.subject == "alice"
    assert result.scopes == {"read", "write"}
    assert result.header["alg"] == alg


@pytest.mark.parametrize("alg, signing, source", SIGNERS, ids=[s[0] for s in SIGNERS])
def test_wrong_key_or_tampered_token_is_a_bad_signature(
    alg: str, signing: Any, source: KeySource
) -> None:
    verifier = JwtVerifier(JwtSettings(algorithms=(alg,)), clock_at(), source)
    header, _, signature = mint(claims(), signing, alg).split(b".")
    tampered = header + b"." + b64(json.dumps(claims(sub="mallory")).encode()) + b"." + signature
    assert refusal(verifier, tampered).reason == "bad_signature"
    other = {
        "HS256": b"another secret, just as long as the first",
        "RS256": RSA_KEY_2,
        "PS256": RSA_KEY_2,
        "ES256": ec.generate_private_key(ec.SECP256R1()),
        "EdDSA": ed25519.Ed25519PrivateKey.generate(),
    }[alg]
    error = refusal(verifier, mint(claims(), other, alg))
    assert (error.reason, error.status) == ("bad_signature", 401)


def test_alg_none_is_refused() -> None:
    verifier = JwtVerifier(
        JwtSettings(algorithms=("RS256",)), clock_at(), PublicKeyFile(public_pem(RSA_KEY))
    )
    for alg in ("none", "None", "NONE"):
        error = refusal(verifier, forge({"alg": alg, "typ": "JWT"}, claims()))
        assert (error.reason, error.status) == ("algorithm_not_allowed", 401)
    assert refusal(hs_verifier(), forge({"alg": "none"}, claims())).reason == (
        "algorithm_not_allowed"
    )


def test_algorithm_confusion_is_refused() -> None:
    # The attacker signs with HMAC, using the server's RSA public key (which is public) as
    # the secret, and hopes the verifier feeds that same PEM to HMAC.
    pem = public_pem(RSA_KEY)
    header, payload = {"alg": "HS256", "typ": "JWT"}, claims(sub="admin")
    unsigned = forge(header, payload).rsplit(b".", 1)[0]
    token = unsigned + b"." + b64(hmac.new(pem, unsigned, hashlib.sha256).digest())
    verifier = JwtVerifier(JwtSettings(algorithms=("RS256",)), clock_at(), PublicKeyFile(pem))
    error = refusal(verifier, token)
    assert (error.reason, error.status) == ("algorithm_not_allowed", 401)
    # A JWKS-backed verifier refuses it the same way.
    jwks = JwksKeys(lambda: succeed((jwks_document(rsa_jwk(RSA_KEY, "k1")), None)), clock_at())
    verifier = JwtVerifier(JwtSettings(algorithms=("RS256",)), clock_at(), jwks)
    assert refusal(verifier, token).reason == "algorithm_not_allowed"


def test_an_algorithm_not_configured_is_refused() -> None:
    verifier = JwtVerifier(
        JwtSettings(algorithms=("RS256",)), clock_at(), PublicKeyFile(public_pem(RSA_KEY))
    )
    for alg in ("RS384", "PS256"):
        assert refusal(verifier, mint(claims(), RSA_KEY, alg)).reason == "algorithm_not_allowed"


@pytest.mark.parametrize(
    "token",
    [
        b"abc",
        b"a.b",
        b"!!!.e30.sig",
        b64(b"[1, 2]") + b".e30.c2ln",
        b64(b"not json") + b".e30.c2ln",
        forge({"alg": "HS256", "kid": 7}, claims()),
        forge({"alg": "HS256", "crit": ["exp"], "exp": 1}, claims()),
        b"x" * 9000,
    ],
)
def test_malformed_tokens(token: bytes) -> None:
    error = refusal(hs_verifier(), token)
    assert (error.reason, error.status) == ("malformed", 401)


def test_claims_that_are_not_an_object_are_malformed() -> None:
    assert refusal(hs_verifier(), mint_raw([1, 2, 3])).reason == "malformed"
    assert refusal(hs_verifier(), mint_raw("alice")).reason == "malformed"


def test_empty_token_is_missing() -> None:
    assert refusal(hs_verifier(), b"").reason == "missing_token"


# --- time ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "leeway, offset, reason",
    [
        (0, -0.5, None),
        (0, 0, "expired"),  # exactly at exp: expired (RFC 7519: now must be before exp)
        (0, 1, "expired"),
        (30, 29.5, None),
        (30, 30, "expired"),  # exactly at exp + leeway
    ],
)
def test_expiry_boundary(leeway: float, offset: float, reason: Optional[str]) -> None:
    exp = NOW + 100
    clock = clock_at(exp + offset)
    verifier = hs_verifier(clock, leeway=leeway)
    token = mint(claims(exp=exp), SECRET, "HS256")
    if reason is None:
        assert outcome(verifier.verify(token)).subject == "alice"
    else:
        assert (refusal(verifier, token).reason, refusal(verifier, token).status) == (reason, 401)


@pytest.mark.parametrize(
    "leeway, offset, reason",
    [
        (0, 0, None),  # exactly at nbf: valid
        (0, -0.5, "not_yet_valid"),
        (30, -30, None),  # exactly at nbf - leeway
        (30, -30.5, "not_yet_valid"),
    ],
)
def test_not_before_boundary(leeway: float, offset: float, reason: Optional[str]) -> None:
    nbf = NOW + 100
    verifier = hs_verifier(clock_at(nbf + offset), leeway=leeway)
    token = mint(claims(nbf=nbf, exp=nbf + 3600), SECRET, "HS256")
    if reason is None:
        assert outcome(verifier.verify(token)).subject == "alice"
    else:
        assert refusal(verifier, token).reason == reason


def test_the_clock_moves_the_verdict() -> None:
    clock = clock_at()
    verifier = hs_verifier(clock)
    token = mint(claims(exp=NOW + 10), SECRET, "HS256")
    assert outcome(verifier.verify(token)).subject == "alice"
    clock.advance(10)
    assert refusal(verifier, token).reason == "expired"


def test_exp_is_required_unless_switched_off() -> None:
    token = mint(claims(exp=None), SECRET, "HS256")
    error = refusal(hs_verifier(), token)
    assert (error.reason, error.status) == ("missing_claim", 401)
    assert outcome(hs_verifier(require_expiry=False).verify(token)).subject == "alice"


@pytest.mark.parametrize(
    "name, value", [("exp", "tomorrow"), ("exp", True), ("nbf", [1]), ("iat", "x")]
)
def test_time_claims_must_be_numbers(name: str, value: Any) -> None:
    token = mint(claims(**{name: value}), SECRET, "HS256")
    assert refusal(hs_verifier(), token).reason == "malformed"


# --- issuer and audience ------------------------------------------------------------------


@pytest.mark.parametrize(
    "iss, passes",
    [
        ("https://idp.example", True),
        ("https://idp.example.evil", False),
        ("https://idp", False),
        (None, False),
        (["https://idp.example"], False),
    ],
)
def test_issuer(iss: Any, passes: bool) -> None:
    verifier = hs_verifier(issuer="https://idp.example")
    token = mint_raw(claims(iss=iss))
    if passes:
        assert outcome(verifier.verify(token)).subject == "alice"
    else:
        assert (refusal(verifier, token).reason, refusal(verifier, token).status) == (
            "bad_issuer",
            401,
        )


@pytest.mark.parametrize(
    "configured, aud, reason",
    [
        (("api",), "api", None),
        (("api", "admin"), ["other", "admin"], None),
        (("api",), "ap", "bad_audience"),
        (("api",), ["other"], "bad_audience"),
        (("api",), None, "bad_audience"),
        (("api",), [], "bad_audience"),
        (None, None, None),
        (None, "api", "bad_audience"),  # RFC 7519 4.1.3: an audience we are not is refused
        (("api",), [1], "malformed"),
    ],
)
def test_audience(configured: Any, aud: Any, reason: Optional[str]) -> None:
    verifier = hs_verifier(audience=configured)
    token = mint(claims(aud=aud), SECRET, "HS256")
    if reason is None:
        assert outcome(verifier.verify(token)).subject == "alice"
    else:
        assert refusal(verifier, token).reason == reason


# --- required claims and scopes: 401 or 403 -----------------------------------------------


@pytest.mark.parametrize(
    "token_claims, reason, status",
    [
        (claims(tenant="acme"), None, None),
        (claims(sub=None, tenant="acme"), "missing_claim", 401),  # registered: a token defect
        (claims(), "missing_claim", 403),  # private: a valid identity lacking permission
        (claims(tenant=None), "missing_claim", 403),
        (claims(exp=NOW - 1), "expired", 401),  # token defects come before permissions
    ],
)
def test_required_claims(token_claims: Dict[str, Any], reason: Any, status: Any) -> None:
    verifier = hs_verifier(required_claims=("sub", "tenant"))
    token = mint(token_claims, SECRET, "HS256")
    if reason is None:
        assert outcome(verifier.verify(token)).payload["tenant"] == "acme"
    else:
        error = refusal(verifier, token)
        assert (error.reason, error.status) == (reason, status)
        assert error.oauth_error == ("insufficient_scope" if status == 403 else "invalid_token")


def test_null_claim_counts_as_missing() -> None:
    token = jwt.encode({**claims(), "tenant": None}, SECRET, algorithm="HS256").encode()
    assert refusal(hs_verifier(required_claims=("tenant",)), token).status == 403


@pytest.mark.parametrize(
    "token_claims, passes",
    [
        (claims(scope="read write admin"), True),
        (claims(scp=["write", "read"]), True),
        (claims(scope="read"), False),
        (claims(scope="readwrite"), False),
        (claims(), False),
    ],
)
def test_required_scopes(token_claims: Dict[str, Any], passes: bool) -> None:
    verifier = hs_verifier(required_scopes=("read", "write"))
    token = mint(token_claims, SECRET, "HS256")
    if passes:
        assert outcome(verifier.verify(token)).subject == "alice"
    else:
        error = refusal(verifier, token)
        assert (error.reason, error.status) == ("insufficient_scope", 403)


def test_oauth_error_codes() -> None:
    assert AuthError("missing_token").oauth_error is None
    assert AuthError("expired").oauth_error == "invalid_token"
    assert AuthError("insufficient_scope", 403).oauth_error == "insufficient_scope"


def test_verify_deferred_always_gives_a_deferred() -> None:
    verifier = hs_verifier()
    good = verifier.verify_deferred(mint(claims(), SECRET, "HS256"))
    assert isinstance(good, Deferred) and outcome(good).subject == "alice"
    bad = verifier.verify_deferred(b"a.b.c")
    assert isinstance(bad, Deferred)
    with pytest.raises(AuthError):
        outcome(bad)


# --- the cache of verified tokens -------------------------------------------------------


class _SwitchableKey:
    """A key source whose one key can be replaced (a rotation), counting key look-ups."""

    def __init__(self, key: bytes) -> None:
        self.current = key

    def check_algorithms(self, algorithms: Tuple[str, ...]) -> None:
        pass

    def refresh_due(self) -> bool:
        return False

    def key(self, kid: Optional[str], algorithm: str) -> Any:
        return self.current

    def refresh(self) -> None:
        return None


def test_a_token_seen_before_skips_the_signature_but_never_the_clock(monkeypatch: Any) -> None:
    clock = clock_at()
    verifier = hs_verifier(clock)
    token = mint(claims(exp=NOW + 10), SECRET, "HS256")
    assert outcome(verifier.verify(token)).subject == "alice"
    decodes: List[Any] = []
    original = verifier._jws.decode_complete
    monkeypatch.setattr(
        verifier._jws, "decode_complete", lambda *a, **k: decodes.append(1) or original(*a, **k)
    )
    for _ in range(3):
        assert outcome(verifier.verify(token)).subject == "alice"
    assert decodes == [] and verifier.cache_hits == 3
    clock.advance(10)
    assert refusal(verifier, token).reason == "expired"


def test_a_rotated_key_makes_a_cached_token_verify_again() -> None:
    source = _SwitchableKey(SECRET)
    verifier = JwtVerifier(JwtSettings(algorithms=("HS256",)), clock_at(), source)  # type: ignore[arg-type]
    token = mint(claims(), SECRET, "HS256")
    assert outcome(verifier.verify(token)).subject == "alice"
    source.current = b"another secret of at least thirty-two bytes!"
    assert refusal(verifier, token).reason == "bad_signature"


def test_the_cache_is_bounded() -> None:
    verifier = JwtVerifier(
        JwtSettings(algorithms=("HS256",)), clock_at(), SecretKey(SECRET), cache_size=2
    )
    tokens = [mint(claims(sub=f"u{i}"), SECRET, "HS256") for i in range(5)]
    for token in tokens:
        outcome(verifier.verify(token))
    assert list(verifier._verified) == tokens[-2:]
