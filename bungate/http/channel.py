"""
One client connection (HTTP/1.1): the limits a hostile client meets, and draining.

:class:`GatewayChannel` is twisted.web's ``HTTPChannel`` with the rules nginx applies to
a request before anything routes it, in one place:

- a request head not complete within ``client_header_timeout`` gets 408 (Twisted's own
  idle timer restarts on every byte, so a header trickled forever would never end);
  a body that stalls for ``client_body_timeout`` between two reads gets 408 too;
- a request line over ``max_uri_length`` gets 414, a head over ``max_header_size`` 431
  (Twisted closes silently or answers a bare 400);
- a head with bare LF line endings gets 400 (Twisted would wait for a CRLF for ever);
- an announced ``Content-Length`` over ``max_body_size`` gets 413 at once, before the
  body is read, and without ``100 Continue``; a chunked body gets it the moment its
  running total passes the limit (:class:`~bungate.http.site.GatewayRequest`);
- past ``max_connections`` the connection waiting longest for its request head is
  closed to make room (a slowloris holds many such connections, a client being served
  holds none), and a new connection is refused only when every one is busy.

Every rejection is one short response with ``Connection: close``, reported to the site
(access line, metrics), after which the connection reads and discards for a moment
(``LINGER``) so the client can read the answer instead of meeting a reset.
"""

from __future__ import annotations

import json
from typing import Any, Optional

import attrs
from twisted.python.failure import Failure
from twisted.web import http

from bungate.config import ServerConfig

__all__ = ["LINGER", "REASONS", "GatewayChannel", "Limits"]

#: Seconds a rejected connection keeps reading (and discarding) before it closes.
LINGER = 1.0

#: The status line of each status a channel answers with itself.
REASONS = {
    400: b"Bad Request",
    408: b"Request Timeout",
    413: b"Content Too Large",
    414: b"URI Too Long",
    431: b"Request Header Fields Too Large",
    503: b"Service Unavailable",
}


@attrs.frozen
class Limits:
    """What a site allows a client (the ``server`` section's limits, in bytes and seconds)."""

    max_body_size: int
    max_header_size: int
    max_uri_length: int
    header_timeout: float
    body_timeout: float
    max_connections: int
    keepalive_requests: int
    keepalive_timeout: float
    server_header: bytes
    http2_cleartext: bool = False
    http2_max_streams: int = 128

    @classmethod
    def from_server(cls, server: ServerConfig) -> Limits:
        """The limits a ``server`` section sets."""
        return cls(
            max_body_size=server.max_body_size,
            max_header_size=server.max_header_size,
            max_uri_length=server.max_uri_length,
            header_timeout=server.client_header_timeout,
            body_timeout=server.client_body_timeout,
            max_connections=server.max_connections_per_worker,
            keepalive_requests=server.keepalive_requests,
            keepalive_timeout=server.keepalive_timeout,
            server_header=server.server_header.encode("latin-1"),
            http2_cleartext=server.http2_cleartext,
            http2_max_streams=server.http2_max_streams,
        )


#: The first bytes of an HTTP/2 connection with prior knowledge (RFC 9113 §3.4).
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class GatewayChannel(http.HTTPChannel):
    """An HTTP/1.1 connection that its site can track, limit and drain."""

    site: Any  # the GatewaySite that built this channel
    _idle_call: Any = None
    _host: Any = None
    _served = 0  # requests whose persistence was decided on this connection
    #: when the head now awaited started to arrive (None: not waiting for a head).
    head_since: Optional[float] = None
    #: when the body being read last sent bytes (None: not reading a body).
    body_since: Optional[float] = None
    _awaiting_request_line = True
    _head_tail = b""  # the last bytes of the head so far, to see CRLF across reads
    _head_size = 0
    rejected = False
    #: the connection became a WebSocket tunnel (the tunnel owns its transport now).
    tunneled = False
    _protocol_known = False  # ALPN / the h2c preface looked at (on the first bytes)
    _linger: Any = None

    def getHost(self) -> Any:
        """
        The local address, asked of the kernel once per connection.

        ``twisted.web`` asks for it on every request, and a TCP transport answers with a
        ``getsockname()`` system call each time.
        """
        host = self._host
        if host is None:
            host = self._host = super().getHost()
        return host

    # --- the connection -----------------------------------------------------------------

    def connectionMade(self) -> None:
        """Register with the site (which may refuse a connection over its limit)."""
        limits: Limits = self.site.limits
        self.MAX_LENGTH = limits.max_header_size
        self.totalHeadersSize = limits.max_header_size
        super().connectionMade()
        self.head_since = self.site.clock.seconds()
        self.site.channel_opened(self)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        """Unregister; the site notices when the last connection of a drain is gone."""
        self._cancel_idle()
        linger, self._linger = self._linger, None
        if linger is not None and linger.active():
            linger.cancel()
        super().connectionLost(reason)
        self.site.channel_closed(self)

    # --- the request head ---------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        """Check the bytes of a request head as they come (bare LF, size), then parse."""
        if not self._protocol_known:
            self._protocol_known = True
            negotiated = getattr(self.transport, "negotiatedProtocol", None)
            if negotiated == b"h2" or (
                self.site.limits.http2_cleartext and data.startswith(H2_PREFACE)
            ):
                from bungate.http.h2 import switch_to_h2

                switch_to_h2(self, data)
                return
        if self._awaiting_head():
            if self.head_since is None:  # a kept-alive connection's next request starts
                self.head_since = self.site.clock.seconds()
            if not self._check_head(data):
                return
        elif self.body_since is not None:
            self.body_since = self.site.clock.seconds()
        super().dataReceived(data)

    def _awaiting_head(self) -> bool:
        return bool(self.line_mode and not self._handlingRequest and not self.rejected)

    def _check_head(self, data: bytes) -> bool:
        seen = self._head_tail + data
        end = seen.find(b"\r\n\r\n")
        head = seen if end < 0 else seen[: end + 4]
        if head.count(b"\n") != head.count(b"\r\n"):
            self.reject(400, "bare_lf", "lines must end with CRLF")
            return False
        if end >= 0:
            self._head_tail = b""
            self._head_size = 0
            return True
        self._head_size += len(data)
        if self._awaiting_request_line and b"\r\n" not in seen:
            if self._head_size > self.site.limits.max_uri_length + 32:
                self.reject(414, "uri_too_long", "the request line is too long")
                return False
        if self._head_size > self.site.limits.max_header_size:
            self.reject(431, "header_too_large", "the request head is too large")
            return False
        self._head_tail = seen[-3:]
        return True

    def lineReceived(self, line: bytes) -> None:
        """The request line (414 when too long) or a header line (431 when too many)."""
        if self._awaiting_request_line:
            if not line:
                super().lineReceived(line)  # Twisted eats one empty line between requests
                return
            self._awaiting_request_line = False
            if len(line) > self.site.limits.max_uri_length + 32:
                self.reject(414, "uri_too_long", "the request line is too long")
                return
        elif self._receivedHeaderSize + len(line) > self.totalHeadersSize:
            self.reject(431, "header_too_large", "the request head is too large")
            return
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        """A line longer than the head may be: 414 for the request line, else 431."""
        if self._awaiting_request_line:
            self.reject(414, "uri_too_long", "the request line is too long")
        else:
            self.reject(431, "header_too_large", "a header line is too long")

    def _respondToBadRequestAndDisconnect(self) -> None:
        """Twisted found the head malformed: our 400 (with a report), not its bare one."""
        self.reject(400, "bad_request", "the request is malformed")

    def allHeadersReceived(self) -> None:
        """The head is complete: this connection is no longer idle; time the body."""
        self._cancel_idle()
        self.head_since = None
        self._head_tail = b""
        self._head_size = 0
        if self.length != 0:
            self.body_since = self.site.clock.seconds()
        super().allHeadersReceived()

    def _send100Continue(self) -> None:
        """Invite the body, unless the request was refused already (e.g. 413)."""
        if not self.rejected:
            super()._send100Continue()

    def allContentReceived(self) -> None:
        """The body is complete."""
        self.body_since = None
        super().allContentReceived()

    def checkPersistence(self, request: http.Request, version: bytes) -> bool:
        """
        Keep the connection open after this request?

        Only HTTP/1.1 without a ``close`` token (Twisted's own check splits the header
        on spaces, so ``Connection: close, X-Foo`` would wrongly stay open), never while
        draining, and not after the site's ``keepalive_requests`` requests (as nginx's
        ``keepalive_requests``): clients then reconnect, which bounds what one connection
        holds and lets connections that piled up on one worker spread over the fleet.
        """
        if version != b"HTTP/1.1":
            return False
        self._served += 1
        limit = self.site.limits.keepalive_requests
        close = self.site.draining or (limit > 0 and self._served >= limit)
        if not close:
            for value in request.requestHeaders.getRawHeaders(b"connection", ()):
                if b"close" in (t.strip().lower() for t in value.split(b",")):
                    close = True
                    break
        if close:
            request.responseHeaders.setRawHeaders(b"connection", [b"close"])
            return False
        return True

    def requestDone(self, request: http.Request) -> None:
        """Wait for the next request line; during a drain, start the idle clock."""
        self._awaiting_request_line = True
        super().requestDone(request)
        if self.site.draining and self.persistent and not self.requests:
            self.close_when_idle()

    # --- refusing ---------------------------------------------------------------------

    def reject(self, status: int, reason: str, message: str = "") -> None:
        """
        Answer ``status`` with a small JSON body and ``Connection: close``, report it to
        the site, then discard what the client still sends and close after ``LINGER``.
        """
        if self.rejected:
            return
        self.rejected = True
        self.persistent = False
        self.head_since = self.body_since = None
        transport: Any = self.transport
        if transport is None:
            return
        body = json.dumps({"error": reason, "message": message}).encode() + b"\n"
        head = [b"HTTP/1.1 %d %s" % (status, REASONS.get(status, b"Error"))]
        server = self.site.limits.server_header
        if server:
            head.append(b"Server: " + server)
        head += [
            b"Date: " + http.datetimeToString(),
            b"Content-Type: application/json",
            b"Content-Length: %d" % len(body),
            b"Connection: close",
        ]
        transport.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        self.site.channel_rejected(self, status, reason)
        self.dataReceived = self._discard  # type: ignore[method-assign]
        self._linger = self.site.clock.callLater(LINGER, transport.loseConnection)

    def _discard(self, data: bytes) -> None:
        """What a rejected connection does with the client's bytes."""

    @property
    def waiting_for_head(self) -> bool:
        """Whether this connection holds no request, only (part of) a head or nothing."""
        return not self.requests or self.head_since is not None

    # --- draining -----------------------------------------------------------------------

    def close_when_idle(self) -> None:
        """Close this connection if no request arrives within the site's idle grace."""
        if self.requests or self.transport is None:
            return
        self._cancel_idle()
        self._idle_call = self.site.clock.callLater(self.site.idle_grace, self._close_if_idle)

    def _close_if_idle(self) -> None:
        self._idle_call = None
        transport: Any = self.transport
        if not self.requests and transport is not None:
            transport.loseConnection()

    def _cancel_idle(self) -> None:
        call, self._idle_call = self._idle_call, None
        if call is not None and call.active():
            call.cancel()
