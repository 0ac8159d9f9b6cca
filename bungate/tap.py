"""
``twist bungate``: command-line options and the service that runs the gateway (internal).

The service is a thin wrapper: :class:`GatewayService` calls :meth:`Gateway.listen` on
start and :meth:`Gateway.close` (which drains) on stop. ``twist`` begins logging after
building the service, so :class:`Options` hands twist the observer for our
``logger.format`` and ``logger.level`` unless ``--log-format`` / ``--log-level`` were
given to ``twist`` itself.

An invalid configuration is printed as one line per problem, ``FILE: key: problem``, and
the process exits with status 78 (sysexits' ``EX_CONFIG``), without the usage text. What
needs imports (handler modules, plugins) is checked in a fresh process
(``python -m bungate.worker --check``), never in the master.

``--pidfile PATH`` writes the process's pid once it listens (atomically; a stale file is
replaced, one held by a live gateway refused) and removes it on exit; with
``server.user`` a single process (``--single``) drops root once it listens, as the master
does (see :mod:`bungate.master.service`).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from typing import Any, NoReturn, Optional

import attrs
from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger, LogLevel
from twisted.python import usage

from bungate.config import (
    DEFAULT_CONFIG,
    ConfigError,
    GatewayConfig,
    error_lines,
    load_config,
    parse_config,
    warnings,
    with_overrides,
)
from bungate.config.convert import to_json
from bungate.ops.daemon import ProcessOptions, process_options, resolve_identity
from bungate.ops.pidfile import PidFile

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

#: The exit status of an invalid configuration (sysexits' EX_CONFIG).
EX_CONFIG = 78

#: The config key each command-line override pins.
_PINNED = {"port": "server.port", "workers": "cluster.workers", "python": "cluster.python"}


def _refuse(error: ConfigError) -> NoReturn:
    """Print every problem, one line each, and exit with :data:`EX_CONFIG`."""
    for line in error_lines(error):
        sys.stderr.write(f"bungate: {line}\n")
    sys.stderr.flush()
    raise SystemExit(EX_CONFIG)


def check_in_fresh_process(config: GatewayConfig, timeout: float = 60.0) -> list[str]:
    """
    What a worker's boot would say of ``config`` (handler imports, plugins, certificate
    files), asked of a fresh ``python -m bungate.worker --check``.

    :returns: the problems, one line each; empty when the config passed.
    """
    python = config.cluster.python or sys.executable
    request = json.dumps({"config": to_json(config), "names": {}})
    try:
        done = subprocess.run(
            [python, "-m", "bungate.worker", "--check"],
            input=request,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return [
            f"{config.source}: the check did not finish within {timeout:g}s (a handler "
            "module may hang at import)"
        ]
    except OSError as e:
        return [f"{config.source}: cluster.python: cannot run {python}: {e.strerror or e}"]
    answers = [line for line in done.stdout.splitlines() if line.startswith("{")]
    try:
        answer = json.loads(answers[-1]) if answers else {}
    except ValueError:
        answer = {}
    if done.returncode == 0 and answer.get("ok"):
        return []
    if answer.get("errors"):
        return [str(e) for e in answer["errors"]]
    tail = (done.stderr.strip().splitlines() or [""])[-1]
    return [
        f"{config.source}: the check exited with status {done.returncode} (a handler "
        f"module may exit at import){': ' + tail if tail else ''}"
    ]


def versions() -> str:
    """bungate's version, Twisted's, and the Python running them."""
    from bungate import __version__
    from twisted import __version__ as twisted_version

    return (
        f"bungate {__version__} (Twisted {twisted_version}, "
        f"{platform.python_implementation()} {platform.python_version()})"
    )


def _port(value: str) -> int:
    number = int(value)
    if not 0 <= number <= 65535:
        raise ValueError("must be 0..65535")
    return number


_port.coerceDoc = "0..65535; 0 picks a free port."  # type: ignore[attr-defined]


class Options(usage.Options):
    """``twist bungate [--config FILE] [--port N] [--workers N] [--python EXE]``."""

    synopsis = "[--config FILE] [--port PORT] [--workers N] [--python EXE] [--pidfile PATH]"
    longdesc = (
        "Run the bungate HTTP API gateway. Without --config a built-in default runs: "
        "port 3000, cluster mode with one worker per CPU, GET /health and an /echo "
        "route. Signals to the master: TERM/INT drain and stop (a second one, or QUIT, "
        "stops at once), HUP reload the config file, USR2 rolling restart, USR1 reopen "
        "the log file, TTIN/TTOU add/remove a worker."
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
        [
            "pidfile",
            None,
            None,
            "Write the master's pid to this file once it listens; removed on exit.",
        ],
    ]
    optFlags = [
        ["single", None, "Serve in this one process (cluster.enabled: false)."],
        ["check", None, "Validate the configuration, print the result and exit."],
        ["version", None, "Print bungate's version (and Twisted's, Python's) and exit."],
    ]

    def opt_version(self) -> None:
        """Print bungate's version (and Twisted's, Python's) and exit."""
        sys.stdout.write(versions() + "\n")
        raise SystemExit(0)

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

    def pinned(self) -> dict[str, str]:
        """``{config key: option}`` for each override given, for the reload log line."""
        return {_PINNED[name]: f"--{name} {value}" for name, value in self.overrides().items()}

    def postOptions(self) -> None:
        """
        Load and validate the configuration, then hand ``twist`` our log observer.

        With ``--check``, check the configuration as a worker's boot would (in a fresh
        process), print ``FILE: OK`` or its problems and exit. An invalid configuration
        exits with :data:`EX_CONFIG` (78).
        """
        if self["version"]:
            sys.stdout.write(versions() + "\n")
            raise SystemExit(0)
        try:
            config = self.load()
        except ConfigError as e:
            _refuse(e)
        for line in warnings(config):
            sys.stderr.write(f"bungate: warning: {line}\n")
        if self["check"]:
            problems = check_in_fresh_process(config)
            for line in problems:
                sys.stderr.write(f"bungate: {line}\n")
            if problems:
                raise SystemExit(EX_CONFIG)
            sys.stdout.write(f"{config.source}: OK\n")
            raise SystemExit(0)
        if not config.cluster.enabled:
            # One process imports its handlers anyway: check them here, for a clear error.
            from bungate.http.app import check_config

            try:
                check_config(config)
                resolve_identity(config)  # server.user / server.group (the master's: at start)
            except ConfigError as e:
                _refuse(e)
        self["gateway_config"] = config
        self._configure_twist_logging(config)

    def _configure_twist_logging(self, config: GatewayConfig) -> None:
        parent: Optional[Any] = getattr(self, "parent", None)
        if parent is None or not hasattr(parent, "__setitem__"):
            return
        argv = " ".join(sys.argv)
        from bungate.ops.logging import ReopenableFile, make_observer, open_log_file

        stream = parent.get("logFile")
        name = getattr(stream, "name", None)
        given = any(a in ("-l", "--log-file") or a.startswith("--log-file=") for a in sys.argv)
        if isinstance(name, str) and not name.startswith("<") and os.path.exists(name):
            # twist's --logfile: the same file, reopened by path on SIGUSR1 (logrotate).
            stream = parent["logFile"] = ReopenableFile(name)
            if config.logger.file is not None:
                sys.stderr.write(
                    f"bungate: warning: logger.file ({config.logger.file}) is not used: "
                    f"twist's --log-file ({name}) was given\n"
                )
        elif config.logger.file is not None and not given:
            try:
                stream = parent["logFile"] = open_log_file(config.logger, config.source)
            except ConfigError as e:
                _refuse(e)
        self["log_output"] = stream

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
    :param pinned: ``{config key: option}`` of the overrides, for the reload log line.
    :param pidfile: ``--pidfile``: where to write the pid once listening.
    """

    def __init__(
        self,
        config: GatewayConfig,
        overrides: Optional[dict[str, Any]] = None,
        log_output: Any = None,
        pinned: Optional[dict[str, str]] = None,
        pidfile: Optional[str] = None,
    ) -> None:
        self.config = config
        self.overrides = dict(overrides or {})
        self.log_output = log_output
        self.pinned = dict(pinned or {})
        self.pidfile = pidfile
        self.gateway: Any = None
        #: a single process's pid file, once written (a master writes its own).
        self._single_pidfile: Optional[PidFile] = None

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

        self.gateway = gateway = Gateway(
            self.config,
            config_loader=loader,
            manage_logging=False,
            worker_script="",
            log_output=self.log_output,
            pinned=self.pinned,
        )
        for line in warnings(self.config):
            log.warn("{warning}", warning=line)
        # The master writes the pid file itself, between binding and dropping root.
        process_options(ProcessOptions(pidfile=self.pidfile))
        if self.config.cluster.enabled:
            d = gateway.listen()
        else:
            d = defer.maybeDeferred(self._before_single).addCallback(lambda _: gateway.listen())
            d.addCallback(self._single_listening)

        def exit_status() -> None:
            # A graceful stop leaves 0; a stop that had to kill a worker, or a fleet
            # whose every slot failed, leaves its status (see bungate.master.service).
            code = gateway.exit_code
            if code:
                os._exit(code)

        reactor.addSystemEventTrigger("after", "shutdown", exit_status)  # type: ignore[arg-type]

        def failed(reason: Any) -> None:
            if reason.check(ConfigError):
                status = EX_CONFIG
                lines = error_lines(reason.value)
            else:
                status = 1
                lines = [f"cannot start: {reason.getErrorMessage()}"]
            # Before the reactor runs twist has not begun logging yet, and Twisted writes
            # critical events to stderr as they happen (then replays them into the log):
            # once is enough. Later, the log may be a file: say it on stderr too.
            echo = reactor.running and self.log_output not in (None, sys.stderr)
            for line in lines:
                log.critical("{line}", line=line)
                if echo:
                    sys.stderr.write(f"bungate: {line}\n")
            # twist starts the service before the reactor runs: stopping must wait for it.
            # After shutdown, exit non-zero so a supervisor sees the failure.
            # The ignores: Twisted types the global reactor as an instance of its zope
            # interfaces, whose methods are declared without ``self``. Without the
            # mypy-zope plugin mypy takes their first parameter for ``self``, so
            # addSystemEventTrigger seems to lack ``phase`` and stop() to want an argument.
            reactor.addSystemEventTrigger("after", "shutdown", os._exit, status)  # type: ignore[arg-type]
            if reactor.running:
                reactor.stop()  # type: ignore[misc]
            else:
                reactor.callWhenRunning(reactor.stop)  # type: ignore[misc]

        d.addErrback(failed)

    def _before_single(self) -> None:
        """A single process: refuse a pid file a live gateway holds, before binding."""
        if self.pidfile:
            PidFile(self.pidfile).check()

    def _single_listening(self, result: Any) -> Any:
        """A single process listens: write the pid file, then drop root (server.user)."""
        if self.pidfile:
            pidfile = PidFile(self.pidfile)
            log.info("Pid file: {what}", what=pidfile.acquire())
            self._single_pidfile = pidfile
        identity = resolve_identity(self.config)
        if identity is not None and identity.needed:
            identity.drop()
            log.info("Listening: running as {who} from now on", who=identity.describe())
        return result

    def stopService(self) -> Any:
        """Stop the gateway: the Deferred returned fires once it has drained (if started)."""
        super().stopService()
        if self.gateway is None:
            return None
        d = self.gateway.close()

        def release(result: Any) -> Any:
            pidfile = self._single_pidfile
            if pidfile is not None:
                try:
                    pidfile.release()
                except OSError as e:
                    log.warn(
                        "Cannot remove the pid file {path}: {error}", path=pidfile.path, error=e
                    )
            return result

        return d.addBoth(release)


def makeService(options: Options) -> GatewayService:
    """Build the service ``twist`` runs."""
    return GatewayService(
        options["gateway_config"],
        options.overrides(),
        options.get("log_output"),
        options.pinned(),
        pidfile=options["pidfile"],
    )
