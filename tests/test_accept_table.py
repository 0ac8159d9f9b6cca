"""The accept table both processes map: slots, connection counts, request counts."""

from __future__ import annotations

import os

from bungate.accept_table import SLOTS, AcceptTable
from tests.conftest import worker_view


def test_the_master_hands_out_slots_and_clears_those_of_gone_workers(table) -> None:
    a, b = table.claim(), table.claim()
    assert (a, b) == (1, 2)
    one, two = worker_view(table, a), worker_view(table, b)
    one.publish(30)
    two.publish(20)
    assert one.should_yield() and not two.should_yield()
    two.leave()  # draining: never leave a connection to it
    assert not one.should_yield()
    two.publish(20)  # its connections closing while it drains change nothing
    assert not one.should_yield()
    worker_view(table, b).publish(20)  # a worker killed before it could leave()
    assert one.should_yield()
    table.release(b)  # its process exited: the master clears its slot
    assert not one.should_yield()
    assert table.claim() == 2  # reused, and not accepting until its worker publishes
    assert not one.should_yield()


def test_workers_count_their_requests_and_every_worker_sees_the_fleet(table) -> None:
    a, b = table.claim(worker_id=1), table.claim(worker_id=2)
    one, two = worker_view(table, a), worker_view(table, b)
    one.publish(3)
    two.publish(0)
    for _ in range(5):
        one.count_request()
    two.count_request()
    one.leave()  # a draining worker still answers, and still counts
    one.count_request()
    pid = os.getpid()
    assert two.workers() == [
        {"id": 1, "pid": pid, "connections": -1, "requests": 6},
        {"id": 2, "pid": pid, "connections": 0, "requests": 1},
    ]
    table.release(a)  # gone: no longer listed; its replacement starts from zero
    assert [w["id"] for w in two.workers()] == [2]
    assert table.claim(worker_id=1) == a
    assert [w["id"] for w in two.workers()] == [2]  # listed once its process maps the table
    assert worker_view(table, a).workers()[0] == {
        "id": 1, "pid": pid, "connections": -1, "requests": 0,
    }  # fmt: skip


def test_a_full_table_serves_without_balancing(table) -> None:
    claimed = [table.claim() for _ in range(SLOTS)]
    assert claimed == list(range(1, SLOTS + 1))
    assert table.claim() is None


def test_a_table_that_cannot_be_mapped_means_no_balancing() -> None:
    # (what the environment may say is parsed by bungate.wire: see tests/test_wire.py)
    assert AcceptTable.inherited(999999, 1) is None  # no such descriptor
    assert AcceptTable.inherited(os.open(os.devnull, os.O_RDONLY), 0) is None  # no slot 0
    assert AcceptTable.inherited(os.open(os.devnull, os.O_RDONLY), SLOTS + 1) is None
