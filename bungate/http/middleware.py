"""
Request middlewares on the request path: built from the names a config lists, and run in
order (gateway-wide first, then the route's; responses in the reverse order).

See :class:`bungate.interfaces.IMiddleware` for what a middleware may do.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Optional

from twisted.internet.defer import Deferred, ensureDeferred, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from bungate.config import ConfigError, GatewayConfig
from bungate.http.plugins import find_middleware, find_strategy
from bungate.http.site import GatewayRequest, error_response
from bungate.interfaces import IMiddleware, UpstreamRequest

__all__ = [
    "check_plugins",
    "lookup",
    "make_middlewares",
    "middleware_failed",
    "run_request_middlewares",
    "run_response_middlewares",
]

log = Logger(namespace="bungate.proxy")


def check_plugins(config: GatewayConfig) -> None:
    """
    Look up every strategy and middleware the config names.

    Run before any worker serves, so a typo stops the gateway at start instead of in
    every worker.

    :param config: the validated config.
    :raises ConfigError: naming the key of the first unknown name, with the list of
        installed plugins of that kind.
    """
    make_middlewares(config.source, "middlewares", config.middlewares)
    for i, route in enumerate(config.routes):
        if route.load_balancer is not None:
            lookup(
                config.source,
                f"routes[{i}].load_balancer.strategy",
                find_strategy,
                route.load_balancer.strategy,
            )
        make_middlewares(config.source, f"routes[{i}].middlewares", route.middlewares)


def lookup(source: str, key: str, find: Any, name: str) -> Any:
    """
    ``find(name)``, with a :class:`LookupError` turned into a :class:`ConfigError`.

    :param key: the dotted key that named the plugin.
    """
    try:
        return find(name)
    except LookupError as e:
        raise ConfigError(source, key, str(e.args[0] if e.args else e)) from None


def make_middlewares(source: str, key: str, names: Iterable[Any]) -> list[IMiddleware]:
    """
    Make the middlewares a config list names (one fresh object per plugin name): plugin
    names, ``module:callable`` strings and Python objects
    (:func:`bungate.http.policy.hooks.resolve_middleware`).

    :param source: the config's source, for errors.
    :param key: the list's dotted key, e.g. ``routes[2].middlewares``.
    :param names: the names, in order.
    :raises ConfigError: for the first unknown name or failed import.
    """
    from bungate.http.policy.hooks import resolve_middleware

    made: list[IMiddleware] = []
    for j, spec in enumerate(names):
        where = f"{key}[{j}]"
        middleware = resolve_middleware(spec, source, where)
        if middleware is None:
            middleware = lookup(source, where, find_middleware, spec)()
        made.append(middleware)
    return made


def run_request_middlewares(
    middlewares: Sequence[IMiddleware], request: Any, upstream: UpstreamRequest
) -> Deferred[bool]:
    """
    Run :meth:`~bungate.interfaces.IMiddleware.process_request` of each middleware in
    order, waiting for each, until one answers the request.

    :param middlewares: in the order to run them.
    :param request: the incoming request.
    :param upstream: the request to be sent upstream.
    :returns: a Deferred firing ``True`` when a middleware answered the request (do
        nothing more), ``False`` to go on. It fails when a middleware failed (answer 500).
        When every middleware is synchronous it has fired already.
    """

    async def run() -> bool:
        for middleware in middlewares:
            if await maybeDeferred(middleware.process_request, request, upstream):
                return True
        return False

    return ensureDeferred(run())


def run_response_middlewares(
    middlewares: Sequence[IMiddleware], request: Any, status: int, headers: Headers
) -> None:
    """
    Run :meth:`~bungate.interfaces.IMiddleware.process_response` of each middleware, in
    the reverse order.

    :param middlewares: in the order their ``process_request`` ran.
    :param request: the incoming request.
    :param status: the upstream's status code.
    :param headers: the response headers to be sent; changed in place.
    """
    for middleware in reversed(middlewares):
        middleware.process_response(request, status, headers)


def middleware_failed(
    request: GatewayRequest, stage: str, reason: Optional[Failure] = None
) -> None:
    """
    Log a middleware's exception (``reason``, else the current one) and answer 500 with
    the request id, never a traceback.

    :param stage: ``request`` or ``response``.
    """
    log.failure(
        "A middleware failed on the {stage} of {method} {uri}",
        reason,
        stage=stage,
        method=request.method.decode("ascii", "replace"),
        uri=request.uri.decode("latin-1"),
        request_id=request.request_id.decode("latin-1"),
    )
    error_response(
        request,
        500,
        {"error": "middleware_error", "request_id": request.request_id.decode("latin-1")},
        reason,
    )
