"""
Fair accepting on the shared listening socket: workers see each other's connection counts
(internal).

Every worker is woken for a new connection, and the one already running accepts it
first. Under load that is the busiest worker: it is on a core while the idle one waits
to be scheduled. A burst of kept-alive connections then stays on one worker (``bench/run``
saw 50 of wrk's 50 connections on one of two workers, the other idle for the whole run,
and nginx, which wakes one worker per connection, did the same).

The master keeps a small table in memory shared with every worker (an unlinked file each
worker maps): one slot per live worker process holding its number of open client
connections, or -1 while it does not accept. A worker that holds clearly more connections
than another accepting worker leaves the next connection to it for a moment
(:data:`YIELD_FOR`): it stops watching the socket, and the idler worker, woken by the same
connection, takes it. If no one has by then, the worker accepts it anyway, and stops
deferring for a while (:data:`TRUST_AGAIN_AFTER`), so a stuck or starved peer costs a
connection at most ``YIELD_FOR`` of latency, and never the connection.

Stale entries are harmless by construction: a count too high never makes anyone wait, a
count too low costs at most ``YIELD_FOR`` per connection until the master clears the slot
of a dead worker (on its exit) or the peer accepts.

The same table also counts the requests each worker has received, with its worker id and
pid, so that any worker can show the whole fleet's load in ``/health``
(:meth:`AcceptTable.workers`): the share of requests per worker, live, at the price of
one increment in shared memory per request.
"""

from __future__ import annotations

import mmap
import os
import tempfile
from typing import IO, Any, Optional

from bungate.core.fairness import accept_budget, should_yield

__all__ = ["SLOTS", "AcceptTable"]

#: Worker processes the table can hold at once (more are served, without balancing).
SLOTS = 256

_ITEM = 8  # every field is a signed 64-bit integer
# Fields, each an array of SLOTS + 1 integers indexed by slot. Index 0 of CONNECTIONS
# holds the highest slot in use (so readers scan only that far).
_CONNECTIONS, _REQUESTS, _WORKER_ID, _PID = range(4)
_SIZE = _ITEM * 4 * (SLOTS + 1)


def _at(field: int, slot: int) -> int:
    return field * (SLOTS + 1) + slot


class AcceptTable:
    """
    The shared table, seen by the master (which assigns slots) or by one worker.

    :param fd: a descriptor of the table's file (the master's, or the one a worker
        inherited); the table maps it and does not keep it.
    :param slot: this worker's slot (1..SLOTS); ``None`` in the master.
    """

    def __init__(self, fd: int, slot: Optional[int] = None) -> None:
        self._map = mmap.mmap(fd, _SIZE)
        # Both views are kept so that close() can release both before unmapping: PyPy
        # unmaps even while a view still exports the memory.
        self._bytes = memoryview(self._map)
        self._counts: Any = self._bytes.cast("q")
        self.slot = slot
        #: Where this worker counts its requests; kept after :meth:`leave` (a draining
        #: worker still answers).
        self._requests_at = None if slot is None else _at(_REQUESTS, slot)
        self._used: set[int] = set()

    # --- master side ------------------------------------------------------------------

    @classmethod
    def create(cls) -> tuple[AcceptTable, IO[bytes]]:
        """
        Make a table in an unlinked temporary file (nothing to clean up, even after
        ``kill -9``). Keep the returned file open while workers may be spawned: its
        descriptor is what they inherit.
        """
        backing = tempfile.TemporaryFile()
        backing.truncate(_SIZE)
        table = cls(backing.fileno())
        for i in range(1, SLOTS + 1):
            table._counts[i] = -1
        return table, backing

    def claim(self, worker_id: int = 0) -> Optional[int]:
        """
        The lowest free slot, now reserved for a new worker process; ``None`` if full.

        :param worker_id: the worker the process will be, shown by :meth:`workers`.
        """
        for i in range(1, SLOTS + 1):
            if i not in self._used:
                self._used.add(i)
                counts = self._counts
                counts[i] = -1  # not accepting until the worker says so
                counts[_at(_REQUESTS, i)] = 0
                counts[_at(_WORKER_ID, i)] = worker_id
                counts[_at(_PID, i)] = 0  # unknown until the worker starts
                counts[0] = max(self._used)
                return i
        return None

    def release(self, slot: int) -> None:
        """The worker process of ``slot`` is gone: it accepts nothing any more."""
        self._used.discard(slot)
        self._counts[slot] = -1
        self._counts[_at(_PID, slot)] = 0
        self._counts[0] = max(self._used, default=0)

    # --- worker side ------------------------------------------------------------------

    @classmethod
    def inherited(cls, fd: int, slot: int) -> Optional[AcceptTable]:
        """
        The table a worker's master passed down as descriptor ``fd`` with this worker's
        ``slot`` (see :class:`bungate.wire.WorkerLaunch`), or ``None`` when it cannot be
        mapped (the worker then accepts without balancing).

        The inherited descriptor is closed once mapped.
        """
        try:
            if not 1 <= slot <= SLOTS:
                return None
            table = cls(fd, slot)
        except (OSError, ValueError):
            return None
        finally:
            try:
                os.close(fd)
            except OSError:
                pass
        table._counts[_at(_PID, slot)] = os.getpid()
        return table

    def publish(self, connections: int) -> None:
        """Tell the others how many client connections this worker holds."""
        if self.slot is not None:
            self._counts[self.slot] = connections

    def count_request(self) -> None:
        """One more request arrived at this worker (counted before it is answered)."""
        at = self._requests_at
        if at is not None:
            self._counts[at] += 1

    def leave(self) -> None:
        """
        This worker accepts no more (it drains): never leave a connection to it. Later
        :meth:`publish` calls (its connections closing) change nothing.
        """
        if self.slot is not None:
            self._counts[self.slot] = -1
            self.slot = None

    def accept_budget(self) -> int:
        """:func:`accept_budget` for this worker against the others in the table."""
        slot = self.slot
        if slot is None:
            return 1
        counts = self._counts
        others = [counts[i] for i in self._slots_in_use() if i != slot]
        return accept_budget(counts[slot], others)

    def should_yield(self) -> bool:
        """:func:`should_yield` for this worker against the others in the table."""
        slot = self.slot
        if slot is None:
            return False
        counts = self._counts
        others = [counts[i] for i in self._slots_in_use() if i != slot]
        return should_yield(counts[slot], others)

    def workers(self) -> list[dict[str, int]]:
        """
        Every worker process in the table, as its workers see it: ``id``, ``pid``,
        ``connections`` (-1: not accepting) and ``requests`` received so far.
        """
        counts = self._counts
        out = []
        for i in self._slots_in_use():
            pid = int(counts[_at(_PID, i)])
            if pid > 0:
                out.append(
                    {
                        "id": int(counts[_at(_WORKER_ID, i)]),
                        "pid": pid,
                        "connections": int(counts[i]),
                        "requests": int(counts[_at(_REQUESTS, i)]),
                    }
                )
        return out

    def _slots_in_use(self) -> range:
        """Slots 1 up to the highest one the master has claimed (some may be free)."""
        return range(1, min(int(self._counts[0]), SLOTS) + 1)

    def close(self) -> None:
        """Unmap the table."""
        self._counts.release()
        self._bytes.release()
        self._map.close()
