"""
Every operator signal, every reload and every fleet failure against real ``twist bungate``
processes: what the master and its workers do, what they log, how they exit.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import defer, threads
from twisted.internet.task import deferLater

from bungate.testing import wait_until
from tests.integration.conftest import cluster_config


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def connect_error(port: int) -> int:
    """0 if a TCP connect to ``port`` succeeds, else its errno (ECONNREFUSED...)."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return 0
    except OSError as e:
        return e.errno or -1


@defer.inlineCallbacks
def body_of(url: str) -> Any:
    r = yield treq.get(url, persistent=False, timeout=10)
    content = yield r.content()
    return r.code, content


@pytest.fixture
def modules(tmp_path: Path) -> Any:
    """Write handler modules into a directory the gateway imports from (PYTHONPATH)."""
    root = tmp_path / "mods"
    root.mkdir()

    def write(name: str, source: str) -> None:
        (root / f"{name}.py").write_text(textwrap.dedent(source))

    write.env = dict(  # type: ignore[attr-defined]
        os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])
    )
    return write


def with_handler(upstream_url: str, handler: str, **cluster: Any) -> dict[str, Any]:
    config = cluster_config(upstream_url, **cluster)
    config["routes"] = [
        {"pattern": "/app", "handler": handler},
        {"pattern": "/*", "target": upstream_url},
    ]
    return config


VERSION = """
def hello(request):
    return {{"version": {version}}}
"""

# Fine in a check and in the master; a worker (CLUSTER_WORKER=true) cannot boot with it.
WORKERS_CANNOT_BOOT = """
import os
if os.environ.get("CLUSTER_WORKER") == "true":
    raise RuntimeError("this module refuses to run in a worker")

def hello(request):
    return {"never": "served"}
"""


# --- TERM, INT, QUIT --------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_sigterm_refuses_new_clients_at_once_finishes_in_flight_and_exits_0(
    reactor, upstream, gateways
):
    gw = yield gateways(cluster_config(upstream.url)).start()
    workers = list(gw.workers().values())
    pending = body_of(gw.url + "/slow?delay=2")
    yield wait_until(reactor, lambda: any(r.path == b"/slow" for r in upstream.requests), 10)
    mark = gw.mark()
    gw.signal(signal.SIGTERM)
    yield gw.wait_for(r"Stopping \d+ worker", since=mark)
    # The master closed its sockets at once, the workers their copies as they began to
    # drain: a new client is refused, not queued for a reset seconds later.
    yield wait_until(
        reactor,
        lambda: gw.count(r"\[worker \d\].*Port \d+ Closed", since=mark) == 2,
        10,
        what="both workers to stop listening",
    )
    assert (yield threads.deferToThread(connect_error, gw.port)) == errno.ECONNREFUSED
    code, content = yield pending
    assert (code, content) == (200, b"slow done")
    assert (yield gw.wait_exit()) == 0 and gw.exit_signal is None
    assert not any(alive(pid) for pid in workers)


@pytest_twisted.inlineCallbacks
def test_sigquit_stops_at_once_without_waiting_for_requests(reactor, upstream, gateways):
    gw = yield gateways(cluster_config(upstream.url, shutdown_timeout=30)).start()
    workers = list(gw.workers().values())
    pending = body_of(gw.url + "/slow?delay=20")
    yield wait_until(reactor, lambda: any(r.path == b"/slow" for r in upstream.requests), 10)
    gw.signal(signal.SIGQUIT)
    yield gw.wait_exit(timeout=10)  # far less than the request or the shutdown_timeout
    assert not any(alive(pid) for pid in workers)
    with pytest.raises(Exception):  # noqa: B017 - the connection is cut, whatever its name
        yield pending


@pytest_twisted.inlineCallbacks
def test_a_second_sigterm_stops_at_once(reactor, upstream, gateways):
    gw = yield gateways(cluster_config(upstream.url, shutdown_timeout=30)).start()
    pending = body_of(gw.url + "/slow?delay=20")
    pending.addErrback(lambda _: None)
    yield wait_until(reactor, lambda: any(r.path == b"/slow" for r in upstream.requests), 10)
    mark = gw.mark()
    gw.signal(signal.SIGTERM)
    yield gw.wait_for(r"Stopping \d+ worker", since=mark)
    gw.signal(signal.SIGTERM)
    yield gw.wait_exit(timeout=10)
    yield pending


# --- USR1 -------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["logger.file", "twist --log-file"])
@pytest_twisted.inlineCallbacks
def test_sigusr1_reopens_the_log_file_after_it_was_moved(reactor, upstream, tmp_path, how):
    log_path = tmp_path / "gateway.log"
    config = cluster_config(upstream.url)
    config["logger"] = {"level": "info", "request_logging": True}
    twist = [sys.executable, "-m", "twisted", "--log-format", "text"]
    if how == "logger.file":
        config["logger"]["file"] = str(log_path)
    else:
        twist += ["--log-file", str(log_path)]
    config_path = tmp_path / "gateway.yaml"
    import yaml

    config_path.write_text(yaml.safe_dump(config))
    child = subprocess.Popen(
        [*twist, "bungate", "--config", str(config_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    moved = tmp_path / "gateway.log.1"
    try:

        def text(path: Path) -> str:
            return path.read_text() if path.exists() else ""

        yield wait_until(reactor, lambda: "Fleet ready" in text(log_path), 30, what="the fleet")
        port = int(text(log_path).split("listening on ")[1].split(":")[1].split()[0])
        os.rename(log_path, moved)
        child.send_signal(signal.SIGUSR1)
        yield wait_until(
            reactor, lambda: "reopened the log file" in text(log_path), 10, what="a reopen"
        )
        # The workers' lines (an access line here) reach the new file too.
        code, _ = yield body_of(f"http://127.0.0.1:{port}/api/after-reopen")
        assert code == 200
        yield wait_until(reactor, lambda: "/api/after-reopen" in text(log_path), 10)
        assert "/api/after-reopen" not in text(moved)
        assert "Fleet ready" in text(moved) and "Fleet ready" not in text(log_path)
        assert child.poll() is None, "SIGUSR1 must not stop the master"
    finally:
        child.terminate()
        yield threads.deferToThread(child.wait, 30)
    assert child.returncode == 0, child.stderr.read() if child.stderr else ""


# --- HUP --------------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_sighup_never_imports_a_handler_module_in_the_master(reactor, upstream, gateways, modules):
    modules("app", VERSION.format(version=1))
    modules("exits", "import os\nos._exit(3)\n")
    config = with_handler(upstream.url, "app:hello")
    gw = yield gateways(config, env=modules.env).start()
    pids = gw.workers()
    gw.write_config(with_handler(upstream.url, "exits:hello"))
    mark = gw.mark()
    gw.signal(signal.SIGHUP)
    yield gw.wait_for(r"Configuration reload refused.*exited with code 3", since=mark)
    assert alive(gw.pid) and gw.workers() == pids
    assert (yield body_of(gw.url + "/app")) == (200, b'{"version": 1}')


@pytest_twisted.inlineCallbacks
def test_sighup_serves_a_handler_module_changed_on_disk(reactor, upstream, gateways, modules):
    modules("app", VERSION.format(version=1))
    config = with_handler(upstream.url, "app:hello")
    gw = yield gateways(config, env=modules.env).start()
    assert (yield body_of(gw.url + "/app")) == (200, b'{"version": 1}')
    modules("app", VERSION.format(version=2))
    mark = gw.mark()
    gw.signal(signal.SIGHUP)
    yield gw.wait_for(r"Configuration reloaded", since=mark, timeout=30)
    assert (yield body_of(gw.url + "/app")) == (200, b'{"version": 2}')


@pytest_twisted.inlineCallbacks
def test_a_reload_whose_first_worker_cannot_boot_leaves_the_old_fleet_and_config(
    reactor, upstream, gateways, modules
):
    modules("app", VERSION.format(version=1))
    modules("noboot", WORKERS_CANNOT_BOOT)
    config = with_handler(upstream.url, "app:hello", max_restarts=1)
    gw = yield gateways(config, env=modules.env).start()
    pids = gw.workers()
    gw.write_config(with_handler(upstream.url, "noboot:hello", max_restarts=1))
    mark = gw.mark()
    gw.signal(signal.SIGHUP)
    yield gw.wait_for(r"Configuration reload from .* aborted: its first worker", since=mark)
    assert gw.count(r"Configuration reload from .* aborted", since=mark) == 1
    assert gw.workers() == pids
    assert (yield body_of(gw.url + "/app")) == (200, b'{"version": 1}')
    # A respawn after the failed reload gets the accepted config, not the new one.
    mark = gw.mark()
    os.kill(pids[1], signal.SIGKILL)
    yield gw.wait_for(r"Worker 1 ready", since=mark, timeout=30)
    for _ in range(4):  # both workers, whichever answers
        assert (yield body_of(gw.url + "/app")) == (200, b'{"version": 1}')


@pytest_twisted.inlineCallbacks
def test_sighup_moves_the_listener_to_a_new_port(reactor, upstream, gateways):
    config = cluster_config(upstream.url)
    gw = yield gateways(config).start()
    old = gw.port
    new_port = free_port()
    gw.write_config({**config, "server": {"host": "127.0.0.1", "port": new_port}})
    mark = gw.mark()
    gw.signal(signal.SIGHUP)
    yield gw.wait_for(r"Configuration reloaded.*server\.port: 127\.0\.0\.1:0 -> ", since=mark)
    code, _ = yield body_of(f"http://127.0.0.1:{new_port}/api/moved")
    assert code == 200
    assert (yield threads.deferToThread(connect_error, old)) == errno.ECONNREFUSED


@pytest_twisted.inlineCallbacks
def test_sighup_resizes_the_fleet(reactor, upstream, gateways):
    config = cluster_config(upstream.url, workers=1)
    gw = yield gateways(config).start()
    gw.write_config(cluster_config(upstream.url, workers=3))
    mark = gw.mark()
    gw.signal(signal.SIGHUP)
    yield gw.wait_for(r"Configuration reloaded.*cluster\.workers", since=mark)
    yield gw.wait_for(r"Fleet scaled from 1 to 3 workers", since=mark, timeout=30)
    # "scaled" is logged as the new slots spawn; a child between fork and exec does not
    # carry its worker title yet, so wait for three worker processes.
    yield wait_until(reactor, lambda: len(gw.workers()) == 3, timeout=30, what="3 workers")


@pytest_twisted.inlineCallbacks
def test_sighup_starts_a_metrics_listener(reactor, upstream, gateways):
    config = cluster_config(upstream.url)
    config["metrics"] = {"enabled": True}
    gw = yield gateways(config).start()
    port = free_port()
    gw.write_config({**config, "metrics": {"enabled": True, "listen": f"127.0.0.1:{port}"}})
    mark = gw.mark()
    gw.signal(signal.SIGHUP)
    yield gw.wait_for(r"Configuration reloaded.*metrics\.listen", since=mark, timeout=30)
    code, content = yield body_of(f"http://127.0.0.1:{port}/metrics")
    assert code == 200 and b"bungate_workers{" in content


@pytest_twisted.inlineCallbacks
def test_sighup_refuses_leaving_cluster_mode_by_name(reactor, upstream, gateways):
    config = cluster_config(upstream.url)
    gw = yield gateways(config).start()
    pids = gw.workers()
    single = cluster_config(upstream.url)
    single["cluster"]["enabled"] = False
    gw.write_config(single)
    mark = gw.mark()
    gw.signal(signal.SIGHUP)
    yield gw.wait_for(r"Configuration reload refused.*cluster\.enabled", since=mark)
    assert gw.workers() == pids


@pytest_twisted.inlineCallbacks
def test_command_line_overrides_stay_pinned_and_the_log_says_so(reactor, upstream, gateways):
    config = cluster_config(upstream.url)
    gw = yield gateways(config, args=["--workers", "2"]).start()
    gw.write_config(cluster_config(upstream.url, workers=3))
    mark = gw.mark()
    gw.signal(signal.SIGHUP)
    line = yield gw.wait_for(
        r"Configuration reloaded.*kept from the command line: (.*)", since=mark
    )
    assert "cluster.workers (--workers 2)" in line.group(1)
    assert len(gw.workers()) == 2


@pytest_twisted.inlineCallbacks
def test_sighup_to_a_worker_rereads_its_config_and_is_no_crash(reactor, upstream, gateways):
    gw = yield gateways(cluster_config(upstream.url)).start()
    pids = gw.workers()
    mark = gw.mark()
    os.kill(pids[1], signal.SIGHUP)
    yield gw.wait_for(r"\[worker 1\].*Config re-read", since=mark)
    assert gw.workers() == pids
    assert gw.count(r"crash|exited", since=mark) == 0


# --- scaling, a fleet that cannot serve ---------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_ttou_never_removes_the_last_worker(reactor, upstream, gateways):
    gw = yield gateways(cluster_config(upstream.url, workers=1)).start()
    pids = gw.workers()
    mark = gw.mark()
    gw.signal(signal.SIGTTOU)
    yield gw.wait_for(r"SIGTTOU refused: the last worker", since=mark)
    assert gw.workers() == pids


@pytest_twisted.inlineCallbacks
def test_a_failed_slot_shows_in_health_and_metrics(reactor, upstream, gateways):
    config = cluster_config(upstream.url, workers=2, max_restarts=0)
    config["health"] = {"details": False}
    config["metrics"] = {"enabled": True}
    gw = yield gateways(config).start()
    mark = gw.mark()
    os.kill(gw.workers()[2], signal.SIGKILL)
    yield gw.wait_for(r"Worker 2 failed, not respawning", since=mark)

    @defer.inlineCallbacks
    def health() -> Any:
        code, content = yield body_of(gw.url + "/health")
        return code, json.loads(content)

    yield wait_until(reactor, lambda: len(gw.workers()) == 1, 10)
    # The survivor hears of the failure from the master (a fleet message): wait for it.
    for _ in range(50):
        code, doc = yield health()
        if doc.get("status") == "degraded":
            break
        yield deferLater(reactor, 0.1, lambda: None)
    assert (code, doc) == (200, {"status": "degraded", "failed_workers": 1})
    _, metrics = yield body_of(gw.url + "/metrics")
    assert b'bungate_workers{state="failed"} 1.0' in metrics
    assert b"bungate_workers_total 1.0" in metrics


@pytest_twisted.inlineCallbacks
def test_when_every_slot_failed_the_master_closes_its_port_and_exits_3(reactor, upstream, gateways):
    gw = yield gateways(cluster_config(upstream.url, max_restarts=0)).start()
    for pid in gw.workers().values():
        os.kill(pid, signal.SIGKILL)
    yield gw.wait_for(
        r"Every worker slot has failed: closing the listeners and exiting with status 3", timeout=20
    )
    assert (yield gw.wait_exit(timeout=20)) == 3
    assert (yield threads.deferToThread(connect_error, gw.port)) == errno.ECONNREFUSED


@pytest_twisted.inlineCallbacks
def test_on_all_failed_retry_keeps_the_master_and_revives_the_slots(reactor, upstream, gateways):
    config = cluster_config(
        upstream.url, workers=1, max_restarts=0, on_all_failed="retry", max_restart_delay=0.5
    )
    gw = yield gateways(config).start()
    mark = gw.mark()
    for pid in gw.workers().values():
        os.kill(pid, signal.SIGKILL)
    yield gw.wait_for(r"Worker 1 ready", since=mark, timeout=30)
    code, _ = yield body_of(gw.url + "/api/revived")
    assert code == 200 and alive(gw.pid)


# --- exit status and output of a bad config -----------------------------------------------


def run_twist(*args: str, cwd: Any = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "twisted", "bungate", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )


def test_an_invalid_config_prints_every_error_once_and_exits_78(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        "server: {port: 99999}\n"
        "cluster: {shutdownTimeout: 30000}\n"
        "routes: [{pattern: /x, taget: 'http://127.0.0.1:1'}]\n"
    )
    done = run_twist("--config", str(path))
    assert done.returncode == 78, done
    errors = [line for line in done.stderr.splitlines() if line.startswith("bungate: ")]
    assert any("server.port" in line for line in errors), done.stderr
    assert any("shutdown_timeout" in line for line in errors), done.stderr
    assert any("taget" in line and "target" in line for line in errors), done.stderr
    assert "Usage" not in done.stderr + done.stdout
    assert len(errors) == len(set(errors))


def test_check_says_ok_or_names_the_problem(tmp_path, upstream_url="http://127.0.0.1:9"):
    good = tmp_path / "good.yaml"
    good.write_text(f"routes: [{{pattern: /x, target: '{upstream_url}'}}]\n")
    done = run_twist("--config", str(good), "--check")
    assert (done.returncode, done.stdout.strip()) == (0, f"{good}: OK"), done
    # Two routes with the same pattern boot no worker: --check refuses it as a boot would.
    twice = tmp_path / "twice.yaml"
    twice.write_text(
        f"routes: [{{pattern: /x, target: '{upstream_url}'}}, "
        f"{{pattern: /x, target: '{upstream_url}'}}]\n"
    )
    done = run_twist("--config", str(twice), "--check")
    assert done.returncode == 78 and "routes[1].pattern" in done.stderr, done


def test_a_handler_module_that_is_not_importable_says_where_python_looked(tmp_path):
    path = tmp_path / "gw.yaml"
    path.write_text("routes: [{pattern: /x, handler: 'myapp.handlers:hello'}]\n")
    done = run_twist("--config", str(path), "--check", cwd=tmp_path)
    assert done.returncode == 78, done
    assert "myapp" in done.stderr and "PYTHONPATH" in done.stderr, done.stderr


# --- a single process -----------------------------------------------------------------------


def single_config(upstream_url: str, handler: str) -> dict[str, Any]:
    config = with_handler(upstream_url, handler)
    config["cluster"] = {"enabled": False, "shutdown_timeout": 10}
    return config


@pytest_twisted.inlineCallbacks
def test_a_single_process_reloads_routes_on_hup_and_refuses_a_new_port(
    reactor, upstream, gateways, modules
):
    modules("app", VERSION.format(version=1))
    config = single_config(upstream.url, "app:hello")
    gw = yield gateways(config, env=modules.env).start()
    modules("app", VERSION.format(version=2))
    modules("other", VERSION.format(version=3))
    changed = single_config(upstream.url, "other:hello")
    gw.write_config(changed)
    mark = gw.mark()
    gw.signal(signal.SIGHUP)
    yield gw.wait_for(r"Configuration reloaded from .*: changed routes", since=mark)
    assert (yield body_of(gw.url + "/app")) == (200, b'{"version": 3}')
    gw.write_config({**changed, "server": {"host": "127.0.0.1", "port": free_port()}})
    mark = gw.mark()
    gw.signal(signal.SIGHUP)
    yield gw.wait_for(r"reload refused.*server\.port cannot change", since=mark)
    mark = gw.mark()
    gw.signal(signal.SIGUSR1)
    yield gw.wait_for(r"SIGUSR1: logging to a stream, nothing to reopen", since=mark)
    assert alive(gw.pid)
