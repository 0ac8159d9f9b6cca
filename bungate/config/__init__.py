"""
The gateway's configuration (internal: the public names are in :mod:`bungate`).

- :mod:`~bungate.config.schema`: the sections as frozen attrs classes; the only place a
  default is written;
- :mod:`~bungate.config.parse`: a mapping into that schema, every problem of the document
  reported at once (in the order of :mod:`~bungate.config.order`), each naming the file
  and the key; :mod:`~bungate.config.load` reads the YAML file;
  :mod:`~bungate.config.advice`: the warnings about a valid config that is probably not
  what was meant;
- :mod:`~bungate.config.reader`: typed reads out of one mapping (durations in seconds or
  with a unit);
- :mod:`~bungate.config.convert`: a validated config as JSON and back, for workers;
- :mod:`~bungate.config.errors`: :class:`ConfigError`, :class:`ConfigErrors` (several at
  once) and :func:`error_lines`, the lines to print.

Pure: nothing here imports a reactor.
"""

from bungate.config.advice import warnings
from bungate.config.errors import ConfigError, ConfigErrors, error_lines
from bungate.config.load import load_config, with_overrides
from bungate.config.parse import parse_config, parse_route
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
    "ConfigErrors",
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
    "error_lines",
    "load_config",
    "parse_config",
    "parse_route",
    "warnings",
    "with_overrides",
]
