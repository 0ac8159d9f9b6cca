from __future__ import annotations

import json
from collections import Counter

import pytest_twisted
import treq
from twisted.internet import defer

from tests.integration.conftest import cluster_config


@pytest_twisted.inlineCallbacks
def test_two_workers_share_concurrent_load(reactor, upstream, gateways):
    gw = yield gateways(cluster_config(upstream.url)).start()

    @defer.inlineCallbacks
    def one():
        r = yield treq.get(gw.url + "/health", persistent=False)
        return json.loads((yield r.content()))["worker_id"]

    shares = Counter()
    for _ in range(10):
        ids = yield defer.gatherResults([one() for _ in range(20)])
        shares.update(ids)
    print("per-worker share:", dict(shares))
    assert set(shares) == {"1", "2"}
