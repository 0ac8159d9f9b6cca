"""Waiting on the reactor for a condition, with a bounded timeout (never a sleep)."""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet import defer, task

__all__ = ["wait_until"]


def wait_until(
    reactor: Any,
    predicate: Callable[[], Any],
    timeout: float = 10.0,
    interval: float = 0.02,
    what: str = "",
) -> defer.Deferred[Any]:
    """Fire with the first true value of ``predicate()``; fail after ``timeout`` seconds."""
    d: defer.Deferred[Any] = defer.Deferred()
    deadline = reactor.seconds() + timeout

    def check() -> None:
        try:
            value = predicate()
        except Exception:
            loop.stop()
            d.errback()
            return
        if value:
            loop.stop()
            d.callback(value)
        elif reactor.seconds() > deadline:
            loop.stop()
            d.errback(
                defer.TimeoutError(f"timed out after {timeout}s waiting for {what or predicate}")
            )

    loop = task.LoopingCall(check)
    loop.clock = reactor
    loop.start(interval, now=True)
    return d
