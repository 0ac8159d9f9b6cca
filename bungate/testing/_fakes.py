"""
In-memory fakes for testing the fleet without processes: a reactor that spawns fake
workers, and the workers, which the test drives (ready, heartbeat, exit).
"""

from __future__ import annotations

import json
import signal as _signal
from typing import Any, Optional

from twisted.internet import error
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from bungate.wire import WorkerLaunch

__all__ = ["FakeProcessReactor", "FakeWorker"]


class FakeWorker:
    """
    One worker process spawned by a :class:`FakeProcessReactor`.

    :ivar protocol: the master's ``ProcessProtocol`` for it.
    :ivar executable: what was run; :ivar args: its argument list; :ivar env: its
        environment; :ivar child_fds: its ``childFDs``.
    :ivar signals: the signals the master sent it, in order.
    :ivar exited: whether it has exited.
    """

    def __init__(
        self,
        reactor: FakeProcessReactor,
        protocol: Any,
        pid: int,
        executable: str,
        args: list[str],
        env: dict[str, str],
        child_fds: dict[int, Any],
    ) -> None:
        self.reactor = reactor
        self.protocol = protocol
        self.pid = pid
        self.executable = executable
        self.args = args
        self.env = env
        self.child_fds = child_fds
        self.signals: list[int] = []
        self.exited = False
        self.control: Any = None  # the master's end of its control channel
        self.control_transport: Optional[StringTransport] = None

    @property
    def launch(self) -> WorkerLaunch:
        """What the master started this worker with (read back from its environment)."""
        launch = WorkerLaunch.from_env(self.env)
        assert launch is not None, "not started as a worker"
        return launch

    # --- what the process does --------------------------------------------------------

    def send(self, kind: str, **fields: Any) -> None:
        """Send a control message to the master, as a worker would."""
        assert self.control is not None, "no control channel"
        fields["t"] = kind
        self.control.dataReceived(json.dumps(fields).encode() + b"\n")

    def ready(self) -> None:
        """Report READY (the worker listens)."""
        self.send("ready", pid=self.pid)

    def heartbeat(self) -> None:
        """Send one heartbeat."""
        self.send("heartbeat")

    def output(self, line: bytes, fd: int = 1) -> None:
        """Write a line to stdout (``fd`` 1) or stderr (2)."""
        self.protocol.childDataReceived(fd, line + b"\n")

    def exit(self, code: Optional[int] = 0, signal: Optional[int] = None) -> None:
        """Exit with ``code``, or die of ``signal``."""
        assert not self.exited, f"worker pid {self.pid} exited already"
        self.exited = True
        if signal is None and code == 0:
            reason = Failure(error.ProcessDone(0))
        else:
            reason = Failure(error.ProcessTerminated(code, signal))
        self.protocol.processExited(reason)
        self.protocol.processEnded(reason)

    def messages(self) -> list[dict[str, Any]]:
        """The control messages the master sent this worker so far."""
        if self.control_transport is None:
            return []
        lines = self.control_transport.value().split(b"\n")
        return [json.loads(line) for line in lines if line]

    # --- the process transport (what the master holds) ----------------------------------

    def signalProcess(self, sig: Any) -> None:
        """Record a signal; raise as Twisted does once the process has exited."""
        if self.exited:
            raise error.ProcessExitedAlready()
        number = sig if isinstance(sig, int) else getattr(_signal, f"SIG{sig}")
        self.signals.append(int(number))
        handler = self.reactor.on_signal
        if handler is not None:
            handler(self, int(number))

    def loseConnection(self) -> None:
        """Close the process's pipes (nothing to do here)."""


class FakeProcessReactor(Clock):
    """
    A :class:`~twisted.internet.task.Clock` that spawns :class:`FakeWorker` processes.

    :ivar workers: every worker spawned, in order.
    :ivar on_signal: if set, ``on_signal(worker, signum)`` runs when the master signals a
        worker (e.g. to make it exit on SIGTERM).
    """

    def __init__(self) -> None:
        super().__init__()
        self.workers: list[FakeWorker] = []
        self.on_signal: Any = None
        self._next_pid = 1000
        self._pending: Optional[FakeWorker] = None
        self.running = True

    def spawnProcess(
        self,
        processProtocol: Any,
        executable: str,
        args: Any = (),
        env: Optional[dict[str, str]] = None,
        path: Optional[str] = None,
        uid: Optional[int] = None,
        gid: Optional[int] = None,
        usePTY: bool = False,
        childFDs: Optional[dict[int, Any]] = None,
    ) -> FakeWorker:
        """Start a fake worker; its control channel is the next adopted connection."""
        self._next_pid += 1
        worker = FakeWorker(
            self,
            processProtocol,
            self._next_pid,
            executable,
            list(args),
            dict(env or {}),
            dict(childFDs or {}),
        )
        self.workers.append(worker)
        self._pending = worker
        processProtocol.makeConnection(worker)
        return worker

    def adoptStreamConnection(self, fileDescriptor: int, addressFamily: Any, factory: Any) -> None:
        """Connect the factory's protocol to an in-memory transport (a control channel)."""
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        worker, self._pending = self._pending, None
        if worker is not None:
            worker.control = protocol
            worker.control_transport = transport

    def callFromThread(self, f: Any, *args: Any, **kwargs: Any) -> None:
        """Run ``f`` at once (there are no threads here)."""
        f(*args, **kwargs)

    def live(self) -> list[FakeWorker]:
        """The workers that have not exited."""
        return [w for w in self.workers if not w.exited]
