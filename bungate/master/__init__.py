"""
The master process (internal: import the public names from :mod:`bungate`).

It binds the listening sockets once, runs one slot per worker and supervises the fleet:
scale, roll, reload, stop. It never parses a request, and it never imports
:mod:`bungate.worker` or :mod:`bungate.http`: it meets its workers only through
:mod:`bungate.wire`.
"""

__all__: list[str] = []
