"""
:class:`Gateway`: the public entry point, usable from a plain script or from ``twist``.

The same object plays one of three roles when :meth:`Gateway.listen` is called:

- ``cluster.enabled: false`` — a single process binds the port and serves;
- ``cluster.enabled: true`` — this process becomes the master: it binds the port and
  runs a :class:`~bungate.cluster.manager.ClusterManager` whose workers re-run this
  script (or the built-in worker when started from ``twist``);
- ``CLUSTER_WORKER=true`` in the environment — this process is a worker: it serves on
  the socket inherited from its master and reports to it over the control channel.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping
from typing import Any, Callable, Optional, Union

import attrs
from twisted.internet import defer
from twisted.logger import Logger

from bungate._once import Once
from bungate.cluster import child
from bungate.config import GatewayConfig, parse_config, parse_route
from bungate.proxy import Dispatcher
from bungate.web import GatewayRequest, GatewaySite

__all__ = ["Gateway", "run"]

log = Logger(namespace="bungate.gateway")


def _set_title(title: str) -> None:
    try:
        import setproctitle

        setproctitle.setproctitle(title)
    except ImportError:  # pragma: no cover - setproctitle is a dependency
        pass


class Gateway:
    """
    An HTTP API gateway.

    :param config: a mapping in the YAML file's shape, or a :class:`GatewayConfig`.
    :param reactor: the reactor (defaults to the global one).
    :param worker_script: for cluster mode from a script, the script each worker runs
        (default: this process's own script, ``sys.argv[0]``); ``""`` runs the built-in
        worker, which serves this configuration.
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
        **kwargs: Any,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self.reactor = reactor
        if isinstance(config, GatewayConfig):
            if kwargs:
                config = parse_config({**config.raw, **kwargs}, source=config.source)
        else:
            config = parse_config({**(config or {}), **kwargs}, source="<Gateway()>")
        self.config: GatewayConfig = config
        self._extra_routes: list[Any] = []
        self.worker_script = worker_script
        self.config_loader = config_loader
        self.manage_logging = manage_logging
        self.site: Optional[GatewaySite] = None
        self.dispatcher: Optional[Dispatcher] = None
        self.ports: list[Any] = []
        self.cluster: Any = None
        self.started_at = time.time()
        self._draining = False
        self._runtime: Optional[child.WorkerRuntime] = None
        self._closing: Optional[Once[None]] = None
        self._accept_table: Any = None  # a worker's view of the fleet's connection counts

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
        route = parse_route("<add_route>", len(self.config.routes), item)
        self.config = attrs.evolve(self.config, routes=(*self.config.routes, route))
        if self.dispatcher is not None:
            self.dispatcher.add(route)

    # --- the worker's HTTP side -------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The health document of this process (``/health``)."""
        doc: dict[str, Any] = {
            "status": "draining" if self._draining else "ok",
            "worker_id": child.worker_id(),
            "pid": os.getpid(),
            "uptime": round(time.time() - self.started_at, 3),
        }
        if self._runtime is not None and self._runtime.fleet:
            doc["fleet"] = self._runtime.fleet
        if self._accept_table is not None:
            doc["workers"] = self._accept_table.workers()
        return doc

    def _build_site(self) -> GatewaySite:
        from bungate import observe

        metrics, metrics_resource, access_log = observe.for_worker(self.config, child.worker_id())
        tls_policy = observe.upstream_tls(self.config)
        self.dispatcher = Dispatcher(
            self.config,
            self.reactor,
            status=self.status,
            metrics=metrics,
            metrics_resource=metrics_resource,
            tls_policy=tls_policy,
            access_log=access_log,
        )
        self.site = GatewaySite(
            self.dispatcher,
            self.reactor,
            max_body_size=self.config.server.max_body_size,
            on_done=self.dispatcher.on_done,
            keepalive_requests=self.config.server.keepalive_requests,
        )
        return self.site

    # --- listen / close ---------------------------------------------------------------

    def listen(self) -> defer.Deferred[Any]:
        """
        Start serving, in whichever role this process has (see the module docstring).

        Fires once the port accepts (single process, worker) or once the fleet is
        ready (master).
        """
        try:
            if child.in_worker():
                return defer.succeed(self._listen_worker())
            if self.config.cluster.enabled:
                return self._listen_master()
            return defer.succeed(self._listen_single())
        except Exception:
            return defer.fail()

    def _listen_single(self) -> Any:
        from bungate import observe
        from bungate.cluster.sockets import adopt_port, bind_listener

        if self.manage_logging:
            observe.start_logging(self.config, None)
        site = self._build_site()
        server = self.config.server
        sock = bind_listener(server.host, server.port, server.backlog)
        try:
            port: Any = adopt_port(
                self.reactor, sock.fileno(), observe.wrap_tls(self.config, site), balanced=False
            )
        finally:
            sock.close()
        self.ports.append(port)
        observe.listen_extras_single(self, self.reactor)
        address = port.getHost()
        log.info("Gateway listening on {host}:{port}", host=address.host, port=address.port)
        self.reactor.addSystemEventTrigger("before", "shutdown", self.close)
        return port

    def _listen_worker(self) -> Any:
        from bungate import observe
        from bungate.cluster.accept import AcceptTable
        from bungate.cluster.sockets import adopt_port

        wid = child.worker_id()
        _set_title(f"bungate worker {wid}")
        observe.start_logging(self.config, wid)
        site = self._build_site()
        fds = child.listener_fds()
        peers = self._accept_table = AcceptTable.inherited()
        if peers is not None:
            peers.publish(0)
            site.on_connections = peers.publish
            site.on_request = peers.count_request
        port = adopt_port(
            self.reactor, fds["main"], observe.wrap_tls(self.config, site), peers=peers
        )
        os.close(fds["main"])
        self.ports.append(port)
        for name, fd in fds.items():
            if name == "main":
                continue
            factory = observe.extra_factory(self, name)
            if factory is not None:
                self.ports.append(adopt_port(self.reactor, fd, factory))
            os.close(fd)
        runtime = child.WorkerRuntime(
            self.reactor, self.config.cluster.heartbeat_interval, self._drain_for_exit
        )
        self._runtime = runtime
        runtime.connect()
        runtime.ready()
        return port

    def _listen_master(self) -> defer.Deferred[Any]:
        from bungate import observe
        from bungate.cluster.manager import ClusterManager

        _set_title("bungate master")
        if self.manage_logging:
            observe.start_logging(self.config, None)
        script = self.worker_script or None
        args: list[str] = []
        if self.worker_script is None and _is_user_script(sys.argv):
            script, args = os.path.abspath(sys.argv[0]), sys.argv[1:]
        manager = ClusterManager(
            self.config,
            worker_script=script,
            script_args=args,
            reactor=self.reactor,
            config_loader=self.config_loader,
            metrics=observe.for_master(self.config),
        )
        observe.check_startup(self.config, manager)
        self.cluster = manager
        manager.install_signal_handlers()
        self.reactor.addSystemEventTrigger("before", "shutdown", self.close)
        return manager.start()

    def _drain_for_exit(self) -> defer.Deferred[None]:
        return self.close()

    def close(self) -> defer.Deferred[None]:
        """
        Stop accepting, let in-flight requests finish (up to ``shutdown_timeout``),
        close every connection. In a master, drain and stop the fleet.
        """
        if self._closing is not None:
            return self._closing.wait()
        closing = self._closing = Once()
        if self.cluster is not None:
            work: defer.Deferred[Any] = self.cluster.stop()
        else:
            self._draining = True
            if self._accept_table is not None:
                self._accept_table.leave()
            if self.dispatcher is not None:
                self.dispatcher.close()
            stops = [defer.maybeDeferred(p.stopListening) for p in self.ports]
            self.ports = []
            work = defer.gatherResults(stops)
            if self.site is not None:
                site = self.site
                work.addCallback(lambda _: site.drain(self.config.cluster.shutdown_timeout))
            if self.dispatcher is not None:
                dispatcher = self.dispatcher
                work.addCallback(lambda _: dispatcher.close_connections())
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
    if gateway is not None:

        def start() -> None:
            d = gateway.listen()

            def failed(reason: Any) -> None:
                log.critical("Cannot start: {error}", error=reason.getErrorMessage())
                sys.stderr.write(f"bungate: cannot start: {reason.getErrorMessage()}\n")
                reactor.stop()
                run.exit_code = 1  # type: ignore[attr-defined]

            d.addErrback(failed)

        reactor.callWhenRunning(start)
    if child.in_worker():
        child.run_worker_reactor(reactor)
    else:
        reactor.run()
    code = getattr(run, "exit_code", 0)
    if code:
        raise SystemExit(code)


_ = GatewayRequest  # re-exported type for handler authors' annotations
