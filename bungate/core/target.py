"""
The request target, normalized once before routing.

:func:`normalize_target` turns the target of the request line into a :class:`Target`
whose ``path`` is what the router matches, what the middlewares see, what is logged and
what is sent upstream (``Target.uri``). One normalization for all of them is the point:
the path the gateway checked is the path the upstream serves, even when the upstream
decodes percent-encodings, merges slashes or resolves dot segments itself.

The rules, in the order they are checked:

- a target longer than ``max_length`` bytes is refused with 414;
- ``CONNECT`` is refused with 405 (the gateway is not a tunnel);
- a ``#`` (a fragment is never sent by a client) and any byte below ``0x21`` or equal
  to ``0x7f`` are refused with 400;
- the forms of RFC 9112 §3.2: origin-form ``/path?query``, absolute-form
  ``http[s]://authority/path?query`` (no userinfo; the authority is returned so the
  caller uses it as the Host, RFC 9112 §3.2.2), asterisk-form ``*`` for ``OPTIONS``
  only; everything else (authority-form, other schemes, relative paths) is refused;
- the path is normalized by :func:`normalize_path`;
- the query is kept as sent, except that raw bytes which may not appear in a URI are
  percent-encoded so the result is plain ASCII.

Pure logic: standard library and attrs only.
"""

from __future__ import annotations

import ipaddress
from typing import Optional

import attrs

__all__ = ["Target", "TargetError", "normalize_path", "normalize_target", "parse_host"]

_ALPHA = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_DIGIT = b"0123456789"
_UNRESERVED = _ALPHA + _DIGIT + b"-._~"
# RFC 3986 sub-delims, without ";" which has its own rule (path parameters)
_SUB_DELIMS = b"!$&'()*+,="
# Bytes a path segment may hold raw and that need no work.
_SEGMENT_RAW = _UNRESERVED + _SUB_DELIMS + b":@"
# The fast path: a target made only of these, starting with "/", with no "//" and no
# "/." (so no dot segment and no empty segment), is already normalized.
_FAST_SAFE = _SEGMENT_RAW + b"/?"
# Raw bytes the query may hold as they are (RFC 3986 query characters, "%" and also
# "[" and "]", which clients send unencoded in query strings, e.g. ``a[]=1``).
_QUERY_RAW = _SEGMENT_RAW + b";/?%[]"
_CONTROL = bytes(range(0x21)) + b"\x7f"
_HEX_DIGITS = b"0123456789ABCDEFabcdef"
_HEX_VALUE = {c: int(bytes([c]), 16) for c in _HEX_DIGITS}
_REG_NAME = _UNRESERVED + _SUB_DELIMS + b";"
_IPV6_CHARS = _HEX_DIGITS + b":."

_ORIGIN = "origin"
_ABSOLUTE = "absolute"
_ASTERISK = "asterisk"

_REFUSE = "refuse"
_KEEP = "keep"
_MODES = (_REFUSE, _KEEP)


class TargetError(Exception):
    """
    A request target (or a Host) the gateway refuses.

    :param status: the HTTP status to answer with: 400, 405 or 414.
    :param reason: a short machine-readable reason, e.g. ``"encoded_slash"``.
    :param message: a sentence for a human.
    """

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(status, reason, message)
        self.status = status
        self.reason = reason
        self.message = message

    def __str__(self) -> str:
        return f"{self.status} {self.reason}: {self.message}"


@attrs.frozen
class Target:
    """
    A normalized request target.

    :ivar form: ``"origin"``, ``"absolute"`` or ``"asterisk"``.
    :ivar path: the normalized path: ASCII, starts with ``/`` (``b"*"`` for the
        asterisk-form).
    :ivar query: the query without its ``?``; ``None`` when the target had no ``?``
        (``/a?`` and ``/a`` are different targets).
    :ivar authority: the ``host[:port]`` of an absolute-form target, else ``None``.
    """

    form: str
    path: bytes
    query: Optional[bytes] = None
    authority: Optional[bytes] = None

    @property
    def uri(self) -> bytes:
        """
        The target for the upstream request line: the path, then ``?query`` if any.

        :returns: origin-form bytes (``b"*"`` for the asterisk-form).
        """
        if self.query is None:
            return self.path
        return self.path + b"?" + self.query


def _check_mode(name: str, value: str) -> bool:
    # True for "keep", False for "refuse".
    if value == _KEEP:
        return True
    if value == _REFUSE:
        return False
    raise ValueError(f"{name} must be 'refuse' or 'keep', got {value!r}")


def normalize_target(
    method: bytes,
    target: bytes,
    *,
    merge_slashes: bool = True,
    encoded_slashes: str = "refuse",
    path_params: str = "refuse",
    max_length: int = 8192,
) -> Target:
    """
    Check and normalize the request target of one request.

    :param method: the request method, as sent (methods are case-sensitive).
    :param target: the request target of the request line, as sent.
    :param merge_slashes: merge runs of ``/`` in the path into one.
    :param encoded_slashes: ``"refuse"`` a path holding ``%2F``, ``%5C`` or a raw
        ``\\``, or ``"keep"`` them encoded inside their segment.
    :param path_params: ``"refuse"`` a path holding a raw ``;``, or ``"keep"`` it.
    :param max_length: the longest target accepted, in bytes.
    :returns: the normalized target.
    :raises TargetError: 414 when too long, 405 for ``CONNECT``, 400 otherwise.
    :raises ValueError: when ``encoded_slashes`` or ``path_params`` is not a known mode.
    """
    if len(target) > max_length:
        raise TargetError(414, "uri_too_long", f"the request target is over {max_length} bytes")
    if method == b"CONNECT":
        raise TargetError(405, "connect", "CONNECT is not supported")
    if (
        target[:1] == b"/"
        and not target.translate(None, _FAST_SAFE)
        and b"//" not in target
        and b"/." not in target
    ):
        # Fast path: every segment is plain pchar, no dot or empty segment, so the full
        # algorithm would return the path unchanged whatever the options.
        if encoded_slashes not in _MODES or path_params not in _MODES:
            _check_mode("encoded_slashes", encoded_slashes)
            _check_mode("path_params", path_params)
        q = target.find(b"?")
        if q < 0:
            return Target(_ORIGIN, target)
        return Target(_ORIGIN, target[:q], target[q + 1 :])
    return _normalize_slow(method, target, merge_slashes, encoded_slashes, path_params)


def _normalize_slow(
    method: bytes, target: bytes, merge_slashes: bool, encoded_slashes: str, path_params: str
) -> Target:
    # The full algorithm; normalize_target's fast path must agree with it.
    keep_slashes = _check_mode("encoded_slashes", encoded_slashes)
    keep_params = _check_mode("path_params", path_params)
    if not target:
        raise TargetError(400, "bad_request_target", "the request target is empty")
    if b"#" in target:
        raise TargetError(400, "fragment", "the request target holds a fragment ('#')")
    if len(target.translate(None, _CONTROL)) != len(target):
        raise TargetError(
            400, "control_character", "the request target holds a space or a control character"
        )
    form = _ORIGIN
    authority: Optional[bytes] = None
    if target[:1] != b"/":
        if target == b"*":
            if method != b"OPTIONS":
                raise TargetError(
                    400, "asterisk_form_not_options", "the target '*' is only for OPTIONS"
                )
            return Target(_ASTERISK, b"*")
        head = target[:8].lower()
        if head.startswith(b"http://"):
            rest = target[7:]
        elif head.startswith(b"https://"):
            rest = target[8:]
        else:
            raise TargetError(
                400, "bad_request_target", "the request target is not a path or an http(s) URL"
            )
        end = len(rest)
        for sep in (b"/", b"?"):
            i = rest.find(sep)
            if 0 <= i < end:
                end = i
        authority = rest[:end]
        if b"@" in authority:
            raise TargetError(
                400, "absolute_form_userinfo", "the request target holds user information"
            )
        parse_host(authority)
        target = rest[end:]
        if target[:1] != b"/":
            target = b"/" + target
        form = _ABSOLUTE
    q = target.find(b"?")
    if q < 0:
        path, query = target, None
    else:
        path, query = target[:q], _encode_query(target[q + 1 :])
    path = _normalize_path(path, merge_slashes, keep_slashes, keep_params)
    return Target(form, path, query, authority)


def _encode_query(query: bytes) -> bytes:
    # Raw "#" and control bytes were refused before; only encoding is left to do.
    if not query.translate(None, _QUERY_RAW):
        return query
    return b"".join(bytes([c]) if c in _QUERY_RAW else b"%%%02X" % c for c in query)


def normalize_path(
    path: bytes,
    *,
    merge_slashes: bool = True,
    encoded_slashes: str = "refuse",
    path_params: str = "refuse",
) -> bytes:
    """
    Normalize the path part of a target (RFC 3986 §6.2.2 and §5.2.4).

    - Percent-encoded unreserved characters (letters, digits, ``-._~``) are decoded and
      every other percent-encoding is written with uppercase hex digits. ``%00`` to ``%1F``
      and ``%7F`` are refused, so is a ``%`` not followed by two hex digits.
    - Raw bytes that may not appear in a path (``"<>^`{|}[]``, bytes from ``0x80``) are
      percent-encoded, so the result is plain ASCII. Spaces, control bytes, ``#`` and
      ``?`` are refused.
    - ``%2F``, ``%5C`` and a raw ``\\`` are refused by default: an upstream that decodes
      them, or takes ``\\`` for a separator, would see segments the router did not see.
      With ``encoded_slashes="keep"`` they are written ``%2F`` and ``%5C`` and stay inside
      their segment.
    - A raw ``;`` is refused by default: servlet containers strip ``;param`` from each
      segment before matching, so ``/admin;x/users`` is served as ``/admin/users``.
      ``%3B`` stays as it is: those containers cut parameters at the raw ``;`` only, and
      a decoding upstream finds the decoded ``;`` inside the same segment the router
      matched, so it can neither hide nor reveal a segment.
    - Dot segments are resolved after the decoding, so ``%2e%2e`` counts as ``..``; a
      ``..`` above the root is refused (as nginx does). Runs of ``/`` are merged into
      one when ``merge_slashes`` is true.

    Route patterns can be checked for canonical form with ``normalize_path(p) == p``.

    :param path: the path, starting with ``/``, without query.
    :param merge_slashes: merge runs of ``/`` into one.
    :param encoded_slashes: ``"refuse"`` or ``"keep"`` (see above).
    :param path_params: ``"refuse"`` or ``"keep"`` (see above).
    :returns: the normalized path: ASCII, starting with ``/``.
    :raises TargetError: with status 400 and a reason.
    :raises ValueError: when ``encoded_slashes`` or ``path_params`` is not a known mode.
    """
    keep_slashes = _check_mode("encoded_slashes", encoded_slashes)
    keep_params = _check_mode("path_params", path_params)
    return _normalize_path(path, merge_slashes, keep_slashes, keep_params)


def _normalize_path(
    path: bytes, merge_slashes: bool, keep_slashes: bool, keep_params: bool
) -> bytes:
    if path[:1] != b"/":
        raise TargetError(400, "bad_request_target", "the path does not start with '/'")
    segments = path[1:].split(b"/")
    last = len(segments) - 1
    kept: list[bytes] = []
    for i, raw in enumerate(segments):
        if raw.translate(None, _SEGMENT_RAW):
            segment = _canonical_segment(raw, keep_slashes, keep_params)
        else:
            segment = raw
        if segment == b"." or segment == b"..":
            if segment == b"..":
                if not kept:
                    raise TargetError(
                        400, "dot_segment_above_root", "the path climbs above the root ('..')"
                    )
                kept.pop()
            if i == last:
                # "/a/." and "/a/b/.." end with a slash (RFC 3986 §5.2.4)
                kept.append(b"")
        elif segment or not merge_slashes or i == last:
            kept.append(segment)
    return b"/" + b"/".join(kept)


def _canonical_segment(raw: bytes, keep_slashes: bool, keep_params: bool) -> bytes:
    # One segment (no raw "/"), byte by byte.
    out = bytearray()
    n = len(raw)
    i = 0
    while i < n:
        c = raw[i]
        if c == 0x25:  # "%"
            hi = _HEX_VALUE.get(raw[i + 1]) if i + 1 < n else None
            lo = _HEX_VALUE.get(raw[i + 2]) if i + 2 < n else None
            if hi is None or lo is None:
                raise TargetError(
                    400, "bad_percent_encoding", "a '%' is not followed by two hex digits"
                )
            v = hi * 16 + lo
            if v < 0x20 or v == 0x7F:
                raise TargetError(
                    400, "control_character", "the path holds an encoded control character"
                )
            if v in _UNRESERVED:
                out.append(v)
            elif v == 0x2F or v == 0x5C:  # "/" and "\"
                if not keep_slashes:
                    raise TargetError(400, "encoded_slash", "the path holds %2F or %5C")
                out += b"%%%02X" % v
            else:
                out += b"%%%02X" % v
            i += 3
            continue
        if c in _SEGMENT_RAW:
            out.append(c)
        elif c == 0x3B:  # ";"
            if not keep_params:
                raise TargetError(400, "path_params", "the path holds a ';' (path parameters)")
            out.append(c)
        elif c == 0x5C:  # "\"
            if not keep_slashes:
                raise TargetError(400, "encoded_slash", "the path holds a backslash")
            out += b"%5C"
        elif c < 0x21 or c == 0x7F:
            raise TargetError(
                400, "control_character", "the path holds a space or a control character"
            )
        elif c == 0x23:  # "#"
            raise TargetError(400, "fragment", "the path holds a fragment ('#')")
        elif c == 0x3F:  # "?"
            raise TargetError(400, "bad_request_target", "the path holds a '?'")
        else:
            out += b"%%%02X" % c
        i += 1
    return bytes(out)


def parse_host(value: bytes) -> tuple[str, Optional[int]]:
    """
    Check a ``host[:port]`` (a Host header, or the authority of an absolute-form target).

    The host is a registered name (letters, digits, ``-._~`` and the RFC 3986 sub-delims
    ``!$&'()*+,;=``; no percent-encoding), an IPv4 address, or an IPv6 address in
    brackets (no zone identifier, no IPvFuture). A name made only of digits and dots must
    be a valid IPv4 address. The port is decimal digits up to 65535; an empty port
    (``host:``) is allowed, as RFC 3986 does, and reads as no port.

    :param value: the bytes as sent.
    :returns: the lowercased host (an IPv6 address keeps its brackets) and the port, or
        ``None`` when no port was given.
    :raises TargetError: ``400 bad_host`` when the value is not a valid host.
    """
    if value[:1] == b"[":
        end = value.find(b"]")
        literal = value[1:end]
        if end < 0 or not literal or literal.translate(None, _IPV6_CHARS):
            raise _bad_host(value)
        if not _valid_ipv6(literal.decode("ascii")):
            raise _bad_host(value)
        host = value[: end + 1]
        rest = value[end + 1 :]
    else:
        colon = value.find(b":")
        host, rest = (value, b"") if colon < 0 else (value[:colon], value[colon:])
        if not host or host.translate(None, _REG_NAME):
            raise _bad_host(value)
        if not host.translate(None, _DIGIT + b".") and not _valid_ipv4(host.decode("ascii")):
            raise _bad_host(value)
    port: Optional[int] = None
    if rest:
        digits = rest[1:]
        if rest[:1] != b":" or (digits and not digits.isdigit()):
            raise _bad_host(value)
        if digits:
            significant = digits.lstrip(b"0")
            port = int(significant) if significant else 0
            if len(significant) > 5 or port > 65535:
                raise _bad_host(value)
    return host.decode("ascii").lower(), port


def _bad_host(value: bytes) -> TargetError:
    return TargetError(400, "bad_host", f"not a valid host[:port]: {value[:100]!r}")


def _valid_ipv4(text: str) -> bool:
    # Four decimal octets; leading zeros are refused (some parsers read them as octal).
    parts = text.split(".")
    if len(parts) != 4:
        return False
    for part in parts:
        if not part or len(part) > 3 or (len(part) > 1 and part[0] == "0"):
            return False
        if int(part) > 255:
            return False
    return True


def _valid_ipv6(text: str) -> bool:
    # The caller allows only hex digits, ":" and ".", so no zone identifier gets here.
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True
