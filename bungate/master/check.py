"""
Checking a config in a throwaway process, so the master never imports user code.

What a worker's boot does with a config (import the handlers, look up the plugins, load
the certificates) can kill or hang the process that does it: a handler module may call
``os._exit()`` or ``sys.exit()`` at import, or block. The master asks a fresh
``python -m bungate.worker --check`` instead, with the workers' interpreter, environment
and working directory, so the answer is the one a worker would meet, with the modules as
they are on disk now (the master's import cache never goes stale).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from twisted.internet import defer, protocol
from twisted.python.failure import Failure

from bungate.config import ConfigError, GatewayConfig
from bungate.config.convert import to_json
from bungate.config.errors import combine

__all__ = ["CHECK_TIMEOUT", "ConfigCheck"]

#: Seconds a check may take before it is killed and the config refused.
CHECK_TIMEOUT = 60.0


class _CheckProtocol(protocol.ProcessProtocol):
    def __init__(self, request: bytes) -> None:
        self.request = request
        self.out = b""
        self.err = b""
        self.done: defer.Deferred[tuple[Any, bytes, bytes]] = defer.Deferred()

    def connectionMade(self) -> None:
        transport: Any = self.transport
        transport.write(self.request)
        transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data[-4096:]

    def processEnded(self, reason: Failure) -> None:
        code = getattr(reason.value, "exitCode", None)
        sig = getattr(reason.value, "signal", None)
        self.done.callback(((code, sig), self.out, self.err))


class ConfigCheck:
    """
    ``check(config, names)`` — the fleet's ``validate`` — as a child process.

    :param reactor: spawns the child.
    :param python: the workers' interpreter.
    :param environment: the workers' environment (a callable: it may change on reload).
    :param timeout: see :data:`CHECK_TIMEOUT`.
    """

    def __init__(
        self,
        reactor: Any,
        python: Any,
        environment: Any,
        timeout: float = CHECK_TIMEOUT,
    ) -> None:
        self.reactor = reactor
        self.python = python
        self.environment = environment
        self.timeout = timeout

    def __call__(self, config: GatewayConfig, names: Mapping[str, str]) -> defer.Deferred[None]:
        """Fires when the config passed; fails with :class:`ConfigError` naming the problems."""
        request = json.dumps({"config": to_json(config), "names": dict(names)}).encode()
        proto = _CheckProtocol(request)
        python = self.python() if callable(self.python) else self.python
        transport = self.reactor.spawnProcess(
            proto,
            python,
            [python, "-m", "bungate.worker", "--check"],
            env=self.environment(),
            childFDs={0: "w", 1: "r", 2: "r"},
        )

        def kill() -> None:
            try:
                transport.signalProcess("KILL")
            except Exception:  # exited meanwhile
                pass

        timer = self.reactor.callLater(self.timeout, kill)

        def verdict(result: tuple[Any, bytes, bytes]) -> None:
            if timer.active():
                timer.cancel()
            (code, sig), out, err = result
            lines = [line for line in out.splitlines() if line.startswith(b"{")]
            answer: Any = None
            if lines:
                try:
                    answer = json.loads(lines[-1])
                except ValueError:
                    answer = None
            if isinstance(answer, dict) and answer.get("ok") and code == 0:
                return
            if isinstance(answer, dict) and answer.get("errors"):
                raise _refused(config, [str(e) for e in answer["errors"]])
            tail = err.decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
            if sig is not None:
                how = f"was killed (signal {sig}) after {self.timeout:g}s or by a handler module"
            else:
                how = f"exited with code {code} without an answer"
            raise ConfigError(
                config.source,
                "routes",
                f"the check of this config in a fresh process {how} "
                f"(a handler module may exit or hang at import){': ' + tail[0] if tail[0] else ''}",
            )

        return proto.done.addCallback(verdict)


def _refused(config: GatewayConfig, lines: list[str]) -> ConfigError:
    """The errors a check printed (each ``SOURCE: KEY: PROBLEM``), as one error."""
    source = config.source
    errors = []
    for line in lines:
        rest = line[len(source) + 2 :] if line.startswith(source + ": ") else line
        key, _, problem = rest.partition(": ")
        errors.append(
            ConfigError(source, key, problem) if problem else ConfigError(source, "", rest)
        )
    return combine(errors)
