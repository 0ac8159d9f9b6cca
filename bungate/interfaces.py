"""
The interfaces bungate is extended through.

Two kinds of plugin exist, both found with :func:`twisted.plugin.getPlugins` in the
:mod:`bungate.plugins` plugin package and named in the configuration by their ``name``:

* a **balancing strategy** (``load_balancer.strategy: my-strategy``): a module-level object
  providing :class:`~twisted.plugin.IPlugin` and :class:`IBalancerFactory`; calling it
  makes one :class:`IBalancer` per route (strategies may keep per-route state);
* a **request middleware** (``middlewares: [my-auth]`` at the top level or on a route): a
  module-level object providing :class:`~twisted.plugin.IPlugin` and
  :class:`IMiddlewareFactory`; calling it makes one :class:`IMiddleware`.

The contracts below are what the gateway promises to plugins and what it expects back.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import attrs
from twisted.web.http_headers import Headers
from zope.interface import Attribute, Interface

__all__ = [
    "IBalancer",
    "IBalancerFactory",
    "IMiddleware",
    "IMiddlewareFactory",
    "UpstreamRequest",
]


class IBalancer(Interface):  # type: ignore[misc]
    """
    A load-balancing strategy for one route.

    The gateway makes one instance per route (through :class:`IBalancerFactory`) and calls
    :meth:`pick` once per request, from the reactor thread only, so an implementation may
    keep unsynchronised state (counters, weights) on itself.
    """

    def pick(  # type: ignore[empty-body]
        candidates: Sequence[Any], client_ip: str, rng: random.Random
    ) -> Any:
        """
        Choose the upstream for one request.

        :param candidates: the upstreams that may take a request right now: healthy, their
            circuit breaker allows a request, not excluded by a retry. Never empty, always
            in the order of the route's ``targets``. Read, never change, their state:
            :attr:`~bungate.core.balancing.Upstream.url`, ``weight``, ``active`` (requests in
            flight), ``latency`` (EWMA of response time in seconds, ``None`` before the
            first answer).
        :param client_ip: the address of the client (``""`` when unknown).
        :param rng: the route's random source; use it instead of the :mod:`random` module
            so that tests can seed it.
            (Each is a :class:`bungate.core.balancing.Upstream`; the contract names it
            ``Any`` so that this module depends on nothing of the implementation.)
        :returns: one element of ``candidates``.
        """


class IBalancerFactory(Interface):  # type: ignore[misc]
    """
    A balancing strategy plugin: provide this and :class:`twisted.plugin.IPlugin`.

    The simplest provider is the strategy class itself, decorated with
    ``@zope.interface.implementer(IBalancer)`` and
    ``@zope.interface.provider(IPlugin, IBalancerFactory)``, with a class attribute
    ``name``.
    """

    name = Attribute(
        "The strategy's name as written in the config (``load_balancer.strategy``). "
        "Unique among the installed strategies."
    )

    def __call__() -> IBalancer:  # type: ignore[misc, empty-body]
        """
        Make a fresh strategy for one route.

        :returns: a provider of :class:`IBalancer`.
        """


@attrs.define
class UpstreamRequest:
    """
    The request the gateway will send upstream, open to changes by middlewares.

    The proxy builds one per incoming request, before any middleware runs, as a copy of
    the incoming request; every middleware (gateway-wide, then the route's) sees the same
    object; the proxy then sends what it holds. For a route answered by a handler it is
    built too, and ignored.

    :ivar method: the HTTP method, e.g. ``b"GET"``.
    :ivar path: the path and query to ask the upstream for, e.g. ``b"/users/1?x=2"``
        (after the route's prefix handling).
    :ivar headers: the headers to send; hop-by-hop headers are removed by the proxy after
        the middlewares ran, and ``Host`` is set by the proxy.
    """

    method: bytes
    path: bytes
    headers: Headers = attrs.field(factory=Headers)


class IMiddleware(Interface):  # type: ignore[misc]
    """
    A request middleware.

    Order: gateway-wide middlewares (``middlewares:`` at the top level) run before routing,
    in the order listed; then the matched route's ``middlewares:`` run in the order
    listed, before the request is handed to the handler or proxied. The proxy calls each
    method from the reactor thread.
    """

    name = Attribute("The middleware's name as written in the config.")

    def process_request(request: Any, upstream: UpstreamRequest) -> Any:
        """
        See a request before it is routed (gateway-wide) or proxied (per route).

        The middleware may:

        * let the request go on: return ``None`` or a false value (or a
          :class:`~twisted.internet.defer.Deferred` firing one);
        * change what is sent upstream: change ``upstream.headers``, ``upstream.path`` or
          ``upstream.method`` in place, then let the request go on;
        * answer the request itself: write the response on ``request``
          (``setResponseCode``, ``setHeader``, ``write``), call ``request.finish()``, and
          return ``True`` (or a Deferred firing ``True``). No later middleware runs and
          nothing is proxied; :meth:`process_response` is not called for this request.

        Raising, or returning a Deferred that fails, makes the gateway answer ``500`` (the
        failure is logged); later middlewares do not run.

        :param request: the incoming :class:`twisted.web.server.Request`. Read it; only
            write to it when answering the request.
        :param upstream: the :class:`UpstreamRequest` the proxy will send.
        :returns: ``None``/false to go on, ``True`` when the request was answered, or a
            Deferred firing one of these.
        """

    def process_response(request: Any, status: int, headers: Headers) -> None:
        """
        See the response an upstream gave, before its status and headers reach the client.

        Called once for every response the proxy relays from an upstream, in the reverse
        of the order :meth:`process_request` ran in (route middlewares first, then the
        gateway-wide ones). Not called for requests a middleware answered, for handler
        routes, or for the gateway's own error answers (502, 503, 504).

        :param request: the incoming :class:`twisted.web.server.Request`.
        :param status: the upstream's status code (read only).
        :param headers: the response headers that will be sent to the client; add,
            change or remove headers in place. Synchronous: return nothing.
        """


class IMiddlewareFactory(Interface):  # type: ignore[misc]
    """
    A middleware plugin: provide this and :class:`twisted.plugin.IPlugin`.

    Like :class:`IBalancerFactory`, the middleware class itself may be the factory.
    """

    name = Attribute(
        "The middleware's name as written in the config (``middlewares: [name]``). Unique "
        "among the installed middlewares."
    )

    def __call__() -> IMiddleware:  # type: ignore[misc, empty-body]
        """
        Make the middleware. The gateway calls this once per place the name is listed
        (once for the gateway-wide list, once per route listing it).

        :returns: a provider of :class:`IMiddleware`.
        """
