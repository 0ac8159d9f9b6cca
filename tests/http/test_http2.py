"""
HTTP/2 to clients: curl and h2load (real HTTP/2 clients, from Debian's curl and
nghttp2-client) against a gateway in this process, over TLS (ALPN) and h2c.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import trustme
from twisted.internet import defer, threads
from twisted.internet import reactor as _reactor

from bungate import Gateway
from bungate.testing import wait_until
from tests.tlskit import write_pair

reactor: Any = _reactor
CURL = shutil.which("curl") or "curl"
H2LOAD = shutil.which("h2load")
needs_h2load = pytest.mark.skipif(
    H2LOAD is None and not __import__("os").environ.get("CI"),
    reason="h2load is not installed (apt-get install nghttp2-client)",
)


@pytest.fixture
def tls_files(ca: trustme.CA, tmp_path: Path) -> tuple[str, str, str]:
    cert, key = write_pair(ca.issue_cert("127.0.0.1", "localhost"), tmp_path, "gw")
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return cert, key, str(ca_file)


@pytest.fixture
def gateways() -> Any:
    made: list[Gateway] = []

    def make(upstream_url: str, **server: Any) -> Any:
        gw = Gateway(
            {
                "server": {"host": "127.0.0.1", "port": 0, "max_body_size": 1000, **server},
                "logger": {"request_logging": False, "level": "error"},
                "cluster": {"shutdown_timeout": 10},
                "routes": [{"pattern": "/api/*", "target": upstream_url}],
            }
        )
        made.append(gw)

        def listening(_: Any) -> Gateway:
            gw.port = gw.ports[0].getHost().port  # type: ignore[attr-defined]
            return gw

        return gw.listen().addCallback(listening)

    yield make
    for gw in made:
        pytest_twisted.blockon(gw.close())


def curl(*args: str) -> defer.Deferred[subprocess.CompletedProcess[str]]:
    return threads.deferToThread(
        subprocess.run,
        [CURL, "-sS", "--max-time", "20", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest_twisted.inlineCallbacks
def test_alpn_h2_serves_the_routes_over_http2(gateways, upstream, tls_files):
    cert, key, ca_file = tls_files
    gw = yield gateways(upstream.url, tls={"enabled": True, "cert": cert, "key": key})
    url = f"https://127.0.0.1:{gw.port}/api/h2?x=1"
    done = yield curl("--http2", "--cacert", ca_file, "-w", "%{http_version} %{http_code}", url)
    assert done.returncode == 0, done.stderr
    body, _, tail = done.stdout.rpartition("}")
    assert tail.strip() == "2 200", done.stdout
    doc = json.loads(body + "}")
    assert doc["uri"] == "/api/h2?x=1" and doc["headers"]["x-forwarded-proto"] == ["https"]
    # HTTP/1.1 still works on the same listener.
    done = yield curl(
        "--http1.1", "--cacert", ca_file, "-o", "/dev/null", "-w", "%{http_version}", url
    )
    assert done.stdout == "1.1"


@pytest_twisted.inlineCallbacks
def test_alpn_can_be_limited_to_http11(gateways, upstream, tls_files):
    cert, key, ca_file = tls_files
    gw = yield gateways(
        upstream.url, tls={"enabled": True, "cert": cert, "key": key, "alpn": ["http/1.1"]}
    )
    url = f"https://127.0.0.1:{gw.port}/api/x"
    done = yield curl(
        "--http2", "--cacert", ca_file, "-o", "/dev/null", "-w", "%{http_version}", url
    )
    assert done.stdout == "1.1"


@pytest_twisted.inlineCallbacks
def test_h2c_with_prior_knowledge_only_when_configured(gateways, upstream):
    gw = yield gateways(upstream.url, http2_cleartext=True)
    url = f"http://127.0.0.1:{gw.port}/api/c"
    done = yield curl(
        "--http2-prior-knowledge", "-o", "/dev/null", "-w", "%{http_version} %{http_code}", url
    )
    assert done.stdout == "2 200", done.stderr
    plain = yield gateways(upstream.url)
    url = f"http://127.0.0.1:{plain.port}/api/c"
    done = yield curl("--http2-prior-knowledge", "-o", "/dev/null", "-w", "%{http_code}", url)
    assert done.stdout != "200"
    # curl --http2 on plain HTTP asks for an h2c upgrade: ignored, answered in HTTP/1.1.
    done = yield curl("--http2", "-o", "/dev/null", "-w", "%{http_version} %{http_code}", url)
    assert done.stdout == "1.1 200"


@pytest_twisted.inlineCallbacks
def test_limits_apply_per_stream(gateways, upstream, tls_files):
    cert, key, ca_file = tls_files
    gw = yield gateways(upstream.url, tls={"enabled": True, "cert": cert, "key": key})
    url = f"https://127.0.0.1:{gw.port}/api/post"
    done = yield curl(
        "--http2", "--cacert", ca_file, "-w", " %{http_code}", "--data-binary", "x" * 5000, url
    )
    assert done.stdout.endswith(" 413"), done.stdout
    assert "payload_too_large" in done.stdout
    done = yield curl(
        "--http2", "--cacert", ca_file, "-o", "/dev/null", "-w", "%{http_code}", "-X", "TRACE", url
    )
    assert done.stdout == "405"


@needs_h2load
@pytest_twisted.inlineCallbacks
def test_many_concurrent_streams_with_h2load(gateways, upstream, tls_files):
    cert, key, _ = tls_files
    gw = yield gateways(upstream.url, tls={"enabled": True, "cert": cert, "key": key})
    done = yield threads.deferToThread(
        subprocess.run,
        [H2LOAD, "-n", "400", "-c", "4", "-m", "20", f"https://127.0.0.1:{gw.port}/api/load"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "400 succeeded, 0 failed, 0 errored" in done.stdout, done.stdout + done.stderr
    assert "h2" in done.stdout  # the protocol h2load negotiated


@pytest_twisted.inlineCallbacks
def test_a_drain_sends_goaway_and_lets_the_stream_in_flight_finish(gateways, upstream, tls_files):
    cert, key, ca_file = tls_files
    gw = yield gateways(upstream.url, tls={"enabled": True, "cert": cert, "key": key})
    url = f"https://127.0.0.1:{gw.port}/api/slow?delay=1.5"
    pending = curl("--http2", "--cacert", ca_file, "-w", " %{http_version} %{http_code}", url)
    yield wait_until(reactor, lambda: any(r.path == b"/api/slow" for r in upstream.requests), 10)
    closing = gw.close()
    done = yield pending
    assert done.stdout.endswith(" 2 200"), done.stdout + done.stderr
    yield closing
