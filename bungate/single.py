"""
A gateway in one process, ``cluster.enabled: false`` (internal): it binds its own
listeners and serves them itself, with the same HTTP side as a worker.
"""

from __future__ import annotations

import os
import time
from typing import Any, Optional

from twisted.internet import defer
from twisted.logger import Logger

from bungate._once import Once
from bungate.config import GatewayConfig, RouteConfig
from bungate.http.app import GatewayApp
from bungate.master.listeners import wanted_listeners
from bungate.ops.listeners import bind_listener
from bungate.worker.ports import adopt_port

__all__ = ["SingleService"]

log = Logger(namespace="bungate.gateway")


class SingleService:
    """
    Serves a config in this process.

    :param config: the validated config.
    :param reactor: the reactor.
    """

    def __init__(self, config: GatewayConfig, reactor: Any) -> None:
        self.config = config
        self.reactor = reactor
        self.started_at = time.time()
        self.draining = False
        self.app = GatewayApp(config, reactor, status=self.status)
        self.ports: list[Any] = []
        self._closing: Optional[Once[None]] = None

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
        log.info("Gateway listening on {host}:{port}", host=address.host, port=address.port)
        return main

    def close(self) -> defer.Deferred[None]:
        """Stop accepting, drain (up to ``shutdown_timeout``), close. Safe to call again."""
        closing = self._closing
        if closing is None:
            closing = self._closing = Once()
            self.draining = True
            ports, self.ports = self.ports, []
            work = self.app.close(ports, self.config.cluster.shutdown_timeout)
            work.addBoth(lambda _: closing.fire(None))
        return closing.wait()
