"""Config errors an operator can act on: every problem at once, and the key they meant."""

from __future__ import annotations

import pytest

from bungate.config import (
    ConfigError,
    ConfigErrors,
    error_lines,
    load_config,
    parse_config,
    parse_route,
)

CAMEL_CASE_KEYS = [
    ("shutdownTimeout", "shutdown_timeout"),
    ("restartDelay", "restart_delay"),
    ("maxRestarts", "max_restarts"),
    ("respawnThresholdTime", "respawn_threshold_time"),
    ("exitOnShutdown", "exit_on_shutdown"),
]


def errors_of(data: object) -> ConfigError:
    with pytest.raises(ConfigError) as e:
        parse_config(data, source="gw.yaml")
    return e.value


def keys(error: ConfigError) -> list[str]:
    return [e.key for e in error.errors]


# --- every problem at once ----------------------------------------------------------------


def test_three_bad_keys_in_three_sections_are_three_lines_in_document_order():
    # Written logger, server, cluster: not the schema's order (server, cluster, logger).
    error = errors_of(
        {
            "logger": {"level": "loud"},
            "server": {"port": "x"},
            "cluster": {"workers": 0},
        }
    )
    assert isinstance(error, ConfigErrors)
    assert keys(error) == ["logger.level", "server.port", "cluster.workers"]
    lines = str(error).split("\n")
    assert lines == error_lines(error)
    assert len(lines) == 3
    for line, key in zip(lines, keys(error)):
        assert line.startswith(f"gw.yaml: {key}: ")
    # The first problem is the error's own, for code that handles one ConfigError.
    assert (error.source, error.key) == ("gw.yaml", "logger.level")
    assert error.problem == error.errors[0].problem
    assert "one of" in error.problem


def test_keys_within_a_section_are_reported_in_the_order_they_are_written():
    error = errors_of({"cluster": {"workers": 0, "enabled": "yes", "bogus": 1, "max_restarts": -1}})
    assert keys(error) == [
        "cluster.workers",
        "cluster.enabled",
        "cluster.bogus",
        "cluster.max_restarts",
    ]


def test_a_file_reports_every_problem_in_the_order_of_its_lines(tmp_path):
    path = tmp_path / "gw.yaml"
    path.write_text(
        "routes:\n"
        "  - pattern: /a\n"
        "    target: ftp://x\n"
        "cluster:\n"
        "  shutdownTimeout: 30000\n"
        "server:\n"
        "  port: 70000\n"
    )
    with pytest.raises(ConfigErrors) as e:
        load_config(str(path))
    assert keys(e.value) == ["routes[0].target", "cluster.shutdownTimeout", "server.port"]
    assert all(line.startswith(f"{path}: ") for line in error_lines(e.value))


def test_one_problem_is_one_plain_error_on_one_line():
    error = errors_of({"server": {"port": "x"}})
    assert type(error) is ConfigError
    assert error.errors == [error]
    assert error_lines(error) == ["gw.yaml: server.port: must be a whole number, got 'x'"]


def test_a_section_that_is_not_a_mapping_does_not_hide_the_others():
    error = errors_of({"server": "x", "cluster": [], "logger": {"level": "loud"}})
    assert keys(error) == ["server", "cluster", "logger.level"]
    assert error.errors[0].problem == "must be a mapping, got a string"


def test_a_route_that_fails_does_not_hide_the_other_routes():
    error = errors_of(
        {
            "routes": [
                {"pattern": "/a", "target": "http://h"},
                "not a route",
                {"pattern": 5, "target": "http://h"},
                {"pattern": "/a", "target": "http://h", "timeout": 0},
                {"pattern": "/b//c", "target": "ftp://x"},
            ]
        }
    )
    assert keys(error) == [
        "routes[1]",
        "routes[2].pattern",
        # routes[3] keeps its index past the two it follows, and is still checked.
        "routes[3].pattern",
        "routes[3].timeout",
        "routes[4].pattern",
        "routes[4].target",
    ]
    assert "already routed by routes[0]" in error.errors[2].problem
    assert "write it as '/b/c'" in error.errors[4].problem


def test_a_check_across_fields_is_skipped_when_the_fields_it_reads_failed():
    # heartbeat_timeout is not compared with an interval that is only the default.
    error = errors_of({"cluster": {"heartbeat_interval": "x", "heartbeat_timeout": 1}})
    assert keys(error) == ["cluster.heartbeat_interval"]
    # A refused target was still written: the route is not told it has none.
    error = errors_of({"routes": [{"pattern": "/a", "target": "ftp://x"}]})
    assert keys(error) == ["routes[0].target"]
    # ... nor does a refused tls.enabled ask for a certificate.
    assert keys(errors_of({"server": {"tls": {"enabled": "yes"}}})) == ["server.tls.enabled"]


def test_a_check_across_fields_still_runs_beside_unrelated_problems():
    error = errors_of(
        {
            "server": {"port": "x", "tls": {"enabled": True}},
            "routes": [{"pattern": "/a", "timeout": 0}],
        }
    )
    assert keys(error) == ["server.port", "server.tls.cert", "routes[0]", "routes[0].timeout"]
    assert "(and so is server.tls.key)" in error.errors[1].problem


def test_every_route_of_a_load_balancer_target_and_certificate_is_read():
    error = errors_of(
        {
            "server": {"tls": {"certificates": {"a.example.com": {"cert": "c"}, "b": {"cert": 1}}}},
            "routes": [
                {
                    "pattern": "/a",
                    "load_balancer": {"targets": [{}, {"url": "x"}, {"url": "http://h"}]},
                }
            ],
        }
    )
    assert keys(error) == [
        "server.tls.certificates.a.example.com.key",
        "server.tls.certificates.b.cert",
        "server.tls.certificates.b.key",
        "routes[0].load_balancer.targets[0].url",
        "routes[0].load_balancer.targets[1].url",
    ]


def test_parse_route_reports_every_problem_of_the_route():
    with pytest.raises(ConfigErrors) as e:
        parse_route("<add_route>", 3, {"timeout": 0, "pattern": "/a", "target": "ftp://x"})
    assert keys(e.value) == ["routes[3].timeout", "routes[3].target"]
    assert error_lines(e.value)[0].startswith("<add_route>: routes[3].timeout: ")


def test_config_errors_flatten_and_need_one_error():
    a, b, c = (ConfigError("f", k, "bad") for k in "abc")
    nested = ConfigErrors([a, ConfigErrors([b, c])])
    assert nested.errors == [a, b, c]
    assert str(nested) == "f: a: bad\nf: b: bad\nf: c: bad"
    assert str(ConfigErrors([a])) == "f: a: bad"
    with pytest.raises(ValueError):
        ConfigErrors([])


def test_yaml_errors_stay_one_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("server: [\ncluster: {\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(bad))
    assert type(e.value) is ConfigError and len(error_lines(e.value)) == 1


# --- did you mean -------------------------------------------------------------------------


def test_a_misspelt_key_names_the_key_meant():
    error = errors_of({"routes": [{"pattern": "/a", "taget": "http://h"}]})
    # Only the typo: the route is not also told it needs a target.
    assert error_lines(error) == ["gw.yaml: routes[0].taget: unknown key (did you mean 'target'?)"]


@pytest.mark.parametrize("camel, snake", CAMEL_CASE_KEYS)
def test_a_camel_case_key_names_its_snake_case_spelling(camel, snake):
    error = errors_of({"cluster": {camel: 1}})
    assert str(error) == (
        f"gw.yaml: cluster.{camel}: unknown key (did you mean '{snake}'? keys are snake_case)"
    )


def test_a_camel_case_key_with_a_typo_is_still_found():
    error = errors_of({"cluster": {"shutdownTimout": 1}})
    assert error.problem == "unknown key (did you mean 'shutdown_timeout'? keys are snake_case)"


def test_a_key_close_to_none_lists_the_known_keys():
    error = errors_of({"bogus": 1})
    assert error.problem == (
        "unknown key (known keys here: auth, cluster, cors, health, hooks, logger, metrics, "
        "middlewares, rate_limit, redis, routes, security_headers, server)"
    )


def test_the_specs_camel_case_names_the_snake_case_key():
    assert errors_of({"rateLimit": 1}).problem == (
        "unknown key (did you mean 'rate_limit'? keys are snake_case)"
    )


def test_every_unknown_key_of_a_mapping_is_reported():
    error = errors_of({"cluster": {"maxRestarts": 3, "exitOnShutdown": False, "zzz": 1}})
    assert keys(error) == ["cluster.maxRestarts", "cluster.exitOnShutdown", "cluster.zzz"]
