"""
The plain-HTTP redirect listener (bungate.http.redirect), over real sockets.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any, Optional

import pytest_twisted
from twisted.internet import reactor
from twisted.web.server import Site

from bungate.http.redirect import RedirectResource
from tests.tlskit import (
    TIMEOUT,
    in_thread,
)

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
