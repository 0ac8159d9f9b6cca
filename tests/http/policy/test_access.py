"""
Auth on the request path, as raw bytes: tokens and keys let callers in, forged identity
headers never reach the upstream, and no spelling of a path walks past a protected route.
"""

from __future__ import annotations

import json
import time
from typing import Any

import jwt
import pytest
import pytest_twisted

from bungate.testing import CapturingUpstream
from tests.http.policy.test_traffic import capture, gateways, get, reactor, send  # noqa: F401

SECRET = "a-long-random-secret-of-forty-bytes-0123"
KEY = "k-0123456789abcdef0123"


def token(**claims: Any) -> bytes:
    payload = {"sub": "alice", "exp": int(time.time()) + 300, "scope": "read", **claims}
    return jwt.encode(payload, SECRET, algorithm="HS256").encode()


def protected(upstream: CapturingUpstream) -> list[dict[str, Any]]:
    return [
        {
            "pattern": "/admin/*",
            "target": upstream.url,
            "auth": {
                "jwt": {"secret": SECRET, "algorithms": ["HS256"]},
                "api_keys": [{"key": KEY, "name": "deploy-bot"}],
                "forward_claims": {"sub": "X-User-Id", "scope": "X-User-Scope"},
                "exclude_paths": ["/admin/health"],
            },
        },
        {"pattern": "/*", "target": upstream.url},
    ]


@pytest_twisted.inlineCallbacks
def test_a_valid_token_or_key_passes_and_names_the_caller_upstream(gateways, capture):  # noqa: F811
    gw = yield gateways({}, protected(capture))
    status, _, _ = yield send(
        gw, get(b"/admin/users", b"Authorization: Bearer " + token(), b"X-User-Id: root")
    )
    assert status == 200
    seen = capture.requests[-1]
    assert seen.header(b"x-user-id") == [b"alice"]  # the token's, never the client's
    assert seen.header(b"x-user-scope") == [b"read"]
    status, _, _ = yield send(gw, get(b"/admin/users", b"X-API-Key: " + KEY.encode()))
    assert status == 200
    seen = capture.requests[-1]
    assert seen.header(b"x-user-id") == [b"deploy-bot"]
    assert seen.header(b"x-api-key") == []  # the key is the gateway's secret


@pytest.mark.parametrize(
    "headers, reason",
    [
        ((), "auth_missing_token"),
        ((b"Authorization: Bearer not.a.jwt",), "auth_malformed"),
        ((b"X-API-Key: wrong-key-0123456789",), "auth_bad_api_key"),
    ],
)
@pytest_twisted.inlineCallbacks
def test_no_or_bad_credentials_get_401_with_the_reason(gateways, capture, headers, reason):  # noqa: F811
    gw = yield gateways({}, protected(capture))
    status, out, body = yield send(gw, get(b"/admin/users", *headers))
    assert status == 401
    doc = json.loads(body)
    assert doc["request_id"] and doc["reason"] == reason[len("auth_") :]
    assert out[b"www-authenticate"]
    assert capture.requests == []


@pytest_twisted.inlineCallbacks
def test_tokens_that_must_not_pass(gateways, capture):  # noqa: F811
    gw = yield gateways({}, protected(capture))
    expired = token(exp=int(time.time()) - 60)
    unsigned = jwt.encode({"sub": "root"}, None, algorithm="none").encode()
    other_key = jwt.encode({"sub": "root", "exp": int(time.time()) + 60}, "x" * 40, "HS256")
    for bad in (expired, unsigned, other_key.encode()):
        status, _, body = yield send(gw, get(b"/admin/users", b"Authorization: Bearer " + bad))
        assert status == 401, body
        assert bad not in body
    assert capture.requests == []


@pytest.mark.parametrize(
    "target",
    [
        b"/admin/users",
        b"//admin/users",
        b"/%61dmin/users",
        b"/public/../admin/users",
        b"/public/%2e%2e/admin/users",
        b"/ADMIN/../admin/users",
        b"http://any.host/admin/users",
    ],
)
@pytest_twisted.inlineCallbacks
def test_no_spelling_of_the_path_walks_past_the_auth(gateways, capture, target):  # noqa: F811
    gw = yield gateways({}, protected(capture))
    status, _, _ = yield send(
        gw, b"GET " + target + b" HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"
    )
    assert status in (400, 401), status
    assert all(not r.target.startswith(b"/admin") for r in capture.requests)


@pytest_twisted.inlineCallbacks
def test_excluded_paths_and_a_top_level_default_with_a_route_off(gateways, capture):  # noqa: F811
    gw = yield gateways(
        {"auth": {"api_keys": [KEY]}},
        [
            {"pattern": "/open/*", "target": capture.url, "auth": False},
            {
                "pattern": "/api/*",
                "target": capture.url,
                "auth": {"api_keys": [KEY], "exclude_paths": ["/api/health"]},
            },
            {"pattern": "/*", "target": capture.url},
        ],
    )
    assert (yield send(gw, get(b"/open/x")))[0] == 200
    assert (yield send(gw, get(b"/api/health")))[0] == 200
    assert (yield send(gw, get(b"/api/x")))[0] == 401
    assert (yield send(gw, get(b"/other")))[0] == 401  # the top-level default
    assert (yield send(gw, get(b"/other", b"X-API-Key: " + KEY.encode())))[0] == 200


@pytest_twisted.inlineCallbacks
def test_forged_identity_headers_are_dropped_in_every_spelling(gateways, capture):  # noqa: F811
    gw = yield gateways({"server": {"underscores_in_headers": True}}, protected(capture))
    status, _, _ = yield send(
        gw,
        get(
            b"/admin/users",
            b"X-API-Key: " + KEY.encode(),
            b"X_User_Id: root",
            b"x-user-id: root",
            b"X-User-Scope: admin",
        ),
    )
    assert status == 200
    seen = capture.requests[-1]
    assert seen.header(b"x-user-id") == [b"deploy-bot"]
    assert seen.header(b"x_user_id") == [] and seen.header(b"x-user-scope") == []
