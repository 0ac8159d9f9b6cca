"""Fair accepting: the shared connection-count table and the port that yields."""

from __future__ import annotations

import os
import socket
from typing import Any, List

import pytest
import pytest_twisted
from twisted.internet import defer, protocol
from twisted.internet import reactor as _reactor

from bungate.cluster import sockets
from bungate.cluster.accept import SLOTS, AcceptTable, should_yield
from bungate.cluster.sockets import adopt_port, bind_listener
from bungate.testing import wait_until


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


@pytest.fixture
def table():
    master, backing = AcceptTable.create()
    master.backing = backing  # type: ignore[attr-defined]
    master.views = []  # type: ignore[attr-defined]
    yield master
    for view in master.views:
        view.close()
    master.close()
    backing.close()


def worker_view(master: AcceptTable, slot: int) -> AcceptTable:
    """What a worker inherits: its own descriptor of the table and its slot."""
    view = AcceptTable.inherited(f"{os.dup(master.backing.fileno())}:{slot}")
    assert view is not None
    master.views.append(view)  # closed by the fixture
    return view


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


@pytest.mark.parametrize("value", [None, "", "x", "3", "3:", ":1", "999999:1", "999999:0"])
def test_no_or_a_bad_inherited_table_means_no_balancing(value, monkeypatch) -> None:
    monkeypatch.delenv("BUNGATE_ACCEPT_TABLE", raising=False)
    assert AcceptTable.inherited(value) is None


def busier_than_its_peer(table: AcceptTable) -> AcceptTable:
    """Two workers in the table: the returned one holds 40 connections, the other none."""
    busy, other = table.claim(), table.claim()
    worker_view(table, other).publish(0)
    view = worker_view(table, busy)
    view.publish(40)
    return view


class Counting(protocol.Protocol):
    def connectionMade(self) -> None:
        self.factory.accepted.append(self)  # type: ignore[attr-defined]


def counting_factory() -> Any:
    factory = protocol.Factory.forProtocol(Counting)
    factory.accepted = []  # type: ignore[attr-defined]
    return factory


@pytest_twisted.inlineCallbacks
def test_a_busier_worker_leaves_a_connection_to_an_idler_one(table):
    """Two ports on one shared socket, as two workers: the busier one yields."""
    listener = bind_listener("127.0.0.1", 0)
    busy_view = busier_than_its_peer(table)
    busy_factory, idle_factory = counting_factory(), counting_factory()
    busy = adopt_port(_reactor, listener.fileno(), busy_factory, peers=busy_view)
    idle = adopt_port(_reactor, listener.fileno(), idle_factory)
    clients = []
    try:
        for _ in range(5):
            clients.append(socket.create_connection(listener.getsockname()))
        yield wait_until(_reactor, lambda: len(idle_factory.accepted) == 5, timeout=10)
        assert busy_factory.accepted == []
    finally:
        for c in clients:
            c.close()
        yield defer.gatherResults([busy.stopListening(), idle.stopListening()])
        listener.close()


@pytest_twisted.inlineCallbacks
def test_when_no_one_takes_it_the_busier_worker_accepts_after_a_moment(table, monkeypatch):
    """The idler worker is stuck (it never accepts): nothing is lost, the wait is bounded."""
    # Long enough to see the wait, and no timing race over the trust window.
    monkeypatch.setattr(sockets, "YIELD_FOR", 0.5)
    monkeypatch.setattr(sockets, "TRUST_AGAIN_AFTER", 60.0)
    listener = bind_listener("127.0.0.1", 0)
    view = busier_than_its_peer(table)
    factory = counting_factory()
    port: Any = adopt_port(_reactor, listener.fileno(), factory, peers=view)
    clients = []
    try:
        clients.append(socket.create_connection(listener.getsockname()))
        yield wait_until(_reactor, lambda: port._resume is not None, timeout=10)
        assert factory.accepted == []  # left to the other worker for a moment
        yield wait_until(_reactor, lambda: len(factory.accepted) == 1, timeout=10)
        assert port._trust_again_at > _reactor.seconds()
        # The other one did not take it in time: do not wait for it again for a while.
        clients.append(socket.create_connection(listener.getsockname()))
        yield wait_until(_reactor, lambda: len(factory.accepted) == 2, timeout=10)
        assert port._resume is None
    finally:
        for c in clients:
            c.close()
        yield port.stopListening()
        listener.close()


@pytest_twisted.inlineCallbacks
def test_stopping_while_yielding_cancels_the_resume(table, monkeypatch):
    monkeypatch.setattr(sockets, "YIELD_FOR", 60.0)
    listener = bind_listener("127.0.0.1", 0)
    view = busier_than_its_peer(table)
    port: Any = adopt_port(_reactor, listener.fileno(), counting_factory(), peers=view)
    client = socket.create_connection(listener.getsockname())
    try:
        yield wait_until(_reactor, lambda: port._resume is not None, timeout=10)
        resume = port._resume
        yield port.stopListening()
        assert not resume.active() and port._resume is None
    finally:
        client.close()
        listener.close()
