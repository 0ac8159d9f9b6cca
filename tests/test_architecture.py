"""
The tree's rules, read from the code's own imports: no import circle, the master and the
worker never import each other, the pure packages import no reactor, and every module is
either public or says it is not.
"""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import bungate

ROOT = Path(bungate.__file__).resolve().parent

#: Modules whose names are an API (besides the facade ``bungate`` itself).
PUBLIC_MODULES = frozenset(
    {
        "bungate",
        "bungate.handlers",
        "bungate.interfaces",
        "bungate.plugins",
        "bungate.plugins.bungate_builtin",
        "bungate.testing",
    }
)

#: What the pure packages may import from Twisted: no reactor, no I/O.
PURE_TWISTED = (
    "twisted.logger",
    "twisted.plugin",
    "twisted.internet.defer",
    "twisted.python.failure",
)
PURE_TWISTED_TYPES = ("twisted.internet.interfaces",)


def all_modules() -> list[str]:
    names = ["bungate"]
    for info in pkgutil.walk_packages([str(ROOT)], prefix="bungate."):
        names.append(info.name)
    return sorted(names)


def source_of(module: str) -> Path:
    path = ROOT.joinpath(*module.split(".")[1:])
    package = path / "__init__.py"
    return package if package.exists() else path.with_suffix(".py")


def imports_of(module: str) -> set[str]:
    """Every module ``module`` imports, anywhere in its body (function-local imports too)."""
    tree = ast.parse(source_of(module).read_text())
    found: set[str] = set()
    is_package = source_of(module).name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")
                anchor = parts if is_package else parts[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            for alias in node.names:  # ``from bungate.http import site`` imports a module
                found.add(f"{base}.{alias.name}")
    return found


def graph() -> dict[str, set[str]]:
    modules = set(all_modules())
    return {m: {i for i in imports_of(m) if i in modules and i != m} for m in modules}


def reach(edges: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for nxt in edges[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def in_package(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_there_is_no_import_circle() -> None:
    edges = graph()
    # A package's __init__ importing its own submodules is how a package hands names
    # on, not a circle between rooms.
    edges = {
        m: {
            i for i in targets if not (i.startswith(m + ".") and source_of(m).name == "__init__.py")
        }
        for m, targets in edges.items()
    }
    circles = [m for m in edges if m in reach(edges, m)]
    assert circles == []


@pytest.mark.parametrize(
    "room, never",
    [
        ("bungate.master", ("bungate.worker", "bungate.http", "bungate.gateway")),
        ("bungate.worker", ("bungate.master", "bungate.gateway")),
        ("bungate.http", ("bungate.master", "bungate.worker", "bungate.gateway")),
        ("bungate.core", ("bungate.master", "bungate.worker", "bungate.http", "bungate.ops")),
        ("bungate.config", ("bungate.master", "bungate.worker", "bungate.http", "bungate.ops")),
        ("bungate.ops", ("bungate.master", "bungate.worker", "bungate.http")),
    ],
)
def test_arrows_run_one_way(room: str, never: tuple[str, ...]) -> None:
    edges = graph()
    bad = []
    for module in edges:
        if in_package(module, room):
            reached = reach(edges, module)
            bad += [(module, r) for r in reached for n in never if in_package(r, n)]
    assert bad == []


@pytest.mark.parametrize("room", ["bungate.core", "bungate.config"])
def test_the_pure_packages_import_no_reactor_and_no_io(room: str) -> None:
    for module in all_modules():
        if not in_package(module, room):
            continue
        for name in imports_of(module):
            if name.startswith("twisted"):
                assert name.startswith(PURE_TWISTED + PURE_TWISTED_TYPES), (module, name)


def test_importing_the_pure_packages_does_not_import_a_reactor() -> None:
    pure = [
        m for m in all_modules() if in_package(m, "bungate.core") or in_package(m, "bungate.config")
    ]
    # Without running the facade (bungate/__init__.py imports the gateway, and so
    # everything): a bare package stands in for it.
    script = (
        "import importlib, json, sys, types\n"
        "package = types.ModuleType('bungate')\n"
        f"package.__path__ = [{str(ROOT)!r}]\n"
        "sys.modules['bungate'] = package\n"
        f"for name in {pure!r}: importlib.import_module(name)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('twisted.internet'))))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert "twisted.internet.reactor" not in loaded
    assert not [m for m in loaded if m.endswith(("tcp", "epollreactor", "selectreactor"))]


def says_internal(module: str) -> bool:
    doc = ast.get_docstring(ast.parse(source_of(module).read_text())) or ""
    return "(internal" in doc.split("\n\n")[0]


def test_every_module_is_public_or_says_it_is_not() -> None:
    """Implementation modules are private (``_name``) or live in a room that says so."""
    unmarked = []
    for module in all_modules():
        if module in PUBLIC_MODULES:
            continue
        parts = module.split(".")
        if any(p.startswith("_") for p in parts[1:]):
            continue
        prefixes = [".".join(parts[:i]) for i in range(2, len(parts) + 1)]
        if not any(says_internal(p) for p in prefixes):
            unmarked.append(module)
    assert unmarked == []
