"""
A gateway in one process, ``cluster.enabled: false`` (internal): it binds its own
listeners and serves them itself, with the same HTTP side as a worker.

Signals: ``TERM``/``INT`` drain and stop (the reactor's own handling), ``QUIT`` stops
at once, ``HUP`` re-reads the config file and serves its routes (checked in a fresh
process first; a change to what only a restart can apply is refused by name), ``USR1``
reopens the log file.

The rate limits of ``backend: local`` are decided on a table of this process's own
(:mod:`bungate.limit_table`), made once for its whole life, so a reload that serves new
routes keeps the budgets of the routes it keeps.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import IO, Any, Callable, Optional

from twisted.internet import defer
from twisted.logger import Logger

from bungate._once import Once
from bungate.config import ConfigError, GatewayConfig, RouteConfig
from bungate.config.diff import changed_keys
from bungate.http.app import GatewayApp
from bungate.limit_table import LimitTable
from bungate.master.check import ConfigCheck
from bungate.master.listeners import wanted_listeners
from bungate.ops.listeners import bind_listener
from bungate.worker.ports import adopt_port

__all__ = ["RESTART_ONLY", "SingleService"]

#: The sections a running single process cannot take on HUP: they need a restart.
RESTART_ONLY = ("server", "metrics", "health", "logger", "cluster")

log = Logger(namespace="bungate.gateway")


class SingleService:
    """
    Serves a config in this process.

    :param config: the validated config.
    :param reactor: the reactor.
    """

    def __init__(
        self,
        config: GatewayConfig,
        reactor: Any,
        config_loader: Optional[Callable[[], GatewayConfig]] = None,
        output: Optional[IO[str]] = None,
    ) -> None:
        self.config = config
        self.reactor = reactor
        self.config_loader = config_loader
        self.output = output
        self.started_at = time.time()
        self.draining = False
        #: the rate-limit table of ``backend: local`` (closed once :meth:`close` is done).
        self.limit_table: Optional[LimitTable]
        self.limit_table, self._limit_file = LimitTable.create()
        self.app = GatewayApp(config, reactor, status=self.status, limit_table=self.limit_table)
        self.ports: list[Any] = []
        self._closing: Optional[Once[None]] = None
        self._previous: dict[int, Any] = {}
        self._quick = False
        self._reloading = False

    def status(self) -> dict[str, Any]:
        """The health document of this process (``/health``)."""
        return {
            "status": "draining" if self.draining else "ok",
            "worker_id": None,
            "pid": os.getpid(),
            "uptime": round(time.time() - self.started_at, 3),
        }

    def add_route(self, route: RouteConfig) -> None:
        """Serve one more validated route."""
        self.app.add_route(route)

    def start(self) -> Any:
        """
        Bind and serve every listener the config asks for.

        :returns: the main listening port.
        :raises OSError: when an address cannot be bound.
        """
        backlog = self.config.server.backlog
        main: Any = None
        for name, _key, host, port in wanted_listeners(self.config):
            factory = self.app.main_factory() if name == "main" else self.app.extra_factory(name)
            sock = bind_listener(host, port, backlog)
            try:
                if name == "main":
                    main = adopt_port(
                        self.reactor, sock.fileno(), factory, balanced=False, eager=self.app.eager
                    )
                    listening = main
                else:
                    listening = self.reactor.adoptStreamPort(sock.fileno(), sock.family, factory)
            finally:
                sock.close()
            self.ports.append(listening)
        address = main.getHost()
        # Said once the signal handlers are in (the reactor runs): a HUP or USR1 sent
        # on seeing this line must never meet the default action (which terminates).
        self.reactor.callWhenRunning(self._ready, address.host, address.port)
        return main

    def _ready(self, host: str, port: int) -> None:
        self._install_signals()
        log.info("Gateway listening on {host}:{port}", host=host, port=port)

    # --- signals ------------------------------------------------------------------------

    def _install_signals(self) -> None:
        actions = {signal.SIGHUP: self.reload, signal.SIGUSR1: self.reopen_logs}
        actions[signal.SIGQUIT] = self.stop_now
        for number, action in actions.items():

            def handler(signum: int, frame: Any, action: Callable[[], Any] = action) -> None:
                self.reactor.callFromThread(action)

            self._previous[number] = signal.signal(number, handler)

    def _restore_signals(self) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, previous)
        self._previous.clear()

    def reopen_logs(self) -> None:
        """SIGUSR1: reopen the log file by path (after logrotate moved it)."""
        reopen = getattr(self.output, "reopen", None)
        if reopen is None:
            log.info("Received SIGUSR1: logging to a stream, nothing to reopen")
            return
        log.info("Received SIGUSR1: reopened the log file {path}", path=reopen())

    def stop_now(self) -> None:
        """SIGQUIT: stop without waiting for requests in flight."""
        log.info("Received SIGQUIT: stopping at once")
        self._quick = True
        if self.reactor.running:
            self.reactor.stop()

    def reload(self) -> defer.Deferred[bool]:
        """
        SIGHUP: re-read the config file, check it in a fresh process, serve its routes.
        Fires ``True`` once served, ``False`` when refused (the log says why).
        """
        if self.draining:
            log.warn("Received SIGHUP while stopping: ignored")
            return defer.succeed(False)
        if self.config_loader is None:
            log.warn("Received SIGHUP: no config file to re-read (the built-in config runs)")
            return defer.succeed(False)
        if self._reloading:
            log.warn("Received SIGHUP while a reload runs: send it again once it is done")
            return defer.succeed(False)
        log.info("Received SIGHUP: re-reading {source}", source=self.config.source)
        try:
            config = self.config_loader()
        except ConfigError as e:
            return self._refused(str(e))
        changed = changed_keys(self.config, config)
        fixed = [k for k in changed if k.split(".", 1)[0] in RESTART_ONLY]
        if fixed:
            return self._refused(
                f"{', '.join(fixed)} cannot change in a running single process: restart it "
                "(a cluster master applies them on HUP)"
            )
        check = ConfigCheck(self.reactor, sys.executable, lambda: dict(os.environ))
        self._reloading = True

        def apply(_: Any) -> bool:
            self.app.reconfigure(config)
            self.config = config
            log.info(
                "Configuration reloaded from {source}: changed {changed}",
                source=config.source,
                changed=", ".join(changed) or "nothing",
            )
            return True

        def refused(failure: Any) -> Any:
            return self._refused(failure.getErrorMessage())

        def done(result: Any) -> Any:
            self._reloading = False
            return result

        d = check(config, {}).addCallbacks(apply, refused)
        return d.addBoth(done)

    def _refused(self, why: str) -> defer.Deferred[bool]:
        log.error("Configuration reload refused, the running config stays: {why}", why=why)
        return defer.succeed(False)

    def close(self) -> defer.Deferred[None]:
        """Stop accepting, drain (up to ``shutdown_timeout``), close. Safe to call again."""
        closing = self._closing
        if closing is None:
            closing = self._closing = Once()
            self.draining = True
            self._restore_signals()
            ports, self.ports = self.ports, []
            grace = 0.0 if self._quick else self.config.cluster.shutdown_timeout
            work = self.app.close(ports, grace)
            work.addBoth(lambda _: self._close_limit_table())
            work.addBoth(lambda _: closing.fire(None))
        return closing.wait()

    def _close_limit_table(self) -> None:
        """Every request is done: unmap the rate-limit table and close its file."""
        table, self.limit_table = self.limit_table, None
        if table is not None:
            table.close()
            self._limit_file.close()
