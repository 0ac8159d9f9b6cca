"""
The fleet (ClusterManager) against the fake process reactor: start, roll, scale, stop,
respawn and supervision, with a fake clock and no real process.
"""

from __future__ import annotations

import signal
from typing import Any

import pytest

from bungate.master.fleet import ClusterManager
from bungate.testing import FakeProcessReactor, FakeWorker


def fleet(workers: int = 2, **cluster: Any) -> tuple[ClusterManager, FakeProcessReactor]:
    reactor = FakeProcessReactor()
    settings = {"enabled": True, "workers": workers, "shutdown_timeout": 5, **cluster}
    manager = ClusterManager(
        {"server": {"host": "127.0.0.1", "port": 0}, "cluster": settings}, reactor=reactor
    )
    return manager, reactor


def fired(d: Any) -> list[Any]:
    """A list that gets ``d``'s result once it has one (``called`` is also true while
    ``d`` waits on a chained Deferred)."""
    box: list[Any] = []

    def keep(result: Any) -> Any:
        box.append(result)
        return result

    d.addBoth(keep)
    return box


def by_id(reactor: FakeProcessReactor) -> dict[int, FakeWorker]:
    """The live fake workers by their CLUSTER_WORKER_ID."""
    return {w.launch.worker_id: w for w in reactor.live()}


def serving(manager: ClusterManager) -> list[int]:
    return sorted(s.id for s in manager.slots.values() if s.serving)


def exit_on_term(worker: FakeWorker, signum: int) -> None:
    """Workers that drain at once: SIGTERM makes them exit 0, SIGKILL kills them."""
    if signum == signal.SIGTERM:
        worker.exit(0)
    elif signum == signal.SIGKILL:
        worker.exit(None, signal.SIGKILL)


@pytest.fixture
def started() -> Any:
    manager, reactor = fleet()
    done = manager.start()
    for worker in reactor.workers:
        worker.ready()
    assert done.called and done.result is None
    yield manager, reactor
    reactor.on_signal = exit_on_term
    manager.stop()


def test_start_spawns_each_worker_with_its_sockets_and_waits_until_all_are_ready() -> None:
    manager, reactor = fleet(3)
    done = fired(manager.start())
    assert [w.launch.worker_id for w in reactor.workers] == [1, 2, 3]
    first = reactor.workers[0]
    assert first.args[1:] == ["-m", "bungate.worker", "bungate worker 1"]
    assert {3, 4} <= set(first.child_fds)  # the listener, the control channel
    assert first.launch.config_json is not None  # the built-in worker is sent its config
    reactor.workers[0].ready()
    reactor.workers[1].ready()
    assert done == [], "start fires once every initial worker is ready"
    reactor.workers[2].ready()
    assert done == [None] and serving(manager) == [1, 2, 3]
    assert [i["status"] for i in manager.worker_info()] == ["running"] * 3
    # Every running worker hears how many are running (for /health).
    assert first.messages()[-1] == {"t": "fleet", "running": 3, "desired": 3, "failed": 0}
    reactor.on_signal = exit_on_term
    stopped = manager.stop()
    assert stopped.called and manager.listeners.sockets == {}


def test_a_roll_starts_each_replacement_before_it_stops_an_old_worker(started: Any) -> None:
    manager, reactor = started
    old = by_id(reactor)
    roll = manager.rolling_restart()
    fresh = by_id(reactor)[3]  # the surge: a third worker while both old ones serve
    assert serving(manager) == [1, 2] and old[1].signals == []
    fresh.ready()
    assert old[1].signals == [signal.SIGTERM] and old[2].signals == []
    assert serving(manager) == [2, 3]  # never fewer than two serving
    old[1].exit(0)
    fourth = by_id(reactor)[4]
    assert old[2].signals == []
    fourth.ready()
    assert old[2].signals == [signal.SIGTERM]
    old[2].exit(0)
    assert roll.called and roll.result is True
    assert serving(manager) == [3, 4] and sorted(manager.slots) == [3, 4]


def test_a_replacement_that_cannot_boot_aborts_the_roll_and_the_old_workers_serve_on() -> None:
    manager, reactor = fleet(2, max_restarts=0)
    manager.start()
    for worker in reactor.workers:
        worker.ready()
    events: list[dict[str, Any]] = []
    manager.on("roll-aborted", lambda **fields: events.append(fields))
    roll = manager.rolling_restart()
    by_id(reactor)[3].exit(1)  # dies before it reports READY
    assert roll.called and roll.result is False
    assert "replacement worker 3 did not become ready" in events[0]["reason"]
    assert serving(manager) == [1, 2]
    assert all(w.signals == [] for w in reactor.workers[:2])


def test_scale_up_and_down(started: Any) -> None:
    manager, reactor = started
    grown: list[list[int]] = []
    manager.scale_to(3).addCallback(grown.append)
    assert grown == [], "scale_to fires once the new worker is ready"
    by_id(reactor)[3].ready()
    assert grown == [[3]] and manager.worker_count() == 3
    reactor.on_signal = exit_on_term
    shrunk: list[list[int]] = []
    manager.scale_down(2).addCallback(shrunk.append)  # the newest first
    assert [sorted(ids) for ids in shrunk] == [[2, 3]]
    assert serving(manager) == [1] and manager.desired == 1


def test_a_crashed_worker_is_respawned_in_its_slot(started: Any) -> None:
    manager, reactor = started
    exits: list[tuple[int, Any, Any]] = []
    manager.on("worker-exit", lambda wid, code, sig: exits.append((wid, code, sig)))
    by_id(reactor)[1].exit(None, signal.SIGKILL)
    assert exits == [(1, None, signal.SIGKILL)]
    reactor.advance(0)  # the first respawn is immediate
    respawned = by_id(reactor)[1]
    assert respawned.pid != reactor.workers[0].pid
    respawned.ready()
    assert serving(manager) == [1, 2]
    assert manager.worker_info()[0]["restarts"] == 1


def test_a_worker_that_stops_sending_heartbeats_is_killed(started: Any) -> None:
    manager, reactor = started
    hung: list[dict[str, Any]] = []
    manager.on("worker-hung", lambda **fields: hung.append(fields))
    reactor.on_signal = exit_on_term
    workers = by_id(reactor)
    limit = manager.config.cluster.heartbeat_timeout
    interval = manager.config.cluster.heartbeat_interval
    for _ in range(int(limit / interval) + 2):
        reactor.advance(interval)
        workers[2].heartbeat()  # only worker 2 stays alive
    assert [h["worker_id"] for h in hung] == [1]
    assert workers[1].signals == [signal.SIGKILL] and workers[2].signals == []
    assert manager.worker_info()[0]["last_exit"]["kind"] == "hung"


def test_stop_drains_every_worker_and_kills_what_does_not_exit_in_time(started: Any) -> None:
    manager, reactor = started
    workers = by_id(reactor)
    stopped = manager.stop()
    assert workers[1].signals == [signal.SIGTERM] and workers[2].signals == [signal.SIGTERM]
    workers[1].exit(0)
    assert not stopped.called
    reactor.advance(manager.config.cluster.shutdown_timeout + 2.1)
    assert workers[2].signals == [signal.SIGTERM, signal.SIGKILL]
    workers[2].exit(None, signal.SIGKILL)
    assert stopped.called and manager.listeners.sockets == {}


def test_an_unknown_event_name_is_refused() -> None:
    manager, _ = fleet()
    with pytest.raises(ValueError, match="unknown event 'worker-exited'"):
        manager.on("worker-exited", lambda *args: None)
