"""
The proxy's side towards upstreams (internal): pooled keep-alive connections and how
``https://`` upstreams are trusted.
"""

__all__: list[str] = []
