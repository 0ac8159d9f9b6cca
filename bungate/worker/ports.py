"""
The worker's listening ports, on the sockets its master bound (adopted, never bound here).

All workers share one listening socket (one open file description). Twisted's
``Port.doRead`` accepts up to ``numberAccepts`` connections per wake-up and grows that
number under load, so on a shared socket whichever worker wakes first swallows a burst.
:class:`BalancedPort` accepts only this worker's share per wake-up: as many waiting
connections as it can take without holding clearly more than the least busy peer (one
when even), so every worker woken by the kernel gets its turn, the load spreads evenly,
and a burst of a thousand connections is still drained within a few wake-ups.

Out of file descriptors (``EMFILE``), Twisted refuses the waiting connections with a
reserved descriptor and logs three lines for each of them, on every wake-up: tens of
thousands of lines a minute. :class:`GuardedPort` counts those events instead and logs
one line a second with the count, and stops accepting for :data:`EMFILE_PAUSE` seconds
(as nginx does), so a worker that still has descriptors takes the next connections.
"""

from __future__ import annotations

import contextlib
import os
import socket
from typing import Any, Iterator, Optional

from twisted.internet import tcp
from twisted.internet.interfaces import IListeningPort
from twisted.logger import ILogObserver, Logger, globalLogPublisher
from zope.interface import implementer

from bungate.accept_table import AcceptTable
from bungate.core.fairness import TRUST_AGAIN_AFTER, YIELD_FOR
from bungate.http.transport import EagerServer

__all__ = ["EMFILE_PAUSE", "AcceptErrors", "BalancedPort", "GuardedPort", "adopt_port"]

#: Seconds a port stops accepting after it ran out of file descriptors.
EMFILE_PAUSE = 0.5

log = Logger(namespace="bungate.worker")


@implementer(ILogObserver)
class AcceptErrors:
    """
    The observer of a port's accept loop: fd exhaustion and other accept errors are
    counted and logged at most once per :attr:`interval` (with the count); every other
    event goes on to the global log.

    :param clock: schedules the summary line.
    :param interval: seconds between two summary lines.
    """

    def __init__(self, clock: Any, interval: float = 1.0) -> None:
        self.clock = clock
        self.interval = interval
        self.exhausted = False  # set by an EMFILE since the port last looked
        self.closed = 0  # connections refused for want of descriptors, not yet logged
        self.errors: dict[str, int] = {}  # other accept errors, not yet logged
        self._last = float("-inf")
        self._pending: Any = None

    def __call__(self, event: dict[str, Any]) -> None:
        """Count an accept-loop event, or pass it on."""
        text = str(event.get("log_format", ""))
        if "EMFILE" in text:
            self.exhausted = True
            if "Closed socket" in text:
                self.closed += 1
            self._schedule()
        elif text.startswith("Could not accept"):
            name = str(event.get("acceptError", "?"))
            self.errors[name] = self.errors.get(name, 0) + 1
            if name in ("EMFILE", "ENFILE"):
                self.exhausted = True
            self._schedule()
        else:
            globalLogPublisher(event)

    def _schedule(self) -> None:
        if self._pending is not None:
            return
        wait = self._last + self.interval - self.clock.seconds()
        if wait <= 0:
            self.flush()
        else:
            self._pending = self.clock.callLater(wait, self.flush)

    def flush(self) -> None:
        """Log what was counted since the last line (nothing if nothing was)."""
        self._pending = None
        self._last = self.clock.seconds()
        closed, self.closed = self.closed, 0
        errors, self.errors = self.errors, {}
        if closed:
            log.error(
                "Out of file descriptors: refused {count} new connection(s) "
                "(limit {limit}; raise it with ulimit -n or systemd's LimitNOFILE, or lower "
                "server.max_connections_per_worker)",
                count=closed,
                limit=_fd_limit(),
            )
        for name, count in sorted(errors.items()):
            log.error(
                "Could not accept {count} new connection(s): {error}", count=count, error=name
            )

    def cancel(self) -> None:
        """The port stopped: log what is pending now."""
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
            self.flush()


def _fd_limit() -> str:
    try:
        import resource

        return str(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    except (ImportError, OSError, ValueError):
        return "?"


class GuardedPort(tcp.Port):
    """A TCP port whose accept errors are counted, not logged one by one (see above)."""

    _errors: Optional[AcceptErrors] = None
    _paused: Any = None

    def startListening(self) -> None:
        """Listen, with this port's own accept-error observer."""
        self._errors = AcceptErrors(self.reactor)
        self._logger = Logger(namespace=type(self)._logger.namespace, observer=self._errors)
        super().startListening()

    def doRead(self) -> None:
        """Accept; out of descriptors, stop accepting for :data:`EMFILE_PAUSE` seconds."""
        self._accept()
        errors = self._errors
        if errors is not None and errors.exhausted:
            errors.exhausted = False
            if self._paused is None and self.connected:
                self.stopReading()
                self._paused = self.reactor.callLater(EMFILE_PAUSE, self._unpause)  # type: ignore[attr-defined]

    def _accept(self) -> None:
        super().doRead()

    def _unpause(self) -> None:
        self._paused = None
        if self.connected:
            self.startReading()

    def connectionLost(self, reason: Any) -> None:
        """Stopped listening: forget a pending resume, log what was counted."""
        paused, self._paused = self._paused, None
        if paused is not None and paused.active():
            paused.cancel()
        if self._errors is not None:
            self._errors.cancel()
        super().connectionLost(reason)


class BalancedPort(GuardedPort):
    """
    A TCP port that accepts its fair share per wake-up (on a shared socket).

    Without an :class:`~bungate.accept_table.AcceptTable` (``peers``) it accepts one
    connection per wake-up. With one, it accepts up to
    :func:`~bungate.core.fairness.accept_budget` connections; a worker holding clearly
    more connections than another leaves a new connection to it for
    :data:`~bungate.core.fairness.YIELD_FOR` seconds, then accepts it itself if it is
    still waiting.
    """

    peers: Optional[AcceptTable] = None
    _resume: Any = None
    _must_accept = False
    _trust_again_at = 0.0

    def _accept(self) -> None:
        """
        Accept what this worker's share allows (:func:`~bungate.core.fairness.
        accept_budget`), or leave the connection to an idler worker for a moment.
        """
        self.numberAccepts = 1
        peers = self.peers
        if peers is None:
            super()._accept()
            return
        if self._must_accept:
            self._must_accept = False
            before = self.sessionno
            super()._accept()
            if self.sessionno != before:
                # Nobody took it in time (the peer is starved or stuck): stop waiting
                # for it on every connection.
                self._trust_again_at = self._clock.seconds() + TRUST_AGAIN_AFTER
            return
        if self._clock.seconds() >= self._trust_again_at and peers.should_yield():
            self.stopReading()
            self._resume = self._clock.callLater(YIELD_FOR, self._accept_again)
            return
        self.numberAccepts = peers.accept_budget()
        super()._accept()

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
            kind = BalancedPort if balanced else GuardedPort
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
