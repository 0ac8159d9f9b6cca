"""
Reading a config file, and the command line's overrides (internal).
"""

from __future__ import annotations

from typing import Optional

import attrs
import yaml

from bungate.config.errors import ConfigError
from bungate.config.parse import parse_config
from bungate.config.schema import GatewayConfig

__all__ = ["load_config", "with_overrides"]


def load_config(path: str) -> GatewayConfig:
    """
    Read and validate a YAML config file.

    :raises ConfigError: when the file is missing, unreadable, not YAML or not valid.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(path, "", f"cannot read the config file: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(path, "", f"is not valid YAML{where}: {problem}") from None
    return parse_config({} if data is None else data, source=path)


def with_overrides(
    config: GatewayConfig,
    *,
    port: Optional[int] = None,
    workers: Optional[int] = None,
    python: Optional[str] = None,
) -> GatewayConfig:
    """
    Apply command-line overrides (``--port``, ``--workers``, ``--python``) to a config.

    ``workers`` also turns cluster mode on.
    """
    server, cluster = config.server, config.cluster
    if port is not None:
        server = attrs.evolve(server, port=port)
    if workers is not None:
        cluster = attrs.evolve(cluster, workers=workers, enabled=True)
    if python is not None:
        cluster = attrs.evolve(cluster, python=python)
    return attrs.evolve(config, server=server, cluster=cluster)
