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
stream. A drain sends GOAWAY (no new streams; streams in flight finish), then closes
the connection once its last stream is done.
"""

from __future__ import annotations

from typing import Any

import h2.settings
from h2.errors import ErrorCodes
from hyperframe.frame import GoAwayFrame
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web._http2 import H2Connection

from bungate.http.tunnel import take_over

__all__ = ["GatewayH2Connection", "switch_to_h2"]


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
        super().connectionLost(reason, _cancelTimeouts=_cancelTimeouts)
        self.site.channel_closed(self)

    # --- streams ----------------------------------------------------------------------

    def _requestReceived(self, event: Any) -> None:
        if self.draining:
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
                self.conn.acknowledge_received_data(
                    event.flow_controlled_length, event.stream_id
                )
            except Exception:  # the stream is closed in h2's books too: nothing to credit
                pass
            return
        super()._requestDataReceived(event)

    def _requestEnded(self, event: Any) -> None:
        if event.stream_id in self.streams:
            super()._requestEnded(event)

    def _requestAborted(self, event: Any) -> None:
        if event.stream_id in self.streams:
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
        if self.draining and not self.streams:
            self._close()

    # --- drain ------------------------------------------------------------------------

    def close_when_idle(self) -> None:
        """The worker drains: GOAWAY now; close once the streams in flight are done."""
        if self.draining or self.transport is None:
            return
        self.draining = True
        if not self.streams:
            self._close()
            return
        # A GOAWAY naming the last stream we took: the client opens new ones on another
        # connection (another worker), while h2 goes on with the ones in flight.
        frame = GoAwayFrame(0)
        frame.last_stream_id = self.conn.highest_inbound_stream_id
        frame.error_code = ErrorCodes.NO_ERROR
        self.transport.write(frame.serialize())

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
