"""TLS test kit: certificate pairs on disk, a TLS listener, and a blocking ssl client."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path
from typing import Any, Optional

import pytest
import trustme
from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred
from twisted.web.resource import Resource
from twisted.web.server import Site

from bungate.config import ConfigError, TLSConfig
from bungate.http.tls import server_tls_factory
from bungate.ops.tlsfiles import check_tls

TIMEOUT = 10


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


def expect_error(config: TLSConfig, key: str, *words: str, names: Any = None) -> ConfigError:
    """``check_tls`` refuses ``config`` naming ``key``, with ``words`` in the problem."""
    with pytest.raises(ConfigError) as caught:
        check_tls(config, "gw.yaml", names or {})
    error = caught.value
    assert error.key == key, error
    assert str(error).startswith(f"gw.yaml: {key}: ")
    assert "\n" not in str(error)
    for word in words:
        assert word in error.problem, error
    return error
