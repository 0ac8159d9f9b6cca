"""
The master role of a gateway process: title, fleet metrics, the fleet, the signals an
operator sends it, and the exit status it leaves.

| signal | what the master does |
|---|---|
| ``TERM``, ``INT`` | stop: close the listening sockets at once, drain every worker |
| a second ``TERM``/``INT``, or ``QUIT`` | stop at once: workers exit without draining |
| ``HUP`` | reload the config file (:meth:`ClusterManager.reload`) |
| ``USR2`` | rolling restart |
| ``USR1`` | reopen the log file, and tell every worker to |
| ``TTIN`` / ``TTOU`` | one worker more / fewer (never fewer than one) |

Handlers only schedule work on the reactor thread. Exit status: 0 after a graceful stop,
1 when a worker had to be killed to stop, 3 when every slot failed.
"""

from __future__ import annotations

import signal
from collections.abc import Mapping
from typing import IO, Any, Callable, Optional

from twisted.internet import defer
from twisted.logger import Logger

from bungate.config import GatewayConfig
from bungate.master.certificates import Validate
from bungate.master.check import ConfigCheck
from bungate.master.fleet import ClusterManager
from bungate.master.slot import SlotState
from bungate.ops.metrics import MasterMetrics, multiprocess_dir, prepare_multiprocess_dir

__all__ = ["REPORTED_STATES", "MasterService", "SignalHandlers"]

#: The slot states ``bungate_workers`` always reports (idle counts as starting; a stopped
#: slot is gone from the fleet).
REPORTED_STATES = tuple(
    s.value for s in SlotState if s not in (SlotState.IDLE, SlotState.STOPPED)
)

log = Logger(namespace="bungate.master")


class SignalHandlers:
    """
    The master's operator signals, each running an action on the reactor thread.

    :param reactor: runs the actions (``callFromThread``) and stops.
    :param manager: the fleet.
    :param reopen_logs: reopens the master's log file; returns what it reopened, or
        ``None`` when its logs go to a stream that cannot be reopened.
    """

    def __init__(
        self,
        reactor: Any,
        manager: ClusterManager,
        reopen_logs: Callable[[], Optional[str]] = lambda: None,
    ) -> None:
        self.reactor = reactor
        self.manager = manager
        self.reopen_logs = reopen_logs
        self.stops = 0  # TERM/INT received
        self._previous: dict[int, Any] = {}

    def actions(self) -> dict[int, Callable[[], Any]]:
        """Signal number -> what it does."""
        manager = self.manager
        return {
            signal.SIGUSR2: manager.rolling_restart,
            signal.SIGHUP: manager.reload,
            signal.SIGTTIN: lambda: manager.scale_up(1),
            signal.SIGTTOU: self._one_fewer,
            signal.SIGUSR1: self._reopen,
            signal.SIGTERM: self._stop,
            signal.SIGINT: self._stop,
            signal.SIGQUIT: self._stop_now,
        }

    def install(self) -> None:
        """Install the handlers (remembering the ones they replace)."""
        for number, action in self.actions().items():

            def handler(signum: int, frame: Any, action: Callable[[], Any] = action) -> None:
                self.reactor.callFromThread(self._run, signum, action)

            self._previous[number] = signal.signal(number, handler)

    def _run(self, signum: int, action: Callable[[], Any]) -> None:
        name = signal.Signals(signum).name
        if self.manager.stopping and signum not in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            log.warn("Received {signal} while stopping: ignored", signal=name)
            return
        log.info("Received {signal}", signal=name)
        result = action()
        if isinstance(result, defer.Deferred):
            result.addErrback(lambda f: log.failure("Signal {signal} failed", f, signal=name))

    def _one_fewer(self) -> Any:
        if self.manager.worker_count() <= 1:
            log.warn(
                "SIGTTOU refused: the last worker is never removed by TTOU "
                "(stop the gateway with SIGTERM)"
            )
            return None
        return self.manager.scale_down(1)

    def _reopen(self) -> None:
        what = self.reopen_logs()
        if what is None:
            log.info("SIGUSR1: the master logs to a stream, nothing to reopen")
        else:
            log.info("SIGUSR1: reopened the log file {path}", path=what)
        count = self.manager.broadcast_signal(signal.SIGUSR1)
        log.info("SIGUSR1 passed on to {count} worker(s)", count=count)

    def _stop(self) -> None:
        self.stops += 1
        if self.stops > 1:
            self._stop_now()
            return
        if self.reactor.running:
            self.reactor.stop()

    def _stop_now(self) -> None:
        self.manager.stop_now()
        if self.reactor.running:
            self.reactor.stop()

    def restore(self) -> None:
        """Put back the handlers that were there before :meth:`install`."""
        for number, previous in self._previous.items():
            signal.signal(number, previous)
        self._previous.clear()


class MasterService:
    """
    Runs the fleet for a gateway: start it, answer signals, stop it.

    :param config: the validated config.
    :param reactor: the reactor.
    :param validate: checks every config before it is taken (startup and reload); by
        default a fresh ``python -m bungate.worker --check`` process
        (:class:`~bungate.master.check.ConfigCheck`), so the master imports no user code.
    :param worker_script: the script workers run, or ``None`` for the built-in worker.
    :param script_args: its arguments.
    :param config_loader: re-reads the config on SIGHUP.
    :param on_line: where worker output lines go (see :class:`ClusterManager`).
    :param extra_env: variables every worker gets.
    :param output: where the workers' own log lines are written (default: stdout); its
        ``reopen()`` (if any) runs on SIGUSR1.
    :param pinned: ``{config key: option}`` for the command-line overrides.
    """

    def __init__(
        self,
        config: GatewayConfig,
        reactor: Any,
        *,
        validate: Optional[Validate] = None,
        worker_script: Optional[str] = None,
        script_args: Optional[list[str]] = None,
        config_loader: Optional[Callable[[], GatewayConfig]] = None,
        on_line: Optional[Callable[[int, int, bytes], None]] = None,
        extra_env: Optional[Mapping[str, str]] = None,
        output: Optional[IO[str]] = None,
        pinned: Optional[Mapping[str, str]] = None,
    ) -> None:
        self.reactor = reactor
        self.output = output
        #: the process's exit status once stopped (see the module docstring).
        self.exit_code = 0
        metrics = None
        if config.metrics.enabled:
            if multiprocess_dir() is None:
                prepare_multiprocess_dir()
            metrics = MasterMetrics(states=REPORTED_STATES)
        self.manager = manager = ClusterManager(
            config,
            worker_script=worker_script,
            script_args=script_args,
            reactor=reactor,
            config_loader=config_loader,
            metrics=metrics,
            on_line=on_line,
            extra_env=extra_env,
            validate=validate,
            output=output,
            on_fatal=self._fatal,
        )
        if validate is None:
            spawner = manager.spawner
            manager.validate = ConfigCheck(
                reactor, lambda: spawner.python, spawner.base_environment
            )
        manager.pinned = dict(pinned or {})
        self.signals = SignalHandlers(reactor, manager, self._reopen_logs)

    def _reopen_logs(self) -> Optional[str]:
        reopen = getattr(self.output, "reopen", None)
        return reopen() if reopen is not None else None

    def _fatal(self, code: int) -> None:
        self.exit_code = code
        if self.reactor.running:
            self.reactor.stop()

    def start(self) -> defer.Deferred[None]:
        """
        Accept the config (checked in a fresh process, its files copied), install the
        signal handlers and start the fleet; fires once it is ready.
        """
        # After the reactor runs: it installs its own TERM/INT handlers when it starts.
        self.reactor.callWhenRunning(self.signals.install)
        return self.manager.start()

    def close(self) -> defer.Deferred[None]:
        """Drain and stop the fleet, then put the signal handlers back."""
        d = self.manager.stop()

        def done(result: None) -> None:
            self.signals.restore()
            if self.manager.killed_on_stop and not self.exit_code:
                self.exit_code = 1
            return result

        return d.addCallback(done)
