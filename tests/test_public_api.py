"""
The public API of :mod:`bungate` is pinned here, so that it never changes by accident.

Adding, renaming or removing a public name must be a deliberate change to this test too.
"""

from __future__ import annotations

import types
from typing import Any

import pytest

import bungate

PUBLIC = frozenset(
    {
        "ClusterError",
        "ClusterManager",
        "ConfigError",
        "Gateway",
        "GatewayConfig",
        "Response",
        "load_config",
        "parse_config",
        "run",
    }
)


def test_all_is_pinned() -> None:
    assert set(bungate.__all__) == PUBLIC
    assert len(bungate.__all__) == len(PUBLIC), "a name is listed twice in __all__"


def test_no_public_name_is_left_out_of_all() -> None:
    exported = {
        name
        for name, value in vars(bungate).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert exported == PUBLIC


def test_star_import_gives_exactly_the_public_names() -> None:
    namespace: dict[str, Any] = {}
    exec("from bungate import *", namespace)
    namespace.pop("__builtins__", None)
    assert set(namespace) == PUBLIC


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_public_name_is_importable_and_documented(name: str) -> None:
    scope: dict[str, Any] = {}
    exec(f"from bungate import {name}", scope)
    value = scope[name]
    # Its own docstring: a class does not inherit __doc__ from its bases.
    assert isinstance(value.__doc__, str) and value.__doc__.strip(), f"{name} has no docstring"
