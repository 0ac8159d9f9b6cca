"""
A route's whole policy, in the order the dispatcher applies it to a request:

1. CORS preflight (answered here, before any credentials are asked for);
2. ``auth`` (who the caller is; the client's copies of ``forward_claims`` headers are
   removed first, always);
3. ``rate_limit`` (how often this caller may come);
4. the ``before_request`` hook, then the route's middlewares (run by the dispatcher);
5. on the way upstream: the caller's claims as headers, ``request_headers``, then
   ``strip_prefix`` / ``path_rewrite``;
6. on the way back, just before the headers are written (for every answer: proxied, a
   handler's, or a refusal of steps 1 to 3): ``response_headers``, the rate-limit headers,
   CORS, the security headers, then the ``after_response`` hook.

A route with none of these has no :class:`RoutePolicy` and pays nothing for it.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import attrs
from twisted.internet import defer

from bungate.config import ConfigError, GatewayConfig, RouteConfig
from bungate.config.policy import inherit
from bungate.http.policy.cors import Cors
from bungate.http.policy.hooks import Hooks
from bungate.http.policy.rewrite import HeaderChanges, PathRewrite, SecurityHeaders
from bungate.interfaces import UpstreamRequest

__all__ = ["Refusal", "RoutePolicy"]


@attrs.frozen
class Refusal:
    """An answer the policy gives instead of the route: status, headers, JSON body."""

    status: int
    reason: str
    headers: tuple[tuple[bytes, bytes], ...] = ()
    body: Any = None


class RoutePolicy:
    """
    The policy of one route, built once per worker (files and imports read now).

    :param route: the validated route.
    :param config: the gateway config (its top-level defaults).
    :param index: the route's position, for error keys and rate-limit names.
    :param reactor: the reactor (JWKS fetches, clocks).
    :param limits: the worker's :class:`~bungate.http.policy.ratelimit.RateLimits`, or
        ``None`` when no route limits (then a route asking for one is a bug).
    :param names: ``{copy: original}`` of the files the master copied.
    :param normalize: the server's path rules, for rewritten paths.
    :raises ConfigError: naming the key of anything that cannot be read or imported.
    """

    def __init__(
        self,
        route: RouteConfig,
        config: GatewayConfig,
        index: int,
        *,
        reactor: Any,
        limits: Any = None,
        names: Any = None,
        normalize: Optional[dict[str, Any]] = None,
        fetch: Any = None,
    ) -> None:
        key = f"routes[{index}]"
        source = config.source
        self.name = f"{index}:{route.pattern}"
        cors = inherit(route.cors, config.cors)
        self.cors: Optional[Cors] = Cors(cors) if cors is not None else None
        self.auth: Any = None
        auth = inherit(route.auth, config.auth)
        if auth is not None:
            from bungate.http.policy.auth import AuthPolicy

            where = f"{key}.auth" if route.auth is not None else "auth"
            self.auth = AuthPolicy.build(
                auth, source=source, key=where, reactor=reactor, names=names or {}, fetch=fetch
            )
        self.limit: Any = None
        limit = inherit(route.rate_limit, config.rate_limit)
        if limit is not None:
            if limits is None:
                raise ConfigError(source, f"{key}.rate_limit", "no rate-limit backend here")
            where = f"{key}.rate_limit" if route.rate_limit is not None else "rate_limit"
            self.limit = limits.for_route(self.name, limit, where=where)
        hooks = dict(config.hooks)
        hooks.update(dict(route.hooks))
        self.hooks = Hooks(hooks, source, f"{key}.hooks" if route.hooks else "hooks")
        self.rewrite = PathRewrite(route, **(normalize or {}))
        self.request_headers = HeaderChanges(route.request_headers)
        self.response_headers = HeaderChanges(route.response_headers)
        security = inherit(route.security_headers, config.security_headers)
        self.security = (
            SecurityHeaders(security) if security is not None and security.enabled else None
        )
        #: whether the request can go upstream as the client sent it, with only headers
        #: removed and added (:meth:`check_direct`): no hook, header rule or rewrite
        #: needs the upstream request built first, so the dispatcher skips making one.
        self.direct = not (self.hooks.before_request or self.request_headers or self.rewrite)
        #: whether requests go through :meth:`check` (else only headers change).
        self.checks_requests = bool(self.auth or self.limit or self.hooks.before_request)

    @property
    def active(self) -> bool:
        """Whether the route has any policy at all."""
        return bool(
            self.cors
            or self.auth
            or self.limit
            or self.hooks
            or self.rewrite
            or self.request_headers
            or self.response_headers
            or self.security
        )


    # --- the request ------------------------------------------------------------------

    def start(self, request: Any) -> Optional[Refusal]:
        """
        Steps taken before anything else: the response policy is installed (so even a
        refusal gets CORS and security headers), and a CORS preflight is answered.

        :returns: a refusal to answer, or ``None`` (go on; ``request.finished`` when the
            preflight was answered).
        """
        request.before_headers = self.on_headers
        if self.hooks.on_error is not None:
            request.on_error = self.hooks.error
        if self.cors is not None:
            answered = self.cors.preflight(request)
            if answered is not None and answered[0] != 204:
                return Refusal(answered[0], answered[1])
        return None

    def check(
        self, request: Any, upstream: UpstreamRequest
    ) -> Union[Optional[Refusal], defer.Deferred[Optional[Refusal]]]:
        """Auth, then the rate limit, then ``before_request``; a refusal or ``None``."""
        if self.auth is not None:
            self.auth.strip(upstream.headers)
            try:
                identity = self.auth.authenticate(request)
            except Exception as e:
                return self._auth_refusal(request, e)
            if isinstance(identity, defer.Deferred):
                d = identity.addCallbacks(
                    lambda who: self._after_auth(request, upstream, who),
                    lambda f: self._auth_refusal(request, f.value),
                )
                return d
            return self._after_auth(request, upstream, identity)
        return self._after_auth(request, upstream, None)

    def check_direct(
        self, request: Any
    ) -> Union[Optional[Refusal], defer.Deferred[Optional[Refusal]]]:
        """
        :meth:`check` for a :attr:`direct` route: the headers the upstream must not get
        (``request.upstream_drop``) and the ones it gets from the policy
        (``request.upstream_add``) are left on the request for the proxy.
        """
        auth = self.auth
        if auth is None:
            return self._limit_direct(request, None)
        request.upstream_drop = auth.stripped
        try:
            identity = auth.authenticate(request)
        except Exception as e:
            return self._auth_refusal(request, e)
        if isinstance(identity, defer.Deferred):
            return identity.addCallbacks(
                lambda who: self._limit_direct(request, who),
                lambda f: self._auth_refusal(request, f.value),
            )
        return self._limit_direct(request, identity)

    def _limit_direct(self, request: Any, identity: Any) -> Any:
        request.identity = identity
        if self.auth is not None:
            request.upstream_add = self.auth.forwarded(identity)
        limit = self.limit
        if limit is None:
            return None
        key = limit.key_of(request, identity)
        if key is None:
            return None
        decision = limit.decide(key)
        if isinstance(decision, defer.Deferred):
            return decision.addCallback(lambda d: self._limit_verdict(request, d))
        return self._limit_verdict(request, decision)

    def _limit_verdict(self, request: Any, decision: Any) -> Optional[Refusal]:
        limit = self.limit
        if not decision.allowed:
            status, headers, body = limit.refusal(decision, request.request_id.decode("latin-1"))
            return Refusal(status, "rate_limited", tuple(headers), body)
        if limit.send_headers:
            request.rate_limit_headers = limit.headers(decision)
        return None

    def _auth_refusal(self, request: Any, error: Any) -> Refusal:
        from bungate.core.auth import AuthError

        if not isinstance(error, AuthError):
            raise error
        status, headers, body = self.auth.refusal(error, request.request_id.decode("latin-1"))
        return Refusal(status, f"auth_{error.reason}", tuple(headers), body)

    def _after_auth(self, request: Any, upstream: UpstreamRequest, identity: Any) -> Any:
        request.identity = identity
        if self.auth is not None:
            self.auth.forward(identity, upstream.headers)
        limit = self.limit
        if limit is None:
            return self._before(request, upstream)
        key = limit.key_of(request, identity)
        if key is None:  # a module:callable key said this request is not limited
            return self._before(request, upstream)
        decision = limit.decide(key)
        if isinstance(decision, defer.Deferred):
            return decision.addCallback(lambda d: self._after_limit(request, upstream, d))
        return self._after_limit(request, upstream, decision)

    def _after_limit(self, request: Any, upstream: UpstreamRequest, decision: Any) -> Any:
        refusal = self._limit_verdict(request, decision)
        if refusal is not None:
            return refusal
        return self._before(request, upstream)

    def _before(self, request: Any, upstream: UpstreamRequest) -> Any:
        if self.hooks.before_request is None:
            return None
        result = self.hooks.before(request, upstream)
        if isinstance(result, defer.Deferred):
            return result.addCallback(lambda answered: _answered(request, answered))
        return _answered(request, result)

    def prepare(self, upstream: UpstreamRequest) -> None:
        """
        The request as it goes upstream: header rules, then the path rewrites.

        :raises ValueError: when a rewrite produced no valid path.
        """
        if self.request_headers:
            self.request_headers.apply(upstream.headers)
        if self.rewrite:
            upstream.path = self.rewrite.apply(upstream.path)

    # --- the response -----------------------------------------------------------------

    def on_headers(self, request: Any) -> None:
        """Just before the status line and headers are written: step 6."""
        headers = request.responseHeaders
        if self.response_headers:
            self.response_headers.apply(headers)
        extra = getattr(request, "rate_limit_headers", None)
        if extra:
            for name, value in extra:
                headers.setRawHeaders(name, [value])
        if self.cors is not None and not getattr(request, "cors_preflight", False):
            self.cors.response_headers(request, headers)
        if self.security is not None:
            self.security.apply(request, headers)
        self.hooks.after(request, headers)

    def close(self) -> None:
        """Stop background work (JWKS refreshes)."""
        if self.auth is not None:
            self.auth.close()


def _answered(request: Any, answered: Any) -> Optional[Refusal]:
    """
    After ``before_request``: no refusal either way; when it answered the request
    (returned true, and finished it) the dispatcher sees ``request.finished``.
    """
    return None
