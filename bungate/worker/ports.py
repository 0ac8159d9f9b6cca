"""
The worker's listening ports, on the sockets its master bound (adopted, never bound here).

All workers share one listening socket (one open file description). Twisted's
``Port.doRead`` accepts up to ``numberAccepts`` connections per wake-up and grows that
number under load, so on a shared socket whichever worker wakes first swallows a burst.
:class:`BalancedPort` accepts one connection per wake-up, as nginx does, so every worker
woken by the kernel gets its turn and the load spreads evenly.
"""

from __future__ import annotations

import contextlib
import os
import socket
from typing import Any, Iterator, Optional

from twisted.internet import tcp
from twisted.internet.interfaces import IListeningPort

from bungate.accept_table import AcceptTable
from bungate.core.fairness import TRUST_AGAIN_AFTER, YIELD_FOR
from bungate.http.transport import EagerServer

__all__ = ["BalancedPort", "adopt_port"]


class BalancedPort(tcp.Port):
    """
    A TCP port that accepts one connection per wake-up (fair on a shared socket).

    With an :class:`~bungate.accept_table.AcceptTable` (``peers``), a worker holding
    clearly more connections than another leaves a new connection to it for
    :data:`~bungate.core.fairness.YIELD_FOR` seconds, then accepts it itself if it is
    still waiting.
    """

    peers: Optional[AcceptTable] = None
    _resume: Any = None
    _must_accept = False
    _trust_again_at = 0.0

    def doRead(self) -> None:
        """Accept a single connection, or leave it to an idler worker for a moment."""
        self.numberAccepts = 1
        peers = self.peers
        if peers is None:
            super().doRead()
            return
        if self._must_accept:
            self._must_accept = False
            before = self.sessionno
            super().doRead()
            if self.sessionno != before:
                # Nobody took it in time (the peer is starved or stuck): stop waiting
                # for it on every connection.
                self._trust_again_at = self._clock.seconds() + TRUST_AGAIN_AFTER
            return
        if self._clock.seconds() >= self._trust_again_at and peers.should_yield():
            self.stopReading()
            self._resume = self._clock.callLater(YIELD_FOR, self._accept_again)
            return
        super().doRead()

    @property
    def _clock(self) -> Any:
        """The port's reactor as a clock (Twisted types it as an ``IReactorFDSet``)."""
        return self.reactor

    def _accept_again(self) -> None:
        self._resume = None
        if self.connected:
            self._must_accept = True
            self.startReading()

    def connectionLost(self, reason: Any) -> None:
        """Stopped listening: forget a pending resume."""
        resume, self._resume = self._resume, None
        if resume is not None and resume.active():
            resume.cancel()
        super().connectionLost(reason)


def adopt_port(
    reactor: Any,
    fd: int,
    factory: Any,
    balanced: bool = True,
    peers: Optional[AcceptTable] = None,
    eager: bool = True,
) -> IListeningPort:
    """
    Serve ``factory`` on an inherited listening socket.

    The descriptor is duplicated; the caller may close ``fd`` afterwards. Stopping the
    port closes only this process's copy: the socket stays open for the others. With
    ``eager``, TCP connections get :mod:`bungate.http.transport`'s eager transports;
    ``balanced`` ports
    accept one connection per wake-up (:class:`BalancedPort`), and with ``peers`` leave
    connections to workers that hold fewer.
    """
    with _nonblocking_default():
        probe = socket.socket(fileno=fd)
        try:
            family = probe.family
        finally:
            probe.detach()
        if family not in (socket.AF_INET, socket.AF_INET6):
            port = reactor.adoptStreamPort(fd, family, factory)
        else:
            kind = BalancedPort if balanced else tcp.Port
            port = kind._fromListeningDescriptor(reactor, fd, family, factory)
            # The class of the connections it accepts (tcp.Port reads self.transport).
            port.transport = EagerServer if eager else tcp.Server
            if balanced:
                port.peers = peers
            port.startListening()
    # Belt and braces: whatever wrapped the descriptor, the shared socket stays non-blocking.
    os.set_blocking(port.fileno(), False)
    return port  # type: ignore[no-any-return]


@contextlib.contextmanager
def _nonblocking_default() -> Iterator[None]:
    """
    Make socket objects created meanwhile non-blocking, not blocking.

    PyPy applies the default timeout to the descriptor of every socket object it wraps
    around an existing fd (``socket.socket(fileno=...)``, ``socket.fromfd``): with the
    default (``None``, blocking) it clears ``O_NONBLOCK``. That flag belongs to the open
    file description, which the master and every worker share: one PyPy worker starting
    would turn the listening socket blocking for the whole fleet, and a worker that lost
    the race for a connection would then sleep in ``accept()`` until the next one came,
    with the connections it already accepted unanswered. CPython never touches the flag.
    """
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(0)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)
