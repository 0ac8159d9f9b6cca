"""
Middlewares and hooks given as plain functions: ``module:callable`` strings in YAML, or
callables from Python (``add_route(..., middlewares=[f], hooks={...})``).

A function middleware is called as ``f(request, upstream)``, like
:meth:`~bungate.interfaces.IMiddleware.process_request`: it returns ``None`` to go on
(after changing ``upstream`` in place if it likes), ``True`` once it answered the request
itself, or a Deferred or coroutine of either. An object (or class) with
``process_request`` is taken as an :class:`~bungate.interfaces.IMiddleware` as it is.

Hooks:

- ``before_request(request, upstream)``: as a function middleware, after the route's
  auth and rate limit, before its middlewares;
- ``after_response(request, status, headers)``: before the answer's headers are written
  (any answer: proxied, a handler's, the gateway's own); it may change ``headers``; an
  exception is logged and the answer goes out as it was;
- ``on_error(request, status, failure)``: for a 5xx of the request path (upstream failed
  or timed out, a middleware raised); returning true means it answered the request itself.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, Callable, Optional

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger
from twisted.web.http_headers import Headers
from zope.interface import implementer

from bungate.config import ConfigError
from bungate.http.handlers import resolve_handler
from bungate.interfaces import IMiddleware, UpstreamRequest

__all__ = ["FunctionMiddleware", "Hooks", "resolve_middleware"]

log = Logger(namespace="bungate.proxy")


def _settle(result: Any) -> Any:
    """A coroutine's result as a Deferred; anything else as it is."""
    if inspect.iscoroutine(result):
        return ensureDeferred(result)
    return result


@implementer(IMiddleware)
class FunctionMiddleware:
    """
    A plain function as a request middleware.

    :param function: ``function(request, upstream)``.
    :param name: how logs name it.
    """

    def __init__(self, function: Callable[..., Any], name: str) -> None:
        self.function = function
        self.name = name

    def process_request(self, request: Any, upstream: UpstreamRequest) -> Any:
        """Call the function (see the module docstring for what it returns)."""
        return _settle(self.function(request, upstream))

    def process_response(self, request: Any, status: int, headers: Headers) -> None:
        """A function middleware sees requests only."""


def resolve_middleware(spec: Any, source: str, key: str) -> Optional[IMiddleware]:
    """
    The middleware an import string or a Python object stands for, or ``None`` for a
    plugin name (looked up by :mod:`bungate.http.plugins`).

    :raises ConfigError: naming ``key`` when the import fails or the object is neither
        a callable nor a middleware.
    """
    if isinstance(spec, str):
        if ":" not in spec:
            return None
        try:
            obj: Any = resolve_handler(spec)
        except ValueError as e:
            raise ConfigError(source, key, str(e)) from None
    else:
        obj = spec
    if inspect.isclass(obj) and hasattr(obj, "process_request"):
        obj = obj()
    if hasattr(obj, "process_request"):
        if not hasattr(obj, "process_response"):
            obj = _RequestOnly(obj)
        return obj  # type: ignore[no-any-return]
    if callable(obj):
        return FunctionMiddleware(obj, getattr(obj, "__name__", repr(obj)))
    raise ConfigError(source, key, f"{spec!r} is neither a callable nor a middleware")


@implementer(IMiddleware)
class _RequestOnly:
    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.name = getattr(inner, "name", type(inner).__name__)

    def process_request(self, request: Any, upstream: UpstreamRequest) -> Any:
        return _settle(self.inner.process_request(request, upstream))

    def process_response(self, request: Any, status: int, headers: Headers) -> None:
        pass


class Hooks:
    """
    The hooks of one route (its own, else the top level's, hook by hook).

    :param hooks: ``{hook name: callable or import string}``.
    :raises ConfigError: naming ``key.hook`` when an import fails.
    """

    def __init__(self, hooks: Mapping[str, Any], source: str, key: str) -> None:
        resolved: dict[str, Callable[..., Any]] = {}
        for name, spec in hooks.items():
            try:
                resolved[name] = resolve_handler(spec)
            except ValueError as e:
                raise ConfigError(source, f"{key}.{name}", str(e)) from None
        self.before_request = resolved.get("before_request")
        self.after_response = resolved.get("after_response")
        self.on_error = resolved.get("on_error")

    def __bool__(self) -> bool:
        return bool(self.before_request or self.after_response or self.on_error)

    def before(self, request: Any, upstream: UpstreamRequest) -> Any:
        """Run ``before_request`` (a Deferred, a coroutine's Deferred, or its result)."""
        assert self.before_request is not None
        return _settle(self.before_request(request, upstream))

    def after(self, request: Any, headers: Headers) -> None:
        """Run ``after_response``; its exception is logged, never the client's problem."""
        if self.after_response is None:
            return
        try:
            result = self.after_response(request, request.code, headers)
            if isinstance(result, Deferred) or inspect.iscoroutine(result):
                raise TypeError("after_response must be synchronous (it runs as headers go out)")
        except Exception:
            log.failure(
                "The after_response hook failed on {uri}", uri=request.uri.decode("latin-1")
            )

    def error(self, request: Any, status: int, failure: Any) -> bool:
        """Run ``on_error``; true when it answered the request."""
        assert self.on_error is not None
        return bool(self.on_error(request, status, failure))
