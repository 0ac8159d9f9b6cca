"""
The plumbing of the shared rate-limit table, with real processes: the master makes one
table for its life, every worker maps it, and a ``kill -9`` or a roll neither resets nor
doubles a budget. (The requests here decide on the table from a route handler of a
worker script; the dispatcher's ``rate_limit`` wiring is tested on top of this.)
"""

from __future__ import annotations

import json
import os
import signal
import textwrap
from pathlib import Path
from typing import Any, Callable

import pytest_twisted
import treq
from twisted.internet import defer
from twisted.logger import globalLogPublisher

from bungate import ClusterManager
from bungate.config import parse_config
from bungate.core.ratelimit import Rate
from bungate.limit_table import LimitTable
from bungate.single import SingleService
from bungate.testing import wait_until
from bungate.wire import WorkerLaunch
from bungate.worker.service import WorkerService

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: A worker script whose /decide route decides one request of one client on the table
#: the worker was given, and says what it saw.
SCRIPT = """
import os
import time

from bungate import Gateway, run
from bungate.core.ratelimit import Rate

RATE = Rate(50, 3600)


def decide(request):
    table = gateway._service.app.limit_table
    fd = os.environ.get("BUNGATE_LIMIT_TABLE")
    doc = {"pid": os.getpid(), "fd": fd, "table": table is not None}
    if table is not None:
        decision = table.decide("0:/decide", b"203.0.113.7", RATE, time.time())
        doc.update(allowed=decision.allowed, remaining=decision.remaining)
        doc["inode"] = os.fstat(int(fd)).st_ino
    return doc


gateway = Gateway(
    server={"host": "127.0.0.1", "port": 0},
    cluster={"enabled": True, "workers": 2},
    logger={"request_logging": False},
)
gateway.add_route("/decide", handler=decide)

if __name__ == "__main__":
    run(gateway)
"""


def manager_for(reactor: Any, tmp_path: Path, workers: int = 2) -> ClusterManager:
    script = tmp_path / "limits_worker.py"
    script.write_text(textwrap.dedent(SCRIPT))
    return ClusterManager(
        {
            "server": {"host": "127.0.0.1", "port": 0},
            "cluster": {"enabled": True, "workers": workers, "restart_delay": 0.2},
        },
        None,
        str(script),
        reactor=reactor,
        extra_env={"PYTHONPATH": ROOT},
    )


@defer.inlineCallbacks
def decide(url: str) -> Any:
    response = yield treq.get(url, persistent=False)  # a new connection: any worker
    return json.loads((yield response.content()))


def inode_in(pid: int, fd: int) -> int:
    """The inode behind descriptor ``fd`` of process ``pid`` (Linux /proc)."""
    return os.stat(f"/proc/{pid}/fd/{fd}").st_ino


def pids(manager: ClusterManager) -> dict[int, int]:
    return {w["id"]: w["pid"] for w in manager.worker_info() if w["status"] == "running"}


def respawned(manager: ClusterManager, worker_id: int, pid: int) -> Callable[[], bool]:
    """Whether worker ``worker_id`` runs again, in a process other than ``pid``."""
    return lambda: pids(manager).get(worker_id, pid) != pid


@pytest_twisted.inlineCallbacks
def test_every_worker_decides_on_the_masters_table_across_kill_9_and_a_roll(
    reactor: Any, tmp_path: Path
) -> Any:
    manager = manager_for(reactor, tmp_path)
    try:
        yield manager.start()
        assert manager.address is not None
        url = f"http://127.0.0.1:{manager.address[1]}/decide"
        master_fd = manager.spawner.limits.fileno()
        assert master_fd is not None
        table = os.fstat(master_fd).st_ino

        def every_worker_maps_the_table() -> None:
            running = pids(manager)
            assert len(running) == 2
            for pid in running.values():
                assert inode_in(pid, 6) == table  # after the accept table (fd 5)

        every_worker_maps_the_table()
        # 200 requests of one client, 10 at a time, over both workers: 50 pass, and
        # their remaining counts form one sequence, whichever worker decided each
        docs = []
        for _ in range(20):
            docs += yield defer.gatherResults([decide(url) for _ in range(10)])
        assert all(d["table"] and d["fd"] == "6" and d["inode"] == table for d in docs)
        allowed = [d for d in docs if d["allowed"]]
        assert len(allowed) == 50
        assert sorted(d["remaining"] for d in allowed) == list(range(50))

        # kill -9 both workers: their replacements find the budget spent
        for worker_id, pid in sorted(pids(manager).items()):
            os.kill(pid, signal.SIGKILL)
            yield wait_until(reactor, respawned(manager, worker_id, pid), 15)
        every_worker_maps_the_table()
        after_kill = yield defer.gatherResults([decide(url) for _ in range(10)])
        assert not any(d["allowed"] for d in after_kill)

        # a roll replaces every worker: the same table still
        before = set(pids(manager).values())
        rolled = yield manager.rolling_restart()
        assert rolled is True
        assert not before & set(pids(manager).values())
        every_worker_maps_the_table()
        after_roll = yield defer.gatherResults([decide(url) for _ in range(10)])
        assert not any(d["allowed"] for d in after_roll)
        assert os.fstat(master_fd).st_ino == table  # one table for the master's life
    finally:
        yield manager.stop()
        manager.spawner.limits.close()


def test_a_worker_maps_the_table_it_is_given_and_hands_it_to_its_app(reactor: Any) -> None:
    table, backing = LimitTable.create(slots=64, stripes=1)
    try:
        config = parse_config({"routes": [{"pattern": "/x", "target": "http://127.0.0.1:9"}]})
        launch = WorkerLaunch(
            worker_id=1, master_pid=os.getpid(), limit_table=os.dup(backing.fileno())
        )
        worker = WorkerService(config, reactor, launch)
        assert worker.app.limit_table is worker.limit_table
        mapped = worker.limit_table
        assert mapped is not None
        rate = Rate(2, 3600)
        assert table.decide("r", b"k", rate, 1_700_000_000.0).allowed  # the master's view
        assert mapped.decide("r", b"k", rate, 1_700_000_000.0).remaining == 0  # shared
        mapped.close()
    finally:
        table.close()
        backing.close()


def test_a_worker_whose_table_cannot_be_mapped_serves_without_it(
    reactor: Any, tmp_path: Path
) -> None:
    errors: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_level") is not None and event["log_level"].name == "error":
            errors.append(event)

    observer: Any = observe
    globalLogPublisher.addObserver(observer)
    try:
        not_a_table = os.open(str(tmp_path / "empty"), os.O_RDWR | os.O_CREAT)
        config = parse_config({"routes": [{"pattern": "/x", "target": "http://127.0.0.1:9"}]})
        launch = WorkerLaunch(worker_id=1, master_pid=os.getpid(), limit_table=not_a_table)
        worker = WorkerService(config, reactor, launch)
        assert worker.limit_table is None and worker.app.limit_table is None
        with_none = WorkerService(config, reactor, WorkerLaunch(worker_id=2, master_pid=1))
        assert with_none.limit_table is None
    finally:
        globalLogPublisher.removeObserver(observer)
    assert any("rate-limit table" in e["log_format"] for e in errors)
    try:
        os.fstat(not_a_table)
        raise AssertionError("the descriptor should have been closed")
    except OSError:
        pass


@pytest_twisted.inlineCallbacks
def test_a_single_process_keeps_its_own_table_for_its_life(reactor: Any) -> Any:
    config = parse_config(
        {
            "server": {"host": "127.0.0.1", "port": 0},
            "routes": [{"pattern": "/x", "target": "http://127.0.0.1:9"}],
        }
    )
    single = SingleService(config, reactor)
    table = single.limit_table
    assert table is not None and single.app.limit_table is table
    single.start()
    yield single.close()
    assert single.limit_table is None
