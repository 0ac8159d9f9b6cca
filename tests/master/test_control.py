"""
The control API over a real UNIX socket (in this test's reactor) in front of a fleet of
fake workers (FakeProcessReactor), and the ``bungate`` command's side of it.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import stat
from pathlib import Path
from typing import Any, Optional

import pytest
import pytest_twisted
from twisted.internet import defer, threads
from twisted.internet import reactor as real_reactor

from bungate import cli
from bungate.master.control import ControlResource, ControlServer, check_socket_path
from bungate.master.fleet import ClusterError, ClusterManager
from bungate.testing import FakeProcessReactor, wait_until

TIMEOUT = 10.0


def exit_on_term(worker: Any, signum: int) -> None:
    if signum == signal.SIGTERM:
        worker.exit(0)
    elif signum == signal.SIGKILL:
        worker.exit(None, signal.SIGKILL)


class Fleet:
    """A ClusterManager over fake workers, its control API on a real socket."""

    def __init__(self, path: Path, workers: int = 2, **cluster: Any) -> None:
        self.fake = FakeProcessReactor()
        self.fake.on_signal = exit_on_term
        settings = {"enabled": True, "workers": workers, "shutdown_timeout": 5, **cluster}
        self.manager = ClusterManager(
            {"server": {"host": "127.0.0.1", "port": 0}, "cluster": settings},
            reactor=self.fake,
        )
        self.reloads: list[bool] = []
        self.reload_outcome: defer.Deferred[bool] = defer.Deferred()
        self.stops = 0
        self.stopped: defer.Deferred[None] = defer.Deferred()
        self.ready = True
        self.resource = ControlResource(
            self.manager,
            reload=self.reload,
            stop=self.stop,
            master=lambda: {"pid": 1},
            ready=lambda: self.ready,
        )
        self.server = ControlServer(str(path), self.resource, real_reactor)
        self.path = str(path)

    def start(self) -> None:
        self.manager.start()
        for worker in self.fake.live():
            worker.ready()
        self.server.listen()

    def reload(self, wait: bool) -> defer.Deferred[bool]:
        self.reloads.append(wait)
        return self.reload_outcome

    def stop(self) -> defer.Deferred[None]:
        self.stops += 1
        return self.stopped

    def call(
        self, method: str, endpoint: str, body: Optional[dict[str, Any]] = None
    ) -> defer.Deferred[tuple[int, dict[str, Any]]]:
        d = threads.deferToThread(cli.request, self.path, method, endpoint, body, TIMEOUT)
        return d

    def command(self, *argv: str) -> defer.Deferred[tuple[int, str, str]]:
        def run() -> tuple[int, str, str]:
            out, err = io.StringIO(), io.StringIO()
            code = cli.main(["--socket", self.path, *argv], out=out, err=err)
            return code, out.getvalue(), err.getvalue()

        return threads.deferToThread(run)

    def close(self) -> defer.Deferred[None]:
        self.manager.stop()
        return self.server.close()


@pytest.fixture
def fleet(tmp_path: Path) -> Any:
    made: list[Fleet] = []

    def make(workers: int = 2, **cluster: Any) -> Fleet:
        f = Fleet(tmp_path / "control.sock", workers, **cluster)
        made.append(f)
        f.start()
        return f

    yield make
    for f in made:
        pytest_twisted.blockon(f.close())


# --- the socket ---------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_the_socket_is_private_and_removed_on_close(fleet):
    f = fleet()
    st = os.stat(f.path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    yield f.server.close()
    assert not os.path.exists(f.path)


def test_a_live_socket_is_refused(fleet, tmp_path):
    f = fleet()
    other = ControlServer(f.path, f.resource, real_reactor)
    with pytest.raises(ClusterError, match="is held by a live socket"):
        other.listen()
    assert stat.S_ISSOCK(os.stat(f.path).st_mode)  # the first one's, untouched


def test_a_stale_socket_is_replaced_and_anything_else_refused(tmp_path):
    path = tmp_path / "control.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()  # the file stays, no one listens: a master killed with -9
    check_socket_path(str(path))
    assert not path.exists()
    path.write_text("not a socket")
    with pytest.raises(ClusterError, match="exists and is not a socket"):
        check_socket_path(str(path))
    with pytest.raises(ClusterError, match=r"directory .* does not exist"):
        check_socket_path(str(tmp_path / "missing" / "control.sock"))


@pytest_twisted.inlineCallbacks
def test_close_leaves_a_socket_that_is_no_longer_its_own(fleet, tmp_path):
    f = fleet()
    os.unlink(f.path)
    replacement = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    replacement.bind(f.path)
    try:
        yield f.server.close()
        assert stat.S_ISSOCK(os.stat(f.path).st_mode)
    finally:
        replacement.close()


# --- endpoints ----------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_fleet_lists_every_worker(fleet):
    f = fleet()
    code, answer = yield f.call("GET", "/fleet")
    assert code == 200 and answer["ok"]
    assert (answer["desired"], answer["running"], answer["live"]) == (2, 2, 2)
    assert answer["master"] == {"pid": 1}
    assert [w["id"] for w in answer["workers"]] == [1, 2]
    keys = {
        "id",
        "pid",
        "status",
        "restarts",
        "started_at",
        "last_exit",
        "requests",
        "connections",
        "rss_bytes",
        "cpu_seconds",
    }
    for worker in answer["workers"]:
        assert set(worker) == keys
        assert worker["status"] == "running"


@pytest_twisted.inlineCallbacks
def test_unknown_endpoints_and_methods(fleet):
    f = fleet()
    code, answer = yield f.call("GET", "/nope")
    assert code == 404 and "/fleet" in answer["endpoints"]
    code, answer = yield f.call("GET", "/roll")
    assert code == 405 and answer["error"] == "/roll takes POST, not GET"
    code, answer = yield f.call("POST", "/fleet")
    assert code == 405


@pytest.mark.parametrize(
    "body, error",
    [
        ({}, 'give the new fleet size as {"workers": N}'),
        ({"workers": "3"}, 'give the new fleet size as {"workers": N}'),
        ({"workers": True}, 'give the new fleet size as {"workers": N}'),
        ({"workers": 0}, "workers must be 1..1024, got 0"),
    ],
)
@pytest_twisted.inlineCallbacks
def test_scale_refuses_a_bad_size(fleet, body, error):
    f = fleet()
    code, answer = yield f.call("POST", "/scale", body)
    assert (code, answer) == (400, {"ok": False, "error": error})


@pytest_twisted.inlineCallbacks
def test_a_body_that_is_not_json_is_refused(fleet):
    f = fleet()

    def raw() -> tuple[int, bytes]:
        conn = cli._UnixConnection(f.path, TIMEOUT)
        try:
            conn.request("POST", "/scale", body=b"{not json")
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    code, body = yield threads.deferToThread(raw)
    assert code == 400 and b"the body is not JSON" in body


@pytest_twisted.inlineCallbacks
def test_scale_waits_for_the_new_workers(fleet):
    f = fleet()
    pending = f.call("POST", "/scale?wait=1", {"workers": 3})
    yield wait_until(real_reactor, lambda: len(f.fake.live()) == 3, TIMEOUT)
    assert not pending.called
    f.fake.live()[-1].ready()
    code, answer = yield pending
    assert code == 200, answer
    assert answer == {"ok": True, "message": "scaled from 2 to 3 worker(s)", "started": [3]}


@pytest_twisted.inlineCallbacks
def test_scale_without_wait_answers_at_once(fleet):
    f = fleet()
    code, answer = yield f.call("POST", "/scale", {"workers": 1})
    assert code == 202 and answer["message"] == "scaling from 2 to 1 worker(s)"
    assert f.manager.worker_count() == 1


@pytest_twisted.inlineCallbacks
def test_roll_waits_for_its_outcome(fleet):
    f = fleet()
    pending = f.command("roll", "--wait")
    for expected in (3, 4):
        yield wait_until(
            real_reactor, lambda n=expected: any(w.launch.worker_id == n for w in f.fake.live())
        )
        next(w for w in f.fake.live() if w.launch.worker_id == expected).ready()
    code, out, err = yield pending
    assert (code, out, err) == (0, "rolling restart done\n", "")
    assert sorted(s.id for s in f.manager.slots.values()) == [3, 4]


@pytest_twisted.inlineCallbacks
def test_roll_wait_exits_1_when_the_roll_aborts(fleet):
    f = fleet(restart_workers=False)
    pending = f.command("roll", "--wait")
    yield wait_until(real_reactor, lambda: len(f.fake.live()) == 3)
    f.fake.live()[-1].exit(1)  # the replacement dies before it is ready
    code, out, err = yield pending
    assert code == cli.EXIT_REFUSED and out == ""
    assert err.startswith("bungate: roll: rolling restart aborted: replacement worker 3")
    assert sorted(s.id for s in f.manager.slots.values() if s.serving) == [1, 2]


@pytest_twisted.inlineCallbacks
def test_reload_passes_wait_and_reports_the_refusal(fleet):
    f = fleet()
    pending = f.call("POST", "/reload?wait=1")
    yield wait_until(real_reactor, lambda: f.reloads == [True])
    f.manager.events.emit("reload-refused", error="gw.yaml: server.port: nope")
    f.reload_outcome.callback(False)
    code, answer = yield pending
    assert code == 409
    assert answer["error"] == "reload failed: gw.yaml: server.port: nope"


@pytest_twisted.inlineCallbacks
def test_stop_wait_answers_once_stopped(fleet):
    f = fleet()
    pending = f.call("POST", "/stop?wait=1")
    yield wait_until(real_reactor, lambda: f.stops == 1)
    assert not pending.called
    f.stopped.callback(None)
    code, answer = yield pending
    assert (code, answer["message"]) == (200, "the fleet has stopped")


@pytest_twisted.inlineCallbacks
def test_signal_one_worker_or_all(fleet):
    f = fleet()
    code, answer = yield f.call("POST", "/signal", {"worker": 2, "signal": "HUP"})
    assert (code, answer["message"]) == (200, "sent SIGHUP to worker 2")
    by_id = {w.launch.worker_id: w for w in f.fake.live()}
    assert by_id[2].signals == [signal.SIGHUP] and by_id[1].signals == []
    code, answer = yield f.call("POST", "/signal", {"worker": "all", "signal": "SIGUSR1"})
    assert (code, answer["message"]) == (200, "sent SIGUSR1 to 2 worker(s)")
    code, answer = yield f.call("POST", "/signal", {"worker": 9, "signal": "HUP"})
    assert (code, answer["error"]) == (404, "worker 9 has no live process")
    code, answer = yield f.call("POST", "/signal", {"worker": 1, "signal": "NOPE"})
    assert (code, answer["error"]) == (400, "unknown signal 'NOPE'")


@pytest_twisted.inlineCallbacks
def test_actions_are_refused_while_stopping(fleet):
    f = fleet()
    f.manager.stop()
    for endpoint, body in (("/scale", {"workers": 3}), ("/roll", None), ("/reload", None)):
        code, answer = yield f.call("POST", endpoint, body)
        assert (code, answer["error"]) == (409, "the master is stopping"), endpoint
    code, answer = yield f.call("GET", "/fleet")
    assert code == 200 and answer["stopping"] is True


@pytest_twisted.inlineCallbacks
def test_actions_are_refused_until_the_fleet_is_ready(fleet):
    f = fleet()
    f.ready = False
    code, answer = yield f.call("POST", "/roll")
    assert (code, answer["error"]) == (409, "the fleet is starting: try again once it is ready")
    code, _ = yield f.call("GET", "/fleet")
    assert code == 200


# --- the bungate command ------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_status_prints_a_table(fleet):
    f = fleet()
    code, out, err = yield f.command("status")
    assert code == 0 and err == ""
    head, *rows = out.splitlines()
    assert head.startswith("master pid 1 · up ") and "2/2 workers running" in head
    assert rows[0].split() == [
        "id",
        "pid",
        "status",
        "restarts",
        "uptime",
        "requests",
        "conns",
        "rss",
        "cpu",
    ]
    assert [row.split()[:4] for row in rows[1:]] == [
        ["1", str(f.manager.slots[1].pid), "running", "0"],
        ["2", str(f.manager.slots[2].pid), "running", "0"],
    ]


def test_format_fleet():
    fleet = {
        "master": {"pid": 10, "started_at": 1000.0, "rss_bytes": 50 * 2**20, "user": "nobody"},
        "running": 1,
        "desired": 2,
        "workers": [
            {
                "id": 1,
                "pid": 11,
                "status": "running",
                "restarts": 2,
                "started_at": 1000.0,
                "requests": 1234,
                "connections": 5,
                "rss_bytes": 60 * 2**20,
                "cpu_seconds": 3.25,
            },
            {"id": 2, "pid": 12, "status": "failed", "restarts": 10, "started_at": 900.0},
        ],
    }
    assert cli.format_fleet(fleet, now=1000.0 + 3723).splitlines() == [
        "master pid 10 · up 1h 2m · 1/2 workers running · rss 50.0 MiB · user nobody",
        "id  pid  status   restarts  uptime  requests  conns       rss   cpu",
        " 1   11  running         2   1h 2m      1234      5  60.0 MiB  3.2s",
        " 2    -  failed         10       -         -      -         -     -",
    ]


def run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(argv, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_usage_errors_exit_2(tmp_path):
    assert run([])[0] == cli.EXIT_USAGE
    code, _, err = run(["status"])
    assert code == cli.EXIT_USAGE and "give --socket PATH, or --config FILE" in err
    assert run(["--socket", "x", "scale", "many"])[0] == cli.EXIT_USAGE
    assert run(["--socket", "x", "scale", "0"])[0] == cli.EXIT_USAGE
    assert run(["--socket", "x", "signal", "one", "HUP"])[0] == cli.EXIT_USAGE
    assert run(["--socket", "x", "--config", "y", "status"])[0] == cli.EXIT_USAGE
    config = tmp_path / "gw.yaml"
    config.write_text("cluster: {enabled: true}\n")
    code, _, err = run(["--config", str(config), "status"])
    assert code == cli.EXIT_USAGE and "sets no cluster.control_socket" in err
    config.write_text("cluster: {enabled: yes please}\n")
    code, _, err = run(["--config", str(config), "status"])
    assert code == cli.EXIT_USAGE and "cluster.enabled" in err


def test_no_master_exits_3(tmp_path):
    code, out, err = run(["--socket", str(tmp_path / "none.sock"), "status"])
    assert code == cli.EXIT_UNREACHABLE and out == ""
    assert err.startswith(f"bungate: cannot reach the master at {tmp_path / 'none.sock'}: ")


def test_version():
    code, out, _ = run(["--version"])
    assert code == 0 and out.startswith("bungate ")
