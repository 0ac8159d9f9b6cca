"""
How the fleet takes a config: at start (:meth:`ConfigFlow.accept_config`) and on SIGHUP
(:meth:`ConfigFlow.reload`), and what a reload changes (the keys that differ, and the ones
a running fleet cannot take).

The accepted config is the last one that booted: a reload's config is tried by the first
replacement worker of its roll, and becomes the fleet's only once that worker is ready.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Callable, Optional

from twisted.internet import defer
from twisted.logger import Logger

from bungate.config import ClusterConfig, ConfigError, GatewayConfig
from bungate.config.convert import to_json
from bungate.config.diff import changed_keys
from bungate.master.certificates import CertificateCopies, Prepared, Validate
from bungate.master.listeners import Listeners
from bungate.master.spawn import Spawner

__all__ = ["ConfigFlow", "refused_changes"]

def refused_changes(old: GatewayConfig, new: GatewayConfig) -> None:
    """
    Refuse what a running master cannot apply.

    :raises ConfigError: naming the key, e.g. leaving cluster mode.
    """
    if old.cluster.enabled and not new.cluster.enabled:
        raise ConfigError(
            new.source,
            "cluster.enabled",
            "a running master cannot leave cluster mode; restart the gateway to run as a "
            "single process",
        )


class ConfigFlow:
    """
    The config-taking part of :class:`~bungate.master.fleet.ClusterManager` (a mixin: it
    uses the fleet's roll, scaling and parts, declared below).
    """

    config: GatewayConfig
    config_loader: Optional[Callable[[], GatewayConfig]]
    validate: Validate
    pinned: Mapping[str, str]
    log: Logger
    spawner: Spawner
    listeners: Listeners
    certificates: CertificateCopies
    _slot_config: ClusterConfig
    _lock: defer.DeferredLock
    _stopping: Any
    _reloading: bool
    _reload_again: bool
    _accepted: bool
    _accepted_at: float

    # The fleet's, provided by ClusterManager:
    _emit: Callable[..., None]
    _resolve_python: Callable[[GatewayConfig], str]
    _roll_once: Callable[[], defer.Deferred[Any]]
    _scale_to: Callable[[int], defer.Deferred[Any]]
    worker_count: Callable[[], int]


    def reload(self) -> defer.Deferred[bool]:
        """
        Re-read the config (SIGHUP) and make it the fleet's, or refuse it saying why.

        The new config is checked first (:attr:`validate`, in a fresh process in a
        master run by ``twist``), then the workers are rolled onto it; the first
        replacement is the gate: if it cannot boot, the roll stops, the old workers keep
        serving and every respawn keeps using the old config. Changed addresses get new
        listening sockets, the workers move to them, the old ones are closed;
        ``cluster.workers`` resizes the fleet. Fires ``True`` once the config is the
        fleet's, ``False`` when it was refused. A reload asked for while one runs is
        queued (one more runs afterwards).
        """
        if self._reloading:
            self._reload_again = True
            self.log.info("Reload already in progress: another one will follow")
            return defer.succeed(True)
        return self._lock.run(self._reloads)

    @defer.inlineCallbacks
    def _reloads(self) -> Any:
        self._reloading = True
        try:
            while True:
                self._reload_again = False
                ok = yield self._reload_once()
                if not self._reload_again or self._stopping is not None:
                    return ok
        finally:
            self._reloading = False

    @defer.inlineCallbacks
    def _reload_once(self) -> Any:
        if self.config_loader is None:
            self.log.info("Reload requested: no config file, rolling the workers")
            ok, _ = yield self._roll_once()
            return ok
        old = self.config
        try:
            config = self.config_loader()
            refused_changes(old, config)
            python = self._resolve_python(config)
            prepared = self.certificates.prepare(config)
        except Exception as e:
            self._emit("reload-refused", error=str(e))
            return False
        try:
            yield defer.maybeDeferred(self.validate, prepared.config, prepared.names)
            staged = self.listeners.stage(config)
        except Exception as e:
            self.certificates.discard(prepared)
            self._emit("reload-refused", error=str(e))
            return False
        changed = changed_keys(old, config)
        before = self._use(prepared, config, python)
        sockets_before = self.listeners.use(staged)
        booted = self.worker_count() == 0
        if not booted:
            _, booted = yield self._roll_once()
        if not booted:
            self._restore(before)
            self.listeners.revert(staged, sockets_before)
            self.certificates.discard(prepared)
            self._emit(
                "reload-aborted",
                source=config.source,
                since=time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self._accepted_at)),
            )
            return False
        self.listeners.accept(staged)
        self._take(prepared, config)
        self._emit(
            "reload-ok",
            source=config.source,
            changed=", ".join(changed) or "nothing",
            moved="; ".join(staged.moved) or "none",
            pinned=", ".join(f"{k} ({v})" for k, v in self.pinned.items()) or "none",
        )
        if config.cluster.workers != self.worker_count():
            yield self._scale_to(config.cluster.workers)
        return True

    def _use(self, prepared: Prepared, config: GatewayConfig, python: str) -> tuple[Any, ...]:
        """Workers started from now on get ``prepared``; returns what they got before."""
        spawner = self.spawner
        before = (
            spawner.config_json,
            spawner.names,
            spawner.generation,
            spawner.python,
            spawner.allowed_env,
            self._slot_config,
        )
        # The built-in worker serves the config it is sent; a worker that runs the
        # user's script builds its own (and may hold Python callables JSON cannot carry).
        if spawner.worker_script is None:
            spawner.config_json = to_json(prepared.config)
        spawner.names = prepared.names
        spawner.generation = prepared.generation
        spawner.python = python
        spawner.allowed_env = config.cluster.allowed_env
        self._slot_config = config.cluster
        return before

    def _restore(self, before: tuple[Any, ...]) -> None:
        spawner = self.spawner
        (
            spawner.config_json,
            spawner.names,
            spawner.generation,
            spawner.python,
            spawner.allowed_env,
            self._slot_config,
        ) = before

    def _take(self, prepared: Prepared, config: GatewayConfig) -> None:
        """``config`` is the fleet's from now on."""
        self.config = config
        self.certificates.accept(prepared)
        self.spawner.accepted_json = self.spawner.config_json
        self._accepted = True
        self._accepted_at = time.time()

    # --- the accepted config ----------------------------------------------------------

    def accept_config(self, config: GatewayConfig) -> defer.Deferred[None]:
        """
        Check ``config`` and make it the one every worker started from now on gets.

        The certificate, key and CA files it names are copied into a private directory
        (:class:`~bungate.master.certificates.CertificateCopies`) and :attr:`validate`
        checks the config that points at the copies, i.e. the very bytes workers will
        load. A file overwritten later on disk therefore reaches no worker (a respawned
        one included) until a reload accepts it.

        :returns: a Deferred that fails with :class:`ConfigError` when the config is
            refused (naming the operator's files); the current config and its copies
            then stay as they were.
        """
        try:
            python = self._resolve_python(config)
            prepared = self.certificates.prepare(config)
        except ConfigError:
            return defer.fail()

        def accepted(_: Any) -> None:
            self._use(prepared, config, python)
            self._take(prepared, config)

        def refused(failure: Any) -> Any:
            self.certificates.discard(prepared)
            return failure

        d = defer.maybeDeferred(self.validate, prepared.config, prepared.names)
        return d.addCallbacks(accepted, refused)

