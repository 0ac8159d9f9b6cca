"""Warnings: a valid config that is probably not what the operator meant."""

from __future__ import annotations

import pytest

from bungate.config import parse_config, warnings

TLS = {"enabled": True, "cert": "c.pem", "key": "k.pem"}
ROUTE = {"pattern": "/a", "target": "http://h"}


def warned(data: dict) -> list[str]:
    return warnings(parse_config(data, source="gw.yaml"))


def test_a_config_with_routes_and_nothing_odd_warns_of_nothing():
    assert warned({"routes": [ROUTE]}) == []


@pytest.mark.parametrize(
    "data, answered",
    [
        ({}, "every request other than /health gets 404"),
        ({"health": {"path": "/up"}}, "every request other than /up gets 404"),
        ({"metrics": {"enabled": True}}, "every request other than /health and /metrics"),
        ({"metrics": {"enabled": True, "listen": 9100}}, "other than /health gets 404"),
        ({"health": {"enabled": False}}, "every request gets 404"),
    ],
)
def test_no_routes_says_what_every_request_gets(data, answered):
    (line,) = warned(data)
    assert line.startswith("gw.yaml: routes: none configured: ")
    assert answered in line


def test_no_routes_is_said_plainly():
    assert warned({}) == [
        "gw.yaml: routes: none configured: every request other than /health gets 404"
    ]


def test_a_redirect_without_allowed_hosts_follows_any_host():
    (line,) = warned(
        {"server": {"tls": {**TLS, "redirect_http": {"port": 8080}}}, "routes": [ROUTE]}
    )
    assert line.startswith("gw.yaml: server.tls.redirect_http.allowed_hosts: empty: ")
    assert "any Host header" in line
    listed = {**TLS, "redirect_http": {"allowed_hosts": ["example.com"]}}
    assert warned({"server": {"tls": listed}, "routes": [ROUTE]}) == []


def test_a_redirect_without_tls_is_ignored():
    (line,) = warned({"server": {"tls": {"redirect_http": {}}}, "routes": [ROUTE]})
    assert line.startswith("gw.yaml: server.tls.redirect_http: ignored: ")


def test_an_https_upstream_whose_certificate_is_not_checked():
    route = {"pattern": "/a", "target": "https://h", "tls_verify": False}
    (line,) = warned({"routes": [route]})
    assert line.startswith("gw.yaml: routes[0].tls_verify: false: ")
    balanced = {
        "pattern": "/b",
        "tls_verify": False,
        "load_balancer": {"targets": [{"url": "http://a"}, {"url": "https://b"}]},
    }
    assert [w.split(": ")[1] for w in warned({"routes": [ROUTE, balanced]})] == [
        "routes[1].tls_verify"
    ]


def test_every_warning_is_one_line():
    data = {
        "server": {"tls": {**TLS, "redirect_http": {}}},
        "routes": [{"pattern": "/a", "target": "https://h", "tls_verify": False}],
    }
    lines = warned(data)
    assert len(lines) == 2
    assert all("\n" not in line and line.startswith("gw.yaml: ") for line in lines)
