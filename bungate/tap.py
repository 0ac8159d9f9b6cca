"""
``twist bungate``: command-line options and the service that runs the gateway (internal).

The service is a thin wrapper: :class:`GatewayService` calls :meth:`Gateway.listen` on
start and :meth:`Gateway.close` (which drains) on stop. ``twist`` begins logging after
building the service, so :class:`Options` hands twist the observer for our
``logger.format`` and ``logger.level`` unless ``--log-format`` / ``--log-level`` were
given to ``twist`` itself.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Optional

import attrs
from twisted.application.service import Service
from twisted.logger import Logger, LogLevel
from twisted.python import usage

from bungate.config import (
    DEFAULT_CONFIG,
    ConfigError,
    GatewayConfig,
    load_config,
    parse_config,
    with_overrides,
)

__all__ = ["GatewayService", "Options", "makeService"]

log = Logger(namespace="bungate.tap")

_LEVELS = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
    "critical": LogLevel.critical,
}


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError("must be at least 1")
    return number


_positive.coerceDoc = "A whole number, at least 1."  # type: ignore[attr-defined]


def _port(value: str) -> int:
    number = int(value)
    if not 0 <= number <= 65535:
        raise ValueError("must be 0..65535")
    return number


_port.coerceDoc = "0..65535; 0 picks a free port."  # type: ignore[attr-defined]


class Options(usage.Options):
    """``twist bungate [--config FILE] [--port N] [--workers N] [--python EXE]``."""

    synopsis = "[--config FILE] [--port PORT] [--workers N] [--python EXE]"
    longdesc = (
        "Run the bungate HTTP API gateway. Without --config a built-in default runs: "
        "port 3000, cluster mode with one worker per CPU, GET /health and an /echo "
        "route. Signals to the master: TERM/INT drain and stop, USR2 rolling restart, "
        "HUP reload the config file, TTIN/TTOU add/remove a worker."
    )
    optParameters = [
        ["config", "c", None, "YAML configuration file (default: the built-in config)."],
        ["port", "p", None, "Listen on this port (overrides server.port)", _port],
        [
            "workers",
            "w",
            None,
            "Run this many workers (overrides cluster.workers; implies cluster mode)",
            _positive,
        ],
        ["python", None, None, "Interpreter for the workers, e.g. pypy3 (cluster.python)."],
    ]
    optFlags = [
        ["single", None, "Serve in this one process (cluster.enabled: false)."],
        ["check", None, "Validate the configuration, print the result and exit."],
    ]

    def load(self) -> GatewayConfig:
        """Read the configuration with the command-line overrides applied."""
        path = self["config"]
        config = load_config(path) if path else parse_config(DEFAULT_CONFIG, "<built-in default>")
        config = with_overrides(config, **self.overrides())
        if self["single"]:
            config = attrs.evolve(config, cluster=attrs.evolve(config.cluster, enabled=False))
        return config

    def overrides(self) -> dict[str, Any]:
        """The command-line overrides given (they stay pinned across reloads)."""
        return {
            name: self[name] for name in ("port", "workers", "python") if self[name] is not None
        }

    def postOptions(self) -> None:
        """
        Load and validate the configuration, then hand ``twist`` our log observer.

        With ``--check``, print that the configuration is valid and exit instead.

        :raises usage.UsageError: the configuration is invalid.
        """
        try:
            self["gateway_config"] = self.load()
            from bungate.http.app import check_config

            check_config(self["gateway_config"])
        except ConfigError as e:
            raise usage.UsageError(f"invalid configuration: {e}") from None
        if self["check"]:
            sys.stdout.write(f"configuration OK: {self['gateway_config'].source}\n")
            raise SystemExit(0)
        self._configure_twist_logging(self["gateway_config"])

    def _configure_twist_logging(self, config: GatewayConfig) -> None:
        parent: Optional[Any] = getattr(self, "parent", None)
        if parent is None or not hasattr(parent, "__setitem__"):
            return
        argv = " ".join(sys.argv)
        from bungate.ops.logging import make_observer

        self["log_output"] = parent.get("logFile")

        logger_config = config.logger
        if "--log-level" in argv:
            # twist's level filters before our observer, which filters again by its own
            # level: give it twist's, or a level above logger.level would show nothing.
            level = getattr(parent.get("logLevel"), "name", None)
            if level is not None:
                logger_config = attrs.evolve(logger_config, level=level)
        else:
            parent["logLevel"] = _LEVELS[config.logger.level]
        if "--log-format" not in argv:
            parent["fileLogObserverFactory"] = lambda stream: make_observer(
                logger_config, None, stream
            )


class GatewayService(Service):
    """
    Starts the gateway with the service and drains it when the service stops.

    :param config: the validated config.
    :param overrides: the command-line overrides, applied again to every reloaded config.
    :param log_output: where the workers' log lines go (``twist``'s log file).
    """

    def __init__(
        self,
        config: GatewayConfig,
        overrides: Optional[dict[str, Any]] = None,
        log_output: Any = None,
    ) -> None:
        self.config = config
        self.overrides = dict(overrides or {})
        self.log_output = log_output
        self.gateway: Any = None

    def startService(self) -> None:
        """Start the gateway; if it cannot start, stop the reactor and exit non-zero."""
        from twisted.internet import reactor

        from bungate.gateway import Gateway

        super().startService()
        path = (
            self.config.source
            if self.config.source.endswith((".yaml", ".yml", ".json"))
            or "<" not in self.config.source
            else None
        )
        loader = None
        if path is not None:
            overrides = self.overrides

            def loader() -> GatewayConfig:
                return with_overrides(load_config(path), **overrides)

        self.gateway = Gateway(
            self.config,
            config_loader=loader,
            manage_logging=False,
            worker_script="",
            log_output=self.log_output,
        )
        d = self.gateway.listen()

        def failed(reason: Any) -> None:
            log.critical("bungate cannot start: {error}", error=reason.getErrorMessage())
            sys.stderr.write(f"bungate: cannot start: {reason.getErrorMessage()}\n")
            # twist starts the service before the reactor runs: stopping must wait for it.
            # After shutdown, exit non-zero so a supervisor sees the failure.
            # The ignores: Twisted types the global reactor as an instance of its zope
            # interfaces, whose methods are declared without ``self``. Without the
            # mypy-zope plugin mypy takes their first parameter for ``self``, so
            # addSystemEventTrigger seems to lack ``phase`` and stop() to want an argument.
            reactor.addSystemEventTrigger("after", "shutdown", os._exit, 1)  # type: ignore[arg-type]
            if reactor.running:
                reactor.stop()  # type: ignore[misc]
            else:
                reactor.callWhenRunning(reactor.stop)  # type: ignore[misc]

        d.addErrback(failed)

    def stopService(self) -> Any:
        """Stop the gateway: the Deferred returned fires once it has drained (if started)."""
        super().stopService()
        if self.gateway is not None:
            return self.gateway.close()
        return None


def makeService(options: Options) -> GatewayService:
    """Build the service ``twist`` runs."""
    return GatewayService(options["gateway_config"], options.overrides(), options.get("log_output"))
