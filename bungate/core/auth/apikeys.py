"""
API keys: :class:`ApiKeys`, the configured keys (kept as SHA-256 digests, matched in
constant time) with the caller each names, and :func:`parse_api_key_file`.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from typing import Iterable, List, Mapping, Optional, Tuple, Union

import attrs

__all__ = ["ApiKeys", "parse_api_key_file"]

_DEFAULT_NAME = "api-key"
_KEY_TEXT = re.compile(r"[\x21-\x7e]+\Z")


@attrs.frozen
class ApiKeys:
    """
    The API keys that let callers in, each with the caller's name.

    Only the SHA-256 digests of the keys are kept. :meth:`match` compares the digest of
    the presented key with every stored digest using :func:`hmac.compare_digest`, without
    stopping at the first hit: the time taken depends neither on which key matched, nor
    on how much of a key is right, nor on the presented key's length.

    :ivar digests: ``(sha256(key), name)`` pairs, in configuration order.
    """

    digests: Tuple[Tuple[bytes, str], ...] = attrs.field(repr=False)

    @classmethod
    def parse(
        cls,
        entries: Iterable[Union[str, Mapping[str, str]]],
        *,
        default_name: str = _DEFAULT_NAME,
        min_length: int = 16,
    ) -> ApiKeys:
        """
        Read the configured keys.

        :param entries: each a key string, or a mapping ``{"key": ..., "name": ...}``
            (``name`` optional).
        :param default_name: the name of keys given without one.
        :param min_length: the shortest key accepted (short keys can be guessed).
        :returns: the keys.
        :raises ValueError: for an empty, short, duplicated or non-printable-ASCII key
            (whitespace included, which usually means a stray newline), an entry of
            another shape, or an empty name. Messages name the entry by position and name,
            never by its key.
        """
        items: List[Tuple[object, object, str]] = []
        for index, entry in enumerate(entries):
            if isinstance(entry, str):
                items.append((entry, default_name, f"API key #{index}"))
            elif isinstance(entry, Mapping):
                unknown = set(entry) - {"key", "name"}
                if unknown:
                    raise ValueError(f"API key #{index}: unknown fields {sorted(unknown)}")
                items.append(
                    (entry.get("key"), entry.get("name", default_name), f"API key #{index}")
                )
            else:
                raise ValueError(f"API key #{index}: expected a string or a mapping")
        return cls._build(items, min_length)

    @classmethod
    def _build(cls, items: Iterable[Tuple[object, object, str]], min_length: int) -> ApiKeys:
        digests: List[Tuple[bytes, str]] = []
        seen = set()
        for key, name, where in items:
            if not isinstance(name, str) or not name:
                raise ValueError(f"{where}: the name must be a non-empty string")
            label = f"{where} ({name!r})"
            if not isinstance(key, str) or not key:
                raise ValueError(f"{label}: the key is missing or empty")
            if _KEY_TEXT.match(key) is None:
                raise ValueError(f"{label}: the key must be printable ASCII, no whitespace")
            if len(key) < min_length:
                raise ValueError(f"{label}: the key is shorter than {min_length} characters")
            digest = hashlib.sha256(key.encode("ascii")).digest()
            if digest in seen:
                raise ValueError(f"{label}: the same key is given twice")
            seen.add(digest)
            digests.append((digest, name))
        return cls(digests=tuple(digests))

    def match(self, presented: bytes) -> Optional[str]:
        """
        The caller a presented key belongs to.

        :param presented: the key as the client sent it.
        :returns: the key's name, or ``None`` when it is no configured key (or empty).
        """
        if not presented:
            return None
        digest = hashlib.sha256(presented).digest()
        found: Optional[str] = None
        for stored, name in self.digests:
            if hmac.compare_digest(digest, stored) and found is None:
                found = name
        return found


def parse_api_key_file(
    text: str, *, default_name: str = _DEFAULT_NAME, min_length: int = 16
) -> ApiKeys:
    """
    Read a file of API keys: one per line, as ``key`` or ``name key``; blank lines and
    lines starting with ``#`` are skipped.

    :param text: the file's content.
    :param default_name: the name of keys given without one.
    :param min_length: the shortest key accepted.
    :returns: the keys.
    :raises ValueError: for a line of more than two fields, or a key :meth:`ApiKeys.parse`
        refuses; the message gives the line number, never the key.
    """
    items: List[Tuple[object, object, str]] = []
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        fields = stripped.split()
        if len(fields) > 2:
            raise ValueError(f"line {number}: expected 'key' or 'name key'")
        key, name = (fields[0], default_name) if len(fields) == 1 else (fields[1], fields[0])
        items.append((key, name, f"line {number}"))
    return ApiKeys._build(items, min_length)
