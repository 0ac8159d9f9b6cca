"""
The reverse proxy: forward a request to an upstream and relay the answer.

:class:`ReverseProxy` sends each request through :class:`~bungate.http.upstream.pool.UpstreamClient`
(pooled keep-alive connections, the request head serialized once) and relays the upstream's
body as it arrives, with the upstream connection registered as the producer of the client's
response, so a slow client pauses the upstream read instead of growing a buffer.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from io import BytesIO
from typing import Any, Callable, Optional

from twisted.internet import defer, error
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import client, server

from bungate.core.http1 import HOP_BY_HOP, NO_BODY_STATUS, origin_form, serialize_head
from bungate.http.middleware import middleware_failed, run_response_middlewares
from bungate.http.site import GatewayRequest, error_response, json_response
from bungate.http.takeover import channel_leftover
from bungate.http.upstream.pool import (
    UpstreamClient,
    UpstreamConnectTimeout,
    UpstreamError,
    UpstreamReset,
)
from bungate.interfaces import IMiddleware, UpstreamRequest

__all__ = ["OnFailure", "OnResult", "ReverseProxy"]

log = Logger(namespace="bungate.proxy")

#: ``on_result(outcome, status)``: see :meth:`ReverseProxy.forward`.
OnResult = Callable[[str, int], None]
#: ``on_failure(failure, kind) -> took_over``: see :meth:`ReverseProxy.forward`.
OnFailure = Callable[[Failure, str], bool]

# Not hop-by-hop, but the gateway sets them itself when it forwards a request: a copy
# the client (or a middleware) sent is never passed on as if it were ours.
_GATEWAY_SET = frozenset(
    {
        b"host",
        b"content-length",
        b"expect",
        b"x-request-id",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-real-ip",
        b"forwarded",
    }
)
_REQUEST_SKIP = HOP_BY_HOP | _GATEWAY_SET
# What an upstream says of itself that clients are not told (nginx's proxy_hide_header
# defaults): the gateway's own Date and Server stand instead.
_RESPONSE_HIDE = HOP_BY_HOP | {b"server", b"date", b"x-pad"}


def client_headers(
    request: Any, underscores: bool = False, drop: frozenset[bytes] = frozenset()
) -> list[tuple[bytes, bytes]]:
    """
    The client's headers that may be passed upstream: without the hop-by-hop ones (the
    fixed set and those the client's own ``Connection`` names, RFC 9110 §7.6.1), without
    those the gateway sets itself, and without names holding ``_`` unless
    ``underscores`` (CGI and WSGI upstreams read ``X_Forwarded_For`` as
    ``X-Forwarded-For``), and without the names in ``drop`` (a route policy's).
    """
    source = request.requestHeaders
    named = _REQUEST_SKIP | drop if drop else _REQUEST_SKIP
    tokens = source.getRawHeaders(b"connection")
    if tokens:
        named = named | {t.strip().lower() for v in tokens for t in v.split(b",")}
    lines: list[tuple[bytes, bytes]] = []
    for name, values in source.getAllRawHeaders():
        lower = name.lower()
        if lower in named or (b"_" in name and (not underscores or _spelt(lower) in drop)):
            # X_User_Id reaches CGI/WSGI upstreams as X-User-Id: a dropped name is
            # dropped in every spelling.
            continue
        for value in values:
            lines.append((name, value))
    return lines


def _spelt(name: bytes) -> bytes:
    return name.replace(b"_", b"-")


# What a middleware may leave in the upstream request line (RFC 9110 token, origin-form).
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_ORIGIN_FORM = re.compile(rb"/[\x21-\x7e\x80-\xff]*")


class ReverseProxy:
    """
    Forwards requests to upstream base URLs over pooled connections.

    :param reactor: connects and times (``callLater``).
    :param metrics: an object with ``upstream_error(route, kind)``, or ``None``.
    :param tls_policy: the ``IPolicyForHTTPS`` for ``https://`` upstreams, or ``None``.
    :param eager: give upstream connections the eager writes of :mod:`bungate.http.transport`.
    :param underscores: pass header names holding ``_`` upstream
        (``server.underscores_in_headers``).
    """

    def __init__(
        self,
        reactor: Any,
        metrics: Any = None,
        tls_policy: Any = None,
        eager: bool = True,
        underscores: bool = False,
    ) -> None:
        self.clock: Any = reactor  # IReactorTime (typed Any: its zope methods lack self)
        self.metrics = metrics
        self.underscores = underscores
        #: the upstream connections (see :mod:`bungate.http.upstream.pool` for why not Agent).
        #: the worker's WebSocket tunnels (:class:`bungate.http.tunnels.Tunnels`), set by
        #: the app; ``None``: upgrades are refused.
        self.tunnels: Any = None
        self.upstreams = UpstreamClient(
            reactor, max_idle_per_host=256, idle_timeout=60.0, tls_policy=tls_policy, eager=eager
        )

    def close(self) -> defer.Deferred[None]:
        """Close the idle upstream connections (once the worker has drained)."""
        return self.upstreams.close()

    def forward(
        self,
        request: GatewayRequest,
        target: bytes,
        *,
        route: str,
        timeout: float,
        upstream: Optional[UpstreamRequest] = None,
        chain: Optional[Sequence[IMiddleware]] = None,
        on_result: Optional[OnResult] = None,
        on_failure: Optional[OnFailure] = None,
    ) -> None:
        """
        Forward ``request`` to ``target`` (a base URL) and relay the answer.

        Safe to call again for the same request from ``on_failure`` (a retry): the
        request headers and body are rebuilt for every attempt.

        :param route: the route's label (its pattern), for metrics and logs.
        :param timeout: seconds to wait for the response head, and then for each piece of
            the body.
        :param upstream: the method, path and headers to send, as request middlewares
            left them; ``None`` sends the incoming request's. Its hop-by-hop headers are
            dropped here, after the middlewares ran.
        :param chain: the middlewares whose ``process_response`` see the answer (with
            ``upstream`` only).
        :param on_result: called once per attempt with ``(outcome, status)``; outcome is
            ``ok`` (an upstream answered, whatever its status), ``client-gone``, or a
            failure kind (``refused``, ``timeout``, ``reset``, ``dns``, ``other``).
        :param on_failure: called with ``(failure, kind)`` before a 502/504 is written;
            returning ``True`` means the caller took over (e.g. retried elsewhere).
        """
        lines: list[tuple[bytes, bytes]] = [(b"Host", b"")]
        if upstream is None:
            method = request.method
            uri = request.uri if request.target is not None else origin_form(request.uri)
            lines += client_headers(request, self.underscores, request.upstream_drop)
            lines += request.upstream_add
            chain = None
        else:
            method = upstream.method
            uri = upstream.path
            if not (_TOKEN.fullmatch(method) and _ORIGIN_FORM.fullmatch(uri)):
                # A middleware set something that would split the request line.
                problem = ValueError(f"invalid upstream request line {method!r} {uri!r}")
                middleware_failed(request, "request", Failure(problem))
                return
            # The client's hop-by-hop headers went before the middlewares ran; what a
            # middleware added stays, except what is hop-by-hop or ours to set.
            for name, values in upstream.headers.getAllRawHeaders():
                if name.lower() not in _REQUEST_SKIP:
                    lines.extend((name, value) for value in values)
        request.upstream = target.decode("ascii")
        host_header, prefix = self.upstreams.head_for(target)
        lines[0] = (b"Host", host_header)
        # The forwarding headers are ours: a client's copies are dropped, unless the
        # connection comes from a trusted proxy (server.trusted_proxies), whose hops
        # are kept and extended.
        trusted = request.trusted_peer
        incoming = request.requestHeaders
        prior = incoming.getRawHeaders(b"x-forwarded-for") if trusted else None
        peer = getattr(server.Request.getClientAddress(request), "host", None)
        if peer is not None:
            forwarded = (b", ".join(prior) + b", " if prior else b"") + peer.encode("ascii")
            lines.append((b"X-Forwarded-For", forwarded))
        elif prior:
            lines.extend((b"X-Forwarded-For", v) for v in prior)
        proto = incoming.getRawHeaders(b"x-forwarded-proto") if trusted else None
        lines.append(
            (
                b"X-Forwarded-Proto",
                proto[0] if proto else b"https" if request.isSecure() else b"http",
            )
        )
        host = getattr(request, "host", None)
        if host:
            lines.append((b"X-Forwarded-Host", host))
        client = request.client_ip or peer
        if client is not None:
            lines.append((b"X-Real-IP", client.encode("ascii")))
        if trusted:
            lines.extend((b"Forwarded", v) for v in incoming.getRawHeaders(b"forwarded") or ())
        lines.append((b"X-Request-Id", request.request_id))
        if request.websocket:
            # The handshake's hop-by-hop pair went with the client's headers: ours now.
            lines.append((b"Connection", b"Upgrade"))
            lines.append((b"Upgrade", b"websocket"))

        body: Any = None
        content = request.content
        if content is not None:
            if isinstance(content, BytesIO):
                data = content.getvalue()
                if (
                    data
                    or request.requestHeaders.hasHeader(b"content-length")
                    or request.requestHeaders.hasHeader(b"transfer-encoding")
                ):
                    body = data
                    lines.append((b"Content-Length", b"%d" % len(data)))
            else:
                content.seek(0, 2)
                lines.append((b"Content-Length", b"%d" % content.tell()))
                content.seek(0)
                body = content

        sink = _ProxySink(self, request, route, target, method, chain, on_result, on_failure)
        head = serialize_head(method, prefix + uri, lines)
        sink.timeout = timeout
        sink.timer = self.clock.callLater(timeout, sink.time_is_up)
        request.on_abort = sink.client_gone
        sink.exchange = self.upstreams.request(target, method, head, body, sink)

    def _upstream_failed(
        self,
        request: GatewayRequest,
        route: str,
        target: bytes,
        reason: Failure,
        timed_out: bool,
        on_result: Optional[OnResult],
        on_failure: Optional[OnFailure],
    ) -> None:
        """No answer came from the upstream: retry (via ``on_failure``) or 502/504."""
        status, kind = _classify(reason, timed_out)
        if on_result is not None:
            on_result(kind, status)
        if on_failure is not None and on_failure(reason, kind):
            return
        if self.metrics is not None:
            self.metrics.upstream_error(route, kind)
        log.warn(
            "Upstream {kind} for {method} {uri} via {route} -> {upstream}: {error}",
            kind=kind,
            method=request.method.decode("ascii", "replace"),
            uri=request.uri.decode("latin-1"),
            route=route,
            upstream=target.decode("ascii"),
            error=reason.getErrorMessage(),
            request_id=request.request_id.decode("latin-1"),
        )
        error_response(
            request,
            status,
            {
                "error": "gateway_timeout" if status == 504 else "bad_gateway",
                "reason": kind,
                "request_id": request.request_id.decode("latin-1"),
            },
            reason,
        )


class _PausableProducer:
    """The upstream transport as the response's producer, remembering if it is paused."""

    __slots__ = ("paused", "transport")

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.paused = False

    def pauseProducing(self) -> None:
        """The client is slow: stop reading the upstream."""
        self.paused = True
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        """The client caught up: read the upstream again."""
        self.paused = False
        self.transport.resumeProducing()

    def stopProducing(self) -> None:
        """The client connection is gone."""
        self.transport.stopProducing()


class _ProxySink:
    """
    Relays one upstream exchange into the client's response (an ``upstream.Sink``).

    Before the upstream's head arrives it owns the timeout and the client's abort; once
    the head is written it streams the body with the upstream transport registered as
    the response's producer, so a slow client pauses the upstream read.
    """

    __slots__ = (
        "chain",
        "exchange",
        "method",
        "on_failure",
        "on_result",
        "producer",
        "proxy",
        "request",
        "route",
        "target",
        "timeout",
        "timer",
    )

    def __init__(
        self,
        proxy: ReverseProxy,
        request: GatewayRequest,
        route: str,
        target: bytes,
        method: bytes,
        chain: Optional[Sequence[IMiddleware]],
        on_result: Optional[OnResult],
        on_failure: Optional[OnFailure],
    ) -> None:
        self.proxy = proxy
        self.request = request
        self.route = route
        self.target = target
        self.method = method
        self.chain = chain
        self.on_result = on_result
        self.on_failure = on_failure
        self.exchange: Any = None
        self.timer: Any = None
        self.timeout = 0.0
        #: registered as the response's producer while the body streams, else ``None``.
        self.producer: Optional[_PausableProducer] = None

    # --- events from our side ---------------------------------------------------------

    def time_is_up(self) -> None:
        """
        The exchange's one timer fired: before the response head, the route's timeout
        for the head; once the body streams, the same timeout for the next piece.

        One ``DelayedCall`` serves both phases, moved with ``reset`` (for a later time
        Twisted only updates a number): a callLater and a cancel fewer per request.
        """
        if self.producer is None:
            self.timed_out()
        else:
            self._body_stalled()

    def timed_out(self) -> None:
        """No response head within the route's timeout: give up on the upstream."""
        self.timer = None
        self.request.on_abort = None
        exchange = self.exchange
        if exchange.connecting:
            error: Exception = UpstreamConnectTimeout(f"no connection in {self.timeout:g}s")
        else:
            error = defer.TimeoutError(f"no response head in {self.timeout:g}s")
        exchange.cancel()
        self._failed(Failure(error), True)

    def client_gone(self) -> None:
        """The client left before the response was complete: stop the upstream work."""
        self._cancel_timer()
        self.exchange.cancel()
        if self.producer is None and self.on_result is not None:
            self.on_result("client-gone", 499)

    # --- events from the upstream -----------------------------------------------------

    def upstream_head(
        self,
        code: int,
        phrase: bytes,
        headers: list[tuple[bytes, bytes]],
        length: Optional[int],
        producer: Any,
    ) -> None:
        """Write the status line and headers; start streaming unless there is no body."""
        request = self.request
        if code == 101:
            self._switch(phrase, headers)
            return
        if self.on_result is not None:
            self.on_result("ok", code)
        request.setResponseCode(code, phrase or None)
        no_body = self.method == b"HEAD" or code in NO_BODY_STATUS
        named = _RESPONSE_HIDE
        connection = self.exchange.connection_header
        if connection:
            named = named | {t.strip() for t in connection.split(b",")}
        grouped: dict[bytes, list[bytes]] = {}
        for name, value in headers:
            lower = name.lower()
            if lower in named or (lower == b"content-length" and (not no_body or code == 204)):
                continue
            if lower.startswith(b"x-accel-"):
                continue  # nginx's internal redirect and buffering controls
            values = grouped.get(lower)
            if values is None:
                grouped[lower] = [value]
            else:
                values.append(value)
        out = request.responseHeaders
        for lower, values in grouped.items():
            out.setRawHeaders(lower, values)
        if not no_body and length is not None:
            out.setRawHeaders(b"content-length", [b"%d" % length])
        if self.chain is not None:
            try:
                run_response_middlewares(self.chain, request, code, out)
            except Exception:
                self._cancel_timer()
                self.request.on_abort = None
                self.exchange.cancel()
                middleware_failed(request, "response")
                return
        if not no_body and length != 0:
            self.producer = _PausableProducer(producer)
            request.registerProducer(self.producer, True)
            # The route's timeout also bounds each wait for more of the body, so a stalled
            # upstream cannot hold the client connection forever (nginx's
            # proxy_read_timeout); it does not run while a slow client paused the read.
            timer = self.timer
            if timer is not None:
                timer.reset(self.timeout)
            else:
                self.timer = self.proxy.clock.callLater(self.timeout, self.time_is_up)
        else:
            self._cancel_timer()

    def _switch(self, phrase: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        """The upstream switched protocols (101): splice both connections together."""
        request = self.request
        self._cancel_timer()
        request.on_abort = None
        if not request.websocket:
            # A 101 the gateway did not ask for: the upstream speaks something else now.
            self.exchange.cancel()
            self._failed(Failure(UpstreamError("the upstream switched protocols unasked")), False)
            return
        if self.on_result is not None:
            self.on_result("ok", 101)
        upstream, leftover = self.exchange.detach()
        tunnels = self.proxy.tunnels
        if tunnels is None or not tunnels.has_room:
            if tunnels is not None:
                tunnels.refuse()
            upstream.abortConnection()
            request.refused = "too_many_tunnels"
            json_response(
                request,
                503,
                {"error": "too_many_tunnels", "request_id": request.request_id.decode("latin-1")},
            )
            return
        lines = [b"HTTP/1.1 101 " + (phrase or b"Switching Protocols")]
        for name, value in headers:
            lower = name.lower()
            if lower in _RESPONSE_HIDE and lower not in (b"connection", b"upgrade"):
                continue
            lines.append(name + b": " + value)
        for name, values in request.responseHeaders.getAllRawHeaders():
            if name.lower() in (b"server", b"date", b"x-request-id"):
                lines.extend(name + b": " + v for v in values)
        head = b"\r\n".join(lines) + b"\r\n\r\n"
        request.setResponseCode(101)
        channel: Any = request.channel
        channel.tunneled = True
        if request in getattr(channel, "requests", ()):
            channel.requests.remove(request)
        client = channel.transport
        tunnel = tunnels.try_open(
            client,
            upstream,
            client_leftover=channel_leftover(channel),
            upstream_leftover=leftover,
            client_head=head,
            idle_timeout=request.websocket_idle_timeout,
        )
        assert tunnel is not None  # has_room was checked just now
        site: Any = channel.site
        tunnel.when_closed().addBoth(lambda _: site.channel_closed(channel))
        request.report_upgraded()

    def upstream_data(self, data: bytes) -> None:
        """Relay a piece of the body."""
        timer = self.timer
        if timer is not None:
            timer.reset(self.timeout)
        self.request.write(data)

    def _body_stalled(self) -> None:
        producer = self.producer
        if producer is not None and producer.paused:
            self.timer = self.proxy.clock.callLater(self.timeout, self.time_is_up)
            return
        self.timer = None
        self.exchange.cancel()
        self.upstream_failed(
            Failure(defer.TimeoutError(f"no body data for {self.timeout:g}s")), True
        )

    def upstream_done(self) -> None:
        """The body is complete: finish the response."""
        self._cancel_timer()
        request = self.request
        request.on_abort = None
        if self.producer is not None:
            self.producer = None
            request.unregisterProducer()
        request.finish()

    def upstream_failed(self, reason: Failure, head_sent: bool) -> None:
        """The exchange failed: answer 502 if nothing was sent yet, else cut the client."""
        self._cancel_timer()
        request = self.request
        request.on_abort = None
        if not head_sent:
            self._failed(reason, False)
            return
        # The upstream broke mid-body: the status line is gone, so the only honest
        # signal left is to cut the client connection.
        if self.producer is not None:
            self.producer = None
            request.unregisterProducer()
        log.warn(
            "Upstream broke off the body of {method} {uri} -> {upstream}: {error}",
            method=request.method.decode("ascii", "replace"),
            uri=request.uri.decode("latin-1"),
            upstream=self.target.decode("ascii"),
            error=reason.getErrorMessage(),
            request_id=request.request_id.decode("latin-1"),
        )
        transport = getattr(request.channel, "transport", None)
        if transport is not None:
            transport.abortConnection()

    # --- helpers ----------------------------------------------------------------------

    def _cancel_timer(self) -> None:
        timer, self.timer = self.timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _failed(self, reason: Failure, timed_out: bool) -> None:
        if self.request._disconnected:
            return
        self.proxy._upstream_failed(
            self.request,
            self.route,
            self.target,
            reason,
            timed_out,
            self.on_result,
            self.on_failure,
        )


def _classify(reason: Failure, timed_out: bool) -> tuple[int, str]:
    """Map an upstream failure to a status and a metrics ``kind`` label."""
    if timed_out or reason.check(defer.TimeoutError, error.TimeoutError):
        return 504, "timeout"
    inner: Sequence[Failure] = getattr(reason.value, "reasons", None) or [reason]
    for f in inner:
        if f.check(error.ConnectionRefusedError):
            return 502, "refused"
        if f.check(error.DNSLookupError):
            return 502, "dns"
        if f.check(error.TimeoutError):
            return 504, "timeout"
    if reason.check(UpstreamError):
        return 502, "other"
    if reason.check(
        UpstreamReset,
        client.ResponseNeverReceived,
        client.RequestTransmissionFailed,
        client.ResponseFailed,
        error.ConnectionLost,
        error.ConnectionDone,
    ):
        return 502, "reset"
    return 502, "other"
