"""
HTTP/2 to clients, through Twisted's own H2 support (``twisted.web._http2`` over the
``h2`` package, ``twisted[http2]``).

A connection starts as a :class:`~bungate.http.channel.GatewayChannel`; when ALPN agreed
on ``h2`` (or a plain listener with ``server.http2_cleartext`` sees the HTTP/2 preface),
its first bytes hand the transport to a :class:`GatewayH2Connection` instead
(:func:`switch_to_h2`). Each stream is a :class:`~bungate.http.site.GatewayRequest`, so
routes, middlewares, policy, limits, the access log and metrics are the same as for
HTTP/1.1; upstreams stay HTTP/1.1, from the pool.

Limits per connection: at most ``server.http2_max_streams`` concurrent streams and a
header list of ``server.max_header_size`` (advertised in SETTINGS and enforced by h2);
Twisted bounds the control frames a client makes us buffer and the rate of stream
resets; HTTP/2 flow control bounds what a client that stops reading makes us hold per
stream. A drain sends GOAWAY (no new streams; streams in flight finish; see
:meth:`GatewayH2Connection.close_when_idle`), then closes the connection once its last
stream is done.
"""

from __future__ import annotations

from typing import Any

import h2.events
import h2.settings
from h2.errors import ErrorCodes
from hyperframe.frame import GoAwayFrame
from twisted.internet.error import ConnectionLost
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web._http2 import H2Connection

from bungate.http.takeover import take_over

__all__ = ["GOAWAY_WAIT", "GatewayH2Connection", "switch_to_h2"]

#: Seconds a drain waits for the client to read its first GOAWAY before the final one.
GOAWAY_WAIT = 1.0
_DRAIN_PING = b"bg-drain"


class GatewayH2Connection(H2Connection):  # type: ignore[misc]
    """
    One HTTP/2 connection that its site can track and drain, as it does a channel.

    :param site: the :class:`~bungate.http.site.GatewaySite`.
    """

    site: Any
    transport: Any
    waiting_for_head = False
    head_since = None
    body_since = None
    rejected = False
    tunneled = False
    #: streams share the connection: a drain sends GOAWAY instead of waiting for it.
    multiplexed = True

    def __init__(self, site: Any) -> None:
        super().__init__(site.clock)
        limits = site.limits
        self.site = site
        self.factory = site
        self.requestFactory = site.requestFactory
        self.timeOut = limits.keepalive_timeout
        self.callLater = site.clock.callLater  # type: ignore[method-assign]
        self.draining = False
        self._refusing = False  # the final GOAWAY is out: new streams are refused
        self._final_goaway: Any = None
        self._ping_answered = False
        receive = self.conn.receive_data

        def receive_data(data: bytes) -> Any:
            events = receive(data)
            for event in events:
                if isinstance(event, h2.events.PingAckReceived) and (
                    event.ping_data == _DRAIN_PING
                ):
                    self._ping_answered = True
            return events

        self.conn.receive_data = receive_data  # type: ignore[method-assign,assignment]
        self.conn.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: limits.http2_max_streams,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: limits.max_header_size,
            },
        )

    @property
    def requests(self) -> list[Any]:
        """The requests of the open streams."""
        return [s._request for s in self.streams.values()]

    def connectionLost(  # type: ignore[override]
        self, reason: Failure = connectionDone, _cancelTimeouts: bool = True
    ) -> None:
        """Unregister from the site."""
        call, self._final_goaway = self._final_goaway, None
        if call is not None and call.active():
            call.cancel()
        super().connectionLost(reason, _cancelTimeouts=_cancelTimeouts)
        self.site.channel_closed(self)

    # --- streams ----------------------------------------------------------------------

    def _requestReceived(self, event: Any) -> None:
        if self._refusing:
            # GOAWAY said no more streams: a client that opens one anyway is told to
            # retry it elsewhere (REFUSED_STREAM is always safe to retry).
            self.conn.reset_stream(event.stream_id, ErrorCodes.REFUSED_STREAM)
            self.transport.write(self.conn.data_to_send())
            return
        super()._requestReceived(event)

    def _requestDataReceived(self, event: Any) -> None:
        if event.stream_id not in self.streams:
            # Answered before its body ended (413) and gone: drop the bytes, and give the
            # connection's flow-control window back.
            try:
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            except Exception:  # the stream is closed in h2's books too: nothing to credit
                pass
            return
        super()._requestDataReceived(event)

    def _requestEnded(self, event: Any) -> None:
        if event.stream_id in self.streams:
            super()._requestEnded(event)

    def _requestAborted(self, event: Any) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is None:
            return
        request = getattr(stream, "_request", None)
        if request is not None and request.finished:
            # The response was complete: Twisted sends END_STREAM in an empty DATA frame
            # of its own after the body, and a client that took the body as complete by
            # its Content-Length resets the stream meanwhile (curl does, with
            # STREAM_CLOSED, for a third of its streams). That costs the server nothing,
            # so it does not count against the Rapid Reset budget (CVE-2023-44487) that
            # Twisted keeps for resets of streams still being answered.
            stream.connectionLost(Failure(ConnectionLost("reset after the response")))
            self._requestDone(event.stream_id)
            return
        super()._requestAborted(event)

    def _requestDone(self, streamID: int) -> None:
        request = getattr(self.streams.get(streamID), "_request", None)
        super()._requestDone(streamID)
        if request is not None and request._over_limit:
            # Answered before the client finished sending: tell it to stop sending
            # (RFC 9113 §8.1: RST_STREAM with NO_ERROR after a complete response).
            try:
                self.conn.reset_stream(streamID, ErrorCodes.NO_ERROR)
                self.transport.write(self.conn.data_to_send())
            except Exception:  # the client ended the stream meanwhile
                pass
        if self._refusing and not self.streams:
            self._close()

    # --- drain ------------------------------------------------------------------------

    def close_when_idle(self) -> None:
        """
        The worker drains: GOAWAY now; close once the streams in flight are done.

        Two GOAWAYs, as RFC 9113 §6.8 advises for a graceful shutdown: the first names
        the highest possible stream id (no new streams, please; none is refused), with a
        PING behind it; once the PING's answer shows the client has read it, or after
        :data:`GOAWAY_WAIT` at most, the second names the last stream really taken.
        Streams the client had sent before it read the first one are served, not
        refused.
        """
        if self.draining or self.transport is None:
            return
        self.draining = True
        # Even with no stream open now: requests may be on their way, and a connection
        # closed under them cannot tell the client which ones were not taken.
        self._goaway(2**31 - 1)
        self.conn.ping(_DRAIN_PING)
        self.transport.write(self.conn.data_to_send())
        self._final_goaway = self.site.clock.callLater(GOAWAY_WAIT, self._last_goaway)

    def _goaway(self, last_stream_id: int) -> None:
        # Written as a frame of its own: h2's close_connection would end the connection
        # for the streams in flight too.
        frame = GoAwayFrame(0)
        frame.last_stream_id = last_stream_id
        frame.error_code = ErrorCodes.NO_ERROR
        self.transport.write(frame.serialize())

    def _last_goaway(self) -> None:
        call, self._final_goaway = self._final_goaway, None
        if call is not None and call.active():
            call.cancel()
        if self.transport is None or self._refusing:
            return
        self._refusing = True
        self._goaway(self.conn.highest_inbound_stream_id)
        if not self.streams:
            self._close()

    def dataReceived(self, data: bytes) -> None:
        """Read frames; the answer to the drain's PING sends the final GOAWAY."""
        super().dataReceived(data)
        if self._ping_answered:
            self._ping_answered = False
            self._last_goaway()

    def _close(self) -> None:
        if self.transport is None:
            return
        try:
            self.conn.close_connection(last_stream_id=self.conn.highest_inbound_stream_id)
            self.transport.write(self.conn.data_to_send())
        except Exception:  # the connection is in a state with no GOAWAY left to send
            pass
        self.transport.loseConnection()


def switch_to_h2(channel: Any, data: bytes) -> None:
    """
    Hand ``channel``'s transport to a new :class:`GatewayH2Connection`, which reads
    ``data`` (the connection's first bytes) and everything after.
    """
    site = channel.site
    connection = GatewayH2Connection(site)
    transport = channel.transport
    site.channels.discard(channel)
    site.channels.add(connection)
    take_over(transport, connection)
    # As twisted.web's own switch does: the connection is its transport's producer, so
    # a client that stops reading pauses the streams' writes.
    transport.registerProducer(connection, True)
    connection.dataReceived(data)
    if site.draining:
        connection.close_when_idle()
