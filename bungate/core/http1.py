"""
HTTP/1.1 bits the proxy needs, without I/O: the header sets of RFC 9110, a request head
serializer and a sans-IO response parser.

:class:`ResponseParser` is fed the bytes an upstream sends and calls its receiver as the
answer is understood: the head once (interim ``1xx`` answers are skipped), the body in
pieces as they arrive (de-chunked), then the end. The body is framed by
``Content-Length``, ``chunked`` or the connection's close, as RFC 9112 §6.3 says.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Protocol

__all__ = [
    "HOP_BY_HOP",
    "IDEMPOTENT",
    "MAX_HEAD",
    "NO_BODY_STATUS",
    "ProtocolError",
    "ResponseParser",
    "ResponseReceiver",
    "origin_form",
    "serialize_head",
]

#: RFC 9110 §7.6.1 hop-by-hop fields, plus the non-standard ``Proxy-Connection``.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

#: Methods that may be sent again (RFC 9110 §9.2.2).
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})

#: Statuses whose answers never carry a body (RFC 9110 §6.4.1).
NO_BODY_STATUS = frozenset({204, 304})

#: The largest response head accepted.
MAX_HEAD = 64 * 1024

_MAX_CHUNK_LINE = 4096


class ProtocolError(Exception):
    """The peer broke HTTP/1.1 (bad status line, oversized head, bad chunk)."""


def serialize_head(method: bytes, target: bytes, headers: Sequence[tuple[bytes, bytes]]) -> bytes:
    """Build a request head: request line, header lines, blank line."""
    parts = [method, b" ", target, b" HTTP/1.1\r\n"]
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def origin_form(uri: bytes) -> bytes:
    """The path and query of a request target (an absolute-form one loses its origin)."""
    if uri.startswith(b"/"):
        return uri
    scheme_end = uri.find(b"://")
    slash = uri.find(b"/", scheme_end + 3) if scheme_end >= 0 else -1
    return uri[slash:] if slash >= 0 else b"/"


class ResponseReceiver(Protocol):
    """What a :class:`ResponseParser` tells as it understands an answer."""

    def response_head(
        self,
        code: int,
        phrase: bytes,
        headers: list[tuple[bytes, bytes]],
        length: Optional[int],
        connection: bytes,
    ) -> None:
        """
        The status line and headers; ``length`` is the body's length if known (0 for an
        answer without a body), ``connection`` the lowercased ``Connection`` tokens.
        """

    def response_data(self, data: bytes) -> None:
        """A piece of the body (de-chunked)."""

    def response_done(self) -> None:
        """The body is complete (not called for a body delimited by the close)."""


# Parser states.
_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_CRLF, _TRAILER, _CLOSE, _DONE, _UPGRADED = range(9)


class ResponseParser:
    """
    Parses one response at a time; :meth:`start` makes it ready for the next.

    :param receiver: called as the answer is understood.
    :ivar keep_alive: after the head, whether the connection may carry another request.
    :ivar leftover: after the end, bytes that came after the answer.
    """

    __slots__ = ("_buffer", "_remaining", "_state", "keep_alive", "leftover", "method", "receiver")

    def __init__(self, receiver: ResponseReceiver) -> None:
        self.receiver = receiver
        self.start(b"GET")

    def start(self, method: bytes) -> None:
        """Expect the answer to a request with ``method`` (``HEAD`` answers have no body)."""
        self.method = method
        self._buffer = b""
        self._state = _HEAD
        self._remaining = 0
        self.keep_alive = False
        self.leftover = b""

    @property
    def close_delimited(self) -> bool:
        """Whether the body runs until the connection closes (then its end is the close)."""
        return self._state == _CLOSE

    @property
    def done(self) -> bool:
        """Whether the whole answer was parsed."""
        return self._state == _DONE

    def feed(self, data: bytes) -> None:
        """
        Parse more bytes of the answer.

        Bytes after the end of the answer are kept in :attr:`leftover`.

        :raises ProtocolError: when the bytes are not a valid HTTP/1.1 answer.
        """
        if self._state >= _DONE:
            self.leftover += data
            return
        if self._state == _LENGTH and not self._buffer:
            # The common case: a body with Content-Length, passed through as it comes.
            n = len(data)
            if n < self._remaining:
                self._remaining -= n
                self.receiver.response_data(data)
                return
            if n == self._remaining:
                self._remaining = 0
                self.receiver.response_data(data)
                self._finish()
                return
        self._buffer += data
        self._parse()

    def _finish(self) -> None:
        self._state = _DONE
        self.leftover, self._buffer = self._buffer, b""
        self.receiver.response_done()

    def _parse(self) -> None:
        receiver = self.receiver
        while True:
            state = self._state
            if state == _HEAD:
                end = self._buffer.find(b"\r\n\r\n")
                if end < 0:
                    if len(self._buffer) > MAX_HEAD:
                        raise ProtocolError("response head over 64 KiB")
                    return
                head, self._buffer = self._buffer[:end], self._buffer[end + 4 :]
                self._head(head)
            elif state == _LENGTH:
                if not self._buffer:
                    return
                piece = self._buffer[: self._remaining]
                self._buffer = self._buffer[self._remaining :]
                self._remaining -= len(piece)
                receiver.response_data(piece)
                if self._remaining == 0:
                    self._finish()
                    return
            elif state == _CLOSE:
                if self._buffer:
                    piece, self._buffer = self._buffer, b""
                    receiver.response_data(piece)
                return
            elif state == _CHUNK_SIZE:
                end = self._buffer.find(b"\r\n")
                if end < 0:
                    if len(self._buffer) > _MAX_CHUNK_LINE:
                        raise ProtocolError("chunk size line too long")
                    return
                line, self._buffer = self._buffer[:end], self._buffer[end + 2 :]
                try:
                    size = int(line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    raise ProtocolError(f"bad chunk size {line[:40]!r}") from None
                if size < 0:
                    raise ProtocolError("negative chunk size")
                if size == 0:
                    self._state = _TRAILER
                else:
                    self._remaining = size
                    self._state = _CHUNK_DATA
            elif state == _CHUNK_DATA:
                if not self._buffer:
                    return
                piece = self._buffer[: self._remaining]
                self._buffer = self._buffer[self._remaining :]
                self._remaining -= len(piece)
                receiver.response_data(piece)
                if self._remaining == 0:
                    self._state = _CHUNK_CRLF
            elif state == _CHUNK_CRLF:
                if len(self._buffer) < 2:
                    return
                if self._buffer[:2] != b"\r\n":
                    raise ProtocolError("missing CRLF after a chunk")
                self._buffer = self._buffer[2:]
                self._state = _CHUNK_SIZE
            elif state == _TRAILER:
                end = self._buffer.find(b"\r\n")
                if end < 0:
                    if len(self._buffer) > MAX_HEAD:
                        raise ProtocolError("trailer section over 64 KiB")
                    return
                line, self._buffer = self._buffer[:end], self._buffer[end + 2 :]
                if not line:  # trailers are dropped (hop-by-hop in a proxy)
                    self._finish()
                    return
            else:
                return

    def _head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        status = lines[0].split(b" ", 2)
        if len(status) < 2 or not status[0].startswith(b"HTTP/1."):
            raise ProtocolError(f"bad status line {lines[0][:80]!r}")
        try:
            code = int(status[1])
        except ValueError:
            raise ProtocolError(f"bad status code {status[1][:10]!r}") from None
        if not 100 <= code <= 999:
            raise ProtocolError(f"bad status code {status[1][:10]!r}")
        phrase = status[2] if len(status) > 2 else b""
        if 100 <= code < 200 and code != 101:
            return  # an interim answer: the real head follows
        headers: list[tuple[bytes, bytes]] = []
        length: Optional[int] = None
        chunked = False
        connection = b""
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                raise ProtocolError(f"bad header line {line[:80]!r}")
            name = name.strip()
            value = value.strip()
            lower = name.lower()
            if lower == b"content-length":
                if not value.isdigit():
                    raise ProtocolError(f"bad Content-Length {value[:20]!r}")
                n = int(value)
                if length is not None and n != length:
                    raise ProtocolError("conflicting Content-Length headers")
                length = n
            elif lower == b"transfer-encoding":
                chunked = value.lower().endswith(b"chunked")
            elif lower == b"connection":
                connection = connection + b"," + value.lower() if connection else value.lower()
            headers.append((name, value))
        keep = status[0] == b"HTTP/1.1" and b"close" not in connection
        body_length: Optional[int]
        if code == 101:
            # Switching protocols: what follows the head is no longer HTTP. The parser
            # stops here; the bytes already read are the new protocol's (leftover).
            self.keep_alive = False
            self._state = _UPGRADED
            self.leftover, self._buffer = self._buffer, b""
            self.receiver.response_head(code, phrase, headers, 0, connection)
            return
        if self.method == b"HEAD" or code in NO_BODY_STATUS:
            body_length = 0
            self._state = _DONE
        elif chunked:
            body_length = None
            self._state = _CHUNK_SIZE
        elif length is not None:
            body_length = length
            self._state = _LENGTH
            self._remaining = length
        else:
            body_length = None
            keep = False
            self._state = _CLOSE
        self.keep_alive = keep
        self.receiver.response_head(code, phrase, headers, body_length, connection)
        if self._state == _DONE or (self._state == _LENGTH and self._remaining == 0):
            self._finish()
