"""A new worker warms its request path up before it reports READY (cluster.warmup)."""

from __future__ import annotations

import pytest_twisted
import treq

from bungate.config import parse_config
from bungate.worker.warmup import warmup_seconds
from tests.integration.conftest import cluster_config


def test_auto_warms_up_on_pypy_only() -> None:
    auto = parse_config({"cluster": {"enabled": True}})
    assert warmup_seconds(auto, "PyPy") == 3.0
    assert warmup_seconds(auto, "CPython") == 0.0
    off = parse_config({"cluster": {"warmup": "off"}})
    assert warmup_seconds(off, "PyPy") == 0.0
    assert warmup_seconds(parse_config({"cluster": {"warmup": "500ms"}}), "CPython") == 0.5


@pytest_twisted.inlineCallbacks
def test_workers_warm_up_privately_before_they_are_ready(reactor, upstream, gateways):
    gw = yield gateways(cluster_config(upstream.url, warmup=1)).start()
    for worker_id in (1, 2):
        warmed = gw.count(rf"\[worker {worker_id}\].*Warmed up: [1-9]\d* requests")
        assert warmed == 1, "\n".join(gw.lines)
        warm_at = next(
            i
            for i, line in enumerate(gw.lines)
            if f"[worker {worker_id}]" in line and "Warmed" in line
        )
        ready_at = next(i for i, line in enumerate(gw.lines) if f"Worker {worker_id} ready" in line)
        assert warm_at < ready_at
    # Nothing of it reached the real upstream, and the gateway serves as usual.
    assert upstream.requests == []
    r = yield treq.get(gw.url + "/api/after-warmup", persistent=False)
    assert r.code == 200
    yield r.content()
    assert [req.path for req in upstream.requests] == [b"/api/after-warmup"]
