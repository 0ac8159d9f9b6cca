"""
bungate's plugin package.

Third parties add balancing strategies and request middlewares by dropping a module into
a ``bungate/plugins/`` directory anywhere on ``sys.path`` (with no ``__init__.py`` in
their ``bungate/`` and ``bungate/plugins/`` directories); :mod:`bungate.extensions` finds
them with :func:`twisted.plugin.getPlugins`. See ``docs/extending.md``.
"""

from twisted.plugin import pluginPackagePaths

__path__.extend(pluginPackagePaths(__name__))  # type: ignore[no-untyped-call]
__all__: list[str] = []
