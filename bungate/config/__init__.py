"""
The gateway's configuration (internal: the public names are in :mod:`bungate`).

- :mod:`~bungate.config.schema`: the sections as frozen attrs classes; the only place a
  default is written;
- :mod:`~bungate.config.parse`: a YAML document or a mapping into that schema, every
  error naming the file and the key;
- :mod:`~bungate.config.convert`: a validated config as JSON and back, for workers;
- :mod:`~bungate.config.errors`: :class:`ConfigError`.

Pure: nothing here imports a reactor.
"""

from bungate.config.errors import ConfigError
from bungate.config.parse import load_config, parse_config, parse_route, with_overrides
from bungate.config.schema import (
    BUILTIN_STRATEGIES,
    DEFAULT_CONFIG,
    CircuitBreakerConfig,
    ClusterConfig,
    GatewayConfig,
    HealthCheckConfig,
    HealthConfig,
    LoadBalancerConfig,
    LoggerConfig,
    MetricsConfig,
    RedirectConfig,
    RouteConfig,
    ServerConfig,
    StickySessionConfig,
    TargetConfig,
    TLSConfig,
)

__all__ = [
    "BUILTIN_STRATEGIES",
    "DEFAULT_CONFIG",
    "CircuitBreakerConfig",
    "ClusterConfig",
    "ConfigError",
    "GatewayConfig",
    "HealthCheckConfig",
    "HealthConfig",
    "LoadBalancerConfig",
    "LoggerConfig",
    "MetricsConfig",
    "RedirectConfig",
    "RouteConfig",
    "ServerConfig",
    "StickySessionConfig",
    "TLSConfig",
    "TargetConfig",
    "load_config",
    "parse_config",
    "parse_route",
    "with_overrides",
]
