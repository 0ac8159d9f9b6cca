"""
The control API and the ``bungate`` command against real ``twist bungate`` processes,
the per-worker resources in ``/metrics``, and recycling (``cluster.max_requests``,
``cluster.max_worker_rss``) under live traffic.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import stat
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, task, utils

from bungate.testing import wait_until
from tests.integration.conftest import cluster_config
from tests.integration.test_cluster import Hammer
from tests.integration.test_signals import VERSION, WORKERS_CANNOT_BOOT, alive, modules
from tests.integration.test_systemd import launch

__all__ = ["modules"]  # a fixture, imported to be used here

TIMEOUT = 60.0


def bungate(*argv: str, env: Any = None) -> defer.Deferred[tuple[int, str, str]]:
    """Run ``python -m bungate ARGV``; fires with (exit status, stdout, stderr)."""
    d = utils.getProcessOutputAndValue(
        sys.executable, ["-m", "bungate", *argv], env=dict(env or os.environ)
    )

    def decoded(result: tuple[bytes, bytes, int]) -> tuple[int, str, str]:
        out, err, code = result
        return code, out.decode(), err.decode()

    return d.addCallback(decoded)


def with_control(config: dict[str, Any], path: Path) -> dict[str, Any]:
    config["cluster"]["control_socket"] = str(path)
    return config


@defer.inlineCallbacks
def poll_until(reactor: Any, check: Any, timeout: float = TIMEOUT) -> Any:
    """Call ``check()`` (a Deferred) every 0.2 s until it fires true, for ``timeout`` at most."""
    deadline = reactor.seconds() + timeout
    while True:
        result = yield check()
        if result:
            return result
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {check}")
        yield task.deferLater(reactor, 0.2, lambda: None)


@defer.inlineCallbacks
def metric_samples(url: str) -> Any:
    r = yield treq.get(url + "/metrics", persistent=False, timeout=10)
    text = (yield r.content()).decode()
    samples: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if "worker" in sample.labels:
                samples[(sample.name, sample.labels["worker"])] = sample.value
    return samples


@pytest_twisted.inlineCallbacks
def test_status_scale_roll_signal_and_stop_through_the_socket(
    reactor, upstream, gateways, tmp_path
):
    control = tmp_path / "control.sock"
    gw = yield gateways(with_control(cluster_config(upstream.url), control)).start()
    assert stat.S_IMODE(os.stat(control).st_mode) == 0o600
    yield gw.wait_for(rf"Control API listening on {re.escape(str(control))}")

    code, out, err = yield bungate("--socket", str(control), "status")
    assert (code, err) == (0, ""), err
    head, columns, *rows = out.splitlines()
    assert head.startswith(f"master pid {gw.pid} · up ") and "2/2 workers running" in head
    assert columns.split()[:5] == ["id", "pid", "status", "restarts", "uptime"]
    workers = gw.workers()
    assert [row.split()[:3] for row in rows] == [
        [str(wid), str(pid), "running"] for wid, pid in sorted(workers.items())
    ]
    assert all(row.split()[-2] == "MiB" for row in rows)  # RSS read from /proc

    code, out, _ = yield bungate("--socket", str(control), "scale", "3", "--wait")
    assert (code, out) == (0, "scaled from 2 to 3 worker(s)\n")
    assert len(gw.workers()) == 3

    old = set(gw.workers().values())
    code, out, _ = yield bungate("--socket", str(control), "roll", "--wait")
    assert (code, out) == (0, "rolling restart done\n")
    assert not (set(gw.workers().values()) & old) and len(gw.workers()) == 3

    # The config is found from --config too; a worker gets the signal it is sent.
    mark = gw.mark()
    (wid, _), *_ = sorted(gw.workers().items())
    code, out, _ = yield bungate("--config", gw.config_path or "", "signal", str(wid), "HUP")
    assert (code, out) == (0, f"sent SIGHUP to worker {wid}\n")
    yield gw.wait_for(rf"\[worker {wid}\].*Received SIGHUP", since=mark, timeout=TIMEOUT)
    code, _, err = yield bungate("--socket", str(control), "signal", "99", "HUP")
    assert code == 1 and "worker 99 has no live process" in err

    code, out, _ = yield bungate("--socket", str(control), "stop", "--wait")
    assert (code, out) == (0, "the fleet has stopped\n")
    assert (yield gw.wait_exit()) == 0
    assert not control.exists()
    code, _, err = yield bungate("--socket", str(control), "status")
    assert code == 3 and "cannot reach the master" in err


@pytest_twisted.inlineCallbacks
def test_roll_wait_exits_1_when_the_roll_aborts(reactor, upstream, gateways, modules, tmp_path):
    modules("app", VERSION.format(version=1))
    config = cluster_config(upstream.url, max_restarts=1)
    config["routes"] = [{"pattern": "/app", "handler": "app:hello"}]
    control = tmp_path / "control.sock"
    gw = yield gateways(with_control(config, control), env=modules.env).start()
    pids = gw.workers()
    modules("app", WORKERS_CANNOT_BOOT)  # a new worker cannot import it any more
    code, out, err = yield bungate("--socket", str(control), "roll", "--wait")
    assert code == 1 and out == ""
    assert err.startswith("bungate: roll: rolling restart aborted: replacement worker 3 did")
    assert gw.workers() == pids


@pytest_twisted.inlineCallbacks
def test_reload_wait_reports_a_refused_config(reactor, upstream, gateways, tmp_path):
    control = tmp_path / "control.sock"
    config = with_control(cluster_config(upstream.url), control)
    gw = yield gateways(config).start()
    code, out, _ = yield bungate("--socket", str(control), "reload", "--wait")
    assert (code, out) == (0, "configuration reloaded\n")
    broken = dict(config, server={"host": "127.0.0.1", "port": "not a port"})
    gw.write_config(broken)
    code, out, err = yield bungate("--socket", str(control), "reload", "--wait")
    assert code == 1 and out == ""
    assert err.startswith("bungate: reload: reload failed: ") and "server.port" in err
    code, out, _ = yield bungate("--socket", str(control), "reload")
    assert (code, out) == (0, "reload started\n")  # without --wait: started, no outcome
    yield gw.wait_for(r"Configuration reload refused", since=0)


@pytest_twisted.inlineCallbacks
def test_a_second_master_on_a_live_control_socket_is_refused(
    reactor, upstream, gateways, tmp_path
):
    control = tmp_path / "control.sock"
    first = yield gateways(with_control(cluster_config(upstream.url), control)).start()
    second = gateways(with_control(cluster_config(upstream.url), control))
    launch(second)
    assert (yield second.wait_exit(TIMEOUT)) == 1
    assert second.count(r"cluster\.control_socket: .* is held by a live socket") >= 1
    code, out, _ = yield bungate("--socket", str(control), "status")
    assert code == 0 and f"master pid {first.pid}" in out


@pytest_twisted.inlineCallbacks
def test_a_stale_control_socket_is_replaced(reactor, upstream, gateways, tmp_path):
    control = tmp_path / "control.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(control))
    dead.close()
    gw = yield gateways(with_control(cluster_config(upstream.url), control)).start()
    assert gw.count(r"Removed the stale control socket") == 1
    code, _, _ = yield bungate("--socket", str(control), "status")
    assert code == 0


# --- per-worker resources in /metrics ---------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_metrics_show_each_workers_memory_cpu_and_fds(reactor, upstream, gateways, tmp_path):
    control = tmp_path / "control.sock"
    config = with_control(cluster_config(upstream.url, workers=3), control)
    config["metrics"] = {"enabled": True}
    gw = yield gateways(config).start()
    names = ("process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds")

    def complete(samples: Any, labels: set[str]) -> bool:
        return all((name, label) in samples for name in names for label in labels)

    wanted = {"master", "1", "2", "3"}

    @defer.inlineCallbacks
    def all_there() -> Any:
        samples = yield metric_samples(gw.url)
        return samples if complete(samples, wanted) else None

    samples = yield poll_until(reactor, all_there)
    workers = gw.workers()
    for label, pid in [("master", gw.pid), *((str(w), p) for w, p in workers.items())]:
        with open(f"/proc/{pid}/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        assert 0.5 * rss < samples[("process_resident_memory_bytes", label)] < 2 * rss, label
        assert samples[("process_cpu_seconds_total", label)] > 0
        assert samples[("process_open_fds", label)] >= 3

    # A worker scaled away leaves the metrics at the next heartbeat tick.
    code, _, _ = yield bungate("--socket", str(control), "scale", "2", "--wait")
    assert code == 0
    gone = ({"1", "2", "3"} - {str(w) for w in gw.workers()}).pop()

    @defer.inlineCallbacks
    def went() -> Any:
        samples = yield metric_samples(gw.url)
        return samples if ("process_resident_memory_bytes", gone) not in samples else None

    samples = yield poll_until(reactor, went)
    assert complete(samples, wanted - {gone})


# --- recycling ----------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_max_requests_recycles_surge_first_without_losing_a_request(
    reactor, upstream, gateways
):
    config = cluster_config(upstream.url, workers=2, max_requests=150, max_requests_jitter=50)
    gw = yield gateways(config).start()
    old = set(gw.workers().values())
    hammer = Hammer(reactor, gw.url + "/api/recycled")
    mark = gw.mark()
    for wid in (1, 2):
        yield gw.wait_for(
            rf"Recycling worker {wid} \(pid \d+\): it received \d+ requests "
            r"\(cluster\.max_requests 150( \+ jitter \d+)?\); starting its replacement",
            since=mark,
            timeout=TIMEOUT,
        )
    for wid in (1, 2):
        yield gw.wait_for(
            rf"Recycling: worker \d+ is ready, stopping worker {wid}$", since=mark, timeout=TIMEOUT
        )
        yield gw.wait_for(
            rf"Worker {wid} exited \(pid \d+\): stopped", since=mark, timeout=TIMEOUT
        )
    outcomes = yield hammer.stop()
    assert set(outcomes) == {200}, outcomes
    assert not (set(gw.workers().values()) & old)
    assert not any(alive(pid) for pid in old)
    # A replacement may have reached its own limit meanwhile: without traffic, that
    # recycle ends and no other begins.
    yield wait_until(reactor, lambda: len(gw.workers()) == 2, TIMEOUT, what="2 workers")


@pytest_twisted.inlineCallbacks
def test_max_worker_rss_recycles_a_worker_over_it(reactor, upstream, gateways):
    gw = yield gateways(cluster_config(upstream.url, workers=1, max_worker_rss=1)).start()
    old = int((yield gw.wait_for(r"Worker 1 ready \(pid (\d+)\)")).group(1))
    line = yield gw.wait_for(
        r"Recycling worker 1 \(pid (\d+)\): its resident memory is ([\d.]+) MiB "
        r"\(cluster\.max_worker_rss 1 MiB\)",
        timeout=TIMEOUT,
    )
    assert int(line.group(1)) == old and float(line.group(2)) > 1
    yield gw.wait_for(r"Recycling: worker 2 is ready, stopping worker 1", timeout=TIMEOUT)
    r = yield treq.get(gw.url + "/health", persistent=False, timeout=10)
    assert r.code == 200


@pytest.mark.parametrize("key", ["user", "group"])
@pytest_twisted.inlineCallbacks
def test_a_reload_cannot_change_the_user(reactor, upstream, gateways, key, tmp_path):
    config = cluster_config(upstream.url)
    gw = yield gateways(config).start()
    changed = dict(config, server={**config["server"], key: "root"})
    gw.write_config(changed)
    mark = gw.mark()
    gw.signal(signal.SIGHUP)
    yield gw.wait_for(
        rf"Configuration reload refused.*server\.{key}: a running master cannot change",
        since=mark,
    )
