"""
The master role of a gateway process: title, fleet metrics, the fleet, the signals an
operator sends it, and the exit status it leaves.

| signal | what the master does |
|---|---|
| ``TERM``, ``INT`` | stop: close the listening sockets at once, drain every worker |
| a second ``TERM``/``INT``, or ``QUIT`` | stop at once: workers exit without draining |
| ``HUP`` | reload the config file (:meth:`ClusterManager.reload`) |
| ``USR2`` | rolling restart |
| ``USR1`` | reopen the log file, and tell every worker to |
| ``TTIN`` / ``TTOU`` | one worker more / fewer (never fewer than one) |

Handlers only schedule work on the reactor thread. Exit status: 0 after a graceful stop,
1 when a worker had to be killed to stop, 3 when every slot failed.

The same operations are served by the control API (:mod:`bungate.master.control`) when
``cluster.control_socket`` is set. Under systemd the master also:

- says how it is doing over ``NOTIFY_SOCKET`` (:mod:`bungate.ops.sdnotify`): ``READY=1``
  once the fleet is ready, ``RELOADING=1`` ... ``READY=1`` around a reload, ``STOPPING=1``
  on stop, ``STATUS=N/M workers running`` as the fleet changes, and ``WATCHDOG=1`` every
  half ``WATCHDOG_USEC`` while at least one worker serves (or the fleet drains);
- adopts the sockets of a ``.socket`` unit (``LISTEN_FDS``,
  :mod:`bungate.ops.socket_activation`) instead of binding.

Started as root with ``server.user`` / ``server.group``, it binds, makes its private
directories and hands them to that user, writes its pid file (``--pidfile``), then drops
root (:mod:`bungate.ops.daemon`) before it starts a worker: the workers, and the config
checks, run as that user. Per-process resources of the fleet are written on every
heartbeat tick to the metrics directory, where ``/metrics`` shows them
(:class:`~bungate.ops.resources.ProcessResources`).
"""

from __future__ import annotations

import os
import pwd
import signal
import time
from collections.abc import Mapping
from typing import IO, Any, Callable, Optional

from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from bungate._once import Once
from bungate.config import ConfigError, GatewayConfig
from bungate.master.certificates import Validate
from bungate.master.check import ConfigCheck
from bungate.master.control import ControlResource, ControlServer
from bungate.master.fleet import ClusterError, ClusterManager
from bungate.master.listeners import wanted_listeners
from bungate.master.slot import SlotState
from bungate.ops import sdnotify, socket_activation
from bungate.ops.daemon import Identity, process_options, resolve_identity
from bungate.ops.metrics import MasterMetrics, multiprocess_dir, prepare_multiprocess_dir
from bungate.ops.pidfile import PidFile
from bungate.ops.procfs import usage
from bungate.ops.resources import ProcessResources, publish_collected
from bungate.ops.rundir import own_run_dirs, sweep_stale_run_dirs

__all__ = ["REPORTED_STATES", "MasterService", "SignalHandlers"]

#: The slot states ``bungate_workers`` always reports (idle counts as starting; a stopped
#: slot is gone from the fleet).
REPORTED_STATES = tuple(
    s.value for s in SlotState if s not in (SlotState.IDLE, SlotState.STOPPED)
)

log = Logger(namespace="bungate.master")


class SignalHandlers:
    """
    The master's operator signals, each running an action on the reactor thread.

    :param reactor: runs the actions (``callFromThread``) and stops.
    :param manager: the fleet.
    :param reopen_logs: reopens the master's log file; returns what it reopened, or
        ``None`` when its logs go to a stream that cannot be reopened.
    :param reload: what ``HUP`` runs (default: the fleet's reload).
    """

    def __init__(
        self,
        reactor: Any,
        manager: ClusterManager,
        reopen_logs: Callable[[], Optional[str]] = lambda: None,
        reload: Optional[Callable[[], Any]] = None,
    ) -> None:
        self.reactor = reactor
        self.manager = manager
        self.reopen_logs = reopen_logs
        self.reload = reload or manager.reload
        self.stops = 0  # TERM/INT received
        self._previous: dict[int, Any] = {}

    def actions(self) -> dict[int, Callable[[], Any]]:
        """Signal number -> what it does."""
        manager = self.manager
        return {
            signal.SIGUSR2: manager.rolling_restart,
            signal.SIGHUP: self.reload,
            signal.SIGTTIN: lambda: manager.scale_up(1),
            signal.SIGTTOU: self._one_fewer,
            signal.SIGUSR1: self._reopen,
            signal.SIGTERM: self._stop,
            signal.SIGINT: self._stop,
            signal.SIGQUIT: self._stop_now,
        }

    def install(self) -> None:
        """Install the handlers (remembering the ones they replace)."""
        for number, action in self.actions().items():

            def handler(signum: int, frame: Any, action: Callable[[], Any] = action) -> None:
                self.reactor.callFromThread(self._run, signum, action)

            self._previous[number] = signal.signal(number, handler)

    def _run(self, signum: int, action: Callable[[], Any]) -> None:
        name = signal.Signals(signum).name
        if self.manager.stopping and signum not in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            log.warn("Received {signal} while stopping: ignored", signal=name)
            return
        log.info("Received {signal}", signal=name)
        result = action()
        if isinstance(result, defer.Deferred):
            result.addErrback(lambda f: log.failure("Signal {signal} failed", f, signal=name))

    def _one_fewer(self) -> Any:
        if self.manager.worker_count() <= 1:
            log.warn(
                "SIGTTOU refused: the last worker is never removed by TTOU "
                "(stop the gateway with SIGTERM)"
            )
            return None
        return self.manager.scale_down(1)

    def _reopen(self) -> None:
        what = self.reopen_logs()
        if what is None:
            log.info("SIGUSR1: the master logs to a stream, nothing to reopen")
        else:
            log.info("SIGUSR1: reopened the log file {path}", path=what)
        count = self.manager.broadcast_signal(signal.SIGUSR1)
        log.info("SIGUSR1 passed on to {count} worker(s)", count=count)

    def _stop(self) -> None:
        self.stops += 1
        if self.stops > 1:
            self._stop_now()
            return
        if self.reactor.running:
            self.reactor.stop()

    def _stop_now(self) -> None:
        self.manager.stop_now()
        if self.reactor.running:
            self.reactor.stop()

    def restore(self) -> None:
        """Put back the handlers that were there before :meth:`install`."""
        for number, previous in self._previous.items():
            signal.signal(number, previous)
        self._previous.clear()


class _SpawnAs:
    """
    A reactor whose ``spawnProcess`` starts children as ``identity()`` while this process
    is still root (the config check at start); everything else is the reactor's.
    """

    def __init__(self, reactor: Any, identity: Callable[[], Optional[Identity]]) -> None:
        self._reactor = reactor
        self._identity = identity

    def spawnProcess(self, *args: Any, **kwargs: Any) -> Any:
        """``reactor.spawnProcess``, with the identity's uid and gid while root."""
        identity = self._identity()
        if identity is not None and identity.needed and os.geteuid() == 0:
            kwargs.setdefault("uid", identity.uid)
            kwargs.setdefault("gid", identity.gid)
        return self._reactor.spawnProcess(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)


def _version() -> Optional[str]:
    try:
        from importlib.metadata import version

        return version("bungate")
    except Exception:
        return None


class MasterService:
    """
    Runs the fleet for a gateway: start it, answer signals, stop it.

    :param config: the validated config.
    :param reactor: the reactor.
    :param validate: checks every config before it is taken (startup and reload); by
        default a fresh ``python -m bungate.worker --check`` process
        (:class:`~bungate.master.check.ConfigCheck`), so the master imports no user code.
    :param worker_script: the script workers run, or ``None`` for the built-in worker.
    :param script_args: its arguments.
    :param config_loader: re-reads the config on SIGHUP.
    :param on_line: where worker output lines go (see :class:`ClusterManager`).
    :param extra_env: variables every worker gets.
    :param output: where the workers' own log lines are written (default: stdout); its
        ``reopen()`` (if any) runs on SIGUSR1.
    :param pinned: ``{config key: option}`` for the command-line overrides.
    :param pidfile: where to write the master's pid once it listens; by default what
        ``twist bungate --pidfile`` asked (:func:`~bungate.ops.daemon.process_options`).
    """

    def __init__(
        self,
        config: GatewayConfig,
        reactor: Any,
        *,
        validate: Optional[Validate] = None,
        worker_script: Optional[str] = None,
        script_args: Optional[list[str]] = None,
        config_loader: Optional[Callable[[], GatewayConfig]] = None,
        on_line: Optional[Callable[[int, int, bytes], None]] = None,
        extra_env: Optional[Mapping[str, str]] = None,
        output: Optional[IO[str]] = None,
        pinned: Optional[Mapping[str, str]] = None,
        pidfile: Optional[str] = None,
    ) -> None:
        self.reactor = reactor
        self.output = output
        #: the process's exit status once stopped (see the module docstring).
        self.exit_code = 0
        # Only the master talks to systemd: read the variables, then hide them from every
        # process started from now on (workers, config checks).
        #: the systemd notifier (``None`` outside a ``Type=notify`` service).
        self.notifier = sdnotify.SystemdNotifier.from_environ()
        sdnotify.unset_environment()
        path = pidfile if pidfile is not None else process_options().pidfile
        #: the pid file, if one was asked for.
        self.pidfile = PidFile(path) if path else None
        #: the user and group to run as (``server.user`` / ``server.group``), once started.
        self.identity: Optional[Identity] = None
        #: the control API, when ``cluster.control_socket`` is set and the master started.
        self.control: Optional[ControlServer] = None
        #: how many sockets were adopted from systemd.
        self.adopted = 0
        self.started_at = time.time()
        self._metrics_dir: Optional[str] = None
        metrics = None
        if config.metrics.enabled:
            if multiprocess_dir() is None:
                prepare_multiprocess_dir()
            self._metrics_dir = multiprocess_dir()
            metrics = MasterMetrics(states=REPORTED_STATES)
        self._loader = config_loader
        self.manager = manager = ClusterManager(
            config,
            worker_script=worker_script,
            script_args=script_args,
            reactor=reactor,
            config_loader=None if config_loader is None else self._load,
            metrics=metrics,
            on_line=on_line,
            extra_env=extra_env,
            validate=validate,
            output=output,
            on_fatal=self._fatal,
        )
        check: Validate
        if validate is None:
            spawner = manager.spawner
            check = ConfigCheck(
                _SpawnAs(reactor, lambda: self.identity),
                lambda: spawner.python,
                spawner.base_environment,
            )
        else:
            check = validate
        self._check = check
        manager.validate = self._validate
        manager.pinned = dict(pinned or {})
        self.signals = SignalHandlers(reactor, manager, self._reopen_logs, reload=self.reload)
        self._ready = False
        self._reloads = 0
        self._status = ""
        self._stopped: Once[None] = Once()
        self._closing: Optional[Once[None]] = None
        self._stop_asked = False
        self._watchdog: Optional[task.LoopingCall] = None
        self._resources: Optional[task.LoopingCall] = None
        self._resources_failed = False
        manager.on("worker-state", lambda **_: self._share_status())
        manager.on("scaled", lambda **_: self._share_status())

    # --- helpers ----------------------------------------------------------------------

    def _reopen_logs(self) -> Optional[str]:
        reopen = getattr(self.output, "reopen", None)
        return reopen() if reopen is not None else None

    def _fatal(self, code: int) -> None:
        self.exit_code = code
        if self.reactor.running:
            self.reactor.stop()

    def _load(self) -> GatewayConfig:
        """The config loader of a reload: what a running master cannot take is refused."""
        assert self._loader is not None
        config = self._loader()
        old = self.manager.config
        for key in ("user", "group"):
            if getattr(old.server, key) != getattr(config.server, key):
                raise ConfigError(
                    config.source,
                    f"server.{key}",
                    f"a running master cannot change the {key} it runs as (from "
                    f"{getattr(old.server, key)!r} to {getattr(config.server, key)!r}); "
                    "restart the gateway",
                )
        if config.cluster.control_socket != old.cluster.control_socket:
            log.warn(
                "cluster.control_socket changed from {old} to {new}: the control API "
                "stays where it is until the gateway restarts",
                old=old.cluster.control_socket,
                new=config.cluster.control_socket,
            )
        return config

    def _validate(self, config: GatewayConfig, names: Mapping[str, str]) -> Any:
        """The check of a config; its certificate copies go to ``server.user`` first."""
        if self.identity is not None:
            self.identity.chown(own_run_dirs("tls"))
        return self._check(config, names)

    def status_text(self) -> str:
        """``N/M workers running``: the status line systemd shows."""
        manager = self.manager
        running = sum(1 for s in manager.slots.values() if s.serving)
        if manager.stopping:
            return f"stopping: {sum(1 for s in manager.slots.values() if s.alive)} worker(s) left"
        return f"{running}/{manager.desired} workers running"

    def _share_status(self) -> None:
        if self.notifier is None or not self._ready:
            return
        text = self.status_text()
        if text != self._status:
            self._status = text
            self.notifier.status(text)

    def master_info(self) -> dict[str, Any]:
        """The master, as the control API's ``GET /fleet`` shows it."""
        used = usage(os.getpid())
        try:
            user: Optional[str] = pwd.getpwuid(os.geteuid()).pw_name
        except KeyError:
            user = None
        return {
            "pid": os.getpid(),
            "started_at": self.started_at,
            "version": _version(),
            "config": self.manager.config.source,
            "user": user,
            "uid": os.geteuid(),
            "rss_bytes": None if used is None else used.rss_bytes,
            "cpu_seconds": None if used is None else used.cpu_seconds,
            "open_fds": None if used is None else used.open_fds,
            "systemd_notify": self.notifier is not None,
            "adopted_sockets": self.adopted,
        }

    # --- start ------------------------------------------------------------------------

    def start(self) -> defer.Deferred[None]:
        """
        Accept the config (checked in a fresh process, its files copied), bind (or
        adopt) the listeners, open the control API, write the pid file, drop root, install
        the signal handlers and start the fleet; fires once it is ready (``READY=1``).
        """
        # After the reactor runs: it installs its own TERM/INT handlers when it starts.
        self.reactor.callWhenRunning(self.signals.install)
        return self._start()

    @defer.inlineCallbacks
    def _start(self) -> Any:
        manager = self.manager
        config = manager.config
        self.identity = resolve_identity(config)
        if self.pidfile is not None:
            self.pidfile.check()  # a live master holds it: refuse before binding anything
        yield manager.accept_config(config)
        self._bind(config)
        self._open_control(config)
        if self.pidfile is not None:
            log.info("Pid file: {what}", what=self.pidfile.acquire())
        self._drop_privileges()
        yield manager.start()
        self._serving()

    def _bind(self, config: GatewayConfig) -> None:
        """Adopt the sockets systemd passed, or bind the listeners."""
        try:
            found = socket_activation.inherited_sockets()
        except socket_activation.ActivationError as e:
            raise ClusterError(f"socket activation (LISTEN_FDS): {e}") from None
        listeners = self.manager.listeners
        if found:
            try:
                matched = socket_activation.match_listeners(found, wanted_listeners(config))
            except socket_activation.ActivationError as e:
                raise ClusterError(f"socket activation (LISTEN_FDS): {e}") from None
            socket_activation.unset_environment()
            listeners.adopt(config, matched)
            self.adopted = len(found)
            log.info("{what}", what=socket_activation.describe(found))
            return
        try:
            listeners.bind(config)
        except OSError as e:
            raise ClusterError(str(e)) from None

    def _open_control(self, config: GatewayConfig) -> None:
        path = config.cluster.control_socket
        if path is None:
            return
        identity = self.identity
        resource = ControlResource(
            self.manager,
            reload=self.reload,
            stop=self.stop,
            master=self.master_info,
            ready=lambda: self._ready,
        )
        control = ControlServer(
            path,
            resource,
            self.reactor,
            chown=(lambda p: identity.chown([p])) if identity is not None else (lambda p: None),
        )
        control.listen()
        self.control = control

    def _drop_privileges(self) -> None:
        identity = self.identity
        if identity is None or not identity.needed:
            return
        mine = own_run_dirs("tls") + own_run_dirs("metrics")
        if self._metrics_dir is not None and self._metrics_dir not in mine:
            mine.append(self._metrics_dir)
        try:
            identity.chown(mine)
            identity.drop()
        except OSError as e:
            raise ClusterError(
                f"server.user: cannot switch to {identity.describe()}: {e.strerror or e}"
            ) from None
        log.info(
            "Listening sockets bound: running as {who} from now on (workers too)",
            who=identity.describe(),
        )
        # Left by a master of this user that was killed: only this user may remove them.
        for kind in ("tls", "metrics"):
            sweep_stale_run_dirs(kind)

    def _serving(self) -> None:
        """The fleet is ready: tell systemd, start the watchdog and the resource metrics."""
        self._ready = True
        notifier = self.notifier
        if notifier is not None:
            self._status = self.status_text()
            notifier.ready(self._status)
            interval = notifier.watchdog_interval
            if interval is not None:
                self._watchdog = task.LoopingCall(self._ping)
                self._watchdog.clock = self.reactor
                self._watchdog.start(interval, now=True)
        if self._metrics_dir is not None:
            self._resources = task.LoopingCall(self._publish_resources)
            self._resources.clock = self.reactor
            self._resources.start(self.manager.config.cluster.heartbeat_interval, now=True)

    def _ping(self) -> None:
        """``WATCHDOG=1``: the loop runs (this is it) and a worker serves, or we drain."""
        manager = self.manager
        if self.notifier is not None and (
            manager.stopping or any(s.serving for s in manager.slots.values())
        ):
            self.notifier.watchdog()

    def _publish_resources(self) -> None:
        assert self._metrics_dir is not None
        manager = self.manager
        pid = os.getpid()
        collector = ProcessResources(lambda: {"master": pid, **manager.processes()})
        try:
            publish_collected(collector, self._metrics_dir, f"resources-{pid}")
        except OSError as e:
            if not self._resources_failed:
                self._resources_failed = True
                log.warn(
                    "Cannot write the per-worker resource metrics to {path}: {error}",
                    path=self._metrics_dir,
                    error=e.strerror or str(e),
                )

    # --- operations (signals and the control API) -----------------------------------

    def reload(self, wait: bool = False) -> defer.Deferred[bool]:
        """
        Reload the config (``HUP``), telling systemd ``RELOADING=1`` and then ``READY=1``.

        :param wait: run a reload of its own, after the one that runs (the control API's
            ``?wait=1``), rather than merge into it.
        :returns: fires with the outcome (``True``: the config is the fleet's).
        """
        self._reloads += 1
        if self._reloads == 1 and self._ready and self.notifier is not None:
            self.notifier.reloading()
        manager = self.manager
        d = manager.reload_and_wait() if wait else manager.reload()

        def done(result: Any) -> Any:
            self._reloads -= 1
            if self._reloads == 0 and self._ready and self.notifier is not None:
                self._status = self.status_text()
                self.notifier.ready(self._status)
            return result

        return d.addBoth(done)

    def stop(self) -> defer.Deferred[None]:
        """Stop as ``TERM`` does (the reactor stops, the fleet drains); fires once it has."""
        if not self._stop_asked and not self.manager.stopping and self.reactor.running:
            self._stop_asked = True
            self.reactor.stop()
        return self._stopped.wait()

    # --- stop -------------------------------------------------------------------------

    def close(self) -> defer.Deferred[None]:
        """Drain and stop the fleet, then put the signal handlers back."""
        if self._closing is not None:
            return self._closing.wait()
        closing = self._closing = Once()
        if self.notifier is not None:
            self.notifier.stopping()
        if self._resources is not None and self._resources.running:
            self._resources.stop()
        d = self.manager.stop()

        def done(result: None) -> Any:
            self.signals.restore()
            if self.manager.killed_on_stop and not self.exit_code:
                self.exit_code = 1
            self._stopped.fire(None)
            return self.control.close() if self.control is not None else None

        def cleanup(result: Any) -> Any:
            if self._watchdog is not None and self._watchdog.running:
                self._watchdog.stop()
            if self.pidfile is not None:
                try:
                    self.pidfile.release()
                except OSError as e:
                    log.warn(
                        "Cannot remove the pid file {path}: {error} (the next start "
                        "replaces it: it names a process that is gone)",
                        path=self.pidfile.path,
                        error=e.strerror or str(e),
                    )
            if self.notifier is not None:
                self.notifier.close()
            return result

        def closed(result: Any) -> None:
            if isinstance(result, Failure):
                log.failure("Stopping the master failed", result)
            closing.fire(None)

        d.addCallback(done).addBoth(cleanup).addBoth(closed)
        return closing.wait()
