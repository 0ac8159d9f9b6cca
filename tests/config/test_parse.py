"""Config validation: every error is one line naming the file and the key."""

from __future__ import annotations

import pytest

from bungate.config import DEFAULT_CONFIG, ConfigError, load_config, parse_config, with_overrides
from bungate.config.convert import from_json, to_json


def test_defaults_match_the_documented_table():
    c = parse_config({})
    assert (c.server.host, c.server.port) == ("0.0.0.0", 3000)
    cl = c.cluster
    assert cl.enabled is False and cl.workers >= 1 and cl.restart_workers is True
    assert (cl.max_restarts, cl.restart_delay, cl.respawn_threshold) == (10, 1.0, 5)
    assert (cl.respawn_threshold_time, cl.shutdown_timeout) == (60.0, 30.0)
    assert cl.exit_on_shutdown is True
    assert cl.heartbeat_timeout == 30.0
    assert (c.logger.level, c.logger.request_logging, c.logger.format) == ("info", True, "text")
    assert (c.metrics.enabled, c.metrics.path) == (False, "/metrics")
    assert c.server.max_body_size == 10 * 1024 * 1024


def test_builtin_default_runs_a_cluster_with_an_echo_route():
    c = parse_config(DEFAULT_CONFIG)
    assert c.cluster.enabled and c.routes[0].handler == "bungate.handlers:echo"


@pytest.mark.parametrize(
    "data, key, words",
    [
        ({"server": {"port": "x"}}, "server.port", "whole number"),
        ({"server": {"port": 70000}}, "server.port", "at most 65535"),
        ({"server": {"bogus": 1}}, "server.bogus", "unknown key"),
        ({"nope": 1}, "nope", "unknown key"),
        ({"cluster": {"workers": 0}}, "cluster.workers", "at least 1"),
        ({"cluster": {"enabled": "yes"}}, "cluster.enabled", "true or false"),
        ({"cluster": {"restart_delay": -1}}, "cluster.restart_delay", "at least 0"),
        (
            {"cluster": {"heartbeat_interval": 10, "heartbeat_timeout": 5}},
            "cluster.heartbeat_timeout",
            "longer",
        ),
        ({"logger": {"level": "loud"}}, "logger.level", "one of"),
        ({"routes": [{"pattern": "/a"}]}, "routes[0]", "needs one of"),
        (
            {
                "routes": [
                    {
                        "pattern": "/a",
                        "load_balancer": {
                            "targets": [{"url": "http://h"}],
                            "sticky_session": {"cookie": "a;b"},
                        },
                    }
                ]
            },
            "routes[0].load_balancer.sticky_session.cookie",
            "not a cookie name",
        ),
        (
            {
                "routes": [
                    {
                        "pattern": "/a",
                        "load_balancer": {
                            "targets": [{"url": "http://h"}],
                            "sticky_session": {"ttl": 0},
                        },
                    }
                ]
            },
            "routes[0].load_balancer.sticky_session.ttl",
            "at least 1",
        ),
        (
            {"routes": [{"pattern": "/a", "handler": "m:f", "circuit_breaker": {"enabled": True}}]},
            "routes[0].circuit_breaker",
            "handler",
        ),
        ({"routes": [{"pattern": "/a", "target": "ftp://x"}]}, "routes[0].target", "http://"),
        ({"routes": [{"pattern": "/a", "target": "http://"}]}, "routes[0].target", "no host"),
        (
            {"routes": [{"pattern": "/a", "target": "http://h:99999"}]},
            "routes[0].target",
            "valid URL",
        ),
        (
            {"routes": [{"pattern": "a", "target": "http://h"}]},
            "routes[0].pattern",
            "start with '/'",
        ),
        (
            {"routes": [{"pattern": "/a/*/b", "target": "http://h"}]},
            "routes[0].pattern",
            "last segment",
        ),
        (
            {"routes": [{"pattern": "/a", "target": "http://h", "handler": "m:f"}]},
            "routes[0]",
            "exactly one",
        ),
        (
            {"routes": [{"pattern": "/a", "handler": "not an import"}]},
            "routes[0].handler",
            "import string",
        ),
        (
            {"routes": [{"pattern": "/a", "target": "http://h", "methods": ["FETCH"]}]},
            "routes[0].methods",
            "FETCH",
        ),
        (
            {"routes": [{"pattern": "/a", "target": "http://h", "timeout": 0}]},
            "routes[0].timeout",
            "at least",
        ),
        ({"routes": "x"}, "routes", "must be a list"),
        ({"server": {"keepalive_requests": -1}}, "server.keepalive_requests", "at least 0"),
        ({"server": {"tls": {"enabled": True}}}, "server.tls.cert", "required"),
        ({"metrics": {"listen": "nope"}}, "metrics.listen", "host:port"),
    ],
)
def test_errors_name_the_source_and_key(data, key, words):
    with pytest.raises(ConfigError) as e:
        parse_config(data, source="gw.yaml")
    assert e.value.key == key
    assert str(e.value).startswith(f"gw.yaml: {key}: ")
    assert words in str(e.value)
    assert "\n" not in str(e.value)


def test_load_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("server: [\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: is not valid YAML at line \d+"):
        load_config(str(bad))
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(str(empty)).server.port == 3000


def test_methods_are_upper_cased_and_overrides_reach_workers():
    c = parse_config({"routes": [{"pattern": "/a", "target": "http://h/", "methods": ["get"]}]})
    assert c.routes[0].methods == ("GET",)
    assert c.routes[0].target == "http://h"
    o = with_overrides(c, port=8080, workers=3)
    assert o.server.port == 8080 and o.cluster.workers == 3 and o.cluster.enabled
    # A worker gets the config as JSON: it says the same.
    assert from_json(to_json(o)) == o and from_json(to_json(o)).server.port == 8080


@pytest.mark.parametrize(
    "value, expected",
    [(None, "auto"), ("auto", "auto"), (True, "on"), (False, "off"), ("on", "on")],
)
def test_eager_writes_takes_yaml_booleans(value, expected):
    server = {} if value is None else {"eager_writes": value}
    assert parse_config({"server": server}).server.eager_writes == expected
    with pytest.raises(ConfigError, match=r"server\.eager_writes: must be auto, true or false"):
        parse_config({"server": {"eager_writes": "sometimes"}})
