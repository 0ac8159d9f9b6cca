"""
Route handlers: Python callables that answer a request themselves.

A handler gets the :class:`~twisted.web.server.Request` and returns what to send: a
:class:`Response`, a ``dict`` or ``list`` (JSON), ``str`` (UTF-8 text), ``bytes``, or
``None`` when it wrote and will finish the response itself; or a Deferred, a coroutine or
another awaitable that gives one of these.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Mapping
from importlib import import_module
from typing import Any, Callable

import attrs
from twisted.internet import defer
from twisted.python.failure import Failure

from bungate.core.http1 import NO_BODY_STATUS
from bungate.http.site import GatewayRequest

__all__ = ["Response", "call_handler", "resolve_handler"]


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
    except ModuleNotFoundError as e:
        hint = ""
        if e.name is not None and module_name.startswith(e.name):
            hint = (
                f" (workers import it from {os.getcwd()} and PYTHONPATH; "
                "is its directory on PYTHONPATH?)"
            )
        raise ValueError(f"cannot import module {module_name!r}: {e}{hint}") from None
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


def call_handler(request: GatewayRequest, handler: Callable[..., Any]) -> None:
    """Call ``handler`` for ``request`` and write what it returns (at once or later)."""
    try:
        result = handler(request)
        if inspect.iscoroutine(result):
            result = defer.ensureDeferred(result)
        elif inspect.isawaitable(result) and not isinstance(result, defer.Deferred):
            result = defer.ensureDeferred(_awaited(result))
    except Exception:
        request.processingFailed(Failure())
        return
    if isinstance(result, defer.Deferred):
        result.addCallbacks(lambda value: _write_result(request, value), request.processingFailed)
    else:
        _write_result(request, result)


def _write_result(request: GatewayRequest, value: Any) -> None:
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
    if status not in NO_BODY_STATUS:
        request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % len(body)])
        request.write(body)
    request.finish()


async def _awaited(awaitable: Any) -> Any:
    """A coroutine for any awaitable a handler returned (a Future-like object)."""
    return await awaitable
