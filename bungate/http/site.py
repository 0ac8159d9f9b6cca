"""
The HTTP server side of a worker: a twisted.web ``Site`` that can drain.

twisted.web has no drain of its own. :class:`GatewaySite` tracks every connection
(:class:`GatewayChannel`, a plain HTTP/1.1 channel so tracking reaches the real channel),
and :meth:`GatewaySite.drain` does what nginx does on a graceful stop:

- the owner stops listening first (other workers keep accepting on the shared socket);
- every response written from then on carries ``Connection: close`` and its connection
  closes once it is sent, so a keep-alive client learns of the close from the response
  instead of racing it;
- a connection that stays idle for ``idle_grace`` seconds is closed;
- at the deadline whatever is left is aborted.

:class:`GatewayRequest` skips twisted.web's resource traversal: ``process`` hands the
request straight to the site's ``dispatch`` callable. It caps the request body at
``max_body_size`` (413) and reports each finished request once to ``on_done``.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable, Optional

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.resource import Resource

from bungate._once import Once

__all__ = ["GatewayChannel", "GatewayRequest", "GatewaySite", "json_response"]

log = Logger(namespace="bungate.web")

_SERVER = b"bungate"
_date_cache: list[Any] = [0, b""]


def _http_date() -> bytes:
    """The Date header, formatted once per second instead of once per request."""
    now = int(time.time())
    if now != _date_cache[0]:
        _date_cache[0] = now
        _date_cache[1] = http.datetimeToString(now)
    return _date_cache[1]  # type: ignore[no-any-return]


def json_response(request: http.Request, status: int, body: Any) -> None:
    """
    Answer a request with a small JSON document and finish it.

    Does nothing when the client is already gone or the response has started.
    """
    if request.finished or getattr(request, "_disconnected", False):
        return
    if request.startedWriting:
        # Too late for a status line: cut the connection so the client sees a truncation.
        transport = getattr(request.channel, "transport", None)
        if transport is not None:
            transport.abortConnection()
        return
    data = json.dumps(body, separators=(",", ":")).encode("utf-8") + b"\n"
    request.setResponseCode(status)
    headers = request.responseHeaders
    headers.setRawHeaders(b"content-type", [b"application/json"])
    headers.setRawHeaders(b"content-length", [b"%d" % len(data)])
    request.write(data)
    request.finish()


class GatewayRequest(server.Request):
    """
    One request: body capped, dispatched without traversal, reported once when done.

    :ivar route: the route label (pattern) chosen for metrics and logs, or ``None``.
    :ivar upstream: the upstream URL base it was proxied to, if any.
    :ivar on_abort: called with no arguments if the client goes away before the
        response is finished (the proxy cancels its upstream request here).
    """

    defaultContentType = None
    route: Optional[str] = None
    upstream: Optional[str] = None
    request_id: bytes = b""
    params: dict[str, str] = {}
    on_abort: Optional[Callable[[], None]] = None
    too_large = False
    _received = 0
    _reported = False
    started = 0.0

    def gotLength(self, length: Optional[int]) -> None:
        """Refuse to store a body whose announced length is over the limit."""
        limit = self.channel.site.max_body_size  # type: ignore[attr-defined]
        if length is not None and length > limit:
            self.too_large = True
            length = 0
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        """Store body bytes until the limit, then drop them and remember why."""
        if self.too_large:
            return
        self._received += len(data)
        if self._received > self.channel.site.max_body_size:  # type: ignore[attr-defined]
            self.too_large = True
            return
        self.content.write(data)  # type: ignore[union-attr]

    def process(self) -> None:
        """Hand the request to the site's dispatcher (no resource traversal)."""
        site: Any = self.channel.site  # type: ignore[attr-defined]
        self.site = site
        self.started = site.clock.seconds()
        if site.on_request is not None:
            site.on_request()
        headers = self.responseHeaders
        headers.setRawHeaders(b"server", [_SERVER])
        headers.setRawHeaders(b"date", [_http_date()])
        if self.too_large:
            self.route = None
            self.channel.persistent = False
            self.responseHeaders.setRawHeaders(b"connection", [b"close"])
            json_response(
                self,
                413,
                {"error": "payload_too_large", "limit_bytes": site.max_body_size},
            )
            return
        try:
            site.dispatch(self)
        except Exception:
            self.processingFailed(Failure())

    def processingFailed(self, reason: Failure) -> None:  # type: ignore[override]
        """Log an unexpected error and answer 500 (never a traceback to the client)."""
        log.failure(
            "Unhandled error while serving {method} {uri}",
            reason,
            method=self.method.decode("ascii", "replace"),
            uri=self.uri.decode("latin-1"),
        )
        json_response(self, 500, {"error": "internal_error"})

    def write(self, data: bytes) -> None:
        """On the first write while draining, ask the client to close the connection."""
        if not self.startedWriting:
            channel = self.channel
            if channel is not None and channel.site.draining:  # type: ignore[attr-defined]
                self.responseHeaders.setRawHeaders(b"connection", [b"close"])
                channel.persistent = False
        super().write(data)

    def finish(self) -> None:
        """Finish the response (a no-op for a client that has gone) and report it."""
        if self._disconnected or self.finished:
            return
        site: Any = self.site
        super().finish()
        if not self._reported:
            self._reported = True
            site.on_done(self, True)

    def connectionLost(self, reason: Failure) -> None:
        """The client went away: cancel upstream work and report the request once."""
        finished = self.finished
        super().connectionLost(reason)
        if finished or self._reported:
            return
        self._reported = True
        abort = self.on_abort
        if abort is not None:
            self.on_abort = None
            abort()
        site = getattr(self, "site", None)
        if site is not None:
            site.on_done(self, False)


class GatewayChannel(http.HTTPChannel):
    """An HTTP/1.1 connection that its site can track and drain."""

    site: Any  # the GatewaySite that built this channel
    _idle_call: Any = None
    _host: Any = None
    _served = 0  # requests whose persistence was decided on this connection

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

    def connectionMade(self) -> None:
        """Register with the site."""
        super().connectionMade()
        self.site.channel_opened(self)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        """Unregister; the site notices when the last connection of a drain is gone."""
        self._cancel_idle()
        super().connectionLost(reason)
        self.site.channel_closed(self)

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
        limit = self.site.keepalive_requests
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

    def allHeadersReceived(self) -> None:
        """A request arrived: this connection is no longer idle."""
        self._cancel_idle()
        super().allHeadersReceived()

    def requestDone(self, request: http.Request) -> None:
        """After a response on a kept-alive connection during drain, start the idle clock."""
        super().requestDone(request)
        if self.site.draining and self.persistent and not self.requests:
            self.close_when_idle()

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


class GatewaySite(server.Site):
    """
    A ``Site`` that dispatches requests to one callable and can drain.

    :param dispatch: called with each :class:`GatewayRequest`; must answer it.
    :param clock: the reactor (or a ``Clock`` in tests).
    :param max_body_size: request bodies above this many bytes get 413.
    :param on_done: called with ``(request, completed)`` once per request.
    :param idle_timeout: keep-alive connections idle this long are closed (seconds).
    :param idle_grace: while draining, idle connections are closed after this long.
    :param keepalive_requests: a connection's last request (its answer says
        ``Connection: close``) is its this-many-th; 0 for no limit.
    """

    requestFactory = GatewayRequest
    protocol = GatewayChannel  # type: ignore[assignment]
    displayTracebacks = False
    noisy = False

    def __init__(
        self,
        dispatch: Callable[[GatewayRequest], None],
        clock: Any,
        max_body_size: int = 10 * 1024 * 1024,
        on_done: Optional[Callable[[GatewayRequest, bool], None]] = None,
        idle_timeout: float = 75.0,
        idle_grace: float = 1.0,
        keepalive_requests: int = 1000,
    ) -> None:
        super().__init__(Resource(), timeout=idle_timeout, reactor=clock)
        self.dispatch = dispatch
        self.clock = clock
        self.max_body_size = max_body_size
        self.on_done = on_done or (lambda request, completed: None)
        self.idle_grace = idle_grace
        self.keepalive_requests = keepalive_requests
        #: Called with the number of open connections whenever it changes.
        self.on_connections: Optional[Callable[[int], None]] = None
        #: Called as each request arrives, before it is dispatched.
        self.on_request: Optional[Callable[[], None]] = None
        self.channels: set[GatewayChannel] = set()
        self.draining = False
        self._drained: Once[None] = Once()

    def log(self, request: http.Request) -> None:
        """Access logging is ours (``on_done``), not twisted.web's."""

    def inflight(self) -> int:
        """How many requests are being served right now."""
        return sum(len(c.requests) for c in self.channels)

    def drain(self, timeout: float) -> defer.Deferred[None]:
        """
        Finish in-flight requests and close every connection.

        Call after the listening port has stopped. Fires once no connection is left, or
        after ``timeout`` seconds, when what is left is aborted.
        """
        if self.draining:
            return self._drained.wait()
        self.draining = True
        for channel in list(self.channels):
            if not channel.requests:
                channel.close_when_idle()
        deadline = self.clock.callLater(timeout, self._abort_all)
        d = self._drained.wait()

        def cancel_deadline(result: None) -> None:
            if deadline.active():
                deadline.cancel()

        d.addCallback(cancel_deadline)
        self.channel_closed(None)
        return d

    def channel_opened(self, channel: GatewayChannel) -> None:
        """Track a new connection."""
        self.channels.add(channel)
        if self.on_connections is not None:
            self.on_connections(len(self.channels))

    def channel_closed(self, channel: Optional[GatewayChannel]) -> None:
        """Forget a closed connection; complete the drain when none is left."""
        if channel is not None:
            self.channels.discard(channel)
            if self.on_connections is not None:
                self.on_connections(len(self.channels))
        if self.draining and not self.channels:
            self._drained.fire(None)

    def _abort_all(self) -> None:
        left = list(self.channels)
        if left:
            log.warn(
                "Drain deadline reached: aborting {count} connection(s) with "
                "{inflight} request(s) in flight",
                count=len(left),
                inflight=sum(len(c.requests) for c in left),
            )
        for channel in left:
            transport: Any = channel.transport
            if transport is not None:
                transport.abortConnection()
        self.channels.clear()
        self.channel_closed(None)
