"""
Where a request carries its credentials: :func:`extract_token` finds the token (or API
key) in a header, a query parameter or a cookie.
"""

from __future__ import annotations

import re
from typing import List, Mapping, Optional, Sequence

from bungate.core.auth.errors import AuthError

__all__ = ["extract_token"]

_B64TOKEN = re.compile(rb"[A-Za-z0-9\-._~+/]+=*\Z")


def _single(values: Optional[Sequence[bytes]], where: str) -> Optional[bytes]:
    if not values:
        return None
    if len(values) > 1:
        raise AuthError("malformed", detail=f"more than one {where}")
    return values[0]


def extract_token(
    headers: Mapping[bytes, Sequence[bytes]],
    query: Mapping[bytes, Sequence[bytes]],
    cookies: Mapping[bytes, bytes],
    *,
    header: Optional[bytes] = b"authorization",
    query_param: Optional[bytes] = None,
    cookie: Optional[bytes] = None,
) -> Optional[bytes]:
    """
    Find the token (or API key) a request carries.

    From ``Authorization``, the value must be ``Bearer <token>`` (scheme in any case,
    token in RFC 6750 ``b64token`` syntax); another scheme, such as ``Basic``, is not a
    token and is ignored. From any other header, a query parameter or a cookie, the whole
    (stripped) value is the token.

    :param headers: request headers by lower-case name, each with all its values
        (as ``twisted.web.http_headers.Headers`` keeps them).
    :param query: query parameters, each with all its values (``request.args``).
    :param cookies: cookie values by name.
    :param header: the header to read, or ``None`` to read none.
    :param query_param: the query parameter to read, or ``None`` (the default: tokens in
        URLs end up in logs).
    :param cookie: the cookie to read, or ``None``.
    :returns: the token, or ``None`` when no configured place carries one.
    :raises AuthError: ``malformed`` when a place carries it twice (two ``Authorization``
        headers), when it is empty or a broken ``Bearer`` value, or when more than one
        place carries a token (RFC 6750 section 2: one method only).
    """
    found: List[bytes] = []
    if header is not None:
        name = header.lower()
        value = _single(headers.get(name), f"{name.decode('latin-1')} header")
        if value is not None:
            if name == b"authorization":
                scheme, _, credentials = value.strip().partition(b" ")
                if scheme.lower() == b"bearer":
                    credentials = credentials.strip(b" ")
                    if _B64TOKEN.match(credentials) is None:
                        raise AuthError("malformed", detail="broken Bearer credentials")
                    found.append(credentials)
            else:
                found.append(value.strip())
    if query_param is not None:
        value = _single(query.get(query_param), "token query parameter")
        if value is not None:
            found.append(value.strip())
    if cookie is not None:
        value = cookies.get(cookie)
        if value is not None:
            found.append(value.strip())
    if len(found) > 1:
        raise AuthError("malformed", detail="the token is given in more than one place")
    if found and not found[0]:
        raise AuthError("malformed", detail="empty token")
    return found[0] if found else None
