"""The policy sections: auth, rate_limit, cors, security_headers, header rules, redis."""

from __future__ import annotations

from typing import Any

import pytest

from bungate.config import ConfigError, parse_config
from bungate.config.convert import from_json, to_json
from bungate.config.policy import OFF, inherit

SECRET = "s" * 40


def config(**top: Any) -> Any:
    route = top.pop("route", {})
    doc = {"routes": [{"pattern": "/api/*", "target": "http://127.0.0.1:9", **route}], **top}
    return parse_config(doc, source="gw.yaml")


def problem(**top: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        config(**top)
    return "\n".join(str(e) for e in caught.value.errors)


def test_a_full_policy_round_trips_to_a_worker() -> None:
    c = config(
        auth={"jwt": {"secret": SECRET, "algorithms": ["HS256"], "audience": "api"}},
        rate_limit={"max": 100, "window": "1m", "key": "header:X-Tenant"},
        cors={"origins": ["https://app.example"], "credentials": True},
        security_headers=True,
        redis={"url": "redis://127.0.0.1:6379/0"},
        route={
            "auth": False,
            "rate_limit": {"max": 5, "window": 1, "backend": "redis"},
            "strip_prefix": True,
            "path_rewrite": {"^/v1/": "/"},
            "request_headers": {"set": {"X-Env": "prod"}, "remove": ["X-Debug"]},
            "response_headers": {"add": {"X-Served-By": "bungate"}},
            "hooks": {"before_request": "myapp.hooks:before"},
        },
    )
    assert from_json(to_json(c)) == c
    route = c.routes[0]
    assert route.auth is OFF and inherit(route.auth, c.auth) is None
    assert inherit(route.rate_limit, c.rate_limit).max == 5
    assert inherit(None, c.cors) == c.cors
    assert c.security_headers.enabled and c.security_headers.content_type_options == "nosniff"
    assert c.auth.jwt.audience == ("api",)
    assert route.path_rewrite == (("^/v1/", "/"),)
    assert route.request_headers.set == (("X-Env", "prod"),)


@pytest.mark.parametrize(
    "top, expected",
    [
        ({"auth": {}}, "auth: needs jwt, api_keys"),
        ({"auth": {"jwt": {"secret": SECRET}}}, "auth.jwt.algorithms: is required"),
        (
            {"auth": {"jwt": {"secret": SECRET, "algorithms": ["none"]}}},
            "auth.jwt.algorithms",
        ),
        (
            {"auth": {"jwt": {"secret": SECRET, "public_key": "k.pem", "algorithms": ["HS256"]}}},
            "exactly one key source",
        ),
        (
            {"auth": {"jwt": {"public_key": "k.pem", "algorithms": ["HS256"]}}},
            "algorithm confusion",
        ),
        ({"auth": {"jwt": {"secret": "short", "algorithms": ["HS256"]}}}, "shorter than 32"),
        ({"auth": {"api_keys": ["tooshort"]}}, "auth.api_keys[0]"),
        (
            {"auth": {"api_keys": ["k" * 20], "forward_claims": {"sub": "Host"}}},
            "set by the gateway",
        ),
        ({"auth": {"api_keys": ["k" * 20], "exclude_paths": ["no-slash"]}}, "exclude_paths[0]"),
        ({"rate_limit": {"window": 1}}, "rate_limit.max: is required"),
        ({"rate_limit": {"max": 1, "key": "cookie x"}}, "rate_limit.key: must be ip"),
        ({"rate_limit": {"max": 1, "window": 600000}}, "600000ms"),
        ({"cors": {"origins": "*", "credentials": True}}, "cors.credentials: cannot be true"),
        ({"cors": {"origins": ["app.example"]}}, "cors.origins[0]"),
        ({"cors": {"origins": ["~(unclosed"]}}, "not a regular expression"),
        ({"redis": {"url": "http://x"}}, "redis.url: must be a redis://"),
        ({"security_headers": {"frame_options": "DENY\r\nX: y"}}, "one line"),
        (
            {"route": {"request_headers": {"set": {"Content-Length": "1"}}}},
            "managed by the gateway",
        ),
        ({"route": {"path_rewrite": {"([": "/"}}}, "not a regular expression"),
        ({"route": {"hooks": {"before_requests": "a.b:c"}}}, "did you mean before_request"),
        ({"route": {"middlewares": ["has space"]}}, "neither a plugin name"),
        ({"server": {"trusted_proxies": ["10.0.0.1/8"]}}, "server.trusted_proxies[0]"),
        ({"route": {"auth": "yes"}}, "must be a mapping, or false"),
    ],
)
def test_bad_policy_is_refused_naming_the_key(top: dict[str, Any], expected: str) -> None:
    assert expected in problem(**top)


def test_middlewares_may_be_import_strings() -> None:
    c = config(route={"middlewares": ["myapp.mw:check", "builtin-name"]})
    assert c.routes[0].middlewares == ("myapp.mw:check", "builtin-name")


def test_python_objects_are_refused_when_sent_to_workers() -> None:
    c = parse_config(
        {
            "routes": [
                {"pattern": "/x", "target": "http://127.0.0.1:9", "hooks": {"on_error": print}}
            ]
        }
    )
    with pytest.raises(ConfigError) as caught:
        to_json(c)
    assert caught.value.key == "routes[0].hooks.on_error"
