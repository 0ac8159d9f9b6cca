"""Tests for bungate.core.auth.tokens: where a request carries its token."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import pytest

from bungate.core.auth import (
    AuthError,
    extract_token,
)

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
