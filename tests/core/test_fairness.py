"""The fair-accepting rule: when a busier worker leaves a connection to an idler one."""

from __future__ import annotations

from typing import List

import pytest

from bungate.core.fairness import MAX_BATCH, accept_budget, should_yield


@pytest.mark.parametrize(
    "mine, others, expected",
    [
        (25, [25], False),
        (27, [23], False),  # jitter around an even split
        (30, [20], True),
        (3, [0], True),  # idle peer, light load
        (2, [0], False),
        (50, [0, -1], True),
        (50, [-1], False),  # the only other one is draining
        (50, [], False),  # alone
        (40, [35, 10], True),  # the least loaded one counts
        (160, [138], False),  # 160 // 8 = 20 of slack
        (160, [130], True),
    ],
)
def test_should_yield(mine: int, others: List[int], expected: bool) -> None:
    assert should_yield(mine, others) is expected


@pytest.mark.parametrize(
    "mine, others, expected",
    [
        (0, [], MAX_BATCH),  # alone: a burst is taken in big bites
        (0, [-1], MAX_BATCH),  # the only peer is draining
        (0, [0], 2),  # even: the margin of should_yield, no more
        (0, [100], MAX_BATCH),  # the peer holds far more: catch up
        (40, [100], MAX_BATCH),  # 100 + 2 + 5 - 40 = 67, capped
        (50, [40], 1),  # already busier: one at a time (never zero: nothing waits forever)
        (30, [20], 1),
        (160, [150], 12),  # 150 + 2 + 20 - 160
    ],
)
def test_accept_budget(mine: int, others: List[int], expected: int) -> None:
    assert accept_budget(mine, others) == expected


def test_the_budget_never_makes_a_worker_yield_by_itself() -> None:
    """Taking the whole budget leaves a worker at most at the edge of should_yield."""
    for mine in range(0, 300, 7):
        for other in range(0, 300, 11):
            taken = accept_budget(mine, [other])
            if taken > 1:
                assert not should_yield(mine + taken - 1, [other]), (mine, other, taken)
