"""
The rate-limit table of ``backend: local``: GCRA state shared by every worker of a master
(internal).

A limit of 100 requests a minute must let 100 through however many workers share the
traffic, and a worker's crash or a rolling restart must neither reset nor double it. So
the state does not live in a worker: the master makes the table in an unlinked temporary
file (nothing to clean up, even after ``kill -9``), every worker inherits its descriptor
and maps it, and each decision is a read-decide-write of one slot of that shared memory,
under a lock that keeps two workers off the same slot. No network round trip.

Layout (native-endian signed 64-bit integers)::

    header, 64 bytes:  magic, version, slots, stripes, probe, 0, 0, 0
    slots * 16 bytes:  (key_hash, tat_us)  for each slot

``key_hash`` is :func:`bungate.core.ratelimit.key_hash` of the route and the client key
(0 marks a slot never used) and ``tat_us`` the key's theoretical arrival time in
microseconds of wall-clock time (:func:`bungate.core.ratelimit.decide_us`). The TAT is an
integer rather than a float so that decisions are exact and identical to the Redis
backend's. The default is 65536 slots, 1 MiB.

The table is an open-addressing hash table. The slots are cut into ``stripes`` groups of
consecutive slots; a key's home slot is ``key_hash mod slots``, and its probe sequence
runs over the next ``probe`` slots *of the same group* (wrapping inside it), so a key only
ever touches slots of one group, and the group's lock is all a decision takes:

- a slot holding the key is used, expired or not;
- otherwise the first slot that is free (never used, or with a TAT in the past: a full
  bucket, the same as an absent key) takes it;
- otherwise (every slot of the sequence holds a live key) the slot with the oldest TAT is
  taken from its key, and :attr:`LimitTable.evictions` counts it. The oldest TAT is the
  key nearest to a full bucket. The bound: an eviction can only hand the evicted key a
  fresh budget earlier than it would have had one (at most one extra ``burst``, once per
  eviction); it never refuses anyone wrongly, since no key's TAT is ever given to another.

Slots are never emptied (only reused), so a key is never behind a never-used slot of its
sequence, and a search stops at the first one.

Locks: POSIX byte-range locks (:func:`fcntl.lockf`) on the bytes of the key's group, held
around each read-decide-write. A lock belongs to the process, so the kernel drops it when
the process dies, ``kill -9`` included: a worker killed inside a decision blocks the
others only until it is gone. (A SIGKILL between the two stores of a slot can leave that
one slot with a mixed pair, which affects one key for at most one bucket time.) The
locks exclude processes, not threads: a process uses the table from one thread (the
reactor's). They also mean a process must not open and close another descriptor of the
table's file while it decides: closing any descriptor of a file drops all the process's
locks on it. Wall-clock time is passed in by the caller (``time.time()``, the reactor's
``seconds()``): it is the clock all the processes share.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import tempfile
from typing import IO, Any, Callable, Union

from bungate.core.ratelimit import Decision, Rate, decide_us, key_hash, seconds_to_us

__all__ = ["DEFAULT_PROBE", "DEFAULT_SLOTS", "DEFAULT_STRIPES", "LimitTable", "LimitTableError"]

#: Slots of a table made without saying: 1 MiB.
DEFAULT_SLOTS = 65536
#: Lock stripes (groups of slots) of a table made without saying.
DEFAULT_STRIPES = 64
#: Slots a key may be placed in, starting at its home slot.
DEFAULT_PROBE = 16

_MAGIC = int.from_bytes(b"BGRLTAB1", "little", signed=True)
_VERSION = 1
_ITEM = 8
_HEADER_ITEMS = 8
_HEADER = _HEADER_ITEMS * _ITEM
_SLOT = 2 * _ITEM
_MAGIC_AT, _VERSION_AT, _SLOTS_AT, _STRIPES_AT, _PROBE_AT = range(5)


class LimitTableError(Exception):
    """The file is not a rate-limit table this code can read, or a size is out of range."""


def _power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def _check_shape(slots: int, stripes: int, probe: int) -> None:
    if not _power_of_two(slots):
        raise LimitTableError(f"slots must be a power of two, not {slots}")
    if not _power_of_two(stripes) or stripes > slots:
        raise LimitTableError(f"stripes must be a power of two up to slots, not {stripes}")
    if not 1 <= probe <= slots // stripes:
        raise LimitTableError(f"probe must be from 1 to slots / stripes, not {probe}")


class LimitTable:
    """
    The shared table, in the master that made it or in a worker that inherited it.

    :param fd: a descriptor of the table's file. It stays open as long as the table (the
        locks are taken on it); with ``owns_fd`` the table closes it in :meth:`close`.
    :param owns_fd: whether :meth:`close` closes ``fd``.
    :raises LimitTableError: if the file holds no table.
    """

    def __init__(self, fd: int, *, owns_fd: bool = False) -> None:
        size = os.fstat(fd).st_size
        if size < _HEADER:
            raise LimitTableError(f"a rate-limit table file of {size} bytes is too short")
        self._map = mmap.mmap(fd, size)
        # Both views are kept so that close() can release them before unmapping (PyPy
        # unmaps even while a view still exports the memory).
        self._bytes = memoryview(self._map)
        self._items: Any = self._bytes.cast("q")
        self._fd = fd
        self._owns_fd = owns_fd
        items = self._items
        try:
            if items[_MAGIC_AT] != _MAGIC or items[_VERSION_AT] != _VERSION:
                raise LimitTableError("the file is not a rate-limit table of this version")
            slots, stripes, probe = (int(items[i]) for i in (_SLOTS_AT, _STRIPES_AT, _PROBE_AT))
            _check_shape(slots, stripes, probe)
            if size < _HEADER + slots * _SLOT:
                raise LimitTableError(f"a table of {slots} slots does not fit {size} bytes")
        except LimitTableError:
            self._unmap()  # the descriptor is the caller's to close
            raise
        #: Slots in the table (a power of two).
        self.slots = slots
        #: Lock stripes: groups of ``slots / stripes`` consecutive slots.
        self.stripes = stripes
        #: Slots a key may be placed in.
        self.probe = probe
        #: Live keys this process took a slot from because its probe sequence was full.
        self.evictions = 0
        self._group = slots // stripes

    # --- master side ----------------------------------------------------------------------

    @classmethod
    def create(
        cls, slots: int = DEFAULT_SLOTS, stripes: int = DEFAULT_STRIPES, probe: int = DEFAULT_PROBE
    ) -> tuple[LimitTable, IO[bytes]]:
        """
        Make an empty table in an unlinked temporary file.

        Keep the returned file open while workers may be spawned: its descriptor is what
        they inherit (pass it in ``childFDs``) and open with :meth:`inherited`.

        :param slots: slots in the table, a power of two (16 bytes each).
        :param stripes: lock stripes, a power of two up to ``slots``.
        :param probe: slots a key may be placed in, from 1 to ``slots / stripes``.
        :returns: the table (using the file's descriptor, which it does not close) and
            the file.
        :raises LimitTableError: for a size out of range.
        """
        _check_shape(slots, stripes, probe)
        backing = tempfile.TemporaryFile()
        try:
            backing.truncate(_HEADER + slots * _SLOT)
            header = mmap.mmap(backing.fileno(), _HEADER)
            try:
                view = memoryview(header).cast("q")
                for at, value in (
                    (_MAGIC_AT, _MAGIC),
                    (_VERSION_AT, _VERSION),
                    (_SLOTS_AT, slots),
                    (_STRIPES_AT, stripes),
                    (_PROBE_AT, probe),
                ):
                    view[at] = value
                view.release()
            finally:
                header.close()
            return cls(backing.fileno()), backing
        except BaseException:
            backing.close()
            raise

    # --- worker side ----------------------------------------------------------------------

    @classmethod
    def inherited(cls, fd: int) -> LimitTable:
        """
        The table whose descriptor this process inherited from its master.

        Unlike the accept table, the descriptor is not closed once mapped: the locks are
        taken on it. It is made close-on-exec and closed by :meth:`close`.

        :param fd: the inherited descriptor.
        :returns: the table.
        :raises LimitTableError: if ``fd`` holds no table (``fd`` is then closed).
        :raises OSError: if ``fd`` is not open.
        """
        try:
            os.set_inheritable(fd, False)
            return cls(fd, owns_fd=True)
        except BaseException:
            try:
                os.close(fd)
            except OSError:
                pass
            raise

    # --- decisions ------------------------------------------------------------------------

    def decide(
        self,
        route: str,
        key: bytes,
        rate: Rate,
        now: Union[float, Callable[[], float]],
        cost: int = 1,
    ) -> Decision:
        """
        GCRA for one request of ``key`` on ``route``, exact across every process.

        :param route: the route's name.
        :param key: what the route limits by (a client address, an API key...).
        :param rate: the route's limit.
        :param now: wall-clock time in seconds (the same clock in every process), or the
            clock itself: it is then read once the key's lock is held, so a process that
            read the time before another one took the lock cannot decide with an
            earlier time than a decision already stored (its ``remaining`` would come
            out one short).
        :param cost: how many requests this one counts as.
        :returns: the decision; the key's state is updated when it is allowed.
        :raises ValueError: for a cost out of range.
        """
        wanted = key_hash(route, key)
        home = wanted & (self.slots - 1)
        group = self._group
        first = home & ~(group - 1)
        lock_start = _HEADER + first * _SLOT
        lock_length = group * _SLOT
        items = self._items
        fcntl.lockf(self._fd, fcntl.LOCK_EX, lock_length, lock_start)
        try:
            now_us = seconds_to_us(now() if callable(now) else now)
            found = free = oldest = -1
            oldest_tat = 0
            for i in range(self.probe):
                slot = first + ((home + i) & (group - 1))
                at = _HEADER_ITEMS + 2 * slot
                held = items[at]
                if held == wanted:
                    found = slot
                    break
                if held == 0:
                    if free < 0:
                        free = slot
                    break
                tat = items[at + 1]
                if tat <= now_us:
                    if free < 0:
                        free = slot
                elif oldest < 0 or tat < oldest_tat:
                    oldest, oldest_tat = slot, tat
            if found >= 0:
                at = _HEADER_ITEMS + 2 * found + 1
                stored = items[at]
                decision, new_tat = decide_us(rate, stored, now_us, cost)
                if new_tat != stored:
                    items[at] = new_tat
                return decision
            decision, new_tat = decide_us(rate, None, now_us, cost)
            if decision.allowed:
                if free < 0:
                    free = oldest
                    self.evictions += 1
                at = _HEADER_ITEMS + 2 * free
                items[at + 1] = new_tat
                items[at] = wanted
            return decision
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN, lock_length, lock_start)

    def lock_range(self, route: str, key: bytes) -> tuple[int, int]:
        """
        The bytes of the file that a decision on ``key`` locks (for tools and tests).

        :param route: the route's name.
        :param key: the client key.
        :returns: ``(start, length)``, as :func:`fcntl.lockf` takes them.
        """
        group = self._group
        first = key_hash(route, key) & (self.slots - 1) & ~(group - 1)
        return _HEADER + first * _SLOT, group * _SLOT

    def used_slots(self) -> int:
        """
        Slots that hold a key, live or expired (a scan: for metrics, not per request).

        :returns: the count.
        """
        items = self._items
        return sum(1 for s in range(self.slots) if items[_HEADER_ITEMS + 2 * s] != 0)

    def _unmap(self) -> None:
        self._items.release()
        self._bytes.release()
        self._map.close()

    def close(self) -> None:
        """Unmap the table, and close its descriptor if the table owns it."""
        self._unmap()
        if self._owns_fd:
            try:
                os.close(self._fd)
            except OSError:
                pass
