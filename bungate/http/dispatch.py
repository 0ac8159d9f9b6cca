"""
The request path of a worker: route each request, then answer it from a handler, a
balanced route or the reverse proxy, with the configured middlewares around it.

:class:`Dispatcher` is what :class:`~bungate.http.site.GatewaySite` calls for every
request. It also answers the built-in ``/health`` and (when metrics share the main port)
``/metrics`` endpoints.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Optional

import attrs
from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from bungate.config import GatewayConfig, LoadBalancerConfig, RouteConfig, TargetConfig
from bungate.core.clientaddr import TrustedProxies, client_address
from bungate.core.routing import Router
from bungate.core.target import Target, TargetError, normalize_target, parse_host
from bungate.http.balanced import BalancedRoute
from bungate.http.handlers import call_handler, resolve_handler
from bungate.http.healthcheck import HealthProbes
from bungate.http.middleware import make_middlewares, middleware_failed, run_request_middlewares
from bungate.http.policy.route import Refusal, RoutePolicy
from bungate.http.proxy import ReverseProxy, client_headers
from bungate.http.site import GatewayRequest, json_response
from bungate.interfaces import IMiddleware, UpstreamRequest
from bungate.ops.logging import request_id

__all__ = ["Dispatcher", "Route"]

#: The ``Allow`` of a 405 for TRACE on a route without ``methods``.
_ALLOW_BUT_TRACE = b"GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS"


@attrs.define
class Route:
    """
    One route as the dispatcher serves it.

    :ivar label: the pattern, as metrics and logs name the route.
    :ivar config: the route's validated config.
    :ivar methods: the allowed methods, or ``None`` for any.
    :ivar allow: the ``Allow`` header of a 405.
    :ivar target: the upstream base URL of a ``target`` route.
    :ivar handler: the callable of a ``handler`` route.
    :ivar balanced: the runtime of a ``load_balancer`` route.
    :ivar middlewares: the route's own middlewares (run after the gateway-wide ones).
    :ivar chain: gateway-wide then route middlewares, for ``process_response``; ``None``
        when empty, which keeps the request path free of middleware work.
    :ivar policy: see :mod:`bungate.http.policy.route`.
    """

    label: str
    config: RouteConfig
    methods: Optional[frozenset[bytes]]
    allow: bytes
    target: Optional[bytes] = None
    handler: Optional[Callable[..., Any]] = None
    balanced: Optional[BalancedRoute] = None
    middlewares: Sequence[IMiddleware] = ()
    chain: Optional[Sequence[IMiddleware]] = None
    #: the route's access and traffic policy, or ``None`` when it has none.
    policy: Optional[RoutePolicy] = None
    #: whether requests take the middleware/policy path (else the direct one).
    slow: bool = False


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
    :param access_log: ``access_log(request, status, duration)`` once per routed request.
    :param proxy: the reverse proxy (made from ``reactor``, ``metrics`` and
        ``tls_policy`` when not given).
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
        proxy: Optional[ReverseProxy] = None,
        limits: Any = None,
        names: Optional[Mapping[str, str]] = None,
    ) -> None:
        self.config = config
        #: the worker's rate-limit backends (:mod:`bungate.http.policy.ratelimit`).
        self.limits = limits
        self.names = dict(names or {})
        self.reactor = reactor
        self.clock: Any = reactor  # IReactorTime (typed Any: its zope methods lack self)
        self.status = status or (lambda: {"status": "ok", "pid": os.getpid()})
        self.metrics = metrics
        self.metrics_resource = metrics_resource
        self.access_log = access_log
        self.proxy = proxy or ReverseProxy(reactor, metrics=metrics, tls_policy=tls_policy)
        #: the active health checks' HTTP client (treq), shared by the balanced routes.
        self.probes = HealthProbes(reactor, tls_policy)
        server = config.server
        self._normalize: dict[str, Any] = {
            "merge_slashes": server.merge_slashes,
            "encoded_slashes": server.encoded_slashes,
            "path_params": server.path_params,
            "max_length": server.max_uri_length,
        }
        #: who may name the client in a forwarding header (``None``: nobody).
        self.trusted: Optional[TrustedProxies] = (
            TrustedProxies.parse(server.trusted_proxies) if server.trusted_proxies else None
        )
        self.router: Router[Route] = Router()
        self.health_path = config.health.path.encode() if config.health.enabled else None
        self.metrics_path = (
            config.metrics.path.encode()
            if config.metrics.enabled and config.metrics.listen is None and metrics_resource
            else None
        )
        #: the gateway-wide middlewares (``middlewares:`` at the top level), in order.
        self.middlewares: list[IMiddleware] = make_middlewares(
            config.source, "middlewares", config.middlewares
        )
        #: the runtime of every load-balanced route, in the order they were added.
        self.balanced: list[BalancedRoute] = []
        self._closed = False
        for route in config.routes:
            self.add(route)

    # --- routes -----------------------------------------------------------------------

    def add(self, route: RouteConfig) -> None:
        """
        Add a validated route; resolves its handler, strategy and middlewares now so
        errors show at start.

        A ``load_balancer`` route gets a :class:`~bungate.http.balanced.BalancedRoute`; its
        health checks start once the reactor runs (at once if it already does).

        :raises ConfigError: for an unknown strategy or middleware name.
        """
        methods = frozenset(m.encode() for m in route.methods) if route.methods else None
        allow = b", ".join(sorted(methods)) if methods else b""
        r = Route(label=route.pattern, config=route, methods=methods, allow=allow)
        index = self._route_index(route)
        r.middlewares = make_middlewares(
            self.config.source, f"routes[{index}].middlewares", route.middlewares
        )
        if self.middlewares or r.middlewares:
            r.chain = (*self.middlewares, *r.middlewares)
        policy = RoutePolicy(
            route,
            self.config,
            index,
            reactor=self.reactor,
            limits=self.limits,
            names=self.names,
            normalize={k: v for k, v in self._normalize.items() if k != "max_length"},
        )
        r.policy = policy if policy.active else None
        r.slow = r.chain is not None or r.policy is not None
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
            balanced = BalancedRoute(
                self.proxy,
                route,
                key=f"routes[{index}]",
                source=self.config.source,
                clock=self.clock,
                metrics=self.metrics,
                probe=self.probes.probe,
            )
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

    def _start_checks(self, balanced: BalancedRoute) -> None:
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
        for route in self.router.routes():
            if route.policy is not None:
                route.policy.close()

    def close_connections(self) -> defer.Deferred[Any]:
        """Close the idle upstream connections (proxy and health probes), once drained."""
        closing = [self.proxy.close(), self.probes.close()]
        if self.limits is not None:  # after the drain: requests in flight still decide
            closing.append(self.limits.close())
        return defer.gatherResults(closing, consumeErrors=True)

    # --- the request path -------------------------------------------------------------

    def __call__(self, request: GatewayRequest) -> None:
        """Normalize the target, check the Host, route, and start answering."""
        try:
            target = normalize_target(request.method, request.uri, **self._normalize)
            request.host = self._host(request, target)
        except TargetError as e:
            self.refuse(request, e.status, e.reason, e.message)
            return
        # One normalized target for everything from here on: route match, middlewares,
        # the access line and the path sent upstream.
        request.target = target
        request.uri = target.uri
        request.path = path = target.path
        if self.trusted is not None:
            self._client(request)
        if target.form == "asterisk":  # OPTIONS *: about the gateway, not a resource
            request.responseHeaders.setRawHeaders(b"allow", [_ALLOW_BUT_TRACE])
            request.setResponseCode(204)
            request.finish()
            return
        if self.health_path is not None and path == self.health_path:
            self._health(request)
            return
        if self.metrics_path is not None and path == self.metrics_path:
            body = self.metrics_resource.render(request)
            request.write(body)
            request.finish()
            return
        incoming = request.requestHeaders.getRawHeaders(b"x-request-id")
        rid = request_id(incoming[0] if incoming else None)
        request.request_id = rid
        request.responseHeaders.setRawHeaders(b"x-request-id", [rid])
        match = self.router.match(path.decode("ascii"))
        if match is None:
            if self.middlewares:
                self._with_middlewares(request, None)
                return
            self.refuse(request, 404, "not_found")
            return
        route = match.route
        request.route = route.label
        request.params = match.params
        if request.requestHeaders.hasHeader(b"upgrade"):
            self._upgrade(request, route)
        if self.metrics is not None:
            self.metrics.request_started()
        if route.slow:
            policy = route.policy
            if route.chain is None and policy is not None and policy.direct:
                self._with_policy(request, route, policy)
            else:
                self._with_middlewares(request, route)
            return
        if not self._allowed(request, route):
            self._not_allowed(request, route)
            return
        self._answer(request, route, None)

    def _host(self, request: GatewayRequest, target: Target) -> Optional[bytes]:
        """
        The request's host (RFC 9112 §3.2): an absolute-form target's authority, which
        then replaces any ``Host`` header, else the one ``Host`` header, valid; HTTP/1.1
        requires it.

        :raises TargetError: 400 for a missing, repeated or malformed host.
        """
        headers = request.requestHeaders
        if target.authority is not None:
            headers.setRawHeaders(b"host", [target.authority])
            return target.authority
        hosts = headers.getRawHeaders(b"host")
        if not hosts:
            if request.clientproto == b"HTTP/1.1":
                raise TargetError(400, "missing_host", "HTTP/1.1 requires a Host header")
            return None
        if len(hosts) > 1:
            raise TargetError(400, "repeated_host", "the request has more than one Host")
        host = hosts[0]
        channel: Any = request.channel
        if host != getattr(channel, "valid_host", None):  # a kept-alive client repeats it
            parse_host(host)
            channel.valid_host = host
        return host

    def _client(self, request: GatewayRequest) -> None:
        """The real client, when the peer is a trusted proxy that names it."""
        trusted = self.trusted
        assert trusted is not None
        peer = getattr(super(GatewayRequest, request).getClientAddress(), "host", None)
        if peer is None or not trusted.contains(peer):
            return
        request.trusted_peer = True
        header = self.config.server.forwarded_header
        values = request.requestHeaders.getRawHeaders(header.encode("ascii"))
        if values:
            request.client_ip = client_address(peer, values, trusted, header=header)

    def _upgrade(self, request: GatewayRequest, route: Route) -> None:
        """
        A WebSocket handshake (RFC 6455 §4.1) on a route that proxies them becomes a
        tunnel if the upstream answers 101. Any other ``Upgrade`` (``h2c``, a handshake
        on a route with ``websocket: false`` or a handler) is ignored, as RFC 9110
        allows: ``Upgrade`` is hop-by-hop and never reaches the upstream, and the request
        is served as plain HTTP/1.1.
        """
        if not route.config.websocket or route.handler is not None:
            return
        headers = request.requestHeaders
        upgrade = {
            t.strip().lower() for v in headers.getRawHeaders(b"upgrade", []) for t in v.split(b",")
        }
        connection = {
            t.strip().lower()
            for v in headers.getRawHeaders(b"connection", [])
            for t in v.split(b",")
        }
        if (
            request.method == b"GET"
            and request.clientproto == b"HTTP/1.1"
            and b"websocket" in upgrade
            and b"upgrade" in connection
            and headers.hasHeader(b"sec-websocket-key")
            and headers.hasHeader(b"sec-websocket-version")
        ):
            request.websocket = True
            request.websocket_idle_timeout = route.config.websocket_idle_timeout

    def _allowed(self, request: GatewayRequest, route: Route) -> bool:
        """The route's ``methods``; ``TRACE`` only where a route names it."""
        if route.methods is not None:
            return request.method in route.methods
        return request.method != b"TRACE"

    def refuse(
        self,
        request: GatewayRequest,
        status: int,
        reason: str,
        message: str = "",
        body: Optional[dict[str, Any]] = None,
    ) -> None:
        """Answer a request the gateway refuses, with the reason and the request id."""
        request.refused = reason
        if body is None:
            body = {"error": reason}
            if message:
                body["message"] = message
            if request.request_id:
                body["request_id"] = request.request_id.decode("latin-1")
        json_response(request, status, body)

    def _refuse_policy(self, request: GatewayRequest, refusal: Refusal) -> None:
        headers = request.responseHeaders
        for name, value in refusal.headers:
            headers.setRawHeaders(name, [value])
        self.refuse(request, refusal.status, refusal.reason, body=refusal.body)

    def _answer(
        self, request: GatewayRequest, route: Route, upstream: Optional[UpstreamRequest]
    ) -> None:
        """Answer a routed, allowed request from its handler, its balancer or its target."""
        if route.handler is not None:
            call_handler(request, route.handler)
        elif route.balanced is not None:
            route.balanced.handle(request, upstream, route.chain if upstream else None)
        else:
            assert route.target is not None
            self.proxy.forward(
                request,
                route.target,
                route=route.label,
                timeout=route.config.timeout,
                upstream=upstream,
                chain=route.chain if upstream is not None else None,
            )

    def _not_allowed(self, request: GatewayRequest, route: Route) -> None:
        allow = route.allow or _ALLOW_BUT_TRACE
        request.responseHeaders.setRawHeaders(b"allow", [allow])
        self.refuse(request, 405, "method_not_allowed", f"allowed: {allow.decode()}")

    # --- policy without middlewares -------------------------------------------------

    def _with_policy(self, request: GatewayRequest, route: Route, policy: RoutePolicy) -> None:
        """
        A route whose policy only lets requests through, refuses them, or adds and
        removes headers (:attr:`RoutePolicy.direct`): checked without building an
        upstream request, answered at once when every check is synchronous.
        """
        refusal = policy.start(request)
        if refusal is not None:
            self._refuse_policy(request, refusal)
            return
        if request.finished:  # a CORS preflight, answered
            return
        if not self._allowed(request, route):
            self._not_allowed(request, route)
            return
        if policy.checks_requests:
            try:
                checked = policy.check_direct(request)
            except Exception:
                middleware_failed(request, "request")
                return
            if isinstance(checked, defer.Deferred):
                request.on_abort = checked.cancel
                checked.addCallback(self._after_policy, request, route)
                checked.addErrback(self._policy_failed, request)
                return
            if checked is not None:
                self._refuse_policy(request, checked)
                return
        self._answer(request, route, None)

    def _after_policy(
        self, refusal: Optional[Refusal], request: GatewayRequest, route: Route
    ) -> None:
        request.on_abort = None
        if request._disconnected or request.finished:
            return
        if refusal is not None:
            self._refuse_policy(request, refusal)
            return
        self._answer(request, route, None)

    def _policy_failed(self, reason: Failure, request: GatewayRequest) -> None:
        request.on_abort = None
        if not request._disconnected:
            middleware_failed(request, "request", reason)

    # --- middlewares ------------------------------------------------------------------

    def _with_middlewares(self, request: GatewayRequest, route: Optional[Route]) -> None:
        """
        The request path when middlewares or a policy are configured: the gateway-wide
        middlewares, then (unless they answered) 404, the route's policy (CORS preflight,
        405, auth, rate limit, ``before_request``), the route's middlewares, the upstream
        request's rewrites, then the handler or the proxy.

        :param route: the matched route, or ``None`` (answered 404 after the gateway-wide
            middlewares let it through).
        """
        headers = Headers()
        for name, value in client_headers(request, self.proxy.underscores):
            headers.addRawHeader(name, value)
        upstream = UpstreamRequest(request.method, request.uri, headers)

        def gone() -> bool:
            return bool(request._disconnected or request.finished)

        def after_global(answered: bool) -> Any:
            if answered or gone():
                return None
            if route is None:
                self.refuse(request, 404, "not_found")
                return None
            policy = route.policy
            if policy is not None:
                refusal = policy.start(request)
                if refusal is not None:
                    self._refuse_policy(request, refusal)
                    return None
                if gone():  # a CORS preflight, answered
                    return None
            if not self._allowed(request, route):
                self._not_allowed(request, route)
                return None
            if policy is not None and policy.checks_requests:
                checked = policy.check(request, upstream)
                if isinstance(checked, defer.Deferred):
                    request.on_abort = checked.cancel
                    return checked.addCallback(after_policy)
                return after_policy(checked)
            return after_policy(None)

        def after_policy(refusal: Optional[Refusal]) -> Any:
            request.on_abort = None
            if refusal is not None:
                if not gone():
                    self._refuse_policy(request, refusal)
                return None
            if gone():
                return None
            assert route is not None
            if not route.middlewares:
                return after_route(False)
            d = run_request_middlewares(route.middlewares, request, upstream)
            request.on_abort = d.cancel
            return d.addCallback(after_route)

        def after_route(answered: bool) -> None:
            request.on_abort = None
            if answered or gone():
                return
            assert route is not None
            if route.policy is not None:
                try:
                    route.policy.prepare(upstream)
                except ValueError:
                    middleware_failed(request, "request")
                    return
            self._answer(request, route, upstream)

        def failed(reason: Failure) -> None:
            request.on_abort = None
            if request._disconnected:
                return  # the client left and we cancelled the middleware
            middleware_failed(request, "request", reason)

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
        """
        Account for a finished (or abandoned) request: metrics and the access line.
        The health and metrics endpoints are not traffic; a refused request is counted
        by its reason, so probes leave a trace.
        """
        route = request.route
        refused = request.refused
        if route is None and refused is None:
            return
        status = request.code if completed else 499
        duration = self.clock.seconds() - request.started
        metrics = self.metrics
        if metrics is not None:
            if refused is not None:
                metrics.request_rejected(status, refused)
            if route is not None:
                metrics.request_finished(
                    request.method.decode("ascii", "replace"), route, status, duration
                )
        if self.access_log is not None:
            self.access_log(request, status, duration)

    def _health(self, request: GatewayRequest) -> None:
        status = full = self.status()
        if not self.config.health.details:
            # Pids and connection counts are for operators: the metrics listener, or
            # health.details: true on a trusted network. Failed slots are said to all.
            status = {"status": full.get("status", "ok")}
            failed = full.get("fleet", {}).get("failed")
            if failed:
                status["failed_workers"] = failed
        code = 503 if status.get("status") == "draining" else 200
        request.responseHeaders.setRawHeaders(b"cache-control", [b"no-store"])
        json_response(request, code, status)
