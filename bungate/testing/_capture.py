"""A raw HTTP/1.1 upstream that records exactly the bytes each request arrived with."""

from __future__ import annotations

from typing import Any, Optional

import attrs
from twisted.internet import defer
from twisted.internet.protocol import Factory, Protocol

__all__ = ["CapturedRequest", "CapturingUpstream"]

_DEFAULT_ANSWER = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/plain\r\n"
    b"Server: upstream/9.9 (leaky)\r\n"
    b"X-Powered-By: upstream\r\n"
    b"X-Accel-Redirect: /internal/secret\r\n"
    b"Content-Length: 2\r\n"
    b"\r\n"
    b"ok"
)


@attrs.frozen
class CapturedRequest:
    """
    One request as the upstream received it.

    :ivar method: the method of the request line.
    :ivar target: the request target, byte for byte.
    :ivar headers: ``(name, value)`` in the order received, names as sent.
    :ivar body: the body (framed by ``Content-Length`` or ``chunked``, de-chunked).
    :ivar raw: the head as received, request line to blank line.
    """

    method: bytes
    target: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    raw: bytes

    def header(self, name: bytes) -> list[bytes]:
        """Every value of header ``name`` (any case)."""
        lower = name.lower()
        return [v for n, v in self.headers if n.lower() == lower]


class _Capture(Protocol):
    def __init__(self, owner: CapturingUpstream) -> None:
        self.owner = owner
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end]
            lines = head.split(b"\r\n")
            method, target, _ = [*lines[0].split(b" ", 2), b"", b""][:3]
            headers = tuple(
                (name.strip(), value.strip())
                for name, _, value in (line.partition(b":") for line in lines[1:])
            )
            rest = self.buffer[end + 4 :]
            length = next((int(v) for n, v in headers if n.lower() == b"content-length"), 0)
            chunked = any(
                n.lower() == b"transfer-encoding" and v.lower() == b"chunked" for n, v in headers
            )
            if chunked:
                body, rest = _dechunk(rest)
                if body is None:
                    return
            else:
                if len(rest) < length:
                    return
                body, rest = rest[:length], rest[length:]
            self.buffer = rest
            self.owner.requests.append(
                CapturedRequest(method, target, headers, body, head + b"\r\n\r\n")
            )
            transport: Any = self.transport
            transport.write(self.owner.answer)


def _dechunk(data: bytes) -> tuple[Optional[bytes], bytes]:
    body = b""
    while True:
        line_end = data.find(b"\r\n")
        if line_end < 0:
            return None, data
        size = int(data[:line_end].split(b";")[0], 16)
        if size == 0:
            end = data.find(b"\r\n\r\n", line_end)
            if end < 0:
                return None, data
            return body, data[end + 4 :]
        start = line_end + 2
        if len(data) < start + size + 2:
            return None, data
        body += data[start : start + size]
        data = data[start + size + 2 :]


class CapturingUpstream:
    """
    A raw upstream on 127.0.0.1 that records every request byte for byte and answers each
    with :attr:`answer` (by default a 200 that also carries headers a gateway should not
    pass on: ``Server``, ``X-Accel-Redirect``).

    :param reactor: the test's reactor.
    :ivar requests: every :class:`CapturedRequest`, in order.
    """

    def __init__(self, reactor: Any, answer: bytes = _DEFAULT_ANSWER) -> None:
        self.reactor = reactor
        self.answer = answer
        self.requests: list[CapturedRequest] = []
        self.port: Any = None

    def start(self) -> CapturingUpstream:
        """Listen on a free port."""
        factory = Factory()
        factory.noisy = False
        factory.buildProtocol = lambda addr: _Capture(self)  # type: ignore[method-assign]
        self.port = self.reactor.listenTCP(0, factory, interface="127.0.0.1")
        return self

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        return f"http://127.0.0.1:{self.port.getHost().port}"

    def stop(self) -> defer.Deferred[Any]:
        """Stop listening."""
        return defer.maybeDeferred(self.port.stopListening)
