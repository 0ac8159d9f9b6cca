"""
Tests for bungate.http.policy.auth: the auth policy built from real config sections, on
real twisted.web requests, with the JWKS served by a real local twisted.web server.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple
from urllib.parse import parse_qs

import pytest
import pytest_twisted
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.web import http, server
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.test.requesthelper import DummyChannel

from bungate.config import ConfigError, parse_config
from bungate.config.policy import AuthConfig
from bungate.core.auth import AuthError
from bungate.http.policy.auth import MAX_JWKS_BYTES, AuthPolicy, Identity
from bungate.http.site import GatewayRequest
from tests.core.auth.helpers import (
    EC_KEY,
    NOW,
    RSA_KEY,
    RSA_KEY_2,
    SECRET,
    b64,
    claims,
    clock_at,
    forge,
    jwks_document,
    mint,
    public_pem,
    rsa_jwk,
)

SOURCE = "/etc/bungate/gateway.yaml"
KEY_A = "ak_live_0123456789abcdef"
KEY_B = "ak_live_fedcba9876543210"
HS_TOKEN = mint(claims(), SECRET, "HS256")


def section(auth: Mapping[str, Any]) -> AuthConfig:
    """An ``auth`` section, read by the real config parser."""
    config = parse_config(
        {"auth": dict(auth), "routes": [{"pattern": "/*", "target": "http://127.0.0.1:9"}]}
    )
    assert config.auth is not None
    return config.auth


def policy_for(
    auth: Mapping[str, Any], clock: Optional[Clock] = None, **options: Any
) -> AuthPolicy:
    return AuthPolicy.build(
        section(auth),
        source=SOURCE,
        key="auth",
        reactor=reactor,
        clock=clock or clock_at(),
        **options,
    )


def hs_policy(**auth: Any) -> AuthPolicy:
    return policy_for({"jwt": {"algorithms": ["HS256"], "secret": SECRET.decode()}, **auth})


def request(
    path: bytes = b"/api/orders",
    headers: Optional[Mapping[bytes, List[bytes]]] = None,
    query: bytes = b"",
) -> GatewayRequest:
    """A real request as the site hands it to the dispatcher: headers, args, cookies, path."""
    req = GatewayRequest(DummyChannel())
    req.method = b"GET"
    req.uri = path + (b"?" + query if query else b"")
    req.path = path
    for name, values in (headers or {}).items():
        req.requestHeaders.setRawHeaders(name, values)
    req.args = parse_qs(query, keep_blank_values=True)
    req.parseCookies()
    return req


def bearer(token: bytes) -> Dict[bytes, List[bytes]]:
    return {b"authorization": [b"Bearer " + token]}


def now(result: Any) -> Any:
    """The outcome of an authenticate() that must not have waited."""
    assert not isinstance(result, Deferred), "authenticate() waited for the network"
    return result


def refused(policy: AuthPolicy, req: GatewayRequest) -> AuthError:
    with pytest.raises(AuthError) as info:
        result = policy.authenticate(req)
        if isinstance(result, Deferred):
            fired: List[Any] = []
            result.addBoth(fired.append)
            assert fired, "still waiting"
            fired[0].raiseException()
    return info.value


# --- JWT with a static key ------------------------------------------------------------------


def test_hs256_inline_secret_passes_synchronously() -> None:
    identity = now(hs_policy().authenticate(request(headers=bearer(HS_TOKEN))))
    assert isinstance(identity, Identity)
    assert (identity.kind, identity.subject, identity.claims["exp"]) == ("jwt", "alice", NOW + 3600)


def test_hs256_secret_file_loses_its_trailing_newline(tmp_path: Path) -> None:
    path = tmp_path / "jwt.secret"
    path.write_bytes(SECRET + b"\n")
    policy = policy_for({"jwt": {"algorithms": ["HS256"], "secret_file": str(path)}})
    assert now(policy.authenticate(request(headers=bearer(HS_TOKEN)))).subject == "alice"


def test_hs256_secret_env() -> None:
    policy = policy_for(
        {"jwt": {"algorithms": ["HS256"], "secret_env": "JWT_SECRET"}},
        environ={"JWT_SECRET": SECRET.decode()},
    )
    assert now(policy.authenticate(request(headers=bearer(HS_TOKEN)))).subject == "alice"


def test_secret_env_is_read_from_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BUNGATE_TEST_JWT_SECRET", SECRET.decode())
    policy = policy_for({"jwt": {"algorithms": ["HS256"], "secret_env": "BUNGATE_TEST_JWT_SECRET"}})
    assert now(policy.authenticate(request(headers=bearer(HS_TOKEN)))).subject == "alice"


@pytest.mark.parametrize("alg, private", [("RS256", RSA_KEY), ("ES256", EC_KEY)])
def test_public_key_pem_file(tmp_path: Path, alg: str, private: Any) -> None:
    path = tmp_path / "idp.pem"
    path.write_bytes(public_pem(private))
    policy = policy_for({"jwt": {"algorithms": [alg], "public_key": str(path)}})
    token = mint(claims(sub="bob"), private, alg)
    assert now(policy.authenticate(request(headers=bearer(token)))).subject == "bob"
    other = RSA_KEY_2 if alg == "RS256" else ec.generate_private_key(ec.SECP256R1())
    assert refused(policy, request(headers=bearer(mint(claims(), other, alg)))).reason == (
        "bad_signature"
    )


def test_the_clock_decides_expiry() -> None:
    clock = clock_at()
    policy = policy_for(
        {"jwt": {"algorithms": ["HS256"], "secret": SECRET.decode(), "leeway": 5}}, clock
    )
    token = mint(claims(exp=NOW + 60), SECRET, "HS256")
    assert now(policy.authenticate(request(headers=bearer(token)))).subject == "alice"
    clock.advance(64)
    assert now(policy.authenticate(request(headers=bearer(token)))).subject == "alice"
    clock.advance(1)
    error = refused(policy, request(headers=bearer(token)))
    assert (error.reason, error.status) == ("expired", 401)


def test_issuer_audience_scopes_and_claims_come_from_the_section() -> None:
    policy = policy_for(
        {
            "jwt": {
                "algorithms": ["HS256"],
                "secret": SECRET.decode(),
                "issuer": "https://idp.example",
                "audience": "orders",
                "required_claims": ["tenant"],
                "required_scopes": ["orders:read"],
            }
        }
    )
    good = claims(iss="https://idp.example", aud="orders", tenant="acme", scope="orders:read")
    assert now(policy.authenticate(request(headers=bearer(mint(good, SECRET, "HS256")))))
    for change, reason, status in [
        ({"iss": "https://evil.example"}, "bad_issuer", 401),
        ({"aud": "billing"}, "bad_audience", 401),
        ({"tenant": None}, "missing_claim", 403),
        ({"scope": "orders:write"}, "insufficient_scope", 403),
    ]:
        token = mint(
            {k: v for k, v in {**good, **change}.items() if v is not None}, SECRET, "HS256"
        )
        error = refused(policy, request(headers=bearer(token)))
        assert (error.reason, error.status) == (reason, status)


def test_alg_none_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "idp.pem"
    path.write_bytes(public_pem(RSA_KEY))
    for policy in (
        hs_policy(),
        policy_for({"jwt": {"algorithms": ["RS256"], "public_key": str(path)}}),
    ):
        for alg in ("none", "None"):
            token = forge({"alg": alg, "typ": "JWT"}, claims(sub="admin"))
            error = refused(policy, request(headers=bearer(token)))
            assert (error.reason, error.status) == ("algorithm_not_allowed", 401)


def test_hmac_signed_with_the_public_key_is_refused(tmp_path: Path) -> None:
    """The algorithm-confusion attack: HS256 with the (public) RSA key as the secret."""
    pem = public_pem(RSA_KEY)
    path = tmp_path / "idp.pem"
    path.write_bytes(pem)
    policy = policy_for({"jwt": {"algorithms": ["RS256"], "public_key": str(path)}})
    unsigned = forge({"alg": "HS256", "typ": "JWT"}, claims(sub="admin")).rsplit(b".", 1)[0]
    token = unsigned + b"." + b64(hmac.new(pem, unsigned, hashlib.sha256).digest())
    error = refused(policy, request(headers=bearer(token)))
    assert (error.reason, error.status) == ("algorithm_not_allowed", 401)
    # And an RS256 token against an HMAC section is refused as well.
    rs = mint(claims(), RSA_KEY, "RS256")
    assert refused(hs_policy(), request(headers=bearer(rs))).reason == "algorithm_not_allowed"


@pytest.mark.parametrize(
    "headers, reason",
    [
        ({}, "missing_token"),
        ({b"authorization": [b"Basic dXNlcjpwYXNz"]}, "missing_token"),  # not a token
        ({b"authorization": [b"Bearer "]}, "malformed"),
        ({b"authorization": [b"Bearer a", b"Bearer b"]}, "malformed"),
        ({b"authorization": [b"Bearer not-a-jwt"]}, "malformed"),
    ],
)
def test_missing_or_broken_token(headers: Dict[bytes, List[bytes]], reason: str) -> None:
    error = refused(hs_policy(), request(headers=headers))
    assert (error.reason, error.status) == (reason, 401)


def test_token_from_another_header_a_query_parameter_or_a_cookie() -> None:
    by_header = hs_policy(token_header="X-Token")
    assert now(by_header.authenticate(request(headers={b"x-token": [HS_TOKEN]})))
    assert refused(by_header, request(headers=bearer(HS_TOKEN))).reason == "missing_token"

    by_query = hs_policy(token_query="access_token")
    assert now(by_query.authenticate(request(query=b"access_token=" + HS_TOKEN)))
    by_cookie = hs_policy(token_cookie="session")
    cookie = {b"cookie": [b"theme=dark; session=" + HS_TOKEN]}
    assert now(by_cookie.authenticate(request(headers=cookie))).subject == "alice"
    # Without token_query, a token in the URL is not read.
    assert refused(hs_policy(), request(query=b"access_token=" + HS_TOKEN)).reason == (
        "missing_token"
    )
    # One place only (RFC 6750 section 2).
    both = request(headers=bearer(HS_TOKEN), query=b"access_token=" + HS_TOKEN)
    assert refused(by_query, both).reason == "malformed"


# --- API keys -----------------------------------------------------------------------------


def test_inline_api_keys_with_names() -> None:
    policy = policy_for({"api_keys": [{"key": KEY_A, "name": "billing"}, KEY_B]})
    identity = now(policy.authenticate(request(headers={b"x-api-key": [KEY_A.encode()]})))
    assert identity == Identity("api_key", "billing", {"sub": "billing"})
    assert now(policy.authenticate(request(headers={b"X-Api-Key": [KEY_B.encode()]}))).subject == (
        "api-key"
    )
    for presented in (KEY_A[:-1], KEY_A + "x", KEY_A.upper()):
        error = refused(policy, request(headers={b"x-api-key": [presented.encode()]}))
        assert (error.reason, error.status) == ("bad_api_key", 401)
    assert refused(policy, request()).reason == "missing_token"
    twice = {b"x-api-key": [KEY_A.encode(), KEY_B.encode()]}
    assert refused(policy, request(headers=twice)).reason == "bad_api_key"


def test_api_keys_file_env_and_inline_together(tmp_path: Path) -> None:
    path = tmp_path / "keys.txt"
    path.write_text(f"# partners\npartner-a {KEY_A}\n\n{KEY_B}\n")
    policy = policy_for(
        {
            "api_keys": [{"key": "ak_inline_00000000000000", "name": "inline"}],
            "api_keys_file": str(path),
            "api_keys_env": "GATEWAY_KEYS",
            "api_key_header": "X-Key",
        },
        environ={"GATEWAY_KEYS": "ci=ak_env_0000000000000000, ak_env_padded_000000000=="},
    )
    names = {
        key: now(policy.authenticate(request(headers={b"x-key": [key.encode()]}))).subject
        for key in (
            "ak_inline_00000000000000",
            KEY_A,
            KEY_B,
            "ak_env_0000000000000000",
            "ak_env_padded_000000000==",
        )
    }
    assert names == {
        "ak_inline_00000000000000": "inline",
        KEY_A: "partner-a",
        KEY_B: "api-key",
        "ak_env_0000000000000000": "ci",
        "ak_env_padded_000000000==": "api-key",  # '=' padding, not name=key
    }
    # The default header is not read when another is configured.
    assert refused(policy, request(headers={b"x-api-key": [KEY_A.encode()]})).reason == (
        "missing_token"
    )


# --- JWT and API keys together --------------------------------------------------------------


def both_policy() -> AuthPolicy:
    return hs_policy(api_keys=[{"key": KEY_A, "name": "billing"}])


def test_either_valid_credential_passes() -> None:
    policy = both_policy()
    assert now(policy.authenticate(request(headers=bearer(HS_TOKEN)))).kind == "jwt"
    assert now(policy.authenticate(request(headers={b"x-api-key": [KEY_A.encode()]}))).kind == (
        "api_key"
    )
    both = {**bearer(HS_TOKEN), b"x-api-key": [KEY_A.encode()]}
    assert now(policy.authenticate(request(headers=both))).kind == "jwt"  # the richer one


def test_any_invalid_credential_fails_even_beside_a_valid_one() -> None:
    policy = both_policy()
    bad_key = {**bearer(HS_TOKEN), b"x-api-key": [b"ak_live_not_a_real_key_x"]}
    assert refused(policy, request(headers=bad_key)).reason == "bad_api_key"
    expired = mint(claims(exp=NOW - 1), SECRET, "HS256")
    bad_token = {**bearer(expired), b"x-api-key": [KEY_A.encode()]}
    assert refused(policy, request(headers=bad_token)).reason == "expired"
    assert refused(policy, request()).reason == "missing_token"


def test_an_api_key_in_the_token_header() -> None:
    policy = hs_policy(api_keys=[{"key": KEY_A, "name": "billing"}], api_key_header="Authorization")
    assert now(policy.authenticate(request(headers=bearer(KEY_A.encode())))).subject == "billing"
    assert now(policy.authenticate(request(headers=bearer(HS_TOKEN)))).subject == "alice"
    assert refused(policy, request(headers=bearer(b"ak_live_unknown_000000"))).reason == (
        "malformed"  # neither a key nor a token
    )
    upstream = Headers({b"authorization": [b"Bearer " + KEY_A.encode()]})
    policy.strip(upstream)
    assert upstream.hasHeader(b"authorization")  # it is the token header: kept


# --- optional and exclude_paths -------------------------------------------------------------


def test_optional_lets_requests_without_credentials_pass() -> None:
    policy = hs_policy(optional=True, api_keys=[KEY_A])
    assert now(policy.authenticate(request())) is None
    assert now(policy.authenticate(request(headers={b"authorization": [b"Basic eDp5"]}))) is None
    assert now(policy.authenticate(request(headers=bearer(HS_TOKEN)))).subject == "alice"
    # Bad credentials are not the same as none.
    assert refused(policy, request(headers=bearer(b"a.b.c"))).reason == "malformed"
    bad_key = {b"x-api-key": [b"ak_live_not_a_real_key_x"]}
    assert refused(policy, request(headers=bad_key)).reason == "bad_api_key"


def test_exclude_paths_match_the_normalized_path() -> None:
    policy = hs_policy(exclude_paths=["/health", "/public/*", "/users/:id/avatar", "/health"])
    for path in (b"/health", b"/public", b"/public/logo.png", b"/users/7/avatar"):
        assert now(policy.authenticate(request(path))) is None, path
        # Credentials are not even read there: a broken one does not matter.
        assert now(policy.authenticate(request(path, headers=bearer(b"!!")))) is None
    for path in (b"/healthz", b"/publicity", b"/users/7", b"/api/health"):
        assert refused(policy, request(path)).reason == "missing_token", path


# --- what reaches the upstream --------------------------------------------------------------


def upstream_headers(**values: List[bytes]) -> Headers:
    return Headers({name.replace("_", "-").encode(): v for name, v in values.items()})


def test_client_copies_of_forwarded_headers_never_get_through() -> None:
    policy = hs_policy(
        optional=True,
        forward_claims={"sub": "X-User-Id", "tenant": "X-Tenant"},
        exclude_paths=["/open"],
    )
    for req, identity in [
        (request(), None),  # anonymous
        (request(b"/open"), None),  # excluded
        (request(headers=bearer(HS_TOKEN)), "alice"),  # a token without tenant
    ]:
        result = now(policy.authenticate(req))
        headers = upstream_headers(
            x_user_id=[b"admin"], X_TENANT=[b"other"], x_other=[b"kept"], authorization=[b"x"]
        )
        headers.addRawHeader(b"X_User_Id", b"admin")  # read as X-User-Id by CGI-style apps
        headers.addRawHeader(b"x_other_thing", b"kept")
        policy.strip(headers)
        policy.forward(result, headers)
        assert headers.getRawHeaders(b"x-user-id") == ([identity.encode()] if identity else None)
        assert not headers.hasHeader(b"x-tenant")
        assert headers.getRawHeaders(b"x-other") == [b"kept"]
        assert not headers.hasHeader(b"x_user_id")
        assert headers.getRawHeaders(b"x_other_thing") == [b"kept"]
        assert headers.getRawHeaders(b"authorization") == [b"x"]  # Authorization is forwarded


def test_forwarded_claim_values() -> None:
    policy = hs_policy(
        forward_claims={
            "sub": "X-User-Id",
            "roles": "X-Roles",
            "level": "X-Level",
            "ratio": "X-Ratio",
            "admin": "X-Admin",
            "org": "X-Org",
            "evil": "X-Evil",
            "nul": "X-Nul",
            "missing": "X-Missing",
            "nothing": "X-Nothing",
            "name": "X-Name",
        }
    )
    token = mint(
        claims(
            roles=["reader", "writer", 3, {"x": 1}],
            level=7,
            ratio=0.5,
            admin=False,
            org={"id": 1},
            evil="alice\r\nX-Injected: yes",
            nul="a\x00b",
            nothing=None,
            name="Zoë",
        ),
        SECRET,
        "HS256",
    )
    headers = Headers({b"x-missing": [b"from the client"]})
    identity = now(policy.authenticate(request(headers=bearer(token))))
    policy.strip(headers)
    policy.forward(identity, headers)
    assert dict(headers.getAllRawHeaders()) == {
        b"X-User-Id": [b"alice"],
        b"X-Roles": [b"reader, writer, 3"],
        b"X-Level": [b"7"],
        b"X-Ratio": [b"0.5"],
        b"X-Admin": [b"false"],
        b"X-Name": ["Zoë".encode()],
    }


def test_api_key_identity_forwards_its_name_and_the_key_stays_behind() -> None:
    policy = policy_for(
        {"api_keys": [{"key": KEY_A, "name": "billing"}], "forward_claims": {"sub": "X-Caller"}}
    )
    req = request(headers={b"x-api-key": [KEY_A.encode()], b"x-caller": [b"root"]})
    identity = now(policy.authenticate(req))
    headers = req.requestHeaders.copy()
    policy.strip(headers)
    policy.forward(identity, headers)
    assert headers.getRawHeaders(b"x-caller") == [b"billing"]
    assert not headers.hasHeader(b"x-api-key")  # the gateway's secret, not the upstream's

    keep = policy_for({"api_keys": [KEY_A]}, forward_api_key=True)
    headers = Headers({b"x-api-key": [KEY_A.encode()]})
    keep.strip(headers)
    assert headers.getRawHeaders(b"x-api-key") == [KEY_A.encode()]
    # Without API keys configured, an X-API-Key header is none of the gateway's business.
    headers = Headers({b"x-api-key": [b"something"]})
    hs_policy().strip(headers)
    assert headers.hasHeader(b"x-api-key")


# --- refusals -------------------------------------------------------------------------------


def refusal_of(
    policy: AuthPolicy, req: GatewayRequest
) -> Tuple[int, List[Tuple[bytes, bytes]], Any]:
    return policy.refusal(refused(policy, req), "req-1")


def test_refusal_without_credentials() -> None:
    assert refusal_of(hs_policy(), request()) == (
        401,
        [(b"www-authenticate", b'Bearer realm="bungate"')],  # RFC 6750 3.1: no error code
        {"error": "unauthorized", "reason": "missing_token", "request_id": "req-1"},
    )


def test_refusal_of_a_bad_token() -> None:
    token = mint(claims(exp=NOW - 10), SECRET, "HS256")
    status, headers, body = refusal_of(hs_policy(), request(headers=bearer(token)))
    assert (status, headers, body) == (
        401,
        [
            (
                b"www-authenticate",
                b'Bearer realm="bungate", error="invalid_token", '
                b'error_description="the token has expired"',
            )
        ],
        {"error": "unauthorized", "reason": "expired", "request_id": "req-1"},
    )
    assert token.decode() not in json.dumps(body) and token not in b"".join(v for _, v in headers)


def test_refusal_of_a_missing_scope() -> None:
    policy = policy_for(
        {
            "jwt": {
                "algorithms": ["HS256"],
                "secret": SECRET.decode(),
                "required_scopes": ["orders:read", "orders:write"],
            }
        }
    )
    token = mint(claims(scope="orders:read"), SECRET, "HS256")
    assert refusal_of(policy, request(headers=bearer(token))) == (
        403,
        [
            (
                b"www-authenticate",
                b'Bearer realm="bungate", error="insufficient_scope", '
                b'error_description="scope orders:write is required", '
                b'scope="orders:read orders:write"',
            )
        ],
        {"error": "forbidden", "reason": "insufficient_scope", "request_id": "req-1"},
    )


def test_refusal_on_an_api_key_route() -> None:
    policy = policy_for({"api_keys": [KEY_A]})
    secret = b"ak_live_guessed_key_0000"
    status, headers, body = refusal_of(policy, request(headers={b"x-api-key": [secret]}))
    assert (status, headers, body) == (
        401,
        [(b"www-authenticate", b'ApiKey header="X-API-Key"')],
        {"error": "unauthorized", "reason": "bad_api_key", "request_id": "req-1"},
    )
    assert secret.decode() not in json.dumps(body)


def test_refusal_with_both_offers_both_challenges() -> None:
    policy = both_policy()
    bad_key = {b"x-api-key": [b"ak_live_not_a_real_key_x"]}
    assert refusal_of(policy, request(headers=bad_key))[1] == [
        (b"www-authenticate", b'Bearer realm="bungate"'),  # the token was not the problem
        (b"www-authenticate", b'ApiKey header="X-API-Key"'),
    ]
    assert refusal_of(policy, request(headers=bearer(b"a.b.c")))[1] == [
        (
            b"www-authenticate",
            b'Bearer realm="bungate", error="invalid_token", '
            b'error_description="unreadable token header"',
        ),
        (b"www-authenticate", b'ApiKey header="X-API-Key"'),
    ]


def test_respond_answers_the_request() -> None:
    channel = DummyChannel()
    req = http.Request(channel)
    req.method, req.uri, req.clientproto = b"GET", b"/api", b"HTTP/1.1"
    req.request_id = b"abc123"  # type: ignore[attr-defined]
    hs_policy().respond(req, AuthError("expired", detail="the token has expired"))
    head, _, body = channel.transport.written.getvalue().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401 Unauthorized\r\n")
    assert (
        b'WWW-Authenticate: Bearer realm="bungate", error="invalid_token", '
        b'error_description="the token has expired"' in head
    )
    assert json.loads(body) == {
        "error": "unauthorized",
        "reason": "expired",
        "request_id": "abc123",
    }


def test_nothing_logs_a_token_or_a_key() -> None:
    policy = both_policy()
    secrets = [HS_TOKEN, mint(claims(exp=NOW - 1), SECRET, "HS256"), b"ak_live_not_a_real_key_x"]
    with capturedLogs() as events:
        for value in secrets:
            for headers in (bearer(value), {b"x-api-key": [value]}):
                try:
                    result = policy.authenticate(request(headers=headers))
                except AuthError as error:
                    assert value.decode() not in str(error)
                    policy.refusal(error, "r")
                else:
                    assert result is not None
    text = repr(list(events))
    assert not [value for value in secrets if value.decode() in text]


# --- configuration errors -------------------------------------------------------------------


def build_error(auth: Mapping[str, Any], **options: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        AuthPolicy.build(
            section(auth),
            source=SOURCE,
            key="routes[2].auth",
            reactor=reactor,
            clock=clock_at(),
            **options,
        )
    return info.value


def test_config_errors_name_the_key_and_the_operators_file(tmp_path: Path) -> None:
    copy = tmp_path / "copies" / "0-jwt.secret"
    names = {str(copy): "/etc/bungate/jwt.secret"}
    error = build_error({"jwt": {"algorithms": ["HS256"], "secret_file": str(copy)}}, names=names)
    assert str(error) == (
        f"{SOURCE}: routes[2].auth.jwt.secret_file: cannot read the secret file "
        "/etc/bungate/jwt.secret: No such file or directory"
    )
    copy.parent.mkdir()
    copy.write_bytes(b"\n")
    error = build_error({"jwt": {"algorithms": ["HS256"], "secret_file": str(copy)}}, names=names)
    assert error.key == "routes[2].auth.jwt.secret_file"
    assert error.problem == "the secret file /etc/bungate/jwt.secret is empty"
    copy.write_bytes(b"too short\n")
    error = build_error({"jwt": {"algorithms": ["HS256"], "secret_file": str(copy)}}, names=names)
    assert error.problem == (
        "/etc/bungate/jwt.secret: the HMAC secret is 9 bytes; HS256 needs at least 32"
    )
    copy.write_bytes(public_pem(RSA_KEY))  # a public key as the HMAC secret
    error = build_error({"jwt": {"algorithms": ["HS256"], "secret_file": str(copy)}}, names=names)
    assert error.problem == (
        "/etc/bungate/jwt.secret: the HMAC secret is empty or is an asymmetric key"
    )
    assert str(tmp_path) not in str(error)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_config_error_for_an_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "jwt.secret"
    path.write_bytes(SECRET)
    path.chmod(0)
    error = build_error({"jwt": {"algorithms": ["HS256"], "secret_file": str(path)}})
    assert error.problem == f"cannot read the secret file {path}: Permission denied"


def test_config_error_for_a_directory_instead_of_a_file(tmp_path: Path) -> None:
    error = build_error({"jwt": {"algorithms": ["HS256"], "secret_file": str(tmp_path)}})
    assert error.problem == f"cannot read the secret file {tmp_path}: Is a directory"


def test_config_errors_for_secret_env() -> None:
    auth = {"jwt": {"algorithms": ["HS512"], "secret_env": "JWT_SECRET"}}
    assert str(build_error(auth, environ={})) == (
        f"{SOURCE}: routes[2].auth.jwt.secret_env: the environment variable JWT_SECRET is not set"
    )
    assert build_error(auth, environ={"JWT_SECRET": ""}).problem == (
        "the environment variable JWT_SECRET is empty"
    )
    assert build_error(auth, environ={"JWT_SECRET": SECRET.decode()}).problem == (
        "the environment variable JWT_SECRET: the HMAC secret is 32 bytes; HS512 needs at least 64"
    )


def test_config_errors_for_public_key(tmp_path: Path) -> None:
    copy = tmp_path / "idp.pem"
    names = {str(copy): "/etc/bungate/idp.pem"}
    auth = {"jwt": {"algorithms": ["RS256"], "public_key": str(copy)}}
    error = build_error(auth, names=names)
    assert (error.key, error.problem) == (
        "routes[2].auth.jwt.public_key",
        "cannot read the public key file /etc/bungate/idp.pem: No such file or directory",
    )
    copy.write_bytes(b"-----BEGIN PUBLIC KEY-----\nnot base64\n-----END PUBLIC KEY-----\n")
    assert build_error(auth, names=names).problem == (
        "/etc/bungate/idp.pem: not a PEM public key or certificate"
    )
    copy.write_bytes(public_pem(EC_KEY))
    error = build_error(auth, names=names)
    assert error.key == "routes[2].auth.jwt.public_key"
    assert error.problem.startswith("/etc/bungate/idp.pem: ")
    assert error.problem.endswith("cannot verify RS256")


def test_config_errors_for_api_keys_file(tmp_path: Path) -> None:
    copy = tmp_path / "keys.txt"
    names = {str(copy): "/etc/bungate/keys.txt"}
    auth = {"api_keys_file": str(copy)}
    assert str(build_error(auth, names=names)) == (
        f"{SOURCE}: routes[2].auth.api_keys_file: cannot read the API key file "
        "/etc/bungate/keys.txt: No such file or directory"
    )
    copy.write_text(f"billing {KEY_A}\nci short\n")
    error = build_error(auth, names=names)
    assert error.problem == (
        "/etc/bungate/keys.txt: line 2 ('ci'): the key is shorter than 16 characters"
    )
    copy.write_text(f"billing {KEY_A} trailing\n")
    error = build_error(auth, names=names)
    assert error.problem == "/etc/bungate/keys.txt: line 1: expected 'key' or 'name key'"
    assert KEY_A not in str(error)
    copy.write_text("# no keys yet\n")
    assert build_error(auth, names=names).problem == "/etc/bungate/keys.txt holds no API key"
    copy.write_bytes(b"\xff\xfe")
    assert build_error(auth, names=names).problem == "/etc/bungate/keys.txt is not UTF-8 text"


def test_config_errors_for_api_keys_env_and_duplicates(tmp_path: Path) -> None:
    auth = {"api_keys_env": "GATEWAY_KEYS"}
    assert build_error(auth, environ={}).problem == (
        "the environment variable GATEWAY_KEYS is not set"
    )
    assert build_error(auth, environ={"GATEWAY_KEYS": " "}).problem == (
        "the environment variable GATEWAY_KEYS is empty"
    )
    assert build_error(auth, environ={"GATEWAY_KEYS": ","}).problem == (
        "the environment variable GATEWAY_KEYS holds no API key"
    )
    error = build_error(auth, environ={"GATEWAY_KEYS": f"ci={KEY_A},ops=tiny"})
    assert (error.key, error.problem) == (
        "routes[2].auth.api_keys_env",
        "the environment variable GATEWAY_KEYS: API key #1 ('ops'): the key is shorter than "
        "16 characters",
    )
    path = tmp_path / "keys.txt"
    path.write_text(f"partner {KEY_A}\n")
    error = build_error({"api_keys": [KEY_A], "api_keys_file": str(path)}, environ={})
    assert (error.key, error.problem) == (
        "routes[2].auth.api_keys_file",
        "the key of 'partner' is also given in another key source",
    )


# --- JWKS from a real server ----------------------------------------------------------------


class JwksResource(Resource):
    """A JWKS endpoint: ``keys``, the headers to answer with, a status; hits counted."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.keys: List[Dict[str, Any]] = [rsa_jwk(RSA_KEY, "k1")]
        self.headers: Dict[bytes, bytes] = {}
        self.expires_in: Optional[int] = None
        self.status = 200
        self.body: Optional[bytes] = None
        self.hits = 0
        self.channels: List[Any] = []

    def render_GET(self, request: server.Request) -> bytes:
        self.hits += 1
        self.channels.append(request.channel)
        request.setResponseCode(self.status)
        request.setHeader(b"content-type", b"application/jwk-set+json")
        for name, value in self.headers.items():
            request.setHeader(name, value)
        if self.expires_in is not None:
            date = request.responseHeaders.getRawHeaders(b"date")[0]
            expires = http.stringToDatetime(date) + self.expires_in
            request.setHeader(b"expires", http.datetimeToString(expires))
        return self.body if self.body is not None else jwks_document(*self.keys)


class IdP:
    """A real JWKS server on 127.0.0.1."""

    def __init__(self) -> None:
        self.resource = JwksResource()
        self.site = server.Site(self.resource)
        self.port: Any = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.number = self.port.getHost().port
        self.uri = f"http://127.0.0.1:{self.number}/.well-known/jwks.json"

    def down(self) -> Optional[Deferred[Any]]:
        """Stop listening and drop every connection: the server is gone."""
        port, self.port = self.port, None
        for channel in self.resource.channels:
            if channel.transport is not None:
                channel.transport.abortConnection()
        self.resource.channels.clear()
        return port.stopListening() if port is not None else None

    def up(self) -> None:
        self.port = reactor.listenTCP(self.number, self.site, interface="127.0.0.1")


@pytest.fixture
def idp() -> Iterator[IdP]:
    server_ = IdP()
    yield server_
    stopped = server_.down()
    if stopped is not None:
        pytest_twisted.blockon(stopped)


@pytest.fixture
def closing() -> Iterator[List[AuthPolicy]]:
    """Policies to close after the test (their JWKS connection)."""
    policies: List[AuthPolicy] = []
    yield policies
    pytest_twisted.blockon(DeferredList([p.close() for p in policies]))


def jwks_policy(idp: IdP, clock: Clock, closing: List[AuthPolicy], **jwt: Any) -> AuthPolicy:
    policy = policy_for({"jwt": {"algorithms": ["RS256"], "jwks_uri": idp.uri, **jwt}}, clock)
    closing.append(policy)
    return policy


def rs(kid: str, key: Any = RSA_KEY, **overrides: Any) -> GatewayRequest:
    return request(
        headers=bearer(mint(claims(exp=NOW + 90000, **overrides), key, "RS256", kid=kid))
    )


@pytest_twisted.inlineCallbacks
def test_jwks_first_fetch_starts_at_build_then_keys_are_cached(
    idp: IdP, closing: List[AuthPolicy]
) -> Any:
    policy = jwks_policy(idp, clock_at(), closing)
    assert policy.jwks is not None and policy.jwks.fetches == 1  # started, not awaited
    waiting = policy.authenticate(rs("k1"))
    assert isinstance(waiting, Deferred)  # joins the fetch under way
    identity = yield waiting
    assert identity.subject == "alice" and idp.resource.hits == 1
    assert now(policy.authenticate(rs("k1"))).subject == "alice"  # cached: no Deferred
    assert idp.resource.hits == 1 and policy.jwks.last_error is None


@pytest_twisted.inlineCallbacks
def test_jwks_kid_rotation_refetches_within_the_rate_limit(
    idp: IdP, closing: List[AuthPolicy]
) -> Any:
    clock = clock_at()
    policy = jwks_policy(idp, clock, closing, jwks_min_refresh=30)
    yield policy.authenticate(rs("k1"))
    # A new key appears at the IdP: its first token triggers a refetch.
    idp.resource.keys.append(rsa_jwk(RSA_KEY_2, "k2"))
    clock.advance(31)
    identity = yield policy.authenticate(rs("k2", RSA_KEY_2, sub="bob"))
    assert identity.subject == "bob" and idp.resource.hits == 2
    # Unknown kids within jwks_min_refresh of that fetch: refused at once, no fetch.
    clock.advance(29)
    for kid in ("k3", "k4", "k5"):
        error = refused(policy, rs(kid, RSA_KEY_2))
        assert (error.reason, error.status) == ("unknown_key", 401)
    assert idp.resource.hits == 2 and policy.jwks is not None and policy.jwks.fetches == 2
    clock.advance(1)
    with pytest.raises(AuthError) as info:
        yield policy.authenticate(rs("k3", RSA_KEY_2))
    assert info.value.reason == "unknown_key" and idp.resource.hits == 3


@pytest_twisted.inlineCallbacks
def test_jwks_cache_control_max_age_is_respected(idp: IdP, closing: List[AuthPolicy]) -> Any:
    clock = clock_at()
    idp.resource.headers[b"cache-control"] = b"public, max-age=120"
    policy = jwks_policy(idp, clock, closing)
    yield policy.authenticate(rs("k1"))
    clock.advance(119)
    assert now(policy.authenticate(rs("k1"))).subject == "alice"
    assert idp.resource.hits == 1
    clock.advance(1)  # stale: the next request refreshes first
    refreshing = policy.authenticate(rs("k1"))
    assert isinstance(refreshing, Deferred)
    yield refreshing
    assert idp.resource.hits == 2


@pytest_twisted.inlineCallbacks
def test_jwks_expires_is_respected(idp: IdP, closing: List[AuthPolicy]) -> Any:
    clock = clock_at()
    idp.resource.expires_in = 600
    policy = jwks_policy(idp, clock, closing)
    yield policy.authenticate(rs("k1"))
    clock.advance(599)
    assert now(policy.authenticate(rs("k1"))) and idp.resource.hits == 1
    clock.advance(1)
    yield policy.authenticate(rs("k1"))
    assert idp.resource.hits == 2


@pytest_twisted.inlineCallbacks
def test_jwks_server_down_keeps_the_last_good_keys(idp: IdP, closing: List[AuthPolicy]) -> Any:
    clock = clock_at()
    idp.resource.headers[b"cache-control"] = b"max-age=60"
    policy = jwks_policy(idp, clock, closing)
    yield policy.authenticate(rs("k1"))
    yield idp.down()
    clock.advance(61)
    with capturedLogs() as events:
        identity = yield policy.authenticate(rs("k1"))  # the refresh fails; k1 still works
    assert identity.subject == "alice"
    assert policy.jwks is not None and policy.jwks.last_error is not None
    assert any("Could not fetch the JWKS" in str(e.get("log_format")) for e in events)
    assert now(policy.authenticate(rs("k1"))).subject == "alice"  # no refetch storm
    assert refused(policy, rs("k2", RSA_KEY_2)).reason == "unknown_key"
    # Back up, with a rotated key: found once the rate limit allows a fetch.
    idp.up()
    idp.resource.keys.append(rsa_jwk(RSA_KEY_2, "k2"))
    clock.advance(30)
    identity = yield policy.authenticate(rs("k2", RSA_KEY_2, sub="bob"))
    assert identity.subject == "bob" and policy.jwks.last_error is None


@pytest_twisted.inlineCallbacks
def test_jwks_down_from_the_start_refuses_until_it_is_up(
    idp: IdP, closing: List[AuthPolicy]
) -> Any:
    clock = clock_at()
    yield idp.down()
    policy = jwks_policy(idp, clock, closing)
    with pytest.raises(AuthError) as info:
        yield policy.authenticate(rs("k1"))
    assert info.value.reason == "unknown_key"
    idp.up()
    clock.advance(30)
    identity = yield policy.authenticate(rs("k1"))
    assert identity.subject == "alice"


@pytest.mark.parametrize(
    "status, headers, body, error",
    [
        (500, {}, None, "HTTP status 500"),
        (302, {b"location": b"http://127.0.0.1:9/evil.json"}, None, "HTTP status 302"),
        (200, {}, b"<html>maintenance</html>", "not JSON"),
        (200, {}, b'{"keys": {}}', "no 'keys' list"),
        (200, {}, b" " * (MAX_JWKS_BYTES + 1), "bytes"),
    ],
)
@pytest_twisted.inlineCallbacks
def test_jwks_bad_answers_keep_the_last_good_keys(
    idp: IdP,
    closing: List[AuthPolicy],
    status: int,
    headers: Dict[bytes, bytes],
    body: Optional[bytes],
    error: str,
) -> Any:
    clock = clock_at()
    policy = jwks_policy(idp, clock, closing)
    yield policy.authenticate(rs("k1"))
    idp.resource.status, idp.resource.body = status, body
    idp.resource.headers.update(headers)
    clock.advance(301)  # no Cache-Control: the default lifetime, 300 s
    identity = yield policy.authenticate(rs("k1"))
    assert identity.subject == "alice" and idp.resource.hits == 2
    assert policy.jwks is not None and policy.jwks.last_error is not None
    assert error in policy.jwks.last_error


@pytest_twisted.inlineCallbacks
def test_jwks_policy_refuses_hmac_and_none(idp: IdP, closing: List[AuthPolicy]) -> Any:
    policy = jwks_policy(idp, clock_at(), closing)
    yield policy.authenticate(rs("k1"))
    pem = public_pem(RSA_KEY)
    unsigned = forge({"alg": "HS256", "kid": "k1"}, claims()).rsplit(b".", 1)[0]
    confused = unsigned + b"." + b64(hmac.new(pem, unsigned, hashlib.sha256).digest())
    for token in (confused, forge({"alg": "none", "kid": "k1"}, claims())):
        error = refused(policy, request(headers=bearer(token)))
        assert error.reason == "algorithm_not_allowed"


@pytest_twisted.inlineCallbacks
def test_close_stops_fetching(idp: IdP) -> Any:
    clock = clock_at()
    policy = policy_for({"jwt": {"algorithms": ["RS256"], "jwks_uri": idp.uri}}, clock)
    yield policy.close()  # while the first fetch is under way
    clock.advance(60)
    with pytest.raises(AuthError):
        yield policy.authenticate(rs("k1"))
    assert policy.jwks is not None and "closed" in (policy.jwks.last_error or "")
