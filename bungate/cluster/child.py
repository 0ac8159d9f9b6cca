"""
The worker side of the cluster: adopt the master's sockets, report, drain, exit.

A worker is started by the master with:

- fd 3: the main listening socket; further listeners named in ``BUNGATE_FDS``
  (``name=fd,name=fd``), e.g. the plain-HTTP redirect listener;
- fd 4: one end of a socketpair, the control channel: newline-delimited JSON.
  The worker sends ``ready`` once it listens, ``heartbeat`` every
  ``heartbeat_interval`` seconds and ``draining`` when it starts to drain; the master
  sends ``fleet`` summaries (for ``/health``).
- ``CLUSTER_WORKER=true`` and ``CLUSTER_WORKER_ID=<slot id>``.

SIGTERM or SIGINT make the worker drain (stop accepting, finish in-flight requests,
close keep-alive connections) and exit 0. If the master dies, the control channel hits
EOF (and on Linux ``PR_SET_PDEATHSIG`` delivers SIGTERM): the worker first points its
stdout/stderr at /dev/null, because the pipes to the dead master would raise
``BrokenPipeError`` on the next log line, then drains and exits.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from typing import Any, Callable, Optional

from twisted.internet import defer, task
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver

__all__ = [
    "CONTROL_FD",
    "LISTEN_FD",
    "ControlClient",
    "in_worker",
    "listener_fds",
    "main",
    "run_worker_reactor",
    "set_parent_death_signal",
    "silence_output",
    "worker_id",
]

log = Logger(namespace="bungate.worker")

LISTEN_FD = 3
CONTROL_FD = 4


def in_worker() -> bool:
    """Whether this process was started by a bungate master as a worker."""
    return os.environ.get("CLUSTER_WORKER") == "true"


def worker_id() -> Optional[str]:
    """This worker's slot id, or ``None`` outside a worker."""
    return os.environ.get("CLUSTER_WORKER_ID") if in_worker() else None


def listener_fds() -> dict[str, int]:
    """The inherited listening descriptors by name (``main`` is always fd 3)."""
    fds = {"main": LISTEN_FD}
    for item in os.environ.get("BUNGATE_FDS", "").split(","):
        name, sep, fd = item.partition("=")
        if sep and fd.isdigit():
            fds[name] = int(fd)
    return fds


def set_parent_death_signal(sig: int = signal.SIGTERM) -> bool:
    """
    Ask Linux to send ``sig`` to this process when its parent dies.

    :returns: ``False`` where unsupported (not Linux, no libc).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        return bool(libc.prctl(pr_set_pdeathsig, int(sig), 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def silence_output() -> None:
    """Point stdout and stderr at /dev/null (the master that read them is gone)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        return
    for fd in (1, 2):
        try:
            os.dup2(devnull, fd)
        except OSError:
            pass
    os.close(devnull)


class ControlClient(LineOnlyReceiver):
    """The worker's end of the control channel."""

    delimiter = b"\n"
    MAX_LENGTH = 1 << 20

    def __init__(
        self, on_message: Callable[[dict[str, Any]], None], on_lost: Callable[[], None]
    ) -> None:
        self.on_message = on_message
        self.on_lost = on_lost
        self.connected_ = False

    def connectionMade(self) -> None:
        """From now on :meth:`send` writes to the master."""
        self.connected_ = True

    def send(self, kind: str, **fields: Any) -> None:
        """Send one message to the master (dropped if the channel is gone)."""
        if self.connected_ and self.transport is not None:
            fields["t"] = kind
            self.sendLine(json.dumps(fields, separators=(",", ":")).encode())

    def lineReceived(self, line: bytes) -> None:
        """Pass on a JSON object from the master; log lines that are not JSON, skip them."""
        try:
            message = json.loads(line)
        except ValueError:
            log.warn("Ignoring a malformed control message: {line!r}", line=line[:200])
            return
        if isinstance(message, dict):
            self.on_message(message)

    def connectionLost(self, reason: Any = None) -> None:
        """Stop sending; if the channel was open, report that the master is gone."""
        was = self.connected_
        self.connected_ = False
        if was:
            self.on_lost()


class WorkerRuntime:
    """
    Wires a worker process to its master: control channel, heartbeats, drain on exit.

    :param reactor: the reactor.
    :param heartbeat_interval: seconds between heartbeats.
    :param drain: returns a Deferred that fires once the worker has drained.
    """

    def __init__(
        self,
        reactor: Any,
        heartbeat_interval: float,
        drain: Callable[[], defer.Deferred[None]],
    ) -> None:
        self.reactor = reactor
        self.heartbeat_interval = heartbeat_interval
        self.drain = drain
        self.fleet: dict[str, Any] = {}
        self.master_pid = os.getppid()
        self.control: Optional[ControlClient] = None
        self._heartbeat: Optional[task.LoopingCall] = None
        self._stopping = False

    def connect(self, fd: int = CONTROL_FD) -> None:
        """Adopt the control channel; a missing channel means no master is watching."""
        try:
            os.fstat(fd)
        except OSError:
            log.warn("No control channel on fd {fd}: running without a master", fd=fd)
            return
        control = ControlClient(self._message, self._master_gone)
        factory = Factory()
        factory.buildProtocol = lambda addr: control  # type: ignore[method-assign]
        self.reactor.adoptStreamConnection(fd, socket.AF_UNIX, factory)
        os.close(fd)
        self.control = control
        set_parent_death_signal(signal.SIGTERM)
        if os.getppid() != self.master_pid:  # the master died before prctl took effect
            self._master_gone()

    def ready(self) -> None:
        """Tell the master we listen, and start heartbeats."""
        if self.control is not None:
            self.control.send("ready", pid=os.getpid())
            self._heartbeat = task.LoopingCall(self._beat)
            self._heartbeat.clock = self.reactor
            self._heartbeat.start(self.heartbeat_interval, now=False)
        self.reactor.addSystemEventTrigger("before", "shutdown", self._before_shutdown)

    def _beat(self) -> None:
        if self.control is not None:
            self.control.send("heartbeat")

    def _message(self, message: dict[str, Any]) -> None:
        if message.get("t") == "fleet":
            self.fleet = {k: v for k, v in message.items() if k != "t"}

    def _master_gone(self) -> None:
        if self._stopping:
            return
        silence_output()
        self.reactor.callLater(0, self._stop_reactor)

    def _stop_reactor(self) -> None:
        if self.reactor.running:
            self.reactor.stop()

    def _before_shutdown(self) -> defer.Deferred[None]:
        self._stopping = True
        if self._heartbeat is not None and self._heartbeat.running:
            self._heartbeat.stop()
        if self.control is not None:
            self.control.send("draining")
        return self.drain()


def run_worker_reactor(reactor: Any) -> None:
    """
    Run a worker's reactor; SIGTERM and SIGINT start one drain, later ones are ignored.

    Ctrl-C signals the whole process group, so a worker gets SIGINT and then the master's
    SIGTERM while it already drains; Twisted's own handlers would call ``reactor.stop()``
    twice and log a critical ``ReactorNotRunning``. A worker spawns no processes, so it
    does without Twisted's SIGCHLD handling.
    """
    stopping = [False]

    def stop() -> None:
        if reactor.running:
            reactor.stop()

    def on_signal(signum: int, frame: Any) -> None:
        if stopping[0]:
            return
        stopping[0] = True
        log.info("Received {signal}, draining", signal=signal.Signals(signum).name)
        reactor.callFromThread(stop)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    reactor.run(installSignalHandlers=False)


def main(argv: Optional[list[str]] = None) -> None:
    """
    The built-in worker program (``python -m bungate.cluster``).

    The master passes the validated configuration as JSON in ``BUNGATE_CONFIG``.
    """
    from twisted.internet import reactor

    from bungate.config import ConfigError, parse_config
    from bungate.gateway import Gateway

    raw = os.environ.get("BUNGATE_CONFIG")
    if not raw:
        sys.stderr.write(
            "bungate worker: BUNGATE_CONFIG is not set (start workers from the master)\n"
        )
        raise SystemExit(2)
    try:
        config = parse_config(
            json.loads(raw), source=os.environ.get("BUNGATE_CONFIG_SOURCE", "<master>")
        )
    except (ValueError, ConfigError) as e:
        sys.stderr.write(f"bungate worker: bad configuration from the master: {e}\n")
        raise SystemExit(2) from None
    gateway = Gateway(config)
    d = gateway.listen()

    def failed(reason: Any) -> None:
        sys.stderr.write(f"bungate worker: cannot start: {reason.getErrorMessage()}\n")
        os._exit(3)

    d.addErrback(failed)
    run_worker_reactor(reactor)
