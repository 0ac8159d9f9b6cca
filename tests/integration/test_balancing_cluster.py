"""
A load-balanced route in a real 2-worker cluster over three real upstreams: one upstream
dies under load (no failed idempotent request, its traffic moves to the other two), comes
back on the same port, and the workers' health checks put it back into rotation.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pytest_twisted
import treq
from twisted.internet import defer
from twisted.web.client import HTTPConnectionPool

from bungate.testing import UpstreamServer, wait_until
from tests.integration.conftest import cluster_config


def start_upstream(reactor: Any, name: str, port: int = 0) -> UpstreamServer:
    """A real upstream; ``die`` makes it stop like a process."""
    return UpstreamServer(reactor, name=name).start(port=port)


def die(server: UpstreamServer) -> Any:
    """Refuse new connections and close the open ones (the workers' pooled ones)."""
    return server.kill()


class Load:
    """A few client loops sending GETs back to back; counts every outcome and server."""

    def __init__(self, reactor: Any, url: str, concurrency: int = 4) -> None:
        self.reactor = reactor
        self.url = url
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.outcomes: Counter[Any] = Counter()
        self.servers: Counter[str] = Counter()
        self.log: list[str] = []
        self.running = True
        self.loops = [self._loop() for _ in range(concurrency)]

    @defer.inlineCallbacks
    def _loop(self) -> Any:
        while self.running:
            try:
                r = yield treq.get(self.url, pool=self.pool)
                body = yield r.content()
                self.outcomes[r.code] += 1
                if r.code == 200:
                    name = json.loads(body)["server"]
                    self.servers[name] += 1
                    self.log.append(name)
            except Exception as e:  # every failure is counted, none hidden
                self.outcomes[type(e).__name__] += 1

    @defer.inlineCallbacks
    def stop(self) -> Any:
        self.running = False
        yield defer.gatherResults(self.loops)
        yield self.pool.closeCachedConnections()
        return self.outcomes


@pytest_twisted.inlineCallbacks
def test_dead_upstream_traffic_moves_and_returns(reactor: Any, gateways: Any) -> Any:
    servers = [start_upstream(reactor, f"u{i}") for i in range(3)]
    config = cluster_config(servers[0].url, workers=2)
    config["routes"] = [
        {
            "pattern": "/*",
            "load_balancer": {
                "strategy": "round-robin",
                "targets": [{"url": s.url} for s in servers],
                "health_check": {
                    "enabled": True,
                    "path": "/health",
                    "interval": 0.1,
                    "timeout": 1,
                    "unhealthy_threshold": 2,
                    "healthy_threshold": 2,
                },
            },
            "circuit_breaker": {"enabled": True, "failure_threshold": 3, "reset_timeout": 0.5},
        }
    ]
    gw = yield gateways(config).start()
    load = Load(reactor, gw.url + "/work")
    try:
        yield wait_until(
            reactor, lambda: all(load.servers[f"u{i}"] >= 20 for i in range(3)), what="warm-up"
        )
        port = servers[1].port.getHost().port
        yield die(servers[1])
        dead_at = len(load.log)
        # wait until plenty of requests were answered after the death
        yield wait_until(reactor, lambda: len(load.log) - dead_at >= 300, what="load after death")
        tail = Counter(load.log[dead_at + 50 :])  # past the moment the workers notice
        assert tail["u1"] == 0, tail
        assert tail["u0"] > 50 and tail["u2"] > 50, tail
        assert set(load.outcomes) == {200}, load.outcomes  # not one failed GET

        # it comes back on the same port: the health checks return it to rotation
        servers[1] = start_upstream(reactor, "u1-again", port=port)
        back_at = len(load.log)
        yield wait_until(
            reactor,
            lambda: load.log[back_at:].count("u1-again") >= 30,
            timeout=15,
            what="u1 back in rotation",
        )
        outcomes = yield load.stop()
        assert set(outcomes) == {200}, outcomes
        share = Counter(load.log[back_at:])
        print("after death:", dict(tail), "after return:", dict(share), "outcomes:", dict(outcomes))
    finally:
        if load.running:
            yield load.stop()
        for s in servers:
            if s.port.connected:
                yield s.stop()
