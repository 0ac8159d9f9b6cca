"""
The master role of a gateway process: title, fleet metrics, the fleet, and the signals
an operator sends it.

Signals only schedule work on the reactor thread: ``USR2`` rolls the fleet, ``HUP``
reloads the config, ``TTIN`` / ``TTOU`` add or remove a worker. ``TERM`` and ``INT``
stop the reactor, whose shutdown calls :meth:`MasterService.close`.
"""

from __future__ import annotations

import signal
from collections.abc import Mapping
from typing import IO, Any, Callable, Optional

from twisted.internet import defer
from twisted.logger import Logger

from bungate.config import GatewayConfig
from bungate.master.certificates import Validate
from bungate.master.fleet import ClusterManager
from bungate.ops.metrics import MasterMetrics, multiprocess_dir, prepare_multiprocess_dir

__all__ = ["MasterService", "SignalHandlers"]

log = Logger(namespace="bungate.master")


class SignalHandlers:
    """
    The master's operator signals, each running an action on the reactor thread.

    :param reactor: runs the actions (``callFromThread``).
    :param manager: the fleet; no action runs once it stops.
    """

    def __init__(self, reactor: Any, manager: ClusterManager) -> None:
        self.reactor = reactor
        self.manager = manager
        self._previous: dict[int, Any] = {}

    def actions(self) -> dict[int, Callable[[], Any]]:
        """Signal number -> what it does."""
        manager = self.manager
        return {
            signal.SIGUSR2: manager.rolling_restart,
            signal.SIGHUP: manager.reload,
            signal.SIGTTIN: lambda: manager.scale_up(1),
            signal.SIGTTOU: lambda: manager.scale_down(1) if manager.worker_count() > 1 else None,
        }

    def install(self) -> None:
        """Install the handlers (remembering the ones they replace)."""
        for number, action in self.actions().items():

            def handler(signum: int, frame: Any, action: Callable[[], Any] = action) -> None:
                self.reactor.callFromThread(self._run, signum, action)

            self._previous[number] = signal.signal(number, handler)

    def _run(self, signum: int, action: Callable[[], Any]) -> None:
        if self.manager.stopping:
            return
        log.info("Received {signal}", signal=signal.Signals(signum).name)
        result = action()
        if isinstance(result, defer.Deferred):
            result.addErrback(lambda f: log.failure("Signal {signal} failed", f, signal=signum))

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
    :param validate: checks every config before it is accepted (startup and reload).
    :param worker_script: the script workers run, or ``None`` for the built-in worker.
    :param script_args: its arguments.
    :param config_loader: re-reads the config on SIGHUP.
    :param on_line: where worker output lines go (see :class:`ClusterManager`).
    :param extra_env: variables every worker gets.
    :param output: where the workers' own log lines are written (default: stdout).
    """

    def __init__(
        self,
        config: GatewayConfig,
        reactor: Any,
        *,
        validate: Validate,
        worker_script: Optional[str] = None,
        script_args: Optional[list[str]] = None,
        config_loader: Optional[Callable[[], GatewayConfig]] = None,
        on_line: Optional[Callable[[int, int, bytes], None]] = None,
        extra_env: Optional[Mapping[str, str]] = None,
        output: Optional[IO[str]] = None,
    ) -> None:
        metrics = None
        if config.metrics.enabled:
            if multiprocess_dir() is None:
                prepare_multiprocess_dir()
            metrics = MasterMetrics()
        self.manager = ClusterManager(
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
        )
        self.signals = SignalHandlers(reactor, self.manager)

    def start(self) -> defer.Deferred[None]:
        """
        Accept the config (its files copied and checked), install the signal handlers
        and start the fleet; fires once it is ready.
        """
        try:
            self.manager.accept_config(self.manager.config)
        except Exception:
            return defer.fail()
        self.signals.install()
        return self.manager.start()

    def close(self) -> defer.Deferred[None]:
        """Drain and stop the fleet, then put the signal handlers back."""
        d = self.manager.stop()

        def restore(result: None) -> None:
            self.signals.restore()
            return result

        return d.addCallback(restore)
