"""
Recycling (cluster.max_requests with its jitter, cluster.max_worker_rss) against fake
workers: surge-first, one at a time, and never at the cost of the old worker.
"""

from __future__ import annotations

import signal
from typing import Any

from bungate.master.fleet import ClusterManager
from bungate.ops.procfs import ProcessUsage
from bungate.testing import FakeProcessReactor, FakeWorker


def exit_on_term(worker: FakeWorker, signum: int) -> None:
    if signum == signal.SIGTERM:
        worker.exit(0)
    elif signum == signal.SIGKILL:
        worker.exit(None, signal.SIGKILL)


class Counts:
    """What the accept table and /proc say of each fake worker (the test sets it)."""

    def __init__(self, manager: ClusterManager) -> None:
        self.requests: dict[int, int] = {}
        self.rss: dict[int, int] = {}
        manager.spawner.accept.workers = self.table  # type: ignore[method-assign]
        manager.read_usage = self.usage

    def table(self) -> list[dict[str, int]]:
        return [
            {"id": 0, "pid": pid, "connections": 0, "requests": n}
            for pid, n in self.requests.items()
        ]

    def usage(self, pid: int) -> Any:
        return ProcessUsage(pid, self.rss.get(pid, 2**20), 0.0, 10)


def fleet(workers: int = 1, **cluster: Any) -> tuple[ClusterManager, FakeProcessReactor, Counts]:
    reactor = FakeProcessReactor()
    reactor.on_signal = exit_on_term
    settings = {
        "enabled": True,
        "workers": workers,
        "heartbeat_interval": 1,
        "heartbeat_timeout": 1000,
        **cluster,
    }
    manager = ClusterManager(
        {"server": {"host": "127.0.0.1", "port": 0}, "cluster": settings}, reactor=reactor
    )
    counts = Counts(manager)
    manager.start()
    for worker in reactor.live():
        worker.ready()
    return manager, reactor, counts


def serving(manager: ClusterManager) -> list[int]:
    return sorted(s.id for s in manager.slots.values() if s.serving)


def newest(reactor: FakeProcessReactor) -> FakeWorker:
    return reactor.workers[-1]


def test_a_worker_past_max_requests_is_replaced_surge_first():
    manager, reactor, counts = fleet(max_requests=100)
    (old,) = reactor.live()
    counts.requests[old.pid] = 99
    reactor.advance(1)
    assert len(reactor.workers) == 1, "below the limit: nothing happens"
    counts.requests[old.pid] = 100
    reactor.advance(1)
    assert len(reactor.workers) == 2 and old.signals == [], "the replacement first"
    assert serving(manager) == [1]
    newest(reactor).ready()
    assert old.signals == [signal.SIGTERM] and old.exited
    assert serving(manager) == [2]
    assert manager.desired == 1 and manager.worker_count() == 1


def test_jitter_spreads_the_limit_per_process():
    manager, reactor, counts = fleet(workers=1, max_requests=100, max_requests_jitter=50)
    (old,) = reactor.live()
    counts.requests[old.pid] = 0
    reactor.advance(1)
    limit = manager._request_limits[old.pid]
    assert 100 <= limit <= 150
    counts.requests[old.pid] = limit - 1
    reactor.advance(1)
    assert len(reactor.workers) == 1
    counts.requests[old.pid] = limit
    reactor.advance(1)
    assert len(reactor.workers) == 2


def test_a_worker_past_max_worker_rss_is_replaced():
    manager, reactor, counts = fleet(max_worker_rss=100)
    (old,) = reactor.live()
    counts.rss[old.pid] = 100 * 2**20
    reactor.advance(1)
    assert len(reactor.workers) == 1, "at the limit, not past it"
    counts.rss[old.pid] = 100 * 2**20 + 1
    reactor.advance(1)
    newest(reactor).ready()
    assert old.exited and serving(manager) == [2]


def test_one_worker_at_a_time():
    manager, reactor, counts = fleet(workers=3, max_requests=10)
    for worker in reactor.live():
        counts.requests[worker.pid] = 10
    reactor.advance(1)
    reactor.advance(1)
    assert len(reactor.workers) == 4, "a second recycle waits for the first"
    newest(reactor).ready()
    reactor.advance(1)
    assert len(reactor.workers) == 5
    newest(reactor).ready()
    assert serving(manager) == [3, 4, 5]


def test_a_replacement_that_fails_keeps_the_old_worker_and_backs_off():
    manager, reactor, counts = fleet(max_requests=10, restart_workers=False, max_restart_delay=5)
    (old,) = reactor.live()
    counts.requests[old.pid] = 10
    reactor.advance(1)
    newest(reactor).exit(1)  # the replacement dies before it is ready
    assert serving(manager) == [1] and not old.exited
    reactor.advance(1)
    reactor.advance(1)
    assert len(reactor.workers) == 2, "no retry before max_restart_delay"
    reactor.advance(4)
    assert len(reactor.workers) == 3


def test_recycling_is_off_by_default():
    _, reactor, counts = fleet()
    (old,) = reactor.live()
    counts.requests[old.pid] = 10**9
    counts.rss[old.pid] = 10**12
    reactor.advance(5)
    assert len(reactor.workers) == 1


def test_worker_info_has_connections_and_resources():
    manager, reactor, counts = fleet()
    (worker,) = reactor.live()
    counts.requests[worker.pid] = 7
    counts.rss[worker.pid] = 5 * 2**20
    (info,) = manager.worker_info()
    assert (info["requests"], info["connections"]) == (7, 0)
    assert (info["rss_bytes"], info["cpu_seconds"]) == (5 * 2**20, 0.0)
    assert manager.processes() == {"1": worker.pid}
