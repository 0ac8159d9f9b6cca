"""
How the proxy trusts https upstreams (bungate.http.upstream.tls), against real TLS
upstreams on 127.0.0.1.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import trustme
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import reactor
from twisted.web.client import Agent, HTTPConnectionPool, ResponseNeverReceived, readBody

from bungate.config import RouteConfig, parse_config
from bungate.http.upstream.tls import upstream_tls_policy
from tests.tlskit import (
    TIMEOUT,
    listen_tls,
    tls_config,
    write_pair,
)


def routes(*items: dict[str, Any]) -> Sequence[RouteConfig]:
    return parse_config({"routes": list(items)}, source="gw.yaml").routes


# --- (h) upstream TLS policy -------------------------------------------------------------


@pytest.fixture
def upstream(ca: trustme.CA, tmp_path: Path) -> Iterator[tuple[int, int]]:
    """Two HTTPS upstreams whose certificate (for 127.0.0.1 only) the system does not trust."""
    pair = write_pair(ca.issue_cert("127.0.0.1"), tmp_path, "upstream")
    ports = [listen_tls(tls_config(*pair)) for _ in range(2)]
    yield ports[0].getHost().port, ports[1].getHost().port
    for p in ports:
        pytest_twisted.blockon(p.stopListening())


@pytest_twisted.inlineCallbacks
def fetch(policy: Any, url: str) -> Iterator[Any]:
    pool = HTTPConnectionPool(reactor, persistent=False)
    agent = Agent(reactor, contextFactory=policy, pool=pool)
    d = agent.request(b"GET", url.encode())
    d.addTimeout(TIMEOUT, reactor)
    response = yield d
    body = yield readBody(response)
    return response.code, body


def assert_tls_refused(failure_holder: Any) -> None:
    error = failure_holder.value
    assert isinstance(error, ResponseNeverReceived), error
    assert any(reason.check(SSL.Error, VerificationError) for reason in error.reasons), error


@pytest_twisted.inlineCallbacks
def test_upstream_default_verifies(upstream: tuple[int, int]) -> Iterator[Any]:
    url = f"https://127.0.0.1:{upstream[0]}/x"
    policy = upstream_tls_policy(routes({"pattern": "/x", "target": url}))
    with pytest.raises(ResponseNeverReceived) as caught:
        yield fetch(policy, url)
    assert_tls_refused(caught)


@pytest_twisted.inlineCallbacks
def test_upstream_ca_file(upstream: tuple[int, int], ca_file: str) -> Iterator[Any]:
    url = f"https://127.0.0.1:{upstream[0]}"
    policy = upstream_tls_policy(routes({"pattern": "/x", "target": url, "ca_file": ca_file}))
    code, body = yield fetch(policy, url + "/y?z=1")
    assert (code, body) == (200, b"hello /y?z=1")
    # the other upstream is not covered by the ca_file: still verified by the system store
    with pytest.raises(ResponseNeverReceived) as caught:
        yield fetch(policy, f"https://127.0.0.1:{upstream[1]}/y")
    assert_tls_refused(caught)


@pytest_twisted.inlineCallbacks
def test_upstream_ca_file_of_another_ca(upstream: tuple[int, int], tmp_path: Path) -> Iterator[Any]:
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    url = f"https://127.0.0.1:{upstream[0]}"
    policy = upstream_tls_policy(routes({"pattern": "/x", "target": url, "ca_file": str(other)}))
    with pytest.raises(ResponseNeverReceived) as caught:
        yield fetch(policy, url + "/y")
    assert_tls_refused(caught)


@pytest_twisted.inlineCallbacks
def test_upstream_ca_file_still_checks_hostname(
    upstream: tuple[int, int], ca_file: str
) -> Iterator[Any]:
    url = f"https://localhost:{upstream[0]}"  # the certificate names 127.0.0.1 only
    policy = upstream_tls_policy(routes({"pattern": "/x", "target": url, "ca_file": ca_file}))
    with pytest.raises(ResponseNeverReceived) as caught:
        yield fetch(policy, url + "/y")
    assert_tls_refused(caught)


@pytest_twisted.inlineCallbacks
def test_upstream_load_balancer_targets(upstream: tuple[int, int], ca_file: str) -> Iterator[Any]:
    a, b = (f"https://127.0.0.1:{p}" for p in upstream)
    lb = {"targets": [{"url": a}, {"url": b}]}
    policy = upstream_tls_policy(routes({"pattern": "/x", "load_balancer": lb, "ca_file": ca_file}))
    for url in (a, b):
        code, _ = yield fetch(policy, url + "/")
        assert code == 200


@pytest_twisted.inlineCallbacks
def test_upstream_tls_verify_false(upstream: tuple[int, int]) -> Iterator[Any]:
    url = f"https://127.0.0.1:{upstream[0]}"
    policy = upstream_tls_policy(
        routes(
            {"pattern": "/x", "target": url, "tls_verify": False},
            {"pattern": "/y", "target": f"https://127.0.0.1:{upstream[1]}"},
        )
    )
    code, body = yield fetch(policy, url + "/q")
    assert (code, body) == (200, b"hello /q")
    with pytest.raises(ResponseNeverReceived) as caught:
        yield fetch(policy, f"https://127.0.0.1:{upstream[1]}/q")
    assert_tls_refused(caught)
