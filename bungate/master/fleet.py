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
import random
import shutil
import signal
import sys
import time
from collections.abc import Mapping
from typing import IO, Any, Callable, Optional, Union

import attrs
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from bungate._once import Once
from bungate.config import ClusterConfig, ConfigError, GatewayConfig, parse_config
from bungate.master.certificates import CertificateCopies, Validate
from bungate.master.events import FleetEvents
from bungate.master.exits import signal_number
from bungate.master.listeners import Listeners
from bungate.master.reload import ConfigFlow
from bungate.master.roll import Rolling
from bungate.master.slot import SlotState, WorkerSlot
from bungate.master.spawn import Spawner, WorkerOutput
from bungate.ops.procfs import ProcessUsage, usage
from bungate.ops.tlsfiles import check_tls, check_upstream_tls
from bungate.wire import FLEET

__all__ = ["EXIT_FLEET_FAILED", "ClusterError", "ClusterManager"]

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


#: The exit status of a master whose every worker slot failed (gunicorn's "worker failed
#: to boot" status too), so a supervisor restarts it.
EXIT_FLEET_FAILED = 3


class ClusterManager(Rolling, ConfigFlow):
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
    :param validate: ``validate(config, names)`` checks a config before it is taken
        (raises :class:`ConfigError`, or returns a Deferred failing with one); the
        default checks its certificate and CA files.
    :param spawn: ``spawn(slot)`` starts a process for a slot and returns its transport;
        the default is a :class:`~bungate.master.spawn.Spawner` over this fleet's sockets.
    :param output: where the workers' own log lines are written (default: stdout).
    :param on_fatal: called with an exit status when the fleet cannot serve any more
        (every slot failed, ``cluster.on_all_failed: exit``).
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
        on_fatal: Optional[Callable[[int], None]] = None,
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
        self.on_fatal = on_fatal
        #: ``{config key: how it is pinned}`` for the command-line overrides (for the log).
        self.pinned: Mapping[str, str] = {}
        self.events = FleetEvents(self.log, metrics)
        self.listeners = Listeners()
        self.certificates = CertificateCopies()
        self.spawner = Spawner(
            reactor,
            self.listeners,
            python=self._resolve_python(self.config),
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
        self._slot_config = self.config.cluster  # what new slots are made with
        self._next_id = 1
        self._lock = defer.DeferredLock()
        self._monitor: Optional[task.LoopingCall] = None
        self._stopping: Optional[Once[None]] = None
        self._roll_again = False
        self._rolling = False
        self._reload_again = False
        self._reloading = False
        self._accepted = False
        self._accepted_at = 0.0
        #: workers that had to be killed because they did not stop in time.
        self.killed_on_stop = 0
        #: reads what a worker process uses (``/proc``); replaced in tests.
        self.read_usage: Callable[[int], Optional[ProcessUsage]] = usage
        self._recycling: Optional[defer.Deferred[Any]] = None
        self._recycle_after = 0.0  # no recycling before (a replacement failed to boot)
        self._request_limits: dict[int, int] = {}  # pid -> its max_requests with jitter
        events = self.events
        events.listen("worker-state", lambda **_: self._share_fleet())
        events.listen("worker-failed", self._failed)
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

    def _failed(self, worker_id: int, **_: Any) -> None:
        self._share_fleet()
        if self._stopping is not None or not self.started:
            return
        slots = list(self.slots.values())
        if not slots or any(s.status is not SlotState.FAILED for s in slots):
            return
        if self._slot_config.on_all_failed == "retry":
            delay = self._slot_config.max_restart_delay
            self.log.critical(
                "Every worker slot has failed; trying them again in {delay:g}s "
                "(cluster.on_all_failed: retry)",
                delay=delay,
            )
            self.reactor.callLater(delay, self._revive)
            return
        self.log.critical(
            "Every worker slot has failed: closing the listeners and exiting with status "
            "{code}, for the supervisor to restart the gateway (cluster.on_all_failed: exit)",
            code=EXIT_FLEET_FAILED,
        )
        self.listeners.close()
        if self.on_fatal is not None:
            self.on_fatal(EXIT_FLEET_FAILED)

    def _revive(self) -> None:
        if self._stopping is not None:
            return
        for wid, slot in list(self.slots.items()):
            if slot.status is SlotState.FAILED:
                fresh = WorkerSlot(wid, self._slot_config, self.reactor, self.spawn, self._emit)
                self.slots[wid] = fresh
                fresh.start()

    # --- start ------------------------------------------------------------------------

    started = False

    def start(self) -> defer.Deferred[None]:
        """
        Accept the config (if :meth:`accept_config` was not called), bind the listeners
        and start the fleet.

        Fires once every initial worker is running or has failed; fails with
        :class:`ConfigError` if the config is refused, with :class:`ClusterError` if a
        port cannot be bound or no worker became ready.
        """
        if self._accepted:
            accepted: defer.Deferred[None] = defer.succeed(None)
        else:
            accepted = self.accept_config(self.config)

        def bind_and_spawn(_: None) -> defer.Deferred[None]:
            try:
                self.listeners.bind(self.config)
            except OSError as e:
                raise ClusterError(str(e)) from None
            return self._spawn_fleet()

        return accepted.addCallback(bind_and_spawn)

    def _spawn_fleet(self) -> defer.Deferred[None]:
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

    def _resolve_python(self, config: GatewayConfig) -> str:
        python = config.cluster.python
        if not python:
            return sys.executable
        found = shutil.which(python)
        if found is None:
            raise ConfigError(config.source, "cluster.python", f"{python!r} was not found on PATH")
        return found

    def _new_slot(self) -> WorkerSlot:
        slot = WorkerSlot(self._next_id, self._slot_config, self.reactor, self.spawn, self._emit)
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
        self._check_recycling()

    def _prune(self) -> None:
        for wid in [w for w, s in self.slots.items() if s.status is SlotState.STOPPED]:
            del self.slots[wid]

    def _share_fleet(self) -> None:
        counts: dict[str, int] = {}
        for slot in self.slots.values():
            state = slot.status.value
            if state != SlotState.STOPPED.value:  # a stopped slot is gone from the fleet
                counts[state] = counts.get(state, 0) + 1
        if self.metrics is not None:
            self.metrics.set_workers(counts, live=self.worker_count())
        running = counts.get(SlotState.RUNNING.value, 0)
        failed = counts.get(SlotState.FAILED.value, 0)
        for slot in self.slots.values():
            if slot.control is not None and slot.serving:
                slot.control.send(FLEET, running=running, desired=self.desired, failed=failed)

    # --- the spec's API ---------------------------------------------------------------

    def worker_count(self) -> int:
        """Workers that are starting, running or respawning (not stopping or gone)."""
        return sum(1 for s in self.slots.values() if s.live)

    def worker_info(self) -> list[dict[str, Any]]:
        """
        One dict per slot: id, pid, restarts, status, started_at (epoch seconds),
        last_exit; requests: how many its current process has received, and connections:
        the client connections it holds (-1 while it does not accept), both ``None``
        before the process maps the shared table, or without one; rss_bytes and
        cpu_seconds of its process (from ``/proc``; ``None`` without a process or where
        ``/proc`` cannot tell).
        """
        offset = time.time() - self.reactor.seconds()
        table = {w["pid"]: w for w in self.spawner.accept.workers()}
        out = []
        for slot in sorted(self.slots.values(), key=lambda s: s.id):
            info = slot.info()
            if info["started_at"] is not None:
                info["started_at"] += offset
            row = table.get(info["pid"])
            info["requests"] = None if row is None else row["requests"]
            info["connections"] = None if row is None else row["connections"]
            used = self.read_usage(slot.pid) if slot.pid is not None and slot.alive else None
            info["rss_bytes"] = None if used is None else used.rss_bytes
            info["cpu_seconds"] = None if used is None else used.cpu_seconds
            out.append(info)
        return out

    def processes(self) -> dict[str, int]:
        """``{worker id: pid}`` of every worker process that may be running."""
        return {
            str(slot.id): slot.pid
            for slot in self.slots.values()
            if slot.pid is not None and slot.alive
        }

    # --- for the control API: operations whose outcome the caller waits for ----------

    def roll_and_wait(self) -> defer.Deferred[bool]:
        """
        A rolling restart that starts after this call (behind one that runs, rather than
        merged into it as :meth:`rolling_restart` does); fires ``True`` once it completed,
        ``False`` if it was aborted.
        """
        return self._lock.run(self._roll)

    def reload_and_wait(self) -> defer.Deferred[bool]:
        """
        A reload that reads the config after this call (behind one that runs); fires
        ``True`` once the config is the fleet's, ``False`` if it was refused or aborted.
        """
        return self._lock.run(self._reloads)

    # --- recycling (cluster.max_requests, cluster.max_worker_rss) ---------------------

    def _recycle_reason(self, slot: WorkerSlot, served: Optional[int]) -> Optional[str]:
        cluster = self._slot_config
        pid = slot.pid
        assert pid is not None
        if cluster.max_requests and served is not None:
            limit = self._request_limits.get(pid)
            if limit is None:
                jitter = random.randint(0, cluster.max_requests_jitter)
                limit = self._request_limits[pid] = cluster.max_requests + jitter
            if served >= limit:
                extra = limit - cluster.max_requests
                jittered = f" + jitter {extra}" if extra else ""
                return (
                    f"it received {served} requests "
                    f"(cluster.max_requests {cluster.max_requests}{jittered})"
                )
        if cluster.max_worker_rss:
            used = self.read_usage(pid)
            if used is not None and used.rss_bytes > cluster.max_worker_rss * 2**20:
                return (
                    f"its resident memory is {used.rss_bytes / 2**20:.1f} MiB "
                    f"(cluster.max_worker_rss {cluster.max_worker_rss} MiB)"
                )
        return None

    def _check_recycling(self) -> None:
        """On the heartbeat tick: replace one worker past its limits (one at a time)."""
        cluster = self._slot_config
        if not (cluster.max_requests or cluster.max_worker_rss):
            return
        if self._stopping is not None or self._recycling is not None:
            return
        if self.reactor.seconds() < self._recycle_after:
            return
        counted = {w["pid"]: w["requests"] for w in self.spawner.accept.workers()}
        live = {s.pid for s in self.slots.values() if s.pid is not None and s.alive}
        for pid in [p for p in self._request_limits if p not in live]:
            del self._request_limits[pid]
        for slot in sorted(self.slots.values(), key=lambda s: s.id):
            if not slot.serving or slot.pid is None:
                continue
            reason = self._recycle_reason(slot, counted.get(slot.pid))
            if reason is None:
                continue
            recycling = self._recycling = self._lock.run(self._recycle, slot, reason)

            def done(result: Any) -> None:
                self._recycling = None
                if isinstance(result, Failure):
                    self.log.failure("Recycling a worker failed", result)

            recycling.addBoth(done)
            return

    @defer.inlineCallbacks
    def _recycle(self, slot: WorkerSlot, reason: str) -> Any:
        """Surge-first: start the replacement, wait until it is ready, then drain ``slot``."""
        if self._stopping is not None or not slot.serving:
            return False
        self.log.info(
            "Recycling worker {worker_id} (pid {pid}): {reason}; starting its replacement",
            worker_id=slot.id,
            pid=slot.pid,
            reason=reason,
        )
        fresh = self._new_slot()
        fresh.start()
        ready = yield fresh.when_ready()
        if self._stopping is not None:
            return False
        if not ready:
            delay = self._slot_config.max_restart_delay
            self._recycle_after = self.reactor.seconds() + delay
            self.log.error(
                "Recycling worker {worker_id}: its replacement {new_id} did not become "
                "ready ({status}); worker {worker_id} keeps serving, next try in {delay:g}s",
                worker_id=slot.id,
                new_id=fresh.id,
                status=fresh.status.value,
                delay=delay,
            )
            yield self._stop_slots([fresh])
            return False
        self.log.info(
            "Recycling: worker {new_id} is ready, stopping worker {worker_id}",
            new_id=fresh.id,
            worker_id=slot.id,
        )
        yield self._stop_slots([slot])
        return True

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

    # --- stop -------------------------------------------------------------------------

    def stop(self) -> defer.Deferred[None]:
        """
        Stop accepting at once (the listening sockets close: new clients are refused
        and fail over), drain every worker (SIGKILL after ``shutdown_timeout``), then
        fire. Safe to call more than once; :attr:`killed_on_stop` then says how many
        workers had to be killed.
        """
        if self._stopping is not None:
            return self._stopping.wait()
        stopping = self._stopping = Once()
        if self._monitor is not None and self._monitor.running:
            self._monitor.stop()
        self.listeners.close()
        slots = list(self.slots.values())
        self.log.info("Stopping {count} worker(s)", count=sum(1 for s in slots if s.alive))
        for slot in slots:
            slot.stop()

        def closed(_: Any) -> None:
            self.killed_on_stop = sum(1 for s in slots if s.kill_reason == "stop-timeout")
            self._prune()
            self.certificates.remove_all()
            self.spawner.accept.close()
            if self.killed_on_stop:
                self.log.warn(
                    "All workers stopped; {count} of them had to be killed after "
                    "shutdown_timeout ({timeout:g}s)",
                    count=self.killed_on_stop,
                    timeout=self.config.cluster.shutdown_timeout,
                )
            else:
                self.log.info("All workers stopped")
            stopping.fire(None)

        defer.gatherResults([s.when_ended() for s in slots]).addCallback(closed)
        return stopping.wait()

    def stop_now(self) -> None:
        """
        Stop at once (SIGQUIT, or a second SIGTERM): every worker is told to exit without
        draining (SIGQUIT), and killed if still there two seconds later.
        """
        d = self.stop()
        slots = [s for s in self.slots.values() if s.alive]
        self.log.warn("Stopping at once: {count} worker(s) exit without draining", count=len(slots))
        for slot in slots:
            slot.signal(signal.SIGQUIT)
        def kill_left() -> None:
            for slot in slots:
                slot.kill("stop-timeout")

        kill = self.reactor.callLater(2.0, kill_left)

        def done(result: Any) -> Any:
            if kill.active():
                kill.cancel()
            return result

        d.addBoth(done)
