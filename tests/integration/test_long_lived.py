"""
Long-lived connections through a real fleet: a WebSocket tunnel kept open through a roll
and a scale-down until the drain's deadline, and HTTP/2 under load through a roll.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import trustme
from twisted.internet import task, threads
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from bungate.core.wsframe import CLOSE_GOING_AWAY
from bungate.testing import wait_until
from tests.http.test_tunnel import AUTOBAHN_OPTIONS, ClientFactory, EchoFactory, Watch
from tests.integration.conftest import cluster_config
from tests.tlskit import write_pair

SHUTDOWN = 6.0


@pytest.fixture
def watch() -> Watch:
    return Watch()


@pytest.fixture
def echo(reactor: Any, watch: Watch) -> Any:
    factory = EchoFactory(watch)
    factory.setProtocolOptions(**AUTOBAHN_OPTIONS)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    factory.url = f"http://127.0.0.1:{port.getHost().port}"
    yield factory
    pytest_twisted.blockon(port.stopListening())


def ws_config(upstream_url: str, **cluster: Any) -> dict[str, Any]:
    config = cluster_config(upstream_url, shutdown_timeout=SHUTDOWN, **cluster)
    config["routes"] = [{"pattern": "/*", "target": upstream_url}]
    return config


def open_client(reactor: Any, watch: Watch, port: int) -> Any:
    factory = ClientFactory(watch, f"ws://127.0.0.1:{port}/chat")
    factory.setProtocolOptions(**AUTOBAHN_OPTIONS)
    protocol = factory.buildProtocol(None)
    d = connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), protocol)
    return d.addCallback(
        lambda p: watch.until(lambda: p.opened, "the handshake").addCallback(lambda _: p)
    )


@pytest.mark.parametrize("how", ["roll", "scale-down"])
@pytest_twisted.inlineCallbacks
def test_a_tunnel_outlives_its_workers_drain_until_the_deadline(
    reactor, gateways, echo, watch, how
):
    gw = yield gateways(ws_config(echo.url, workers=2)).start()
    clients = []
    for _ in range(4):  # on both workers, whichever takes which
        clients.append((yield open_client(reactor, watch, gw.port)))
    mark = gw.mark()
    started = reactor.seconds()
    gw.signal(signal.SIGUSR2 if how == "roll" else signal.SIGTTOU)
    # The master logs "stopping" when it tells a worker; the worker logs "Draining" once
    # it stopped accepting (before that, a new connection may still land on it).
    yield gw.wait_for(r"Draining: stopped accepting", since=mark, timeout=30)
    # Draining workers keep their tunnels: every client is still echoed.
    for i, client in enumerate(clients):
        client.sendMessage(b"during %d" % i)
    yield watch.until(lambda: all(c.messages for c in clients), "echoes during the drain")
    # A new tunnel during the drain lands on a serving worker.
    fresh = yield open_client(reactor, watch, gw.port)
    fresh.sendMessage(b"new")
    yield watch.until(lambda: fresh.messages, "the new tunnel's echo")
    # The drained workers' tunnels end with 1001 close to the deadline, not before.
    yield watch.until(
        lambda: any(c.close_info is not None for c in clients), "a going-away", timeout=30
    )
    closed = [c for c in clients if c.close_info is not None]
    assert all(c.close_info[1] == CLOSE_GOING_AWAY for c in closed)
    grace = min(5.0, SHUTDOWN / 4)  # as bungate.http.app closes tunnels before the deadline
    assert reactor.seconds() - started >= SHUTDOWN - grace - 0.5
    assert fresh.close_info is None
    assert gw.count(r"crash|Traceback|Unhandled", since=mark) == 0


CURL = shutil.which("curl") or "curl"


@pytest_twisted.inlineCallbacks
def test_http2_under_load_through_a_roll_fails_no_request(
    reactor, upstream, gateways, ca: trustme.CA, tmp_path: Path
):
    """
    curl multiplexing 8 streams over HTTP/2 while the fleet rolls: the old workers' GOAWAY
    sends curl to new connections (new workers), the streams in flight finish. (h2load
    counts the requests a GOAWAY left unsent as failed, nginx's reloads included, so a
    client that retries them, as browsers and curl do, is the measure here.)
    """
    cert, key = write_pair(ca.issue_cert("127.0.0.1"), tmp_path, "gw")
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    config = cluster_config(upstream.url, workers=2, shutdown_timeout=10)
    config["server"]["tls"] = {"enabled": True, "cert": cert, "key": key}
    gw = yield gateways(config).start()
    urls = tmp_path / "urls.cfg"
    urls.write_text(
        "".join(
            f'url = "https://127.0.0.1:{gw.port}/api/h2/{i}"\noutput = "/dev/null"\n'
            for i in range(1500)
        )
    )
    load = threads.deferToThread(
        subprocess.run,
        [
            CURL,
            "-sS",
            "--http2",
            "--cacert",
            str(ca_file),
            "--parallel",
            "--parallel-max",
            "8",
            "-K",
            str(urls),
            "-w",
            "%{http_code} %{http_version}\n",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    yield wait_until(reactor, lambda: len(upstream.requests) >= 100, 30, what="the load")
    mark = gw.mark()
    gw.signal(signal.SIGUSR2)
    yield gw.wait_for(r"Rolling restart done: 2 worker", since=mark, timeout=60)
    done = yield load
    outcomes = Counter(done.stdout.split("\n")[:-1])
    assert outcomes == {"200 2": 1500}, (outcomes, done.stderr[-2000:])
    assert gw.count(r"Worker \d+ exited .*: stopped", since=mark) == 2


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest_twisted.inlineCallbacks
def test_open_tunnels_are_counted_in_metrics_and_in_the_connection_count(
    reactor, gateways, echo, watch
):
    import treq

    config = ws_config(echo.url, workers=2)
    config["metrics"] = {"enabled": True}
    gw = yield gateways(config).start()
    clients = []
    for i in range(3):
        client = yield open_client(reactor, watch, gw.port)
        client.sendMessage(b"hello %d" % i)
        clients.append(client)
    yield watch.until(lambda: all(c.messages for c in clients), "the echoes")

    def scrape() -> Any:
        d = treq.get(gw.url + "/metrics", persistent=False)
        return d.addCallback(treq.text_content).addCallback(_samples)

    samples = yield scrape()
    assert samples[("bungate_websocket_tunnels_open", ())] == 3
    assert samples[("bungate_websocket_tunnels_opened_total", ())] == 3
    health = yield treq.get(gw.url + "/health", persistent=False).addCallback(treq.json_content)
    # The tunnels hold their workers' connections (plus the /health request's own).
    assert sum(w["connections"] for w in health["workers"]) >= 3

    clients[0].sendClose(1000)
    yield watch.until(lambda: clients[0].close_info is not None, "the close")
    deadline = reactor.seconds() + 10
    while True:  # the worker counts the close once both sides are gone
        s = yield scrape()
        if s[("bungate_websocket_tunnels_open", ())] == 2:
            break
        assert reactor.seconds() < deadline, "the metrics never counted the closed tunnel"
        yield task.deferLater(reactor, 0.05, lambda: None)
    closes = {k: v for k, v in s.items() if k[0] == "bungate_websocket_tunnels_closed_total"}
    # After the close handshake the server closes TCP first (RFC 6455 §7.1.1).
    key = ("bungate_websocket_tunnels_closed_total", (("reason", "upstream_closed"),))
    assert closes == {key: 1}, closes
    assert s[("bungate_websocket_bytes_total", (("direction", "up"),))] > len(b"hello 0")
    assert s[("bungate_websocket_bytes_total", (("direction", "down"),))] > len(b"hello 0")
