"""
The request path of a worker: route, then answer from a handler or proxy upstream.

:class:`Dispatcher` is what :class:`bungate.web.GatewaySite` calls for every request.
Proxying goes through :class:`bungate.upstream.UpstreamClient` (pooled keep-alive
connections, the request head serialized once); the upstream body is relayed as it
arrives, with the upstream connection registered as the producer of the client response
so a slow client pauses the upstream read instead of growing a buffer. Twisted's
``Agent`` remains for the active health checks.
"""

from __future__ import annotations

import inspect
import json
import os
import re
from collections.abc import Mapping, Sequence
from importlib import import_module
from io import BytesIO
from typing import Any, Callable, Optional

import attrs
from twisted.internet import defer, error
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import client
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from bungate.config import GatewayConfig, LoadBalancerConfig, RouteConfig, TargetConfig
from bungate.extensions import run_request_middlewares, run_response_middlewares
from bungate.interfaces import Middleware, UpstreamRequest
from bungate.logging import request_id
from bungate.routing import Router
from bungate.upstream import (
    UpstreamClient,
    UpstreamConnectTimeout,
    UpstreamError,
    UpstreamReset,
    client_endpoint,
    serialize_head,
)
from bungate.web import GatewayRequest, json_response

__all__ = ["Dispatcher", "Response", "resolve_handler"]

log = Logger(namespace="bungate.proxy")

# RFC 9110 7.6.1 hop-by-hop fields, plus the non-standard Proxy-Connection.
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
# Not hop-by-hop, but the gateway sets them itself when it forwards a request.
_REQUEST_SKIP = HOP_BY_HOP | {b"host", b"content-length", b"expect", b"x-request-id"}
# ... and, when the client sent a Host, the X-Forwarded-Host it becomes.
_REQUEST_SKIP_HOST = _REQUEST_SKIP | {b"x-forwarded-host"}
# Rebuilt from the client connection on every request.
_FORWARDED = frozenset({b"x-forwarded-for", b"x-forwarded-proto"})
_NO_BODY_STATUS = frozenset({204, 304})
# What a middleware may leave in the upstream request line (RFC 9110 token, origin-form).
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_ORIGIN_FORM = re.compile(rb"/[\x21-\x7e\x80-\xff]*")


@attrs.frozen
class Response:
    """
    What a handler may return: a status, headers and a body.

    A ``dict`` or ``list`` body is sent as JSON, ``str`` as UTF-8 text.
    """

    body: Any = b""
    status: int = 200
    headers: Mapping[str, str] = attrs.field(factory=dict)


def resolve_handler(spec: Any) -> Callable[..., Any]:
    """
    Turn a handler setting into a callable.

    :param spec: a callable, or an import string ``package.module:attribute``.
    :raises ValueError: when the module or attribute cannot be imported.
    """
    if callable(spec):
        return spec  # type: ignore[no-any-return]
    module_name, _, attr = str(spec).partition(":")
    try:
        obj: Any = import_module(module_name)
    except Exception as e:
        raise ValueError(f"cannot import module {module_name!r}: {e}") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"module {module_name!r} has no attribute {attr!r}") from None
    if not callable(obj):
        raise ValueError(f"{spec!r} is not callable")
    return obj  # type: ignore[no-any-return]


@attrs.define
class _Route:
    label: str
    config: RouteConfig
    methods: Optional[frozenset[bytes]]
    allow: bytes
    target: Optional[bytes] = None
    handler: Optional[Callable[..., Any]] = None
    #: the runtime of a ``load_balancer`` route (a :class:`bungate.balanced.BalancedRoute`).
    balanced: Any = None
    #: the route's own middlewares (run after the gateway-wide ones), in order.
    middlewares: Sequence[Middleware] = ()
    #: gateway-wide then route middlewares, for ``process_response``; ``None`` when empty,
    #: which keeps the request path free of middleware work.
    chain: Optional[Sequence[Middleware]] = None


class Dispatcher:
    """
    Answers every request of a worker.

    :param config: the validated gateway config.
    :param reactor: the reactor (clock, connections).
    :param status: a callable returning the worker's health summary (a dict); its
        ``"status"`` is ``"draining"`` while the worker drains.
    :param metrics: an object with ``request_started()``, ``request_finished(method,
        route, status, duration)`` and ``upstream_error(route, kind)``, or ``None``.
    :param metrics_resource: a twisted.web resource that renders ``/metrics``, or ``None``.
    :param tls_policy: the ``IPolicyForHTTPS`` for https upstreams, or ``None``.
    """

    def __init__(
        self,
        config: GatewayConfig,
        reactor: Any,
        status: Optional[Callable[[], dict[str, Any]]] = None,
        metrics: Any = None,
        metrics_resource: Any = None,
        tls_policy: Any = None,
        access_log: Optional[Callable[..., None]] = None,
    ) -> None:
        self.config = config
        self.reactor = reactor
        self.clock: Any = reactor  # IReactorTime (typed Any: its zope methods lack self)
        self.status = status or (lambda: {"status": "ok", "pid": os.getpid()})
        self.metrics = metrics
        self.metrics_resource = metrics_resource
        self.access_log = access_log
        #: the proxy's upstream connections (see :mod:`bungate.upstream` for why not Agent).
        self.upstreams = UpstreamClient(
            reactor, max_idle_per_host=256, idle_timeout=60.0, tls_policy=tls_policy
        )
        # Agent serves the active health checks only: a probe every few seconds per
        # target gains nothing from the lean client and keeps treq-style ergonomics.
        self.pool = client.HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = 4
        self.pool.cachedConnectionTimeout = 60
        self.agent = client.Agent.usingEndpointFactory(
            reactor, _UpstreamEndpoints(reactor, tls_policy), pool=self.pool
        )
        self.router: Router[_Route] = Router()
        self.health_path = config.health.path.encode() if config.health.enabled else None
        self.metrics_path = (
            config.metrics.path.encode()
            if config.metrics.enabled and config.metrics.listen is None and metrics_resource
            else None
        )
        from bungate.balanced import make_middlewares

        #: the gateway-wide middlewares (``middlewares:`` at the top level), in order.
        self.middlewares: list[Middleware] = make_middlewares(
            config.source, "middlewares", config.middlewares
        )
        #: the runtime of every load-balanced route
        #: (:class:`~bungate.balanced.BalancedRoute`), in the order they were added.
        self.balanced: list[Any] = []
        self._closed = False
        for route in config.routes:
            self.add(route)

    # --- routes -----------------------------------------------------------------------

    def add(self, route: RouteConfig) -> None:
        """
        Add a validated route; resolves its handler, strategy and middlewares now so
        errors show at start.

        A ``load_balancer`` route gets a :class:`~bungate.balanced.BalancedRoute`; its
        health checks start once the reactor runs (at once if it already does).

        :raises ConfigError: for an unknown strategy or middleware name.
        """
        from bungate.balanced import BalancedRoute, make_middlewares

        methods = frozenset(m.encode() for m in route.methods) if route.methods else None
        allow = b", ".join(sorted(methods)) if methods else b""
        r = _Route(label=route.pattern, config=route, methods=methods, allow=allow)
        index = self._route_index(route)
        r.middlewares = make_middlewares(
            self.config.source, f"routes[{index}].middlewares", route.middlewares
        )
        if self.middlewares or r.middlewares:
            r.chain = (*self.middlewares, *r.middlewares)
        if route.target is not None and route.circuit_breaker.enabled:
            # A breaker on a single target: the same runtime as a one-target balancer, so
            # an open circuit answers 503 at once and shows in the circuit metrics.
            route = attrs.evolve(
                route,
                target=None,
                load_balancer=LoadBalancerConfig(targets=(TargetConfig(url=route.target),)),
            )
            r.config = route
        if route.handler is not None:
            r.handler = resolve_handler(route.handler)
        elif route.target is not None:
            r.target = route.target.encode("ascii")
        elif route.load_balancer is not None:
            balanced = BalancedRoute(self, route, key=f"routes[{index}]")
            r.balanced = balanced
            self.balanced.append(balanced)
            if balanced.checker is not None and not self._closed:
                self.reactor.callWhenRunning(self._start_checks, balanced)
        self.router.add(route.pattern, r)

    def _route_index(self, route: RouteConfig) -> int:
        for i, known in enumerate(self.config.routes):
            if known is route:
                return i
        return len(self.config.routes)

    def _start_checks(self, balanced: Any) -> None:
        if not self._closed:
            balanced.start()

    def close(self) -> None:
        """
        Stop the background work of this dispatcher (active health checks). Call it when
        the worker starts to drain; requests still in flight are not affected.
        """
        self._closed = True
        for balanced in self.balanced:
            balanced.stop()

    def close_connections(self) -> defer.Deferred[Any]:
        """Close the idle upstream connections (proxy and health probes), once drained."""
        return defer.gatherResults(
            [self.upstreams.close(), self.pool.closeCachedConnections()], consumeErrors=True
        )

    # --- the request path -------------------------------------------------------------

    def __call__(self, request: GatewayRequest) -> None:
        """Route one request and start answering it."""
        path = request.path
        if self.health_path is not None and path == self.health_path:
            request.route = None
            self._health(request)
            return
        if self.metrics_path is not None and path == self.metrics_path:
            request.route = None
            body = self.metrics_resource.render(request)
            request.write(body)
            request.finish()
            return
        incoming = request.requestHeaders.getRawHeaders(b"x-request-id")
        rid = request_id(incoming[0] if incoming else None)
        request.request_id = rid
        request.responseHeaders.setRawHeaders(b"x-request-id", [rid])
        if b"/." in path and _has_dot_segment(path):
            json_response(request, 400, {"error": "bad_path", "request_id": rid.decode("latin-1")})
            return
        match = self.router.match(path.decode("latin-1"))
        if match is None:
            if self.middlewares:
                self._with_middlewares(request, None)
                return
            json_response(request, 404, {"error": "not_found", "request_id": rid.decode("latin-1")})
            return
        route = match.route
        request.route = route.label
        request.params = match.params
        if self.metrics is not None:
            self.metrics.request_started()
        if route.chain is not None:
            self._with_middlewares(request, route)
            return
        if route.methods is not None and request.method not in route.methods:
            self._not_allowed(request, route)
            return
        self._answer(request, route, None)

    def _answer(
        self, request: GatewayRequest, route: _Route, upstream: Optional[UpstreamRequest]
    ) -> None:
        """Answer a routed, allowed request from its handler, its balancer or its target."""
        if route.handler is not None:
            self._call_handler(request, route)
        elif route.balanced is not None:
            route.balanced.handle(request, route, upstream)
        else:
            assert route.target is not None
            self._proxy(request, route, route.target, upstream=upstream)

    def _not_allowed(self, request: GatewayRequest, route: _Route) -> None:
        request.responseHeaders.setRawHeaders(b"allow", [route.allow])
        json_response(
            request,
            405,
            {"error": "method_not_allowed", "allow": route.allow.decode()},
        )

    # --- middlewares ------------------------------------------------------------------

    def _with_middlewares(self, request: GatewayRequest, route: Optional[_Route]) -> None:
        """
        The request path when middlewares are configured: the gateway-wide ones, then
        (unless they answered) 404/405, the route's ones, then the handler or the proxy.

        :param route: the matched route, or ``None`` (answered 404 after the gateway-wide
            middlewares let it through).
        """
        upstream = UpstreamRequest(
            request.method, _origin_form(request.uri), request.requestHeaders.copy()
        )

        def after_global(answered: bool) -> Any:
            if answered or request._disconnected or request.finished:
                return None
            if route is None:
                json_response(
                    request,
                    404,
                    {"error": "not_found", "request_id": request.request_id.decode("latin-1")},
                )
                return None
            if route.methods is not None and request.method not in route.methods:
                self._not_allowed(request, route)
                return None
            if not route.middlewares:
                return after_route(False)
            d = run_request_middlewares(route.middlewares, request, upstream)
            request.on_abort = d.cancel
            return d.addCallback(after_route)

        def after_route(answered: bool) -> None:
            request.on_abort = None
            if answered or request._disconnected or request.finished:
                return
            assert route is not None
            self._answer(request, route, upstream)

        def failed(reason: Failure) -> None:
            request.on_abort = None
            if request._disconnected:
                return  # the client left and we cancelled the middleware
            self._middleware_failed(request, "request", reason)

        if self.middlewares:
            d = run_request_middlewares(self.middlewares, request, upstream)
            if not d.called:
                request.on_abort = d.cancel
            d.addCallback(after_global)
        else:
            d = defer.maybeDeferred(after_global, False)
        d.addErrback(failed)
        d.addErrback(request.processingFailed)

    def on_done(self, request: GatewayRequest, completed: bool) -> None:
        """Account for a finished (or abandoned) request: metrics and the access line."""
        route = request.route
        if route is None:
            return
        status = request.code if completed else 499
        duration = self.clock.seconds() - request.started
        if self.metrics is not None:
            self.metrics.request_finished(
                request.method.decode("ascii", "replace"), route, status, duration
            )
        if self.access_log is not None:
            self.access_log(request, status, duration)

    def _health(self, request: GatewayRequest) -> None:
        status = self.status()
        code = 503 if status.get("status") == "draining" else 200
        request.responseHeaders.setRawHeaders(b"cache-control", [b"no-store"])
        json_response(request, code, status)

    # --- handlers ---------------------------------------------------------------------

    def _call_handler(self, request: GatewayRequest, route: _Route) -> None:
        assert route.handler is not None
        try:
            result = route.handler(request)
            if inspect.iscoroutine(result):
                result = defer.ensureDeferred(result)
            elif inspect.isawaitable(result) and not isinstance(result, defer.Deferred):
                result = defer.ensureDeferred(_awaited(result))
        except Exception:
            request.processingFailed(Failure())
            return
        if isinstance(result, defer.Deferred):
            result.addCallbacks(
                lambda value: self._write_result(request, value), request.processingFailed
            )
        else:
            self._write_result(request, result)

    def _write_result(self, request: GatewayRequest, value: Any) -> None:
        if request.finished or request._disconnected:
            return
        status, headers = 200, {}
        if isinstance(value, Response):
            status, headers, value = value.status, dict(value.headers), value.body
        if value is None and request.startedWriting:
            return  # the handler wrote the response itself and will finish it
        if isinstance(value, (dict, list)):
            body = json.dumps(value).encode("utf-8")
            headers.setdefault("content-type", "application/json")
        elif isinstance(value, str):
            body = value.encode("utf-8")
            headers.setdefault("content-type", "text/plain; charset=utf-8")
        elif isinstance(value, (bytes, bytearray)):
            body = bytes(value)
            headers.setdefault("content-type", "application/octet-stream")
        elif value is None:
            body, status = b"", (204 if status == 200 else status)
        else:
            raise TypeError(f"a handler returned {type(value).__name__}, not a response")
        request.setResponseCode(status)
        for name, v in headers.items():
            request.responseHeaders.setRawHeaders(name.encode("latin-1"), [v.encode("latin-1")])
        if status not in _NO_BODY_STATUS:
            request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % len(body)])
            request.write(body)
        request.finish()

    # --- proxying ---------------------------------------------------------------------

    def _proxy(
        self,
        request: GatewayRequest,
        route: _Route,
        target: bytes,
        on_result: Optional[Callable[[str, int], None]] = None,
        on_failure: Optional[Callable[[Failure, str], bool]] = None,
        upstream: Optional[UpstreamRequest] = None,
        timeout: Optional[float] = None,
    ) -> None:
        """
        Forward ``request`` to ``target`` (a base URL) and relay the answer.

        Safe to call again for the same request from ``on_failure`` (a retry): the
        request headers and body are rebuilt for every attempt.

        :param on_result: called once per attempt with ``(outcome, status)``; outcome is
            ``ok`` (an upstream answered, whatever its status), ``client-gone``, or a
            failure kind (``refused``, ``timeout``, ``reset``, ``dns``, ``other``).
        :param on_failure: called with ``(failure, kind)`` before a 502/504 is written;
            returning ``True`` means the caller took over (e.g. retried elsewhere).
        :param upstream: the method, path and headers to send, as request middlewares
            left them; ``None`` sends the incoming request's. Its hop-by-hop headers are
            dropped here, after the middlewares ran.
        :param timeout: seconds to wait for the response headers; the route's
            ``timeout`` when ``None``.
        """
        if upstream is None:
            method = request.method
            uri = request.uri
            if not uri.startswith(b"/"):
                uri = _origin_form(uri)  # absolute-form: forward only the path and query
            source = request.requestHeaders
            chain = None
        else:
            method = upstream.method
            uri = upstream.path
            source = upstream.headers
            chain = route.chain
            if not (_TOKEN.fullmatch(method) and _ORIGIN_FORM.fullmatch(uri)):
                # A middleware set something that would split the request line.
                problem = ValueError(f"invalid upstream request line {method!r} {uri!r}")
                self._middleware_failed(request, "request", Failure(problem))
                return
        request.upstream = target.decode("ascii")
        host_header, prefix = self.upstreams.head_for(target)

        lines: list[tuple[bytes, bytes]] = [(b"Host", host_header)]
        host = source.getRawHeaders(b"host")
        named = _REQUEST_SKIP_HOST if host else _REQUEST_SKIP
        tokens = source.getRawHeaders(b"connection")
        if tokens:
            named = named | {t.strip().lower() for v in tokens for t in v.split(b",")}
        for name, values in source.getAllRawHeaders():
            lower = name.lower()
            if lower in named or lower in _FORWARDED:
                continue
            for value in values:
                lines.append((name, value))
        peer = getattr(request.getClientAddress(), "host", None)
        prior = source.getRawHeaders(b"x-forwarded-for")
        if peer is not None:
            forwarded = (b", ".join(prior) + b", " if prior else b"") + peer.encode("ascii")
            lines.append((b"X-Forwarded-For", forwarded))
        elif prior:
            lines.extend((b"X-Forwarded-For", v) for v in prior)
        lines.append((b"X-Forwarded-Proto", b"https" if request.isSecure() else b"http"))
        if host:
            lines.append((b"X-Forwarded-Host", host[0]))
        lines.append((b"X-Request-Id", request.request_id))

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
        sink.timeout = route.config.timeout if timeout is None else timeout
        sink.timer = self.clock.callLater(sink.timeout, sink.time_is_up)
        request.on_abort = sink.client_gone
        sink.exchange = self.upstreams.request(target, method, head, body, sink)

    def _upstream_failed(
        self,
        request: GatewayRequest,
        route: _Route,
        target: bytes,
        reason: Failure,
        timed_out: bool,
        on_result: Optional[Callable[[str, int], None]],
        on_failure: Optional[Callable[[Failure, str], bool]],
    ) -> None:
        """No answer came from the upstream: retry (via ``on_failure``) or 502/504."""
        status, kind = _classify(reason, timed_out)
        if on_result is not None:
            on_result(kind, status)
        if on_failure is not None and on_failure(reason, kind):
            return
        if self.metrics is not None:
            self.metrics.upstream_error(route.label, kind)
        log.warn(
            "Upstream {kind} for {method} {uri} via {route} -> {upstream}: {error}",
            kind=kind,
            method=request.method.decode("ascii", "replace"),
            uri=request.uri.decode("latin-1"),
            route=route.label,
            upstream=target.decode("ascii"),
            error=reason.getErrorMessage(),
            request_id=request.request_id.decode("latin-1"),
        )
        json_response(
            request,
            status,
            {
                "error": "gateway_timeout" if status == 504 else "bad_gateway",
                "reason": kind,
                "request_id": request.request_id.decode("latin-1"),
            },
        )

    def _middleware_failed(
        self, request: GatewayRequest, stage: str, reason: Optional[Failure] = None
    ) -> None:
        """Log a middleware's exception (``reason``, else the current one) and answer 500."""
        log.failure(
            "A middleware failed on the {stage} of {method} {uri}",
            reason,
            stage=stage,
            method=request.method.decode("ascii", "replace"),
            uri=request.uri.decode("latin-1"),
            request_id=request.request_id.decode("latin-1"),
        )
        json_response(
            request,
            500,
            {"error": "middleware_error", "request_id": request.request_id.decode("latin-1")},
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
        "dispatcher",
        "exchange",
        "method",
        "on_failure",
        "on_result",
        "producer",
        "request",
        "route",
        "target",
        "timeout",
        "timer",
    )

    def __init__(
        self,
        dispatcher: Dispatcher,
        request: GatewayRequest,
        route: _Route,
        target: bytes,
        method: bytes,
        chain: Optional[Sequence[Middleware]],
        on_result: Optional[Callable[[str, int], None]],
        on_failure: Optional[Callable[[Failure, str], bool]],
    ) -> None:
        self.dispatcher = dispatcher
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
        if self.on_result is not None:
            self.on_result("ok", code)
        request.setResponseCode(code, phrase or None)
        no_body = self.method == b"HEAD" or code in _NO_BODY_STATUS
        named = HOP_BY_HOP
        connection = self.exchange.connection_header
        if connection:
            named = named | {t.strip() for t in connection.split(b",")}
        grouped: dict[bytes, list[bytes]] = {}
        for name, value in headers:
            lower = name.lower()
            if lower in named or (lower == b"content-length" and (not no_body or code == 204)):
                continue
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
                self.dispatcher._middleware_failed(request, "response")
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
                self.timer = self.dispatcher.clock.callLater(self.timeout, self.time_is_up)
        else:
            self._cancel_timer()

    def upstream_data(self, data: bytes) -> None:
        """Relay a piece of the body."""
        timer = self.timer
        if timer is not None:
            timer.reset(self.timeout)
        self.request.write(data)

    def _body_stalled(self) -> None:
        producer = self.producer
        if producer is not None and producer.paused:
            self.timer = self.dispatcher.clock.callLater(self.timeout, self.time_is_up)
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
        self.dispatcher._upstream_failed(
            self.request,
            self.route,
            self.target,
            reason,
            timed_out,
            self.on_result,
            self.on_failure,
        )


@implementer(IAgentEndpointFactory)
class _UpstreamEndpoints:
    """
    Where the health checks' Agent connects: the same endpoints as the proxy's own
    client (:func:`bungate.upstream.client_endpoint`).

    :param reactor: connects.
    :param tls_policy: the ``IPolicyForHTTPS`` for https upstreams, or ``None``.
    """

    def __init__(self, reactor: Any, tls_policy: Any = None) -> None:
        self._reactor = reactor
        self._policy = tls_policy

    def endpointForURI(self, uri: client.URI) -> Any:
        """
        The endpoint to reach ``uri``'s host and port.

        :param uri: the request URI.
        :raises SchemeNotSupported: for anything but http and https.
        """
        if uri.scheme not in (b"http", b"https"):
            raise client.SchemeNotSupported(f"unsupported scheme: {uri.scheme!r}")
        try:
            host = uri.host.decode("ascii")
        except UnicodeDecodeError:
            raise ValueError(f"the host of {uri.toBytes()!r} is not ASCII") from None
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        return client_endpoint(self._reactor, uri.scheme == b"https", host, uri.port, self._policy)


async def _awaited(awaitable: Any) -> Any:
    """A coroutine for any awaitable a handler returned (a Future-like object)."""
    return await awaitable


def _origin_form(uri: bytes) -> bytes:
    """The path and query of a request target (an absolute-form one loses its origin)."""
    if uri.startswith(b"/"):
        return uri
    scheme_end = uri.find(b"://")
    slash = uri.find(b"/", scheme_end + 3) if scheme_end >= 0 else -1
    return uri[slash:] if slash >= 0 else b"/"


def _has_dot_segment(path: bytes) -> bool:
    for segment in path.split(b"/"):
        if segment in (b".", b".."):
            return True
    return False


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
