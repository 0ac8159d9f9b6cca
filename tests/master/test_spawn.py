"""Starting worker processes: what the master puts in a worker's environment."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from bungate.master.fleet import ClusterManager
from bungate.master.spawn import PYPY_GC_NURSERY
from bungate.wire import WorkerLaunch


@pytest.mark.parametrize(
    "operator, allowed, expected",
    [
        (None, None, PYPY_GC_NURSERY),  # bungate's default for PyPy workers
        ("64MB", None, "64MB"),  # the operator's own value wins
        ("64MB", ["PATH"], PYPY_GC_NURSERY),  # filtered out by allowed_env: the default
        ("64MB", ["PATH", "PYPY_GC_NURSERY"], "64MB"),
    ],
)
def test_pypy_workers_get_a_nursery_unless_the_operator_chose_one(
    operator, allowed, expected, monkeypatch
) -> None:
    if operator is None:
        monkeypatch.delenv("PYPY_GC_NURSERY", raising=False)
    else:
        monkeypatch.setenv("PYPY_GC_NURSERY", operator)
    cluster = {"enabled": True, "workers": 1}
    if allowed is not None:
        cluster["allowed_env"] = allowed
    manager = ClusterManager({"cluster": cluster}, reactor=Clock())
    env = manager.spawner.environment(WorkerLaunch(worker_id=1, master_pid=1))
    assert env["PYPY_GC_NURSERY"] == expected
