"""
Reporting a document's problems in the order their keys are written (internal).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Optional

from bungate.config.errors import ConfigError, combine
from bungate.config.sections import under

__all__ = ["in_document_order"]


def _position(data: object, key: str) -> tuple[int, ...]:
    """
    Where dotted ``key`` is written in ``data``: the index of each step, mapping keys in
    the order they are written. A key that is not written (``is required``) sorts after
    the keys written next to it.
    """
    position: list[int] = []
    node, rest = data, key
    while rest:
        if isinstance(node, Mapping):
            # the longest key that starts ``rest``: a host name in a key may hold dots
            best: Optional[tuple[int, str]] = None
            for i, name in enumerate(node):
                if isinstance(name, str) and under(rest, name) and name:
                    if best is None or len(name) > len(best[1]):
                        best = (i, name)
            if best is None:
                position.append(len(node))
                break
            position.append(best[0])
            node, rest = node[best[1]], rest[len(best[1]) :]
        elif isinstance(node, (list, tuple)):
            index = re.match(r"\[(\d+)\]", rest)
            if index is None:
                break
            i = int(index.group(1))
            position.append(i)
            node, rest = (node[i] if i < len(node) else None), rest[index.end() :]
        else:
            break
        if rest.startswith("."):
            rest = rest[1:]
    return tuple(position)


def in_document_order(error: ConfigError, data: object, prefix: str = "") -> ConfigError:
    """``error``'s problems as one error, in the order their keys appear in ``data``."""

    def where(e: ConfigError) -> tuple[int, ...]:
        key = e.key
        if prefix and under(key, prefix):
            key = key[len(prefix) :].lstrip(".")
        return _position(data, key)

    return combine(sorted(error.errors, key=where))
