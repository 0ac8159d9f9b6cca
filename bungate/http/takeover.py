"""
Handing a live connection from the protocol that serves it to another one.

A WebSocket tunnel takes over both the client's connection (from twisted.web's channel)
and the upstream's (from the pool) once the upstream switched protocols; HTTP/2 takes
over a connection from the HTTP/1.1 channel on its first bytes. Twisted has no public way
to swap a transport's protocol, so this is the one place that knows how, for plain TCP and
both ways TLS is layered on it.
"""

from __future__ import annotations

from typing import Any, List

from twisted.internet.interfaces import IPushProducer
from twisted.protocols.policies import ProtocolWrapper
from zope.interface import implementer

__all__ = ["channel_leftover", "take_over"]


@implementer(IPushProducer)
class _NoProducer:
    """Stands in for a retired protocol's network producer: ignores every call."""

    def pauseProducing(self) -> None:
        """Ignored."""

    def resumeProducing(self) -> None:
        """Ignored."""

    def stopProducing(self) -> None:
        """Ignored."""

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        """Ignored."""

    def unregisterProducer(self) -> None:
        """Ignored."""


def _retire(old: Any) -> None:
    """Cut a protocol off from the transport that is being taken from it."""
    if old is None:
        return
    inner = getattr(old, "_channel", None)  # twisted.web's _GenericHTTPChannelProtocol
    for protocol in (old, inner):
        if protocol is None:
            continue
        set_timeout = getattr(protocol, "setTimeout", None)
        if callable(set_timeout):  # policies.TimeoutMixin (HTTPChannel)
            set_timeout(None)
        if hasattr(protocol, "_networkProducer"):
            # HTTPChannel resumes or pauses its transport through this when a request
            # ends or its own buffer fills; it must not touch the tunnel's transport.
            protocol._networkProducer = _NoProducer()
        protocol.transport = None
        protocol.connected = 0


def take_over(transport: Any, protocol: Any) -> Any:
    """
    Detach ``transport`` from the protocol it serves and connect ``protocol`` to it.

    Works for a TCP transport (its ``protocol`` is replaced), a TLS connection made by a
    ``TLSMemoryBIOFactory`` (the ``TLSMemoryBIOProtocol`` is the transport; its
    ``wrappedProtocol`` is replaced, decryption carries on) and TLS started on the TCP
    transport itself (its protocol is the TLS wrapper). The old protocol never hears of the
    connection again (not even ``connectionLost``): the caller does its bookkeeping. Its
    producer registration on the transport is dropped, its timeout cancelled and its
    ``transport`` set to ``None``. The transport is left as it was, paused or reading.

    :param transport: ``request.channel.transport`` on the client side, the upstream
        connection protocol's ``transport`` on the other.
    :param protocol: the new protocol; its ``makeConnection`` is called.
    :returns: the transport ``protocol`` writes to (``transport`` itself).
    """
    old: Any
    if isinstance(transport, ProtocolWrapper):
        old = transport.wrappedProtocol
        transport.wrappedProtocol = protocol
    else:
        current = getattr(transport, "protocol", None)
        if isinstance(current, ProtocolWrapper):
            old = current.wrappedProtocol
            current.wrappedProtocol = protocol
        else:
            old = current
            transport.protocol = protocol
    transport.unregisterProducer()
    _retire(old)
    protocol.makeConnection(transport)
    return transport


def channel_leftover(channel: Any) -> bytes:
    """
    Take the bytes a twisted.web ``HTTPChannel`` read after the request it is serving.

    While a request is served, the channel keeps what arrives after it (it would parse it
    as the next request once the answer is done); after a 101 those bytes are the
    client's first WebSocket frames. They are removed from the channel.

    Relies on ``HTTPChannel._dataBuffer`` and ``LineReceiver._buffer`` (checked against the
    Twisted release this project pins); a channel without them has nothing left over.
    """
    channel = getattr(channel, "_channel", channel)  # _GenericHTTPChannelProtocol
    pieces: List[bytes] = list(getattr(channel, "_dataBuffer", None) or ())
    if pieces:
        channel._dataBuffer = []
    rest = getattr(channel, "_buffer", b"")
    if rest:
        channel._buffer = b""
        pieces.append(rest)
    return b"".join(pieces)
