"""
WebSocket tunnels: once an upstream has answered ``101 Switching Protocols``, the client
connection and the upstream connection are spliced together and bytes flow both ways
untouched, until either side closes.

Handing over. The proxy reads the upgrade request and the 101 answer with its own HTTP
machinery (twisted.web's ``HTTPChannel`` on the client side, the upstream pool's connection
protocol on the other). :func:`take_over` detaches a transport from that protocol and
connects a new one, the way autobahn's ``WebSocketResource.render`` does: a plain TCP
transport gets a new ``protocol``; a TLS connection (``TLSMemoryBIOProtocol``, a
``ProtocolWrapper``) gets a new ``wrappedProtocol``, so decryption carries on below it. The
old protocol is retired: its timeout is cancelled, its producer registration dropped, and
its ``transport`` set to ``None``, so a late call into it (a request timeout, a request
``finish``) cannot touch a connection that is now the tunnel's. Bytes the old protocol had
already read past the HTTP head are handed to :class:`Tunnel` as ``leftover`` and are
relayed before anything else (:func:`channel_leftover` collects them from an
``HTTPChannel``).

Backpressure. Each side's transport is registered (streaming) as the producer of the other
side's transport, so when one side's write buffer fills up, the other side stops reading
and the kernel's TCP window slows its peer down; the gateway holds at most about a write
buffer (64 KiB) and one read per direction. The registration goes through a thin
stand-in whose ``pauseProducing``/``resumeProducing`` are the transport's own and whose
``stopProducing`` does nothing: Twisted calls ``stopProducing`` (which is
``loseConnection`` for a TCP transport) on a dead transport's producer, and that would
close the other side beneath its TLS layer, with no ``close_notify`` and possibly before
TLS's buffered writes are out. The tunnel closes the other side itself.

Closing. When either side's connection is lost (cleanly or not), the other one is closed
with ``loseConnection``, which sends what is still buffered first; if that takes longer
than ``flush_timeout`` (a peer that stopped reading), it is aborted. ``idle_timeout``
seconds without a byte received in either direction close both sides. A frame that breaks
WebSocket framing (see :mod:`bungate.core.wsframe`) closes both sides; the valid frames
before it are still relayed. ``on_closed`` is called once, when both connections are gone,
with the first cause (:data:`CLIENT_CLOSED`, :data:`UPSTREAM_CLOSED`, :data:`IDLE_TIMEOUT`,
:data:`DRAIN`, ...).

Drain. :meth:`Tunnel.going_away` is for a worker that stops: it ends the WebSocket sessions
with close code 1001 ("going away") instead of cutting TCP connections under them. The
gateway speaks for the server to the client (an unmasked close frame) and for the client
to the upstream (a masked one, with a random key). Each direction has a
:class:`~bungate.core.wsframe.FrameTracker`, so the close frame is written only between two
frames of that direction: at once if the direction is at a frame boundary, else right after
the frame in progress ends. Our choice, and why: a close frame cannot be put inside a frame
(the peer would read it as payload) and cutting the frame short would corrupt the stream,
so the only valid points are boundaries; waiting for the next one costs at most the rest of
one frame, and ``grace`` bounds that wait: a direction still inside a frame when ``grace``
runs out (a peer trickling a huge frame) gets its TCP connection closed without a close
frame, as does a peer that has not closed by then. After its close frame, a direction
relays nothing more, since RFC 6455 forbids data after a close frame and the peer's answering
close frame would be a second one. A direction that has already carried a close frame gets no
second one. Once the client has answered our close frame with its own, the gateway closes the
client's TCP connection (the server's part in RFC 6455, 7.1.1), and the upstream's follows
by the rule above.

The worker's registry of tunnels is :mod:`bungate.http.tunnels`; handing a connection
from its protocol to a tunnel (or to HTTP/2) is :mod:`bungate.http.takeover`.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from bungate._once import Once
from bungate.core.wsframe import CLOSE_GOING_AWAY, FrameError, FrameTracker, close_frame
from bungate.http.takeover import take_over

__all__ = [
    "CLIENT_CLOSED",
    "CLIENT_PROTOCOL_ERROR",
    "CLOSED",
    "DRAIN",
    "IDLE_TIMEOUT",
    "UPSTREAM_CLOSED",
    "UPSTREAM_PROTOCOL_ERROR",
    "Tunnel",
]

_log = Logger(namespace="bungate.tunnel")

#: Why a tunnel closed (the argument of ``on_closed``).
CLIENT_CLOSED = "client_closed"
UPSTREAM_CLOSED = "upstream_closed"
IDLE_TIMEOUT = "idle_timeout"
DRAIN = "drain"
CLIENT_PROTOCOL_ERROR = "client_protocol_error"
UPSTREAM_PROTOCOL_ERROR = "upstream_protocol_error"
CLOSED = "closed"  # Tunnel.close() by the caller

# What a direction does with the bytes it receives.
_RELAY = 0  # pass them on
_CLOSE_AT_BOUNDARY = 1  # pass them on up to the next frame boundary, then our close frame
_SHUT = 2  # our close frame went out: pass nothing more on


# --- the tunnel ---------------------------------------------------------------------------


@implementer(IPushProducer)
class _Throttle:
    """
    One side's transport as the producer of the other side's transport.

    Pausing and resuming are the transport's; stopping is left to the tunnel (see the
    module docstring).
    """

    __slots__ = ("_transport",)

    def __init__(self, transport: Any) -> None:
        self._transport = transport

    def pauseProducing(self) -> None:
        """Stop reading this side while the other side's write buffer is full."""
        self._transport.pauseProducing()

    def resumeProducing(self) -> None:
        """Read this side again."""
        self._transport.resumeProducing()

    def stopProducing(self) -> None:
        """Nothing: the tunnel closes this side itself."""


class _Side(Protocol):
    """One connection of a tunnel; what it receives goes to the other side."""

    transport: Any  # a TCP or TLS transport (with abortConnection, producers)

    def __init__(self, tunnel: Tunnel, name: str, masked: bool) -> None:
        self.tunnel = tunnel
        self.name = name
        #: Frames of the direction *from* this side.
        self.tracker = FrameTracker(masked=masked)
        self.relay = _RELAY
        self.relayed = 0  # bytes from this side passed on to the other
        self.lost = False
        self.peer: _Side = self

    def dataReceived(self, data: bytes) -> None:
        """Bytes from this side's peer."""
        self.tunnel._received(self, data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # type: ignore[assignment]
        """This side's connection is gone."""
        self.tunnel._lost(self, reason)


def _connected(transport: Any) -> bool:
    return bool(getattr(transport, "connected", True)) and not getattr(
        transport, "disconnected", False
    )


class Tunnel:
    """
    Splices a client connection and an upstream connection after a WebSocket upgrade.

    The constructor takes both connections over (:func:`take_over`), writes
    ``client_head`` to the client, relays the leftovers, and from then on relays every
    byte both ways; see the module docstring for backpressure, closing and draining.

    :param client: the client's transport (``request.channel.transport``).
    :param upstream: the upstream connection's transport.
    :param clock: the reactor (``IReactorTime``); a ``Clock`` in tests.
    :param idle_timeout: seconds without a byte in either direction before both sides
        are closed; 0 for no limit.
    :param on_closed: called once, with the reason, when both connections are gone.
    :param client_leftover: bytes read from the client after its request head, relayed
        to the upstream first.
    :param upstream_leftover: bytes read from the upstream after its 101 head, relayed to
        the client first (after ``client_head``).
    :param client_head: written to the client before anything else (the 101 head, if
        the caller has not written it yet).
    :param flush_timeout: seconds a side being closed may take to send what is buffered
        for it before it is aborted.
    :param random_bytes: the source of masking keys (``os.urandom``).
    """

    def __init__(
        self,
        client: Any,
        upstream: Any,
        *,
        clock: Any,
        idle_timeout: float,
        on_closed: Callable[[str], None],
        client_leftover: bytes = b"",
        upstream_leftover: bytes = b"",
        client_head: bytes = b"",
        flush_timeout: float = 10.0,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self._clock = clock
        self._idle_timeout = idle_timeout
        self._flush_timeout = flush_timeout
        self._on_closed = on_closed
        self._random_bytes = random_bytes
        self._reason: Optional[str] = None
        self._closing = False  # a side is lost or being closed: nothing more is relayed
        self._finished = False
        self._draining = False
        self._going_away_reason = b""
        self._idle_call: Any = None
        self._flush_call: Any = None
        self._drain_call: Any = None
        self._done: Once[str] = Once()
        self._last = clock.seconds()

        # Frames from the client are masked; frames from the upstream are not.
        self._client = _Side(self, "client", masked=True)
        self._upstream = _Side(self, "upstream", masked=False)
        self._client.peer, self._upstream.peer = self._upstream, self._client
        already_lost = [
            side
            for side, t in ((self._client, client), (self._upstream, upstream))
            if not _connected(t)
        ]
        take_over(client, self._client)
        take_over(upstream, self._upstream)
        if already_lost:
            # A connection that ended before the handover: its protocol's connectionLost
            # has come and gone, so report it on the next turn (never from in here).
            self._closing = True
            for side in already_lost:
                clock.callLater(0, self._lost, side, Failure(connectionDone))
            return
        if client_head:
            client.write(client_head)
        client.registerProducer(_Throttle(upstream), True)
        upstream.registerProducer(_Throttle(client), True)
        # The old protocols may have paused reading (twisted.web pauses a channel's
        # transport while it buffers the next request); from now on only the other
        # side's write buffer decides.
        client.resumeProducing()
        upstream.resumeProducing()
        if client_leftover:
            self._received(self._client, client_leftover)
        if upstream_leftover:
            self._received(self._upstream, upstream_leftover)
        if idle_timeout > 0 and not self._closing:
            self._idle_call = clock.callLater(idle_timeout, self._check_idle)

    # --- what callers see ---------------------------------------------------------------

    @property
    def client_to_upstream(self) -> int:
        """Bytes relayed from the client to the upstream."""
        return self._client.relayed

    @property
    def upstream_to_client(self) -> int:
        """Bytes relayed from the upstream to the client."""
        return self._upstream.relayed

    @property
    def client_frames(self) -> int:
        """Whole frames the client has sent (relayed or not)."""
        return self._client.tracker.frames

    @property
    def upstream_frames(self) -> int:
        """Whole frames the upstream has sent (relayed or not)."""
        return self._upstream.tracker.frames

    @property
    def closed(self) -> bool:
        """Whether both connections are gone (``on_closed`` has been called)."""
        return self._finished

    @property
    def reason(self) -> Optional[str]:
        """Why the tunnel is closing or closed; ``None`` while it is open."""
        return self._reason

    def when_closed(self) -> defer.Deferred[str]:
        """A Deferred that fires with the reason once both connections are gone."""
        return self._done.wait()

    def close(self, reason: str = CLOSED) -> None:
        """Close both sides (after what is buffered for them is sent)."""
        self._close(reason)

    def abort(self, reason: str = CLOSED) -> None:
        """Abort both connections now."""
        self._close(reason, abort=True)

    def going_away(self, grace: float, reason: bytes = b"") -> None:
        """
        End the WebSocket session for a worker that stops.

        Sends each peer a close frame with code 1001 at the next frame boundary of its
        direction, and closes the TCP connections after ``grace`` seconds if the peers
        have not; see the module docstring. A second call does nothing.

        :param grace: seconds the peers have to answer and close.
        :param reason: the close frame's reason text (UTF-8, at most 123 bytes).
        :raises ValueError: a reason that cannot go in a close frame.
        """
        if self._closing or self._draining:
            return
        close_frame(CLOSE_GOING_AWAY, reason)  # check the reason before anything is sent
        self._draining = True
        self._going_away_reason = reason
        self._reason = DRAIN
        self._drain_call = self._clock.callLater(grace, self._drain_deadline)
        for side in (self._upstream, self._client):
            if side.tracker.close_seen:
                continue  # this direction has carried its close frame already
            if side.tracker.at_boundary:
                self._send_close(side)
            else:
                side.relay = _CLOSE_AT_BOUNDARY
        self._close_client_if_done()

    # --- relaying -----------------------------------------------------------------------

    def _received(self, side: _Side, data: bytes) -> None:
        if self._closing:
            return
        self._last = self._clock.seconds()
        tracker = side.tracker
        relay = side.relay
        if relay == _RELAY:
            try:
                tracker.feed(data)
            except FrameError as e:
                self._violation(side, data, e)
                return
            side.relayed += len(data)
            side.peer.transport.write(data)
        elif relay == _CLOSE_AT_BOUNDARY:
            try:
                n = tracker.feed_to_boundary(data)
            except FrameError as e:
                self._violation(side, data, e)
                return
            if n:
                side.relayed += n
                side.peer.transport.write(data[:n] if n < len(data) else data)
            if tracker.at_boundary:
                self._send_close(side)
                self._follow(side, data[n:])
        else:
            self._follow(side, data)
        if self._draining:
            self._close_client_if_done()

    def _follow(self, side: _Side, data: bytes) -> None:
        """Track bytes that are not relayed (to see a close frame go by)."""
        if data:
            try:
                side.tracker.feed(data)
            except FrameError:
                pass  # nothing of it is relayed; the drain deadline ends the connection

    def _send_close(self, side: _Side) -> None:
        """Write our close frame in the direction from ``side``, to its peer."""
        side.relay = _SHUT
        key = self._random_bytes(4) if side.tracker.masked else None
        frame = close_frame(CLOSE_GOING_AWAY, self._going_away_reason, key)
        side.peer.transport.write(frame)

    def _close_client_if_done(self) -> None:
        """During a drain: the close handshake with the client is complete: close it."""
        if (
            self._upstream.relay == _SHUT
            and self._client.tracker.close_seen
            and not self._client.lost
        ):
            self._end_side(self._client)

    def _violation(self, side: _Side, data: bytes, error: FrameError) -> None:
        valid = data[: error.offset]
        if valid:
            side.relayed += len(valid)
            side.peer.transport.write(valid)
        _log.info(
            "Closing a WebSocket tunnel: the {side} broke framing: {error}",
            side=side.name,
            error=str(error),
        )
        self._close(CLIENT_PROTOCOL_ERROR if side is self._client else UPSTREAM_PROTOCOL_ERROR)

    # --- closing ------------------------------------------------------------------------

    def _lost(self, side: _Side, reason: Failure) -> None:
        if side.lost:
            return
        side.lost = True
        if self._reason is None:
            self._reason = CLIENT_CLOSED if side is self._client else UPSTREAM_CLOSED
        self._closing = True
        self._release()
        peer = side.peer
        if peer.lost:
            self._finish()
        else:
            self._end_side(peer)

    def _close(self, reason: str, abort: bool = False) -> None:
        if self._finished:
            return
        if self._reason is None:
            self._reason = reason
        self._closing = True
        self._release()
        for side in (self._client, self._upstream):
            if not side.lost:
                if abort:
                    side.transport.abortConnection()
                else:
                    self._end_side(side)

    def _end_side(self, side: _Side) -> None:
        """Close one side once what is buffered for it is sent (or abort it, if too slow)."""
        self._release()
        transport: Any = side.transport
        if transport is not None:
            transport.loseConnection()
        if self._flush_call is None:
            self._flush_call = self._clock.callLater(self._flush_timeout, self._abort_rest)

    def _release(self) -> None:
        """Unregister the throttles: a closing transport must not wait for a producer."""
        for side in (self._client, self._upstream):
            transport: Any = side.transport
            # A lost TCP transport has dropped its producer itself.
            if transport is not None and not side.lost:
                transport.unregisterProducer()

    def _abort_rest(self) -> None:
        self._flush_call = None
        for side in (self._client, self._upstream):
            if not side.lost and side.transport is not None:
                side.transport.abortConnection()

    def _drain_deadline(self) -> None:
        self._drain_call = None
        if not self._finished:
            self._close(DRAIN, abort=True)

    def _check_idle(self) -> None:
        self._idle_call = None
        if self._closing:
            return
        idle_for = self._clock.seconds() - self._last
        if idle_for >= self._idle_timeout:
            self._close(IDLE_TIMEOUT)
        else:
            self._idle_call = self._clock.callLater(self._idle_timeout - idle_for, self._check_idle)

    def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        for name in ("_idle_call", "_flush_call", "_drain_call"):
            call = getattr(self, name)
            setattr(self, name, None)
            if call is not None and call.active():
                call.cancel()
        reason = self._reason or CLOSED
        try:
            self._on_closed(reason)
        finally:
            self._done.fire(reason)
