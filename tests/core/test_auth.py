"""Tests for bungate.core.auth: JWT verification, JWKS caching, API keys, token extraction."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import jwt
import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from bungate.core import auth
from bungate.core.auth import (
    ApiKeys,
    AuthError,
    Claims,
    JwksKeys,
    JwtSettings,
    JwtVerifier,
    KeySource,
    PublicKeyFile,
    SecretKey,
    cache_lifetime,
    extract_token,
    parse_api_key_file,
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


# --- JWKS ---------------------------------------------------------------------------------


def rsa_jwk(private: rsa.RSAPrivateKey, kid: Optional[str], **extra: Any) -> Dict[str, Any]:
    jwk = RSAAlgorithm.to_jwk(private.public_key(), as_dict=True)
    if kid is not None:
        jwk["kid"] = kid
    jwk.update(extra)
    return jwk


def jwks_document(*keys: Mapping[str, Any]) -> bytes:
    return json.dumps({"keys": list(keys)}).encode()


class FakeIdP:
    """A JWKS endpoint: serves ``keys``, or hangs (``manual``), or is down."""

    def __init__(self, *keys: Mapping[str, Any], lifetime: Optional[float] = None) -> None:
        self.keys = list(keys)
        self.lifetime = lifetime
        self.down = False
        self.manual = False
        self.body: Optional[bytes] = None
        self.calls = 0
        self.pending: List[Deferred[Tuple[bytes, Optional[float]]]] = []

    def fetch(self) -> Deferred[Tuple[bytes, Optional[float]]]:
        self.calls += 1
        if self.manual:
            d: Deferred[Tuple[bytes, Optional[float]]] = Deferred()
            self.pending.append(d)
            return d
        if self.down:
            return fail(ConnectionRefusedError("JWKS server down"))
        return succeed((self.body or jwks_document(*self.keys), self.lifetime))

    def answer(self) -> None:
        for d in self.pending:
            d.callback((jwks_document(*self.keys), self.lifetime))
        self.pending = []


def jwks_verifier(
    idp: FakeIdP, clock: Clock, algorithms: Tuple[str, ...] = ("RS256",), **options: Any
) -> Tuple[JwtVerifier, JwksKeys]:
    keys = JwksKeys(idp.fetch, clock, **options)
    return JwtVerifier(JwtSettings(algorithms=algorithms), clock, keys), keys


def test_jwks_first_use_fetches_then_cached_key_is_synchronous() -> None:
    idp = FakeIdP(rsa_jwk(RSA_KEY, "k1"))
    verifier, keys = jwks_verifier(idp, clock_at())
    token = mint(claims(), RSA_KEY, "RS256", kid="k1")
    first = verifier.verify(token)
    assert isinstance(first, Deferred) and outcome(first).subject == "alice"
    again = verifier.verify(token)
    assert isinstance(again, Claims)
    assert idp.calls == 1 and keys.fetches == 1 and keys.key_ids == {"k1"}


def test_jwks_kid_rotation_refetches_once() -> None:
    clock = clock_at()
    idp = FakeIdP(rsa_jwk(RSA_KEY, "k1"))
    verifier, _ = jwks_verifier(idp, clock, min_refetch_interval=30)
    outcome(verifier.verify(mint(claims(), RSA_KEY, "RS256", kid="k1")))
    clock.advance(31)
    idp.keys.append(rsa_jwk(RSA_KEY_2, "k2"))
    new = mint(claims(), RSA_KEY_2, "RS256", kid="k2")
    assert outcome(verifier.verify(new)).subject == "alice"
    assert idp.calls == 2
    assert isinstance(verifier.verify(new), Claims)
    assert idp.calls == 2


def test_unknown_kid_refetch_is_rate_limited() -> None:
    clock = clock_at()
    idp = FakeIdP(rsa_jwk(RSA_KEY, "k1"))
    verifier, _ = jwks_verifier(idp, clock, min_refetch_interval=30)
    outcome(verifier.verify(mint(claims(), RSA_KEY, "RS256", kid="k1")))
    clock.advance(31)
    assert refusal(verifier, mint(claims(), RSA_KEY_2, "RS256", kid="x1")).reason == "unknown_key"
    assert idp.calls == 2
    # A second unknown kid within min_refetch_interval: refused at once, no fetch.
    clock.advance(29.9)
    for kid in ("x2", "x3", "k2"):
        with pytest.raises(AuthError) as info:
            verifier.verify(mint(claims(), RSA_KEY_2, "RS256", kid=kid))
        assert info.value.reason == "unknown_key"
    assert idp.calls == 2
    # Once the interval has passed, a miss may fetch again, and a new key is found.
    clock.advance(0.1)
    idp.keys.append(rsa_jwk(RSA_KEY_2, "k2"))
    assert outcome(verifier.verify(mint(claims(), RSA_KEY_2, "RS256", kid="k2"))).subject
    assert idp.calls == 3


def test_concurrent_misses_share_one_fetch() -> None:
    idp = FakeIdP(rsa_jwk(RSA_KEY, "k1"), rsa_jwk(RSA_KEY_2, "k2"))
    idp.manual = True
    verifier, _ = jwks_verifier(idp, clock_at())
    waiting = [
        verifier.verify(mint(claims(sub=f"user{n}"), key, "RS256", kid=kid))
        for n, (key, kid) in enumerate([(RSA_KEY, "k1"), (RSA_KEY_2, "k2"), (RSA_KEY, "k1")])
    ]
    unknown = verifier.verify(mint(claims(), RSA_KEY, "RS256", kid="nope"))
    assert all(isinstance(d, Deferred) for d in [*waiting, unknown])
    assert idp.calls == 1
    idp.answer()
    assert [outcome(d).subject for d in waiting] == ["user0", "user1", "user2"]
    with pytest.raises(AuthError) as info:
        outcome(unknown)
    assert info.value.reason == "unknown_key"
    assert idp.calls == 1


def test_jwks_down_keeps_the_last_good_set() -> None:
    clock = clock_at()
    idp = FakeIdP(rsa_jwk(RSA_KEY, "k1"), lifetime=60)
    verifier, keys = jwks_verifier(idp, clock)
    old = mint(claims(exp=NOW + 7200), RSA_KEY, "RS256", kid="k1")
    outcome(verifier.verify(old))
    idp.down = True
    clock.advance(61)  # the set is stale: the next request tries a refresh, which fails
    assert outcome(verifier.verify(old)).subject == "alice"
    assert idp.calls == 2 and keys.last_error is not None and "down" in keys.last_error
    assert isinstance(verifier.verify(old), Claims)  # no refetch storm while down
    error = refusal(verifier, mint(claims(), RSA_KEY_2, "RS256", kid="k2"))
    assert (error.reason, error.status) == ("unknown_key", 401)
    clock.advance(30)
    assert refusal(verifier, mint(claims(), RSA_KEY_2, "RS256", kid="k2")).reason == "unknown_key"
    assert idp.calls == 3
    assert outcome(verifier.verify(old)).subject == "alice"


def test_jwks_down_from_the_start_refuses() -> None:
    idp = FakeIdP(rsa_jwk(RSA_KEY, "k1"))
    idp.down = True
    verifier, _ = jwks_verifier(idp, clock_at())
    assert refusal(verifier, mint(claims(), RSA_KEY, "RS256", kid="k1")).reason == "unknown_key"


@pytest.mark.parametrize("body", [b"<html>oops</html>", b'{"keys": 5}', b"[]"])
def test_unreadable_jwks_keeps_the_last_good_set(body: bytes) -> None:
    clock = clock_at()
    idp = FakeIdP(rsa_jwk(RSA_KEY, "k1"), lifetime=10)
    verifier, keys = jwks_verifier(idp, clock)
    token = mint(claims(), RSA_KEY, "RS256", kid="k1")
    outcome(verifier.verify(token))
    idp.body = body
    clock.advance(30)
    assert outcome(verifier.verify(token)).subject == "alice"
    assert idp.calls == 2 and keys.last_error is not None


def test_jwks_cache_lifetime_from_max_age() -> None:
    clock = clock_at()
    idp = FakeIdP(rsa_jwk(RSA_KEY, "k1"), lifetime=cache_lifetime({"Cache-Control": "max-age=120"}))
    verifier, _ = jwks_verifier(idp, clock, default_ttl=300)
    token = mint(claims(exp=NOW + 7200), RSA_KEY, "RS256", kid="k1")
    outcome(verifier.verify(token))
    clock.advance(119.5)
    assert isinstance(verifier.verify(token), Claims) and idp.calls == 1
    clock.advance(0.5)
    assert outcome(verifier.verify(token)).subject == "alice" and idp.calls == 2
    clock.advance(119.5)
    assert isinstance(verifier.verify(token), Claims) and idp.calls == 2


def test_jwks_default_and_maximum_lifetime() -> None:
    clock = clock_at()
    idp = FakeIdP(rsa_jwk(RSA_KEY, "k1"))
    verifier, _ = jwks_verifier(idp, clock, default_ttl=300, max_ttl=3600)
    token = mint(claims(exp=NOW + 90000), RSA_KEY, "RS256", kid="k1")
    outcome(verifier.verify(token))
    clock.advance(299)
    assert isinstance(verifier.verify(token), Claims) and idp.calls == 1
    clock.advance(1)  # no max-age: default_ttl
    outcome(verifier.verify(token))
    assert idp.calls == 2
    idp.lifetime = 10.0**9
    clock.advance(300)
    outcome(verifier.verify(token))
    assert idp.calls == 3
    clock.advance(3599)
    assert isinstance(verifier.verify(token), Claims) and idp.calls == 3
    clock.advance(1)  # a lifetime of 10**9 s is capped at max_ttl
    outcome(verifier.verify(token))
    assert idp.calls == 4


def test_a_key_removed_from_the_jwks_stops_working() -> None:
    clock = clock_at()
    idp = FakeIdP(rsa_jwk(RSA_KEY, "k1"), lifetime=60)
    verifier, _ = jwks_verifier(idp, clock)
    token = mint(claims(exp=NOW + 7200), RSA_KEY, "RS256", kid="k1")
    outcome(verifier.verify(token))
    idp.keys = [rsa_jwk(RSA_KEY_2, "k2")]
    clock.advance(60)
    assert refusal(verifier, token).reason == "unknown_key"


def test_jwks_keys_must_fit_the_algorithm() -> None:
    clock = clock_at()
    ec_jwk = ECAlgorithm.to_jwk(EC_KEY.public_key(), as_dict=True)
    ed_jwk = OKPAlgorithm.to_jwk(ED_KEY.public_key(), as_dict=True)
    idp = FakeIdP(
        rsa_jwk(RSA_KEY, "rs", alg="RS256"),
        rsa_jwk(RSA_KEY, "any-rsa"),
        {**ec_jwk, "kid": "ec"},
        {**ec_jwk, "kid": "ec-lies", "alg": "RS256"},  # kty EC cannot be RS256: skipped
        {**ed_jwk, "kid": "ed"},
        rsa_jwk(RSA_KEY, "enc", use="enc"),
        rsa_jwk(RSA_KEY, "no-verify", key_ops=["encrypt"]),
        {"kty": "oct", "k": b64(SECRET).decode(), "kid": "oct"},
        rsa_jwk(RSA_KEY, "bad-alg", alg="none"),
        {"kty": "RSA", "kid": "broken", "n": "AQAB"},
        "not a key",
    )
    verifier, keys = jwks_verifier(idp, clock, algorithms=("RS256", "PS256", "ES256"))

    def verdict(key: Any, alg: str, kid: str) -> str:
        try:
            outcome(verifier.verify(mint(claims(), key, alg, kid=kid)))
        except AuthError as error:
            return error.reason
        return "ok"

    assert verdict(RSA_KEY, "RS256", "rs") == "ok"
    assert keys.key_ids == {"rs", "any-rsa", "ec", "ed"}
    assert keys.skipped_keys == 7
    assert verdict(RSA_KEY, "PS256", "rs") == "unknown_key"  # the key says alg RS256
    assert verdict(RSA_KEY, "PS256", "any-rsa") == "ok"  # no alg: any RSA algorithm
    assert verdict(EC_KEY, "ES256", "ec") == "ok"
    assert verdict(RSA_KEY, "RS256", "ec") == "unknown_key"  # an EC key for RS256
    assert verdict(ED_KEY, "EdDSA", "ed") == "algorithm_not_allowed"
    assert verdict(RSA_KEY, "RS256", "enc") == "unknown_key"
    assert verdict(RSA_KEY, "RS256", "oct") == "unknown_key"


def test_jwks_cannot_serve_hmac() -> None:
    with pytest.raises(ValueError, match="HS256"):
        jwks_verifier(FakeIdP(), clock_at(), algorithms=("HS256",))


def test_token_without_kid_needs_one_unambiguous_key() -> None:
    idp = FakeIdP(rsa_jwk(RSA_KEY, None))
    verifier, _ = jwks_verifier(idp, clock_at())
    assert outcome(verifier.verify(mint(claims(), RSA_KEY, "RS256"))).subject == "alice"
    idp2 = FakeIdP(rsa_jwk(RSA_KEY, None), rsa_jwk(RSA_KEY_2, None))
    verifier2, _ = jwks_verifier(idp2, clock_at())
    assert refusal(verifier2, mint(claims(), RSA_KEY, "RS256")).reason == "unknown_key"


def test_jwks_fetch_that_raises_is_a_failed_fetch() -> None:
    def broken() -> Deferred[Tuple[bytes, Optional[float]]]:
        raise RuntimeError("no route")

    keys = JwksKeys(broken, clock_at())
    verifier = JwtVerifier(JwtSettings(algorithms=("RS256",)), clock_at(), keys)
    assert refusal(verifier, mint(claims(), RSA_KEY, "RS256", kid="k1")).reason == "unknown_key"
    assert keys.last_error is not None and "no route" in keys.last_error


@pytest.mark.parametrize("option", ["min_refetch_interval", "default_ttl", "max_ttl"])
def test_jwks_refuses_negative_intervals(option: str) -> None:
    with pytest.raises(ValueError, match=option):
        JwksKeys(FakeIdP().fetch, clock_at(), **{option: -1})


@pytest.mark.parametrize(
    "headers, expected",
    [
        ({}, None),
        ({"Content-Type": "application/json"}, None),
        ({"Cache-Control": "max-age=600"}, 600.0),
        ({"cache-control": "public, max-age=60, must-revalidate"}, 60.0),
        ({"CACHE-CONTROL": 'MAX-AGE="30"'}, 30.0),
        ({"Cache-Control": "max-age=600, no-cache"}, 0.0),
        ({"Cache-Control": "no-store"}, 0.0),
        ({"Cache-Control": "max-age=-5"}, 0.0),
        ({"Cache-Control": "max-age=soon"}, 0.0),
        ({"Cache-Control": "max-age=100, max-age=50"}, 50.0),
        ({"Cache-Control": "public"}, None),
        ({"Cache-Control": "s-maxage=60"}, None),
    ],
)
def test_cache_lifetime(headers: Dict[str, str], expected: Optional[float]) -> None:
    assert cache_lifetime(headers) == expected


# --- API keys -----------------------------------------------------------------------------

KEY_A = "ak_live_0123456789abcdef"
KEY_B = "ak_live_fedcba9876543210"


def test_api_keys_match_names() -> None:
    keys = ApiKeys.parse([{"key": KEY_A, "name": "billing"}, KEY_B, {"key": KEY_A + "x"}])
    assert keys.match(KEY_A.encode()) == "billing"
    assert keys.match(KEY_B.encode()) == "api-key"
    assert keys.match((KEY_A + "x").encode()) == "api-key"
    assert ApiKeys.parse([KEY_B], default_name="anon").match(KEY_B.encode()) == "anon"


@pytest.mark.parametrize(
    "presented",
    [
        b"",
        b"wrong-key-0123456789",
        KEY_A[:-1].encode(),  # a prefix of a stored key
        KEY_A[:1].encode(),
        (KEY_B + "0").encode(),  # a stored key plus more
        KEY_A.upper().encode(),
        KEY_A.encode() + b"\n",
    ],
)
def test_api_keys_refuse(presented: bytes) -> None:
    assert ApiKeys.parse([{"key": KEY_A, "name": "billing"}, KEY_B]).match(presented) is None


def test_api_keys_compare_every_stored_key(monkeypatch: pytest.MonkeyPatch) -> None:
    keys = ApiKeys.parse([KEY_A, KEY_B, KEY_A + "1", KEY_A + "2"])
    compared: List[Tuple[bytes, bytes]] = []
    original = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return original(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    assert keys.match(KEY_A.encode()) == "api-key"  # the first key matches...
    assert len(compared) == 4  # ...and still every key is compared
    # Digests are compared, so the comparison length never depends on the presented key.
    assert {len(a) for a, _ in compared} == {32}
    compared.clear()
    assert keys.match(b"x" * 1000) is None and {len(a) for a, _ in compared} == {32}


@pytest.mark.parametrize(
    "entries, message",
    [
        ([""], "empty"),
        ([{"name": "x"}], "empty"),
        (["short"], "shorter"),
        ([KEY_A + " "], "whitespace"),
        (["ak_live_\u00e9\u00e9\u00e9\u00e9\u00e9\u00e9\u00e9\u00e9\u00e9"], "ASCII"),
        ([KEY_A, {"key": KEY_A, "name": "again"}], "twice"),
        ([{"key": KEY_A, "nmae": "typo"}], "unknown fields"),
        ([{"key": KEY_A, "name": ""}], "name"),
        ([42], "string or a mapping"),
    ],
)
def test_api_keys_parse_refuses(entries: List[Any], message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        ApiKeys.parse(entries)
    assert KEY_A not in str(info.value)


def test_api_keys_repr_hides_keys() -> None:
    keys = ApiKeys.parse([KEY_A])
    assert KEY_A not in repr(keys) and hashlib.sha256(KEY_A.encode()).hexdigest() not in repr(keys)


def test_parse_api_key_file() -> None:
    text = f"""
    # billing's key
    billing {KEY_A}

    {KEY_B}
      # indented comment
    """
    keys = parse_api_key_file(text)
    assert keys.match(KEY_A.encode()) == "billing"
    assert keys.match(KEY_B.encode()) == "api-key"
    assert len(keys.digests) == 2


@pytest.mark.parametrize(
    "text, message",
    [
        (f"# c\nbilling {KEY_A} extra\n", "line 2: expected"),
        (f"{KEY_A}\n\nbilling short\n", "line 3"),
        (f"a {KEY_A}\nb {KEY_A}\n", "line 2"),
    ],
)
def test_parse_api_key_file_refuses(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        parse_api_key_file(text)
    assert KEY_A not in str(info.value) and "short" not in str(info.value).split(":", 1)[0]


# --- token extraction ---------------------------------------------------------------------


def extract(
    headers: Optional[Dict[bytes, List[bytes]]] = None,
    query: Optional[Dict[bytes, List[bytes]]] = None,
    cookies: Optional[Dict[bytes, bytes]] = None,
    **where: Any,
) -> Optional[bytes]:
    return extract_token(headers or {}, query or {}, cookies or {}, **where)


@pytest.mark.parametrize(
    "value, expected",
    [
        (b"Bearer abc.def.ghi", b"abc.def.ghi"),
        (b"bearer abc.def.ghi", b"abc.def.ghi"),
        (b"BEARER   abc-_~+/=", b"abc-_~+/="),
        (b"  Bearer abc  ", b"abc"),
        (b"Basic dXNlcjpwYXNz", None),  # another scheme is no bearer token
        (b"Bearerabc", None),
    ],
)
def test_extract_bearer(value: bytes, expected: Optional[bytes]) -> None:
    assert extract({b"authorization": [value]}) == expected


@pytest.mark.parametrize(
    "value", [b"Bearer", b"Bearer ", b"Bearer a b", b"Bearer a,b", b"Bearer \xff"]
)
def test_extract_broken_bearer(value: bytes) -> None:
    with pytest.raises(AuthError) as info:
        extract({b"authorization": [value]})
    assert (info.value.reason, info.value.status) == ("malformed", 401)


def test_extract_two_authorization_headers_is_malformed() -> None:
    with pytest.raises(AuthError) as info:
        extract({b"authorization": [b"Bearer a", b"Bearer b"]})
    assert info.value.reason == "malformed"


def test_extract_nothing() -> None:
    assert extract() is None
    assert extract({b"authorization": []}) is None
    # The query string is not read unless asked for: tokens in URLs end up in logs.
    assert extract(query={b"access_token": [b"abc"]}) is None


def test_extract_other_places() -> None:
    assert extract({b"x-api-key": [b" k1 "]}, header=b"X-API-Key") == b"k1"
    assert extract(query={b"token": [b"q1"]}, header=None, query_param=b"token") == b"q1"
    assert extract(cookies={b"session": b"c1"}, header=None, cookie=b"session") == b"c1"
    with pytest.raises(AuthError):
        extract(query={b"token": [b"q1", b"q2"]}, query_param=b"token")
    with pytest.raises(AuthError):
        extract({b"x-api-key": [b""]}, header=b"x-api-key")


def test_extract_refuses_tokens_in_two_places() -> None:
    with pytest.raises(AuthError) as info:
        extract({b"authorization": [b"Bearer a"]}, query={b"token": [b"b"]}, query_param=b"token")
    assert info.value.reason == "malformed"
