"""
Tests for bungate.extensions: plugin discovery through twisted.plugin.

The drop-in test runs in a subprocess, so that neither its sys.path nor Twisted's
dropin caches leak into other tests.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bungate.config import BUILTIN_STRATEGIES
from bungate.core.balancing import RoundRobin
from bungate.http import plugins
from bungate.http.plugins import find_middleware, find_strategy
from bungate.interfaces import IBalancer
from tests.conftest import run_with_plugin

DROP_IN = '''
"""A third-party plugin module: one strategy, one middleware, one clash."""
from twisted.plugin import IPlugin
from zope.interface import implementer, provider

from bungate.interfaces import IBalancer, IBalancerFactory, IMiddleware, IMiddlewareFactory


@implementer(IBalancer)
@provider(IPlugin, IBalancerFactory)
class LastTarget:
    name = "my-strategy"

    def pick(self, candidates, client_ip, rng):
        return candidates[-1]


@implementer(IBalancer)
@provider(IPlugin, IBalancerFactory)
class Impostor:
    name = "round-robin"

    def pick(self, candidates, client_ip, rng):
        return candidates[0]


@implementer(IMiddleware)
@provider(IPlugin, IMiddlewareFactory)
class Tag:
    name = "my-tag"

    def process_request(self, request, upstream):
        upstream.headers.setRawHeaders(b"x-tag", [b"on"])
        return None

    def process_response(self, request, status, headers):
        headers.setRawHeaders(b"x-seen", [str(status).encode()])
'''

SCRIPT = """
import json, random
from twisted.internet.task import Clock
from twisted.web.http_headers import Headers
from bungate.core.balancing import RouteBalancer
from bungate.config import CircuitBreakerConfig, LoadBalancerConfig, TargetConfig
from bungate.http.plugins import find_middleware, find_strategy, installed
from bungate.interfaces import IBalancerFactory, IMiddlewareFactory, UpstreamRequest

factory = find_strategy("my-strategy")
config = LoadBalancerConfig(
    strategy="my-strategy",
    targets=(TargetConfig("http://a:1"), TargetConfig("http://b:1")),
)
balancer = RouteBalancer(config, CircuitBreakerConfig(), factory(), Clock(), random.Random(0))
middleware = find_middleware("my-tag")()
upstream = UpstreamRequest(b"GET", b"/", Headers())
middleware.process_request(None, upstream)
response = Headers()
middleware.process_response(None, 201, response)
print(json.dumps({
    "picked": balancer.choose("1.2.3.4").url,
    "strategies": installed(IBalancerFactory),
    "middlewares": installed(IMiddlewareFactory),
    "round_robin": find_strategy("round-robin").__module__,
    "upstream_header": upstream.headers.getRawHeaders(b"x-tag")[0].decode(),
    "response_header": response.getRawHeaders(b"x-seen")[0].decode(),
}))
"""


def test_third_party_drop_in_is_found(tmp_path: Path) -> None:
    # A third-party distribution installs bungate/plugins/<module>.py into its own
    # sys.path entry, with no __init__.py in bungate/ or bungate/plugins/ there.
    found = run_with_plugin(tmp_path, "my_strategy", DROP_IN, SCRIPT)
    assert found["picked"] == "http://b:1"
    assert found["strategies"] == sorted([*BUILTIN_STRATEGIES, "my-strategy"])
    assert found["middlewares"] == ["my-tag"]
    assert found["round_robin"] == "bungate.core.balancing"  # a drop-in cannot shadow a built-in
    assert found["upstream_header"] == "on"
    assert found["response_header"] == "201"


@pytest.mark.parametrize("name", BUILTIN_STRATEGIES)
def test_every_builtin_strategy_is_a_plugin(name: str) -> None:
    factory = find_strategy(name)
    assert factory.name == name
    assert IBalancer.providedBy(factory())


def test_unknown_names_list_what_is_installed() -> None:
    with pytest.raises(LookupError) as e:
        find_strategy("no-such-strategy")
    message = str(e.value)
    assert "'no-such-strategy'" in message
    for name in BUILTIN_STRATEGIES:
        assert name in message
    with pytest.raises(LookupError, match="unknown middleware 'nope'; installed: "):
        find_middleware("nope")


def test_lookups_are_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    plugins.clear_cache()
    scans: list[object] = []
    real = plugins.getPlugins

    def counting(interface, package=None):  # type: ignore[no-untyped-def]
        scans.append(interface)
        return real(interface, package)

    monkeypatch.setattr(plugins, "getPlugins", counting)
    for _ in range(3):
        assert find_strategy("round-robin") is RoundRobin
    assert len(scans) == 1
