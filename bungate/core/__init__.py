"""
Pure logic of the gateway (internal: import the public names from :mod:`bungate`).

Nothing in this package imports a reactor or does I/O: clocks and random sources are
passed in, so every rule is tested with :class:`twisted.internet.task.Clock` and seeded
generators.
"""

__all__: list[str] = []
