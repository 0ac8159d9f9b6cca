"""What differs between two configs, as the dotted keys an operator writes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import cattrs

from bungate.config.schema import GatewayConfig

__all__ = ["changed_keys", "changed_sections"]

_converter = cattrs.Converter()

#: Sections compared as a whole (a change anywhere inside names the section).
_WHOLE = ("routes", "middlewares")


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, Mapping) and not prefix.endswith("certificates"):
        for key, item in value.items():
            _flatten(item, f"{prefix}.{key}" if prefix else str(key), out)
    else:
        out[prefix] = value


def _keys(config: GatewayConfig) -> dict[str, Any]:
    doc: dict[str, Any] = _converter.unstructure(config)
    doc.pop("source", None)
    out: dict[str, Any] = {}
    for name in _WHOLE:
        out[name] = doc.pop(name, None)
    _flatten(doc, "", out)
    return out


def changed_keys(old: GatewayConfig, new: GatewayConfig) -> list[str]:
    """The dotted keys whose values differ (``routes`` and ``middlewares`` as a whole)."""
    a, b = _keys(old), _keys(new)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def changed_sections(old: GatewayConfig, new: GatewayConfig) -> list[str]:
    """The top-level sections with a changed key, in the order :func:`changed_keys` has."""
    sections: list[str] = []
    for key in changed_keys(old, new):
        section = key.split(".", 1)[0]
        if section not in sections:
            sections.append(section)
    return sections
