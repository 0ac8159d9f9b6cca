"""Tests for bungate.core.auth.jwks: fetching, caching and rotating JSON Web Key Sets."""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Tuple

import pytest
from jwt.algorithms import ECAlgorithm, OKPAlgorithm
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from bungate.core.auth import (
    AuthError,
    Claims,
    JwksKeys,
    JwtSettings,
    JwtVerifier,
    cache_lifetime,
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
    jwks_document,
    mint,
    outcome,
    refusal,
    rsa_jwk,
)


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


DATE = "Tue, 14 Nov 2023 22:13:20 GMT"  # NOW
IN_AN_HOUR = "Tue, 14 Nov 2023 23:13:20 GMT"


@pytest.mark.parametrize(
    "headers, now, expected",
    [
        ({"Expires": IN_AN_HOUR, "Date": DATE}, None, 3600.0),
        ({"expires": IN_AN_HOUR}, NOW, 3600.0),  # no Date: from the time received
        ({"Expires": IN_AN_HOUR}, None, None),  # neither: not read
        ({"Expires": IN_AN_HOUR, "Date": "yesterday"}, NOW + 600, 3000.0),
        ({"Expires": DATE, "Date": IN_AN_HOUR}, None, 0.0),  # in the past
        ({"Expires": "0", "Date": DATE}, None, 0.0),  # not a date: already expired
        ({"Expires": "Tue, 14 Nov 2023 23:13:20 -0000"}, NOW, 3600.0),
        ({"Expires": IN_AN_HOUR, "Cache-Control": "max-age=60"}, NOW, 60.0),  # max-age wins
        ({"Expires": IN_AN_HOUR, "Cache-Control": "no-cache"}, NOW, 0.0),
        ({"Expires": IN_AN_HOUR, "Cache-Control": "public"}, NOW, 3600.0),
        ({"Cache-Control": "max-age=60"}, NOW, 60.0),
    ],
)
def test_cache_lifetime_from_expires(
    headers: Dict[str, str], now: Optional[float], expected: Optional[float]
) -> None:
    assert cache_lifetime(headers, now=now) == expected
