"""
The fair-accepting rule: when a worker leaves a new connection to a less busy peer.

Pure: the connection counts come from :mod:`bungate.accept_table`, the timing from the
worker's port (:mod:`bungate.worker.ports`).
"""

from __future__ import annotations

__all__ = ["MAX_BATCH", "TRUST_AGAIN_AFTER", "YIELD_FOR", "accept_budget", "should_yield"]

#: How long a busier worker leaves a new connection to an idler one (seconds).
YIELD_FOR = 0.002
#: After the idler worker failed to take a connection in time, accept without deferring
#: for this long (seconds).
TRUST_AGAIN_AFTER = 0.1
#: The most connections a worker accepts in one wake-up.
MAX_BATCH = 64


def _slack(mine: int) -> int:
    return 2 + mine // 8


def should_yield(mine: int, others: list[int]) -> bool:
    """
    Whether a worker with ``mine`` open connections should leave the next one to another.

    :param others: the counts of the other workers (-1: not accepting, ignored).
    :return: true when some accepting worker holds clearly fewer: more than 2 fewer,
        plus one for every 8 this worker holds (so 25/25, 27/23 and small jitter never
        defer, 30/20 does).
    """
    accepting = [n for n in others if n >= 0]
    if not accepting:
        return False
    return min(accepting) + _slack(mine) < mine


def accept_budget(mine: int, others: list[int], most: int = MAX_BATCH) -> int:
    """
    How many waiting connections a worker may accept in one wake-up.

    One per wake-up is fair on a shared socket but too slow for a burst: a busy worker
    wakes a few dozen times a second, so a thousand connections arriving at once would
    wait seconds in the kernel's queue. A worker therefore takes as many as it can
    without becoming clearly busier than the least busy accepting peer (the margin of
    :func:`should_yield`), at least one and at most ``most``; alone, ``most``.
    """
    accepting = [n for n in others if n >= 0]
    if not accepting:
        return most
    room = min(accepting) + _slack(mine) - mine
    return max(1, min(most, room))
