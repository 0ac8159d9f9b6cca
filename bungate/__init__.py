"""
bungate: an HTTP API gateway on Twisted, with a master supervising a fleet of workers.

The public names are listed in ``__all__`` and pinned by a test, so the API does not
drift by accident.
"""

from bungate.config import ConfigError, GatewayConfig, load_config, parse_config
from bungate.gateway import Gateway, run
from bungate.http.handlers import Response
from bungate.master.fleet import ClusterError, ClusterManager

__all__ = [
    "ClusterError",
    "ClusterManager",
    "ConfigError",
    "Gateway",
    "GatewayConfig",
    "Response",
    "load_config",
    "parse_config",
    "run",
]

__version__ = "0.1.0"
