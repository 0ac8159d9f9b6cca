"""Tests for bungate.core.auth.apikeys: matching and parsing API keys."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any, List, Tuple

import pytest

from bungate.core.auth import (
    ApiKeys,
    apikeys,
    parse_api_key_file,
)

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

    monkeypatch.setattr(apikeys.hmac, "compare_digest", counting)
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
