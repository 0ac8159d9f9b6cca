"""Tests for bungate.core.clientaddr: who the client is behind trusted proxies."""

from __future__ import annotations

from typing import List, Sequence

import pytest

from bungate.core.clientaddr import TrustedProxies, client_address

TRUSTED = TrustedProxies.parse(["10.0.0.0/8", "192.0.2.7", "2001:db8:1::/64", "::1"])


def lines(*values: str) -> List[bytes]:
    return [value.encode("latin-1") for value in values]


XFF_CASES = [
    # (why, peer, header lines, expected)
    ("untrusted peer, forged XFF", "203.0.113.5", ["1.1.1.1"], "203.0.113.5"),
    ("untrusted peer, forged trusted XFF", "203.0.113.5", ["10.0.0.1"], "203.0.113.5"),
    ("trusted peer, no header", "10.0.0.2", [], "10.0.0.2"),
    ("trusted peer, empty header", "10.0.0.2", [""], "10.0.0.2"),
    ("client, proxy1 (trusted)", "10.0.0.2", ["198.51.100.1, 10.0.0.3"], "198.51.100.1"),
    (
        "untrusted entry right of a trusted one: forged left part ignored",
        "10.0.0.2",
        ["1.1.1.1, 10.9.9.9, 198.51.100.77, 10.0.0.3"],
        "198.51.100.77",
    ),
    ("every entry trusted: the left-most", "10.0.0.2", ["10.1.1.1, 192.0.2.7"], "10.1.1.1"),
    (
        "several header lines joined in order",
        "10.0.0.2",
        ["6.6.6.6", "198.51.100.2", "10.0.0.9"],
        "198.51.100.2",
    ),
    (
        "several lines, the last untrusted one is right-most",
        "10.0.0.2",
        ["198.51.100.2, 10.0.0.8", "198.51.100.3"],
        "198.51.100.3",
    ),
    ("spaces and tabs", "10.0.0.2", ["  198.51.100.4 ,\t10.0.0.3\t"], "198.51.100.4"),
    ("empty list elements skipped", "10.0.0.2", [",198.51.100.5,, 10.0.0.3,"], "198.51.100.5"),
    ("IPv6 client", "10.0.0.2", ["2001:DB8:9::1, 10.0.0.3"], "2001:db8:9::1"),
    ("IPv6 chain, /64", "2001:db8:1::5", ["2001:db8:9::2, 2001:db8:1::ff"], "2001:db8:9::2"),
    ("outside the /64", "2001:db8:1::5", ["1.2.3.4, 2001:db8:2::1"], "2001:db8:2::1"),
    ("/8 top edge", "10.0.0.2", ["198.51.100.6, 10.255.255.255"], "198.51.100.6"),
    ("/8 edge: 11.0.0.0 not trusted", "10.0.0.2", ["198.51.100.6, 11.0.0.0"], "11.0.0.0"),
    ("IPv4-mapped peer is its IPv4 form", "::ffff:10.0.0.2", ["198.51.100.8"], "198.51.100.8"),
    ("IPv4-mapped untrusted peer", "::ffff:203.0.113.9", ["1.1.1.1"], "203.0.113.9"),
    ("IPv4-mapped entry normalized", "10.0.0.2", ["::ffff:198.51.100.9"], "198.51.100.9"),
    ("mapped trusted hop", "10.0.0.2", ["198.51.100.1, ::ffff:10.0.0.5"], "198.51.100.1"),
    ("garbage nearest: the peer", "10.0.0.2", ["198.51.100.1, <script>"], "10.0.0.2"),
    ("garbage mid-chain", "10.0.0.2", ["1.1.1.1, junk, 10.0.0.3"], "10.0.0.3"),
    ("garbage left of client", "10.0.0.2", ["junk, 198.51.100.3"], "198.51.100.3"),
    ("unknown stops the walk", "10.0.0.2", ["1.1.1.1, unknown"], "10.0.0.2"),
    ("hostname stops the walk", "10.0.0.2", ["1.1.1.1, proxy.example"], "10.0.0.2"),
    ("out-of-range octet", "10.0.0.2", ["1.1.1.1, 10.0.0.256"], "10.0.0.2"),
    ("IPv6 zone refused", "10.0.0.2", ["1.1.1.1, fe80::1%eth0"], "10.0.0.2"),
    ("IPv4 ports stripped", "10.0.0.2", ["198.51.100.1:5678, 10.0.0.3:80"], "198.51.100.1"),
    ("bracketed IPv6 with port", "10.0.0.2", ["[2001:db8:9::3]:80"], "2001:db8:9::3"),
    ("bracketed IPv6 without port", "10.0.0.2", ["[2001:db8:9::3]"], "2001:db8:9::3"),
    ("bad port stops the walk", "10.0.0.2", ["1.1.1.1, 198.51.100.1:99999"], "10.0.0.2"),
    ("empty port stops the walk", "10.0.0.2", ["1.1.1.1, 198.51.100.1:"], "10.0.0.2"),
    ("bracketed IPv4 is garbage", "10.0.0.2", ["1.1.1.1, [198.51.100.1]"], "10.0.0.2"),
    ("unclosed bracket", "10.0.0.2", ["1.1.1.1, [2001:db8::1"], "10.0.0.2"),
    ("non-ASCII bytes", "10.0.0.2", ["1.1.1.1, 10.0.0.\u00e9"], "10.0.0.2"),
    ("peer that is not an address is returned as is", "unix", ["1.1.1.1"], "unix"),
    ("peer normalized", "2001:DB8:0:0::7", [], "2001:db8::7"),
]


@pytest.mark.parametrize(
    "peer, values, expected", [case[1:] for case in XFF_CASES], ids=[c[0] for c in XFF_CASES]
)
def test_x_forwarded_for(peer: str, values: Sequence[str], expected: str) -> None:
    assert client_address(peer, lines(*values), TRUSTED) == expected


FORWARDED_CASES = [
    ("plain for=", ["for=198.51.100.1"], "198.51.100.1"),
    ("RFC 7239 chain", ["for=198.51.100.1;proto=http;by=10.0.0.3, for=10.0.0.4"], "198.51.100.1"),
    ("quoted IPv6 with port", ['for="[2001:db8:cafe::17]:4711"'], "2001:db8:cafe::17"),
    ("quoted IPv6 without port", ['For="[2001:db8:cafe::17]"'], "2001:db8:cafe::17"),
    ("quoted IPv4 with port", ['for="198.51.100.2:8080"'], "198.51.100.2"),
    ("obfuscated port stripped", ['for="198.51.100.2:_abc"'], "198.51.100.2"),
    ("parameter names in any case", ["FOR=198.51.100.3;Proto=https"], "198.51.100.3"),
    ("trusted hops skipped", ["for=198.51.100.4, for=10.1.1.1, for=192.0.2.7"], "198.51.100.4"),
    ("all trusted: left-most", ["for=10.1.1.1, for=10.2.2.2"], "10.1.1.1"),
    ("several lines", ["for=6.6.6.6, for=198.51.100.5", "for=10.0.0.9"], "198.51.100.5"),
    ("obfuscated identifier stops", ["for=198.51.100.6, for=_hidden"], "10.0.0.2"),
    ("unknown stops", ["for=198.51.100.6, for=unknown"], "10.0.0.2"),
    ("obfuscated mid-chain: last good", ["for=6.6.6.6, for=_x, for=10.0.0.7"], "10.0.0.7"),
    ("bare IPv6 (unbracketed) refused", ["for=1.1.1.1, for=2001:db8::1"], "10.0.0.2"),
    ("hop without for= stops", ["for=1.1.1.1, proto=https;by=10.0.0.3"], "10.0.0.2"),
    ("two for= in one hop stops", ["for=1.1.1.1;for=10.0.0.3"], "10.0.0.2"),
    ("comma inside quotes is not a separator", ['for="1.1.1.1,10.0.0.3"'], "10.0.0.2"),
    ("unclosed quote stops", ['for=1.1.1.1, for="10.0.0.3'], "10.0.0.2"),
    ("bad pair stops", ["for=1.1.1.1, garbage"], "10.0.0.2"),
    ("spaces", ["  for=198.51.100.8 ;proto=http ,  for=10.0.0.3  "], "198.51.100.8"),
    ("escaped quoted-string", ['for="\\[2001:db8::8\\]"'], "2001:db8::8"),
]


@pytest.mark.parametrize(
    "values, expected", [case[1:] for case in FORWARDED_CASES], ids=[c[0] for c in FORWARDED_CASES]
)
def test_forwarded(values: Sequence[str], expected: str) -> None:
    assert client_address("10.0.0.2", lines(*values), TRUSTED, header="forwarded") == expected


def test_forwarded_from_an_untrusted_peer_is_ignored() -> None:
    assert client_address("203.0.113.1", lines("for=1.1.1.1"), TRUSTED, header="Forwarded") == (
        "203.0.113.1"
    )


def test_x_forwarded_for_syntax_is_not_forwarded_syntax() -> None:
    # With header="forwarded", an XFF-style value has no for= and is unreadable.
    assert client_address("10.0.0.2", lines("198.51.100.1"), TRUSTED, header="forwarded") == (
        "10.0.0.2"
    )


def test_nobody_trusted() -> None:
    assert client_address("10.0.0.2", lines("1.1.1.1"), TrustedProxies.parse([])) == "10.0.0.2"


@pytest.mark.parametrize(
    "address, expected",
    [
        ("10.0.0.1", True),
        ("10.255.0.1", True),
        ("11.0.0.1", False),
        ("192.0.2.7", True),
        ("192.0.2.8", False),
        ("::ffff:10.0.0.1", True),
        ("::ffff:192.0.2.8", False),
        ("2001:db8:1::abcd", True),
        ("2001:db8:1:0:ffff:ffff:ffff:ffff", True),
        ("2001:db8:1:1::", False),
        ("::1", True),
        ("not-an-ip", False),
        ("", False),
    ],
)
def test_contains(address: str, expected: bool) -> None:
    assert TRUSTED.contains(address) is expected


def test_parse_mapped_network_is_ipv4() -> None:
    trusted = TrustedProxies.parse(["::ffff:10.0.0.0/104"])
    assert trusted.contains("10.3.4.5")
    assert trusted.contains("::ffff:10.3.4.5")
    assert not trusted.contains("11.0.0.1")


@pytest.mark.parametrize(
    "entry", ["10.0.0.1/8", "10.0.0.0/33", "nonsense", "", "2001:db8::/129", "fe80::1%eth0"]
)
def test_parse_names_the_bad_entry(entry: str) -> None:
    with pytest.raises(ValueError) as info:
        TrustedProxies.parse(["10.0.0.0/8", entry])
    assert repr(entry) in str(info.value)


def test_parse_refuses_a_bare_string() -> None:
    with pytest.raises(ValueError):
        TrustedProxies.parse("10.0.0.0/8")
