"""The cluster master with real processes, real signals and real sockets."""

from __future__ import annotations

import json
import os
import signal
import socket
from collections import Counter

import pytest_twisted
import treq
from twisted.internet import defer, threads
from twisted.web.client import HTTPConnectionPool

from bungate import ClusterManager
from bungate.testing import find_workers, wait_until
from tests.integration.conftest import cluster_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


@defer.inlineCallbacks
def get_json(url):
    r = yield treq.get(url, persistent=False)
    return json.loads((yield r.content()))


class Hammer:
    """Concurrent keep-alive GET loops; counts every outcome."""

    def __init__(self, reactor, url, concurrency=8):
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = concurrency
        self.url = url
        self.outcomes = Counter()
        self.running = True
        self.loops = [self.loop() for _ in range(concurrency)]

    @defer.inlineCallbacks
    def loop(self):
        while self.running:
            try:
                r = yield treq.get(self.url, pool=self.pool, timeout=10)
                yield r.content()
                self.outcomes[r.code] += 1
            except Exception as e:  # every failure is counted, none hidden
                self.outcomes[type(e).__name__] += 1

    @defer.inlineCallbacks
    def stop(self):
        self.running = False
        yield defer.gatherResults(self.loops)
        yield self.pool.closeCachedConnections()
        return self.outcomes


@pytest_twisted.inlineCallbacks
def test_kill_9_worker_is_replaced_with_same_id_and_restart_counted(reactor, upstream, gateways):
    gw = yield gateways(cluster_config(upstream.url)).start()
    before = gw.workers()
    assert sorted(before) == [1, 2]
    mark = gw.mark()
    os.kill(before[1], signal.SIGKILL)
    yield gw.wait_for(r"Worker 1 exited \(pid \d+\): crash, signal SIGKILL", since=mark)
    yield gw.wait_for(r"Worker 1 spawned \(pid \d+, restarts 1\)", since=mark)
    yield gw.wait_for(r"Worker 1 ready", since=mark)
    after = gw.workers()
    assert after[1] != before[1] and after[2] == before[2]
    doc = yield get_json(gw.url + "/health")
    assert doc["status"] == "ok"


@pytest_twisted.inlineCallbacks
def test_crash_loop_ends_in_failed_without_a_respawn_storm(reactor, upstream, gateways):
    config = cluster_config(
        upstream.url, respawn_threshold=3, respawn_threshold_time=60, restart_delay=0.05
    )
    config["routes"].append({"pattern": "/hello", "handler": "tests.integration.crashy:hello"})
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    gw = gateways(config, env=env)
    yield gw.start()
    yield gw.wait_for(r"Worker 2 failed, not respawning: restarted 3 times within 60s", timeout=30)
    assert gw.count(r"Worker 2 spawned") == 4  # first start + 3 respawns, then it stops
    assert gw.count(r"Worker 2 exited .*boot-failure, exit code 3") == 4
    doc = yield get_json(gw.url + "/hello")
    assert doc == {"hello": "1"}


@pytest_twisted.inlineCallbacks
def test_two_rolling_restarts_under_keepalive_load_lose_nothing(reactor, upstream, gateways):
    gw = yield gateways(cluster_config(upstream.url)).start()
    old = set(gw.workers().values())
    hammer = Hammer(reactor, gw.url + "/api/x")
    yield wait_until(reactor, lambda: sum(hammer.outcomes.values()) > 50, 10)
    for _ in range(2):
        mark = gw.mark()
        gw.signal(signal.SIGUSR2)
        yield gw.wait_for(r"Rolling restart done: 2 worker\(s\) replaced", since=mark, timeout=30)
    served_before = sum(hammer.outcomes.values())
    yield wait_until(reactor, lambda: sum(hammer.outcomes.values()) > served_before + 50, 10)
    outcomes = yield hammer.stop()
    print("outcomes through two rolls:", dict(outcomes))
    assert set(outcomes) == {200}, outcomes
    new = set(gw.workers().values())
    assert len(new) == 2 and not (new & old)
    assert not any(alive(pid) for pid in old)


@pytest_twisted.inlineCallbacks
def test_ttin_and_ttou_scale_by_one(reactor, upstream, gateways):
    gw = yield gateways(cluster_config(upstream.url)).start()
    mark = gw.mark()
    gw.signal(signal.SIGTTIN)
    yield gw.wait_for(r"Fleet scaled from 2 to 3", since=mark)
    yield gw.wait_for(r"Worker 3 ready", since=mark)
    assert sorted(gw.workers()) == [1, 2, 3]
    mark = gw.mark()
    gw.signal(signal.SIGTTOU)
    yield gw.wait_for(r"Fleet scaled from 3 to 2", since=mark)
    yield gw.wait_for(r"Worker 3 exited \(pid \d+\): stopped, exit code 0", since=mark)
    assert sorted(gw.workers()) == [1, 2]


@pytest_twisted.inlineCallbacks
def test_sigterm_lets_the_in_flight_request_finish_then_everything_exits(
    reactor, upstream, gateways
):
    gw = yield gateways(cluster_config(upstream.url)).start()
    workers = list(gw.workers().values())
    pending = treq.get(gw.url + "/slow?delay=1.5", persistent=False)
    yield wait_until(reactor, lambda: any(r.path == b"/slow" for r in upstream.requests), 10)
    gw.signal(signal.SIGTERM)
    r = yield pending
    assert r.code == 200 and (yield r.content()) == b"slow done"
    code = yield gw.wait_exit()
    # A clean graceful stop exits 0 (not killed by the signal: 143 in a shell).
    assert (code, gw.exit_signal) == (0, None)
    assert not any(alive(pid) for pid in workers)
    # the port is released
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", gw.port))
    s.close()


@pytest_twisted.inlineCallbacks
def test_ctrl_c_drains_once_without_errors(reactor, upstream, gateways):
    """Ctrl-C signals the whole process group: master and workers get SIGINT together."""
    gw = yield gateways(cluster_config(upstream.url)).start()
    workers = list(gw.workers().values())
    pending = treq.get(gw.url + "/slow?delay=1.5", persistent=False)
    yield wait_until(reactor, lambda: any(r.path == b"/slow" for r in upstream.requests), 10)
    for pid in [gw.pid, *workers]:
        os.kill(pid, signal.SIGINT)
    r = yield pending
    assert r.code == 200 and (yield r.content()) == b"slow done"
    yield gw.wait_exit()
    assert not any(alive(pid) for pid in workers)
    output = "\n".join(gw.lines)
    for bad in ("critical", "Traceback", "ReactorNotRunning", "Unhandled"):
        assert bad not in output, output


@pytest_twisted.inlineCallbacks
def test_workers_exit_when_the_master_is_killed(reactor, upstream, gateways):
    gw = yield gateways(cluster_config(upstream.url, shutdown_timeout=5)).start()
    workers = list(gw.workers().values())
    os.kill(gw.pid, signal.SIGKILL)
    yield gw.wait_exit()
    yield wait_until(
        reactor, lambda: not any(alive(p) for p in workers), 6, what="orphaned workers to exit"
    )

    def port_closed():
        try:
            socket.create_connection(("127.0.0.1", gw.port), timeout=1).close()
            return False
        except OSError:
            return True

    assert (yield threads.deferToThread(port_closed))


@pytest_twisted.inlineCallbacks
def test_sighup_with_a_broken_config_keeps_serving(reactor, upstream, gateways):
    config = cluster_config(upstream.url)
    gw = yield gateways(config).start()
    pids = gw.workers()
    gw.write_config({**config, "routes": [{"pattern": "/x", "target": "ftp://nope"}]})
    mark = gw.mark()
    gw.signal(signal.SIGHUP)
    yield gw.wait_for(r"Configuration reload refused.*routes\[0\]\.target", since=mark)
    assert gw.workers() == pids
    r = yield treq.get(gw.url + "/api/still", persistent=False)
    assert r.code == 200
    yield r.content()


@pytest_twisted.inlineCallbacks
def test_sighup_with_a_good_config_rolls_onto_it(reactor, upstream, gateways):
    config = cluster_config(upstream.url)
    gw = yield gateways(config).start()
    new = {**config, "routes": [{"pattern": "/only/*", "target": upstream.url}]}
    gw.write_config(new)
    mark = gw.mark()
    gw.signal(signal.SIGHUP)
    yield gw.wait_for(r"Configuration reloaded", since=mark)
    yield gw.wait_for(r"Rolling restart done", since=mark, timeout=30)
    r = yield treq.get(gw.url + "/api/x", persistent=False)
    assert r.code == 404
    yield r.content()
    r = yield treq.get(gw.url + "/only/x", persistent=False)
    assert r.code == 200
    yield r.content()


@pytest_twisted.inlineCallbacks
def test_a_hung_worker_is_killed_and_respawned(reactor, upstream, gateways):
    gw = yield gateways(
        cluster_config(upstream.url, heartbeat_interval=0.2, heartbeat_timeout=1.5)
    ).start()
    victim = gw.workers()[2]
    mark = gw.mark()
    os.kill(victim, signal.SIGSTOP)
    yield gw.wait_for(r"Worker 2 \(pid \d+\) sent no heartbeat for", since=mark, timeout=10)
    yield gw.wait_for(r"Worker 2 exited .*hung, signal SIGKILL", since=mark)
    yield gw.wait_for(r"Worker 2 ready", since=mark)
    assert gw.workers()[2] != victim


def script_manager(reactor) -> ClusterManager:
    """An in-process ClusterManager of two workers running tests/integration/worker_script.py."""
    return ClusterManager(
        {"server": {"host": "127.0.0.1", "port": 0}, "cluster": {"enabled": True, "workers": 2}},
        None,
        os.path.join(ROOT, "tests", "integration", "worker_script.py"),
        reactor=reactor,
        extra_env={"PYTHONPATH": ROOT},
    )


@pytest_twisted.inlineCallbacks
def test_cluster_manager_api_with_a_worker_script(reactor):
    """The spec's ClusterManager(config, logger, worker_script) from Python, in-process."""
    events = []
    manager = script_manager(reactor)
    manager.on("worker-spawn", lambda wid: events.append(("spawn", wid)))
    manager.on("worker-ready", lambda wid: events.append(("ready", wid)))
    manager.on("worker-exit", lambda wid, code, sig: events.append(("exit", wid, code, sig)))
    try:
        yield manager.start()
        url = f"http://127.0.0.1:{manager.address[1]}"
        assert manager.worker_count() == 2
        info = manager.worker_info()
        assert [w["id"] for w in info] == [1, 2]
        assert all(w["status"] == "running" and w["pid"] and w["restarts"] == 0 for w in info)
        doc = yield get_json(url + "/whoami")
        assert doc["script"] is True and doc["worker_id"] in ("1", "2")
        ids = yield manager.scale_to(3)
        assert ids == [3] and manager.worker_count() == 3
        assert set(find_workers(os.getpid())) >= {1, 2, 3}
        gone = yield manager.scale_down(2)
        assert sorted(gone) == [2, 3] and manager.worker_count() == 1
        assert manager.send_signal_to_worker(1, "SIGKILL")
        yield wait_until(reactor, lambda: ("exit", 1, None, signal.SIGKILL) in events, 10)
        yield wait_until(reactor, lambda: manager.worker_info()[0]["status"] == "running", 10)
        assert manager.worker_info()[0]["restarts"] == 1
        assert manager.broadcast_signal("SIGWINCH") == 1  # ignored by Python: harmless
    finally:
        yield manager.stop()
    assert ("spawn", 1) in events and ("ready", 3) in events
    assert manager.worker_count() == 0


@pytest_twisted.inlineCallbacks
def test_workers_publish_their_connection_counts_for_fair_accepting(reactor):
    """The table behind fair accepting (bungate/cluster/accept.py), in real workers."""
    manager = script_manager(reactor)
    clients = []
    try:
        yield manager.start()
        yield wait_until(reactor, lambda: manager.accept_counts() == {1: 0, 2: 0}, 10)
        for _ in range(6):
            clients.append(socket.create_connection(manager.address[:2]))
        yield wait_until(reactor, lambda: sum(manager.accept_counts().values()) == 6, 10)
        for c in clients:
            c.close()
        yield wait_until(reactor, lambda: manager.accept_counts() == {1: 0, 2: 0}, 10)
        # The same table counts the requests each worker receives (as each arrives); any
        # worker shows the whole fleet's in /health, its own request included.
        url = f"http://127.0.0.1:{manager.address[1]}/health"
        for n in range(1, 9):
            doc = yield get_json(url)
            assert sum(w["requests"] for w in doc["workers"]) == n
        pids = {w["id"]: w["pid"] for w in manager.worker_info()}
        assert {w["id"]: w["pid"] for w in doc["workers"]} == pids
        served = {w["id"]: w["requests"] for w in doc["workers"]}
        assert {w["id"]: w["requests"] for w in manager.worker_info()} == served
        assert manager.send_signal_to_worker(1, "SIGKILL")
        yield wait_until(reactor, lambda: manager.accept_counts().get(1, -1) == -1, 10)
        yield wait_until(reactor, lambda: manager.accept_counts() == {1: 0, 2: 0}, 15)
        doc = yield get_json(url)
        by_id = {w["id"]: w for w in doc["workers"]}
        assert sorted(by_id) == [1, 2] and by_id[1]["pid"] != pids[1]
        fresh = 1 if doc["worker_id"] == "1" else 0  # this document's own request
        assert by_id[1]["requests"] == fresh and by_id[2]["requests"] == served[2] + 1 - fresh
    finally:
        for c in clients:
            c.close()
        yield manager.stop()
    assert manager.accept_counts() == {}
