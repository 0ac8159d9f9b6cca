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
from tests.conftest import busier_than_its_peer, worker_view


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


@pytest_twisted.inlineCallbacks
def test_a_burst_of_connections_is_drained_in_a_few_wake_ups(table):
    """
    At one connection per wake-up a busy worker (a few dozen wake-ups a second) leaves a
    burst of a thousand queued for seconds; its fair share is taken in big bites instead.
    """
    listener = bind_listener("127.0.0.1", 0, 512)
    view = worker_view(table, table.claim())
    view.publish(0)  # alone in the table
    factory = counting_factory()
    port: Any = adopt_port(_reactor, listener.fileno(), factory, peers=view)
    wake_ups = []
    accept = port._accept
    port._accept = lambda: (wake_ups.append(1), accept())[1]
    clients = []
    try:
        port.stopReading()  # the burst arrives while the worker is busy elsewhere
        clients = [socket.create_connection(listener.getsockname()) for _ in range(200)]
        port.startReading()
        yield wait_until(_reactor, lambda: len(factory.accepted) == 200, timeout=10)
        assert len(wake_ups) <= 8, len(wake_ups)  # 200 / 64, not 200
    finally:
        for c in clients:
            c.close()
        yield port.stopListening()
        listener.close()


# --- out of file descriptors ----------------------------------------------------------

HOLDER = r"""
import os, resource, signal, sys
from twisted.internet import protocol, reactor
from twisted.logger import globalLogBeginner, textFileLogObserver
from bungate.ops.listeners import bind_listener
from bungate.worker.ports import adopt_port

class Hold(protocol.Protocol):
    def connectionMade(self):
        self.transport.write(b"hi")  # and keeps the connection open

globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)], redirectStandardIO=False)
listener = bind_listener("127.0.0.1", 0, 256)
adopt_port(reactor, listener.fileno(), protocol.Factory.forProtocol(Hold), balanced=True)
opened = len(os.listdir("/proc/self/fd"))
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (opened + 6, hard))
signal.signal(signal.SIGTERM, lambda *_: reactor.callFromThread(reactor.stop))
print("PORT", listener.getsockname()[1], flush=True)
reactor.run()
"""


def test_running_out_of_descriptors_logs_a_count_once_a_second_and_recovers() -> None:
    """
    A worker at its fd limit: it logs one line a second with a count (Twisted alone logs
    three lines per connection, per wake-up), pauses accepting, and serves again once
    descriptors are free.
    """
    import select
    import subprocess
    import sys
    import time

    child = subprocess.Popen(
        [sys.executable, "-c", HOLDER], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=0
    )
    assert child.stdout is not None
    lines: list[str] = []

    def read_until(word: str, timeout: float, times: int = 1) -> None:
        """Read the holder's output until ``word`` appeared ``times`` times (bounded)."""
        deadline = time.monotonic() + timeout
        while sum(word in line for line in lines) < times:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([child.stdout], [], [], max(0.0, left))
            assert ready and left > 0, f"no {word!r} x{times} in {timeout}s: {lines}"
            line = child.stdout.readline().decode()  # type: ignore[union-attr]
            assert line, f"the holder exited: {lines}"
            lines.append(line)

    clients: list[socket.socket] = []
    try:
        read_until("PORT ", 20)
        port = int(next(x for x in lines if x.startswith("PORT ")).split()[1])
        began = time.monotonic()
        clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(80)]
        # It runs at its limit a while: a few summaries, each a second apart at least.
        read_until("Out of file descriptors", 20, times=3)
        served = sum(1 for c in clients if _answer(c) == b"hi")
        assert 0 < served <= 8, served  # it holds what its descriptors allow
        for c in clients:
            c.close()
        # Descriptors are free again: a new client is served.
        again = socket.create_connection(("127.0.0.1", port), timeout=10)
        assert again.recv(2) == b"hi"
        again.close()
        elapsed = time.monotonic() - began
        child.terminate()
        out, _ = child.communicate(timeout=20)
        lines.extend(out.decode().splitlines())
    finally:
        for c in clients:
            c.close()
        if child.poll() is None:
            child.kill()
            child.wait()
    text = "".join(lines)
    assert not [x for x in lines if "EMFILE recovery" in x or "releasing" in x], text
    summaries = [x for x in lines if "Out of file descriptors" in x]
    assert len(summaries) <= elapsed + 2, text  # once a second at most
    assert all("ulimit -n" in x and "refused" in x for x in summaries), text


def _answer(client: socket.socket) -> bytes:
    """What the holder said on a connection so far: b"hi", b"" (refused) or nothing."""
    import select

    ready, _, _ = select.select([client], [], [], 0)
    if not ready:
        return b"?"
    try:
        return client.recv(2)
    except OSError:
        return b""
