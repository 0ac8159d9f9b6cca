"""
A worker process (internal: import the public names from :mod:`bungate`).

It adopts the sockets its master passed down, serves the request path of
:mod:`bungate.http` on them, reports to the master over the control channel and drains
when asked to stop or when the master dies. It never imports :mod:`bungate.master`: the
two meet only through :mod:`bungate.wire`.
"""

__all__: list[str] = []
