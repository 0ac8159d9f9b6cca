"""
Growing, shrinking and rolling the fleet (the part of
:class:`~bungate.master.fleet.ClusterManager` that changes its slots).

A roll is surge-first and readiness-gated: a replacement starts, and only once it is
ready is an old worker drained and stopped. Every change takes the fleet's lock, so a
roll, a scale and a reload never interleave.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet import defer
from twisted.logger import Logger

from bungate.master.slot import WorkerSlot

__all__ = ["Rolling"]


class Rolling:
    """
    Scaling and rolling (a mixin of :class:`~bungate.master.fleet.ClusterManager`, whose
    slots, lock and events it uses).
    """

    slots: dict[int, WorkerSlot]
    desired: int
    log: Logger
    _lock: defer.DeferredLock
    _stopping: Any
    _rolling: bool
    _roll_again: bool
    # The fleet's, provided by ClusterManager:
    _emit: Callable[..., None]
    _new_slot: Callable[[], WorkerSlot]
    _prune: Callable[[], None]
    _share_fleet: Callable[[], None]
    worker_count: Callable[[], int]

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
        return self._lock.run(self._scale_to, n)

    def _scale_to(self, n: int) -> defer.Deferred[list[int]]:
        current = self.worker_count()
        if n > current:
            return self._scale_up(n - current)
        return self._scale_down(current - n)

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
        self._share_fleet()
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
                ok, _ = yield self._roll_once()
                if not ok or not self._roll_again or self._stopping is not None:
                    return ok
        finally:
            self._rolling = False

    @defer.inlineCallbacks
    def _roll_once(self) -> Any:
        """Fires ``(completed, first_replacement_booted)``."""
        old = sorted((s for s in self.slots.values() if s.live), key=lambda s: s.id)
        self._emit("roll-start", count=len(old))
        booted = False
        for slot in old:
            if self._stopping is not None:
                return False, booted
            if not slot.live:
                continue
            fresh = self._new_slot()
            fresh.start()
            ready = yield fresh.when_ready()
            if not ready:
                reason = f"replacement worker {fresh.id} did not become ready ({fresh.status})"
                yield self._stop_slots([fresh])
                self._emit("roll-aborted", reason=reason)
                return False, booted
            booted = True
            self._emit("roll-step", new_id=fresh.id, old_id=slot.id)
            yield self._stop_slots([slot])
        self._emit("roll-done", count=len(old))
        return True, True

    def _stop_slots(self, slots: list[WorkerSlot]) -> defer.Deferred[Any]:
        for slot in slots:
            slot.stop()
        d = defer.gatherResults([s.when_ended() for s in slots])

        def pruned(result: Any) -> Any:
            self._prune()
            return result

        return d.addCallback(pruned)
