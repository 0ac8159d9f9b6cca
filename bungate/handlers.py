"""
Built-in handlers that a config can name by import string.

``bungate.handlers:echo`` answers with what it was sent, so a newcomer can curl the
default gateway and see the proxy's view of the request.
"""

from __future__ import annotations

from typing import Any

from twisted.web.server import Request

__all__ = ["echo"]


def echo(request: Request) -> dict[str, Any]:
    """Describe the request: method, path, query, headers and the body's length."""
    headers: dict[str, list[str]] = {}
    for name, values in request.requestHeaders.getAllRawHeaders():
        headers[name.decode("latin-1").lower()] = [v.decode("latin-1") for v in values]
    body = request.content.read() if request.content is not None else b""
    return {
        "method": request.method.decode("ascii", "replace"),
        "uri": request.uri.decode("latin-1"),
        "headers": headers,
        "body_bytes": len(body),
        "body": body.decode("utf-8", "replace") if len(body) <= 4096 else None,
    }
