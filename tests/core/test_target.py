"""Tests for the request-target normalization (bungate.core.target)."""

from __future__ import annotations

from typing import Any, Optional, Union
from urllib.parse import unquote_to_bytes

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bungate.core.target import (
    Target,
    TargetError,
    _normalize_slow,
    normalize_path,
    normalize_target,
    parse_host,
)

Ok = tuple[str, bytes, Optional[bytes], Optional[bytes]]
Refused = tuple[int, str]

# (method, target, options, expected): expected is (form, path, query, authority) or
# (status, reason).
CASES: list[tuple[bytes, bytes, dict[str, Any], Union[Ok, Refused]]] = [
    # the bypasses of a route "/admin/*" guarded by a middleware
    (b"GET", b"http://any.host/admin/users", {}, ("absolute", b"/admin/users", None, b"any.host")),
    (b"GET", b"/public/%2e%2e/admin/x", {}, ("origin", b"/admin/x", None, None)),
    (b"GET", b"/public/%2E%2E/admin/x", {}, ("origin", b"/admin/x", None, None)),
    (b"GET", b"/public/.%2e/admin/x", {}, ("origin", b"/admin/x", None, None)),
    (b"GET", b"/public/%2E./admin/x", {}, ("origin", b"/admin/x", None, None)),
    (b"GET", b"/public/../admin/x", {}, ("origin", b"/admin/x", None, None)),
    (b"GET", b"/%61dmin/x", {}, ("origin", b"/admin/x", None, None)),
    (b"GET", b"/%61%64%6D%69%6e/x", {}, ("origin", b"/admin/x", None, None)),
    (b"GET", b"//admin/x", {}, ("origin", b"/admin/x", None, None)),
    (b"GET", b"//admin//x", {}, ("origin", b"/admin/x", None, None)),
    (b"GET", b"/admin%2Fx", {}, (400, "encoded_slash")),
    (b"GET", b"/admin%2fx", {}, (400, "encoded_slash")),
    (b"GET", b"/public%2F..%2Fadmin/x", {}, (400, "encoded_slash")),
    (b"GET", b"/admin/x#frag", {}, (400, "fragment")),
    (b"GET", b"/x#y", {}, (400, "fragment")),
    (b"GET", b"/x?a=1#y", {}, (400, "fragment")),
    # absolute-form
    (b"GET", b"HTTP://Any.Host/a?b=1", {}, ("absolute", b"/a", b"b=1", b"Any.Host")),
    (b"GET", b"https://h:8443/a/./b", {}, ("absolute", b"/a/b", None, b"h:8443")),
    (b"GET", b"http://h", {}, ("absolute", b"/", None, b"h")),
    (b"GET", b"http://h?x", {}, ("absolute", b"/", b"x", b"h")),
    (b"GET", b"http://[::1]:80/x", {}, ("absolute", b"/x", None, b"[::1]:80")),
    (b"GET", b"http://user@h/x", {}, (400, "absolute_form_userinfo")),
    (b"GET", b"http://u:p@h/x", {}, (400, "absolute_form_userinfo")),
    (b"GET", b"http:///x", {}, (400, "bad_host")),
    (b"GET", b"http://h\\x/y", {}, (400, "bad_host")),
    (b"GET", b"http://h:99999/", {}, (400, "bad_host")),
    (b"GET", b"ftp://h/x", {}, (400, "bad_request_target")),
    (b"GET", b"http:/h/x", {}, (400, "bad_request_target")),
    # asterisk-form, authority-form, CONNECT, other forms
    (b"OPTIONS", b"*", {}, ("asterisk", b"*", None, None)),
    (b"GET", b"*", {}, (400, "asterisk_form_not_options")),
    (b"OPTIONS", b"*x", {}, (400, "bad_request_target")),
    (b"CONNECT", b"h:443", {}, (405, "connect")),
    (b"CONNECT", b"/x", {}, (405, "connect")),
    (b"GET", b"h:443", {}, (400, "bad_request_target")),
    (b"GET", b"a/b", {}, (400, "bad_request_target")),
    (b"GET", b"", {}, (400, "bad_request_target")),
    (b"GET", b"?x", {}, (400, "bad_request_target")),
    # length
    (b"GET", b"/" + b"a" * 8191, {}, ("origin", b"/" + b"a" * 8191, None, None)),
    (b"GET", b"/" + b"a" * 8192, {}, (414, "uri_too_long")),
    (b"GET", b"/abcd", {"max_length": 4}, (414, "uri_too_long")),
    # dot segments
    (b"GET", b"/a/b/../../../x", {}, (400, "dot_segment_above_root")),
    (b"GET", b"/..", {}, (400, "dot_segment_above_root")),
    (b"GET", b"/%2e%2e/x", {}, (400, "dot_segment_above_root")),
    (b"GET", b"/./../x", {}, (400, "dot_segment_above_root")),
    (b"GET", b"/a/b/../../x", {}, ("origin", b"/x", None, None)),
    (b"GET", b"/a/.", {}, ("origin", b"/a/", None, None)),
    (b"GET", b"/a/b/..", {}, ("origin", b"/a/", None, None)),
    (b"GET", b"/a/..", {}, ("origin", b"/", None, None)),
    (b"GET", b"/.", {}, ("origin", b"/", None, None)),
    (b"GET", b"/./a/./b/.", {}, ("origin", b"/a/b/", None, None)),
    (b"GET", b"/.well-known/x", {}, ("origin", b"/.well-known/x", None, None)),
    (b"GET", b"/a/...", {}, ("origin", b"/a/...", None, None)),
    (b"GET", b"/a/.b/..c", {}, ("origin", b"/a/.b/..c", None, None)),
    # slashes
    (b"GET", b"/", {}, ("origin", b"/", None, None)),
    (b"GET", b"//", {}, ("origin", b"/", None, None)),
    (b"GET", b"/a//", {}, ("origin", b"/a/", None, None)),
    (b"GET", b"/a///b", {}, ("origin", b"/a/b", None, None)),
    (b"GET", b"/a//b", {"merge_slashes": False}, ("origin", b"/a//b", None, None)),
    (b"GET", b"//a/", {"merge_slashes": False}, ("origin", b"//a/", None, None)),
    (b"GET", b"/a//..", {"merge_slashes": False}, ("origin", b"/a/", None, None)),
    (b"GET", b"/a//../b", {}, ("origin", b"/b", None, None)),
    # encoded slashes and backslashes
    (b"GET", b"/a%5Cb", {}, (400, "encoded_slash")),
    (b"GET", b"/a%5cb", {}, (400, "encoded_slash")),
    (b"GET", b"/a\\b", {}, (400, "encoded_slash")),
    (b"GET", b"/a\\..\\admin", {}, (400, "encoded_slash")),
    (b"GET", b"/a%2fb", {"encoded_slashes": "keep"}, ("origin", b"/a%2Fb", None, None)),
    (b"GET", b"/a%5cb", {"encoded_slashes": "keep"}, ("origin", b"/a%5Cb", None, None)),
    (b"GET", b"/a\\b", {"encoded_slashes": "keep"}, ("origin", b"/a%5Cb", None, None)),
    (b"GET", b"/x/..%2F..", {"encoded_slashes": "keep"}, ("origin", b"/x/..%2F..", None, None)),
    # percent-encoding
    (b"GET", b"/a%2a%c3%A9", {}, ("origin", b"/a%2A%C3%A9", None, None)),
    (b"GET", b"/%7e%2D%5f%2E%30", {}, ("origin", b"/~-_.0", None, None)),
    (b"GET", b"/%25%2e", {}, ("origin", b"/%25.", None, None)),
    (b"GET", b"/%252e%252e/x", {}, ("origin", b"/%252e%252e/x", None, None)),
    (b"GET", b"/a%20b", {}, ("origin", b"/a%20b", None, None)),
    (b"GET", b"/a%3bb", {}, ("origin", b"/a%3Bb", None, None)),
    (b"GET", b"/a%3F%23", {}, ("origin", b"/a%3F%23", None, None)),
    (b"GET", b"/%zz", {}, (400, "bad_percent_encoding")),
    (b"GET", b"/%2g", {}, (400, "bad_percent_encoding")),
    (b"GET", b"/%+1", {}, (400, "bad_percent_encoding")),
    (b"GET", b"/% 1", {}, (400, "control_character")),
    (b"GET", b"/a%", {}, (400, "bad_percent_encoding")),
    (b"GET", b"/a%2", {}, (400, "bad_percent_encoding")),
    (b"GET", b"/a%/b", {}, (400, "bad_percent_encoding")),
    # control characters, raw and encoded
    (b"GET", b"/a%00", {}, (400, "control_character")),
    (b"GET", b"/a%0d%0a", {}, (400, "control_character")),
    (b"GET", b"/a%1F", {}, (400, "control_character")),
    (b"GET", b"/a%7f", {}, (400, "control_character")),
    (b"GET", b"/a\tb", {}, (400, "control_character")),
    (b"GET", b"/a b", {}, (400, "control_character")),
    (b"GET", b"/a\x00", {}, (400, "control_character")),
    (b"GET", b"/a\x7f", {}, (400, "control_character")),
    (b"GET", b"/a?b\x01", {}, (400, "control_character")),
    (b"GET", b"/a?b c", {}, (400, "control_character")),
    # path parameters
    (b"GET", b"/admin;x/users", {}, (400, "path_params")),
    (b"GET", b"/a;jsessionid=1", {}, (400, "path_params")),
    (b"GET", b"/a;b", {"path_params": "keep"}, ("origin", b"/a;b", None, None)),
    (b"GET", b"/a/b?x;y", {}, ("origin", b"/a/b", b"x;y", None)),
    # raw bytes outside pchar are percent-encoded
    (b"GET", b"/caf\xc3\xa9", {}, ("origin", b"/caf%C3%A9", None, None)),
    (b"GET", b'/a"<>^`{|}[]', {}, ("origin", b"/a%22%3C%3E%5E%60%7B%7C%7D%5B%5D", None, None)),
    (b"GET", b"/a!$&'()*+,=:@~", {}, ("origin", b"/a!$&'()*+,=:@~", None, None)),
    # the query: checked, encoded to ASCII, otherwise kept byte for byte
    (b"GET", b"/api/users/123?x=1", {}, ("origin", b"/api/users/123", b"x=1", None)),
    (b"GET", b"/a?", {}, ("origin", b"/a", b"", None)),
    (b"GET", b"/a??", {}, ("origin", b"/a", b"?", None)),
    (b"GET", b"/a?%zz%2F%00/../..//", {}, ("origin", b"/a", b"%zz%2F%00/../..//", None)),
    (b"GET", b"/a?q=a[]&b=%41;c", {}, ("origin", b"/a", b"q=a[]&b=%41;c", None)),
    (b"GET", b"/a?q=\xc3\xa9", {}, ("origin", b"/a", b"q=%C3%A9", None)),
    (b"GET", b'/a?"<>\\^`{|}', {}, ("origin", b"/a", b"%22%3C%3E%5C%5E%60%7B%7C%7D", None)),
    (b"GET", b"/%2e/a?b=/./", {}, ("origin", b"/a", b"b=/./", None)),
]


@pytest.mark.parametrize(
    ("method", "target", "options", "expected"),
    CASES,
    ids=[f"{m.decode()} {t[:60]!r} {o}" for m, t, o, _ in CASES],
)
def test_table(
    method: bytes, target: bytes, options: dict[str, Any], expected: Union[Ok, Refused]
) -> None:
    if isinstance(expected[0], int):
        with pytest.raises(TargetError) as caught:
            normalize_target(method, target, **options)
        assert (caught.value.status, caught.value.reason) == expected
        assert caught.value.message
    else:
        result = normalize_target(method, target, **options)
        assert (result.form, result.path, result.query, result.authority) == expected


def test_uri() -> None:
    assert Target("origin", b"/a", b"x=1").uri == b"/a?x=1"
    assert Target("origin", b"/a", b"").uri == b"/a?"
    assert Target("origin", b"/a").uri == b"/a"
    assert normalize_target(b"GET", b"http://h/%61?q").uri == b"/a?q"
    assert normalize_target(b"OPTIONS", b"*").uri == b"*"


def test_target_is_frozen() -> None:
    target = Target("origin", b"/a")
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        target.path = b"/b"  # type: ignore[misc]


def test_error_str() -> None:
    error = TargetError(400, "fragment", "no")
    assert (error.status, error.reason, error.message) == (400, "fragment", "no")
    assert str(error) == "400 fragment: no"


@pytest.mark.parametrize("target", [b"/a", b"/a%2e"])
def test_unknown_mode(target: bytes) -> None:
    with pytest.raises(ValueError):
        normalize_target(b"GET", target, encoded_slashes="decode")
    with pytest.raises(ValueError):
        normalize_target(b"GET", target, path_params="strip")


ADMIN_BYPASSES = [
    b"http://any.host/admin/users",
    b"https://any.host/admin/users",
    b"/public/%2e%2e/admin/x",
    b"/public/%2E./admin/x",
    b"/admin%2Fx",
    b"/%61dmin/x",
    b"//admin/x",
    b"/admin/x#frag",
    b"/admin;x/users",
    b"/public/..\\admin/x",
    b"/public%5C..%5Cadmin/x",
    b"/./admin/x",
]


@pytest.mark.parametrize("target", ADMIN_BYPASSES)
def test_guarded_prefix_cannot_be_skipped(target: bytes) -> None:
    # Each target reaches /admin/ on a decoding upstream; each is refused or the
    # normalized path is under /admin/ too, where the guard applies.
    decoded = unquote_to_bytes(target.split(b"#")[0].replace(b"\\", b"/"))
    assert b"admin" in decoded
    try:
        result = normalize_target(b"GET", target)
    except TargetError as e:
        assert e.status == 400
    else:
        assert result.path.startswith(b"/admin/")


@pytest.mark.parametrize("pattern", [b"/", b"/admin/*", b"/users/:id", b"/a/b.json", b"/~x/a-b_c"])
def test_normalize_path_accepts_canonical_patterns(pattern: bytes) -> None:
    assert normalize_path(pattern) == pattern


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (b"/a/../b", b"/b"),
        (b"//a", b"/a"),
        (b"/%61", b"/a"),
        (b"/%c3%a9", b"/%C3%A9"),
        (b"/\xc3\xa9", b"/%C3%A9"),
        (b"/{id}", b"/%7Bid%7D"),
    ],
)
def test_normalize_path_rewrites(path: bytes, expected: bytes) -> None:
    assert normalize_path(path) == expected


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        (b"a/b", "bad_request_target"),
        (b"", "bad_request_target"),
        (b"/a?b", "bad_request_target"),
        (b"/a#b", "fragment"),
        (b"/a b", "control_character"),
        (b"/..", "dot_segment_above_root"),
        (b"/a%2Fb", "encoded_slash"),
        (b"/a;b", "path_params"),
    ],
)
def test_normalize_path_refuses(path: bytes, reason: str) -> None:
    with pytest.raises(TargetError) as caught:
        normalize_path(path)
    assert (caught.value.status, caught.value.reason) == (400, reason)


def test_normalize_path_options() -> None:
    assert normalize_path(b"/a//b", merge_slashes=False) == b"/a//b"
    assert normalize_path(b"/a%2fb\\", encoded_slashes="keep") == b"/a%2Fb%5C"
    assert normalize_path(b"/a;b", path_params="keep") == b"/a;b"
    with pytest.raises(ValueError):
        normalize_path(b"/a", encoded_slashes="yes")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"example.com", ("example.com", None)),
        (b"Example.COM:8080", ("example.com", 8080)),
        (b"example.com.", ("example.com.", None)),
        (b"h:", ("h", None)),
        (b"h:0", ("h", 0)),
        (b"h:0080", ("h", 80)),
        (b"h:65535", ("h", 65535)),
        (b"a-b_c~d", ("a-b_c~d", None)),
        (b"a!$&'()*+,;=b", ("a!$&'()*+,;=b", None)),
        (b"127.0.0.1:80", ("127.0.0.1", 80)),
        (b"[::1]", ("[::1]", None)),
        (b"[::1]:443", ("[::1]", 443)),
        (b"[2001:DB8::A]:", ("[2001:db8::a]", None)),
        (b"[::ffff:1.2.3.4]", ("[::ffff:1.2.3.4]", None)),
        (b"xn--bcher-kva.example", ("xn--bcher-kva.example", None)),
    ],
)
def test_parse_host(value: bytes, expected: tuple[str, Optional[int]]) -> None:
    assert parse_host(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b":80",
        b"a b",
        b"a/b",
        b"a@b",
        b"a\\b",
        b'"a"',
        b"a%41",
        b"a\x00",
        b"caf\xc3\xa9",
        b"h:65536",
        b"h:999999",
        b"h:-1",
        b"h:+1",
        b"h:8a",
        b"h:80:80",
        b"h: 80",
        b"1.2.3.256",
        b"1.2.3",
        b"01.2.3.4",
        b"1..2.3",
        b"[::1",
        b"[]",
        b"[::1]x",
        b"[::1]:x",
        b"[1.2.3.4]",
        b"[fe80::1%25eth0]",
        b"[v1.x]",
        b"[::g]",
        b"[1:2:3:4:5:6:7:8:9]",
        b"::1",
    ],
)
def test_parse_host_refuses(value: bytes) -> None:
    with pytest.raises(TargetError) as caught:
        parse_host(value)
    assert (caught.value.status, caught.value.reason) == (400, "bad_host")


# --- properties ---

OPTIONS = st.fixed_dictionaries(
    {
        "merge_slashes": st.booleans(),
        "encoded_slashes": st.sampled_from(["refuse", "keep"]),
        "path_params": st.sampled_from(["refuse", "keep"]),
    }
)
METHODS = st.sampled_from([b"GET", b"POST", b"OPTIONS"])
PIECES = [b"/", b".", b"%2e", b"%2E", b"%2f", b"a", b";", b"%", b"~", b"\\"]
PIECES_MORE = [*PIECES, b"..", b"%2F", b"%5c", b"%25", b"%41", b"%20", b"?", b"\xc3\xa9", b"{"]
PATHISH = st.lists(st.sampled_from(PIECES_MORE), max_size=30).map(b"".join)
TARGETS = st.one_of(
    st.binary(max_size=60),
    st.binary(max_size=60).map(lambda b: b"/" + b),
    PATHISH.map(lambda b: b"/" + b),
    PATHISH,
    st.tuples(st.sampled_from([b"http://h", b"HTTPS://h:1", b"http://"]), PATHISH).map(b"".join),
)


def _attempt(method: bytes, target: bytes, options: dict[str, Any]) -> Optional[Target]:
    try:
        return normalize_target(method, target, **options)
    except TargetError as e:
        assert e.status in (400, 405, 414)
        assert e.reason and e.message
        return None


@settings(max_examples=1500)
@given(METHODS, TARGETS, OPTIONS)
def test_property_total_idempotent_ascii(
    method: bytes, target: bytes, options: dict[str, Any]
) -> None:
    result = _attempt(method, target, options)  # (a) a TargetError or a Target
    if result is None:
        return
    # (b) idempotent
    again = normalize_target(method, result.uri, **options)
    if result.form == "absolute":
        assert again == attrs.evolve(result, form="origin", authority=None)
    else:
        assert again == result
    # (e) plain ASCII, nothing below 0x21, no DEL
    assert all(0x21 <= c < 0x7F for c in result.uri)
    if result.form == "asterisk":
        assert result.path == b"*"
        return
    # (c) no dot segment, no "//" when merging
    assert result.path.startswith(b"/")
    segments = result.path.split(b"/")
    assert b"." not in segments
    assert b".." not in segments
    if options["merge_slashes"]:
        assert b"//" not in result.path
    if options["path_params"] == "refuse":
        assert b";" not in result.path


@settings(max_examples=1500)
@given(METHODS, TARGETS, st.booleans(), st.sampled_from(["refuse", "keep"]))
def test_property_decoding_upstream_sees_what_router_saw(
    method: bytes, target: bytes, merge_slashes: bool, path_params: str
) -> None:
    # (d) with encoded_slashes="refuse", decoding the path neither creates a separator
    # nor a dot segment: a decoding upstream resolves the same segments the router saw.
    result = _attempt(method, target, {"merge_slashes": merge_slashes, "path_params": path_params})
    if result is None or result.form == "asterisk":
        return
    routed = [unquote_to_bytes(s) for s in result.path.split(b"/")]
    served = unquote_to_bytes(result.path).split(b"/")
    assert served == routed
    assert b"." not in served
    assert b".." not in served
    assert all(b"\\" not in s for s in served)


@settings(max_examples=1000)
@given(
    st.lists(
        st.sampled_from(
            [
                b"/",
                b"a",
                b"Z",
                b"0",
                b"-",
                b"_",
                b"~",
                b"!",
                b"*",
                b":",
                b"@",
                b"?",
                b"=",
                b"&",
                b".",
            ]
        ),
        max_size=30,
    ).map(lambda p: b"/" + b"".join(p)),
    OPTIONS,
)
def test_property_fast_path_agrees_with_full_algorithm(
    target: bytes, options: dict[str, Any]
) -> None:
    fast = _attempt(b"GET", target, options)
    try:
        slow: Optional[Target] = _normalize_slow(
            b"GET",
            target,
            options["merge_slashes"],
            options["encoded_slashes"],
            options["path_params"],
        )
    except TargetError:
        slow = None
    assert fast == slow
