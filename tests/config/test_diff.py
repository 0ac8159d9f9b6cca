"""Which keys a reload changes, and which a running master refuses (pure)."""

from __future__ import annotations

from typing import Any

import pytest

from bungate.config import ConfigError, parse_config
from bungate.config.diff import changed_keys, changed_sections
from bungate.master.reload import refused_changes


def config(**sections: Any) -> Any:
    doc: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": 8080},
        "cluster": {"enabled": True, "workers": 2},
        "routes": [{"pattern": "/api/*", "target": "http://127.0.0.1:9000"}],
    }
    for name, value in sections.items():
        doc[name] = {**doc.get(name, {}), **value} if isinstance(value, dict) else value
    return parse_config(doc, source="gw.yaml")


def test_nothing_changed_is_no_key() -> None:
    assert changed_keys(config(), config()) == []


def test_each_changed_key_is_named_by_its_dotted_path() -> None:
    new = config(
        server={"port": 8081},
        cluster={"workers": 3},
        metrics={"listen": "127.0.0.1:9100", "enabled": True},
    )
    assert changed_keys(config(), new) == [
        "cluster.workers",
        "metrics.enabled",
        "metrics.listen",
        "server.port",
    ]
    assert changed_sections(config(), new) == ["cluster", "metrics", "server"]


def test_routes_change_as_a_whole() -> None:
    new = config(routes=[{"pattern": "/api/*", "target": "http://127.0.0.1:9001"}])
    assert changed_keys(config(), new) == ["routes"]


def test_durations_written_differently_are_the_same_value() -> None:
    assert (
        changed_keys(
            config(cluster={"shutdown_timeout": 30}), config(cluster={"shutdown_timeout": "30s"})
        )
        == []
    )


def test_the_source_file_is_not_a_change() -> None:
    a = parse_config({"routes": []}, source="a.yaml")
    b = parse_config({"routes": []}, source="b.yaml")
    assert changed_keys(a, b) == []


def test_a_master_refuses_to_leave_cluster_mode_naming_the_key() -> None:
    with pytest.raises(ConfigError) as caught:
        refused_changes(config(), config(cluster={"enabled": False}))
    assert caught.value.key == "cluster.enabled" and "restart" in caught.value.problem


def test_everything_else_a_master_applies() -> None:
    refused_changes(config(), config(server={"port": 1}, cluster={"workers": 5, "python": "pypy3"}))
