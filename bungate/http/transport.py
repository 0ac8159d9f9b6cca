"""
TCP transports that send at once instead of one reactor turn later.

Twisted's ``transport.write`` only buffers and registers the socket for writability;
the bytes leave on the reactor's next turn, after ``epoll_wait`` reports the socket
writable, and the registration is undone once the buffer is empty. For a proxy that is
two ``epoll_ctl`` calls and one more wake-up per write, two writes per proxied request:
``strace -c`` of a PyPy worker under load counted 18,852 ``epoll_ctl`` next to 9,421
``sendto`` and 9,430 ``recvfrom`` — half the system calls, for nothing.

The transports here send while the socket's buffer is empty, as nginx and asyncio do.
Writes made while a transport delivers received data (``doRead``: the protocol answers,
or relays an upstream's bytes to a client) are gathered and sent once that delivery
returns, so a response head and body written separately still leave in one ``send``.
Anything unusual hands back to Twisted's own path: bytes already queued, a send that
took only part (the rest is queued and the reactor waits for writability), an error
(``doWrite`` meets it again and closes the connection the usual way), a connection
closing, a paused or pull producer, TLS started on the transport itself.

Sockets also get ``TCP_NODELAY``: a write made outside a delivery (a timer's answer)
goes out alone, and Nagle's algorithm would hold a second small one until the peer's
delayed acknowledgement.
"""

from __future__ import annotations

import platform
import socket
from typing import Any, List, Optional

from twisted.internet import tcp
from twisted.logger import Logger

__all__ = [
    "TWISTED_INTERNALS",
    "EagerClient",
    "EagerPort",
    "EagerServer",
    "eager_writes",
    "make_eager",
    "missing_internals",
]

_log = Logger()

#: The private attributes of Twisted's TCP transports this module relies on. A Twisted
#: release without one of them turns eager writes off (with a warning), and the test
#: suite fails loudly on it.
TWISTED_INTERNALS = (
    "dataBuffer",
    "offset",
    "_tempDataBuffer",
    "_tempDataLen",
    "_writeDisconnected",
    "_writeDisconnecting",
    "_aborting",
    "producer",
    "streamingProducer",
    "producerPaused",
    "TLS",
    "_maybePauseProducer",
    "startWriting",
    "doRead",
)


def missing_internals(transport: Any = None) -> list[str]:
    """
    The names of :data:`TWISTED_INTERNALS` missing from ``transport`` (a live TCP
    connection), or, without one, from the ``tcp.Server`` class (the attributes set only
    in ``__init__`` are then taken on trust).
    """
    if transport is not None:
        return [name for name in TWISTED_INTERNALS if not hasattr(transport, name)]
    per_instance = {"_tempDataBuffer", "_tempDataLen"}
    return [n for n in TWISTED_INTERNALS if n not in per_instance and not hasattr(tcp.Server, n)]


def eager_writes(setting: str) -> bool:
    """
    Whether to use the eager transports for ``server.eager_writes``.

    ``auto`` turns them on under PyPy only, where ``bench/run`` measured them to pay
    (see docs/performance.md); on CPython the saving per request is within the noise. A
    Twisted whose internals changed gets them off whatever the setting, with a warning.
    """
    if setting == "off":
        return False
    missing = missing_internals()
    if missing:
        _log.warn(
            "Eager writes are off: this Twisted lacks {names} (server.eager_writes: {setting})",
            names=", ".join(missing),
            setting=setting,
        )
        return False
    if setting == "on":
        return True
    return platform.python_implementation() == "PyPy"


#: Transports written to during the current delivery, to send when it returns.
_gathered: List[_EagerWrites] = []
#: True while a delivery (``doRead``) of an eager transport runs.
_delivering = False


class _EagerWrites:
    """Mixin for ``tcp.Connection`` subclasses; see the module docstring."""

    # Provided by tcp.Connection / abstract.FileDescriptor.
    socket: socket.socket
    connected: int
    disconnecting: int
    dataBuffer: bytes
    offset: int
    _tempDataBuffer: List[bytes]
    _tempDataLen: int
    _writeDisconnected: bool
    _writeDisconnecting: bool
    _aborting: bool
    producer: Any
    streamingProducer: bool
    producerPaused: bool
    TLS: bool

    #: Written to during the current delivery: the bytes wait in ``_tempDataBuffer``.
    _gathering_writes = False

    def _may_send_now(self) -> bool:
        """Nothing queued for the reactor and nothing that needs its write path."""
        return bool(
            self.connected
            and not self.disconnecting
            and not self._writeDisconnecting
            and not self._writeDisconnected
            and not self._aborting
            and not self.TLS
            and not self._tempDataBuffer
            and self.offset == len(self.dataBuffer)
            and (self.producer is None or (self.streamingProducer and not self.producerPaused))
        )

    def write(self, data: bytes) -> None:
        """Send ``data`` now, or when the current delivery returns, if nothing is queued."""
        if self._gathering_writes and isinstance(data, bytes):
            if data and self.connected and not self._writeDisconnected:
                self._tempDataBuffer.append(data)
                self._tempDataLen += len(data)
                self._maybePauseProducer()  # type: ignore[attr-defined]
            return
        if not data or not isinstance(data, bytes) or not self._may_send_now():
            super().write(data)  # type: ignore[misc]
        elif _delivering:
            self._gathering_writes = True
            self._tempDataBuffer.append(data)
            self._tempDataLen = len(data)
            _gathered.append(self)
        else:
            self._send(data)

    def writeSequence(self, iovec: Any) -> None:
        """As :meth:`write`, with the pieces joined."""
        self.write(b"".join(iovec))

    def doRead(self) -> Any:
        """Deliver received bytes; then send what the delivery wrote to eager transports."""
        global _delivering
        if _delivering:  # deliveries do not nest; should one, the outer one sends
            return super().doRead()  # type: ignore[misc]
        _delivering = True
        try:
            return super().doRead()  # type: ignore[misc]
        finally:
            _delivering = False
            _send_gathered()

    def _send(self, data: bytes) -> None:
        """Send ``data`` with an empty buffer; queue for the reactor whatever is left."""
        try:
            sent = self.socket.send(data)
        except OSError:
            # EAGAIN, EINTR, or an error that doWrite will meet and report as usual.
            sent = 0
        if sent < len(data):
            self.dataBuffer = data
            self.offset = sent
            self._maybePauseProducer()  # type: ignore[attr-defined]
            self.startWriting()  # type: ignore[attr-defined]

    def _send_gathering(self) -> None:
        """
        Send the bytes written during a delivery, by the same rule as :meth:`write`:
        at once when nothing stands in the way, else through Twisted's path (a closing
        connection, a paused or pull producer: the reactor writes them and resumes it).
        """
        self._gathering_writes = False
        pieces = self._tempDataBuffer
        if not pieces:
            return
        self._tempDataBuffer = []
        self._tempDataLen = 0
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        if self._may_send_now():
            self._send(data)
        else:
            super().write(data)  # type: ignore[misc]


def _send_gathered() -> None:
    """Send for every transport written to during the delivery that just returned."""
    while _gathered:
        transport = _gathered.pop(0)
        try:
            transport._send_gathering()
        except Exception:
            # A producer's pause/resume failed: log it, and still send for the others.
            _log.failure("Sending for {transport!r}", transport=transport)


def _no_delay(transport: Any) -> None:
    try:
        transport.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass  # not TCP (or already gone): nothing to tune


class EagerServer(_EagerWrites, tcp.Server):
    """An accepted TCP connection that sends without waiting for the next reactor turn."""

    def __init__(self, sock: socket.socket, *args: Any, **kwargs: Any) -> None:
        super().__init__(sock, *args, **kwargs)
        _no_delay(self)


class EagerClient(_EagerWrites, tcp.Client):
    """An outgoing TCP connection that sends without waiting for the next reactor turn."""


class EagerPort(tcp.Port):
    """A TCP port whose connections are :class:`EagerServer` transports."""

    transport = EagerServer


def make_eager(transport: Optional[Any]) -> None:
    """
    Make an established outgoing TCP connection an :class:`EagerClient`.

    Endpoints build their transports themselves (``HostnameEndpoint`` races several
    addresses), so an upstream connection is switched once it is connected: a plain
    ``tcp.Client``, or the one under a TLS wrapper. Anything else (a test's fake
    transport, a UNIX socket) keeps Twisted's own write path.
    """
    for _ in range(3):
        if transport is None or type(transport) is EagerClient:
            return
        if type(transport) is tcp.Client:
            transport.__class__ = EagerClient
            _no_delay(transport)
            return
        transport = getattr(transport, "transport", None)
