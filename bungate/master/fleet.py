"""
The fleet: :class:`ClusterManager` runs one slot per worker and scales, rolls, reloads and
stops them.

It owns the listening sockets for its whole life (:mod:`~bungate.master.listeners`) and
starts each worker through its ``spawn`` callable (:class:`~bungate.master.spawn.Spawner`
by default), which passes the sockets and a control channel down. Its events go to
:class:`~bungate.master.events.FleetEvents` (log lines, metrics, ``on()`` callbacks). It
never parses a request.

Workers load their certificate, key and CA files from the master's private copies, made
when the master accepts a config (:meth:`ClusterManager.accept_config`), so a file that
changes on disk reaches no worker until a reload accepts it.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Mapping
from typing import IO, Any, Callable, Optional, Union

import attrs
from twisted.internet import defer, task
from twisted.logger import Logger

from bungate._once import Once
from bungate.config import ClusterConfig, ConfigError, GatewayConfig, parse_config
from bungate.config.convert import to_json
from bungate.master.certificates import CertificateCopies, Validate
from bungate.master.events import FleetEvents
from bungate.master.exits import signal_number
from bungate.master.listeners import Listeners
from bungate.master.slot import SlotState, WorkerSlot
from bungate.master.spawn import Spawner, WorkerOutput
from bungate.ops.tlsfiles import check_tls, check_upstream_tls
from bungate.wire import FLEET

__all__ = ["ClusterError", "ClusterManager"]

_log = Logger(namespace="bungate.master")


class ClusterError(RuntimeError):
    """The fleet could not be started (no worker became ready, a port could not be bound)."""


def _as_gateway_config(config: Any) -> GatewayConfig:
    if isinstance(config, GatewayConfig):
        return config
    if isinstance(config, ClusterConfig):
        return attrs.evolve(GatewayConfig(), cluster=config)
    if isinstance(config, Mapping):
        if config and not ({"server", "cluster", "routes"} & set(config)):
            config = {"cluster": dict(config)}  # the spec passes the cluster section alone
        return parse_config(config)
    raise TypeError(f"expected a config mapping or GatewayConfig, got {type(config).__name__}")


def check_certificate_files(config: GatewayConfig, names: Mapping[str, str]) -> None:
    """The default check of a config before it is accepted: its certificate and CA files."""
    check_tls(config.server.tls, config.source, names)
    check_upstream_tls(config.routes, config.source, names)


class ClusterManager:
    """
    Runs the fleet of workers.

    :param config: the gateway config (a :class:`GatewayConfig`, a full mapping, or just
        the ``cluster`` section as in the spec's examples).
    :param logger: a ``twisted.logger.Logger`` for lifecycle lines (optional).
    :param worker_script: a Python script that each worker runs (it builds a ``Gateway``
        and calls ``listen()``, which serves on the inherited socket because
        ``CLUSTER_WORKER=true``); ``None`` runs the built-in worker, which serves the
        config itself.
    :param reactor: the reactor (defaults to the global one).
    :param script_args: extra arguments for ``worker_script``.
    :param config_loader: called on SIGHUP to re-read the config; returns a new
        :class:`GatewayConfig` or raises :class:`ConfigError`.
    :param metrics: an object with ``set_workers``, ``worker_restarted``,
        ``worker_crashed`` and ``worker_exited`` (see :mod:`bungate.ops.metrics`), or
        ``None``.
    :param on_line: where worker output lines go: ``on_line(worker_id, fd, line)``;
        the default writes them to this process's stdout.
    :param extra_env: variables every worker gets.
    :param validate: ``validate(config, names)`` checks a config before it is accepted
        (raises :class:`ConfigError`); the default checks its certificate and CA files.
    :param spawn: ``spawn(slot)`` starts a process for a slot and returns its transport;
        the default is a :class:`~bungate.master.spawn.Spawner` over this fleet's sockets.
    :param output: where the workers' own log lines are written (default: stdout).
    """

    def __init__(
        self,
        config: Union[GatewayConfig, Mapping[str, Any], ClusterConfig],
        logger: Optional[Logger] = None,
        worker_script: Optional[str] = None,
        *,
        reactor: Any = None,
        script_args: Optional[list[str]] = None,
        config_loader: Optional[Callable[[], GatewayConfig]] = None,
        metrics: Any = None,
        on_line: Optional[Callable[[int, int, bytes], None]] = None,
        extra_env: Optional[Mapping[str, str]] = None,
        validate: Optional[Validate] = None,
        spawn: Optional[Callable[[WorkerSlot], Any]] = None,
        output: Optional[IO[str]] = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self.reactor = reactor
        self.config = _as_gateway_config(config)
        self.log = logger or _log
        self.config_loader = config_loader
        self.metrics = metrics
        self.on_line = on_line or WorkerOutput(self.log, output)
        self.validate: Validate = validate or check_certificate_files
        self.events = FleetEvents(self.log, metrics)
        self.listeners = Listeners()
        self.certificates = CertificateCopies()
        self.spawner = Spawner(
            reactor,
            self.listeners,
            python=self._resolve_python(self.config.cluster.python),
            worker_script=worker_script,
            script_args=list(script_args or []),
            allowed_env=self.config.cluster.allowed_env,
            extra_env=extra_env or {},
            on_line=lambda slot, fd, line: self.on_line(slot.id, fd, line),
        )
        self.spawner.on_booting = self.certificates.booting
        self.spawn = spawn or self.spawner
        self.slots: dict[int, WorkerSlot] = {}
        self.desired = self.config.cluster.workers
        self._next_id = 1
        self._lock = defer.DeferredLock()
        self._monitor: Optional[task.LoopingCall] = None
        self._stopping: Optional[Once[None]] = None
        self._roll_again = False
        self._rolling = False
        self._accepted = False
        self.started = False
        events = self.events
        events.listen("worker-state", lambda **_: self._share_fleet())
        events.listen("worker-failed", lambda **_: self._share_fleet())
        events.listen("worker-exit", self._exited)
        events.listen("worker-ready", lambda worker_id, **_: self.certificates.booted(worker_id))

    @property
    def address(self) -> Optional[tuple[str, int]]:
        """``(host, port)`` of the main listener, once started."""
        return self.listeners.address

    @property
    def stopping(self) -> bool:
        """Whether :meth:`stop` was called."""
        return self._stopping is not None

    # --- events -----------------------------------------------------------------------

    def on(self, event: str, callback: Callable[..., Any]) -> None:
        """
        Call ``callback`` on a lifecycle event.

        ``worker-exit`` callbacks get ``(worker_id, code, signal)``; ``worker-spawn`` and
        ``worker-ready`` get ``(worker_id,)``; ``worker-failed`` gets ``(worker_id,
        reason)``; every other event gets its fields as keyword arguments.

        :raises ValueError: for an event name the fleet never emits.
        """
        self.events.on(event, callback)

    def _emit(self, event: str, **fields: Any) -> None:
        self.events.emit(event, **fields)

    def _exited(self, worker_id: int, **_: Any) -> None:
        self.spawner.accept.release(worker_id)
        # A worker reads its files before it reports READY: once gone, it needs them no more.
        self.certificates.booted(worker_id)

    # --- start ------------------------------------------------------------------------

    def start(self) -> defer.Deferred[None]:
        """
        Bind the listeners and start the fleet.

        Fires once every initial worker is running or has failed; fails with
        :class:`ClusterError` if none became ready, or if the config was not accepted
        yet (see :meth:`accept_config`) and is refused now.
        """
        try:
            if not self._accepted:
                self.accept_config(self.config)
            self.listeners.bind(self.config)
        except (OSError, ConfigError) as e:
            return defer.fail(ClusterError(str(e)))
        address = self.listeners.address
        assert address is not None
        self.log.info(
            "Master (pid {pid}) listening on {host}:{port}",
            pid=os.getpid(),
            host=address[0],
            port=address[1],
        )
        self.started = True
        slots = [self._new_slot() for _ in range(self.desired)]
        for slot in slots:
            slot.start()
        self._monitor = task.LoopingCall(self._check_heartbeats)
        self._monitor.clock = self.reactor
        self._monitor.start(self.config.cluster.heartbeat_interval, now=False)

        def check(results: list[bool]) -> None:
            if not any(results):
                raise ClusterError(
                    "no worker became ready; see the worker output above for the reason"
                )
            self.log.info(
                "Fleet ready: {running} of {desired} worker(s) running",
                running=sum(1 for r in results if r),
                desired=self.desired,
            )

        return defer.gatherResults([s.when_ready() for s in slots]).addCallback(check)

    def _resolve_python(self, python: Optional[str]) -> str:
        if not python:
            return sys.executable
        found = shutil.which(python)
        if found is None:
            raise ConfigError(
                self.config.source, "cluster.python", f"{python!r} was not found on PATH"
            )
        return found

    def _new_slot(self) -> WorkerSlot:
        slot = WorkerSlot(self._next_id, self.config.cluster, self.reactor, self.spawn, self._emit)
        self._next_id += 1
        self.slots[slot.id] = slot
        return slot

    # --- supervision ------------------------------------------------------------------

    def _check_heartbeats(self) -> None:
        now = self.reactor.seconds()
        limit = self.config.cluster.heartbeat_timeout
        for slot in list(self.slots.values()):
            if slot.serving and now - slot.last_seen > limit:
                self._emit(
                    "worker-hung", worker_id=slot.id, pid=slot.pid, silent=now - slot.last_seen
                )
                slot.kill("hung")
        self._prune()

    def _prune(self) -> None:
        for wid in [w for w, s in self.slots.items() if s.status is SlotState.STOPPED]:
            del self.slots[wid]

    def _share_fleet(self) -> None:
        counts: dict[str, int] = {}
        for slot in self.slots.values():
            state = slot.status.value
            counts[state] = counts.get(state, 0) + 1
        if self.metrics is not None:
            self.metrics.set_workers(counts)
        running = counts.get(SlotState.RUNNING.value, 0)
        for slot in self.slots.values():
            if slot.control is not None and slot.serving:
                slot.control.send(FLEET, running=running, desired=self.desired)

    # --- the spec's API ---------------------------------------------------------------

    def worker_count(self) -> int:
        """Workers that are starting, running or respawning (not stopping or gone)."""
        return sum(1 for s in self.slots.values() if s.live)

    def worker_info(self) -> list[dict[str, Any]]:
        """
        One dict per slot: id, pid, restarts, status, started_at (epoch seconds),
        last_exit, and requests: how many its current process has received (``None``
        before the process maps the shared table, or without one).
        """
        offset = time.time() - self.reactor.seconds()
        counted = {w["pid"]: w["requests"] for w in self.spawner.accept.workers()}
        out = []
        for slot in sorted(self.slots.values(), key=lambda s: s.id):
            info = slot.info()
            if info["started_at"] is not None:
                info["started_at"] += offset
            info["requests"] = counted.get(info["pid"])
            out.append(info)
        return out

    def accept_counts(self) -> dict[int, int]:
        """
        Open client connections per live worker, as the workers publish them for fair
        accepting (:mod:`bungate.accept_table`); -1 while one does not accept.
        """
        accept = self.spawner.accept
        if accept.table is None:
            return {}
        counts = {w["id"]: w["connections"] for w in accept.workers()}
        return {wid: counts.get(wid, -1) for wid in accept.ids()}

    def broadcast_signal(self, sig: Union[int, str]) -> int:
        """Send a signal to every live worker; returns how many got it."""
        number = signal_number(sig)
        return sum(1 for s in list(self.slots.values()) if s.signal(number))

    def send_signal_to_worker(self, worker_id: int, sig: Union[int, str]) -> bool:
        """Send a signal to one worker; ``False`` if it has no live process."""
        slot = self.slots.get(worker_id)
        return bool(slot is not None and slot.signal(signal_number(sig)))

    def scale_up(self, n: int = 1) -> defer.Deferred[list[int]]:
        """Add ``n`` workers; fires with the ids that became ready."""
        return self._lock.run(self._scale_up, n)

    def scale_down(self, n: int = 1) -> defer.Deferred[list[int]]:
        """Drain and stop ``n`` workers (newest first); fires with their ids once gone."""
        return self._lock.run(self._scale_down, n)

    def scale_to(self, n: int) -> defer.Deferred[list[int]]:
        """Grow or shrink the fleet to ``n`` workers."""
        if n < 0:
            raise ValueError("a fleet cannot have fewer than 0 workers")

        def go() -> defer.Deferred[list[int]]:
            current = self.worker_count()
            if n > current:
                return self._scale_up(n - current)
            return self._scale_down(current - n)

        return self._lock.run(go)

    @defer.inlineCallbacks
    def _scale_up(self, n: int) -> Any:
        if n <= 0 or self._stopping is not None:
            return []
        old = self.worker_count()
        self.desired = old + n
        slots = [self._new_slot() for _ in range(n)]
        for slot in slots:
            slot.start()
        self._emit("scaled", old=old, new=old + n)
        results = yield defer.gatherResults([s.when_ready() for s in slots])
        return [s.id for s, ok in zip(slots, results) if ok]

    @defer.inlineCallbacks
    def _scale_down(self, n: int) -> Any:
        live = sorted(
            (s for s in self.slots.values() if s.live),
            key=lambda s: (s.serving, -s.id),
        )
        victims = live[: max(0, n)]
        if not victims:
            return []
        old = self.worker_count()
        self.desired = max(0, old - len(victims))
        self._emit("scaled", old=old, new=old - len(victims))
        for slot in victims:
            slot.stop()
        yield defer.gatherResults([s.when_ended() for s in victims])
        self._prune()
        return [s.id for s in victims]

    def rolling_restart(self) -> defer.Deferred[bool]:
        """
        Replace every worker, one at a time: start a replacement, wait until it is
        ready, then drain and stop an old worker. If a replacement does not become
        ready, the roll stops and the remaining old workers keep serving.

        Fires ``True`` when the roll completed, ``False`` when it was aborted. A roll
        requested while one runs is queued (one more roll runs afterwards).
        """
        if self._rolling:
            self._roll_again = True
            self.log.info("Rolling restart already in progress: another one will follow")
            return defer.succeed(True)
        return self._lock.run(self._roll)

    @defer.inlineCallbacks
    def _roll(self) -> Any:
        self._rolling = True
        try:
            while True:
                self._roll_again = False
                ok = yield self._roll_once()
                if not ok or not self._roll_again or self._stopping is not None:
                    return ok
        finally:
            self._rolling = False

    @defer.inlineCallbacks
    def _roll_once(self) -> Any:
        old = sorted((s for s in self.slots.values() if s.live), key=lambda s: s.id)
        self._emit("roll-start", count=len(old))
        for slot in old:
            if self._stopping is not None:
                return False
            if not slot.live:
                continue
            fresh = self._new_slot()
            fresh.start()
            ready = yield fresh.when_ready()
            if not ready:
                reason = f"replacement worker {fresh.id} did not become ready ({fresh.status})"
                yield self._stop_slots([fresh])
                self._emit("roll-aborted", reason=reason)
                return False
            self._emit("roll-step", new_id=fresh.id, old_id=slot.id)
            yield self._stop_slots([slot])
        self._emit("roll-done", count=len(old))
        return True

    def _stop_slots(self, slots: list[WorkerSlot]) -> defer.Deferred[Any]:
        for slot in slots:
            slot.stop()
        d = defer.gatherResults([s.when_ended() for s in slots])

        def pruned(result: Any) -> Any:
            self._prune()
            return result

        return d.addCallback(pruned)

    def reload(self) -> defer.Deferred[bool]:
        """
        Re-read the config (SIGHUP). A valid one becomes the workers' config through a
        rolling restart; an invalid one is logged and the fleet keeps the old one.
        """
        if self.config_loader is None:
            self.log.info("Reload requested: no config file, rolling the workers")
            return self.rolling_restart()
        try:
            config = self.config_loader()
            self._check_reloadable(config)
            self.accept_config(config)
        except Exception as e:
            self._emit("reload-refused", error=str(e))
            return defer.succeed(False)
        self._emit("reload-ok", source=config.source)
        d = self.rolling_restart()

        def resize(ok: bool) -> Any:
            if config.cluster.workers != self.worker_count():
                return self.scale_to(config.cluster.workers).addCallback(lambda _: ok)
            return ok

        return d.addCallback(resize)

    def _check_reloadable(self, config: GatewayConfig) -> None:
        old = self.config.server
        new = config.server
        if (old.host, old.port) != (new.host, new.port):
            raise ConfigError(
                config.source,
                "server.port",
                "the listening address cannot change on reload (restart the master)",
            )

    # --- the accepted config ----------------------------------------------------------

    def accept_config(self, config: GatewayConfig) -> None:
        """
        Check ``config`` and make it the one every worker started from now on gets.

        The certificate, key and CA files it names are copied into a private directory
        (:class:`~bungate.master.certificates.CertificateCopies`) and :attr:`validate`
        checks the config that points at the copies, i.e. the very bytes workers will
        load. A file overwritten later on disk therefore reaches no worker (a respawned
        one included) until a reload accepts it.

        :raises ConfigError: when the config is refused (naming the operator's files);
            the current config and its copies stay as they were.
        """
        worker_config = self.certificates.accept(config, self.validate)
        # The built-in worker serves the config it is sent; a worker that runs the
        # user's script builds its own (and may hold Python callables JSON cannot carry).
        config_json = to_json(worker_config) if self.spawner.worker_script is None else None
        self.config = config
        self.spawner.config_json = config_json
        self.spawner.names = self.certificates.names
        self._accepted = True

    # --- stop -------------------------------------------------------------------------

    def stop(self) -> defer.Deferred[None]:
        """
        Drain and stop every worker (SIGKILL after ``shutdown_timeout``), then close
        the listeners. Safe to call more than once.
        """
        if self._stopping is not None:
            return self._stopping.wait()
        stopping = self._stopping = Once()
        if self._monitor is not None and self._monitor.running:
            self._monitor.stop()
        slots = list(self.slots.values())
        self.log.info("Stopping {count} worker(s)", count=sum(1 for s in slots if s.alive))
        for slot in slots:
            slot.stop()

        def closed(_: Any) -> None:
            self.listeners.close()
            self._prune()
            self.certificates.remove_all()
            self.spawner.accept.close()
            self.log.info("All workers stopped")
            stopping.fire(None)

        defer.gatherResults([s.when_ended() for s in slots]).addCallback(closed)
        return stopping.wait()
