"""The worker-slot state machine, under a fake clock and a fake spawner."""

from __future__ import annotations

import signal

import pytest
from twisted.internet.task import Clock

from bungate.config import ClusterConfig
from bungate.master.exits import signal_number
from bungate.master.slot import WorkerSlot


class FakeTransport:
    def __init__(self, pid):
        self.pid = pid
        self.signals = []

    def signalProcess(self, sig):
        self.signals.append(sig)


class Harness:
    def __init__(self, **cluster):
        cluster.setdefault("restart_delay", 1.0)
        self.config = ClusterConfig(enabled=True, workers=1, **cluster)
        self.clock = Clock()
        self.events = []
        self.spawned = []
        self.slot = WorkerSlot(1, self.config, self.clock, self.spawn, self.emit)

    def spawn(self, slot):
        t = FakeTransport(1000 + len(self.spawned))
        self.spawned.append(t)
        return t

    def emit(self, event, **fields):
        self.events.append((event, fields))

    def names(self):
        return [e for e, _ in self.events if e != "worker-state"]

    def exits(self):
        return [f for e, f in self.events if e == "worker-exit"]


def test_start_ready_and_clean_stop():
    h = Harness()
    h.slot.start()
    assert h.slot.status == "starting"
    ready = h.slot.when_ready()
    h.slot.process_ready()
    assert h.slot.status == "running" and ready.result is True
    ended = h.slot.when_ended()
    h.slot.stop()
    assert h.slot.status == "stopping"
    assert h.spawned[0].signals == [signal.SIGTERM]
    h.slot.process_exited(0, None)
    assert h.slot.status == "stopped" and ended.result == "stopped"
    assert h.exits()[-1]["kind"] == "stopped"
    assert h.names() == ["worker-spawn", "worker-ready", "worker-stopping", "worker-exit"]


def test_crash_respawns_immediately_then_with_backoff_keeping_the_id():
    h = Harness(max_restarts=10, respawn_threshold=10)
    h.slot.start()
    h.slot.process_ready()
    h.slot.process_exited(None, signal.SIGKILL)
    assert h.slot.status == "respawning"
    assert h.exits()[-1]["kind"] == "crash"
    h.clock.advance(0)
    assert h.slot.status == "starting" and len(h.spawned) == 2
    assert h.slot.id == 1 and h.slot.restarts == 1
    h.slot.process_ready()
    h.slot.process_exited(1, None)
    assert h.slot.status == "respawning"
    h.clock.advance(0.99)
    assert len(h.spawned) == 2, "the second respawn must wait restart_delay"
    h.clock.advance(0.5)
    assert len(h.spawned) == 3


def test_boot_failure_is_told_apart_and_a_crash_loop_ends_in_failed():
    h = Harness(max_restarts=100, respawn_threshold=3, respawn_threshold_time=60)
    h.slot.start()
    for _ in range(10):
        if h.slot.status == "failed":
            break
        h.slot.process_exited(1, None)  # dies before READY every time
        h.clock.advance(10)
    assert h.slot.status == "failed"
    assert {e["kind"] for e in h.exits()} == {"boot-failure"}
    assert len(h.spawned) == 4  # the first start + 3 respawns, then no storm
    assert "respawn_threshold 3" in h.slot.failure_reason
    assert h.slot.when_ready().result is False


def test_clean_unexpected_exit_is_labelled_clean():
    h = Harness()
    h.slot.start()
    h.slot.process_ready()
    h.slot.process_exited(0, None)
    assert h.exits()[-1]["kind"] == "clean"
    assert h.slot.status == "respawning"


def test_restart_workers_false_fails_instead_of_respawning():
    h = Harness(restart_workers=False)
    h.slot.start()
    h.slot.process_ready()
    h.slot.process_exited(3, None)
    assert h.slot.status == "failed"
    assert h.slot.failure_reason == "restart_workers is false"


def test_ready_timeout_kills_and_counts_as_boot_failure():
    h = Harness(ready_timeout=5)
    h.slot.start()
    h.clock.advance(5.1)
    assert h.spawned[0].signals == [signal.SIGKILL]
    h.slot.process_exited(None, signal.SIGKILL)
    assert h.exits()[-1]["kind"] == "boot-failure"


def test_hung_worker_kill_is_reported_as_hung():
    h = Harness()
    h.slot.start()
    h.slot.process_ready()
    h.slot.kill("hung")
    h.slot.process_exited(None, signal.SIGKILL)
    assert h.exits()[-1]["kind"] == "hung"


def test_stop_timeout_escalates_to_sigkill():
    h = Harness(shutdown_timeout=3)
    h.slot.start()
    h.slot.process_ready()
    h.slot.stop()
    h.clock.advance(4.9)
    assert h.spawned[0].signals == [signal.SIGTERM]
    h.clock.advance(0.2)
    assert h.spawned[0].signals == [signal.SIGTERM, signal.SIGKILL]


def test_stop_while_respawning_cancels_the_respawn():
    h = Harness()
    h.slot.start()
    h.slot.process_ready()
    h.slot.process_exited(1, None)
    h.slot.stop()
    h.clock.advance(10)
    assert h.slot.status == "stopped" and len(h.spawned) == 1


def test_info_reports_the_spec_fields():
    h = Harness()
    h.slot.start()
    info = h.slot.info()
    assert set(info) >= {"id", "pid", "restarts", "status", "started_at"}
    assert info["pid"] == 1000 and info["status"] == "starting"


@pytest.mark.parametrize("given", [15, "TERM", "SIGTERM", "sigterm", signal.SIGTERM])
def test_signal_names(given):
    assert signal_number(given) == signal.SIGTERM


def test_unknown_signal_name():
    with pytest.raises(ValueError, match="unknown signal"):
        signal_number("SIGNOPE")
