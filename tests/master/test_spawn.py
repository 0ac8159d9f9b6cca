"""Starting worker processes: what the master puts in a worker's environment and descriptors."""

from __future__ import annotations

import signal

import pytest
from twisted.internet.task import Clock

from bungate.limit_table import DEFAULT_SLOTS, LimitTable
from bungate.master.fleet import ClusterManager
from bungate.master.spawn import PYPY_GC_NURSERY
from bungate.testing import FakeProcessReactor, FakeWorker
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


def test_every_worker_of_the_masters_life_inherits_the_one_limit_table() -> None:
    """A respawn after kill -9 and every worker of a roll get the same table: no reset."""
    reactor = FakeProcessReactor()
    manager = ClusterManager(
        {
            "server": {"host": "127.0.0.1", "port": 0},
            "cluster": {"enabled": True, "workers": 2, "shutdown_timeout": 5},
            "metrics": {"enabled": True, "listen": "127.0.0.1:0"},  # an extra listener: fd 5
        },
        reactor=reactor,
    )
    assert manager.spawner.limits.table is None  # made at the first spawn, not before
    manager.start()
    for worker in reactor.workers:
        worker.ready()
    master_fd = manager.spawner.limits.fileno()
    assert master_fd is not None
    table = manager.spawner.limits.table
    assert table is not None and table.slots == DEFAULT_SLOTS

    def passed(worker: FakeWorker) -> int:
        launch = worker.launch
        assert launch.accept_table is not None and launch.accept_table[0] == 6
        assert launch.limit_table == 7  # after the metrics listener and the accept table
        assert worker.child_fds[7] == master_fd
        return master_fd

    assert [passed(w) for w in reactor.workers] == [master_fd, master_fd]
    by_id = {w.launch.worker_id: w for w in reactor.live()}
    by_id[1].exit(None, signal.SIGKILL)
    reactor.advance(0)  # the first respawn is immediate
    respawned = {w.launch.worker_id: w for w in reactor.live()}[1]
    assert respawned is not by_id[1] and passed(respawned) == master_fd
    respawned.ready()

    def exit_on_term(worker: FakeWorker, signum: int) -> None:
        if signum in (signal.SIGTERM, signal.SIGKILL):
            worker.exit(0)

    reactor.on_signal = exit_on_term
    readied = set(reactor.workers)
    old = set(reactor.live())
    rolled_ok: list[object] = []
    manager.rolling_restart().addBoth(rolled_ok.append)
    for _ in range(100):
        if rolled_ok:
            break
        for worker in [w for w in reactor.live() if w not in readied]:
            readied.add(worker)
            worker.ready()
        reactor.advance(0.1)
    assert rolled_ok == [True]
    rolled = reactor.live()
    assert len(rolled) == 2 and not old & set(rolled)
    assert all(passed(w) == master_fd for w in rolled)
    assert manager.spawner.limits.table is table  # the same table all along
    manager.stop()
    manager.spawner.limits.close()
    assert manager.spawner.limits.table is None


def test_workers_start_without_a_limit_table_the_master_cannot_make(monkeypatch) -> None:
    def no_room(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(LimitTable, "create", no_room)
    reactor = FakeProcessReactor()
    manager = ClusterManager(
        {"server": {"host": "127.0.0.1", "port": 0}, "cluster": {"enabled": True, "workers": 1}},
        reactor=reactor,
    )
    manager.start()
    [worker] = reactor.workers
    assert worker.launch.limit_table is None and "BUNGATE_LIMIT_TABLE" not in worker.env
    assert 6 not in worker.child_fds
    worker.ready()
    reactor.on_signal = lambda w, signum: w.exit(0)
    manager.stop()
