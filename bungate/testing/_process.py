"""``twist bungate`` in a real child process, and finding a master's workers."""

from __future__ import annotations

import os
import re
import signal
import sys
import tempfile
from typing import Any, Optional

import yaml
from twisted.internet import defer
from twisted.internet.protocol import ProcessProtocol

from bungate._once import Once

__all__ = ["GatewayProcess", "find_workers"]


class _Collector(ProcessProtocol):
    def __init__(self, owner: GatewayProcess) -> None:
        self.owner = owner
        self.buffer = b""

    def connectionMade(self) -> None:
        self.owner.pid = getattr(self.transport, "pid", None)

    def childDataReceived(self, fd: int, data: bytes) -> None:
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            self.owner._line(line.decode("utf-8", "replace"))

    def processExited(self, reason: Any) -> None:
        self.owner.exit_code = getattr(reason.value, "exitCode", None)
        self.owner.exit_signal = getattr(reason.value, "signal", None)

    def processEnded(self, reason: Any) -> None:
        if self.buffer:
            self.owner._line(self.buffer.decode("utf-8", "replace"))
        self.owner._ended()


class GatewayProcess:
    """
    ``twist bungate`` as a real child process.

    :param reactor: the test's reactor.
    :param config: the config mapping (written to a temporary YAML file), or ``None``
        for the built-in default.
    :param args: extra ``twist bungate`` arguments.
    :param python: the interpreter (default: this one).
    """

    def __init__(
        self,
        reactor: Any,
        config: Optional[dict[str, Any]] = None,
        args: Optional[list[str]] = None,
        python: Optional[str] = None,
        env: Optional[dict[str, str]] = None,
        twist_args: Optional[list[str]] = None,
    ) -> None:
        self.reactor = reactor
        self.config = config
        self.args = list(args or [])
        self.twist_args = list(twist_args or ["--log-format", "text"])
        self.python = python or sys.executable
        self.env = env
        self.lines: list[str] = []
        self.pid: Optional[int] = None
        self.exit_code: Optional[int] = None
        self.exit_signal: Optional[int] = None
        self.port: Optional[int] = None
        self.config_path: Optional[str] = None
        self._waiters: list[tuple[re.Pattern[str], int, defer.Deferred[re.Match[str]]]] = []
        self._end: Once[None] = Once()
        self.transport: Any = None

    def write_config(self, config: dict[str, Any]) -> str:
        """(Re)write the config file; returns its path."""
        if self.config_path is None:
            fd, self.config_path = tempfile.mkstemp(prefix="bungate-test-", suffix=".yaml")
            os.close(fd)
        with open(self.config_path, "w") as f:
            yaml.safe_dump(config, f)
        return self.config_path

    def start(self, timeout: float = 30.0) -> defer.Deferred[GatewayProcess]:
        """Start and wait until the master listens and every initial worker is ready."""
        argv = [self.python, "-m", "twisted", *self.twist_args, "bungate"]
        if self.config is not None:
            argv += ["--config", self.write_config(self.config)]
        argv += self.args
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.transport = self.reactor.spawnProcess(_Collector(self), self.python, argv, env=env)
        listening = self.wait_for(r"listening on [^ ]+:(\d+)", timeout=timeout)

        def got_port(m: re.Match[str]) -> Any:
            self.port = int(m.group(1))
            return self.wait_for(r"Fleet ready|Gateway listening", timeout=timeout)

        ready: defer.Deferred[Any] = listening.addCallback(got_port)
        return ready.addCallback(lambda _: self)

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        return f"http://127.0.0.1:{self.port}"

    def _line(self, line: str) -> None:
        self.lines.append(line)
        index = len(self.lines) - 1
        for item in list(self._waiters):
            pattern, start, d = item
            if index >= start:
                m = pattern.search(line)
                if m:
                    self._waiters.remove(item)
                    d.callback(m)

    def mark(self) -> int:
        """The current end of the output: pass to :meth:`wait_for` as ``since``."""
        return len(self.lines)

    def wait_for(
        self, pattern: str, timeout: float = 20.0, since: int = 0
    ) -> defer.Deferred[re.Match[str]]:
        """Fire with the first output line (from line ``since`` on) matching ``pattern``."""
        regex = re.compile(pattern)
        for line in self.lines[since:]:
            m = regex.search(line)
            if m:
                return defer.succeed(m)
        d: defer.Deferred[re.Match[str]] = defer.Deferred()
        item = (regex, since, d)
        self._waiters.append(item)

        def timed_out(failure: Any) -> Any:
            if item in self._waiters:
                self._waiters.remove(item)
            if failure.check(defer.TimeoutError, defer.CancelledError):
                tail = "\n".join(self.lines[-40:])
                raise AssertionError(
                    f"no line matching {pattern!r} within {timeout}s; output tail:\n{tail}"
                )
            return failure

        d.addTimeout(timeout, self.reactor)
        d.addErrback(timed_out)
        return d

    def count(self, pattern: str, since: int = 0) -> int:
        """How many output lines (from ``since`` on) match ``pattern``."""
        regex = re.compile(pattern)
        return sum(1 for line in self.lines[since:] if regex.search(line))

    def signal(self, sig: int) -> None:
        """Send a signal to the master."""
        assert self.pid is not None
        os.kill(self.pid, sig)

    def _ended(self) -> None:
        self._end.fire(None)

    def wait_exit(self, timeout: float = 40.0) -> defer.Deferred[Optional[int]]:
        """Fire with the master's exit code once it has exited."""
        d = self._end.wait()
        d.addTimeout(timeout, self.reactor)
        return d.addCallback(lambda _: self.exit_code)

    def workers(self) -> dict[int, int]:
        """The master's live worker processes: ``{worker_id: pid}`` (from /proc)."""
        assert self.pid is not None
        return find_workers(self.pid)

    def stop(self, timeout: float = 40.0) -> defer.Deferred[Any]:
        """SIGTERM the master and wait for it; SIGKILL it (and its workers) on timeout."""
        if self._end.fired:
            return defer.succeed(None)
        workers = list(self.workers().values()) if self.pid else []
        try:
            self.signal(signal.SIGTERM)
        except (ProcessLookupError, AssertionError):
            return defer.succeed(None)
        d = self.wait_exit(timeout)

        def force(f: Any) -> None:
            for pid in [self.pid, *workers]:
                try:
                    os.kill(pid, signal.SIGKILL)  # type: ignore[arg-type]
                except (ProcessLookupError, TypeError):
                    pass
            tail = "\n".join(self.lines[-40:])
            raise AssertionError(
                f"the gateway did not stop on SIGTERM within {timeout}s; output tail:\n{tail}"
            ) from f.value

        return d.addErrback(force)

    def cleanup(self) -> None:
        """Remove the temporary config file."""
        if self.config_path and os.path.exists(self.config_path):
            os.unlink(self.config_path)


def find_workers(master_pid: int) -> dict[int, int]:
    """
    ``{worker_id: pid}`` for the live children of ``master_pid`` (Linux /proc).

    Workers are recognised by their process title, ``bungate worker <id>``: the built-in
    worker carries it as its last argument, and setproctitle sets it on CPython (reusing
    the environment's memory, so /proc/PID/environ is no help there). A worker started
    from a user's script on PyPy has neither (setproctitle is a no-op on PyPy), but its
    environment is intact: ``CLUSTER_WORKER=true`` and ``CLUSTER_WORKER_ID=<id>``.
    """
    found: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            if int(fields[1]) != master_pid or fields[0] == b"Z":
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                title = f.read().replace(b"\0", b" ").strip()
        except (OSError, ValueError, IndexError):
            continue
        m = re.search(rb"bungate worker (\d+)$", title)
        if m:
            found[int(m.group(1))] = int(entry)
            continue
        wid = _worker_id_from_environ(int(entry))
        if wid is not None:
            found[wid] = int(entry)
    return found


def _worker_id_from_environ(pid: int) -> Optional[int]:
    """The ``CLUSTER_WORKER_ID`` of a worker whose environment is still readable."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(item.partition(b"=")[::2] for item in f.read().split(b"\0") if item)
    except OSError:
        return None
    wid = env.get(b"CLUSTER_WORKER_ID", b"")
    if env.get(b"CLUSTER_WORKER") == b"true" and wid.isdigit():
        return int(wid)
    return None
