"""The fair-accepting rule: when a busier worker leaves a connection to an idler one."""

from __future__ import annotations

from typing import List

import pytest

from bungate.core.fairness import should_yield


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
