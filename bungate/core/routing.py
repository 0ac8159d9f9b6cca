"""
Route matching: exact paths, prefixes (``/api/*``) and named segments (``/users/:id``).

Pure logic: no reactor, no twisted.web. A :class:`Router` answers ``match(path)`` with
the route and the captured parameters. Exact paths are a dict look-up; prefixes are tried
longest first; parameterised patterns are tried in the order they were added, after
exact paths and before bare prefixes of the same or shorter length.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Generic, Optional, TypeVar

import attrs

__all__ = ["Match", "Pattern", "PatternError", "Router", "compile_pattern"]

R = TypeVar("R")

_SEGMENT_PARAM = re.compile(r"^:([A-Za-z_][A-Za-z0-9_]*)$")


class PatternError(ValueError):
    """A route pattern is malformed."""


@attrs.frozen
class Pattern:
    """
    A compiled route pattern.

    :ivar text: the pattern as written.
    :ivar kind: ``exact``, ``prefix`` or ``params``.
    :ivar prefix: for ``prefix``, the path the request must equal or start with
        followed by ``/`` (``/api/*`` matches ``/api`` and ``/api/x`` but not ``/apix``).
    :ivar regex: for ``params``, the compiled expression.
    """

    text: str
    kind: str
    prefix: str = ""
    regex: Optional[re.Pattern[str]] = None
    names: tuple[str, ...] = ()


def compile_pattern(text: str) -> Pattern:
    """
    Compile a route pattern.

    ``*`` is allowed only as the whole last segment. ``:name`` captures one segment.

    :raises PatternError: naming what is wrong.
    """
    if not text.startswith("/"):
        raise PatternError(f"must start with '/', got {text!r}")
    if any(c in text for c in "?#") or any(ord(c) < 0x21 for c in text):
        raise PatternError(f"must be a path without query, fragment or spaces, got {text!r}")
    segments = text.split("/")[1:]
    wildcard = segments[-1] == "*"
    if wildcard:
        segments = segments[:-1]
    names: list[str] = []
    parts: list[str] = []
    for seg in segments:
        if "*" in seg:
            raise PatternError(f"'*' may only be the whole last segment, in {text!r}")
        m = _SEGMENT_PARAM.match(seg)
        if m:
            if m.group(1) in names:
                raise PatternError(f"parameter ':{m.group(1)}' appears twice in {text!r}")
            names.append(m.group(1))
            parts.append(f"(?P<{m.group(1)}>[^/]+)")
        elif ":" in seg and seg.startswith(":"):
            raise PatternError(f"bad parameter name {seg!r} in {text!r}")
        else:
            parts.append(re.escape(seg))
    base = "/" + "/".join(segments) if segments else ""
    if names:
        body = "/" + "/".join(parts) if parts else ""
        tail = "(?:/.*)?" if wildcard else ""
        return Pattern(
            text=text,
            kind="params",
            regex=re.compile(f"^{body}{tail}$"),
            names=tuple(names),
            prefix=base,
        )
    if wildcard:
        return Pattern(text=text, kind="prefix", prefix=base)
    return Pattern(text=text, kind="exact", prefix=text)


@attrs.frozen
class Match(Generic[R]):
    """A matched route and the parameters captured from the path."""

    route: R
    pattern: Pattern
    params: dict[str, str]


class Router(Generic[R]):
    """
    Maps request paths to routes.

    Precedence: an exact pattern, then parameterised patterns (in order added), then the
    longest matching prefix. Adding the same pattern twice is an error.
    """

    def __init__(self, routes: Iterable[tuple[str, R]] = ()) -> None:
        self._exact: dict[str, tuple[Pattern, R]] = {}
        self._params: list[tuple[Pattern, R]] = []
        self._prefixes: dict[str, tuple[Pattern, R]] = {}
        self._prefix_lengths: list[int] = []
        self._texts: set[str] = set()
        for text, route in routes:
            self.add(text, route)

    def add(self, text: str, route: R) -> Pattern:
        """
        Add a route under a pattern.

        :raises PatternError: for a malformed or duplicate pattern.
        """
        pattern = compile_pattern(text)
        if text in self._texts:
            raise PatternError(f"pattern {text!r} is already routed")
        self._texts.add(text)
        if pattern.kind == "exact":
            self._exact[pattern.prefix] = (pattern, route)
        elif pattern.kind == "params":
            self._params.append((pattern, route))
        else:
            self._prefixes[pattern.prefix] = (pattern, route)
            self._prefix_lengths = sorted({len(p) for p in self._prefixes}, reverse=True)
        return pattern

    def match(self, path: str) -> Optional[Match[R]]:
        """Find the route for a decoded request path (no query string)."""
        hit = self._exact.get(path)
        if hit is not None:
            return Match(hit[1], hit[0], {})
        for pattern, route in self._params:
            assert pattern.regex is not None
            m = pattern.regex.match(path)
            if m is not None:
                return Match(route, pattern, m.groupdict())
        prefixes = self._prefixes
        for length in self._prefix_lengths:
            # A prefix matches itself, or itself followed by '/'; '' is the catch-all '/*'.
            if length == 0 or (
                len(path) >= length and (len(path) == length or path[length] == "/")
            ):
                hit = prefixes.get(path[:length])
                if hit is not None:
                    return Match(hit[1], hit[0], {})
        return None

    def routes(self) -> list[R]:
        """Every route added, exact ones first, then parameterised, then prefixes."""
        found = [r for _, r in self._exact.values()]
        found += [r for _, r in self._params]
        found += [r for _, r in self._prefixes.values()]
        return found

    def __len__(self) -> int:
        return len(self._texts)
