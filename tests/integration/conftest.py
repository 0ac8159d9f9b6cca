"""Fixtures for real-process tests: a real upstream and ``twist bungate`` children."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor as _reactor

from bungate.testing import GatewayProcess, UpstreamServer


@pytest.fixture
def reactor() -> Any:
    return _reactor


@pytest.fixture
def upstream(reactor: Any) -> Any:
    server = UpstreamServer(reactor).start()
    yield server
    pytest_twisted.blockon(server.stop())


@pytest.fixture
def gateways(reactor: Any) -> Any:
    """Start gateways with ``gateways(config, args=[...])``; all are stopped afterwards."""
    started: list[GatewayProcess] = []

    def make(config: Any = None, **kwargs: Any) -> GatewayProcess:
        gw = GatewayProcess(reactor, config, **kwargs)
        started.append(gw)
        return gw

    yield make
    for gw in started:
        try:
            pytest_twisted.blockon(gw.stop())
        finally:
            gw.cleanup()


def cluster_config(upstream_url: str, workers: int = 2, **cluster: Any) -> dict[str, Any]:
    """A small cluster config on a free port, fast timings for tests."""
    settings = {
        "enabled": True,
        "workers": workers,
        "shutdown_timeout": 10,
        "heartbeat_interval": 0.5,
        "heartbeat_timeout": 5,
        "restart_delay": 0.2,
    }
    settings.update(cluster)
    return {
        "server": {"host": "127.0.0.1", "port": 0},
        "cluster": settings,
        "logger": {"level": "info", "request_logging": False},
        "health": {"details": True},  # the tests read the fleet from /health
        "routes": [{"pattern": "/*", "target": upstream_url}],
    }
