"""Durations: seconds, or a string with a unit; milliseconds caught by each field's maximum."""

from __future__ import annotations

import math

import attrs
import pytest

from bungate.config import ConfigError, GatewayConfig, parse_config
from bungate.config.convert import from_json, to_json
from bungate.config.fields import SPEC
from bungate.config.schema import LoadBalancerConfig, RouteConfig

HINT = (
    "gw.yaml: cluster.shutdown_timeout: 30000 seconds is more than 3600 s; durations are in "
    'seconds: write 30 (or "30s"), or "30000ms" if you meant milliseconds'
)


def shutdown_timeout(value: object) -> float:
    return parse_config(
        {"cluster": {"shutdown_timeout": value}}, "gw.yaml"
    ).cluster.shutdown_timeout


def refused(value: object) -> str:
    with pytest.raises(ConfigError) as e:
        shutdown_timeout(value)
    assert e.value.key == "cluster.shutdown_timeout"
    return str(e.value)


@pytest.mark.parametrize(
    "value, seconds",
    [
        (30, 30.0),
        (2.5, 2.5),
        ("30s", 30.0),
        ("1.5s", 1.5),
        ("500ms", 0.5),
        ("9ms", 0.009),
        ("30000ms", 30.0),
        ("2m", 120.0),
        ("1h", 3600.0),
        (" 10 s ", 10.0),
        (".5s", 0.5),
    ],
)
def test_a_duration_is_seconds_or_a_string_with_a_unit(value, seconds):
    parsed = shutdown_timeout(value)
    assert type(parsed) is float
    assert parsed == seconds


def test_a_bare_number_that_is_clearly_milliseconds_is_refused_with_a_hint():
    assert refused(30000) == HINT
    assert "\n" not in HINT


def test_the_hint_names_fractions_and_the_field_maximum():
    assert 'write 30.5 (or "30.5s"), or "30500ms"' in refused(30500)
    with pytest.raises(ConfigError) as e:
        parse_config({"cluster": {"respawn_threshold_time": 60000}}, "gw.yaml")
    assert 'write 60 (or "60s")' in str(e.value)
    route = {
        "pattern": "/a",
        "load_balancer": {
            "targets": [{"url": "http://h"}],
            "sticky_session": {"ttl": 3600000},
        },
    }
    with pytest.raises(ConfigError) as e:
        parse_config({"routes": [route]}, "gw.yaml")
    assert "3600000 seconds is more than 604800 s" in str(e.value)
    assert 'write 3600 (or "3600s")' in str(e.value)


@pytest.mark.parametrize(
    "value, words",
    [
        (5000000, "must be at most 3600 s, got 5000000"),  # not milliseconds either
        ("2h", "must be at most 3600 s, got '2h'"),
        ("soon", 'must be a number of seconds or a duration such as "30s"'),
        ("30d", "unknown unit 'd' in '30d' (use ms, s, m or h)"),
        ("30 sec", "unknown unit 'sec'"),
        ("-5s", "must not be negative, got '-5s'"),
        (-5, "must be at least 0 s, got -5"),
        ("30", "'30' has no unit: write 30 (seconds) or \"30s\""),
        ("1h30m", "must be a number of seconds"),
        ("", "must be a number of seconds"),
        (True, "must be a number of seconds"),
        ([30], "must be a number of seconds"),
        (math.nan, "must be a finite number"),
        (math.inf, "must be a finite number"),
    ],
)
def test_other_units_negative_values_and_garbage_are_refused(value, words):
    message = refused(value)
    assert message.startswith("gw.yaml: cluster.shutdown_timeout: ")
    assert words in message
    assert "\n" not in message


def test_a_duration_string_below_the_minimum_is_refused_in_seconds():
    with pytest.raises(ConfigError, match=r"ready_timeout: must be at least 0\.1 s, got '50ms'"):
        parse_config({"cluster": {"ready_timeout": "50ms"}})


def _duration_fields(cls: type, path: str = "") -> list[tuple[str, attrs.Attribute]]:
    found = []
    for field in attrs.fields(cls):
        spec = field.metadata.get(SPEC)
        if spec is None:
            continue
        if spec.kind == "seconds":
            found.append((path + field.name, field))
        elif spec.kind == "section":
            found.extend(_duration_fields(field.default.factory, f"{path}{field.name}."))
    return found


def _all_duration_fields() -> list[tuple[str, attrs.Attribute]]:
    # routes and load_balancer have readers of their own: walk them from their classes.
    return [
        *_duration_fields(GatewayConfig),
        *_duration_fields(RouteConfig, "routes[]."),
        *_duration_fields(LoadBalancerConfig, "routes[].load_balancer."),
    ]


@pytest.mark.parametrize(
    "name, field", [pytest.param(n, f, id=n) for n, f in _all_duration_fields()]
)
def test_every_duration_has_a_maximum_its_default_is_within(name, field):
    spec = field.metadata[SPEC]
    assert spec.maximum is not None, f"{name}: no maximum, so milliseconds pass as seconds"
    assert (spec.minimum or 0.0) <= field.default <= spec.maximum


def test_durations_with_units_reach_workers_as_seconds():
    c = parse_config(
        {
            "cluster": {"shutdown_timeout": "30000ms", "restart_delay": "1.5s"},
            "routes": [{"pattern": "/a", "target": "http://h", "timeout": "2m"}],
        }
    )
    assert (c.cluster.shutdown_timeout, c.cluster.restart_delay) == (30.0, 1.5)
    assert c.routes[0].timeout == 120.0
    assert from_json(to_json(c)) == c
