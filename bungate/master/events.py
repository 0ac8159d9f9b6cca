"""
The fleet's lifecycle events: one table says each event's log line and how callbacks get
it; :class:`FleetEvents` turns every event into that line, the fleet metrics and the
callbacks registered with ``ClusterManager.on()``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import attrs
from twisted.logger import Logger

__all__ = ["EVENTS", "EventSpec", "FleetEvents"]


@attrs.frozen
class EventSpec:
    """
    How one event is reported.

    :ivar level: the log level of its line, or ``None`` for no line.
    :ivar text: the line, a ``twisted.logger`` format string over the event's fields.
    :ivar args: the fields a callback gets as positional arguments, in order; ``None``
        passes every field as a keyword argument.
    """

    level: Optional[str]
    text: str = ""
    args: Optional[tuple[str, ...]] = None


EVENTS: dict[str, EventSpec] = {
    "worker-spawn": EventSpec(
        "info", "Worker {worker_id} spawned (pid {pid}, restarts {restarts})", ("worker_id",)
    ),
    "worker-ready": EventSpec("info", "Worker {worker_id} ready (pid {pid})", ("worker_id",)),
    "worker-stopping": EventSpec("info", "Worker {worker_id} stopping (pid {pid}): draining"),
    "worker-exit": EventSpec(
        "info",
        "Worker {worker_id} exited (pid {pid}): {kind}, {description}",
        ("worker_id", "code", "signal"),
    ),
    "worker-respawn": EventSpec(
        "warn",
        "Worker {worker_id} will respawn in {delay:.2f}s after a {kind} (restart {restarts})",
    ),
    "worker-failed": EventSpec(
        "error", "Worker {worker_id} failed, not respawning: {reason}", ("worker_id", "reason")
    ),
    "worker-hung": EventSpec(
        "error", "Worker {worker_id} (pid {pid}) sent no heartbeat for {silent:.1f}s: killing it"
    ),
    "worker-state": EventSpec(None),
    "scaled": EventSpec("info", "Fleet scaled from {old} to {new} workers"),
    "roll-start": EventSpec("info", "Rolling restart started: {count} worker(s) to replace"),
    "roll-step": EventSpec(
        "info", "Rolling restart: worker {new_id} is ready, stopping worker {old_id}"
    ),
    "roll-done": EventSpec("info", "Rolling restart done: {count} worker(s) replaced"),
    "roll-aborted": EventSpec(
        "error", "Rolling restart aborted: {reason}; old workers keep serving"
    ),
    "reload-ok": EventSpec(
        "info",
        "Configuration reloaded from {source}: changed {changed}; listeners {moved}; "
        "kept from the command line: {pinned}",
    ),
    "reload-aborted": EventSpec(
        "error",
        "Configuration reload from {source} aborted: its first worker did not boot; the old "
        "workers keep serving, and respawns keep the config accepted at {since}",
    ),
    "reload-refused": EventSpec(
        "error", "Configuration reload refused, still serving the old one: {error}"
    ),
}
"""Every event the fleet emits."""

_CRASH_KINDS = frozenset({"crash", "hung", "boot-failure"})


class FleetEvents:
    """
    Where the fleet's events go.

    :param log: the logger of the lines.
    :param metrics: an object with ``worker_restarted``, ``worker_crashed`` and
        ``worker_exited`` (see :class:`bungate.ops.metrics.MasterMetrics`), or ``None``.
    """

    def __init__(self, log: Logger, metrics: Any = None) -> None:
        self.log = log
        self.metrics = metrics
        self._internal: dict[str, list[Callable[..., None]]] = {}
        self._callbacks: dict[str, list[Callable[..., Any]]] = {}

    def on(self, event: str, callback: Callable[..., Any]) -> None:
        """
        Call ``callback`` on ``event``, with the arguments its :class:`EventSpec` names.

        :raises ValueError: for an event name the fleet never emits.
        """
        if event not in EVENTS:
            known = ", ".join(sorted(EVENTS))
            raise ValueError(f"unknown event {event!r}; the fleet emits: {known}")
        self._callbacks.setdefault(event, []).append(callback)

    def listen(self, event: str, callback: Callable[..., None]) -> None:
        """For the fleet itself: call ``callback(**fields)`` on ``event``, before ``on()``'s."""
        assert event in EVENTS, event
        self._internal.setdefault(event, []).append(callback)

    def emit(self, event: str, **fields: Any) -> None:
        """Report one event: its log line, the metrics, then every callback."""
        spec = EVENTS[event]
        if spec.level is not None:
            getattr(self.log, spec.level)(spec.text, event=event, **fields)
        metrics = self.metrics
        if metrics is not None:
            if event == "worker-exit":
                if fields.get("pid") is not None:
                    metrics.worker_exited(fields["pid"])
                if fields.get("kind") in _CRASH_KINDS:
                    metrics.worker_crashed(fields["worker_id"])
            elif event == "worker-respawn":
                metrics.worker_restarted(fields["worker_id"])
        for hook in self._internal.get(event, ()):
            hook(**fields)
        for callback in list(self._callbacks.get(event, ())):
            try:
                if spec.args is None:
                    callback(**fields)
                else:
                    callback(*(fields[name] for name in spec.args))
            except Exception:
                self.log.failure("Error in a {event} callback", event=event)
