"""
rate_limit on a route, end to end: real masters, real workers, a real Redis, through the
dispatcher.
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import defer, task

from tests.integration.conftest import cluster_config
from tests.redis_server import REDIS_SERVER, RedisServer

needs_redis = pytest.mark.skipif(
    not os.access(REDIS_SERVER, os.X_OK) and not os.environ.get("CI"),
    reason=f"needs redis-server ({REDIS_SERVER})",
)
HOUR = 3600  # nothing refills during a test: the counts are exact


def limited(upstream_url: str, limit: dict[str, Any], **top: Any) -> dict[str, Any]:
    """A 2-worker cluster whose one route is limited by ``limit``."""
    config = cluster_config(upstream_url)
    config["routes"] = [{"pattern": "/*", "target": upstream_url, "rate_limit": limit}]
    config.update(top)
    return config


@defer.inlineCallbacks
def send(urls: list[str], count: int, concurrency: int = 10) -> Any:
    """``count`` GETs, a new connection each (so every worker of every gateway gets some),
    round-robin over ``urls``; returns the statuses counted and the last 429 seen."""
    seen: Counter[int] = Counter()
    refused = None
    for start in range(0, count, concurrency):
        batch = [
            treq.get(f"{urls[(start + i) % len(urls)]}/x", persistent=False)
            for i in range(min(concurrency, count - start))
        ]
        for response in (yield defer.gatherResults(batch)):
            body = yield response.json() if response.code == 429 else response.content()
            seen[response.code] += 1
            if response.code == 429:
                refused = (response, body)
    return seen, refused


@pytest.fixture
def redis() -> Any:
    server = RedisServer().start()
    yield server
    server.close()


@needs_redis
@pytest_twisted.inlineCallbacks
def test_two_masters_sharing_one_redis_enforce_one_limit(reactor, upstream, gateways, redis):
    limit = {"max": 50, "window": HOUR, "backend": "redis"}
    # exactness, not timeouts: a loaded CI box may answer slower than the default 0.25 s
    config = limited(upstream.url, limit, redis={"url": redis.url, "command_timeout": 5})
    one = yield gateways(config).start()
    two = yield gateways(config).start()
    seen, (response, body) = yield send([one.url, two.url], 200)
    assert seen == {200: 50, 429: 150}, seen
    headers = response.headers
    assert headers.getRawHeaders(b"ratelimit-limit") == [b"50"]
    assert headers.getRawHeaders(b"ratelimit-remaining") == [b"0"]
    assert 71 <= int(headers.getRawHeaders(b"retry-after")[0]) <= 72
    assert body["error"] == "rate_limited" and body["retry_after"] >= 71
    assert "request_id" in body
    assert len(upstream.requests) == 50  # a refused request never reaches the upstream


@needs_redis
@pytest.mark.parametrize("on_error", ["allow", "deny"])
@pytest_twisted.inlineCallbacks
def test_redis_killed_mid_run_follows_on_backend_error_and_recovers(
    reactor, upstream, gateways, redis, on_error
):
    limit = {"max": 20, "window": HOUR, "backend": "redis", "on_backend_error": on_error}
    redis_section = {"url": redis.url, "command_timeout": 1.0, "connect_timeout": 0.5}
    gw = yield gateways(limited(upstream.url, limit, redis=redis_section)).start()
    seen, _ = yield send([gw.url], 10)
    assert seen == {200: 10}
    redis.kill()
    seen, _ = yield send([gw.url], 40)
    if on_error == "deny":
        assert seen == {429: 40}, seen
    else:
        # decided on the machine's shared table with the route's own limit: 20 in all
        assert seen == {200: 20, 429: 20}, seen
    redis.start()  # an empty Redis (a crash keeps nothing): a fresh budget of 20
    deadline = reactor.seconds() + 20
    while True:  # Redis answers again once the gateway's reconnect (backing off) lands
        seen, _ = yield send([gw.url], 1)
        if seen == {200: 1} or reactor.seconds() > deadline:
            break
        yield task.deferLater(reactor, 0.1, lambda: None)
    assert seen == {200: 1}, "Redis never decided again"
    seen, _ = yield send([gw.url], 30)
    assert seen[200] <= 19 and seen[429] >= 11, seen  # Redis counts again


@pytest_twisted.inlineCallbacks
def test_a_worker_killed_with_9_mid_window_does_not_reset_the_local_budget(
    reactor, upstream, gateways
):
    gw = yield gateways(limited(upstream.url, {"max": 20, "window": HOUR})).start()
    seen, _ = yield send([gw.url], 20)
    assert seen == {200: 20}
    for worker_id, pid in sorted(gw.workers().items()):
        mark = gw.mark()
        os.kill(pid, signal.SIGKILL)
        yield gw.wait_for(rf"Worker {worker_id} ready", since=mark)
    seen, _ = yield send([gw.url], 10)
    assert seen == {429: 10}, seen  # both replacements find the budget spent
    mark = gw.mark()
    gw.signal(signal.SIGUSR2)  # and a roll neither
    yield gw.wait_for(r"Rolling restart done: 2 worker\(s\) replaced", since=mark, timeout=30)
    seen, _ = yield send([gw.url], 10)
    assert seen == {429: 10}, seen


@pytest_twisted.inlineCallbacks
def test_two_workers_of_one_master_share_the_local_limit(reactor, upstream, gateways):
    gw = yield gateways(limited(upstream.url, {"max": 30, "window": HOUR})).start()
    seen, _ = yield send([gw.url], 100)
    assert seen == {200: 30, 429: 70}, seen
