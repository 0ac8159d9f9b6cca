"""
Tests for bungate.metrics with real processes.

prometheus_client picks where values live (memory or mmap files) from the environment,
so every process that *writes* metrics in multiprocess mode is a real child process with
``PROMETHEUS_MULTIPROC_DIR`` in its environment. This test process only reads the files
(``MultiProcessCollector`` needs no particular value class) and never sets the variable.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Optional

import pytest
import pytest_twisted
import treq
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.web.client import HTTPConnectionPool
from twisted.web.test.requesthelper import DummyRequest

import bungate
from bungate.http.metrics import MetricsResource, metrics_site
from bungate.ops.metrics import (
    ENV_VAR,
    GatewayMetrics,
)

REPO = Path(bungate.__file__).resolve().parents[1]
Samples = Mapping[tuple[str, frozenset[tuple[str, str]]], float]

# A worker: counts traffic, leaves one request in flight and dies by SIGKILL, as a
# crashing worker would. argv[1] is the number of successful GETs.
WORKER = """
import os, signal, sys
from bungate.ops.metrics import GatewayMetrics
m = GatewayMetrics()
for _ in range(int(sys.argv[1])):
    m.request_started()
    m.request_finished("GET", "/api/*", 200, 0.003)
m.request_started()
m.request_finished("POST", "/api/*", 502, 3.0)
m.request_started()
m.request_finished("BREW", "/api/*", 200, 0.003)
m.upstream_error("/api/*", "refused")
m.upstream_error("/api/*", "something-new")
m.request_started()
sys.stdout.flush()
os.kill(os.getpid(), signal.SIGKILL)
"""

# The master's part after the workers died: argv[1:] are their pids.
MASTER = """
import sys
from bungate.ops.metrics import MasterMetrics
m = MasterMetrics(states=("starting", "running", "stopping", "respawning", "failed"))
for pid in sys.argv[1:]:
    m.worker_exited(int(pid))
    m.worker_crashed("1")
    m.worker_restarted("1")
m.set_workers({"running": 2, "respawning": 1}, live=3)
m.set_workers({"running": 2, "failed": 1}, live=2)
"""

# A worker that exits normally after one request.
REPLACEMENT = """
from bungate.ops.metrics import GatewayMetrics
m = GatewayMetrics()
m.request_started()
m.request_finished("GET", "/api/*", 200, 0.003)
"""


def child_env(multiproc_dir: Optional[Path]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.lower() != ENV_VAR.lower()}
    env["PYTHONPATH"] = str(REPO)
    if multiproc_dir is not None:
        env[ENV_VAR] = str(multiproc_dir)
    return env


def run_py(
    code: str, env: Mapping[str, str], *args: str, expect_rc: int = 0
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter; fail the test on an unexpected exit code."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=dict(env),
        cwd=str(REPO),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == expect_rc, (proc.returncode, proc.stdout, proc.stderr)
    return proc


def parse(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def scrape(resource: MetricsResource) -> tuple[int, bytes, bytes]:
    """Render the resource the way twisted.web would for a GET."""
    request = DummyRequest([b"metrics"])
    body = resource.render_GET(request)
    content_type = request.responseHeaders.getRawHeaders(b"content-type", [b""])[0]
    return request.responseCode or 200, content_type, body


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def requests_of(samples: Samples) -> float:
    return sum(v for (name, _), v in samples.items() if name == "bungate_requests_total")


def run_crashing_workers(d: Path, gets: tuple[int, ...]) -> list[int]:
    pids = []
    for n in gets:
        proc = subprocess.Popen(
            [sys.executable, "-c", WORKER, str(n)],
            env=child_env(d),
            cwd=str(REPO),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL, (proc.returncode, out, err)
        pids.append(proc.pid)
    return pids


def test_fleet_totals_survive_worker_death(tmp_path: Path) -> None:
    """
    Two workers count and crash; the scrape shows their sum, the in-flight requests of
    dead workers disappear once the master marks them dead, and counters never go back.
    """
    d = tmp_path / "metrics"
    d.mkdir()
    pids = run_crashing_workers(d, (3, 5))
    resource = MetricsResource(path=str(d))

    code, content_type, body = scrape(resource)
    assert code == 200
    assert content_type.startswith(b"text/plain; version=")
    before = parse(body.decode())
    assert value(before, "bungate_requests_total", method="GET", route="/api/*", status="200") == 8
    assert value(before, "bungate_requests_total", method="POST", route="/api/*", status="502") == 2
    assert (
        value(before, "bungate_requests_total", method="OTHER", route="/api/*", status="200") == 2
    )
    assert value(before, "bungate_upstream_errors_total", route="/api/*", kind="refused") == 2
    assert value(before, "bungate_upstream_errors_total", route="/api/*", kind="other") == 2
    # Each dead worker still has one request in flight until the master reaps it.
    assert value(before, "bungate_inflight_requests") == 2

    run_py(MASTER, child_env(d), *map(str, pids))
    after = parse(scrape(resource)[2].decode())
    # No live worker wrote the gauge: the series is gone, not stuck at 2.
    assert ("bungate_inflight_requests", frozenset()) not in after
    for key, v in before.items():
        if key[0].endswith(("_total", "_count", "_sum", "_bucket")):
            assert after[key] == v, key
    assert value(after, "bungate_workers_crashed_total") == 2
    assert value(after, "bungate_workers_restarts_total") == 2
    assert value(after, "bungate_workers", state="running") == 2
    assert value(after, "bungate_workers", state="failed") == 1
    # A state that emptied goes to 0 rather than keeping its stale value.
    assert value(after, "bungate_workers", state="respawning") == 0
    # The fleet's size: the live workers (a failed slot is not one).
    assert value(after, "bungate_workers_total") == 2

    # A replacement worker adds to the totals instead of starting them over.
    run_py(REPLACEMENT, child_env(d))
    later = parse(scrape(resource)[2].decode())
    assert value(later, "bungate_requests_total", method="GET", route="/api/*", status="200") == 9
    assert requests_of(later) == requests_of(after) + 1
    assert value(later, "bungate_inflight_requests") == 0


def test_histogram_buckets_merge_across_workers(tmp_path: Path) -> None:
    d = tmp_path / "metrics"
    d.mkdir()
    run_crashing_workers(d, (3, 5))
    samples = parse(scrape(MetricsResource(path=str(d)))[2].decode())

    def bucket(le: str) -> float:
        return value(samples, "bungate_request_duration_seconds_bucket", route="/api/*", le=le)

    # 8 GETs + 2 OTHER at 3 ms, 2 POSTs at 3 s.
    assert bucket("0.005") == 10
    assert bucket("2.5") == 10
    assert bucket("5.0") == 12
    assert bucket("+Inf") == 12
    assert value(samples, "bungate_request_duration_seconds_count", route="/api/*") == 12
    assert value(samples, "bungate_request_duration_seconds_sum", route="/api/*") == pytest.approx(
        10 * 0.003 + 2 * 3.0
    )


def test_prepare_dir_wipes_exports_and_fixes_early_import(tmp_path: Path) -> None:
    """
    The master imports prometheus_client before preparing the directory; its metrics must
    still go to files, stale files of an earlier run go, and a child inherits the variable.
    """
    d = tmp_path / "metrics"
    d.mkdir()
    (d / "counter_1.db").write_bytes(b"stale")
    (d / "notes.txt").write_text("keep me")
    code = """
    import os, subprocess, sys
    import prometheus_client  # decides the value class now, with no variable set
    from bungate.ops.metrics import ENV_VAR, MasterMetrics, prepare_multiprocess_dir
    path = prepare_multiprocess_dir(sys.argv[1])
    assert os.environ[ENV_VAR] == path, path
    print(sorted(os.listdir(path)))
    MasterMetrics().worker_restarted("1")
    print(subprocess.check_output(
        [sys.executable, "-c", "import os; print(os.environ[%r])" % ENV_VAR], text=True
    ).strip())
    fresh = prepare_multiprocess_dir()
    print(os.path.basename(fresh).startswith("bungate-metrics-"), os.listdir(fresh))
    os.rmdir(fresh)
    """
    out = run_py(code, child_env(None), str(d)).stdout.splitlines()
    assert out == ["['notes.txt']", str(d), "True []"]
    samples = parse(scrape(MetricsResource(path=str(d)))[2].decode())
    assert value(samples, "bungate_workers_restarts_total") == 1
    assert (d / "notes.txt").exists()


def test_single_process_mode_uses_the_plain_registry(tmp_path: Path) -> None:
    code = """
    import os
    from twisted.web.test.requesthelper import DummyRequest
    from bungate.http.metrics import MetricsResource
    from bungate.ops.metrics import GatewayMetrics, MasterMetrics
    m = GatewayMetrics()
    m.request_started()
    m.request_finished("GET", "/", 404, 0.02)
    m.request_started()
    MasterMetrics().worker_exited(12345)  # no directory: nothing to clean, no error
    print(MetricsResource().render_GET(DummyRequest([b""])).decode())
    """
    out = run_py(code, child_env(None)).stdout
    samples = parse(out)
    assert value(samples, "bungate_requests_total", method="GET", route="/", status="404") == 1
    assert value(samples, "bungate_inflight_requests") == 1
    assert value(samples, "bungate_request_duration_seconds_count", route="/") == 1
    assert not list(tmp_path.iterdir())


def test_disabled_metrics_create_nothing() -> None:
    m = GatewayMetrics(enabled=False)
    assert not m.enabled
    m.request_started()
    m.request_finished("GET", "/", 200, 0.1)
    m.upstream_error("/", "timeout")
    assert not hasattr(m, "_requests")


def test_labels_are_bounded_and_children_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    registry = CollectorRegistry()
    m = GatewayMetrics(registry=registry)
    for method in ("GET", "GET", "FOO", "BAR", "get"):
        m.request_started()
        m.request_finished(method, "/a", 200, 0.01)
    m.upstream_error("/a", "reset")
    m.upstream_error("/a", "whatever")
    m.upstream_error("/a", "else")
    assert set(m._requests_children) == {("GET", "/a", 200), ("OTHER", "/a", 200)}
    assert set(m._error_children) == {("/a", "reset"), ("/a", "other")}
    assert (
        registry.get_sample_value(
            "bungate_requests_total", {"method": "OTHER", "route": "/a", "status": "200"}
        )
        == 3
    )
    assert registry.get_sample_value("bungate_inflight_requests") == 0


@pytest_twisted.ensureDeferred
async def test_scrapes_over_new_connections_agree(tmp_path: Path) -> None:
    d = tmp_path / "metrics"
    d.mkdir()
    run_crashing_workers(d, (2, 4))
    run_py(REPLACEMENT, child_env(d))
    site = metrics_site("/metrics", MetricsResource(path=str(d)))
    port = reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[attr-defined]
    pool = HTTPConnectionPool(reactor, persistent=False)
    try:
        base = f"http://127.0.0.1:{port.getHost().port}"
        totals = []
        for _ in range(3):
            response = await treq.get(base + "/metrics", pool=pool)
            assert response.code == 200
            assert response.headers.getRawHeaders("content-type")[0].startswith("text/plain")
            samples = parse(await response.text())
            totals.append(requests_of(samples))
        assert totals == [2 + 4 + 4 + 1] * 3
        missing = await treq.get(base + "/other", pool=pool)
        assert missing.code == 404
        await missing.content()
    finally:
        await pool.closeCachedConnections()
        await port.stopListening()


def test_tunnels_are_counted_open_refused_closed_and_in_bytes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    registry = CollectorRegistry()
    m = GatewayMetrics(registry=registry)
    m.tunnel_opened()
    m.tunnel_opened()
    m.tunnel_refused()
    m.tunnel_closed("idle_timeout", 10, 200)
    assert registry.get_sample_value("bungate_websocket_tunnels_open") == 1
    assert registry.get_sample_value("bungate_websocket_tunnels_opened_total") == 2
    assert registry.get_sample_value("bungate_websocket_tunnels_refused_total") == 1
    assert (
        registry.get_sample_value(
            "bungate_websocket_tunnels_closed_total", {"reason": "idle_timeout"}
        )
        == 1
    )
    assert registry.get_sample_value("bungate_websocket_bytes_total", {"direction": "up"}) == 10
    assert registry.get_sample_value("bungate_websocket_bytes_total", {"direction": "down"}) == 200
    disabled = GatewayMetrics(enabled=False)
    disabled.tunnel_opened()
    disabled.tunnel_refused()
    disabled.tunnel_closed("drain", 1, 1)
