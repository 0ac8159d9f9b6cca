"""
Issue 4 end to end: fleet-wide metrics, structured logs, request ids and health, with
real ``twist bungate`` processes, real sockets and real signals.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
from collections import Counter
from typing import Any, Optional

import pytest_twisted
import treq
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, threads

from bungate.testing import wait_until
from tests.integration.conftest import cluster_config

# --- helpers ------------------------------------------------------------------------------


def metrics_config(upstream_url: str, workers: int = 2, **metrics: Any) -> dict[str, Any]:
    config = cluster_config(upstream_url, workers=workers)
    config["metrics"] = {"enabled": True, **metrics}
    config["logger"] = {"level": "info", "request_logging": True}
    return config


def free_port() -> int:
    sock = socket.socket()
    try:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
    finally:
        sock.close()


def parse_metrics(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """``{(sample name, labels): value}`` of a Prometheus text exposition."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def total(samples: dict[Any, float], name: str, **labels: str) -> float:
    """The sum of every sample of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


@defer.inlineCallbacks
def scrape(url: str) -> Any:
    """One scrape over a new connection: the parsed samples."""
    response = yield treq.get(url, persistent=False)
    body = yield response.text()
    assert response.code == 200, body
    assert response.headers.getRawHeaders("content-type")[0].startswith("text/plain")
    return parse_metrics(body)


@defer.inlineCallbacks
def load(gw: Any, tag: str, count: int, batch: int = 20, start: int = 0) -> Any:
    """
    Send ``count`` proxied GETs in concurrent batches over new connections, numbered
    ``?i=start`` onwards (so the access lines of successive calls stay distinct).
    """
    sent = 0
    while sent < count:
        n = min(batch, count - sent)
        responses = yield defer.gatherResults(
            [treq.get(f"{gw.url}/{tag}?i={start + sent + i}", persistent=False) for i in range(n)]
        )
        for r in responses:
            assert r.code == 200
            yield r.content()
        sent += n
    return sent


def served_by(gw: Any, tag: str) -> Counter[int]:
    """How many distinct ``/tag`` requests each worker logged an access line for."""
    regex = re.compile(rf"\[worker (\d+)\].*bungate\.access.*GET /{tag}\?i=(\d+) 200")
    seen = set()
    for line in gw.lines:
        m = regex.search(line)
        if m:
            seen.add((int(m.group(1)), int(m.group(2))))
    return Counter(worker for worker, _ in seen)


@defer.inlineCallbacks
def spread_load(reactor: Any, gw: Any, tag: str) -> Any:
    """
    Load until both workers of a 2-worker fleet have answered some of it (the kernel
    may hand a whole burst to one worker); returns (requests sent, share per worker).
    """
    sent = 0
    for _ in range(10):
        sent += yield load(gw, tag, 40, start=sent)
        yield wait_until(
            reactor,
            lambda n=sent: sum(served_by(gw, tag).values()) == n,
            10,
            what="access lines",
        )
        shares = served_by(gw, tag)
        if len(shares) == 2:
            return sent, shares
    raise AssertionError(f"one worker answered all {sent} requests: {served_by(gw, tag)}")


def json_lines(gw: Any, since: int = 0) -> list[dict[str, Any]]:
    return [json.loads(line) for line in gw.lines[since:] if line.startswith("{")]


def dechunk(data: bytes) -> bytes:
    """The body of a complete chunked message."""
    body = b""
    while True:
        size_line, data = data.split(b"\r\n", 1)
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return body
        body, data = body + data[:size], data[size + 2 :]


class RawClient:
    """
    A blocking HTTP/1.1 client on one socket, driven from a thread, for exact control of
    keep-alive. Each method runs in the reactor's thread pool.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock: Optional[socket.socket] = None
        self.buffer = b""

    def _connect(self) -> None:
        self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)

    def connect(self) -> defer.Deferred[None]:
        return threads.deferToThread(self._connect)

    def _read_more(self) -> bytes:
        assert self.sock is not None
        data = self.sock.recv(65536)
        self.buffer += data
        return data

    def _request(self, path: str) -> tuple[int, dict[str, str], bytes, bool]:
        assert self.sock is not None
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
        while b"\r\n\r\n" not in self.buffer:
            if not self._read_more():
                raise ConnectionError("closed before a response")
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        closed = False
        if "content-length" in headers:
            length = int(headers["content-length"])
            while len(self.buffer) < length:
                if not self._read_more():
                    raise ConnectionError("closed mid-body")
            body, self.buffer = self.buffer[:length], self.buffer[length:]
        else:
            # Chunked or close-delimited: only used on responses that end the connection.
            while self._read_more():
                pass
            closed = True
            body, self.buffer = self.buffer, b""
            if headers.get("transfer-encoding", "").lower() == "chunked":
                body = dechunk(body)
        if headers.get("connection", "").lower() == "close" and not closed:
            # The server promised to close: it must actually do so.
            closed = self._read_more() == b""
        return int(status_line.split()[1]), headers, body, closed

    def request(self, path: str) -> defer.Deferred[tuple[int, dict[str, str], bytes, bool]]:
        """Fire with (status, headers, body, server closed the connection after it)."""
        return threads.deferToThread(self._request, path)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()


# --- 1. metrics: the same fleet-wide numbers from every worker ------------------------------


@pytest_twisted.inlineCallbacks
def test_every_scrape_shows_the_whole_fleet(reactor, upstream, gateways):
    gw = yield gateways(metrics_config(upstream.url)).start()
    sent, shares = yield spread_load(reactor, gw, "fleet")
    # Each worker answered only part of the load, so a per-worker view would be short.
    assert all(0 < n < sent for n in shares.values()), shares

    values = []
    for _ in range(3):
        scrapes = yield defer.gatherResults([scrape(gw.url + "/metrics") for _ in range(10)])
        values.extend(scrapes)
    for samples in values:
        assert total(samples, "bungate_requests_total") == sent
        assert (
            total(samples, "bungate_requests_total", method="GET", route="/*", status="200") == sent
        )
        assert total(samples, "bungate_request_duration_seconds_count", route="/*") == sent
        assert total(samples, "bungate_workers", state="running") == 2
        assert total(samples, "bungate_workers", state="failed") == 0
        assert total(samples, "bungate_inflight_requests") == 0
        assert total(samples, "bungate_workers_restarts_total") == 0
        assert total(samples, "bungate_workers_crashed_total") == 0
        assert total(samples, "bungate_workers_total") == 2  # the live workers
        # Only the documented states, each present once (a stopped slot leaves the fleet).
        states = {dict(ls)["state"] for (n, ls) in samples if n == "bungate_workers"}
        assert states == {"starting", "running", "stopping", "respawning", "failed"}
    # Route labels are patterns, never raw paths.
    routes = {dict(ls).get("route") for (n, ls) in values[0] if n == "bungate_requests_total"}
    assert routes == {"/*"}


# --- 2. kill -9: restarts and crashes counted, traffic counters do not go back ----------------


@pytest_twisted.inlineCallbacks
def test_kill_9_is_counted_and_counters_survive_it(reactor, upstream, gateways):
    gw = yield gateways(metrics_config(upstream.url)).start()
    sent, shares = yield spread_load(reactor, gw, "before")
    before = yield scrape(gw.url + "/metrics")
    assert total(before, "bungate_requests_total") == sent

    victim_id = shares.most_common(1)[0][0]  # a worker whose counts must survive it
    victim_pid = gw.workers()[victim_id]
    mark = gw.mark()
    os.kill(victim_pid, signal.SIGKILL)
    yield gw.wait_for(rf"Worker {victim_id} exited \(pid {victim_pid}\): crash", since=mark)
    yield gw.wait_for(r"Worker \d+ ready", since=mark)
    assert victim_pid not in gw.workers().values()

    for _ in range(10):
        after = yield scrape(gw.url + "/metrics")
        assert total(after, "bungate_workers_restarts_total") >= 1
        assert total(after, "bungate_workers_crashed_total") >= 1
        assert total(after, "bungate_workers", state="running") == 2
        for key, value in before.items():
            if key[0] in ("bungate_requests_total", "bungate_request_duration_seconds_count"):
                assert after.get(key, 0) >= value, key
        assert total(after, "bungate_requests_total") == sent
        assert total(after, "bungate_inflight_requests") == 0

    # The replacement adds to the totals.
    yield load(gw, "after", 5)
    later = yield scrape(gw.url + "/metrics")
    assert total(later, "bungate_requests_total") == sent + 5


# --- 3. metrics.listen: a separate address, and /metrics is an ordinary path ----------------


@pytest_twisted.inlineCallbacks
def test_metrics_listen_serves_on_its_own_address(reactor, upstream, gateways):
    port = free_port()
    gw = yield gateways(metrics_config(upstream.url, listen=f"127.0.0.1:{port}")).start()
    metrics_url = f"http://127.0.0.1:{port}"

    # On the gateway port, /metrics is routed like any path: to the upstream.
    r = yield treq.get(gw.url + "/metrics", persistent=False)
    assert r.code == 200
    echo = json.loads((yield r.text()))
    assert echo["uri"] == "/metrics" and echo["server"] == "upstream"

    for _ in range(5):
        samples = yield scrape(metrics_url + "/metrics")
        assert total(samples, "bungate_requests_total", route="/*") == 1
        assert total(samples, "bungate_workers", state="running") == 2
    r = yield treq.get(metrics_url + "/health", persistent=False)
    assert r.code == 404
    yield r.content()


# --- 4. logs: JSON and text ---------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_json_log_lines(reactor, upstream, gateways):
    config = cluster_config(upstream.url)
    config["logger"] = {"level": "info", "format": "json", "request_logging": True}
    gw = gateways(config)
    # Let the tap pick the format from logger.format.
    # (GatewayProcess(twist_args=[]) falls back to "--log-format text": `[] or default`.)
    gw.twist_args = []
    yield gw.start()

    r = yield treq.get(
        gw.url + "/json-check?x=1", headers={"X-Request-Id": "json-1"}, persistent=False
    )
    assert r.code == 200
    yield r.content()
    yield gw.wait_for(r'"namespace": "bungate.access"')

    # Every line of the whole fleet's output is one JSON object.
    records = [json.loads(line) for line in gw.lines]
    for record in records:
        for key in ("timestamp", "level", "namespace", "worker_id", "pid", "message"):
            assert key in record, record
        assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\Z", record["timestamp"])

    [access] = [r for r in records if r["namespace"] == "bungate.access"]
    live = gw.workers()
    assert access["method"] == "GET"
    assert access["path"] == "/json-check?x=1"
    assert access["status"] == 200
    assert isinstance(access["duration"], float) and 0 <= access["duration"] < 5
    assert access["bytes_sent"] > 0
    assert access["route"] == "/*"
    assert access["upstream"] == upstream.url
    assert access["request_id"] == "json-1"
    assert access["worker_id"] in ("1", "2")
    assert access["pid"] == live[int(access["worker_id"])]
    assert access["level"] == "info"

    # Master lifecycle lines name the worker (as a string, like the workers' own lines).
    ready = [r for r in records if r.get("event") == "worker-ready"]
    assert sorted(r["worker_id"] for r in ready) == ["1", "2"]
    for r in ready:
        assert r["namespace"] == "bungate.master"
        assert r["pid"] == gw.pid
        assert r["worker_pid"] == live[int(r["worker_id"])]
        assert re.match(r"Worker \d ready \(pid \d+\)", r["message"])

    # An exit is a line with its code, signal and kind as fields.
    mark = gw.mark()
    os.kill(live[1], signal.SIGKILL)
    yield gw.wait_for(r'"event": "worker-ready"', since=mark)
    exits = [r for r in json_lines(gw, mark) if r.get("event") == "worker-exit"]
    assert exits and exits[0]["worker_id"] == "1"
    assert exits[0]["signal"] == signal.SIGKILL and exits[0]["code"] is None
    assert exits[0]["kind"] == "crash" and exits[0]["level"] == "info"
    respawn = [r for r in json_lines(gw, mark) if r.get("event") == "worker-respawn"]
    assert respawn and respawn[0]["level"] == "warn" and respawn[0]["delay"] >= 0


@pytest_twisted.inlineCallbacks
def test_text_log_lines_from_the_config(reactor, upstream, gateways):
    config = cluster_config(upstream.url)
    config["logger"] = {"level": "info", "format": "text", "request_logging": True}
    gw = gateways(config)
    gw.twist_args = []
    yield gw.start()

    r = yield treq.get(gw.url + "/text-check", persistent=False)
    assert r.code == 200
    rid = r.headers.getRawHeaders("x-request-id")[0]
    yield r.content()
    access = (
        r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z info \[worker [12]\] bungate\.access: "
        rf"GET /text-check 200 \d+\.\dms \d+B route=/\* upstream={re.escape(upstream.url)} "
        rf"id={rid}$"
    )
    yield gw.wait_for(access)
    # Exactly one access line per request: no second observer writing it again.
    assert gw.count(r"GET /text-check") == 1, "\n".join(gw.lines)
    assert gw.count(r"^\S+Z info \[master\] bungate\.master: Worker 1 ready \(pid \d+\)$") == 1
    # Nothing in the output is in another format.
    for line in gw.lines:
        assert re.match(
            r"^\S+Z (debug|info|warn|error|critical) \[(master|worker \d+)\] \S+: ", line
        ), line


@pytest_twisted.inlineCallbacks
def test_text_access_line_with_twist_log_format(reactor, upstream, gateways):
    config = cluster_config(upstream.url)
    config["logger"] = {"level": "info", "request_logging": True}
    gw = yield gateways(config).start()  # twist --log-format text
    r = yield treq.get(gw.url + "/twist-text?q=1", persistent=False)
    assert r.code == 200
    yield r.content()
    m = yield gw.wait_for(r"\[worker (\d)\].*bungate\.access.*GET /twist-text\?q=1 200 ")
    assert m.group(1) in ("1", "2")
    assert gw.count(r"GET /twist-text") == 1, "\n".join(gw.lines)


# --- 5. request ids -----------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_request_id_travels_upstream_and_back(reactor, upstream, gateways):
    gw = yield gateways(cluster_config(upstream.url, workers=1)).start()

    r = yield treq.get(gw.url + "/echo", headers={"X-Request-Id": "abc-123"}, persistent=False)
    echo = json.loads((yield r.text()))
    assert r.headers.getRawHeaders("x-request-id") == ["abc-123"]
    assert echo["headers"]["x-request-id"] == ["abc-123"]

    made = []
    for _ in range(2):
        r = yield treq.get(gw.url + "/echo", persistent=False)
        echo = json.loads((yield r.text()))
        [rid] = r.headers.getRawHeaders("x-request-id")
        assert re.match(r"[0-9a-f]{16,}\Z", rid), rid
        assert echo["headers"]["x-request-id"] == [rid]
        made.append(rid)
    assert made[0] != made[1]

    # An upstream error answer carries the id too.
    r = yield treq.get(gw.url + "/status/503", headers={"X-Request-Id": "err-1"}, persistent=False)
    assert r.code == 503
    assert r.headers.getRawHeaders("x-request-id") == ["err-1"]
    yield r.content()


@pytest_twisted.inlineCallbacks
def test_request_id_with_spaces_is_replaced(reactor, upstream, gateways):
    gw = yield gateways(cluster_config(upstream.url, workers=1)).start()
    r = yield treq.get(gw.url + "/echo", headers={"X-Request-Id": "a b c"}, persistent=False)
    yield r.content()
    [rid] = r.headers.getRawHeaders("x-request-id")
    assert re.match(r"[0-9a-f]{32}\Z", rid), rid


# --- 6. health ----------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_health_document(reactor, upstream, gateways):
    gw = yield gateways(cluster_config(upstream.url, workers=2)).start()
    live = gw.workers()
    seen = {}

    @defer.inlineCallbacks
    def check() -> Any:
        r = yield treq.get(gw.url + "/health", persistent=False)
        assert r.code == 200
        assert r.headers.getRawHeaders("content-type") == ["application/json"]
        doc = json.loads((yield r.text()))
        return doc

    # The master shares the fleet summary right after a worker turns ready: poll
    # until each worker has it.
    for _ in range(200):
        docs = yield defer.gatherResults([check() for _ in range(10)])
        for doc in docs:
            if "fleet" in doc:
                seen[doc["worker_id"]] = doc
        if len(seen) == 2:
            break
    assert set(seen) == {"1", "2"}
    for wid, doc in seen.items():
        assert doc["status"] == "ok"
        assert doc["pid"] == live[int(wid)]
        assert isinstance(doc["uptime"], (int, float)) and 0 <= doc["uptime"] < 60
        assert doc["fleet"] == {"running": 2, "desired": 2, "failed": 0}


@pytest_twisted.inlineCallbacks
def test_health_is_503_while_the_worker_drains(reactor, upstream, gateways):
    gw = yield gateways(cluster_config(upstream.url, workers=1)).start()
    [pid] = gw.workers().values()

    keepalive = RawClient(gw.port)
    slow = RawClient(gw.port)
    try:
        yield keepalive.connect()
        status, headers, body, closed = yield keepalive.request("/health")
        assert status == 200 and not closed
        assert json.loads(body)["status"] == "ok"
        assert headers.get("connection", "").lower() != "close"

        yield slow.connect()
        in_flight = slow.request("/slow?delay=3")
        yield wait_until(reactor, lambda: upstream.requests, 10, what="the slow request upstream")

        mark = gw.mark()
        os.kill(pid, signal.SIGTERM)  # the worker itself, not the master
        # The worker logs its port closing once the drain has begun.
        yield gw.wait_for(r"\[worker 1\].*Port \d+ Closed", since=mark)

        status, headers, body, closed = yield keepalive.request("/health")
        assert status == 503
        doc = json.loads(body)
        assert doc["status"] == "draining" and doc["pid"] == pid
        assert headers["connection"].lower() == "close"
        assert closed

        # The request in flight still completes, with Connection: close.
        status, headers, body, closed = yield in_flight
        assert (status, body) == (200, b"slow done")
        assert headers["connection"].lower() == "close"

        # An unexpected clean exit: respawned.
        yield gw.wait_for(rf"Worker 1 exited \(pid {pid}\): clean, exit code 0", since=mark)
        yield gw.wait_for(r"Worker 1 ready", since=mark)
    finally:
        keepalive.close()
        slow.close()


# --- 7. master lifecycle lines --------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_lifecycle_lines_an_operator_can_grep(reactor, upstream, gateways):
    gw = yield gateways(cluster_config(upstream.url, workers=1)).start()
    yield gw.wait_for(r"bungate\.master#info\] Worker 1 spawned \(pid \d+, restarts 0\)")
    yield gw.wait_for(r"bungate\.master#info\] Worker 1 ready \(pid \d+\)")

    # Crash: exit with signal and kind, respawn delay, a new spawn.
    pid = gw.workers()[1]
    mark = gw.mark()
    os.kill(pid, signal.SIGKILL)
    yield gw.wait_for(rf"Worker 1 exited \(pid {pid}\): crash, signal SIGKILL", since=mark)
    yield gw.wait_for(
        r"#warn\] Worker 1 will respawn in \d+\.\d\ds after a crash \(restart 1\)", since=mark
    )
    yield gw.wait_for(r"Worker 1 spawned \(pid \d+, restarts 1\)", since=mark)
    yield gw.wait_for(r"Worker 1 ready", since=mark)

    # Scale up.
    mark = gw.mark()
    gw.signal(signal.SIGTTIN)
    yield gw.wait_for(r"Received SIGTTIN", since=mark)
    yield gw.wait_for(r"Fleet scaled from 1 to 2 workers", since=mark)
    yield gw.wait_for(r"Worker 2 ready", since=mark)

    # Rolling restart.
    mark = gw.mark()
    gw.signal(signal.SIGUSR2)
    yield gw.wait_for(r"Rolling restart started: 2 worker\(s\) to replace", since=mark)
    yield gw.wait_for(r"Rolling restart: worker 3 is ready, stopping worker 1", since=mark)
    yield gw.wait_for(r"Worker 1 stopping \(pid \d+\): draining", since=mark)
    yield gw.wait_for(r"Worker 1 exited \(pid \d+\): stopped, ", since=mark)
    yield gw.wait_for(r"Rolling restart: worker 4 is ready, stopping worker 2", since=mark)
    yield gw.wait_for(r"Rolling restart done: 2 worker\(s\) replaced", since=mark)

    # Reload refused, then accepted.
    mark = gw.mark()
    bad = dict(gw.config, routes=[{"pattern": "no-slash", "target": upstream.url}])
    gw.write_config(bad)
    gw.signal(signal.SIGHUP)
    yield gw.wait_for(
        r"#error\] Configuration reload refused, still serving the old one: ", since=mark
    )
    mark = gw.mark()
    gw.write_config(gw.config)
    gw.signal(signal.SIGHUP)
    yield gw.wait_for(r"Configuration reloaded from ", since=mark)
    yield gw.wait_for(r"Rolling restart done", since=mark)


@pytest_twisted.inlineCallbacks
def test_failed_slot_is_logged_and_counted(reactor, upstream, gateways):
    config = metrics_config(upstream.url, workers=2)
    config["cluster"]["restart_workers"] = False
    gw = yield gateways(config).start()
    pid = gw.workers()[2]
    mark = gw.mark()
    os.kill(pid, signal.SIGKILL)
    yield gw.wait_for(
        r"#error\] Worker 2 failed, not respawning: restart_workers is false", since=mark
    )

    for _ in range(5):
        samples = yield scrape(gw.url + "/metrics")
        assert total(samples, "bungate_workers", state="failed") == 1
        assert total(samples, "bungate_workers", state="running") == 1
        assert total(samples, "bungate_workers_crashed_total") == 1
        assert total(samples, "bungate_workers_restarts_total") == 0


@pytest_twisted.inlineCallbacks
def test_twist_log_level_overrides_the_config_level(reactor, upstream, gateways):
    """``twist --log-level info`` shows info lines even when ``logger.level`` is error."""
    config = cluster_config(upstream.url, workers=1)
    config["logger"]["level"] = "error"
    gw = gateways(config, twist_args=["--log-level", "info"])
    # start() waits for the master's info lines ("listening on", "Fleet ready")
    yield gw.start(timeout=20)
    assert gw.count(r"info.*Fleet ready") == 1
