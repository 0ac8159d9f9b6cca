"""
:class:`Gateway`: the public entry point, usable from a plain script or from ``twist``
(internal module: import it from :mod:`bungate`).

The same object plays one of three roles when :meth:`Gateway.listen` is called:

- ``cluster.enabled: false`` — a single process binds the port and serves
  (:class:`~bungate.single.SingleService`);
- ``cluster.enabled: true`` — this process becomes the master: it binds the port and
  runs the fleet (:class:`~bungate.master.service.MasterService`), whose workers re-run
  this script (or the built-in worker when started from ``twist``);
- ``CLUSTER_WORKER=true`` in the environment — this process is a worker: it serves on
  the sockets inherited from its master (:class:`~bungate.worker.service.WorkerService`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import IO, Any, Callable, Optional, Union, cast

import attrs
from twisted.internet import defer
from twisted.logger import Logger

from bungate._once import Once
from bungate.config import GatewayConfig, parse_config, parse_route
from bungate.config.parse import check_patterns
from bungate.http.app import check_config
from bungate.master.service import MasterService
from bungate.ops.logging import begin_logging, open_log_file
from bungate.single import SingleService
from bungate.wire import WorkerLaunch, in_worker
from bungate.worker.service import WorkerService, run_worker_reactor, set_title

__all__ = ["Gateway", "run"]

log = Logger(namespace="bungate.gateway")


def _merged(config: Union[GatewayConfig, Mapping[str, Any], None], sections: Any) -> GatewayConfig:
    """``config`` with the top-level ``sections`` given as keyword arguments replaced."""
    if isinstance(config, GatewayConfig):
        if not sections:
            return config
        given = parse_config(sections, source=config.source)
        return attrs.evolve(config, **{name: getattr(given, name) for name in sections})
    return parse_config({**(config or {}), **sections}, source="<Gateway()>")


class Gateway:
    """
    An HTTP API gateway.

    :param config: a mapping in the YAML file's shape, or a :class:`GatewayConfig`.
    :param reactor: the reactor (defaults to the global one).
    :param worker_script: for cluster mode from a script, the script each worker runs
        (default: this process's own script, ``sys.argv[0]``); ``""`` runs the built-in
        worker, which serves this configuration.
    :param config_loader: in a master, re-reads the config on SIGHUP.
    :param manage_logging: begin logging to stdout (off when ``twist`` logs for us).
    :param log_output: in a master, where the workers' own log lines are written (its
        ``reopen()``, if it has one, runs on SIGUSR1).
    :param pinned: in a master, ``{config key: option}`` for the command-line overrides
        a reload keeps (for the log).
    :param kwargs: top-level sections merged into ``config`` (``server=...``,
        ``cluster=...``, ``routes=...``).
    """

    def __init__(
        self,
        config: Union[GatewayConfig, Mapping[str, Any], None] = None,
        *,
        reactor: Any = None,
        worker_script: Optional[str] = None,
        config_loader: Optional[Callable[[], GatewayConfig]] = None,
        manage_logging: bool = True,
        log_output: Optional[IO[str]] = None,
        pinned: Optional[Mapping[str, str]] = None,
        **kwargs: Any,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self.reactor = reactor
        self.config: GatewayConfig = _merged(config, kwargs)
        self.worker_script = worker_script
        self.config_loader = config_loader
        self.manage_logging = manage_logging
        self.log_output = log_output
        self.pinned = dict(pinned or {})
        self._service: Union[SingleService, WorkerService, MasterService, None] = None
        self._closing: Optional[Once[None]] = None

    # --- routes -----------------------------------------------------------------------

    def add_route(
        self,
        pattern: str,
        target: Optional[str] = None,
        handler: Union[str, Callable[..., Any], None] = None,
        methods: Optional[list[str]] = None,
        timeout: Optional[float] = None,
        **more: Any,
    ) -> None:
        """
        Add a route, validated like one from a config file.

        :param pattern: ``/exact``, ``/prefix/*`` or ``/users/:id``.
        :param target: an upstream base URL to proxy to.
        :param handler: a callable (or ``module:name``) that answers the request.
        :param methods: allowed methods (others get 405).
        :param timeout: upstream timeout in seconds (504 when exceeded).
        """
        item: dict[str, Any] = {"pattern": pattern, **more}
        for key, value in (
            ("target", target),
            ("handler", handler),
            ("methods", methods),
            ("timeout", timeout),
        ):
            if value is not None:
                item[key] = value
        index = len(self.config.routes)
        route = parse_route("<add_route>", index, item)
        check_patterns(self.config.server, (*self.config.routes, route), "<add_route>")
        self.config = attrs.evolve(self.config, routes=(*self.config.routes, route))
        service = self._service
        if isinstance(service, (SingleService, WorkerService)):
            service.add_route(route)

    # --- what is serving --------------------------------------------------------------

    @property
    def cluster(self) -> Any:
        """In a master, the :class:`~bungate.ClusterManager`; else ``None``."""
        service = self._service
        return service.manager if isinstance(service, MasterService) else None

    @property
    def dispatcher(self) -> Any:
        """In a worker or a single process, the request dispatcher; else ``None``."""
        service = self._service
        if isinstance(service, (SingleService, WorkerService)):
            return service.app.dispatcher
        return None

    @property
    def site(self) -> Any:
        """In a worker or a single process, the twisted.web site; else ``None``."""
        service = self._service
        return service.app.site if isinstance(service, (SingleService, WorkerService)) else None

    @property
    def ports(self) -> list[Any]:
        """The listening ports of a worker or a single process (empty once closed)."""
        service = self._service
        return service.ports if isinstance(service, (SingleService, WorkerService)) else []

    @property
    def exit_code(self) -> int:
        """The exit status this process should leave with once stopped (0: all well)."""
        service = self._service
        return service.exit_code if isinstance(service, MasterService) else 0

    def status(self) -> dict[str, Any]:
        """The health document this process serves at ``/health``."""
        service = self._service
        if isinstance(service, (SingleService, WorkerService)):
            return service.status()
        return {"status": "ok", "pid": os.getpid()}

    # --- listen / close ---------------------------------------------------------------

    def listen(self) -> defer.Deferred[Any]:
        """
        Start serving, in whichever role this process has (see the module docstring).

        Fires once the port accepts (single process, worker) or once the fleet is
        ready (master).
        """
        try:
            launch = WorkerLaunch.from_env()
            if launch is not None:
                worker = self._service = WorkerService(self.config, self.reactor, launch)
                return defer.maybeDeferred(worker.start)
            if self.config.cluster.enabled:
                return self._listen_master()
            self._begin_logging()
            single = self._service = SingleService(
                self.config,
                self.reactor,
                config_loader=self.config_loader,
                output=self.log_output,
            )
            port = single.start()
            self.reactor.addSystemEventTrigger("before", "shutdown", self.close)
            return defer.succeed(port)
        except Exception:
            return defer.fail()

    def _listen_master(self) -> defer.Deferred[Any]:
        set_title("bungate master")
        self._begin_logging()
        script = self.worker_script or None
        args: list[str] = []
        if self.worker_script is None and _is_user_script(sys.argv):
            script, args = os.path.abspath(sys.argv[0]), sys.argv[1:]
        # The built-in worker's configs are checked in a fresh process (the master imports
        # no handler module); a user's script imported its own handlers already.
        master = self._service = MasterService(
            self.config,
            self.reactor,
            validate=None if script is None else check_config,
            worker_script=script,
            script_args=args,
            config_loader=self.config_loader,
            output=self.log_output,
            pinned=self.pinned,
        )
        self.reactor.addSystemEventTrigger("before", "shutdown", self.close)
        return master.start()

    def _begin_logging(self) -> None:
        """Log to stdout or ``logger.file`` (unless ``twist`` logs for us)."""
        if not self.manage_logging:
            return
        # A text stream as far as logging goes (write and flush), reopenable by path.
        stream = cast(Optional[IO[str]], open_log_file(self.config.logger, self.config.source))
        if begin_logging(self.config.logger, stream=stream) and stream is not None:
            if self.log_output is None:
                self.log_output = stream
        elif stream is not None:
            stream.close()
            log.warn(
                "logger.file ({path}) is not used: logging was begun before the gateway "
                "started (by twist or the program)",
                path=self.config.logger.file,
            )

    def close(self) -> defer.Deferred[None]:
        """
        Stop accepting, let in-flight requests finish (up to ``shutdown_timeout``),
        close every connection. In a master, drain and stop the fleet.
        """
        closing = self._closing
        if closing is None:
            closing = self._closing = Once()
            service = self._service
            work = service.close() if service is not None else defer.succeed(None)
            work.addBoth(lambda _: closing.fire(None))
        return closing.wait()


def _is_user_script(argv: list[str]) -> bool:
    """Whether this process runs a user's script (whose workers re-run it)."""
    if not argv or not argv[0].endswith(".py"):
        return False
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return spec is None or not str(getattr(spec, "name", "")).startswith("twisted")


def run(gateway: Optional[Gateway] = None) -> None:
    """
    Start ``gateway`` (if given) and run the reactor until SIGTERM / SIGINT, then drain.

    For plain scripts: ``gw = Gateway(...); gw.add_route(...); run(gw)``.
    """
    reactor: Any = gateway.reactor if gateway is not None else None
    if reactor is None:
        from twisted.internet import reactor as _reactor

        reactor = _reactor
    exit_code = [0]
    if gateway is not None:

        def start() -> None:
            d = gateway.listen()

            def failed(reason: Any) -> None:
                log.critical("Cannot start: {error}", error=reason.getErrorMessage())
                sys.stderr.write(f"bungate: cannot start: {reason.getErrorMessage()}\n")
                exit_code[0] = 1
                reactor.stop()

            d.addErrback(failed)

        reactor.callWhenRunning(start)
    if in_worker():

        def worker() -> Optional[WorkerService]:
            service = gateway._service if gateway is not None else None
            return service if isinstance(service, WorkerService) else None

        run_worker_reactor(reactor, worker)
    else:
        reactor.run()
    code = exit_code[0] or (gateway.exit_code if gateway is not None else 0)
    if code:
        raise SystemExit(code)
