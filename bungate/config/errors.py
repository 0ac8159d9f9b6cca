"""The errors every configuration problem is reported as."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["ConfigError", "ConfigErrors", "combine", "error_lines"]


class ConfigError(ValueError):
    """
    A configuration value is missing, unknown or wrong.

    The message is one line, ``SOURCE: KEY: PROBLEM``, so an operator can fix the file
    without reading a traceback.

    :param source: where the config came from (a file path or ``<dict>``).
    :param key: the dotted key, e.g. ``routes[0].target``; empty for the whole file.
    :param problem: what is wrong, in words.
    """

    def __init__(self, source: str, key: str, problem: str) -> None:
        self.source = source
        self.key = key
        self.problem = problem
        where = f"{source}: {key}" if key else source
        super().__init__(f"{where}: {problem}")

    @property
    def errors(self) -> list[ConfigError]:
        """The single problems this error reports: here just itself."""
        return [self]


class ConfigErrors(ConfigError):
    """
    Several configuration problems, reported at once.

    ``source``, ``key`` and ``problem`` are the first problem's, so code that handles one
    :class:`ConfigError` keeps working; the message is one ``SOURCE: KEY: PROBLEM`` line
    per problem, joined with newlines.

    :param errors: the problems, in the order to report them; a :class:`ConfigErrors`
        among them contributes its own problems. At least one.
    :raises ValueError: when ``errors`` is empty.
    """

    def __init__(self, errors: Iterable[ConfigError]) -> None:
        flat = [single for error in errors for single in error.errors]
        if not flat:
            raise ValueError("ConfigErrors needs at least one error")
        first = flat[0]
        super().__init__(first.source, first.key, first.problem)
        self._errors = flat
        self.args = ("\n".join(str(e) for e in flat),)

    @property
    def errors(self) -> list[ConfigError]:
        """The single problems, in the order they are reported."""
        return list(self._errors)


def combine(errors: Iterable[ConfigError]) -> ConfigError:
    """
    One error to raise for ``errors``: the problem itself when there is one, else a
    :class:`ConfigErrors` holding them all.

    :raises ValueError: when ``errors`` is empty.
    """
    flat = [single for error in errors for single in error.errors]
    if len(flat) == 1:
        return flat[0]
    return ConfigErrors(flat)


def error_lines(error: ConfigError) -> list[str]:
    """
    The lines to show an operator for ``error``: one ``SOURCE: KEY: PROBLEM`` per problem.
    """
    return [str(e) for e in error.errors]
