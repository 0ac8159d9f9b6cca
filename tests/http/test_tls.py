"""
HTTPS termination in a worker (bungate.http.tls), over real sockets on 127.0.0.1 with
certificates made by trustme; the client is Python's ``ssl`` module in a thread, a
different TLS stack from the server's pyOpenSSL. Every wait has a timeout; nothing sleeps.
"""

from __future__ import annotations

import ssl
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
import trustme
from OpenSSL import SSL
from twisted.internet import reactor
from twisted.web.server import Site

from bungate.config import ConfigError
from bungate.http.tls import server_tls_factory
from tests.tlskit import (
    Hello,
    client_context,
    in_thread,
    leaf_der,
    listen_tls,
    probe,
    tls_config,
    write_pair,
)

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


@pytest.mark.parametrize(
    "alpn, offered, agreed",
    [
        (None, ["h2", "http/1.1"], "h2"),  # the default offers h2 first
        (None, ["http/1.1", "h2"], "h2"),  # the server's order decides
        (None, ["http/1.1"], "http/1.1"),
        (["http/1.1"], ["h2", "http/1.1"], "http/1.1"),
        (["http/1.1"], ["h2"], None),  # no overlap: none agreed, the handshake still fine
    ],
)
@pytest_twisted.inlineCallbacks
def test_alpn(
    ca: trustme.CA, pair: tuple[str, str], alpn: Any, offered: Any, agreed: Any
) -> Iterator[Any]:
    config = tls_config(*pair)
    if alpn is not None:
        config = attrs.evolve(config, alpn=tuple(alpn))
    port = listen_tls(config)
    context = client_context(ca)
    context.set_alpn_protocols(offered)
    try:
        got = yield in_thread(probe, port.getHost().port, context, "localhost", request=False)
    finally:
        yield port.stopListening()
    assert got["alpn"] == agreed


def test_server_tls_factory_fails_fast(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        server_tls_factory(tls_config(str(tmp_path / "x"), str(tmp_path / "y")), Site(Hello()))
    assert caught.value.key == "server.tls.cert"
