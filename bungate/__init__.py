"""
bungate: an HTTP API gateway on Twisted, with a master supervising a fleet of workers.

The public names are listed in ``__all__`` and pinned by a test, so the API does not
drift by accident.
"""

from bungate.cluster.manager import ClusterError, ClusterManager
from bungate.config import ConfigError, GatewayConfig, load_config, parse_config
from bungate.gateway import Gateway, run
from bungate.proxy import Response

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
