"""
The kinds of keys a schema section is made of (internal): each field carries a
:class:`Spec` in its metadata saying how :mod:`bungate.config.sections` reads it.
"""

from __future__ import annotations

from typing import Any, Optional

import attrs

__all__ = [
    "MAX_SECONDS",
    "SPEC",
    "Spec",
    "choice",
    "custom",
    "flag",
    "path",
    "port",
    "seconds",
    "section",
    "strings",
    "text",
    "whole",
]

SPEC = "bungate"
"""The metadata key under which a field's :class:`Spec` is stored."""


@attrs.frozen
class Spec:
    """
    How the parser reads one field.

    :ivar kind: ``bool``, ``int``, ``seconds`` (a duration: a number of seconds or a
        string with a unit), ``str``, ``choice``, ``path``, ``port``, ``strings``,
        ``section`` (a nested section class) or ``custom`` (read by a function of its own
        in :mod:`bungate.config.parse`).
    :ivar minimum: the lowest value allowed (numbers).
    :ivar maximum: the highest value allowed (numbers), or ``None``.
    :ivar choices: the allowed values (``choice``).
    """

    kind: str
    minimum: Any = None
    maximum: Any = None
    choices: tuple[str, ...] = ()


def _field(spec: Spec, default: Any = attrs.NOTHING, factory: Any = None) -> Any:
    if factory is not None:
        return attrs.field(factory=factory, metadata={SPEC: spec})
    return attrs.field(default=default, metadata={SPEC: spec})


def flag(default: bool) -> Any:
    """A ``true``/``false`` key."""
    return _field(Spec("bool"), default)


def whole(
    default: Any, minimum: int = 0, maximum: Optional[int] = None, factory: Any = None
) -> Any:
    """A whole-number key."""
    return _field(Spec("int", minimum, maximum), default, factory)


#: The longest timeout or delay that makes sense: an hour. A bare number above a
#: duration's maximum that fits once divided by 1000 is refused as likely milliseconds.
MAX_SECONDS = 3600.0


def seconds(default: float, minimum: float = 0.0, maximum: Optional[float] = MAX_SECONDS) -> Any:
    """
    A duration in seconds, at most ``maximum`` (``None``: no limit). Give a long-lived
    duration a larger maximum rather than none, so that milliseconds are still caught.
    """
    return _field(Spec("seconds", minimum, maximum), default)


def text(default: Optional[str]) -> Any:
    """A non-empty string key."""
    return _field(Spec("str"), default)


def choice(default: str, choices: tuple[str, ...]) -> Any:
    """One of a fixed set of strings."""
    return _field(Spec("choice", choices=choices), default)


def path(default: str) -> Any:
    """A URL path starting with ``/``."""
    return _field(Spec("path"), default)


def port(default: int) -> Any:
    """A TCP port, 0..65535 (0 picks a free one)."""
    return _field(Spec("port", 0, 65535), default)


def strings(default: Optional[tuple[str, ...]] = None) -> Any:
    """A list of non-empty strings."""
    return _field(Spec("strings"), default)


def section(cls: type) -> Any:
    """A nested section, read with the same rules."""
    return _field(Spec("section"), factory=cls)


def custom(default: Any = None, factory: Any = None) -> Any:
    """A key with a reader of its own in :mod:`bungate.config.parse`."""
    return _field(Spec("custom"), default, factory)
