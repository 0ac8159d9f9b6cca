"""
The request path of a worker (internal: import the public names from :mod:`bungate`).
"""

__all__: list[str] = []
