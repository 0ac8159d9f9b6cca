"""
Finding plugins by name.

Strategies and middlewares are found with :func:`twisted.plugin.getPlugins` in the
:mod:`bungate.plugins` plugin package (the built-ins too, from
:mod:`bungate.plugins.bungate_builtin`). The scan happens once per process and interface;
later look-ups are dictionary reads.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.logger import Logger
from twisted.plugin import getPlugins
from zope.interface.interface import InterfaceClass

import bungate.plugins as plugin_package
from bungate.interfaces import IBalancerFactory, IMiddlewareFactory

__all__ = ["clear_cache", "find_middleware", "find_strategy", "installed"]

_log = Logger(namespace="bungate.extensions")
_BUILTIN_MODULES = ("bungate.core.balancing", "bungate.plugins.bungate_builtin")
_cache: dict[InterfaceClass, dict[str, Any]] = {}


def _module_of(plugin: object) -> str:
    module = getattr(plugin, "__module__", None)
    if not isinstance(module, str):
        module = type(plugin).__module__
    return module


def _registry(interface: InterfaceClass) -> dict[str, Any]:
    """Every installed plugin providing ``interface``, by name (scanned once)."""
    found = _cache.get(interface)
    if found is not None:
        return found
    if getattr(sys.modules.get("bungate"), "__file__", None) is None:
        # twisted.python.modules cannot walk a namespace package.
        raise RuntimeError("bungate/__init__.py is missing: plugins cannot be found")
    plugins: list[Any] = list(getPlugins(interface, plugin_package))  # type: ignore[arg-type]
    # Built-ins first, then by module name: a third party cannot shadow a built-in name,
    # and which of two clashing third-party plugins wins does not depend on disk order.
    plugins.sort(key=lambda p: (_module_of(p) not in _BUILTIN_MODULES, _module_of(p)))
    found = {}
    for plugin in plugins:
        name = getattr(plugin, "name", None)
        if not isinstance(name, str) or not name:
            _log.warn(
                "ignoring plugin {plugin!r} from {module}: it has no name",
                plugin=plugin,
                module=_module_of(plugin),
            )
            continue
        if name in found:
            if found[name] is not plugin:
                _log.warn(
                    "two plugins are named {name!r}: using the one from {kept}, ignoring "
                    "the one from {ignored}",
                    name=name,
                    kept=_module_of(found[name]),
                    ignored=_module_of(plugin),
                )
            continue
        found[name] = plugin
    _cache[interface] = found
    return found


def clear_cache() -> None:
    """Forget what was found, so the next look-up scans the plugin package again."""
    _cache.clear()


def installed(interface: InterfaceClass) -> list[str]:
    """
    The names of the installed plugins providing ``interface``, sorted.

    :param interface: :class:`~bungate.interfaces.IBalancerFactory` or
        :class:`~bungate.interfaces.IMiddlewareFactory`.
    """
    return sorted(_registry(interface))


def _find(interface: InterfaceClass, kind: str, name: str) -> Any:
    registry = _registry(interface)
    try:
        return registry[name]
    except KeyError:
        names = ", ".join(sorted(registry)) or "none"
        raise LookupError(f"unknown {kind} {name!r}; installed: {names}") from None


def find_strategy(name: str) -> IBalancerFactory:
    """
    The balancing strategy plugin called ``name``.

    Call the result to get a fresh :class:`~bungate.interfaces.IBalancer` for one route.

    :param name: as in ``load_balancer.strategy``.
    :raises LookupError: no such strategy; the message lists the installed ones.
    """
    factory: IBalancerFactory = _find(IBalancerFactory, "strategy", name)
    return factory


def find_middleware(name: str) -> IMiddlewareFactory:
    """
    The middleware plugin called ``name``.

    Call the result to get an :class:`~bungate.interfaces.IMiddleware`.

    :param name: as in ``middlewares:``.
    :raises LookupError: no such middleware; the message lists the installed ones.
    """
    factory: IMiddlewareFactory = _find(IMiddlewareFactory, "middleware", name)
    return factory
