"""
One worker slot's lifecycle, as an Automat state machine, and its ProcessProtocol.

A *slot* is a place in the fleet with a stable id; its worker process may be replaced
(respawned) many times, and the slot's :class:`~bungate.cluster.policy.RestartPolicy`
counts across those respawns. The machine, read top to bottom::

    idle ──start──▶ starting ──ready──▶ running
    starting/running ──exit, policy allows──▶ respawning ──(delay)──▶ starting
    starting/running ──exit, policy refuses──▶ failed
    starting/running ──stop──▶ stopping ──exit──▶ stopped
    respawning/idle ──stop──▶ stopped          failed ──stop──▶ failed

Decisions (respawn or give up, and why) are taken outside the machine by
:meth:`WorkerSlot.process_exited`, which then feeds the matching input; the machine holds
only states, transitions and the side effects named in them. The spawner is injected, so
the machine runs under a fake clock and a fake process reactor in tests.
"""

from __future__ import annotations

import signal as _signal
from typing import Any, Callable, Optional

from automat import MethodicalMachine
from twisted.internet import defer, error
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from bungate.cluster.policy import RestartPolicy
from bungate.config import ClusterConfig

__all__ = ["ExitInfo", "WorkerProtocol", "WorkerSlot", "signal_number"]

log = Logger(namespace="bungate.cluster")

Emit = Callable[..., None]


def signal_number(sig: Any) -> int:
    """Accept ``15``, ``"TERM"``, ``"SIGTERM"`` or ``signal.SIGTERM``; return the number."""
    if isinstance(sig, int):
        return int(sig)
    name = str(sig).upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    try:
        return int(getattr(_signal, name))
    except AttributeError:
        raise ValueError(f"unknown signal {sig!r}") from None


class ExitInfo:
    """
    How a worker process ended.

    :ivar kind: ``clean`` (exit 0, not asked to), ``crash`` (non-zero exit or a
        signal), ``boot-failure`` (exited before it reported READY), ``hung`` (killed
        after missing heartbeats), ``stopped`` (exited after we asked it to stop).
    """

    __slots__ = ("code", "kind", "signal")

    def __init__(self, code: Optional[int], signal: Optional[int], kind: str) -> None:
        self.code = code
        self.signal = signal
        self.kind = kind

    def as_dict(self) -> dict[str, Any]:
        """A JSON-friendly view."""
        return {"code": self.code, "signal": self.signal, "kind": self.kind}

    def describe(self) -> str:
        """``exit code 3`` or ``signal SIGKILL``."""
        if self.signal is not None:
            try:
                return f"signal {_signal.Signals(self.signal).name}"
            except ValueError:
                return f"signal {self.signal}"
        return f"exit code {self.code}"


class WorkerSlot:
    """
    A fleet slot and the state machine of its current worker process.

    :param worker_id: the slot's id (``CLUSTER_WORKER_ID``), kept across respawns.
    :param config: the cluster settings (timeouts, restart flags).
    :param clock: the reactor or a ``Clock``.
    :param spawner: ``spawner(slot)`` starts a process for the slot and returns its
        transport (with ``pid`` and ``signalProcess``); it must arrange for
        :meth:`process_exited` and :meth:`process_ready` to be called.
    :param emit: ``emit(event, **fields)`` reports lifecycle events to the manager.
    :param policy: the restart policy (built from ``config`` when omitted).
    """

    _machine = MethodicalMachine()

    def __init__(
        self,
        worker_id: int,
        config: ClusterConfig,
        clock: Any,
        spawner: Callable[[WorkerSlot], Any],
        emit: Emit,
        policy: Optional[RestartPolicy] = None,
    ) -> None:
        self.id = worker_id
        self.config = config
        self.clock = clock
        self.spawner = spawner
        self.emit = emit
        self.policy = policy or RestartPolicy(
            max_restarts=config.max_restarts,
            threshold=config.respawn_threshold,
            window=config.respawn_threshold_time,
            base_delay=config.restart_delay,
            max_delay=config.max_restart_delay,
        )
        self.status = "idle"
        self.transport: Any = None
        self.pid: Optional[int] = None
        self.started_at: Optional[float] = None
        self.ready_at: Optional[float] = None
        self.last_seen = 0.0
        self.last_exit: Optional[ExitInfo] = None
        self.failure_reason = ""
        self._stop_requested = False
        self._kill_reason: Optional[str] = None
        self._timer: Any = None
        self._ready_waiters: list[defer.Deferred[bool]] = []
        self._end_waiters: list[defer.Deferred[str]] = []

    # --- public view ------------------------------------------------------------------

    @property
    def restarts(self) -> int:
        """How many times this slot's worker has been respawned."""
        return self.policy.restarts

    @property
    def alive(self) -> bool:
        """Whether a process of this slot may be running."""
        return self.status in ("starting", "running", "stopping")

    def info(self) -> dict[str, Any]:
        """The spec's worker info: id, pid, restarts, status, started_at (+ last exit)."""
        return {
            "id": self.id,
            "pid": self.pid,
            "restarts": self.restarts,
            "status": self.status,
            "started_at": self.started_at,
            "last_exit": self.last_exit.as_dict() if self.last_exit else None,
        }

    def when_ready(self) -> defer.Deferred[bool]:
        """Fires ``True`` once running, ``False`` if it stops or fails first."""
        if self.status == "running":
            return defer.succeed(True)
        if self.status in ("stopped", "failed"):
            return defer.succeed(False)
        d: defer.Deferred[bool] = defer.Deferred()
        self._ready_waiters.append(d)
        return d

    def when_ended(self) -> defer.Deferred[str]:
        """Fires with the final status (``stopped`` or ``failed``)."""
        if self.status in ("stopped", "failed"):
            return defer.succeed(self.status)
        d: defer.Deferred[str] = defer.Deferred()
        self._end_waiters.append(d)
        return d

    def signal(self, sig: Any) -> bool:
        """Send a signal to the current process; ``False`` if there is none."""
        if self.transport is None or not self.alive:
            return False
        try:
            self.transport.signalProcess(signal_number(sig))
        except error.ProcessExitedAlready:
            return False
        return True

    # --- events from the process and control channel ----------------------------------

    def process_ready(self) -> None:
        """The worker reported READY: it is listening."""
        self.last_seen = self.clock.seconds()
        if self.status == "starting":
            self._ready()

    def heartbeat(self) -> None:
        """The worker is alive."""
        self.last_seen = self.clock.seconds()

    def kill(self, reason: str) -> None:
        """SIGKILL the current process (hung, or too slow to boot or stop)."""
        if self._kill_reason is None:
            self._kill_reason = reason
        self.signal(_signal.SIGKILL)

    def process_exited(self, code: Optional[int], sig: Optional[int]) -> None:
        """The process is gone: decide what happens to the slot, then move the machine."""
        was = self.status
        if self._stop_requested or was == "stopping":
            info = ExitInfo(code, sig, "stopped")
            self.last_exit = info
            self._exited_stopped(info)
            return
        if self._kill_reason == "hung":
            kind = "hung"
        elif was == "starting":
            kind = "boot-failure"
        elif code == 0 and sig is None:
            kind = "clean"
        else:
            kind = "crash"
        info = ExitInfo(code, sig, kind)
        self.last_exit = info
        now = self.clock.seconds()
        uptime = now - self.started_at if self.started_at is not None else None
        if not self.config.restart_workers:
            self._exited_fail(info, "restart_workers is false")
            return
        decision = self.policy.decide(now, uptime)
        if decision.respawn:
            self._exited_respawn(info, decision.delay)
        else:
            self._exited_fail(info, decision.reason)

    # --- the machine ------------------------------------------------------------------

    @_machine.state(initial=True)
    def idle(self) -> None:
        "Created, not started."

    @_machine.state()
    def starting(self) -> None:
        "A process is running but has not reported READY."

    @_machine.state()
    def running(self) -> None:
        "Listening and serving."

    @_machine.state()
    def respawning(self) -> None:
        "Exited unexpectedly; a replacement is scheduled."

    @_machine.state()
    def stopping(self) -> None:
        "Asked to drain and exit."

    @_machine.state()
    def stopped(self) -> None:
        "Gone on purpose. Final."

    @_machine.state()
    def failed(self) -> None:
        "Gone and not respawned: the policy gave up. Final."

    @_machine.input()
    def start(self) -> None:
        "Start the slot's first process."

    @_machine.input()
    def _ready(self) -> None:
        "The process reported READY."

    @_machine.input()
    def _exited_respawn(self, info: ExitInfo, delay: float) -> None:
        "Exited unexpectedly; the policy allows a respawn after ``delay``."

    @_machine.input()
    def _exited_fail(self, info: ExitInfo, reason: str) -> None:
        "Exited unexpectedly; the policy refuses a respawn."

    @_machine.input()
    def _exited_stopped(self, info: ExitInfo) -> None:
        "Exited after being asked to stop."

    @_machine.input()
    def _respawn_due(self) -> None:
        "The backoff delay has passed."

    @_machine.input()
    def stop(self) -> None:
        "Drain and stop; fire :meth:`when_ended` when gone."

    @_machine.output()
    def _spawn(self) -> None:
        self._kill_reason = None
        now = self.clock.seconds()
        self.started_at = now
        self.ready_at = None
        self.last_seen = now
        self._set("starting")
        self.transport = self.spawner(self)
        self.pid = getattr(self.transport, "pid", None)
        self.emit("worker-spawn", worker_id=self.id, pid=self.pid, restarts=self.restarts)
        self._arm(self.config.ready_timeout, self._ready_timeout)

    @_machine.output()
    def _became_ready(self) -> None:
        self._disarm()
        self.ready_at = self.clock.seconds()
        self._set("running")
        self.emit("worker-ready", worker_id=self.id, pid=self.pid)
        self._fire(self._ready_waiters, True)

    @_machine.output()
    def _schedule_respawn(self, info: ExitInfo, delay: float) -> None:
        self._disarm()
        self._set("respawning")
        self._report_exit(info)
        self.emit(
            "worker-respawn", worker_id=self.id, delay=delay, restarts=self.restarts, kind=info.kind
        )
        self._arm(delay, self._respawn_due)

    @_machine.output()
    def _give_up(self, info: ExitInfo, reason: str) -> None:
        self._disarm()
        self.failure_reason = reason
        self._set("failed")
        self._report_exit(info)
        self.emit("worker-failed", worker_id=self.id, reason=reason, restarts=self.restarts)
        self._fire(self._ready_waiters, False)
        self._fire(self._end_waiters, "failed")

    @_machine.output()
    def _terminate(self) -> None:
        self._stop_requested = True
        self._disarm()
        self._set("stopping")
        self.emit("worker-stopping", worker_id=self.id, pid=self.pid)
        self.signal(_signal.SIGTERM)
        # The worker drains for up to shutdown_timeout; give it a little longer to exit.
        self._arm(self.config.shutdown_timeout + 2.0, lambda: self.kill("stop-timeout"))

    @_machine.output()
    def _finish_stopped(self, info: ExitInfo) -> None:
        self._disarm()
        self._set("stopped")
        self._report_exit(info)
        self._fire(self._ready_waiters, False)
        self._fire(self._end_waiters, "stopped")

    @_machine.output()
    def _cancel_and_stop(self) -> None:
        self._stop_requested = True
        self._disarm()
        self._set("stopped")
        self._fire(self._ready_waiters, False)
        self._fire(self._end_waiters, "stopped")

    @_machine.output()
    def _noop(self) -> None:
        pass

    idle.upon(start, enter=starting, outputs=[_spawn])
    idle.upon(stop, enter=stopped, outputs=[_cancel_and_stop])
    starting.upon(_ready, enter=running, outputs=[_became_ready])
    starting.upon(_exited_respawn, enter=respawning, outputs=[_schedule_respawn])
    starting.upon(_exited_fail, enter=failed, outputs=[_give_up])
    starting.upon(stop, enter=stopping, outputs=[_terminate])
    running.upon(_ready, enter=running, outputs=[_noop])
    running.upon(_exited_respawn, enter=respawning, outputs=[_schedule_respawn])
    running.upon(_exited_fail, enter=failed, outputs=[_give_up])
    running.upon(stop, enter=stopping, outputs=[_terminate])
    respawning.upon(_respawn_due, enter=starting, outputs=[_spawn])
    respawning.upon(stop, enter=stopped, outputs=[_cancel_and_stop])
    stopping.upon(_exited_stopped, enter=stopped, outputs=[_finish_stopped])
    stopping.upon(_ready, enter=stopping, outputs=[_noop])
    stopping.upon(stop, enter=stopping, outputs=[_noop])
    stopped.upon(stop, enter=stopped, outputs=[_noop])
    failed.upon(stop, enter=failed, outputs=[_noop])

    # --- helpers ----------------------------------------------------------------------

    def _set(self, status: str) -> None:
        old, self.status = self.status, status
        if old != status:
            self.emit("worker-state", worker_id=self.id, old=old, new=status)

    def _report_exit(self, info: ExitInfo) -> None:
        self.transport = None
        self.emit(
            "worker-exit",
            worker_id=self.id,
            pid=self.pid,
            code=info.code,
            signal=info.signal,
            kind=info.kind,
            description=info.describe(),
        )

    def _ready_timeout(self) -> None:
        self._timer = None
        if self.status == "starting":
            log.error(
                "Worker {worker_id} (pid {pid}) did not report ready within {timeout}s; killing it",
                worker_id=self.id,
                pid=self.pid,
                timeout=self.config.ready_timeout,
            )
            self.kill("ready-timeout")

    def _arm(self, delay: float, fn: Callable[[], None]) -> None:
        self._disarm()
        self._timer = self.clock.callLater(delay, self._fire_timer, fn)

    def _fire_timer(self, fn: Callable[[], None]) -> None:
        self._timer = None
        fn()

    def _disarm(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    @staticmethod
    def _fire(waiters: list[Any], value: Any) -> None:
        pending = list(waiters)
        waiters.clear()
        for d in pending:
            d.callback(value)


class WorkerProtocol(ProcessProtocol):
    """
    The master's side of one worker process: output lines and the exit.

    Driven from ``processExited`` (not ``processEnded``, which can come much later if a
    grandchild holds a pipe). The pid is kept from ``connectionMade`` because
    ``transport.pid`` is already ``None`` by the time of ``processExited``.
    """

    def __init__(self, slot: WorkerSlot, on_line: Callable[[WorkerSlot, int, bytes], None]) -> None:
        self.slot = slot
        self.on_line = on_line
        self.pid: Optional[int] = None
        self._buffers: dict[int, bytes] = {}
        self.on_exit: Optional[Callable[[], None]] = None

    def connectionMade(self) -> None:
        """Keep the worker's pid while the transport still knows it."""
        self.pid = getattr(self.transport, "pid", None)

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        """Split the worker's output into lines and pass each complete one on."""
        buffered = self._buffers.get(childFD, b"") + data
        *lines, rest = buffered.split(b"\n")
        if len(rest) > 65536:  # a runaway line without newline: flush it anyway
            lines.append(rest)
            rest = b""
        self._buffers[childFD] = rest
        for line in lines:
            if line:
                self.on_line(self.slot, childFD, line)

    def processExited(self, reason: Failure) -> None:
        """Flush any unterminated output, then tell the slot the exit code or signal."""
        for fd, rest in self._buffers.items():
            if rest:
                self.on_line(self.slot, fd, rest)
        self._buffers.clear()
        value = reason.value
        code = getattr(value, "exitCode", None)
        sig = getattr(value, "signal", None)
        if self.on_exit is not None:
            self.on_exit()
        self.slot.process_exited(code, sig)
