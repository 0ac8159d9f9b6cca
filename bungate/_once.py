"""A one-shot event that any number of callers can wait on."""

from __future__ import annotations

from typing import Any, Generic, TypeVar

from twisted.internet import defer

__all__ = ["Once"]

T = TypeVar("T")


class Once(Generic[T]):
    """
    Fires once with a value; :meth:`wait` gives each caller its own Deferred.

    Used for "drained", "closed" and "stopped": many callers may ask, and none of them
    can break the others' callback chains.
    """

    def __init__(self) -> None:
        self.fired = False
        self.value: Any = None
        self._waiters: list[defer.Deferred[T]] = []

    def wait(self) -> defer.Deferred[T]:
        """A Deferred that fires with the value (at once if already fired)."""
        if self.fired:
            return defer.succeed(self.value)
        d: defer.Deferred[T] = defer.Deferred()
        self._waiters.append(d)
        return d

    def fire(self, value: T) -> None:
        """Fire every waiter; later calls are ignored."""
        if self.fired:
            return
        self.fired, self.value = True, value
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(value)
