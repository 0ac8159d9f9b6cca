"""
A worker process: adopt the master's sockets, serve, report, drain, exit.

:class:`WorkerService` serves a :class:`~bungate.http.app.GatewayApp` on the listening
sockets the master passed down (see :mod:`bungate.wire` for the descriptors and the
environment), tells the master it is ready over the control channel, sends heartbeats,
and shares its connection counts for fair accepting (:mod:`bungate.accept_table`). The
rate limits of ``backend: local`` are decided on the master's table, which every worker
maps (:mod:`bungate.limit_table`), so they hold for the fleet rather than per worker.

SIGTERM or SIGINT make the worker drain (stop accepting, finish in-flight requests,
close keep-alive connections) and exit 0. If the master dies, the control channel hits
EOF (and on Linux ``PR_SET_PDEATHSIG`` delivers SIGTERM): the worker first points its
stdout/stderr at /dev/null, because the pipes to the dead master would raise
``BrokenPipeError`` on the next log line, then drains and exits.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from typing import Any, Callable, Optional

from twisted.internet import defer, task
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from bungate._once import Once
from bungate.accept_table import AcceptTable
from bungate.config import GatewayConfig, RouteConfig
from bungate.config.convert import from_json
from bungate.http.app import GatewayApp
from bungate.limit_table import LimitTable, LimitTableError
from bungate.ops.logging import begin_logging
from bungate.wire import (
    CONFIG,
    CONFIG_REQUEST,
    CONTROL_FD,
    DRAINING,
    FLEET,
    HEARTBEAT,
    READY,
    ControlChannel,
    WorkerLaunch,
)
from bungate.worker.ports import adopt_port
from bungate.worker.warmup import warm_up, warmup_seconds

__all__ = [
    "WorkerService",
    "inherit_limit_table",
    "run_worker_reactor",
    "set_parent_death_signal",
    "set_title",
    "silence_output",
]

log = Logger(namespace="bungate.worker")


def set_title(title: str) -> None:
    """Set the process title (``ps``, ``pgrep -f``) where setproctitle can."""
    try:
        import setproctitle

        setproctitle.setproctitle(title)
    except ImportError:  # pragma: no cover - setproctitle is a dependency
        pass


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


def inherit_limit_table(fd: Optional[int]) -> Optional[LimitTable]:
    """
    Map the rate-limit table the master passed down as descriptor ``fd``.

    A worker whose table cannot be mapped still serves (the table's absence only matters
    to ``rate_limit.backend: local``, whose limits are then this worker's own): the
    problem is logged as an error rather than failing the worker, which its master would
    only restart into the same problem.

    :param fd: the descriptor (:attr:`bungate.wire.WorkerLaunch.limit_table`), or ``None``.
    :returns: the table, or ``None``.
    """
    if fd is None:
        return None
    try:
        return LimitTable.inherited(fd)
    except (OSError, LimitTableError) as e:
        log.error(
            "Cannot map the fleet's rate-limit table (fd {fd}): {error}; this worker "
            "applies rate_limit.backend: local on its own",
            fd=fd,
            error=str(e),
        )
        return None


class WorkerService:
    """
    One worker: the gateway's HTTP side on the master's sockets, and the master's link.

    :param config: the validated config to serve.
    :param reactor: the reactor.
    :param launch: what the master started this process with.
    """

    def __init__(self, config: GatewayConfig, reactor: Any, launch: WorkerLaunch) -> None:
        self.config = config
        self.reactor = reactor
        self.launch = launch
        self.worker_id = str(launch.worker_id)
        self.started_at = time.time()
        #: the fleet's rate-limit table, inherited from the master (``None`` without one).
        self.limit_table = inherit_limit_table(launch.limit_table)
        self.app = GatewayApp(
            config,
            reactor,
            status=self.status,
            worker_id=self.worker_id,
            names=launch.tls_copies,
            limit_table=self.limit_table,
        )
        self.ports: list[Any] = []
        self.fleet: dict[str, Any] = {}
        self.draining = False
        self.control: Optional[ControlChannel] = None
        self.accept: Optional[AcceptTable] = None
        self._heartbeat: Optional[task.LoopingCall] = None
        self._closing: Optional[Once[None]] = None

    # --- what the worker tells ----------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The health document of this worker (``/health``)."""
        failed = self.fleet.get("failed", 0)
        doc: dict[str, Any] = {
            # A slot that failed for good is never hidden behind "ok": this worker
            # serves (200), but the fleet is short of what the config asks for.
            "status": "draining" if self.draining else "degraded" if failed else "ok",
            "worker_id": self.worker_id,
            "pid": os.getpid(),
            "uptime": round(time.time() - self.started_at, 3),
        }
        if self.fleet:
            doc["fleet"] = self.fleet
        if self.accept is not None:
            doc["workers"] = self.accept.workers()
        return doc

    # --- start ------------------------------------------------------------------------

    def start(self) -> Any:
        """
        Warm up (``cluster.warmup``, built-in workers), then adopt the listening sockets,
        connect to the master and report ready.

        :returns: the main listening port, or a Deferred firing with it after a warm-up.
        """
        set_title(f"bungate worker {self.worker_id}")
        begin_logging(self.config.logger, self.worker_id)
        seconds = warmup_seconds(self.config) if self.launch.config_json is not None else 0.0
        if seconds > 0:
            # The JIT compiles the request path on a private port first; this worker
            # adopts the shared sockets and reports READY only then.
            d = warm_up(self.config, self.reactor, seconds)
            return d.addCallback(lambda _: self._serve())
        return self._serve()

    def _serve(self) -> Any:
        site = self.app.site
        table = self.launch.accept_table
        peers = self.accept = AcceptTable.inherited(*table) if table is not None else None
        if peers is not None:
            peers.publish(0)
            site.on_connections = peers.publish
            site.on_request = peers.count_request
        fds = self.launch.listeners
        port = adopt_port(
            self.reactor, fds["main"], self.app.main_factory(), peers=peers, eager=self.app.eager
        )
        os.close(fds["main"])
        self.ports.append(port)
        for name, fd in fds.items():
            if name == "main":
                continue
            factory = self.app.extra_factory(name)
            if factory is not None:
                self.ports.append(adopt_port(self.reactor, fd, factory, eager=self.app.eager))
            os.close(fd)
        self._connect()
        self._ready()
        return port

    def add_route(self, route: RouteConfig) -> None:
        """Serve one more validated route."""
        self.app.add_route(route)

    def _connect(self, fd: int = CONTROL_FD) -> None:
        """Adopt the control channel; a missing channel means no master is watching."""
        try:
            os.fstat(fd)
        except OSError:
            log.warn("No control channel on fd {fd}: running without a master", fd=fd)
            return
        control = ControlChannel(self._message, self._master_gone)
        factory = Factory()
        factory.buildProtocol = lambda addr: control  # type: ignore[method-assign]
        self.reactor.adoptStreamConnection(fd, socket.AF_UNIX, factory)
        os.close(fd)
        self.control = control
        set_parent_death_signal(signal.SIGTERM)
        if os.getppid() != self.launch.master_pid:  # the master died before prctl took effect
            self._master_gone()

    def _ready(self) -> None:
        """Tell the master we listen, and start heartbeats."""
        if self.control is not None:
            self.control.send(READY, pid=os.getpid())
            self._heartbeat = task.LoopingCall(self._beat)
            self._heartbeat.clock = self.reactor
            self._heartbeat.start(self.config.cluster.heartbeat_interval, now=False)
        self.reactor.addSystemEventTrigger("before", "shutdown", self.close)

    def _beat(self) -> None:
        if self.control is not None:
            self.control.send(HEARTBEAT)

    def _message(self, message: dict[str, Any]) -> None:
        kind = message["t"]
        if kind == FLEET:
            self.fleet = {k: v for k, v in message.items() if k != "t"}
        elif kind == CONFIG:
            self._reconfigure(message.get("config"))
        else:
            log.warn("Ignoring a control message of unknown kind {kind!r}", kind=kind)

    def reload(self) -> None:
        """
        SIGHUP: re-read the config. A built-in worker asks its master for the accepted
        one and serves its routes from then on; a worker started from a user's script
        keeps the config its script built.
        """
        if self.control is None or self.launch.config_json is None:
            log.info(
                "Received SIGHUP: a worker started from a script keeps its config "
                "(nothing to re-read)"
            )
            return
        log.info("Received SIGHUP: asking the master for the accepted config")
        self.control.send(CONFIG_REQUEST)

    def _reconfigure(self, config_json: Any) -> None:
        if not isinstance(config_json, str):
            log.warn("The master sent no config: keeping the current one")
            return
        try:
            config = from_json(config_json)
            needs_roll = self.app.reconfigure(config)
        except Exception:
            log.failure("The master's config could not be applied: keeping the current one")
            return
        self.config = config
        if needs_roll:
            log.warn(
                "Config re-read: routes applied; {keys} change only with new workers "
                "(SIGHUP or SIGUSR2 to the master)",
                keys=", ".join(needs_roll),
            )
        else:
            log.info("Config re-read: {count} route(s) now served", count=len(config.routes))

    def _master_gone(self) -> None:
        if self._closing is not None:
            return
        silence_output()
        self.reactor.callLater(0, self._stop_reactor)

    def _stop_reactor(self) -> None:
        if self.reactor.running:
            self.reactor.stop()

    # --- stop -------------------------------------------------------------------------

    def close(self) -> defer.Deferred[None]:
        """
        Stop accepting, let in-flight requests finish (up to ``shutdown_timeout``),
        close every connection. Safe to call more than once.
        """
        if self._closing is not None:
            return self._closing.wait()
        closing = self._closing = Once()
        if self._heartbeat is not None and self._heartbeat.running:
            self._heartbeat.stop()
        if self.control is not None:
            self.control.send(DRAINING)
        self.draining = True
        if self.accept is not None:
            self.accept.leave()
        ports, self.ports = self.ports, []
        timeout = self.config.cluster.shutdown_timeout
        work = self.app.close(ports, timeout)
        log.info(
            "Draining: stopped accepting; waiting up to {timeout:g}s for {connections} "
            "connection(s), {tunnels} of them WebSocket tunnel(s)",
            timeout=timeout,
            connections=len(self.app.site.channels),
            tunnels=self.app.tunnels.open,
        )
        work.addBoth(lambda _: closing.fire(None))
        return closing.wait()


def run_worker_reactor(
    reactor: Any, worker: Callable[[], Optional[WorkerService]] = lambda: None
) -> None:
    """
    Run a worker's reactor with the worker's signals:

    - ``TERM``, ``INT``: drain and exit 0 (once: Ctrl-C signals the whole process group,
      so a worker gets SIGINT and then the master's SIGTERM while it already drains);
    - ``QUIT``: exit at once, without draining (the master's fast stop);
    - ``HUP``: re-read its config from the master (:meth:`WorkerService.reload`);
    - ``USR1``: nothing to reopen (a worker's log lines go through the master), said so.

    A worker spawns no processes, so it does without Twisted's SIGCHLD handling.

    :param worker: returns the worker's service once it exists.
    """
    stopping = [False]

    def stop() -> None:
        if reactor.running:
            reactor.stop()

    def on_stop(signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if stopping[0]:
            reactor.callFromThread(log.info, "Received {signal} while draining", signal=name)
            return
        stopping[0] = True
        reactor.callFromThread(log.info, "Received {signal}, draining", signal=name)
        reactor.callFromThread(stop)

    def on_quit(signum: int, frame: Any) -> None:
        sys.stdout.flush()
        os._exit(0)

    def on_reload(signum: int, frame: Any) -> None:
        service = worker()
        if service is not None:
            reactor.callFromThread(service.reload)

    def on_reopen(signum: int, frame: Any) -> None:
        reactor.callFromThread(
            log.info, "Received SIGUSR1: this worker logs through its master, nothing to reopen"
        )

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGQUIT, on_quit)
    signal.signal(signal.SIGHUP, on_reload)
    signal.signal(signal.SIGUSR1, on_reopen)
    reactor.run(installSignalHandlers=False)
