"""Adopting the shared listening socket must leave it non-blocking for the whole fleet."""

from __future__ import annotations

import os
import socket
from typing import Any

import pytest_twisted
from twisted.internet import defer, protocol
from twisted.internet import reactor as _reactor
from twisted.internet.protocol import Factory

from bungate.ops.listeners import bind_listener
from bungate.testing import wait_until
from bungate.worker import ports as sockets
from bungate.worker.ports import adopt_port
from tests.conftest import busier_than_its_peer


def test_adopt_port_keeps_the_shared_socket_non_blocking() -> None:
    # O_NONBLOCK lives on the open file description the master and all workers share;
    # PyPy clears it when it wraps a descriptor in a socket object (CPython does not).
    from twisted.internet import reactor

    master = bind_listener("127.0.0.1", 0)
    try:
        assert not os.get_blocking(master.fileno())
        default = socket.getdefaulttimeout()
        port = adopt_port(reactor, master.fileno(), Factory())
        try:
            assert not os.get_blocking(master.fileno()), "adopt_port made the listener blocking"
            assert not os.get_blocking(port.fileno())
            assert socket.getdefaulttimeout() == default
        finally:
            port.stopListening()
        assert not os.get_blocking(master.fileno())
    finally:
        master.close()


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
