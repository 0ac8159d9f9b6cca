"""
The generic section reader (internal): one loop over a section's fields by their
:class:`~bungate.config.schema.Spec`, with the registry of keys that have a reader of
their own and of checks across a section's fields. :mod:`bungate.config.parse` and
:mod:`bungate.config.policy` register their readers here.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, TypeVar

import attrs

from bungate.config.errors import ConfigError, ConfigErrors
from bungate.config.fields import SPEC, Spec
from bungate.config.reader import Reader as _Reader

__all__ = [
    "CHECKS",
    "CUSTOM",
    "Failures",
    "Partial",
    "custom_reader",
    "each",
    "problems",
    "read_section",
    "section_check",
    "under",
]

T = TypeVar("T")


class Partial(ConfigErrors):
    """
    The problems found in one value, with what could be read of it (the defaults standing
    in for the bad parts), so that a section's check can still look at the good parts.
    Raised inside this module only: the entry points raise plain errors.
    """

    def __init__(self, errors: list[ConfigError], value: Any) -> None:
        super().__init__(errors)
        self.value = value


def under(key: str, prefix: str) -> bool:
    """Whether dotted ``key`` is ``prefix`` or a key inside it."""
    if not key.startswith(prefix):
        return False
    rest = key[len(prefix) :]
    return not rest or not prefix or rest[0] in ".["


class Failures:
    """Which keys of one section could not be read, for the section's check."""

    def __init__(self, r: _Reader, errors: list[ConfigError]) -> None:
        self._r = r
        self._errors = errors

    def any(self, *names: str) -> bool:
        """
        Whether a problem was found at or inside any of ``names`` (dotted, relative to the
        section), or at a key that holds one of them (say ``server`` for
        ``server.merge_slashes``): the value seen there is then a default, not the
        operator's.
        """
        for name in names:
            key = self._r.key(name)
            for e in self._errors:
                inside = under(e.key, key)
                holds = len(e.key) > len(self._r.prefix) and under(key, e.key)
                if inside or holds:
                    return True
        return False


_Check = Callable[[_Reader, Any, Failures], None]

#: ``(section class, field name) -> reader(r, name)``: keys with a shape of their own. A
#: reader returns the value, or ``attrs.NOTHING`` to keep the schema's default.
CUSTOM: dict[tuple[type, str], Callable[[_Reader, str], Any]] = {}
#: ``section class -> check(r, value, failed)``: rules across the fields of one section.
#: ``failed`` says which fields held a bad value; a rule about those is skipped, since
#: the value the check sees there is the default, not what the operator wrote.
CHECKS: dict[type, _Check] = {}


def custom_reader(cls: type, name: str) -> Callable[[Callable[[_Reader, str], Any]], Any]:
    def register(fn: Callable[[_Reader, str], Any]) -> Any:
        CUSTOM[(cls, name)] = fn
        return fn

    return register


def section_check(cls: type) -> Callable[[_Check], Any]:
    def register(fn: _Check) -> Any:
        CHECKS[cls] = fn
        return fn

    return register


def _default(field: Any) -> Any:
    default = field.default
    if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
        return default.factory()
    return default


def _simple(r: _Reader, name: str, spec: Spec, default: Any, field: Any) -> Any:
    kind = spec.kind
    if kind == "bool":
        return r.boolean(name, default)
    if kind in ("int", "port"):
        return r.integer(name, default, spec.minimum or 0, spec.maximum)
    if kind == "seconds":
        return r.number(name, default, spec.minimum or 0.0, spec.maximum, duration=True)
    if kind == "str":
        return r.string(name, default)
    if kind == "choice":
        return r.choice(name, default, spec.choices)
    if kind == "path":
        return r.path(name, default)
    if kind == "strings":
        value = r.strings(name)
        return default if value is None else value
    if kind == "section":
        return read_section(r.sub(name), field.default.factory)
    raise AssertionError(f"unknown field kind {kind!r}")


def problems(error: ConfigError) -> tuple[list[ConfigError], Any]:
    """The single problems of ``error``, and what could be read despite them."""
    value = error.value if isinstance(error, Partial) else attrs.NOTHING
    return error.errors, value


def read_section(r: _Reader, cls: type[T]) -> T:
    """
    Read one section: every field of ``cls`` by its spec, then the section's own check,
    then refuse the keys the schema does not know.

    Every field is read even when an earlier one is bad (the schema's default stands in
    for a bad value), so one reading reports every problem of the section.

    :raises ConfigError: naming every bad or unknown key (a
        :class:`~bungate.config.errors.ConfigErrors` when there are several).
    """
    values: dict[str, Any] = {}
    errors: list[ConfigError] = []
    for field in attrs.fields(cls):  # type: ignore[arg-type]
        spec: Optional[Spec] = field.metadata.get(SPEC)
        if spec is None:
            continue
        r.seen.add(field.name)  # a known key, even when its reader fails before asking
        try:
            if spec.kind == "custom":
                value = CUSTOM[(cls, field.name)](r, field.name)
            else:
                value = _simple(r, field.name, spec, _default(field), field)
        except ConfigError as e:
            found, value = problems(e)
            errors.extend(found)
        if value is not attrs.NOTHING:
            values[field.name] = value
    result = cls(**values)
    check = CHECKS.get(cls)
    try:
        if check is not None:
            check(r, result, Failures(r, list(errors)))
    except ConfigError as e:
        errors.extend(e.errors)
    try:
        r.done()
    except ConfigError as e:
        errors.extend(e.errors)
    if errors:
        raise Partial(errors, result)
    return result


def each(
    r: _Reader, name: str, read: Callable[[str, object], T], unread: Optional[T] = None
) -> tuple[T, ...]:
    """
    Read every item of the list under ``name`` with ``read(key, item)``, reporting the
    problems of all of them.

    :param unread: stands in for an item that could not be read at all, so that the
        items after it keep their index; ``None`` leaves such an item out.
    """
    values: list[T] = []
    errors: list[ConfigError] = []
    for i, item in enumerate(r.items(name)):
        try:
            values.append(read(f"{r.key(name)}[{i}]", item))
        except ConfigError as e:
            found, value = problems(e)
            errors.extend(found)
            if value is not attrs.NOTHING:
                values.append(value)
            elif unread is not None:
                values.append(unread)
    if errors:
        raise Partial(errors, tuple(values))
    return tuple(values)
