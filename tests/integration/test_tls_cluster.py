"""
Issue 6 end to end: HTTPS in a real ``twist bungate`` cluster, the plain-HTTP redirect
listener, fail-fast certificate checks, certificate reloads on SIGHUP and verified
``https://`` upstreams.

Certificates are made at test time with trustme. HTTPS clients are Python's ``ssl`` +
``http.client`` in threads (a different TLS stack from the workers' pyOpenSSL). Every wait
is on a log line or a Deferred with a deadline; nothing sleeps.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import ssl
import stat
import sys
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import pytest
import pytest_twisted
import trustme
from cryptography import x509
from twisted.internet import defer, threads, utils
from twisted.web.resource import Resource
from twisted.web.server import Site

from bungate.config import TLSConfig
from bungate.http.tls import server_tls_factory
from bungate.testing import wait_until
from tests.integration.conftest import cluster_config

TIMEOUT = 10


# --- helpers ---------------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    """Distinct ports that were free a moment ago (bind to 0, read them, close)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def write_pair(leaf: trustme.LeafCert, directory: Path, name: str) -> tuple[str, str]:
    """Write a leaf's chain (leaf first) and key as PEM files; return their paths."""
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    return str(cert), str(key)


def serial_of(leaf: trustme.LeafCert) -> int:
    return x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()).serial_number


def tls_cluster_config(
    upstream_url: str, cert: str, key: str, port: int = 0, **tls: Any
) -> dict[str, Any]:
    config = cluster_config(upstream_url)
    config["server"]["port"] = port
    config["server"]["tls"] = {"enabled": True, "cert": cert, "key": key, **tls}
    return config


def client_context(cafile: Optional[str]) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=cafile)
    if cafile is None:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])  # http.client speaks HTTP/1.1 only
    return ctx


def https_get(port: int, path: str, ctx: ssl.SSLContext) -> dict[str, Any]:
    """Blocking: one GET over a new TLS connection to 127.0.0.1:port (run in a thread)."""
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=TIMEOUT, context=ctx)
    try:
        conn.connect()
        sock: Any = conn.sock
        peer = sock.getpeercert()
        info: dict[str, Any] = {
            "version": sock.version(),
            "alpn": sock.selected_alpn_protocol(),
            "serial": int(peer["serialNumber"], 16) if peer else None,
            "subject": dict(item for rdn in peer["subject"] for item in rdn) if peer else None,
        }
        conn.request("GET", path, headers={"Connection": "close"})
        response = conn.getresponse()
        info["status"] = response.status
        info["body"] = response.read()
        return info
    finally:
        conn.close()


def http_get(port: int, path: str, host: Optional[str]) -> tuple[int, dict[str, str], bytes]:
    """Blocking: one plain-HTTP GET with exactly the given Host header (or none)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        conn.putrequest("GET", path, skip_host=True)
        if host is not None:
            conn.putheader("Host", host)
        conn.putheader("Connection", "close")
        conn.endheaders()
        response = conn.getresponse()
        headers = {k.lower(): v for k, v in response.getheaders()}
        return response.status, headers, response.read()
    finally:
        conn.close()


def in_thread(f: Any, *args: Any) -> defer.Deferred[Any]:
    from twisted.internet import reactor

    d: defer.Deferred[Any] = threads.deferToThread(f, *args)
    return d.addTimeout(TIMEOUT * 2, reactor)


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


# --- 1. HTTPS through a 2-worker cluster --------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_https_through_two_worker_cluster(
    reactor: Any, upstream: Any, gateways: Any, ca: trustme.CA, ca_file: str, tmp_path: Path
) -> Iterator[Any]:
    cert, key = write_pair(ca.issue_cert("127.0.0.1", "localhost"), tmp_path, "server")
    gw = yield gateways(tls_cluster_config(upstream.url, cert, key)).start()
    ctx = client_context(ca_file)

    # Both workers answer over TLS: many new connections at once, until each has served.
    shares: Counter[str] = Counter()
    for _ in range(10):
        infos = yield defer.gatherResults(
            [in_thread(https_get, gw.port, "/health", ctx) for _ in range(20)]
        )
        for info in infos:
            assert info["status"] == 200, info
            assert info["version"] == "TLSv1.3", info
            assert info["alpn"] == "http/1.1", info
            shares[json.loads(info["body"])["worker_id"]] += 1
        if len(shares) == 2:
            break
    assert set(shares) == {"1", "2"}, shares

    # The upstream is told the client spoke HTTPS.
    info = yield in_thread(https_get, gw.port, "/echo/me?x=1", ctx)
    assert info["status"] == 200, info
    echoed = json.loads(info["body"])
    assert echoed["headers"]["x-forwarded-proto"] == ["https"], echoed["headers"]
    assert echoed["uri"] == "/echo/me?x=1"

    # A client that trusts another CA refuses the gateway (the check above is real).
    with pytest.raises(ssl.SSLCertVerificationError):
        yield in_thread(https_get, gw.port, "/health", client_context(_other_ca_file(tmp_path)))

    # A client limited to TLS 1.1 is turned down by the server (min_version TLSv1.2).
    with pytest.raises(ssl.SSLError) as caught:
        yield in_thread(https_get, gw.port, "/health", _tls11_only())
    assert caught.value.reason == "TLSV1_ALERT_PROTOCOL_VERSION", caught.value


def _other_ca_file(directory: Path) -> str:
    path = directory / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(path))
    return str(path)


def _tls11_only() -> ssl.SSLContext:
    ctx = client_context(None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        # SECLEVEL=0 so the client's own OpenSSL does offer TLS 1.1: the refusal
        # (a protocol_version alert) must come from the server.
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        ctx.minimum_version = ssl.TLSVersion.TLSv1_1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    return ctx


# --- 2. the plain-HTTP redirect listener ------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_redirect_listener(
    reactor: Any, upstream: Any, gateways: Any, ca: trustme.CA, ca_file: str, tmp_path: Path
) -> Iterator[Any]:
    cert, key = write_pair(ca.issue_cert("127.0.0.1", "localhost"), tmp_path, "server")
    https_port, http_port = free_ports(2)
    config = tls_cluster_config(
        upstream.url,
        cert,
        key,
        port=https_port,
        redirect_http={"port": http_port, "allowed_hosts": ["example.com", "localhost"]},
    )
    gw = yield gateways(config).start()
    assert gw.port == https_port

    path = "/a/b%20c/./d?q=1&x=%2F&empty="
    status, headers, _ = yield in_thread(http_get, http_port, path, "Example.COM:80")
    assert status == 308
    assert headers["location"] == f"https://example.com:{https_port}{path}"

    # Every worker serves the redirect listener, and the target really is the HTTPS port.
    status, headers, _ = yield in_thread(http_get, http_port, "/health", "localhost")
    assert status == 308
    assert headers["location"] == f"https://localhost:{https_port}/health"
    info = yield in_thread(https_get, https_port, "/health", client_context(ca_file))
    assert info["status"] == 200

    status, headers, body = yield in_thread(http_get, http_port, path, "evil.example.net")
    assert status == 400
    assert "location" not in headers
    assert json.loads(body)["error"] == "bad request"

    status, headers, _ = yield in_thread(http_get, http_port, "/", None)
    assert status == 400
    assert "location" not in headers


# --- 3. a bad key path fails fast -------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_bad_key_path_fails_fast(
    reactor: Any, upstream: Any, ca: trustme.CA, tmp_path: Path
) -> Iterator[Any]:
    cert, _ = write_pair(ca.issue_cert("127.0.0.1"), tmp_path, "server")
    missing = str(tmp_path / "no-such-key.pem")
    config_path = tmp_path / "gateway.yaml"
    config_path.write_text(
        json.dumps(tls_cluster_config(upstream.url, cert, missing))  # JSON is YAML
    )
    d = utils.getProcessOutputAndValue(
        sys.executable,
        ["-m", "twisted", "--log-format", "text", "bungate", "--config", str(config_path)],
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    d.addTimeout(15, reactor)
    out, err, code = yield d
    output = (out + err).decode("utf-8", "replace")
    assert code == 78, output  # EX_CONFIG
    # Once on stderr, plain, and once in the log (twist's log is stdout here): not more.
    lines = [line for line in err.decode().splitlines() if missing in line]
    assert len(lines) == 1, output
    assert len([line for line in out.decode().splitlines() if missing in line]) == 1, output
    assert "server.tls.key" in lines[0]
    assert str(config_path) in lines[0]
    assert "No such file" in lines[0]
    assert "spawned" not in output
    assert "listening on" not in output


# --- 4. SIGHUP rolls the workers onto a new certificate; a broken one is refused -------


@pytest_twisted.inlineCallbacks
def test_sighup_reloads_certificate(
    reactor: Any, upstream: Any, gateways: Any, ca: trustme.CA, ca_file: str, tmp_path: Path
) -> Iterator[Any]:
    old_leaf = ca.issue_cert("127.0.0.1", common_name="bungate-old")
    new_leaf = ca.issue_cert("127.0.0.1", common_name="bungate-new")
    renewed_leaf = ca.issue_cert("127.0.0.1", common_name="bungate-renewed")
    old_cert, old_key = write_pair(old_leaf, tmp_path, "old")
    new_cert, new_key = write_pair(new_leaf, tmp_path, "new")
    gw = yield gateways(tls_cluster_config(upstream.url, old_cert, old_key)).start()
    ctx = client_context(ca_file)

    @defer.inlineCallbacks
    def seen() -> Iterator[Any]:
        infos = yield defer.gatherResults(
            [in_thread(https_get, gw.port, "/health", ctx) for _ in range(8)]
        )
        assert all(i["status"] == 200 for i in infos), infos
        return {(i["serial"], i["subject"]["commonName"]) for i in infos}

    assert (yield seen()) == {(serial_of(old_leaf), "bungate-old")}

    # A valid new certificate under new paths: the fleet rolls onto it.
    gw.write_config(tls_cluster_config(upstream.url, new_cert, new_key))
    mark = gw.mark()
    gw.signal(signal.SIGHUP)
    yield gw.wait_for(r"Rolling restart done", since=mark)
    assert gw.count(r"Configuration reload refused", since=mark) == 0
    assert (yield seen()) == {(serial_of(new_leaf), "bungate-new")}

    # A renewal written over the same paths (the certbot way): rolled onto as well.
    write_pair(renewed_leaf, tmp_path, "new")
    mark = gw.mark()
    gw.signal(signal.SIGHUP)
    yield gw.wait_for(r"Rolling restart done", since=mark)
    assert (yield seen()) == {(serial_of(renewed_leaf), "bungate-renewed")}
    pids = set(gw.workers().values())

    # A broken renewal (garbage where the PEM was): refused, the fleet keeps the cert.
    Path(new_cert).write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n")
    mark = gw.mark()
    gw.signal(signal.SIGHUP)
    refused = yield gw.wait_for(r"Configuration reload refused.*", since=mark)
    assert "server.tls.cert" in refused.group(0) and new_cert in refused.group(0)
    assert (yield seen()) == {(serial_of(renewed_leaf), "bungate-renewed")}
    assert set(gw.workers().values()) == pids
    assert gw.count(r"Rolling restart started", since=mark) == 0


@pytest_twisted.inlineCallbacks
def test_respawn_after_refused_reload_keeps_old_certificate(
    reactor: Any, upstream: Any, gateways: Any, ca: trustme.CA, ca_file: str, tmp_path: Path
) -> Iterator[Any]:
    leaf = ca.issue_cert("127.0.0.1", common_name="bungate-good")
    cert, key = write_pair(leaf, tmp_path, "server")
    gw = yield gateways(tls_cluster_config(upstream.url, cert, key)).start()
    Path(cert).write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n")
    mark = gw.mark()
    gw.signal(signal.SIGHUP)
    yield gw.wait_for(r"Configuration reload refused", since=mark)

    # The master promised to keep serving the old certificate: a worker that crashes
    # now must come back with it ...
    os.kill(gw.workers()[1], signal.SIGKILL)
    outcome = yield gw.wait_for(
        r"Worker 1 (ready|exited \(pid \d+\): boot-failure)", since=mark, timeout=10
    )
    assert outcome.group(1) == "ready", "\n".join(gw.lines[mark:])
    # ... and so must a worker added now.
    gw.signal(signal.SIGTTIN)
    outcome = yield gw.wait_for(
        r"Worker 3 (ready|exited \(pid \d+\): boot-failure)", since=mark, timeout=10
    )
    assert outcome.group(1) == "ready", "\n".join(gw.lines[mark:])
    serials = yield serials_by_worker(gw.port, client_context(ca_file), {"1", "2", "3"})
    assert serials == {"1": {serial_of(leaf)}, "2": {serial_of(leaf)}, "3": {serial_of(leaf)}}


@defer.inlineCallbacks
def serials_by_worker(port: int, ctx: ssl.SSLContext, ids: set[str]) -> Iterator[Any]:
    """The certificate serials each worker served, over new connections until all of
    ``ids`` have answered (at most 10 bursts of 12)."""
    seen: dict[str, set[int]] = {}
    for _ in range(10):
        infos = yield defer.gatherResults(
            [in_thread(https_get, port, "/health", ctx) for _ in range(12)]
        )
        for info in infos:
            assert info["status"] == 200, info
            seen.setdefault(json.loads(info["body"])["worker_id"], set()).add(info["serial"])
        if ids <= set(seen):
            break
    return seen


@pytest_twisted.inlineCallbacks
def test_certificate_copies_are_private_and_removed(
    reactor: Any, upstream: Any, gateways: Any, ca: trustme.CA, ca_file: str, tmp_path: Path
) -> Iterator[Any]:
    first_leaf = ca.issue_cert("127.0.0.1", common_name="bungate-first")
    cert, key = write_pair(first_leaf, tmp_path, "server")
    gw = yield gateways(tls_cluster_config(upstream.url, cert, key)).start()
    copies_line = r"Workers will load 2 certificate/key/CA file\(s\) from copies in (\S+)"
    first = Path((yield gw.wait_for(copies_line)).group(1))
    root = first.parent
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    assert stat.S_IMODE(first.stat().st_mode) == 0o700
    copies = sorted(first.iterdir())
    assert sorted(p.read_bytes() for p in copies) == sorted(
        Path(p).read_bytes() for p in (cert, key)
    )
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in copies)
    snapshot = {p: p.read_bytes() for p in copies}

    # A refused reload makes no copies and leaves the accepted ones alone.
    Path(cert).write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n")
    mark = gw.mark()
    gw.signal(signal.SIGHUP)
    refused = yield gw.wait_for(r"Configuration reload refused.*", since=mark)
    assert cert in refused.group(0) and str(root) not in refused.group(0)
    assert sorted(root.iterdir()) == [first]
    assert {p: p.read_bytes() for p in first.iterdir()} == snapshot

    # An accepted reload (files fixed in place) copies them again; the fleet rolls onto
    # the new copies and the old ones are deleted.
    second_leaf = ca.issue_cert("127.0.0.1", common_name="bungate-second")
    write_pair(second_leaf, tmp_path, "server")
    mark = gw.mark()
    gw.signal(signal.SIGHUP)
    second = Path((yield gw.wait_for(copies_line, since=mark)).group(1))
    assert second.parent == root and second != first
    yield gw.wait_for(r"Rolling restart done", since=mark)
    yield wait_until(reactor, lambda: not first.exists(), what="the old copies to go")
    assert sorted(root.iterdir()) == [second]
    serials = yield serials_by_worker(gw.port, client_context(ca_file), {"3", "4"})
    assert set().union(*serials.values()) == {serial_of(second_leaf)}

    # The master removes its directory when it stops.
    yield gw.stop()
    assert not root.exists()


@pytest_twisted.inlineCallbacks
def test_busy_redirect_port_fails_fast(
    reactor: Any, upstream: Any, gateways: Any, ca: trustme.CA, tmp_path: Path
) -> Iterator[Any]:
    cert, key = write_pair(ca.issue_cert("127.0.0.1"), tmp_path, "server")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        http_port = busy.getsockname()[1]
        config = tls_cluster_config(upstream.url, cert, key, redirect_http={"port": http_port})
        gw = gateways(config)
        started = gw.start(timeout=15)
        started.addErrback(lambda failure: None)
        try:
            code = yield gw.wait_exit(timeout=8)
        except defer.TimeoutError:
            raise AssertionError("the master did not exit:\n" + "\n".join(gw.lines)) from None
        finally:
            started.cancel()
    output = "\n".join(gw.lines)
    assert code not in (0, None), output
    assert f"127.0.0.1:{http_port}" in output, output
    assert "spawned" not in output


# --- 5. https upstreams: verified; ca_file trusts a private CA --------------------------


class _Echo(Resource):
    isLeaf = True

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"server": self.name, "uri": request.uri.decode()}).encode()


@pytest_twisted.inlineCallbacks
def test_https_upstream_needs_ca_file(
    reactor: Any, gateways: Any, ca: trustme.CA, ca_file: str, tmp_path: Path
) -> Iterator[Any]:
    upstream_ca = trustme.CA()
    upstream_ca_file = tmp_path / "upstream-ca.pem"
    upstream_ca.cert_pem.write_to_path(str(upstream_ca_file))
    cert, key = write_pair(upstream_ca.issue_cert("127.0.0.1"), tmp_path, "upstream")
    tls = TLSConfig(enabled=True, cert=cert, key=key)
    # Two upstreams with the same self-signed CA: trust is per host:port.
    ports = [
        reactor.listenTCP(0, server_tls_factory(tls, Site(_Echo(name))), interface="127.0.0.1")
        for name in ("untrusted", "trusted")
    ]
    try:
        untrusted, trusted = (f"https://127.0.0.1:{p.getHost().port}" for p in ports)
        config = cluster_config(untrusted, workers=1)
        config["routes"] = [
            {"pattern": "/untrusted/*", "target": untrusted},
            {"pattern": "/trusted/*", "target": trusted, "ca_file": str(upstream_ca_file)},
        ]
        gw = yield gateways(config).start()

        mark = gw.mark()
        status, _, body = yield in_thread(http_get, gw.port, "/untrusted/x", "localhost")
        assert status == 502, body
        assert json.loads(body)["error"] == "bad_gateway"
        # ... because the certificate was refused, not for some other reason.
        yield gw.wait_for(r"Upstream .*certificate verify failed", since=mark)
        status, _, body = yield in_thread(http_get, gw.port, "/trusted/x?y=1", "localhost")
        assert status == 200, body
        assert json.loads(body)["server"] == "trusted"
    finally:
        for p in ports:
            yield p.stopListening()
