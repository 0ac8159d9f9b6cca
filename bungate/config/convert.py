"""
A validated configuration as JSON and back, for the master to hand its workers.

The master validated the operator's document once; what it sends a worker is the typed
config itself, unstructured by cattrs, and the worker structures it back into the same
classes without a second reading of YAML. A handler given as a Python callable cannot
travel this way (a worker that re-runs the user's script builds it itself).
"""

from __future__ import annotations

import json
from typing import Any, Callable, Optional, Union

import cattrs

from bungate.config.errors import ConfigError
from bungate.config.policy import AuthConfig, CorsConfig, RateLimitConfig, SecurityHeadersConfig
from bungate.config.schema import GatewayConfig

__all__ = ["from_json", "to_json"]

_converter = cattrs.Converter()
_Handler = Union[str, Callable[..., Any], None]


def _structure_handler(value: Any, _: Any) -> Optional[str]:
    if value is None or isinstance(value, str):
        return value
    raise ValueError(f"a handler must be an import string, got {value!r}")


_converter.register_structure_hook(_Handler, _structure_handler)


def _policy(cls: type) -> Callable[[Any, Any], Any]:
    """A route's policy: its section, ``false`` (the top-level default off) or none."""

    def structure(value: Any, _: Any) -> Any:
        if value is None or isinstance(value, bool):
            return value
        return _converter.structure(value, cls)

    return structure


for _cls in (AuthConfig, RateLimitConfig, CorsConfig, SecurityHeadersConfig):
    _converter.register_structure_hook(Union[_cls, bool, None], _policy(_cls))



def to_json(config: GatewayConfig) -> str:
    """
    The config as one line of JSON.

    :raises ConfigError: naming the route whose handler is a Python callable.
    """
    for i, route in enumerate(config.routes):
        if callable(route.handler):
            raise ConfigError(
                config.source,
                f"routes[{i}].handler",
                "is a Python callable, which cannot be sent to a worker process; name it "
                "as 'package.module:function' or start the workers from your script",
            )
    lists = [("", config)] + [(f"routes[{i}].", r) for i, r in enumerate(config.routes)]
    for prefix, holder in lists:
        for j, middleware in enumerate(holder.middlewares):
            if not isinstance(middleware, str):
                raise ConfigError(
                    config.source,
                    f"{prefix}middlewares[{j}]",
                    "is a Python object, which cannot be sent to a worker process; name it "
                    "as 'package.module:callable' or start the workers from your script",
                )
        for hook, value in holder.hooks:
            if not isinstance(value, str):
                raise ConfigError(
                    config.source,
                    f"{prefix}hooks.{hook}",
                    "is a Python callable, which cannot be sent to a worker process; name "
                    "it as 'package.module:callable' or start the workers from your script",
                )
    return json.dumps(_converter.unstructure(config), separators=(",", ":"))


def from_json(text: str) -> GatewayConfig:
    """
    The config :func:`to_json` wrote.

    :raises ValueError: when ``text`` is not such a document.
    """
    try:
        return _converter.structure(json.loads(text), GatewayConfig)
    except (cattrs.BaseValidationError, TypeError, KeyError) as e:
        raise ValueError(f"not a bungate config document: {e}") from None
