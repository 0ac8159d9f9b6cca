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
request straight to the site's ``dispatch`` callable. It refuses a body over
``max_body_size`` with 413 as soon as that is known, and reports each finished request
once to ``on_done``. The limits on the connection itself are in
:mod:`bungate.http.channel`; the site enforces their timeouts with one sweep a second
(not a timer per request) and the connection cap.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable, Optional

from twisted.internet import address, defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.resource import Resource

from bungate._once import Once
from bungate.config import ServerConfig
from bungate.http.channel import GatewayChannel, Limits

__all__ = [
    "GatewayChannel",
    "GatewayRequest",
    "GatewaySite",
    "Limits",
    "SideSite",
    "error_response",
    "json_response",
]

log = Logger(namespace="bungate.web")

#: Seconds between two looks at every connection's head and body timers.
SWEEP_INTERVAL = 1.0

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
        # Too late for a status line: cut the connection (an HTTP/2 stream: reset it) so
        # the client sees a truncation.
        channel = request.channel
        transport: Any = getattr(channel, "transport", None) or channel
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


def error_response(request: Any, status: int, body: Any, reason: Optional[Failure] = None) -> None:
    """
    Answer an error of the request path (a 5xx: an upstream that failed, a middleware
    that raised) as JSON, unless the route's ``on_error`` hook answers it itself.

    :param reason: what went wrong, for the hook.
    """
    hook = getattr(request, "on_error", None)
    if hook is not None:
        request.on_error = None
        try:
            if hook(request, status, reason):
                return
        except Exception:
            log.failure("The on_error hook failed on {uri}", uri=request.uri.decode("latin-1"))
    json_response(request, status, body)


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
    #: the normalized target (:class:`bungate.core.target.Target`), once dispatched.
    target: Any = None
    #: the validated host (``Host``, or an absolute-form target's authority).
    host: Optional[bytes] = None
    #: why the gateway refused the request itself (``None`` when it did not).
    refused: Optional[str] = None
    #: the real client's address when a trusted proxy (``server.trusted_proxies``) named
    #: it; ``None``: the connection's peer is the client.
    client_ip: Optional[str] = None
    #: whether the connection's peer is a trusted proxy (its forwarding headers count).
    trusted_peer = False
    #: who the caller is once a route's auth passed (:class:`bungate.http.policy.auth.Identity`).
    identity: Any = None
    #: lower-case header names the upstream must not get from the client (the policy's).
    upstream_drop: frozenset[bytes] = frozenset()
    #: header lines the policy adds to the upstream request (the caller's claims).
    upstream_add: list[tuple[bytes, bytes]] = []
    #: called with the request just before its status line and headers are written
    #: (the route's response policy: CORS, security and rate-limit headers, header rules).
    before_headers: Optional[Callable[[GatewayRequest], None]] = None
    #: ``on_error(request, status, failure) -> answered``: the route's ``on_error`` hook.
    on_error: Optional[Callable[..., bool]] = None
    #: a WebSocket handshake the route proxies (``websocket: true``): the upstream's 101
    #: opens a tunnel (:mod:`bungate.http.tunnel`).
    websocket = False
    #: seconds a tunnel may stay silent (the route's ``websocket_idle_timeout``).
    websocket_idle_timeout = 3600.0
    _received = 0
    _over_limit = False  # an HTTP/2 stream's body passed max_body_size (answered 413)
    _reported = False
    started = 0.0

    def gotLength(self, length: Optional[int]) -> None:
        """A ``Content-Length`` over the limit: 413 now, before the body is read."""
        channel: Any = self.channel
        limit = channel.site.limits.max_body_size
        if length is not None and length > limit:
            self._too_large(channel, limit)
            length = 0
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        """Store body bytes; the moment a chunked body passes the limit, 413."""
        channel: Any = self.channel
        if getattr(channel, "rejected", False) or self._over_limit:
            return
        self._received += len(data)
        limit = channel.site.limits.max_body_size
        if self._received > limit:
            self._too_large(channel, limit)
            return
        self.content.write(data)  # type: ignore[union-attr]

    def _too_large(self, channel: Any, limit: int) -> None:
        reject = getattr(channel, "reject", None)
        if reject is not None:  # HTTP/1.1: the connection answers and closes
            reject(413, "payload_too_large", f"the body limit is {limit} bytes")
            return
        # An HTTP/2 stream: answer it (the connection and its other streams go on), as
        # soon as the stream exists (its length is known while it is being made); the
        # connection then resets it so the client stops sending.
        if self._over_limit:
            return
        self._over_limit = True
        self.refused = "payload_too_large"
        self.site = channel.site
        body = {"error": "payload_too_large", "message": f"the body limit is {limit} bytes"}
        channel.site.clock.callLater(0, json_response, self, 413, body)

    def process(self) -> None:
        """Hand the request to the site's dispatcher (no resource traversal)."""
        site: Any = self.channel.site  # type: ignore[attr-defined]
        self.site = site
        self.started = site.clock.seconds()
        if site.on_request is not None:
            site.on_request()
        if self._over_limit or getattr(self.channel, "rejected", False):
            return  # answered already (e.g. 413)
        headers = self.responseHeaders
        server_header = site.limits.server_header
        if server_header:
            headers.setRawHeaders(b"server", [server_header])
        headers.setRawHeaders(b"date", [_http_date()])
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

    def getClientAddress(self) -> Any:
        """The client: the connection's peer, or who a trusted proxy said it serves."""
        peer = super().getClientAddress()
        ip = self.client_ip
        if ip is None or getattr(peer, "host", None) == ip:
            return peer
        kind = address.IPv6Address if ":" in ip else address.IPv4Address
        return kind("TCP", ip, getattr(peer, "port", 0))

    def write(self, data: bytes) -> None:
        """
        Before the first write: the route's response policy, and while draining ask the
        client to close the connection.
        """
        if not self.startedWriting:
            hook = self.before_headers
            if hook is not None:
                self.before_headers = None
                hook(self)
            channel = self.channel
            if (
                channel is not None
                and channel.site.draining  # type: ignore[attr-defined]
                and self.clientproto != b"HTTP/2"  # HTTP/2 drains with GOAWAY instead
            ):
                self.responseHeaders.setRawHeaders(b"connection", [b"close"])
                channel.persistent = False
        super().write(data)

    def report_upgraded(self) -> None:
        """The connection became a tunnel (101): report this request as done, once."""
        self.finished = True
        if not self._reported:
            self._reported = True
            site: Any = self.site
            site.on_done(self, True)

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


class _SideRequest(server.Request):
    """A request on a side listener: its ``Server`` header is the gateway's, not Twisted's."""

    def render(self, resrc: Any) -> None:
        """Replace twisted.web's ``Server: TwistedWeb/...`` before the resource answers."""
        value: bytes = self.channel.site.server_header  # type: ignore[attr-defined]
        if value:
            self.responseHeaders.setRawHeaders(b"server", [value])
        else:
            self.responseHeaders.removeHeader(b"server")
        super().render(resrc)


class SideSite(server.Site):
    """
    A plain twisted.web site for the gateway's side listeners (the HTTPS redirect, the
    metrics listener): the gateway's ``Server`` header and no access lines.

    :param resource: the root resource.
    :param server_header: the ``Server`` value (``server.server_header``); empty for none.
    """

    requestFactory = _SideRequest
    noisy = False
    displayTracebacks = False

    def __init__(self, resource: Any, server_header: bytes = b"bungate") -> None:
        super().__init__(resource)
        self.server_header = server_header

    def log(self, request: http.Request) -> None:
        """No access line: these answers are not traffic."""


class GatewaySite(server.Site):
    """
    A ``Site`` that dispatches requests to one callable and can drain.

    :param dispatch: called with each :class:`GatewayRequest`; must answer it.
    :param clock: the reactor (or a ``Clock`` in tests).
    :param limits: what a client is allowed (the ``server`` section's defaults when
        ``None``); ``limits.keepalive_timeout`` closes idle keep-alive connections.
    :param on_done: called with ``(request, completed)`` once per request.
    :param on_reject: called with ``(channel, status, reason)`` once per request the
        connection refused itself (400, 408, 413, 414, 431, 503).
    :param idle_grace: while draining, idle connections are closed after this long.
    """

    requestFactory = GatewayRequest
    protocol = GatewayChannel  # type: ignore[assignment]
    displayTracebacks = False
    noisy = False

    def __init__(
        self,
        dispatch: Callable[[GatewayRequest], None],
        clock: Any,
        limits: Optional[Limits] = None,
        on_done: Optional[Callable[[GatewayRequest, bool], None]] = None,
        on_reject: Optional[Callable[[GatewayChannel, int, str], None]] = None,
        idle_grace: float = 1.0,
    ) -> None:
        limits = limits or Limits.from_server(ServerConfig())
        super().__init__(Resource(), timeout=limits.keepalive_timeout, reactor=clock)
        self.dispatch = dispatch
        self.clock = clock
        self.limits = limits
        self.on_done = on_done or (lambda request, completed: None)
        self.on_reject = on_reject
        self.idle_grace = idle_grace
        self._sweep: Optional[task.LoopingCall] = None
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
            # A tunnel's connection is the tunnel's: it ends with its own drain. An
            # HTTP/2 connection sends GOAWAY now and closes after its streams.
            if channel.tunneled:
                continue
            if not channel.requests or getattr(channel, "multiplexed", False):
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
        """
        Track a new connection. At ``max_connections``, close the one that has waited
        longest for its request head to make room, or, when every one is busy with a
        request, refuse the new one with 503.
        """
        if len(self.channels) >= self.limits.max_connections:
            idle = [c for c in self.channels if c.waiting_for_head and not c.rejected]
            if not idle:
                channel.reject(503, "too_many_connections", "the gateway is at capacity")
                return
            oldest = min(idle, key=lambda c: c.head_since or 0.0)
            transport: Any = oldest.transport
            if transport is not None:
                transport.abortConnection()
            self.channels.discard(oldest)
        self.channels.add(channel)
        if self.on_connections is not None:
            self.on_connections(len(self.channels))
        if self._sweep is None:
            self._sweep = task.LoopingCall(self._check_timeouts)
            self._sweep.clock = self.clock
            self._sweep.start(SWEEP_INTERVAL, now=False)

    def channel_rejected(self, channel: GatewayChannel, status: int, reason: str) -> None:
        """A connection refused a request itself: report it (access line, metrics)."""
        if self.on_reject is not None:
            self.on_reject(channel, status, reason)

    def _check_timeouts(self) -> None:
        now = self.clock.seconds()
        head_limit = now - self.limits.header_timeout
        body_limit = now - self.limits.body_timeout
        for channel in list(self.channels):
            head, body = channel.head_since, channel.body_since
            if head is not None and head < head_limit:
                channel.reject(408, "header_timeout", "the request head took too long")
            elif body is not None and body < body_limit:
                channel.reject(408, "body_timeout", "the request body stalled")

    def channel_closed(self, channel: Optional[GatewayChannel]) -> None:
        """Forget a closed connection; complete the drain when none is left."""
        if channel is not None:
            self.channels.discard(channel)
            if self.on_connections is not None:
                self.on_connections(len(self.channels))
        if self.draining and not self.channels:
            self._stop_sweep()
            self._drained.fire(None)

    def _stop_sweep(self) -> None:
        sweep, self._sweep = self._sweep, None
        if sweep is not None and sweep.running:
            sweep.stop()

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
            if transport is not None and not channel.tunneled:
                transport.abortConnection()
        self.channels.clear()
        self.channel_closed(None)
