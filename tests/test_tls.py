"""
Tests for bungate.tls, over real sockets on 127.0.0.1 with certificates made by trustme.

The clients are Python's ``ssl`` module in a thread (so the client side is a different
TLS stack from the server's pyOpenSSL) and Twisted's ``Agent`` for the upstream policy.
Every wait is on a Deferred with a timeout; nothing sleeps.
"""

from __future__ import annotations

import datetime
import json
import socket
import ssl
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Optional

import pytest
import pytest_twisted
import trustme
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred
from twisted.web.client import Agent, HTTPConnectionPool, ResponseNeverReceived, readBody
from twisted.web.resource import Resource
from twisted.web.server import Site

from bungate.config import ConfigError, RouteConfig, TLSConfig, parse_config
from bungate.tls import (
    RedirectResource,
    certificate_files,
    check_tls,
    check_upstream_tls,
    copy_certificate_files,
    forget_copies,
    server_tls_factory,
    upstream_tls_policy,
)

TIMEOUT = 10


# --- helpers ---------------------------------------------------------------------------


class Hello(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        return b"hello " + request.uri


def write_pair(leaf: trustme.LeafCert, directory: Path, name: str) -> tuple[str, str]:
    """Write a leaf's chain (leaf first) and key as PEM files; return their paths."""
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    return str(cert), str(key)


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def pair(ca: trustme.CA, tmp_path: Path) -> tuple[str, str]:
    return write_pair(ca.issue_cert("localhost", "127.0.0.1"), tmp_path, "server")


def tls_config(cert: str, key: str, **kw: Any) -> TLSConfig:
    return TLSConfig(enabled=True, cert=cert, key=key, **kw)


def listen_tls(config: TLSConfig) -> Any:
    factory = server_tls_factory(config, Site(Hello()))
    return reactor.listenTCP(0, factory, interface="127.0.0.1")


def client_context(ca: Optional[trustme.CA] = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    if ca is None:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ca.configure_trust(ctx)
    return ctx


def probe(
    port: int, ctx: ssl.SSLContext, server_hostname: Optional[str] = None, request: bool = True
) -> dict[str, Any]:
    """Blocking: handshake (and one GET) with the server; runs in a thread."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw:
        with ctx.wrap_socket(raw, server_hostname=server_hostname) as s:
            info: dict[str, Any] = {
                "version": s.version(),
                "alpn": s.selected_alpn_protocol(),
                "cipher": s.cipher()[0],
                "cert": s.getpeercert(binary_form=True),
            }
            if request:
                s.sendall(b"GET /hi?x=1 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                data = b""
                chunk = s.recv(65536)
                while chunk:
                    data += chunk
                    chunk = s.recv(65536)
                info["response"] = data
    return info


def in_thread(f: Any, *args: Any, **kw: Any) -> Deferred[Any]:
    d: Deferred[Any] = threads.deferToThread(f, *args, **kw)
    return d.addTimeout(TIMEOUT * 2, reactor)


def leaf_der(leaf: trustme.LeafCert) -> bytes:
    return ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())


# --- (a) HTTPS works, verified with the test CA, chain sent -------------------------------


@pytest_twisted.inlineCallbacks
def test_https_serves_and_verifies(ca: trustme.CA, pair: tuple[str, str]) -> Iterator[Any]:
    port = listen_tls(tls_config(*pair))
    try:
        info = yield in_thread(probe, port.getHost().port, client_context(ca), "localhost")
    finally:
        yield port.stopListening()
    assert info["response"].startswith(b"HTTP/1.1 200 ")
    assert info["response"].endswith(b"hello /hi?x=1")


@pytest_twisted.inlineCallbacks
def test_intermediate_chain_is_sent(ca: trustme.CA, tmp_path: Path) -> Iterator[Any]:
    intermediate = trustme.CA(parent_cert=ca)
    pair = write_pair(intermediate.issue_cert("localhost"), tmp_path, "chained")
    port = listen_tls(tls_config(*pair))
    try:
        # The client trusts only the root: it can verify only if the server sends the
        # intermediate that follows the leaf in the cert file.
        info = yield in_thread(probe, port.getHost().port, client_context(ca), "localhost")
    finally:
        yield port.stopListening()
    assert info["response"].startswith(b"HTTP/1.1 200 ")


@pytest_twisted.inlineCallbacks
def test_untrusted_client_refuses(pair: tuple[str, str]) -> Iterator[Any]:
    # Control for the test above: a client that does not trust the test CA fails.
    port = listen_tls(tls_config(*pair))
    try:
        with pytest.raises(ssl.SSLCertVerificationError):
            yield in_thread(probe, port.getHost().port, client_context(trustme.CA()), "localhost")
    finally:
        yield port.stopListening()


# --- (b, c) TLS versions and ciphers ----------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_tls13_negotiated(ca: trustme.CA, pair: tuple[str, str]) -> Iterator[Any]:
    port = listen_tls(tls_config(*pair))
    try:
        info = yield in_thread(probe, port.getHost().port, client_context(ca), "localhost")
    finally:
        yield port.stopListening()
    assert info["version"] == "TLSv1.3"


def tls11_only() -> ssl.SSLContext:
    ctx = client_context()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        # SECLEVEL=0 so the client's own OpenSSL policy does not veto TLS 1.1: any
        # refusal must come from the server.
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        ctx.minimum_version = ssl.TLSVersion.TLSv1_1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    return ctx


@pytest_twisted.inlineCallbacks
def test_tls11_client_refused_by_server(pair: tuple[str, str]) -> Iterator[Any]:
    port = listen_tls(tls_config(*pair, min_version="TLSv1.2"))
    try:
        with pytest.raises(ssl.SSLError) as caught:
            yield in_thread(probe, port.getHost().port, tls11_only(), request=False)
    finally:
        yield port.stopListening()
    # TLSV1_ALERT_PROTOCOL_VERSION means the *server* sent a protocol_version alert, i.e.
    # the client did offer TLS 1.1 and our server turned it down. (If the local OpenSSL
    # could not offer TLS 1.1 at all the reason would be NO_PROTOCOLS_AVAILABLE.)
    assert caught.value.reason == "TLSV1_ALERT_PROTOCOL_VERSION", caught.value


class _TLS11Only:
    """An old-style context factory for a bare server that accepts TLS 1.1 only."""

    def __init__(self, cert: str, key: str) -> None:
        self.context = SSL.Context(SSL.TLS_METHOD)
        self.context.set_min_proto_version(SSL.TLS1_1_VERSION)
        self.context.set_max_proto_version(SSL.TLS1_1_VERSION)
        self.context.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
        self.context.use_certificate_chain_file(cert)
        self.context.use_privatekey_file(key)

    def getContext(self) -> SSL.Context:
        return self.context


@pytest_twisted.inlineCallbacks
def test_tls11_client_control(pair: tuple[str, str]) -> Iterator[Any]:
    # Control for the refusal above: against a server that allows it, the same client
    # really negotiates TLS 1.1 on this machine. (Our server refuses it both because of
    # min_version and because it keeps OpenSSL's default security level, which alone
    # already forbids TLS < 1.2 on OpenSSL 3.)
    from twisted.protocols.tls import TLSMemoryBIOFactory

    factory = TLSMemoryBIOFactory(_TLS11Only(*pair), False, Site(Hello()))
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    try:
        info = yield in_thread(probe, port.getHost().port, tls11_only())
    finally:
        yield port.stopListening()
    assert info["version"] == "TLSv1.1"
    assert info["response"].endswith(b"hello /hi?x=1")


@pytest_twisted.inlineCallbacks
def test_min_version_tls13_refuses_tls12(ca: trustme.CA, pair: tuple[str, str]) -> Iterator[Any]:
    port = listen_tls(tls_config(*pair, min_version="TLSv1.3"))
    tls12 = client_context(ca)
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    try:
        with pytest.raises(ssl.SSLError) as caught:
            yield in_thread(probe, port.getHost().port, tls12, "localhost", request=False)
        info = yield in_thread(probe, port.getHost().port, client_context(ca), "localhost")
    finally:
        yield port.stopListening()
    assert caught.value.reason == "TLSV1_ALERT_PROTOCOL_VERSION", caught.value
    assert info["version"] == "TLSv1.3"


@pytest_twisted.inlineCallbacks
def test_min_version_tls12_accepts_tls12(ca: trustme.CA, pair: tuple[str, str]) -> Iterator[Any]:
    port = listen_tls(tls_config(*pair, min_version="TLSv1.2"))
    tls12 = client_context(ca)
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    try:
        info = yield in_thread(probe, port.getHost().port, tls12, "localhost")
    finally:
        yield port.stopListening()
    assert info["version"] == "TLSv1.2"


@pytest_twisted.inlineCallbacks
def test_ciphers_restrict_tls12(ca: trustme.CA, pair: tuple[str, str]) -> Iterator[Any]:
    # trustme's default keys are ECDSA.
    chosen, other = "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384"
    port = listen_tls(tls_config(*pair, ciphers=chosen))
    both, only_other = client_context(ca), client_context(ca)
    for ctx, ciphers in ((both, f"{other}:{chosen}"), (only_other, other)):
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_ciphers(ciphers)
    try:
        info = yield in_thread(probe, port.getHost().port, both, "localhost", request=False)
        with pytest.raises(ssl.SSLError):
            yield in_thread(probe, port.getHost().port, only_other, "localhost", request=False)
    finally:
        yield port.stopListening()
    assert info["cipher"] == chosen


# --- (d, e) SNI and ALPN -----------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_sni_picks_certificate(ca: trustme.CA, tmp_path: Path) -> Iterator[Any]:
    default = ca.issue_cert("localhost")
    a, b, wild = (
        ca.issue_cert("a.example"),
        ca.issue_cert("b.example"),
        ca.issue_cert("*.w.example"),
    )
    config = tls_config(
        *write_pair(default, tmp_path, "default"),
        certificates={
            "a.example": write_pair(a, tmp_path, "a"),
            "b.example": write_pair(b, tmp_path, "b"),
            "*.w.example": write_pair(wild, tmp_path, "w"),
        },
    )
    port = listen_tls(config)
    n = port.getHost().port
    try:
        # check_hostname is on: each handshake succeeds only with the right certificate.
        got_a = yield in_thread(probe, n, client_context(ca), "a.example")
        got_b = yield in_thread(probe, n, client_context(ca), "B.Example")
        got_w = yield in_thread(probe, n, client_context(ca), "x.w.example")
        got_other = yield in_thread(probe, n, client_context(), "c.example", request=False)
        got_none = yield in_thread(probe, n, client_context(), None, request=False)
    finally:
        yield port.stopListening()
    assert got_a["cert"] == leaf_der(a)
    assert got_b["cert"] == leaf_der(b)
    assert got_w["cert"] == leaf_der(wild)
    assert got_other["cert"] == leaf_der(default)
    assert got_none["cert"] == leaf_der(default)
    assert got_a["response"].endswith(b"hello /hi?x=1")


@pytest_twisted.inlineCallbacks
def test_alpn_http11(ca: trustme.CA, pair: tuple[str, str]) -> Iterator[Any]:
    port = listen_tls(tls_config(*pair))
    offers_both, offers_h2 = client_context(ca), client_context(ca)
    offers_both.set_alpn_protocols(["h2", "http/1.1"])
    offers_h2.set_alpn_protocols(["h2"])
    try:
        both = yield in_thread(probe, port.getHost().port, offers_both, "localhost")
        h2_only = yield in_thread(probe, port.getHost().port, offers_h2, "localhost", request=False)
    finally:
        yield port.stopListening()
    assert both["alpn"] == "http/1.1"
    assert h2_only["alpn"] is None  # no overlap: no protocol agreed, handshake still fine


# --- (f) check_tls ----------------------------------------------------------------------


def expect_error(config: TLSConfig, key: str, *words: str) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        check_tls(config, "gw.yaml")
    error = caught.value
    assert error.key == key, error
    assert str(error).startswith(f"gw.yaml: {key}: ")
    assert "\n" not in str(error)
    for word in words:
        assert word in error.problem, error
    return error


def test_check_tls_accepts_good_pair(pair: tuple[str, str]) -> None:
    check_tls(tls_config(*pair), "gw.yaml")


def test_check_tls_disabled_checks_nothing() -> None:
    check_tls(TLSConfig(enabled=False, cert="/nope.crt", key="/nope.key"), "gw.yaml")


def test_check_tls_missing_cert(pair: tuple[str, str], tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.crt")
    expect_error(tls_config(missing, pair[1]), "server.tls.cert", missing, "No such file")


def test_check_tls_missing_key(pair: tuple[str, str], tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.key")
    expect_error(tls_config(pair[0], missing), "server.tls.key", missing, "No such file")


def test_check_tls_unreadable(pair: tuple[str, str], tmp_path: Path) -> None:
    expect_error(tls_config(pair[0], str(tmp_path)), "server.tls.key", "cannot read")


def test_check_tls_not_pem(pair: tuple[str, str], tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("hello\n")
    expect_error(tls_config(str(junk), pair[1]), "server.tls.cert", str(junk), "no PEM")
    expect_error(tls_config(pair[0], str(junk)), "server.tls.key", str(junk), "no PEM")
    # a key where the cert belongs, and the other way round
    expect_error(tls_config(pair[1], pair[0]), "server.tls.cert", "no PEM certificate")


def test_check_tls_mismatched_key(ca: trustme.CA, pair: tuple[str, str], tmp_path: Path) -> None:
    _, other_key = write_pair(ca.issue_cert("localhost"), tmp_path, "other")
    expect_error(tls_config(pair[0], other_key), "server.tls.key", other_key, "does not match")


def test_check_tls_expired(ca: trustme.CA, tmp_path: Path) -> None:
    now = datetime.datetime.now(datetime.timezone.utc)
    old = ca.issue_cert(
        "localhost",
        not_before=now - datetime.timedelta(days=60),
        not_after=now - datetime.timedelta(days=1),
    )
    cert, key = write_pair(old, tmp_path, "old")
    expect_error(tls_config(cert, key), "server.tls.cert", cert, "expired on")


def test_check_tls_not_yet_valid(ca: trustme.CA, tmp_path: Path) -> None:
    now = datetime.datetime.now(datetime.timezone.utc)
    early = ca.issue_cert(
        "localhost",
        not_before=now + datetime.timedelta(days=1),
        not_after=now + datetime.timedelta(days=60),
    )
    cert, key = write_pair(early, tmp_path, "early")
    expect_error(tls_config(cert, key), "server.tls.cert", cert, "not valid before")


def test_check_tls_encrypted_key(pair: tuple[str, str], tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(Path(pair[1]).read_bytes(), password=None)
    locked = tmp_path / "locked.key"
    locked.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    expect_error(tls_config(pair[0], str(locked)), "server.tls.key", "passphrase")


def test_check_tls_sni_entry_named(pair: tuple[str, str], tmp_path: Path) -> None:
    missing = str(tmp_path / "a.crt")
    config = tls_config(*pair, certificates={"a.example": (missing, pair[1])})
    expect_error(config, "server.tls.certificates.a.example.cert", missing)


def test_check_tls_bad_ciphers(pair: tuple[str, str]) -> None:
    expect_error(tls_config(*pair, ciphers="NO-SUCH-CIPHER"), "server.tls.ciphers", "selects no")


def test_check_tls_from_parsed_config(tmp_path: Path) -> None:
    # The same errors through the real schema, as the master sees them.
    config = parse_config(
        {"server": {"tls": {"enabled": True, "cert": "/no/such.crt", "key": "/no/such.key"}}},
        source="gw.yaml",
    )
    expect_error(config.server.tls, "server.tls.cert", "/no/such.crt")


def test_server_tls_factory_fails_fast(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        server_tls_factory(tls_config(str(tmp_path / "x"), str(tmp_path / "y")), Site(Hello()))
    assert caught.value.key == "server.tls.cert"


# --- (g) the redirect listener -----------------------------------------------------------


def raw_http(port: int, request: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    """Blocking: send raw bytes, read the response to EOF, parse it roughly."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
        s.sendall(request)
        data = b""
        chunk = s.recv(65536)
        while chunk:
            data += chunk
            chunk = s.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


def get(path: bytes, host: Optional[bytes], method: bytes = b"GET") -> bytes:
    host_line = b"Host: " + host + b"\r\n" if host is not None else b""
    version = b"HTTP/1.1" if host is not None else b"HTTP/1.0"
    return (
        method + b" " + path + b" " + version + b"\r\n" + host_line + b"Connection: close\r\n\r\n"
    )


@pytest_twisted.inlineCallbacks
def test_redirect_resource() -> Iterator[Any]:
    port = reactor.listenTCP(
        0, Site(RedirectResource(8443, ["example.com", "API.example.com"])), interface="127.0.0.1"
    )
    n = port.getHost().port
    path = b"/a/../b%2Fc/%7e?x=1&y=%20z&x=2;q"
    try:
        moved = yield in_thread(raw_http, n, get(path, b"example.com"))
        with_port = yield in_thread(raw_http, n, get(b"/", b"Api.Example.COM:80", b"POST"))
        absolute = yield in_thread(raw_http, n, get(b"http://example.com/p?q=1", b"evil.com"))
        foreign = yield in_thread(raw_http, n, get(b"/x", b"evil.com"))
        foreign_abs = yield in_thread(raw_http, n, get(b"http://evil.com/p", b"example.com"))
        no_host = yield in_thread(raw_http, n, get(b"/x", None))
        userinfo = yield in_thread(raw_http, n, get(b"/x", b"example.com@evil.com"))
    finally:
        yield port.stopListening()

    status, headers, _ = moved
    assert status == 308
    assert headers[b"location"] == b"https://example.com:8443" + path
    assert with_port[0] == 308
    assert with_port[1][b"location"] == b"https://api.example.com:8443/"
    assert absolute[0] == 308
    assert absolute[1][b"location"] == b"https://example.com:8443/p?q=1"
    for status, headers, body in (foreign, foreign_abs, no_host, userinfo):
        assert status == 400
        assert b"location" not in headers
        assert headers[b"content-type"] == b"application/json"
        assert json.loads(body)["error"] == "bad request"


@pytest_twisted.inlineCallbacks
def test_redirect_port_443_and_any_host() -> Iterator[Any]:
    port = reactor.listenTCP(0, Site(RedirectResource(443, [])), interface="127.0.0.1")
    n = port.getHost().port
    try:
        anyhost = yield in_thread(raw_http, n, get(b"/p?q", b"whatever.test:8080"))
        v6 = yield in_thread(raw_http, n, get(b"/", b"[::1]:80"))
        bad = yield in_thread(raw_http, n, get(b"/p", b"a/b"))
    finally:
        yield port.stopListening()
    assert anyhost[:1] == (308,)
    assert anyhost[1][b"location"] == b"https://whatever.test/p?q"
    assert v6[1][b"location"] == b"https://[::1]/"
    assert bad[0] == 400  # even with no allow-list, a malformed Host is never echoed


# --- (h) upstream TLS policy -------------------------------------------------------------


def routes(*items: dict[str, Any]) -> Sequence[RouteConfig]:
    return parse_config({"routes": list(items)}, source="gw.yaml").routes


@pytest.fixture
def upstream(ca: trustme.CA, tmp_path: Path) -> Iterator[tuple[int, int]]:
    """Two HTTPS upstreams whose certificate (for 127.0.0.1 only) the system does not trust."""
    pair = write_pair(ca.issue_cert("127.0.0.1"), tmp_path, "upstream")
    ports = [listen_tls(tls_config(*pair)) for _ in range(2)]
    yield ports[0].getHost().port, ports[1].getHost().port
    for p in ports:
        pytest_twisted.blockon(p.stopListening())


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


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


def test_check_upstream_tls_errors(tmp_path: Path, ca_file: str) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    good = {"pattern": "/a", "target": "https://a.internal"}
    cases = [
        (
            {"pattern": "/b", "target": "https://b.internal", "ca_file": str(tmp_path / "nope")},
            "routes[1].ca_file",
            "No such file",
        ),
        (
            {"pattern": "/b", "target": "https://b.internal", "ca_file": str(junk)},
            "routes[1].ca_file",
            "no PEM certificate",
        ),
        (
            {
                "pattern": "/b",
                "target": "https://b.internal",
                "ca_file": ca_file,
                "tls_verify": False,
            },
            "routes[1].ca_file",
            "tls_verify is false",
        ),
        (
            {"pattern": "/b", "target": "https://A.internal:443/v2", "tls_verify": False},
            "routes[1].tls_verify",
            "routes[0]",
        ),
    ]
    for route, key, words in cases:
        with pytest.raises(ConfigError) as caught:
            check_upstream_tls(routes(good, route), "gw.yaml")
        assert caught.value.key == key, caught.value
        assert words in caught.value.problem, caught.value
        with pytest.raises(ConfigError):
            upstream_tls_policy(routes(good, route), "gw.yaml")
    check_upstream_tls(
        routes(good, {"pattern": "/b", "target": "https://b", "ca_file": ca_file}), "gw.yaml"
    )


# --- (i) the master's private copies of the files workers load ------------------------


def copies_config(pair: tuple[str, str], other: tuple[str, str], ca_file: str) -> Any:
    """A parsed config naming every kind of file; the key of ``pair`` is used twice."""
    return parse_config(
        {
            "server": {
                "tls": {
                    "enabled": True,
                    "cert": pair[0],
                    "key": pair[1],
                    "certificates": {
                        "API.example.org": {"cert": other[0], "key": other[1]},
                        "*.example.com": {"cert": pair[0], "key": pair[1]},
                    },
                }
            },
            "routes": [
                {"pattern": "/a/*", "target": "https://a.internal", "ca_file": ca_file},
                {"pattern": "/b/*", "target": "http://127.0.0.1:1"},
            ],
        },
        source="gw.yaml",
    )


def test_copy_certificate_files(
    ca: trustme.CA, pair: tuple[str, str], ca_file: str, tmp_path: Path
) -> None:
    other = write_pair(ca.issue_cert("api.example.org"), tmp_path, "other")
    config = copies_config(pair, other, ca_file)
    raw_before = json.dumps(config.raw, sort_keys=True)
    assert [key for _, key, _ in certificate_files(config)] == [
        "server.tls.cert",
        "server.tls.key",
        "server.tls.certificates.api.example.org.cert",
        "server.tls.certificates.api.example.org.key",
        "server.tls.certificates.*.example.com.cert",
        "server.tls.certificates.*.example.com.key",
        "routes[0].ca_file",
    ]
    directory = tmp_path / "copies"
    directory.mkdir(mode=0o700)

    workers, originals = copy_certificate_files(config, str(directory))
    try:
        # One private copy per distinct file, byte for byte.
        assert sorted(originals.values()) == sorted({*pair, *other, ca_file})
        assert sorted(str(p) for p in directory.iterdir()) == sorted(originals)
        for copy, original in originals.items():
            assert Path(copy).read_bytes() == Path(original).read_bytes()
            assert Path(copy).stat().st_mode & 0o777 == 0o600
        copy_of = {original: copy for copy, original in originals.items()}

        tls = workers.server.tls
        assert (tls.cert, tls.key) == (copy_of[pair[0]], copy_of[pair[1]])
        assert tls.certificates == {
            "api.example.org": (copy_of[other[0]], copy_of[other[1]]),
            "*.example.com": (copy_of[pair[0]], copy_of[pair[1]]),
        }
        assert [r.ca_file for r in workers.routes] == [copy_of[ca_file], None]
        assert workers.source == config.source
        # Workers are built from the raw mapping as JSON: it says the same.
        rebuilt = parse_config(json.loads(json.dumps(workers.raw)), source=workers.source)
        assert rebuilt == workers
        # The operator's config is untouched.
        assert json.dumps(config.raw, sort_keys=True) == raw_before
        assert config.server.tls.cert == pair[0]
        check_tls(workers.server.tls, workers.source)
        check_upstream_tls(workers.routes, workers.source)
    finally:
        forget_copies(originals)


def test_copy_certificate_files_leaves_disabled_tls_alone(tmp_path: Path) -> None:
    config = parse_config(
        {"server": {"tls": {"enabled": False, "cert": "/no/such.crt", "key": "/no/such.key"}}}
    )
    assert certificate_files(config) == []
    workers, originals = copy_certificate_files(config, str(tmp_path))
    assert originals == {} and list(tmp_path.iterdir()) == []
    assert workers.server.tls.cert == "/no/such.crt"


def test_copies_are_named_after_the_operators_files(pair: tuple[str, str], tmp_path: Path) -> None:
    config = parse_config(
        {"server": {"tls": {"enabled": True, "cert": pair[0], "key": pair[1]}}}, source="gw.yaml"
    )
    workers, originals = copy_certificate_files(config, str(tmp_path))
    copy = workers.server.tls.cert
    assert copy is not None and copy != pair[0]
    Path(copy).write_bytes(b"garbage")
    try:
        error = expect_error(workers.server.tls, "server.tls.cert", pair[0], "no PEM")
        assert copy not in str(error)
    finally:
        forget_copies(originals)
    # Forgotten (the copies are deleted): the path is shown as it is.
    expect_error(workers.server.tls, "server.tls.cert", copy, "no PEM")


def test_copy_of_an_unreadable_file_names_key_and_file(
    pair: tuple[str, str], tmp_path: Path
) -> None:
    missing = str(tmp_path / "missing.key")
    config = parse_config(
        {"server": {"tls": {"enabled": True, "cert": pair[0], "key": missing}}}, source="gw.yaml"
    )
    directory = tmp_path / "copies"
    directory.mkdir()
    with pytest.raises(ConfigError) as caught:
        copy_certificate_files(config, str(directory))
    assert caught.value.key == "server.tls.key"
    assert missing in caught.value.problem and "No such file" in caught.value.problem


def test_manager_keeps_the_copies_of_the_accepted_config(ca: trustme.CA, tmp_path: Path) -> None:
    """accept_config: a refused config leaves the accepted copies; an accepted one replaces them."""
    from bungate.cluster.manager import ClusterManager
    from bungate.observe import check_startup

    def config_for(cert: str, key: str) -> Any:
        return parse_config(
            {
                "server": {
                    "host": "127.0.0.1",
                    "port": 0,
                    "tls": {"enabled": True, "cert": cert, "key": key},
                },
                "cluster": {"enabled": True, "workers": 1},
            },
            source="gw.yaml",
        )

    first = ca.issue_cert("localhost")
    cert, key = write_pair(first, tmp_path, "server")
    manager = ClusterManager(config_for(cert, key), reactor=reactor)
    check_startup(manager.config, manager)  # as the master does before it starts

    def worker_tls() -> TLSConfig:
        env = manager._worker_env(manager._new_slot())
        built = parse_config(json.loads(env["BUNGATE_CONFIG"]), env["BUNGATE_CONFIG_SOURCE"])
        # ... and the worker is told which operator's file each copy stands for.
        named = json.loads(env["BUNGATE_TLS_COPIES"])
        assert (named[built.server.tls.cert], named[built.server.tls.key]) == (cert, key)
        return built.server.tls

    def copy_dirs(root: Path) -> list[Path]:
        return sorted(root.iterdir()) if root.exists() else []

    tls = worker_tls()
    assert tls.cert is not None and tls.key is not None
    first_copies = Path(tls.cert).parent
    root = first_copies.parent
    assert Path(tls.cert).read_bytes() == Path(cert).read_bytes()
    assert root.stat().st_mode & 0o777 == 0o700
    assert first_copies.stat().st_mode & 0o777 == 0o700

    # The operator overwrites the certificate with garbage: refused, naming their file.
    Path(cert).write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n")
    with pytest.raises(ConfigError) as caught:
        manager.accept_config(config_for(cert, key))
    assert caught.value.key == "server.tls.cert" and cert in str(caught.value)
    assert str(root) not in str(caught.value)
    assert worker_tls() == tls and copy_dirs(root) == [first_copies]
    check_tls(tls, "gw.yaml")  # the copy still holds the accepted certificate

    # Fixed in place: accepted; new copies, and the old ones are gone (no worker booting).
    second = ca.issue_cert("localhost")
    write_pair(second, tmp_path, "server")
    manager.accept_config(config_for(cert, key))
    new_tls = worker_tls()
    assert new_tls.cert is not None and Path(new_tls.cert).read_bytes() == Path(cert).read_bytes()
    assert copy_dirs(root) == [Path(new_tls.cert).parent]

    # Stopping the master removes the whole directory.
    stopped = manager.stop()
    assert stopped.called
    assert not root.exists()
