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


def test_the_limit_table_descriptor_round_trips_after_the_accept_table() -> None:
    extra = ["redirect", "metrics"]
    fds, table = WorkerLaunch.layout(extra, with_table=True)
    limits = WorkerLaunch.limit_table_fd(extra, with_table=True)
    assert (table, limits) == (7, 8)
    assert table is not None
    # without an accept table (the table is full) it takes the accept table's place
    assert WorkerLaunch.limit_table_fd(extra, with_table=False) == 7
    assert WorkerLaunch.limit_table_fd([], with_table=True) == 6
    launch = WorkerLaunch(
        worker_id=1, master_pid=42, listeners=fds, accept_table=(table, 1), limit_table=limits
    )
    env = launch.to_env({})
    assert env["BUNGATE_LIMIT_TABLE"] == "8"
    assert WorkerLaunch.from_env(env) == launch
    # every descriptor is distinct
    numbers = [*fds.values(), 4, table, limits]
    assert len(set(numbers)) == len(numbers)


@pytest.mark.parametrize("value", [None, "", "x", "-3", "3:1", "٣"])
def test_a_bad_limit_table_value_means_no_table(value) -> None:
    env = {"CLUSTER_WORKER": "true", "CLUSTER_WORKER_ID": "1"}
    if value is not None:
        env["BUNGATE_LIMIT_TABLE"] = value
    launch = WorkerLaunch.from_env(env)
    assert launch is not None and launch.limit_table is None


def test_a_stale_limit_table_variable_does_not_leak_into_the_next_worker() -> None:
    first = WorkerLaunch(worker_id=1, master_pid=1, limit_table=6)
    second = WorkerLaunch(worker_id=2, master_pid=1)
    env = second.to_env(first.to_env({}))
    assert "BUNGATE_LIMIT_TABLE" not in env
    assert WorkerLaunch.from_env(env) == second
