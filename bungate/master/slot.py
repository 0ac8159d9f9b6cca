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

The machine is the one source of a slot's state: :attr:`WorkerSlot.status` asks it, and
the state names are the :class:`SlotState` members, declared here once. The rest of the
master asks the slot's predicates (:attr:`~WorkerSlot.live`, :attr:`~WorkerSlot.alive`,
:attr:`~WorkerSlot.serving`) instead of spelling states.
"""

from __future__ import annotations

import enum
import signal as _signal
from collections.abc import Iterable
from typing import Any, Callable, Optional

from automat import MethodicalMachine
from twisted.internet import defer, error
from twisted.logger import Logger

from bungate.config import ClusterConfig
from bungate.core.policy import RestartPolicy
from bungate.master.exits import ExitInfo, signal_number

__all__ = ["ALIVE", "FINAL", "LIVE", "SlotState", "WorkerSlot"]


class SlotState(str, enum.Enum):
    """The states of a slot's machine (a ``str``, so it compares and prints as its name)."""

    IDLE = "idle"
    STARTING = "starting"
    RUNNING = "running"
    RESPAWNING = "respawning"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"

    def __str__(self) -> str:
        return self.value


#: States in which a slot counts towards the fleet's size (it has or will get a process).
LIVE = frozenset({SlotState.STARTING, SlotState.RUNNING, SlotState.RESPAWNING})
#: States in which a process of the slot may be running.
ALIVE = frozenset({SlotState.STARTING, SlotState.RUNNING, SlotState.STOPPING})
#: States a slot never leaves.
FINAL = frozenset({SlotState.STOPPED, SlotState.FAILED})

log = Logger(namespace="bungate.cluster")

Emit = Callable[..., None]


def _answer(machine: MethodicalMachine, state: SlotState) -> Any:
    """The output that names ``state`` (what :meth:`WorkerSlot._query` collects)."""

    def answer(self) -> SlotState:  # type: ignore[no-untyped-def]
        return state

    answer.__name__ = f"_is_{state.value}"
    return machine.output()(answer)


def _only(results: Iterable[Any]) -> Any:
    """The collector of :meth:`WorkerSlot._query`: its one output's value."""
    (value,) = results
    return value


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
        self._reported_state = SlotState.IDLE
        #: the master's end of the current process's control channel (set by the spawner).
        self.control: Any = None
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
    def kill_reason(self) -> Optional[str]:
        """Why the current process was sent SIGKILL (``hung``, ``stop-timeout``, ...), if it was."""
        return self._kill_reason

    @property
    def status(self) -> SlotState:
        """The state the slot's machine is in."""
        state: SlotState = self._query()
        return state

    @property
    def live(self) -> bool:
        """Whether the slot counts towards the fleet's size (starting, running, respawning)."""
        return self.status in LIVE

    @property
    def alive(self) -> bool:
        """Whether a process of this slot may be running."""
        return self.status in ALIVE

    @property
    def serving(self) -> bool:
        """Whether the slot's worker reported READY and was not asked to stop."""
        return self.status is SlotState.RUNNING

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
        status = self.status
        if status is SlotState.RUNNING:
            return defer.succeed(True)
        if status in FINAL:
            return defer.succeed(False)
        d: defer.Deferred[bool] = defer.Deferred()
        self._ready_waiters.append(d)
        return d

    def when_ended(self) -> defer.Deferred[str]:
        """Fires with the final status (``stopped`` or ``failed``)."""
        status = self.status
        if status in FINAL:
            return defer.succeed(status.value)
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
        if self.status is SlotState.STARTING:
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
        if self._stop_requested or was is SlotState.STOPPING:
            info = ExitInfo(code, sig, "stopped")
            self.last_exit = info
            self._exited_stopped(info)
            return
        if self._kill_reason == "hung":
            kind = "hung"
        elif was is SlotState.STARTING:
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
        self._entered(SlotState.STARTING)
        self.transport = self.spawner(self)
        self.pid = getattr(self.transport, "pid", None)
        self.emit("worker-spawn", worker_id=self.id, pid=self.pid, restarts=self.restarts)
        self._arm(self.config.ready_timeout, self._ready_timeout)

    @_machine.output()
    def _became_ready(self) -> None:
        self._disarm()
        self.ready_at = self.clock.seconds()
        self._entered(SlotState.RUNNING)
        self.emit("worker-ready", worker_id=self.id, pid=self.pid)
        self._fire(self._ready_waiters, True)

    @_machine.output()
    def _schedule_respawn(self, info: ExitInfo, delay: float) -> None:
        self._disarm()
        self._entered(SlotState.RESPAWNING)
        self._report_exit(info)
        self.emit(
            "worker-respawn", worker_id=self.id, delay=delay, restarts=self.restarts, kind=info.kind
        )
        self._arm(delay, self._respawn_due)

    @_machine.output()
    def _give_up(self, info: ExitInfo, reason: str) -> None:
        self._disarm()
        self.failure_reason = reason
        self._entered(SlotState.FAILED)
        self._report_exit(info)
        self.emit("worker-failed", worker_id=self.id, reason=reason, restarts=self.restarts)
        self._fire(self._ready_waiters, False)
        self._fire(self._end_waiters, SlotState.FAILED.value)

    @_machine.output()
    def _terminate(self) -> None:
        self._stop_requested = True
        self._disarm()
        self._entered(SlotState.STOPPING)
        self.emit("worker-stopping", worker_id=self.id, pid=self.pid)
        self.signal(_signal.SIGTERM)
        # The worker drains for up to shutdown_timeout; give it a little longer to exit.
        self._arm(self.config.shutdown_timeout + 2.0, lambda: self.kill("stop-timeout"))

    @_machine.output()
    def _finish_stopped(self, info: ExitInfo) -> None:
        self._disarm()
        self._entered(SlotState.STOPPED)
        self._report_exit(info)
        self._fire(self._ready_waiters, False)
        self._fire(self._end_waiters, SlotState.STOPPED.value)

    @_machine.output()
    def _cancel_and_stop(self) -> None:
        self._stop_requested = True
        self._disarm()
        self._entered(SlotState.STOPPED)
        self._fire(self._ready_waiters, False)
        self._fire(self._end_waiters, SlotState.STOPPED.value)

    @_machine.output()
    def _noop(self) -> None:
        pass

    @_machine.input()
    def _query(self) -> SlotState:  # type: ignore[empty-body]
        "Which state is the machine in? (answered by the state, changes nothing)"

    _is_idle = _answer(_machine, SlotState.IDLE)
    _is_starting = _answer(_machine, SlotState.STARTING)
    _is_running = _answer(_machine, SlotState.RUNNING)
    _is_respawning = _answer(_machine, SlotState.RESPAWNING)
    _is_stopping = _answer(_machine, SlotState.STOPPING)
    _is_stopped = _answer(_machine, SlotState.STOPPED)
    _is_failed = _answer(_machine, SlotState.FAILED)

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

    for _state, _output in (
        (idle, _is_idle),
        (starting, _is_starting),
        (running, _is_running),
        (respawning, _is_respawning),
        (stopping, _is_stopping),
        (stopped, _is_stopped),
        (failed, _is_failed),
    ):
        _state.upon(_query, enter=_state, outputs=[_output], collector=_only)
    del _state, _output

    # --- helpers ----------------------------------------------------------------------

    def _entered(self, new: SlotState) -> None:
        # Called by an output, after the machine has moved: report the change once.
        old, self._reported_state = self._reported_state, new
        if old is not new:
            self.emit("worker-state", worker_id=self.id, old=old.value, new=new.value)

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
        if self.status is SlotState.STARTING:
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
