"""
The restart policy of a worker slot: pure logic, with the clock passed in.

A slot's counters belong to the slot and survive its respawns, so the lifetime limit
(``max_restarts``) and the sliding-window limit (``respawn_threshold`` restarts within
``respawn_threshold_time`` seconds) really do trip on a crash loop.

Delays: the first respawn is immediate; after that ``restart_delay`` doubles with each
consecutive quick failure, with up to 25% random jitter, capped at ``max_delay``. A worker
that ran longer than the window before dying starts the backoff afresh.
"""

from __future__ import annotations

import random
from collections import deque
from typing import Optional

import attrs

__all__ = ["Decision", "RestartPolicy"]


@attrs.frozen
class Decision:
    """
    What to do after a worker of a slot exited.

    :ivar respawn: whether to start a replacement.
    :ivar delay: seconds to wait before starting it.
    :ivar reason: why not, when ``respawn`` is false (for logs and events).
    """

    respawn: bool
    delay: float = 0.0
    reason: str = ""


@attrs.define
class RestartPolicy:
    """
    Decides whether and when a slot's worker is respawned.

    :param max_restarts: restarts allowed over the slot's whole life.
    :param threshold: restarts allowed within ``window`` seconds.
    :param window: the sliding window, in seconds.
    :param base_delay: the delay of the second restart; doubles after that.
    :param max_delay: the cap on any delay.
    :param jitter: the fraction of random extra delay (0.25 = up to 25% more).
    :param rng: the random source (seed it in tests).

    The limits have no defaults here: they come from the ``cluster`` section of the
    config, whose schema is the one place defaults are written.
    """

    max_restarts: int
    threshold: int
    window: float
    base_delay: float
    max_delay: float
    jitter: float = 0.25
    rng: random.Random = attrs.field(factory=random.Random)
    restarts: int = 0
    _recent: deque[float] = attrs.field(factory=deque)
    _streak: int = 0

    def decide(self, now: float, uptime: Optional[float] = None) -> Decision:
        """
        Record that the slot's worker exited unexpectedly at ``now`` and decide.

        :param now: the clock's current time.
        :param uptime: how long the worker ran; a worker that lived longer than the
            window resets the backoff streak (not the lifetime count).
        """
        if uptime is not None and uptime >= self.window:
            self._streak = 0
        while self._recent and now - self._recent[0] >= self.window:
            self._recent.popleft()
        if self.restarts >= self.max_restarts:
            return Decision(
                False, reason=f"reached max_restarts ({self.max_restarts}) for this slot"
            )
        if len(self._recent) >= self.threshold:
            return Decision(
                False,
                reason=(
                    f"restarted {len(self._recent)} times within {self.window:g}s "
                    f"(respawn_threshold {self.threshold})"
                ),
            )
        delay = self.next_delay()
        self.restarts += 1
        self._streak += 1
        self._recent.append(now)
        return Decision(True, delay=delay)

    def next_delay(self) -> float:
        """The delay the next respawn would wait (0 for the first of a streak)."""
        if self._streak == 0:
            return 0.0
        delay = min(self.max_delay, self.base_delay * (2 ** (self._streak - 1)))
        delay += delay * self.jitter * self.rng.random()
        return float(min(self.max_delay, delay))

    def recovered(self) -> None:
        """The worker has been running for a while: the next failure starts a new streak."""
        self._streak = 0
