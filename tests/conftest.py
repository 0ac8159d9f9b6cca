"""Fixtures shared by the in-process tests (tests/integration has its own conftest)."""

from __future__ import annotations

from typing import Any, Iterator

import pytest
import pytest_twisted
from twisted.internet import reactor

from bungate.testing import UpstreamServer


@pytest.fixture
def upstream() -> Iterator[UpstreamServer]:
    """A real upstream HTTP server on 127.0.0.1, stopped after the test."""
    server = UpstreamServer(reactor).start()
    yield server
    stopped: Any = server.stop()
    pytest_twisted.blockon(stopped)
