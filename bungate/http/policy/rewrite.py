"""
What a route changes on the way: the path sent upstream (``strip_prefix``,
``path_rewrite``), the request and response headers (``request_headers``,
``response_headers``), and the security headers every answer gets.

Rewrites run on the normalized path the route was matched on (and its auth checked on),
and their result is normalized again: a rewrite can change where a request goes only as
the config says, never reopen a walk past the route table (``/x/../admin`` made by a
regex is resolved before it is sent, and a result that is no path is a 500, not a request
line an upstream could read two ways).
"""

from __future__ import annotations

import re
from typing import Any, Optional

from twisted.web.http_headers import Headers

from bungate.config import RouteConfig
from bungate.config.policy import HeaderRules, SecurityHeadersConfig
from bungate.core.target import TargetError, normalize_path

__all__ = ["HeaderChanges", "PathRewrite", "SecurityHeaders", "static_prefix"]


def static_prefix(pattern: str) -> str:
    """
    The fixed part of a route pattern before its first wildcard or parameter:
    ``/api/*`` and ``/api/:id`` give ``/api``, ``/`` and ``/*`` give ``""``.
    """
    fixed = []
    for segment in pattern.split("/")[1:]:
        if not segment or segment.startswith((":", "*")) or "*" in segment:
            break
        fixed.append(segment)
    return "/" + "/".join(fixed) if fixed else ""


class PathRewrite:
    """
    ``strip_prefix`` then ``path_rewrite`` of one route, on the path without its query.

    :param route: the validated route.
    :param normalize: the server's path rules (``merge_slashes``, ``encoded_slashes``,
        ``path_params``), applied to the result as to the request.
    """

    def __init__(self, route: RouteConfig, **normalize: Any) -> None:
        self.normalize = normalize
        self.prefix = static_prefix(route.pattern).encode("ascii") if route.strip_prefix else b""
        self.rules = [
            (re.compile(p.encode("utf-8")), r.encode("utf-8")) for p, r in route.path_rewrite
        ]

    def __bool__(self) -> bool:
        return bool(self.prefix or self.rules)

    def apply(self, uri: bytes) -> bytes:
        """
        The upstream path of a normalized ``uri`` (path and query).

        :raises ValueError: when a rewrite made something that is not a path.
        """
        path, mark, query = uri.partition(b"?")
        prefix = self.prefix
        if prefix and (path == prefix or path.startswith(prefix + b"/")):
            path = path[len(prefix) :] or b"/"
        for pattern, replacement in self.rules:
            path = pattern.sub(replacement, path)
        if not path.startswith(b"/"):
            path = b"/" + path
        try:
            path = normalize_path(path, **self.normalize)
        except TargetError as e:
            raise ValueError(f"the rewritten path {path!r} is refused: {e.message}") from None
        return path + mark + query


class HeaderChanges:
    """``remove``, then ``set``, then ``add`` of one :class:`HeaderRules`."""

    def __init__(self, rules: HeaderRules) -> None:
        self.remove = [n.encode("ascii") for n in rules.remove]
        self.set = [(n.encode("ascii"), v.encode("utf-8")) for n, v in rules.set]
        self.add = [(n.encode("ascii"), v.encode("utf-8")) for n, v in rules.add]

    def __bool__(self) -> bool:
        return bool(self.remove or self.set or self.add)

    def apply(self, headers: Headers) -> None:
        """Change ``headers`` in place."""
        for name in self.remove:
            headers.removeHeader(name)
        for name, value in self.set:
            headers.setRawHeaders(name, [value])
        for name, value in self.add:
            headers.addRawHeader(name, value)


class SecurityHeaders:
    """
    The security headers of every answer (each only where the upstream set none):
    ``Strict-Transport-Security`` over TLS only, ``X-Content-Type-Options``,
    ``X-Frame-Options``, ``Referrer-Policy``, ``Content-Security-Policy``.
    """

    def __init__(self, config: SecurityHeadersConfig) -> None:
        pairs = [
            (b"x-content-type-options", config.content_type_options),
            (b"x-frame-options", config.frame_options),
            (b"referrer-policy", config.referrer_policy),
            (b"content-security-policy", config.content_security_policy),
        ]
        self.always = [(n, v.encode("latin-1")) for n, v in pairs if v]
        self.hsts: Optional[bytes] = config.hsts.encode("latin-1") if config.hsts else None

    def apply(self, request: Any, headers: Headers) -> None:
        """Add the headers the answer lacks."""
        for name, value in self.always:
            if not headers.hasHeader(name):
                headers.setRawHeaders(name, [value])
        if self.hsts is not None and request.isSecure():
            if not headers.hasHeader(b"strict-transport-security"):
                headers.setRawHeaders(b"strict-transport-security", [self.hsts])
