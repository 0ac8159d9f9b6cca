"""
A good citizen of systemd and of classic init scripts, against real ``twist bungate``
processes: readiness, reload, stop and watchdog notifications over a real
``NOTIFY_SOCKET``; sockets passed by ``systemd-socket-activate``; ``--pidfile``; and
``server.user``: binding as root, serving as ``nobody``.
"""

from __future__ import annotations

import http.client
import os
import pwd
import shutil
import signal
import socket
import ssl
import stat
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import pytest_twisted
import trustme
from twisted.internet import defer, threads
from twisted.internet.interfaces import IReadDescriptor
from zope.interface import implementer

from bungate.testing import GatewayProcess, wait_until
from bungate.testing._process import _Collector
from tests.integration.conftest import cluster_config

TIMEOUT = 30.0

ACTIVATE = shutil.which("systemd-socket-activate")
needs_activate = pytest.mark.skipif(
    ACTIVATE is None and not os.environ.get("CI"),  # CI installs it: never skipped there
    reason="systemd-socket-activate is not installed (apt-get install systemd)",
)
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")

# Linux's values, for interpreters that do not name them (PyPy 3.9).
SO_PASSCRED = getattr(socket, "SO_PASSCRED", 16)
SCM_CREDENTIALS = getattr(socket, "SCM_CREDENTIALS", 2)


def launch(gw: GatewayProcess, argv_prefix: Optional[list[str]] = None) -> None:
    """Start ``gw`` without waiting for it to listen (for one that must fail to start)."""
    argv = [*(argv_prefix or []), gw.python, "-m", "twisted", *gw.twist_args, "bungate"]
    if gw.config is not None:
        argv += ["--config", gw.write_config(gw.config)]
    argv += gw.args
    env = dict(os.environ if gw.env is None else gw.env)
    env.setdefault("PYTHONUNBUFFERED", "1")
    gw.transport = gw.reactor.spawnProcess(_Collector(gw), argv[0], argv, env=env)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def status_ids(pid: int) -> tuple[list[int], list[int]]:
    """The real, effective, saved and filesystem uids and gids of ``pid``."""
    found: dict[str, list[int]] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("Uid", "Gid"):
                found[key] = [int(v) for v in value.split()]
    return found["Uid"], found["Gid"]


# --- sd_notify ------------------------------------------------------------------------------


@implementer(IReadDescriptor)
class NotifySocket:
    """
    What systemd's notify socket would get: each datagram, and who sent it. Read by the
    reactor as datagrams arrive, as systemd does (the kernel queues only a few: see
    /proc/sys/net/unix/max_dgram_qlen).
    """

    def __init__(self, reactor: Any, path: str) -> None:
        self.reactor = reactor
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.setsockopt(socket.SOL_SOCKET, SO_PASSCRED, 1)
        self.sock.setblocking(False)
        #: ``(sender pid, {field: value})`` per datagram, in order.
        self.messages: list[tuple[Optional[int], dict[str, str]]] = []
        self._waiters: list[tuple[Callable[[dict[str, str]], bool], int, Any]] = []
        reactor.addReader(self)

    # IReadDescriptor
    def fileno(self) -> int:
        return self.sock.fileno()

    def logPrefix(self) -> str:
        return "notify-socket"

    def connectionLost(self, reason: Any) -> None:
        pass

    def doRead(self) -> None:
        self.drain()

    def drain(self) -> None:
        while True:
            try:
                data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
            except (BlockingIOError, OSError):
                break
            pid = None
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == SCM_CREDENTIALS:
                    pid = struct.unpack("iII", payload[:12])[0]
            fields = dict(
                line.split("=", 1) for line in data.decode().splitlines() if "=" in line
            )
            self.messages.append((pid, fields))
        for item in list(self._waiters):
            test, since, d = item
            found = self._find(test, since)
            if found is not None:
                self._waiters.remove(item)
                d.callback(found)

    def _find(
        self, test: Callable[[dict[str, str]], bool], since: int
    ) -> Optional[dict[str, str]]:
        for _, fields in self.messages[since:]:
            if test(fields):
                return fields
        return None

    def wait(
        self,
        test: Callable[[dict[str, str]], bool],
        since: int = 0,
        gw: Optional[GatewayProcess] = None,
    ) -> defer.Deferred[dict[str, str]]:
        """The first message (from index ``since``) that passes ``test``."""
        self.drain()
        found = self._find(test, since)
        if found is not None:
            return defer.succeed(found)
        d: defer.Deferred[dict[str, str]] = defer.Deferred()
        item = (test, since, d)
        self._waiters.append(item)

        def timed_out(failure: Any) -> Any:
            if item in self._waiters:
                self._waiters.remove(item)
            if failure.check(defer.TimeoutError):
                got = [fields for _, fields in self.messages[since:]]
                tail = "\n".join(gw.lines[-30:]) if gw is not None else ""
                raise AssertionError(f"no such notification; got {got}; output tail:\n{tail}")
            return failure

        d.addTimeout(TIMEOUT, self.reactor)
        return d.addErrback(timed_out)

    def count(self, test: Callable[[dict[str, str]], bool], since: int = 0) -> int:
        self.drain()
        return sum(1 for _, fields in self.messages[since:] if test(fields))

    def close(self) -> None:
        self.reactor.removeReader(self)
        self.sock.close()


@pytest.fixture
def notify(reactor: Any, tmp_path: Path) -> Any:
    receiver = NotifySocket(reactor, str(tmp_path / "notify.sock"))
    yield receiver
    receiver.close()


@pytest_twisted.inlineCallbacks
def test_ready_reloading_status_watchdog_and_stopping(reactor, upstream, gateways, notify):
    env = dict(os.environ, NOTIFY_SOCKET=notify.path, WATCHDOG_USEC="400000")
    gw = yield gateways(cluster_config(upstream.url), env=env).start()
    ready = yield notify.wait(lambda m: m.get("READY") == "1", 0, gw)
    assert ready["STATUS"] == "2/2 workers running"
    # The fleet was ready before READY=1 was sent: nothing came before it but nothing.
    first_ready = next(i for i, (_, m) in enumerate(notify.messages) if m.get("READY"))
    assert notify.count(lambda m: "WATCHDOG" in m) == sum(
        1 for _, m in notify.messages[first_ready:] if "WATCHDOG" in m
    )

    # WATCHDOG=1 every 0.2 s (half of WATCHDOG_USEC) while workers serve.
    since = len(notify.messages)
    yield wait_until(
        reactor, lambda: notify.count(lambda m: m.get("WATCHDOG") == "1", since) >= 3, TIMEOUT
    )

    # HUP: RELOADING=1 (with the monotonic time systemd 253 asks for), then READY=1.
    since = len(notify.messages)
    mark = gw.mark()
    gw.signal(signal.SIGHUP)
    reloading = yield notify.wait(lambda m: m.get("RELOADING") == "1", since, gw)
    assert int(reloading["MONOTONIC_USEC"]) > 0
    yield gw.wait_for(r"Configuration reloaded", since=mark, timeout=TIMEOUT)
    at = next(i for i, (_, m) in enumerate(notify.messages) if m.get("RELOADING")) + 1
    ready = yield notify.wait(lambda m: m.get("READY") == "1", at, gw)
    assert ready["STATUS"] == "2/2 workers running"

    # The status follows the fleet: TTIN makes it 2/3, then 3/3.
    since = len(notify.messages)
    gw.signal(signal.SIGTTIN)
    yield notify.wait(lambda m: m.get("STATUS") == "2/3 workers running", since, gw)
    yield notify.wait(lambda m: m.get("STATUS") == "3/3 workers running", since, gw)

    # TERM: STOPPING=1, and a clean exit.
    since = len(notify.messages)
    gw.signal(signal.SIGTERM)
    yield notify.wait(lambda m: m.get("STOPPING") == "1", since, gw)
    assert (yield gw.wait_exit()) == 0
    # Only the master ever spoke to systemd (NotifyAccess=main): workers never saw it.
    notify.drain()
    assert {pid for pid, _ in notify.messages} == {gw.pid}


@pytest_twisted.inlineCallbacks
def test_no_watchdog_when_systemd_watches_another_pid(reactor, upstream, gateways, notify):
    env = dict(os.environ, NOTIFY_SOCKET=notify.path, WATCHDOG_USEC="200000", WATCHDOG_PID="1")
    gw = yield gateways(cluster_config(upstream.url), env=env).start()
    yield notify.wait(lambda m: m.get("READY") == "1", 0, gw)
    # A worker boots (over a second) while pings every 0.1 s would have been due.
    gw.signal(signal.SIGTTIN)
    yield notify.wait(lambda m: m.get("STATUS") == "3/3 workers running", 0, gw)
    assert notify.count(lambda m: "WATCHDOG" in m) == 0


# --- socket activation ---------------------------------------------------------------------


def wait_for_line(gw: GatewayProcess, pattern: str) -> defer.Deferred[Any]:
    return gw.wait_for(pattern, timeout=TIMEOUT)


def get(port: int, path: str) -> tuple[int, bytes]:
    """Blocking: one GET (run it in a thread)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def activated(gw: GatewayProcess, listen: list[str], fdnames: Optional[str]) -> None:
    """Run ``gw`` under systemd-socket-activate, which binds ``listen`` and waits."""
    assert ACTIVATE is not None
    prefix = [ACTIVATE]
    for address in listen:
        prefix += ["-l", address]
    if fdnames is not None:
        prefix.append(f"--fdname={fdnames}")
    for name in ("PYTHONPATH", "PYTHONUNBUFFERED", "VIRTUAL_ENV"):
        if name in os.environ:
            prefix += ["-E", f"{name}={os.environ[name]}"]
    prefix += ["-E", "PYTHONUNBUFFERED=1"]
    launch(gw, prefix)


@needs_activate
@pytest_twisted.inlineCallbacks
def test_the_master_adopts_the_socket_systemd_bound(reactor, upstream, gateways):
    port = free_port()
    config = cluster_config(upstream.url)
    config["server"]["port"] = port
    gw = gateways(config)
    activated(gw, [f"127.0.0.1:{port}"], "main")
    yield wait_for_line(gw, r"Listening on 127\.0\.0\.1:" + str(port))
    # The first client starts the gateway (as a .socket unit does) and is served by it:
    # it waited in the backlog of the socket systemd bound, never refused.
    code, body = yield threads.deferToThread(get, port, "/api/first")
    assert code == 200, body
    line = yield wait_for_line(gw, r"adopted 1 socket from systemd \(LISTEN_FDS\): .*")
    assert line.group(0).endswith(f"main=127.0.0.1:{port}")
    yield wait_for_line(gw, rf"Master \(pid {gw.pid}\) listening on 127\.0\.0\.1:{port}")
    assert gw.count(r"cannot listen") == 0
    # Workers and a roll keep serving on it.
    mark = gw.mark()
    gw.signal(signal.SIGUSR2)
    yield gw.wait_for(r"Rolling restart done", since=mark, timeout=TIMEOUT)
    code, _ = yield threads.deferToThread(get, port, "/api/after-roll")
    assert code == 200
    yield gw.stop()
    assert gw.exit_code == 0


@needs_activate
@pytest_twisted.inlineCallbacks
def test_a_socket_that_matches_no_listener_is_a_clear_start_error(reactor, upstream, gateways):
    passed, wanted = free_port(), free_port()
    config = cluster_config(upstream.url)
    config["server"]["port"] = wanted
    gw = gateways(config)
    activated(gw, [f"127.0.0.1:{passed}"], None)
    yield wait_for_line(gw, r"Listening on")
    # A connection starts it; it refuses the socket and exits.
    with pytest.raises(OSError):
        yield threads.deferToThread(get, passed, "/health")
    assert (yield gw.wait_exit()) == 1
    error = yield wait_for_line(gw, r"cannot start: socket activation \(LISTEN_FDS\): .*")
    assert f"systemd passed 127.0.0.1:{passed} (fd 3), which no listener asks for" in error.group(0)
    assert f"server.port wants 127.0.0.1:{wanted} but systemd passed no socket" in error.group(0)


# --- --pidfile -----------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_pidfile_is_written_once_listening_and_removed_on_exit(
    reactor, upstream, gateways, tmp_path
):
    path = tmp_path / "gw.pid"
    gw = yield gateways(cluster_config(upstream.url), args=["--pidfile", str(path)]).start()
    assert path.read_text() == f"{gw.pid}\n"
    wrote = gw.lines.index(next(line for line in gw.lines if "Pid file: wrote pid" in line))
    listening = gw.lines.index(next(line for line in gw.lines if "listening on" in line))
    spawned = gw.lines.index(next(line for line in gw.lines if "Worker 1 spawned" in line))
    assert wrote < spawned and listening < spawned
    assert gw.count(rf"Pid file: wrote pid {gw.pid} to {path}$") == 1
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert not [p for p in tmp_path.iterdir() if p.name != "gw.pid"]  # no temporary left
    yield gw.stop()
    assert gw.exit_code == 0 and not path.exists()


@pytest_twisted.inlineCallbacks
def test_a_stale_pidfile_is_replaced_and_a_live_one_refused(reactor, upstream, gateways, tmp_path):
    path = tmp_path / "gw.pid"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    path.write_text(f"{gone.pid}\n")
    first = yield gateways(cluster_config(upstream.url), args=["--pidfile", str(path)]).start()
    assert first.count(rf"replaced stale {path}: pid {gone.pid} is not running") == 1
    assert path.read_text() == f"{first.pid}\n"

    second = gateways(cluster_config(upstream.url), args=["--pidfile", str(path)])
    launch(second)
    assert (yield second.wait_exit(TIMEOUT)) == 1
    assert second.count(rf"pid file {path} is held by pid {first.pid}") >= 1
    assert second.count(r"listening on") == 0  # refused before binding anything
    assert path.read_text() == f"{first.pid}\n"  # left alone
    yield first.stop()
    assert not path.exists()


# --- server.user / server.group ----------------------------------------------------------


@pytest.fixture
def nobody() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user nobody here")


@pytest.fixture
def nobody_runs_python(nobody: pwd.struct_passwd) -> None:
    """Skip unless ``nobody`` can run this interpreter and import bungate (a venv built
    on an interpreter under /root, mode 0700, cannot be)."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", "import bungate, twisted"],
            user=nobody.pw_uid,
            group=nobody.pw_gid,
            extra_groups=[],
            cwd="/",
            capture_output=True,
            timeout=TIMEOUT,
        )
    except PermissionError as e:
        pytest.skip(f"the user nobody cannot run {sys.executable}: {e}")
    if done.returncode != 0:
        pytest.skip(f"the user nobody cannot import bungate with {sys.executable}: {done.stderr!r}")


@pytest.fixture
def shared_dir(nobody: pwd.struct_passwd) -> Any:
    """A directory the user ``nobody`` owns (the test's tmp_path is root's alone)."""
    path = tempfile.mkdtemp(prefix="bungate-test-")
    os.chown(path, nobody.pw_uid, nobody.pw_gid)
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


@needs_root
@pytest_twisted.inlineCallbacks
def test_workers_and_master_run_as_the_user_after_binding(
    reactor, upstream, gateways, nobody, nobody_runs_python, shared_dir, tmp_path
):
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    key.chmod(0o600)  # root's alone: only the master's copy is readable by the workers
    config = cluster_config(upstream.url)
    config["server"].update(
        user="nobody",
        tls={"enabled": True, "cert": str(cert), "key": str(key)},
    )
    config["metrics"] = {"enabled": True}
    config["cluster"]["control_socket"] = str(shared_dir / "control.sock")
    pidfile = shared_dir / "gw.pid"
    gw = yield gateways(config, args=["--pidfile", str(pidfile)]).start()
    uid, gid = nobody.pw_uid, nobody.pw_gid

    yield gw.wait_for(rf"running as user nobody \({uid}\), group \S+ \({gid}\) from now on")
    workers = gw.workers()
    assert len(workers) == 2
    for pid in [gw.pid, *workers.values()]:
        assert status_ids(pid) == ([uid] * 4, [gid] * 4), pid

    # The key copies workers load are the user's alone.
    copies = Path((yield gw.wait_for(r"from copies in (\S+)")).group(1))
    for path in (copies.parent, copies):
        st = path.stat()
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (uid, 0o700), path
    for path in copies.iterdir():
        st = path.stat()
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (uid, 0o600), path

    # It serves over TLS, /metrics (written by workers that are nobody) included.
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)

    def https(path: str) -> tuple[int, bytes]:
        conn = http.client.HTTPSConnection("127.0.0.1", gw.port, timeout=TIMEOUT, context=ctx)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    code, _ = yield threads.deferToThread(https, "/api/as-nobody")
    assert code == 200
    code, metrics = yield threads.deferToThread(https, "/metrics")
    assert code == 200 and b'process_resident_memory_bytes{worker="master"}' in metrics
    control = shared_dir / "control.sock"
    assert control.stat().st_uid == uid and stat.S_IMODE(control.stat().st_mode) == 0o600
    assert pidfile.read_text() == f"{gw.pid}\n"

    yield gw.stop()
    assert gw.exit_code == 0
    assert not pidfile.exists() and not control.exists()  # removed by the user, in its dir
    assert not copies.parent.exists()


@needs_root
@pytest_twisted.inlineCallbacks
def test_an_unknown_user_is_a_config_error(reactor, upstream, gateways):
    config = cluster_config(upstream.url)
    config["server"]["user"] = "no-such-user-here"
    gw = gateways(config)
    launch(gw)
    assert (yield gw.wait_exit(TIMEOUT)) == 78
    assert gw.count(r"server\.user: no such user 'no-such-user-here'") >= 1
    assert gw.count(r"listening on") == 0
