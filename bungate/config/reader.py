"""
Reading typed values out of one mapping of a configuration document, every error naming
the source and the dotted key.

Durations are seconds: a bare number, or a string with a unit (``"500ms"``, ``"30s"``,
``"2m"``, ``"1h"``). A bare number above a duration's maximum that would fit as
milliseconds is refused with a hint, since the spec bungate ports writes milliseconds.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any, Optional

from bungate.config.errors import ConfigError, combine

__all__ = ["Reader", "closest_key", "format_number", "suggest_key"]

_KINDS: dict[type, str] = {dict: "a mapping", list: "a list", str: "a string"}

#: seconds per unit of a duration string; ``ms`` is divided by 1000 instead.
_UNITS: dict[str, float] = {"s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"([+-]?)(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)")
_FORMS = 'a number of seconds or a duration such as "30s", "500ms", "2m" or "1h"'
_CAMEL_HUMP = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")


def _kind(value: object) -> str:
    return _KINDS.get(type(value), type(value).__name__)


def format_number(value: float) -> str:
    """``value`` as an operator would write it: ``30`` rather than ``30.0``."""
    if math.isfinite(value) and value == int(value):
        return str(int(value))
    return repr(value)


def closest_key(name: str, known: Iterable[str]) -> Optional[str]:
    """
    The known key that an unknown key ``name`` is probably a misspelling of, or ``None``.

    A camelCase spelling (``shutdownTimeout``) is first read as snake_case
    (``shutdown_timeout``); then the closest known key by
    :func:`difflib.get_close_matches` is taken, if any is close enough.
    """
    candidates = sorted(known)
    snake = _CAMEL_HUMP.sub("_", name).lower()
    for spelling in (snake, name) if snake != name else (name,):
        close = difflib.get_close_matches(spelling, candidates, n=1)
        if close:
            return close[0]
    return None


def suggest_key(name: str, known: Iterable[str]) -> Optional[str]:
    """
    The hint for an unknown key ``name`` among the ``known`` keys of its mapping (``did
    you mean 'target'?``), or ``None`` when no known key is close. A spelling with
    capitals is told that keys are snake_case.
    """
    key = closest_key(name, known)
    if key is None:
        return None
    if name != name.lower():
        return f"did you mean {key!r}? keys are snake_case"
    return f"did you mean {key!r}?"


class Reader:
    """
    Reads typed values out of one mapping, naming the key on every error.

    :param source: where the document came from, for errors.
    :param prefix: the dotted key of this mapping (``""`` at the top).
    :param data: the mapping (``None`` reads as empty).
    :raises ConfigError: when ``data`` is not a mapping with string keys.
    """

    def __init__(self, source: str, prefix: str, data: object) -> None:
        self.source = source
        self.prefix = prefix
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(source, prefix, f"must be a mapping, got {_kind(data)}")
        for key in data:
            if not isinstance(key, str):
                raise ConfigError(source, prefix, f"keys must be strings, got {key!r}")
        self.data: Mapping[str, Any] = data
        self.seen: set[str] = set()

    def key(self, name: str) -> str:
        """The dotted key of ``name`` in this mapping."""
        if not name:
            return self.prefix
        return f"{self.prefix}.{name}" if self.prefix else name

    def error(self, name: str, problem: str) -> ConfigError:
        """A :class:`ConfigError` about key ``name``."""
        return ConfigError(self.source, self.key(name), problem)

    def has(self, name: str) -> bool:
        """Whether ``name`` is given (and not null)."""
        return self.data.get(name) is not None

    def raw(self, name: str) -> Any:
        """The value of ``name`` as written, marking it as known."""
        self.seen.add(name)
        return self.data.get(name)

    def sub(self, name: str) -> Reader:
        """A reader of the mapping under ``name``."""
        return Reader(self.source, self.key(name), self.raw(name))

    def boolean(self, name: str, default: bool) -> bool:
        """``true``/``false``, or ``default`` when absent."""
        value = self.raw(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.error(name, f"must be true or false, got {value!r}")
        return value

    def integer(
        self, name: str, default: int, minimum: int = 0, maximum: Optional[int] = None
    ) -> int:
        """A whole number within the bounds, or ``default`` when absent."""
        value = self.raw(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(name, f"must be a whole number, got {value!r}")
        return int(self._bounded(name, value, minimum, maximum))

    def number(
        self,
        name: str,
        default: float,
        minimum: float = 0.0,
        maximum: Optional[float] = None,
        *,
        duration: bool = False,
    ) -> float:
        """
        A finite number within the bounds, or ``default`` when absent.

        :param duration: the number is a duration in seconds. It may then also be given
            as a string with a unit, ``ms``, ``s``, ``m`` or ``h`` (``"1.5s"``,
            ``"500ms"``), and a bare number above ``maximum`` that is within the bounds
            once divided by 1000 is refused with a hint that durations are seconds.
        :returns: the number (of seconds, for a duration) as a float.
        """
        value = self.raw(name)
        if value is None:
            return default
        if duration and isinstance(value, str):
            seconds = self._parse_duration(name, value)
            return self._seconds_in_bounds(name, seconds, value, minimum, maximum)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            forms = _FORMS if duration else "a number"
            raise self.error(name, f"must be {forms}, got {value!r}")
        if not math.isfinite(value):
            raise self.error(name, f"must be a finite number, got {value!r}")
        if not duration:
            return float(self._bounded(name, value, minimum, maximum))
        if maximum is not None and value > maximum and minimum <= value / 1000 <= maximum:
            n = format_number(value)
            s = format_number(value / 1000)
            raise self.error(
                name,
                f"{n} seconds is more than {format_number(maximum)} s; durations are in "
                f'seconds: write {s} (or "{s}s"), or "{n}ms" if you meant milliseconds',
            )
        return self._seconds_in_bounds(name, float(value), value, minimum, maximum)

    def _parse_duration(self, name: str, text: str) -> float:
        match = _DURATION.fullmatch(text.strip())
        if match is None:
            raise self.error(name, f"must be {_FORMS}, got {text!r}")
        sign, digits, unit = match.groups()
        if sign == "-":
            raise self.error(name, f"must not be negative, got {text!r}")
        if not unit:
            raise self.error(name, f'{text!r} has no unit: write {digits} (seconds) or "{digits}s"')
        if unit == "ms":  # divided: 9 * 0.001 is not 0.009, 9 / 1000 is
            return float(digits) / 1000
        if unit not in _UNITS:
            raise self.error(name, f"has an unknown unit {unit!r} in {text!r} (use ms, s, m or h)")
        return float(digits) * _UNITS[unit]

    def _seconds_in_bounds(
        self,
        name: str,
        seconds: float,
        given: object,
        minimum: float = 0.0,
        maximum: Optional[float] = None,
    ) -> float:
        if seconds < minimum:
            raise self.error(name, f"must be at least {format_number(minimum)} s, got {given!r}")
        if maximum is not None and seconds > maximum:
            raise self.error(name, f"must be at most {format_number(maximum)} s, got {given!r}")
        return seconds

    def _bounded(self, name: str, value: Any, minimum: Any, maximum: Any) -> Any:
        if value < minimum:
            raise self.error(name, f"must be at least {minimum}, got {value!r}")
        if maximum is not None and value > maximum:
            raise self.error(name, f"must be at most {maximum}, got {value!r}")
        return value

    def string(self, name: str, default: Optional[str]) -> Optional[str]:
        """A non-empty string, or ``default`` when absent."""
        value = self.raw(name)
        if value is None:
            return default
        if not isinstance(value, str) or not value:
            raise self.error(name, f"must be a non-empty string, got {value!r}")
        return value

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        """One of ``choices``, or ``default`` when absent."""
        value = self.string(name, default)
        assert value is not None
        if value not in choices:
            raise self.error(name, f"must be one of {', '.join(choices)}; got {value!r}")
        return value

    def strings(self, name: str) -> Optional[tuple[str, ...]]:
        """A list of non-empty strings, or ``None`` when absent."""
        value = self.raw(name)
        if value is None:
            return None
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
            raise self.error(name, f"must be a list of strings, got {value!r}")
        return tuple(value)

    def items(self, name: str) -> list[Any]:
        """A list (of anything), empty when absent."""
        value = self.raw(name)
        if value is None:
            return []
        if not isinstance(value, (list, tuple)):
            raise self.error(name, f"must be a list, got {_kind(value)}")
        return list(value)

    def path(self, name: str, default: str) -> str:
        """A URL path starting with ``/``, or ``default`` when absent."""
        value = self.string(name, default)
        assert value is not None
        if not value.startswith("/"):
            raise self.error(name, f"must be a path starting with '/', got {value!r}")
        return value

    def done(self) -> None:
        """
        Refuse every key that no reader asked for, in the order they are written, each
        naming the known key it is probably a misspelling of, or else listing the known
        keys of this mapping.

        :raises ConfigError: one, or a :class:`~bungate.config.errors.ConfigErrors` when
            there are several unknown keys.
        """
        errors = []
        for name in self.data:
            if name in self.seen:
                continue
            hint = suggest_key(name, self.seen)
            if hint is None:
                hint = f"known keys here: {', '.join(sorted(self.seen))}"
            errors.append(self.error(name, f"unknown key ({hint})"))
        if errors:
            raise combine(errors)
