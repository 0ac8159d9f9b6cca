"""The master<->worker contract: a launch survives the environment both ways."""

from __future__ import annotations

import pytest

from bungate.wire import LISTEN_FD, WorkerLaunch, in_worker, worker_id


def test_a_launch_round_trips_through_the_environment() -> None:
    fds, table = WorkerLaunch.layout(["redirect", "metrics"], with_table=True)
    assert fds == {"main": LISTEN_FD, "redirect": 5, "metrics": 6} and table == 7
    launch = WorkerLaunch(
        worker_id=3,
        master_pid=42,
        listeners=fds,
        config_json='{"x":1}',
        tls_copies={"/run/copy.pem": "/etc/cert.pem"},
        accept_table=(table, 2),
    )
    env = launch.to_env({"PATH": "/bin", "CLUSTER_WORKER_ID": "stale", "BUNGATE_FDS": "x=9"})
    assert env["PATH"] == "/bin"
    assert env["CLUSTER_WORKER"] == "true" and env["CLUSTER_WORKER_ID"] == "3"
    assert in_worker(env) and worker_id(env) == "3"
    assert WorkerLaunch.from_env(env) == launch


def test_outside_a_worker_there_is_no_launch() -> None:
    assert WorkerLaunch.from_env({"PATH": "/bin"}) is None
    assert not in_worker({}) and worker_id({}) is None


@pytest.mark.parametrize("value", [None, "", "x", "3", "3:", ":1", "a:b"])
def test_a_bad_accept_table_value_means_no_table(value) -> None:
    env = {"CLUSTER_WORKER": "true", "CLUSTER_WORKER_ID": "1"}
    if value is not None:
        env["BUNGATE_ACCEPT_TABLE"] = value
    launch = WorkerLaunch.from_env(env)
    assert launch is not None and launch.accept_table is None


def test_a_stale_launch_variable_does_not_leak_into_the_next_worker() -> None:
    first = WorkerLaunch(worker_id=1, master_pid=1, accept_table=(7, 1), config_json="{}")
    second = WorkerLaunch(worker_id=2, master_pid=1)
    env = second.to_env(first.to_env({}))
    assert "BUNGATE_ACCEPT_TABLE" not in env and "BUNGATE_CONFIG" not in env
