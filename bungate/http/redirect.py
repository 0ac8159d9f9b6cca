"""
The plain-HTTP listener of a TLS gateway: every request gets a permanent redirect to HTTPS.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Optional

from twisted.web.resource import Resource
from twisted.web.server import Request

__all__ = ["RedirectResource"]


_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_HOSTNAME = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*$")
_IPV6 = re.compile(r"^\[[0-9a-f:.]+\]$")


def _split_authority(authority: str) -> Optional[str]:
    """
    The host part of ``host[:port]``, lowercased, or None when it is not a plain host.
    """
    authority = authority.strip().lower()
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            return None
        host, port = authority[: end + 1], authority[end + 1 :]
        valid = bool(_IPV6.match(host))
    else:
        host, colon, digits = authority.partition(":")
        port = colon + digits
        host = host.rstrip(".")
        valid = bool(_HOSTNAME.match(host))
    if not valid or (port and not (port[0] == ":" and (port[1:].isdigit() or not port[1:]))):
        return None
    return host


def _set_header(request: Request, name: bytes, value: bytes) -> None:
    request.setHeader(name, value)  # type: ignore[no-untyped-call]


class RedirectResource(Resource):
    """
    Answers every request on the plain-HTTP listener with a permanent redirect to HTTPS.

    The redirect is a ``308``, so clients repeat the same method and body. The path and
    query are kept byte for byte. Only host names in ``allowed_hosts`` are redirected
    (compared without case and without any ``:port``); any other ``Host`` gets a ``400``
    with a small JSON body, so the listener never sends a client somewhere else. An empty
    ``allowed_hosts`` redirects any well-formed host name, which lets a forged ``Host``
    header choose the redirect target: set the list in production.

    :param https_port: the port HTTPS listens on; left out of the URL when 443.
    :param allowed_hosts: the host names this gateway serves.
    """

    isLeaf = True

    def __init__(self, https_port: int, allowed_hosts: Sequence[str]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.https_port = https_port
        self.allowed_hosts = frozenset(
            h for h in (_split_authority(a) for a in allowed_hosts) if h is not None
        )

    def _refuse(self, request: Request, problem: str) -> bytes:
        request.setResponseCode(400, b"Bad Request")
        _set_header(request, b"content-type", b"application/json")
        _set_header(request, b"cache-control", b"no-store")
        return json.dumps({"error": "bad request", "message": problem}).encode() + b"\n"

    def render(self, request: Request) -> bytes:
        """
        Answer one request with 308 or 400.

        :param request: the plain-HTTP request.
        """
        target: bytes = request.uri
        authority: Optional[bytes] = request.getHeader(b"host")
        lowered = target[:8].lower()
        if lowered.startswith(b"http://") or lowered.startswith(b"https://"):
            # absolute-form: the authority in the target wins over the Host header
            rest = target.split(b"://", 1)[1]
            cut = min((i for i in (rest.find(b"/"), rest.find(b"?")) if i >= 0), default=len(rest))
            authority, target = rest[:cut], rest[cut:]
            if not target.startswith(b"/"):
                target = b"/" + target
        if not target.startswith(b"/"):
            return self._refuse(request, "the request target must be a path")
        if not authority:
            return self._refuse(request, "a Host header is required")
        host = _split_authority(authority.decode("latin-1"))
        if host is None:
            return self._refuse(request, "the Host header is not a valid host name")
        if self.allowed_hosts and host not in self.allowed_hosts:
            return self._refuse(request, "this host is not served here")
        port = b"" if self.https_port == 443 else b":%d" % self.https_port
        location = b"https://" + host.encode("ascii") + port + target
        request.setResponseCode(308, b"Permanent Redirect")
        _set_header(request, b"location", location)
        _set_header(request, b"content-type", b"text/plain; charset=utf-8")
        return b"Moved to " + location + b"\n"
