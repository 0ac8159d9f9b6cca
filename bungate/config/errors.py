"""The one error every configuration problem is reported as."""

from __future__ import annotations

__all__ = ["ConfigError"]


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
