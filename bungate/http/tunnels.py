"""
The WebSocket tunnels of one worker: a cap on open tunnels (:meth:`Tunnels.try_open`
refuses beyond it), counters for metrics, and :meth:`Tunnels.going_away_all` for a drain.
"""

from __future__ import annotations

import os
from typing import Any, Callable, List, Optional, Set

import attrs
from twisted.internet import defer

from bungate._once import Once
from bungate.http.tunnel import Tunnel

__all__ = ["TunnelTotals", "Tunnels"]


@attrs.frozen
class TunnelTotals:
    """
    A worker's tunnel counters, for metrics.

    :ivar open: tunnels open now.
    :ivar opened: tunnels opened so far.
    :ivar refused: tunnels refused (cap reached, or draining).
    :ivar client_to_upstream: bytes relayed from clients to upstreams (open tunnels too).
    :ivar upstream_to_client: bytes relayed from upstreams to clients (open tunnels too).
    """

    open: int
    opened: int
    refused: int
    client_to_upstream: int
    upstream_to_client: int


class Tunnels:
    """
    The tunnels of one worker.

    :param clock: the reactor; a ``Clock`` in tests.
    :param max_open: the most tunnels open at once (``None``: no cap).
    :param idle_timeout: passed to each :class:`Tunnel`.
    :param flush_timeout: passed to each :class:`Tunnel`.
    :param on_closed: called with each tunnel and its reason once it has closed (after
        the registry has counted it).
    :param on_opened: called with each tunnel once it is open (before ``on_closed`` even
        for a tunnel that closes at once).
    :param on_refused: called for each tunnel refused (:meth:`refuse`, or
        :meth:`try_open` without room).
    :param random_bytes: the source of masking keys, passed to each :class:`Tunnel`.
    """

    def __init__(
        self,
        clock: Any,
        *,
        max_open: Optional[int] = None,
        idle_timeout: float = 300.0,
        flush_timeout: float = 10.0,
        on_closed: Optional[Callable[[Tunnel, str], None]] = None,
        on_opened: Optional[Callable[[Tunnel], None]] = None,
        on_refused: Optional[Callable[[], None]] = None,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.clock = clock
        self.on_opened = on_opened
        self.on_refused = on_refused
        self.max_open = max_open
        self.idle_timeout = idle_timeout
        self.flush_timeout = flush_timeout
        self.on_closed = on_closed
        self._random_bytes = random_bytes
        self.tunnels: Set[Tunnel] = set()
        self.opened = 0
        self.refused = 0
        self.draining = False
        self._closed_client_to_upstream = 0
        self._closed_upstream_to_client = 0
        self._drained: Once[None] = Once()

    @property
    def open(self) -> int:
        """How many tunnels are open."""
        return len(self.tunnels)

    @property
    def has_room(self) -> bool:
        """Whether :meth:`try_open` would open one more tunnel now."""
        return not self.draining and (self.max_open is None or len(self.tunnels) < self.max_open)

    def try_open(
        self,
        client: Any,
        upstream: Any,
        *,
        client_leftover: bytes = b"",
        upstream_leftover: bytes = b"",
        client_head: bytes = b"",
        idle_timeout: Optional[float] = None,
    ) -> Optional[Tunnel]:
        """
        Open a tunnel between two connections, unless the cap is reached or the worker
        drains.

        :param idle_timeout: this tunnel's, instead of the registry's.
        :returns: the :class:`Tunnel`; or ``None``, and then neither connection has been
            touched (the caller answers the client, e.g. 503, and closes the upstream).
        """
        if not self.has_room:
            self.refuse()
            return None
        self.opened += 1
        box: List[Tunnel] = []
        early: List[str] = []

        def closed(reason: str) -> None:
            if box:
                self._closed(box[0], reason)
            else:  # closed from inside the constructor (a transport that closes at once)
                early.append(reason)

        tunnel = Tunnel(
            client,
            upstream,
            clock=self.clock,
            idle_timeout=self.idle_timeout if idle_timeout is None else idle_timeout,
            on_closed=closed,
            client_leftover=client_leftover,
            upstream_leftover=upstream_leftover,
            client_head=client_head,
            flush_timeout=self.flush_timeout,
            random_bytes=self._random_bytes,
        )
        box.append(tunnel)
        self.tunnels.add(tunnel)
        if self.on_opened is not None:
            self.on_opened(tunnel)
        if early:
            self._closed(tunnel, early[0])
        return tunnel

    def refuse(self) -> None:
        """Count a tunnel the caller refused because :attr:`has_room` was false."""
        self.refused += 1
        if self.on_refused is not None:
            self.on_refused()

    def going_away_all(self, grace: float, reason: bytes = b"") -> defer.Deferred[None]:
        """
        Refuse new tunnels and end every open one (:meth:`Tunnel.going_away`).

        :returns: a Deferred that fires once every tunnel has closed (within about
            ``grace`` seconds, when the deadline aborts what is left).
        """
        self.draining = True
        d = self._drained.wait()
        for tunnel in list(self.tunnels):
            tunnel.going_away(grace, reason)
        if not self.tunnels:
            self._drained.fire(None)
        return d

    def totals(self) -> TunnelTotals:
        """The counters now."""
        return TunnelTotals(
            open=len(self.tunnels),
            opened=self.opened,
            refused=self.refused,
            client_to_upstream=self._closed_client_to_upstream
            + sum(t.client_to_upstream for t in self.tunnels),
            upstream_to_client=self._closed_upstream_to_client
            + sum(t.upstream_to_client for t in self.tunnels),
        )

    def _closed(self, tunnel: Tunnel, reason: str) -> None:
        self.tunnels.discard(tunnel)
        self._closed_client_to_upstream += tunnel.client_to_upstream
        self._closed_upstream_to_client += tunnel.upstream_to_client
        try:
            if self.on_closed is not None:
                self.on_closed(tunnel, reason)
        finally:
            if self.draining and not self.tunnels:
                self._drained.fire(None)
