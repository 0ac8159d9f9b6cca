"""
Fleet-wide Prometheus metrics on top of prometheus_client's multiprocess mode.

How the pieces fit:

- The **master** calls :func:`prepare_multiprocess_dir` once at start, *before* any
  metric object exists and before it spawns a worker. It makes (or wipes) one directory
  per master run and exports ``PROMETHEUS_MULTIPROC_DIR``, so every worker spawned with
  the master's environment writes its numbers into that directory (one ``*_<pid>.db``
  file per process and metric type).
- Each **worker** (and the single process when the cluster is disabled, where no
  directory exists and a plain in-memory registry is used) counts traffic through
  :class:`GatewayMetrics`.
- The master records the fleet through :class:`MasterMetrics` and calls
  :meth:`MasterMetrics.worker_exited` for every worker that exits, so that the live
  gauges of the dead process disappear. Counter and histogram files of dead workers stay
  in the directory, which is why totals never go backwards when a worker dies or a roll
  replaces the fleet.
- :class:`bungate.http.metrics.MetricsResource` renders the merged view of every file,
  so whichever worker answers a scrape shows the same fleet-wide numbers.

Ordering caveat: prometheus_client picks the class that stores metric values
(in-memory ``MutexValue`` or file-backed ``MmapedValue``) from the environment when
``prometheus_client.values`` is first imported, and every metric object keeps the value
class it was created with. This module therefore creates no metric at import time; the
classes below create their metrics when constructed, and they (and
:func:`prepare_multiprocess_dir`) re-check that ``prometheus_client.values.ValueClass``
matches the current environment, correcting it if prometheus_client was imported before
the variable was set. Metrics created by other code before that point are not fixed.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Mapping, Sequence
from typing import Any, Optional

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    values,
)
from prometheus_client.multiprocess import mark_process_dead
from twisted.logger import Logger

__all__ = [
    "CIRCUIT_STATES",
    "DURATION_BUCKETS",
    "ENV_VAR",
    "UPSTREAM_ERROR_KINDS",
    "GatewayMetrics",
    "MasterMetrics",
    "multiprocess_dir",
    "prepare_multiprocess_dir",
    "remove_multiprocess_dir",
]

ENV_VAR = "PROMETHEUS_MULTIPROC_DIR"
"""The environment variable prometheus_client reads to enable multiprocess mode."""

_LEGACY_ENV_VAR = "prometheus_multiproc_dir"

DURATION_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    float("inf"),
)
"""Buckets of ``bungate_request_duration_seconds``, in seconds."""

UPSTREAM_ERROR_KINDS = frozenset({"refused", "timeout", "reset", "dns", "other"})
"""The values of the ``kind`` label; anything else is counted as ``other``."""

CIRCUIT_STATES = {"closed": 0, "half-open": 1, "open": 2}
"""The values of ``bungate_circuit_state`` for each breaker state."""


# A slot is "idle" for the instant between its creation and its first spawn: report
# it as starting rather than as a state of its own.
_STATE_ALIASES = {"idle": "starting"}

# Label values must stay bounded: any method outside this set is counted as OTHER.
_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"}
)

_log = Logger(namespace="bungate.metrics")


# --- multiprocess directory -----------------------------------------------------------


def multiprocess_dir() -> Optional[str]:
    """
    The multiprocess directory this process uses, or ``None`` in single-process mode.

    :return: the value of ``PROMETHEUS_MULTIPROC_DIR`` (or of the deprecated lower-case
        variable), or ``None`` when neither is set or it is empty.
    """
    return os.environ.get(ENV_VAR) or os.environ.get(_LEGACY_ENV_VAR) or None


def _sync_value_class() -> Optional[str]:
    """
    Make prometheus_client store values the way the environment says, and return the dir.

    prometheus_client decides once, at import; metric constructors look up
    ``values.ValueClass`` each time, so replacing it only affects metrics created later.
    A file-backed class is only replaced by an in-memory one and vice versa, never by a
    second file-backed one: two of those in one process would write the same files.
    """
    path = multiprocess_dir()
    is_multiprocess = bool(getattr(values.ValueClass, "_multiprocess", False))
    if path is not None and not is_multiprocess:
        values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
    elif path is None and is_multiprocess:
        values.ValueClass = values.MutexValue
    return path


def prepare_multiprocess_dir(path: Optional[str] = None) -> str:
    """
    Make the metrics directory of this master run and export it to future workers.

    Call it in the master before any metric object is created and before any worker is
    spawned: it sets ``os.environ["PROMETHEUS_MULTIPROC_DIR"]``, which
    ``reactor.spawnProcess`` children inherit when given the master's environment (pass
    the variable on explicitly if workers get a filtered environment).

    :param path: the directory to use. It is created if missing; if it exists, every
        ``*.db`` file in it (left over from an earlier run) is deleted and nothing else is
        touched. ``None`` makes a fresh ``bungate-metrics-*`` directory under the system
        temporary directory.
    :return: the absolute path of the directory.
    """
    if path is None:
        from bungate.ops.rundir import make_run_dir, sweep_stale_run_dirs

        sweep_stale_run_dirs("metrics")
        path = make_run_dir("metrics")
    else:
        path = os.path.abspath(path)
        os.makedirs(path, exist_ok=True)
        for stale in glob.glob(os.path.join(glob.escape(path), "*.db")):
            os.remove(stale)
    os.environ[ENV_VAR] = path
    os.environ.pop(_LEGACY_ENV_VAR, None)
    _sync_value_class()
    return path


def remove_multiprocess_dir(path: str) -> None:
    """
    Delete the ``*.db`` files of a finished run and the directory if it is then empty.

    Call it when the master exits after every worker has stopped. Errors are ignored:
    a leftover temporary directory is harmless.

    :param path: the directory :func:`prepare_multiprocess_dir` returned.
    """
    for db in glob.glob(os.path.join(glob.escape(path), "*.db")):
        try:
            os.remove(db)
        except OSError:
            pass
    try:
        os.rmdir(path)
    except OSError:
        pass


# --- worker side ------------------------------------------------------------------------


class GatewayMetrics:
    """
    The traffic metrics one worker (or the single process) records.

    Metrics are created when this object is, so create it after the environment is final
    (in a worker: at start-up, the variable is inherited). Create exactly one per process:
    in multiprocess mode two instances would each hold their own copy of the same values
    and overwrite each other's counts in the shared file. With ``enabled=False`` no metric
    exists and every method returns at once; callers on the hot path may also test
    :attr:`enabled` themselves to skip computing arguments.

    :param enabled: ``metrics.enabled`` from the config.
    :param registry: the registry to register with in single-process mode; defaults to
        prometheus_client's global ``REGISTRY``. Ignored in multiprocess mode, where the
        files are the source of truth and nothing is registered. Give a fresh
        ``CollectorRegistry`` to create several instances in one process (tests).
    """

    def __init__(self, enabled: bool = True, registry: Optional[CollectorRegistry] = None) -> None:
        self.enabled = enabled
        self._requests_children: dict[tuple[str, str, int], Any] = {}
        self._duration_children: dict[str, Any] = {}
        self._error_children: dict[tuple[str, str], Any] = {}
        self._target_children: dict[tuple[str, str], Any] = {}
        self._rejected_children: dict[tuple[int, str], Any] = {}
        self._tunnel_close_children: dict[str, Any] = {}
        if not enabled:
            return
        path = _sync_value_class()
        reg: Optional[CollectorRegistry]
        reg = None if path is not None else (registry if registry is not None else REGISTRY)
        self._requests = Counter(
            "bungate_requests_total",
            "Requests answered, by method, route pattern and status code.",
            ("method", "route", "status"),
            registry=reg,
        )
        self._duration = Histogram(
            "bungate_request_duration_seconds",
            "Time from receiving a request to finishing its response, by route pattern.",
            ("route",),
            buckets=DURATION_BUCKETS,
            registry=reg,
        )
        self._upstream_errors = Counter(
            "bungate_upstream_errors_total",
            "Failed attempts to reach an upstream, by route pattern and kind "
            "(refused, timeout, reset, other).",
            ("route", "kind"),
            registry=reg,
        )
        self._rejected = Counter(
            "bungate_requests_rejected_total",
            "Requests the gateway refused itself (a bad target or Host, no route, a "
            "method not allowed, a limit), by status code and reason.",
            ("status", "reason"),
            registry=reg,
        )
        self._inflight = Gauge(
            "bungate_inflight_requests",
            "Requests being handled right now, summed over live workers.",
            registry=reg,
            multiprocess_mode="livesum",
        )
        self._tunnels_open = Gauge(
            "bungate_websocket_tunnels_open",
            "WebSocket tunnels open right now, summed over live workers.",
            registry=reg,
            multiprocess_mode="livesum",
        )
        self._tunnels_opened = Counter(
            "bungate_websocket_tunnels_opened_total",
            "WebSocket tunnels opened (upstream answered 101 and the tunnel started).",
            registry=reg,
        )
        self._tunnels_refused = Counter(
            "bungate_websocket_tunnels_refused_total",
            "WebSocket upgrades answered 503 because the worker was at "
            "server.max_tunnels_per_worker or draining.",
            registry=reg,
        )
        self._tunnels_closed = Counter(
            "bungate_websocket_tunnels_closed_total",
            "WebSocket tunnels closed, by reason.",
            ("reason",),
            registry=reg,
        )
        tunnel_bytes = Counter(
            "bungate_websocket_bytes_total",
            "Bytes relayed by WebSocket tunnels once they closed, by direction "
            "(up: client to upstream, down: upstream to client).",
            ("direction",),
            registry=reg,
        )
        self._tunnel_bytes_up = tunnel_bytes.labels("up")
        self._tunnel_bytes_down = tunnel_bytes.labels("down")
        # Load-balanced routes. Each worker keeps its own view of its targets (health
        # checks and breakers run per worker), so the fleet-wide gauges merge the live
        # workers' views pessimistically: a target reads healthy only when every live
        # worker has it in rotation (livemin), and its circuit reads as the worst state any
        # live worker has (livemax: open beats half-open beats closed). "live" drops the
        # values of workers that exited, so a dead worker's stale view never sticks.
        self._upstream_requests = Counter(
            "bungate_upstream_requests_total",
            "Requests sent to a target of a load-balanced route (every attempt, retries "
            "included), by route pattern and target URL.",
            ("route", "target"),
            registry=reg,
        )
        self._upstream_healthy = Gauge(
            "bungate_upstream_healthy",
            "1 when every live worker has the target in rotation (active health checks), else 0.",
            ("route", "target"),
            registry=reg,
            multiprocess_mode="livemin",
        )
        self._circuit_state = Gauge(
            "bungate_circuit_state",
            "Circuit breaker of a target: 0 closed, 1 half-open, 2 open; the worst state "
            "among live workers.",
            ("route", "target"),
            registry=reg,
            multiprocess_mode="livemax",
        )

    def tunnel_opened(self) -> None:
        """Count a WebSocket tunnel that opened; pair it with :meth:`tunnel_closed`."""
        if self.enabled:
            self._tunnels_open.inc()
            self._tunnels_opened.inc()

    def tunnel_refused(self) -> None:
        """Count a WebSocket upgrade refused because the worker had no room for a tunnel."""
        if self.enabled:
            self._tunnels_refused.inc()

    def tunnel_closed(self, reason: str, client_to_upstream: int, upstream_to_client: int) -> None:
        """
        Count a WebSocket tunnel that closed, and the bytes it relayed.

        :param reason: why it closed (a short word of :mod:`bungate.http.tunnel`, e.g.
            ``client_closed``, ``idle_timeout``, ``drain``).
        :param client_to_upstream: bytes relayed from the client to the upstream.
        :param upstream_to_client: bytes relayed from the upstream to the client.
        """
        if not self.enabled:
            return
        self._tunnels_open.dec()
        child = self._tunnel_close_children.get(reason)
        if child is None:
            child = self._tunnel_close_children[reason] = self._tunnels_closed.labels(reason)
        child.inc()
        self._tunnel_bytes_up.inc(client_to_upstream)
        self._tunnel_bytes_down.inc(upstream_to_client)

    def request_rejected(self, status: int, reason: str) -> None:
        """
        Count a request the gateway refused itself.

        :param status: the status it was answered with (400, 404, 405, 408, 413, ...).
        :param reason: the short reason the answer names, e.g. ``encoded_slash``.
        """
        if not self.enabled:
            return
        key = (status, reason)
        child = self._rejected_children.get(key)
        if child is None:
            child = self._rejected_children[key] = self._rejected.labels(str(status), reason)
        child.inc()

    def request_started(self) -> None:
        """Count one more request in flight; pair it with :meth:`request_finished`."""
        if self.enabled:
            self._inflight.inc()

    def request_finished(self, method: str, route: str, status: int, duration: float) -> None:
        """
        Record an answered request and count it out of the in-flight gauge.

        :param method: the request method; one outside the standard set is counted as
            ``OTHER`` to keep the label bounded.
        :param route: the matched route *pattern* (never the raw path), or a fixed name
            such as ``"unmatched"``.
        :param status: the response status code.
        :param duration: seconds from receiving the request to finishing the response.
        """
        if not self.enabled:
            return
        if method not in _METHODS:
            method = "OTHER"
        key = (method, route, status)
        child = self._requests_children.get(key)
        if child is None:
            child = self._requests_children[key] = self._requests.labels(method, route, str(status))
        child.inc()
        hist = self._duration_children.get(route)
        if hist is None:
            hist = self._duration_children[route] = self._duration.labels(route)
        hist.observe(duration)
        self._inflight.dec()

    def upstream_error(self, route: str, kind: str) -> None:
        """
        Count a failed attempt to reach an upstream.

        :param route: the matched route pattern.
        :param kind: ``refused``, ``timeout``, ``reset`` or ``other`` (anything else is
            counted as ``other``).
        """
        if not self.enabled:
            return
        if kind not in UPSTREAM_ERROR_KINDS:
            kind = "other"
        key = (route, kind)
        child = self._error_children.get(key)
        if child is None:
            child = self._error_children[key] = self._upstream_errors.labels(route, kind)
        child.inc()

    def upstream_request(self, route: str, target: str) -> None:
        """
        Count one attempt sent to a target of a load-balanced route.

        :param route: the route pattern.
        :param target: the target's base URL, as configured.
        """
        if not self.enabled:
            return
        key = (route, target)
        child = self._target_children.get(key)
        if child is None:
            child = self._target_children[key] = self._upstream_requests.labels(route, target)
        child.inc()

    def upstream_healthy(self, route: str, target: str, healthy: bool) -> None:
        """
        Publish whether a target is in this worker's rotation.

        :param route: the route pattern.
        :param target: the target's base URL.
        :param healthy: false while active health checks keep it out of rotation.
        """
        if self.enabled:
            self._upstream_healthy.labels(route, target).set(1 if healthy else 0)

    def circuit_state(self, route: str, target: str, state: str) -> None:
        """
        Publish the state of a target's circuit breaker in this worker.

        :param route: the route pattern.
        :param target: the target's base URL.
        :param state: ``closed``, ``half-open`` or ``open`` (see :data:`CIRCUIT_STATES`).
        """
        if self.enabled:
            self._circuit_state.labels(route, target).set(CIRCUIT_STATES.get(state, 0))


# --- master side ------------------------------------------------------------------------


class MasterMetrics:
    """
    The fleet metrics only the master records.

    Create it once, after :func:`prepare_multiprocess_dir`. Its numbers live in the master's
    own ``*_<pid>.db`` files, which no one marks dead while the master runs, so the
    ``livesum`` gauge simply shows the master's last value without a ``pid`` label.

    :param registry: the registry to register with in single-process mode (no
        multiprocess directory); defaults to the global ``REGISTRY``.
    :param states: the slot states the master names (its machine declares them), each
        always present in ``bungate_workers`` (0 when no worker is in it).
    """

    def __init__(
        self, registry: Optional[CollectorRegistry] = None, states: Sequence[str] = ()
    ) -> None:
        path = _sync_value_class()
        reg: Optional[CollectorRegistry]
        reg = None if path is not None else (registry if registry is not None else REGISTRY)
        self._path = path
        self._workers = Gauge(
            "bungate_workers",
            "Worker slots of the fleet, by lifecycle state (failed: given up on, see "
            "cluster.max_restarts).",
            ("state",),
            registry=reg,
            multiprocess_mode="livesum",
        )
        self._live = Gauge(
            "bungate_workers_total",
            "Workers of the fleet: starting, running or respawning.",
            registry=reg,
            multiprocess_mode="livesum",
        )
        self._restarts = Counter(
            "bungate_workers_restarts_total",
            "Workers respawned in their slot after an unexpected exit.",
            registry=reg,
        )
        self._crashed = Counter(
            "bungate_workers_crashed_total",
            "Workers that exited without being asked to (non-zero code or signal).",
            registry=reg,
        )
        self._states: set[str] = set(states)
        for state in states:
            self._workers.labels(state).set(0)

    def set_workers(self, counts: Mapping[str, int], live: Optional[int] = None) -> None:
        """
        Publish how many workers are in each state.

        :param counts: state name → number of workers; every state seen before (and every
            state given at construction) that is missing here is set to 0. ``idle`` (a
            slot not spawned yet) is counted as ``starting``.
        :param live: the fleet's size (``bungate_workers_total``).
        """
        if live is not None:
            self._live.set(live)
        merged: dict[str, int] = {}
        for state, count in counts.items():
            state = _STATE_ALIASES.get(state, state)
            merged[state] = merged.get(state, 0) + count
        for state in self._states.difference(merged):
            self._workers.labels(state).set(0)
        for state, count in merged.items():
            self._states.add(state)
            self._workers.labels(state).set(count)

    def worker_restarted(self, worker_id: str) -> None:
        """
        Count a worker started again in its slot.

        :param worker_id: the slot's id; not a label (kept for the log and the caller's
            symmetry) so the series count stays fixed.
        """
        self._restarts.inc()

    def worker_crashed(self, worker_id: str) -> None:
        """
        Count a worker that exited unexpectedly.

        :param worker_id: the slot's id; not a label, see :meth:`worker_restarted`.
        """
        self._crashed.inc()

    def worker_exited(self, pid: int) -> None:
        """
        Drop the live gauges of a worker process that has exited (for any reason).

        Call it for every worker exit, with the pid kept from ``connectionMade``
        (``transport.pid`` is already ``None`` in ``processExited``). Its counters and
        histograms stay, so fleet totals do not go backwards. A no-op in single-process
        mode.

        :param pid: the exited worker's process id.
        """
        if self._path is None:
            return
        try:
            mark_process_dead(pid, self._path)  # type: ignore[no-untyped-call]
        except OSError as e:
            _log.warn("could not clean metrics of worker pid {pid}: {error}", pid=pid, error=e)
