"""
The fair-accepting rule: when a worker leaves a new connection to a less busy peer.

Pure: the connection counts come from :mod:`bungate.accept_table`, the timing from the
worker's port (:mod:`bungate.worker.ports`).
"""

from __future__ import annotations

__all__ = ["TRUST_AGAIN_AFTER", "YIELD_FOR", "should_yield"]

#: How long a busier worker leaves a new connection to an idler one (seconds).
YIELD_FOR = 0.002
#: After the idler worker failed to take a connection in time, accept without deferring
#: for this long (seconds).
TRUST_AGAIN_AFTER = 0.1


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
    return min(accepting) + 2 + mine // 8 < mine
