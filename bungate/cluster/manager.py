"""
The cluster master: binds the listeners once, runs and supervises the fleet.

:class:`ClusterManager` owns the listening sockets for its whole life and starts each
worker with ``reactor.spawnProcess``, passing the sockets and a control socketpair as
``childFDs``. It scales the fleet, rolls it (surge-first, readiness-gated), reloads the
config, answers signals and stops it with a drain. It never parses a request.

Workers load their certificate, key and CA files from the master's private copies, made
when the master accepts a config (:meth:`ClusterManager.accept_config`), so a file that
changes on disk reaches no worker until a reload accepts it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Mapping
from typing import IO, Any, Callable, Optional, Union

from twisted.internet import defer, task
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver

from bungate._once import Once
from bungate.cluster.accept import ENV_VAR as ACCEPT_ENV
from bungate.cluster.accept import AcceptTable
from bungate.cluster.process import WorkerProtocol, WorkerSlot, signal_number
from bungate.cluster.sockets import bind_listener
from bungate.config import ClusterConfig, ConfigError, GatewayConfig, parse_config

__all__ = ["ClusterError", "ClusterManager"]

#: The nursery PyPy workers get unless ``PYPY_GC_NURSERY`` is set (see ``_worker_env``).
PYPY_GC_NURSERY = "8MB"

_log = Logger(namespace="bungate.master")

# Lifecycle events and the log line (and level) each one produces.
_EVENT_LOG: dict[str, tuple[str, str]] = {
    "worker-spawn": ("info", "Worker {worker_id} spawned (pid {pid}, restarts {restarts})"),
    "worker-ready": ("info", "Worker {worker_id} ready (pid {pid})"),
    "worker-stopping": ("info", "Worker {worker_id} stopping (pid {pid}): draining"),
    "worker-exit": ("info", "Worker {worker_id} exited (pid {pid}): {kind}, {description}"),
    "worker-respawn": (
        "warn",
        "Worker {worker_id} will respawn in {delay:.2f}s after a {kind} (restart {restarts})",
    ),
    "worker-failed": ("error", "Worker {worker_id} failed, not respawning: {reason}"),
    "worker-hung": (
        "error",
        "Worker {worker_id} (pid {pid}) sent no heartbeat for {silent:.1f}s: killing it",
    ),
    "scaled": ("info", "Fleet scaled from {old} to {new} workers"),
    "roll-start": ("info", "Rolling restart started: {count} worker(s) to replace"),
    "roll-step": ("info", "Rolling restart: worker {new_id} is ready, stopping worker {old_id}"),
    "roll-done": ("info", "Rolling restart done: {count} worker(s) replaced"),
    "roll-aborted": ("error", "Rolling restart aborted: {reason}; old workers keep serving"),
    "reload-ok": ("info", "Configuration reloaded from {source}"),
    "reload-refused": ("error", "Configuration reload refused, still serving the old one: {error}"),
}


class ClusterError(RuntimeError):
    """The fleet could not be started (no worker became ready, a port could not be bound)."""


class _MasterControl(LineOnlyReceiver):
    """The master's end of one worker's control channel."""

    delimiter = b"\n"
    MAX_LENGTH = 1 << 20

    def __init__(self, slot: WorkerSlot, manager: ClusterManager) -> None:
        self.slot = slot
        self.manager = manager

    def lineReceived(self, line: bytes) -> None:
        try:
            message = json.loads(line)
            kind = message.get("t")
        except (ValueError, AttributeError):
            return
        if kind == "heartbeat":
            self.slot.heartbeat()
        elif kind == "ready":
            self.slot.process_ready()
        elif kind == "draining":
            self.slot.heartbeat()

    def send(self, kind: str, **fields: Any) -> None:
        if self.transport is not None and self.connected:
            fields["t"] = kind
            self.sendLine(json.dumps(fields, separators=(",", ":")).encode())

    def close(self) -> None:
        transport: Any = self.transport
        if transport is not None:
            transport.loseConnection()


def _as_gateway_config(config: Any) -> GatewayConfig:
    if isinstance(config, GatewayConfig):
        return config
    if isinstance(config, ClusterConfig):
        import attrs

        return attrs.evolve(GatewayConfig(), cluster=config)
    if isinstance(config, Mapping):
        if config and not ({"server", "cluster", "routes"} & set(config)):
            config = {"cluster": dict(config)}  # the spec passes the cluster section alone
        return parse_config(config)
    raise TypeError(f"expected a config mapping or GatewayConfig, got {type(config).__name__}")


def _check_certificate_files(config: GatewayConfig) -> None:
    from bungate.tls import check_tls, check_upstream_tls

    check_tls(config.server.tls, config.source)
    check_upstream_tls(config.routes, config.source)


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
        ``worker_crashed`` and ``worker_exited`` (see :mod:`bungate.metrics`), or ``None``.
    :param on_line: where worker output lines go: ``on_line(worker_id, fd, line)``;
        the default writes them to this process's stdout.
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
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self.reactor = reactor
        self.config = _as_gateway_config(config)
        self.log = logger or _log
        self.worker_script = worker_script
        self.script_args = list(script_args or [])
        self.config_loader = config_loader
        self.metrics = metrics
        self.on_line = on_line or self._write_line
        self.extra_env = dict(extra_env or {})
        self.slots: dict[int, WorkerSlot] = {}
        self.listeners: dict[str, socket.socket] = {}
        self.address: Optional[tuple[str, int]] = None
        self.desired = self.config.cluster.workers
        self._next_id = 1
        self._handlers: dict[str, list[Callable[..., Any]]] = {}
        self._lock = defer.DeferredLock()
        self._monitor: Optional[task.LoopingCall] = None
        self._stopping: Optional[Once[None]] = None
        self._roll_again = False
        self._rolling = False
        self._previous_signals: dict[int, Any] = {}
        self._python = self._resolve_python(self.config.cluster.python)
        self.started = False
        # What workers are started with: self.config pointing at the private copies of
        # its certificate files (None until a config has been accepted).
        self._worker_config: Optional[GatewayConfig] = None
        self._generation = 0  # how many configs were accepted
        self._copies_dir: Optional[str] = None  # the private directory of this run
        # generation -> (its subdirectory, {copy: original})
        self._copies: dict[int, tuple[str, dict[str, str]]] = {}
        self._booting: dict[int, int] = {}  # slot id -> generation its process started with
        # Connection counts shared with the workers (bungate.cluster.accept), made at the
        # first spawn; slot id -> the table slot of its live process.
        self._accept: Optional[tuple[AcceptTable, IO[bytes]]] = None
        self._accept_slots: dict[int, int] = {}

    # --- events -----------------------------------------------------------------------

    def on(self, event: str, callback: Callable[..., Any]) -> None:
        """
        Call ``callback`` on a lifecycle event.

        ``worker-exit`` callbacks get ``(worker_id, code, signal)``; ``worker-spawn`` and
        ``worker-ready`` get ``(worker_id,)``; ``worker-failed`` gets ``(worker_id,
        reason)``; every other event gets its fields as keyword arguments.
        """
        self._handlers.setdefault(event, []).append(callback)

    def _emit(self, event: str, **fields: Any) -> None:
        spec = _EVENT_LOG.get(event)
        if spec is not None:
            level, text = spec
            getattr(self.log, level)(text, event=event, **fields)
        if event == "worker-exit" and self.metrics is not None:
            if fields.get("pid") is not None:
                self.metrics.worker_exited(fields["pid"])
            if fields.get("kind") in ("crash", "hung", "boot-failure"):
                self.metrics.worker_crashed(fields["worker_id"])
        if event == "worker-respawn" and self.metrics is not None:
            self.metrics.worker_restarted(fields["worker_id"])
        if event in ("worker-state", "worker-failed"):
            self._share_fleet()
        if event == "worker-exit":
            self._release_accept_slot(fields["worker_id"])
        if event in ("worker-ready", "worker-exit"):
            # A worker reads its files before it reports READY: once ready (or gone),
            # it needs them no more.
            self._booting.pop(fields["worker_id"], None)
            self._prune_copies()
        for callback in list(self._handlers.get(event, ())):
            try:
                if event == "worker-exit":
                    callback(fields["worker_id"], fields["code"], fields["signal"])
                elif event in ("worker-spawn", "worker-ready"):
                    callback(fields["worker_id"])
                elif event == "worker-failed":
                    callback(fields["worker_id"], fields["reason"])
                else:
                    callback(**fields)
            except Exception:
                self.log.failure("Error in a {event} callback", event=event)

    # --- start ------------------------------------------------------------------------

    def start(self) -> defer.Deferred[None]:
        """
        Bind the listeners and start the fleet.

        Fires once every initial worker is running or has failed; fails with
        :class:`ClusterError` if none became ready, or if the config was not accepted
        yet (see :meth:`accept_config`) and is refused now.
        """
        try:
            if self._worker_config is None:
                self.accept_config(self.config)
            self._bind()
        except (OSError, ConfigError) as e:
            return defer.fail(ClusterError(str(e)))
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

    def _bind(self) -> None:
        server = self.config.server
        wanted: list[tuple[str, str, str, int]] = [
            ("main", "server.port", server.host, server.port)
        ]
        redirect = server.tls.redirect_http if server.tls.enabled else None
        if redirect is not None:
            wanted.append(("redirect", "server.tls.redirect_http.port", server.host, redirect.port))
        listen = self.config.metrics.listen if self.config.metrics.enabled else None
        if listen is not None:
            wanted.append(("metrics", "metrics.listen", listen[0], listen[1]))
        for name, key, host, port in wanted:
            if name in self.listeners:
                continue
            try:
                self.listeners[name] = bind_listener(host, port, server.backlog)
            except OSError as e:
                for sock in self.listeners.values():
                    sock.close()
                self.listeners.clear()
                raise OSError(
                    f"cannot listen on {host}:{port} ({key}): {e.strerror or e}"
                ) from None
        main = self.listeners["main"]
        self.address = main.getsockname()[:2]
        self.log.info(
            "Master (pid {pid}) listening on {host}:{port}",
            pid=os.getpid(),
            host=self.address[0],
            port=self.address[1],
        )

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
        slot = WorkerSlot(self._next_id, self.config.cluster, self.reactor, self._spawn, self._emit)
        self._next_id += 1
        self.slots[slot.id] = slot
        return slot

    def _worker_env(self, slot: WorkerSlot) -> dict[str, str]:
        allowed = self.config.cluster.allowed_env
        if allowed is None:
            env = dict(os.environ)
        else:
            env = {k: v for k, v in os.environ.items() if k in allowed}
            for k, v in os.environ.items():
                if k.startswith(("BUNGATE_", "PROMETHEUS_MULTIPROC_DIR")):
                    env[k] = v
        env.update(self.extra_env)
        # PyPy's GC sizes its nursery from the L2 cache: 1 MB on a typical VM core. A proxy
        # allocates fast, and such a small nursery promotes much of it to the old
        # generation: bench/run measured a PyPy worker at 8 MB 40 % faster, at the same RSS.
        # The operator's own value wins; CPython ignores the variable.
        env.setdefault("PYPY_GC_NURSERY", PYPY_GC_NURSERY)
        fds = {name: 5 + i for i, name in enumerate(n for n in self.listeners if n != "main")}
        env.update(
            CLUSTER_WORKER="true",
            CLUSTER_WORKER_ID=str(slot.id),
            BUNGATE_MASTER_PID=str(os.getpid()),
            BUNGATE_CONFIG=json.dumps(self._config_for_workers().raw, default=str),
            BUNGATE_CONFIG_SOURCE=self.config.source,
            BUNGATE_FDS=",".join(f"{n}={fd}" for n, fd in fds.items()),
        )
        copies = self._copies.get(self._generation)
        if copies is not None:
            env["BUNGATE_TLS_COPIES"] = json.dumps(copies[1])
        else:
            env.pop("BUNGATE_TLS_COPIES", None)
        table_slot = self._accept_slots.get(slot.id)
        if table_slot is not None:
            env[ACCEPT_ENV] = f"{self._accept_fd()}:{table_slot}"
        else:
            env.pop(ACCEPT_ENV, None)
        return env

    def _accept_fd(self) -> int:
        """The descriptor number of the accept table in a worker: after the listeners."""
        return 4 + len(self.listeners)

    def _claim_accept_slot(self, slot: WorkerSlot) -> Optional[int]:
        self._release_accept_slot(slot.id)  # a respawn: its previous process is gone
        if self._accept is None:
            self._accept = AcceptTable.create()
        table_slot = self._accept[0].claim(slot.id)
        if table_slot is not None:
            self._accept_slots[slot.id] = table_slot
        return table_slot

    def accept_counts(self) -> dict[int, int]:
        """
        Open client connections per live worker, as the workers publish them for fair
        accepting (:mod:`bungate.cluster.accept`); -1 while one does not accept.
        """
        if self._accept is None:
            return {}
        counts = {w["id"]: w["connections"] for w in self._accept[0].workers()}
        return {wid: counts.get(wid, -1) for wid in sorted(self._accept_slots)}

    def _release_accept_slot(self, worker_id: int) -> None:
        table_slot = self._accept_slots.pop(worker_id, None)
        if table_slot is not None and self._accept is not None:
            self._accept[0].release(table_slot)

    def _config_for_workers(self) -> GatewayConfig:
        return self._worker_config if self._worker_config is not None else self.config

    def _spawn(self, slot: WorkerSlot) -> Any:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        child_fds: dict[int, Any] = {
            0: "w",
            1: "r",
            2: "r",
            3: self.listeners["main"].fileno(),
            4: theirs.fileno(),
        }
        extra = [n for n in self.listeners if n != "main"]
        for i, name in enumerate(extra):
            child_fds[5 + i] = self.listeners[name].fileno()
        if self._claim_accept_slot(slot) is not None and self._accept is not None:
            child_fds[self._accept_fd()] = self._accept[1].fileno()
        if self.worker_script is not None:
            args = [self._python, self.worker_script, *self.script_args]
        else:
            # The title is also an argument, so `pgrep -f "bungate worker"` finds workers
            # where setproctitle cannot rewrite the command line (PyPy).
            args = [self._python, "-m", "bungate.cluster", f"bungate worker {slot.id}"]
        protocol = WorkerProtocol(slot, self._line)
        self._booting[slot.id] = self._generation
        try:
            transport = self.reactor.spawnProcess(
                protocol, self._python, args, env=self._worker_env(slot), childFDs=child_fds
            )
        except BaseException:
            self._release_accept_slot(slot.id)
            raise
        finally:
            theirs.close()
        control = _MasterControl(slot, self)
        factory = Factory()
        factory.buildProtocol = lambda addr: control  # type: ignore[method-assign]
        self.reactor.adoptStreamConnection(ours.fileno(), socket.AF_UNIX, factory)
        ours.close()
        slot.control = control  # type: ignore[attr-defined]
        protocol.on_exit = control.close
        return transport

    # --- worker output ----------------------------------------------------------------

    def _line(self, slot: WorkerSlot, fd: int, line: bytes) -> None:
        self.on_line(slot.id, fd, line)

    def _write_line(self, worker_id: int, fd: int, line: bytes) -> None:
        # Our own log lines already name the worker; anything else (a traceback printed
        # before logging started, a stray print) is tagged here.
        head = line[:96]
        if head.startswith(b"{") or b"[worker " in head:
            from bungate import observe

            observe.write_line(line.decode("utf-8", "replace"))
            return
        text = line.decode("utf-8", "replace")
        if fd == 2:
            self.log.warn("[worker {worker_id}] {line}", worker_id=worker_id, line=text)
        else:
            self.log.info("[worker {worker_id}] {line}", worker_id=worker_id, line=text)

    # --- supervision ------------------------------------------------------------------

    def _check_heartbeats(self) -> None:
        now = self.reactor.seconds()
        limit = self.config.cluster.heartbeat_timeout
        for slot in list(self.slots.values()):
            if slot.status == "running" and now - slot.last_seen > limit:
                self._emit(
                    "worker-hung", worker_id=slot.id, pid=slot.pid, silent=now - slot.last_seen
                )
                slot.kill("hung")
        self._prune()

    def _prune(self) -> None:
        for wid in [w for w, s in self.slots.items() if s.status == "stopped"]:
            del self.slots[wid]

    def _share_fleet(self) -> None:
        counts: dict[str, int] = {}
        for slot in self.slots.values():
            counts[slot.status] = counts.get(slot.status, 0) + 1
        if self.metrics is not None:
            self.metrics.set_workers(counts)
        running = counts.get("running", 0)
        for slot in self.slots.values():
            control = getattr(slot, "control", None)
            if control is not None and slot.status == "running":
                control.send("fleet", running=running, desired=self.desired)

    # --- the spec's API ---------------------------------------------------------------

    def worker_count(self) -> int:
        """Workers that are starting, running or respawning (not stopping or gone)."""
        return sum(
            1 for s in self.slots.values() if s.status in ("starting", "running", "respawning")
        )

    def worker_info(self) -> list[dict[str, Any]]:
        """
        One dict per slot: id, pid, restarts, status, started_at (epoch seconds),
        last_exit, and requests: how many its current process has received (``None``
        before the process maps the shared table, or without one).
        """
        offset = time.time() - self.reactor.seconds()
        counted = {}
        if self._accept is not None:
            counted = {w["pid"]: w["requests"] for w in self._accept[0].workers()}
        out = []
        for slot in sorted(self.slots.values(), key=lambda s: s.id):
            info = slot.info()
            if info["started_at"] is not None:
                info["started_at"] += offset
            info["requests"] = counted.get(info["pid"])
            out.append(info)
        return out

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
            (s for s in self.slots.values() if s.status in ("starting", "running", "respawning")),
            key=lambda s: (s.status == "running", -s.id),
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
        old = sorted(
            (s for s in self.slots.values() if s.status in ("starting", "running", "respawning")),
            key=lambda s: s.id,
        )
        self._emit("roll-start", count=len(old))
        for slot in old:
            if self._stopping is not None:
                return False
            if slot.status not in ("starting", "running", "respawning"):
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

    validate_config: Optional[Callable[[GatewayConfig], None]] = None
    """
    Checks a config before it is accepted; raises :class:`ConfigError`. ``None`` checks
    the certificate, key and CA files only.
    """

    # --- the accepted config and its private copies of the certificate files ---------

    def accept_config(self, config: GatewayConfig) -> None:
        """
        Check ``config`` and make it the one every worker started from now on gets.

        The certificate, key and CA files it names (see
        :func:`bungate.tls.certificate_files`) are read once and copied into a new
        subdirectory of this run's private directory (``tempfile.mkdtemp``, mode 0700,
        files 0600); :attr:`validate_config` then checks the config that points at the
        copies, i.e. the very bytes workers will load. A file overwritten later on disk
        therefore reaches no worker (a respawned one included) until a reload accepts it.

        :raises ConfigError: when the config is refused (naming the operator's files);
            the current config and its copies stay as they were.
        """
        from bungate import tls

        validate = self.validate_config or _check_certificate_files
        generation = self._generation + 1
        copies: Optional[tuple[str, dict[str, str]]] = None
        worker_config = config
        if tls.certificate_files(config):
            directory = self._new_copies_dir(generation)
            try:
                worker_config, originals = tls.copy_certificate_files(config, directory)
                copies = (directory, originals)
                validate(worker_config)
            except BaseException:
                self._drop_copies(directory, copies[1] if copies else {})
                raise
            self._copies[generation] = copies
        else:
            validate(config)
        self._generation = generation
        self.config = config
        self._worker_config = worker_config
        if copies is not None:
            self.log.info(
                "Workers will load {count} certificate/key/CA file(s) from copies in {directory}",
                count=len(copies[1]),
                directory=copies[0],
            )
        self._prune_copies()

    def _new_copies_dir(self, generation: int) -> str:
        if self._copies_dir is None:
            from bungate._rundir import make_run_dir, sweep_stale_run_dirs

            for stale in sweep_stale_run_dirs("tls"):
                self.log.info(
                    "Removed certificate copies left by a dead master: {path}", path=stale
                )
            self._copies_dir = make_run_dir("tls")
        return tempfile.mkdtemp(prefix=f"{generation}-", dir=self._copies_dir)

    def _drop_copies(self, directory: str, originals: Mapping[str, str]) -> None:
        from bungate import tls

        tls.forget_copies(originals)
        shutil.rmtree(directory, ignore_errors=True)
        if self._copies_dir is not None and not self._copies:
            shutil.rmtree(self._copies_dir, ignore_errors=True)
            self._copies_dir = None

    def _prune_copies(self) -> None:
        """Delete the copies of older configs once no booting worker may still read them."""
        needed = {self._generation, *self._booting.values()}
        for generation in [g for g in self._copies if g not in needed]:
            directory, originals = self._copies.pop(generation)
            self._drop_copies(directory, originals)

    def _remove_copies(self) -> None:
        for directory, originals in self._copies.values():
            self._drop_copies(directory, originals)
        self._copies.clear()
        if self._copies_dir is not None:
            shutil.rmtree(self._copies_dir, ignore_errors=True)
            self._copies_dir = None

    # --- signals ----------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        """
        SIGUSR2 rolls the fleet, SIGHUP reloads the config, SIGTTIN / SIGTTOU add or
        remove a worker. (SIGTERM and SIGINT stop the reactor, whose shutdown calls
        :meth:`stop`.) Handlers only schedule work on the reactor thread.
        """
        actions: dict[int, Callable[[], Any]] = {
            signal.SIGUSR2: self.rolling_restart,
            signal.SIGHUP: self.reload,
            signal.SIGTTIN: lambda: self.scale_up(1),
            signal.SIGTTOU: lambda: self.scale_down(1) if self.worker_count() > 1 else None,
        }
        for number, action in actions.items():

            def handler(signum: int, frame: Any, action: Callable[[], Any] = action) -> None:
                self.reactor.callFromThread(self._run_signal, signum, action)

            self._previous_signals[number] = signal.signal(number, handler)

    def _run_signal(self, signum: int, action: Callable[[], Any]) -> None:
        if self._stopping is not None:
            return
        self.log.info("Received {signal}", signal=signal.Signals(signum).name)
        result = action()
        if isinstance(result, defer.Deferred):
            result.addErrback(
                lambda f: self.log.failure("Signal {signal} failed", f, signal=signum)
            )

    def restore_signal_handlers(self) -> None:
        """Put back the handlers that were there before :meth:`install_signal_handlers`."""
        for number, previous in self._previous_signals.items():
            signal.signal(number, previous)
        self._previous_signals.clear()

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
            for sock in self.listeners.values():
                sock.close()
            self.listeners.clear()
            self.restore_signal_handlers()
            self._prune()
            self._remove_copies()
            if self._accept is not None:
                table, backing = self._accept
                self._accept = None
                self._accept_slots.clear()
                table.close()
                backing.close()
            self.log.info("All workers stopped")
            stopping.fire(None)

        defer.gatherResults([s.when_ended() for s in slots]).addCallback(closed)
        return stopping.wait()
