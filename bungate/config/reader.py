"""
Reading typed values out of one mapping of a configuration document, every error naming
the source and the dotted key.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

from bungate.config.errors import ConfigError

__all__ = ["Reader"]

_KINDS: dict[type, str] = {dict: "a mapping", list: "a list", str: "a string"}


def _kind(value: object) -> str:
    return _KINDS.get(type(value), type(value).__name__)


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
        self, name: str, default: float, minimum: float = 0.0, maximum: Optional[float] = None
    ) -> float:
        """A number of seconds within the bounds, or ``default`` when absent."""
        value = self.raw(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(name, f"must be a number of seconds, got {value!r}")
        return float(self._bounded(name, value, minimum, maximum))

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
        """Refuse the first key that no reader asked for."""
        unknown = sorted(set(self.data) - self.seen)
        if unknown:
            known = ", ".join(sorted(self.seen))
            raise self.error(unknown[0], f"unknown key (known keys here: {known})")
