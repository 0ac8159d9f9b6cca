"""
Cross-origin resource sharing (the Fetch standard's CORS protocol) for a route.

A preflight (``OPTIONS`` with ``Origin`` and ``Access-Control-Request-Method``) is
answered by the gateway and never reaches the upstream, before any credentials are
asked for: browsers send none with a preflight. An origin, a method or a request header
the config does not allow gets a 403 that says which, so the operator sees the reason in
the access log (browsers block the call either way). Every other answer to an allowed
origin carries ``Access-Control-Allow-Origin`` (the origin itself, or ``*`` when any
origin is allowed without credentials) and, whenever the answer depends on the origin,
``Vary: Origin``, so caches never hand one origin's answer to another.
"""

from __future__ import annotations

import re
from typing import Any, Optional

from twisted.web.http_headers import Headers

from bungate.config.policy import CorsConfig

__all__ = ["Cors"]


class Cors:
    """
    The CORS policy of one route.

    :param config: the validated ``cors`` section.
    """

    def __init__(self, config: CorsConfig) -> None:
        self.config = config
        self.any_origin = "*" in config.origins
        self._exact = {o.lower().encode("ascii") for o in config.origins if o[:1] not in "*~"}
        self._patterns = [re.compile(o[1:]) for o in config.origins if o.startswith("~")]
        self._methods = {m.upper().encode("ascii") for m in config.methods}
        self._allow_methods = ", ".join(m.upper() for m in config.methods).encode("ascii")
        self._headers = {h.lower().encode("ascii") for h in config.headers}
        self._allow_headers = ", ".join(config.headers).encode("ascii")
        self._expose = ", ".join(config.expose_headers).encode("ascii")
        self._max_age = b"%d" % int(config.max_age)

    def allowed(self, origin: bytes) -> bool:
        """Whether ``origin`` (the request's ``Origin``) may read the answers."""
        if self.any_origin:
            return True
        if origin.lower() in self._exact:
            return True
        text = origin.decode("latin-1")
        return any(p.fullmatch(text) for p in self._patterns)

    def preflight(self, request: Any) -> Optional[tuple[int, str]]:
        """
        Answer a preflight request (204 with the allowances).

        :returns: ``None`` when ``request`` is no preflight (go on); else ``(status,
            reason)`` after answering: ``(204, "")``, or ``(403, reason)`` when the
            origin, method or a header is not allowed (then the caller answers).
        """
        if request.method != b"OPTIONS":
            return None
        headers = request.requestHeaders
        origin = _single(headers, b"origin")
        method = _single(headers, b"access-control-request-method")
        if origin is None or method is None:
            return None
        request.cors_preflight = True  # answered here: no CORS headers on the way out
        if not self.allowed(origin):
            return 403, "cors_origin_not_allowed"
        if method.upper() not in self._methods:
            return 403, "cors_method_not_allowed"
        requested = [
            h.strip().lower()
            for v in headers.getRawHeaders(b"access-control-request-headers") or ()
            for h in v.split(b",")
            if h.strip()
        ]
        if self._headers and any(h not in self._headers for h in requested):
            return 403, "cors_header_not_allowed"
        out = request.responseHeaders
        self._origin_headers(origin, out)
        out.setRawHeaders(b"access-control-allow-methods", [self._allow_methods])
        if self._headers:
            out.setRawHeaders(b"access-control-allow-headers", [self._allow_headers])
        elif requested:  # none configured: the simple ones and what was asked for
            out.setRawHeaders(b"access-control-allow-headers", [b", ".join(requested)])
        out.setRawHeaders(b"access-control-max-age", [self._max_age])
        _vary(out, b"Access-Control-Request-Method", b"Access-Control-Request-Headers")
        request.setResponseCode(204)
        out.setRawHeaders(b"content-length", [b"0"])
        request.finish()
        return 204, ""

    def response_headers(self, request: Any, out: Headers) -> None:
        """Add the CORS headers of an ordinary answer (none for a disallowed origin)."""
        origin = _single(request.requestHeaders, b"origin")
        if origin is None:
            if not (self.any_origin and not self.config.credentials):
                _vary(out)  # the answer would differ with an Origin
            return
        if not self.allowed(origin):
            _vary(out)
            return
        self._origin_headers(origin, out)
        if self._expose:
            out.setRawHeaders(b"access-control-expose-headers", [self._expose])

    def _origin_headers(self, origin: bytes, out: Headers) -> None:
        if self.any_origin and not self.config.credentials:
            out.setRawHeaders(b"access-control-allow-origin", [b"*"])
        else:
            out.setRawHeaders(b"access-control-allow-origin", [origin])
            _vary(out)
        if self.config.credentials:
            out.setRawHeaders(b"access-control-allow-credentials", [b"true"])


def _single(headers: Headers, name: bytes) -> Optional[bytes]:
    values = headers.getRawHeaders(name)
    if not values or len(values) != 1:
        return None
    return values[0].strip()


def _vary(out: Headers, *more: bytes) -> None:
    """Add ``Origin`` (and ``more``) to ``Vary``, keeping what is there."""
    present = [v.strip() for line in out.getRawHeaders(b"vary") or () for v in line.split(b",")]
    lower = {v.lower() for v in present}
    for name in (b"Origin", *more):
        if name.lower() not in lower and b"*" not in lower:
            present.append(name)
            lower.add(name.lower())
    out.setRawHeaders(b"vary", [b", ".join(p for p in present if p)])
