"""
Starting a worker process: its command line, environment and descriptors, the
``ProcessProtocol`` that watches it, and the master's end of its control channel.

:class:`Spawner` is the fleet's ``spawn`` callable: given a slot, it starts the slot's
next process with ``reactor.spawnProcess`` and returns its transport. What the process
is told (descriptors, environment) is a :class:`~bungate.wire.WorkerLaunch`.

Besides the listeners, every worker gets two tables shared with its peers: the accept
table (:class:`AcceptSlots`, a slot per live process) and the rate-limit table
(:class:`SharedLimits`, the GCRA state of ``rate_limit.backend: local``). The spawner
makes each at its first spawn and keeps it for the master's whole life, so a respawned
worker (after a crash, ``kill -9`` included) and every worker of a roll or a reload see
the same table: a budget is never reset nor doubled by a worker's turnover.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from typing import IO, Any, Callable, Optional

from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from bungate.accept_table import AcceptTable
from bungate.limit_table import LimitTable, LimitTableError
from bungate.master.listeners import Listeners
from bungate.master.slot import WorkerSlot
from bungate.ops.logging import write_line
from bungate.wire import (
    CONFIG,
    CONFIG_REQUEST,
    CONTROL_FD,
    DRAINING,
    HEARTBEAT,
    READY,
    ControlChannel,
    WorkerLaunch,
)

__all__ = [
    "PYPY_GC_NURSERY",
    "AcceptSlots",
    "SharedLimits",
    "Spawner",
    "WorkerOutput",
    "WorkerProtocol",
]

log = Logger(namespace="bungate.master")

#: The nursery PyPy workers get unless ``PYPY_GC_NURSERY`` is set (see ``environment``).
PYPY_GC_NURSERY = "8MB"


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


class WorkerOutput:
    """
    Where the lines a worker writes go: the master's log.

    A worker's own log lines (JSON, or text naming ``[worker N]``) are written through as
    they are; anything else (a traceback printed before logging started, a stray print)
    is logged by the master tagged with the worker's id, stderr as a warning.

    :param log: the master's logger.
    :param output: where pass-through lines are written (default: stdout).
    """

    def __init__(self, log: Logger, output: Optional[IO[str]] = None) -> None:
        self.log = log
        self.output = output

    def __call__(self, worker_id: int, fd: int, line: bytes) -> None:
        """One line from ``worker_id``'s stdout (``fd`` 1) or stderr (2)."""
        head = line[:96]
        text = line.decode("utf-8", "replace")
        if head.startswith(b"{") or b"[worker " in head:
            write_line(text, self.output)
        elif fd == 2:
            self.log.warn("[worker {worker_id}] {line}", worker_id=worker_id, line=text)
        else:
            self.log.info("[worker {worker_id}] {line}", worker_id=worker_id, line=text)


class AcceptSlots:
    """The shared accept table (made at the first spawn) and which process holds which slot."""

    def __init__(self) -> None:
        self.table: Optional[AcceptTable] = None
        self._backing: Optional[IO[bytes]] = None
        self._slots: dict[int, int] = {}  # worker id -> table slot of its live process

    def claim(self, worker_id: int) -> Optional[int]:
        """A table slot for a new process of ``worker_id`` (its previous one is gone)."""
        self.release(worker_id)
        if self.table is None:
            self.table, self._backing = AcceptTable.create()
        slot = self.table.claim(worker_id)
        if slot is not None:
            self._slots[worker_id] = slot
        return slot

    def release(self, worker_id: int) -> None:
        """The process of ``worker_id`` is gone."""
        slot = self._slots.pop(worker_id, None)
        if slot is not None and self.table is not None:
            self.table.release(slot)

    def fileno(self) -> int:
        """The table's descriptor (after the first :meth:`claim`)."""
        assert self._backing is not None
        return self._backing.fileno()

    def workers(self) -> list[dict[str, int]]:
        """What the table says of every worker process (see :meth:`AcceptTable.workers`)."""
        return self.table.workers() if self.table is not None else []

    def ids(self) -> list[int]:
        """The workers that hold a slot, sorted."""
        return sorted(self._slots)

    def close(self) -> None:
        """Unmap and close the table."""
        if self.table is not None and self._backing is not None:
            self.table.close()
            self._backing.close()
        self.table = self._backing = None
        self._slots.clear()


class SharedLimits:
    """
    The fleet's rate-limit table (:class:`~bungate.limit_table.LimitTable`), made at the
    first spawn and passed to every worker for the rest of the master's life.

    It is made whatever the config says: the config a worker serves can change (a reload
    adds a ``backend: local`` limit, a worker started from the user's script builds its
    own config, which the master never sees), ``backend: redis`` falls back on it when
    Redis is down (``on_backend_error: allow``), and it costs one descriptor and a sparse
    1 MiB file whose pages exist only once written. A master that never spawns makes none.

    If the table cannot be made (no room for a temporary file), workers are started
    without it (their limits are then each their own, said in the log) and the next spawn
    tries again.
    """

    def __init__(self) -> None:
        #: The master's mapping of the table (for a metric such as ``used_slots``), or
        #: ``None`` before the first spawn.
        self.table: Optional[LimitTable] = None
        self._backing: Optional[IO[bytes]] = None

    def fileno(self) -> Optional[int]:
        """
        The table's descriptor, made at the first call.

        :returns: the master's descriptor of the table's file, or ``None`` if it could not
            be made.
        """
        if self._backing is None:
            try:
                self.table, self._backing = LimitTable.create()
            except (OSError, LimitTableError) as e:
                log.error(
                    "Cannot make the shared rate-limit table ({error}): workers start "
                    "without it, and each applies rate_limit.backend: local on its own",
                    error=str(e),
                )
                return None
        return self._backing.fileno()

    def close(self) -> None:
        """Unmap and close the table (a later spawn would make a new one)."""
        if self.table is not None and self._backing is not None:
            self.table.close()
            self._backing.close()
        self.table = self._backing = None


class Spawner:
    """
    Starts worker processes for the fleet's slots.

    :param reactor: ``spawnProcess`` and ``adoptStreamConnection``.
    :param listeners: the master's bound sockets, passed to every worker.
    :param python: the workers' interpreter.
    :param worker_script: a script every worker runs, or ``None`` for the built-in worker.
    :param script_args: the script's arguments.
    :param allowed_env: when not ``None``, the only variables of the master's environment
        a worker gets (besides ``BUNGATE_*`` and ``PROMETHEUS_MULTIPROC_DIR``).
    :param extra_env: variables every worker gets.
    :param on_line: ``on_line(slot, fd, line)`` for each line a worker writes.
    """

    def __init__(
        self,
        reactor: Any,
        listeners: Listeners,
        *,
        python: str,
        worker_script: Optional[str],
        script_args: list[str],
        allowed_env: Optional[tuple[str, ...]],
        extra_env: Mapping[str, str],
        on_line: Callable[[WorkerSlot, int, bytes], None],
    ) -> None:
        self.reactor = reactor
        self.listeners = listeners
        self.python = python
        self.worker_script = worker_script
        self.script_args = script_args
        self.allowed_env = allowed_env
        self.extra_env = dict(extra_env)
        self.on_line = on_line
        self.accept = AcceptSlots()
        #: the rate-limit table every worker decides on (made at the first spawn).
        self.limits = SharedLimits()
        #: what the next worker is started with: a config as JSON (the accepted one, or the
        #: one a reload tries) ...
        self.config_json: Optional[str] = None
        #: ... which operator's file each of its certificate copies stands for ...
        self.names: Mapping[str, str] = {}
        #: ... and the generation of those copies.
        self.generation = 0
        #: the accepted config as JSON: what a worker asking for its config (SIGHUP) gets.
        self.accepted_json: Optional[str] = None
        #: called with the slot id just before its process is spawned.
        self.on_booting: Callable[[int, int], None] = lambda slot_id, generation: None

    def environment(self, launch: WorkerLaunch) -> dict[str, str]:
        """The environment of a worker started with ``launch``."""
        return launch.to_env(self.base_environment())

    def base_environment(self) -> dict[str, str]:
        """What every worker's environment starts from (a config check's too)."""
        allowed = self.allowed_env
        if allowed is None:
            env = dict(os.environ)
        else:
            env = {k: v for k, v in os.environ.items() if k in allowed}
            for k, v in os.environ.items():
                if k.startswith(("BUNGATE_", "PROMETHEUS_MULTIPROC_DIR")):
                    env[k] = v
        env.update(self.extra_env)
        # PyPy's GC sizes its nursery from the L2 cache: 1 MB on a typical VM core. A proxy
        # allocates fast, and such a small nursery promotes much of it to the old
        # generation: bench/run measured a PyPy worker at 8 MB 40 % faster, at the same RSS.
        # The operator's own value wins; CPython ignores the variable.
        env.setdefault("PYPY_GC_NURSERY", PYPY_GC_NURSERY)
        return env

    def launch_for(self, slot: WorkerSlot) -> tuple[WorkerLaunch, dict[int, Any]]:
        """What the next process of ``slot`` is started with, and its ``childFDs``."""
        extra = self.listeners.extra()
        table_slot = self.accept.claim(slot.id)
        fds, table_fd = WorkerLaunch.layout(extra, with_table=table_slot is not None)
        child_fds: dict[int, Any] = {0: "w", 1: "r", 2: "r"}
        for name, fd in fds.items():
            child_fds[fd] = self.listeners.sockets[name].fileno()
        if table_fd is not None:
            child_fds[table_fd] = self.accept.fileno()
        limits = self.limits.fileno()
        limits_fd: Optional[int] = None
        if limits is not None:
            limits_fd = WorkerLaunch.limit_table_fd(extra, with_table=table_fd is not None)
            child_fds[limits_fd] = limits
        launch = WorkerLaunch(
            worker_id=slot.id,
            master_pid=os.getpid(),
            listeners=fds,
            config_json=self.config_json,
            tls_copies=dict(self.names),
            accept_table=None if table_fd is None else (table_fd, table_slot or 0),
            limit_table=limits_fd,
        )
        return launch, child_fds

    def __call__(self, slot: WorkerSlot) -> Any:
        """Start the next process of ``slot``; returns its process transport."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            launch, child_fds = self.launch_for(slot)
        except BaseException:
            ours.close()
            theirs.close()
            raise
        child_fds[CONTROL_FD] = theirs.fileno()
        if self.worker_script is not None:
            args = [self.python, self.worker_script, *self.script_args]
        else:
            # The title is also an argument, so `pgrep -f "bungate worker"` finds workers
            # where setproctitle cannot rewrite the command line (PyPy).
            args = [self.python, "-m", "bungate.worker", f"bungate worker {slot.id}"]
        protocol = WorkerProtocol(slot, self.on_line)
        self.on_booting(slot.id, self.generation)
        try:
            transport = self.reactor.spawnProcess(
                protocol, self.python, args, env=self.environment(launch), childFDs=child_fds
            )
        except BaseException:
            self.accept.release(slot.id)
            ours.close()
            raise
        finally:
            theirs.close()
        control = self._control_channel(slot)
        factory = Factory()
        factory.buildProtocol = lambda addr: control  # type: ignore[method-assign]
        self.reactor.adoptStreamConnection(ours.fileno(), socket.AF_UNIX, factory)
        ours.close()
        slot.control = control
        protocol.on_exit = control.close
        return transport

    def _control_channel(self, slot: WorkerSlot) -> ControlChannel:
        """The master's end of one worker's control channel, feeding its slot."""

        def on_message(message: dict[str, Any]) -> None:
            kind = message["t"]
            if kind == READY:
                slot.process_ready()
            elif kind in (HEARTBEAT, DRAINING):
                slot.heartbeat()
            elif kind == CONFIG_REQUEST:
                control.send(CONFIG, config=self.accepted_json)
            else:
                log.warn(
                    "Worker {worker_id} sent a control message of unknown kind {kind!r}",
                    worker_id=slot.id,
                    kind=kind,
                )

        control = ControlChannel(on_message)
        return control
