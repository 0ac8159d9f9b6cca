"""
The master's listening sockets: bound once (or adopted from systemd's socket activation),
kept open for the master's whole life, and moved to new addresses on a reload the way
nginx does it (bind the new ones, roll the workers onto them, close the old ones).
"""

from __future__ import annotations

import socket
from typing import Optional

import attrs

from bungate.config import GatewayConfig
from bungate.ops.listeners import bind_listener

__all__ = ["Listeners", "Staged", "wanted_listeners"]


def wanted_listeners(config: GatewayConfig) -> list[tuple[str, str, str, int]]:
    """
    The listeners a config asks for: ``(name, config key, host, port)``, ``main`` first,
    then the plain-HTTP redirect (with TLS) and the metrics listener.
    """
    server = config.server
    wanted = [("main", "server.port", server.host, server.port)]
    redirect = server.tls.redirect_http if server.tls.enabled else None
    if redirect is not None:
        wanted.append(("redirect", "server.tls.redirect_http.port", server.host, redirect.port))
    listen = config.metrics.listen if config.metrics.enabled else None
    if listen is not None:
        wanted.append(("metrics", "metrics.listen", listen[0], listen[1]))
    return wanted


@attrs.frozen
class Staged:
    """
    The sockets a reload would use, and what changes when it is accepted.

    :ivar sockets: name -> socket, for the new config.
    :ivar opened: sockets bound for it (closed if the reload is refused).
    :ivar retired: sockets it no longer uses (closed once it is accepted).
    :ivar moved: ``config key: old -> new`` for every listener that moved, for the log.
    """

    sockets: dict[str, socket.socket]
    opened: list[socket.socket]
    retired: list[socket.socket]
    moved: list[str]


class Listeners:
    """The bound sockets by name (``main``, ``redirect``, ``metrics``)."""

    def __init__(self) -> None:
        self.sockets: dict[str, socket.socket] = {}
        self._addresses: dict[str, tuple[str, int]] = {}  # name -> (host, port) as configured
        self._pending: dict[str, tuple[str, int]] = {}  # the same for the last staged config

    @property
    def address(self) -> Optional[tuple[str, int]]:
        """``(host, port)`` of the main listener once bound."""
        main = self.sockets.get("main")
        return None if main is None else main.getsockname()[:2]

    def bind(self, config: GatewayConfig) -> None:
        """
        Bind every listener ``config`` asks for that is not bound yet.

        :raises OSError: naming the address and its config key; nothing stays bound.
        """
        try:
            staged = self.stage(config)
        except OSError:
            self.close()
            raise
        self.accept(staged)

    def adopt(self, config: GatewayConfig, sockets: dict[str, socket.socket]) -> None:
        """
        Take sockets bound by someone else (systemd's socket activation) as the listeners
        ``config`` asks for, instead of binding them.

        They count as bound at the addresses the config gives, so a reload that keeps an
        address keeps its socket (a reload that moves one binds anew).

        :param config: the config the sockets were matched against.
        :param sockets: listener name -> socket, one per listener the config asks for
            (see :func:`bungate.ops.socket_activation.match_listeners`).
        """
        wanted = wanted_listeners(config)
        assert {name for name, _, _, _ in wanted} == set(sockets), (wanted, sockets)
        for name, _key, host, port in wanted:
            self.sockets[name] = sockets[name]
            self._addresses[name] = (host, port)

    def stage(self, config: GatewayConfig) -> Staged:
        """
        The sockets ``config`` would use: those whose address did not change are kept,
        new ones are bound now.

        :raises OSError: naming the address and its config key; what this call bound is
            closed again.
        """
        sockets: dict[str, socket.socket] = {}
        opened: list[socket.socket] = []
        moved: list[str] = []
        for name, key, host, port in wanted_listeners(config):
            current = self.sockets.get(name)
            if current is not None and self._addresses.get(name) == (host, port):
                current.listen(config.server.backlog)
                sockets[name] = current
                continue
            try:
                sock = bind_listener(host, port, config.server.backlog)
            except OSError as e:
                for s in opened:
                    s.close()
                raise OSError(
                    f"cannot listen on {host}:{port} ({key}): {e.strerror or e}"
                ) from None
            opened.append(sock)
            sockets[name] = sock
            if current is not None:
                old = self._addresses.get(name, ("?", 0))
                moved.append(f"{key}: {old[0]}:{old[1]} -> {host}:{port}")
            elif self.sockets:
                moved.append(f"{key}: now {host}:{port}")
        kept = {id(s) for s in sockets.values()}
        retired = [s for s in self.sockets.values() if id(s) not in kept]
        for name in set(self.sockets) - set(sockets):
            moved.append(f"{name} listener: closed")
        staged = Staged(sockets, opened, retired, moved)
        self._pending = {
            name: (host, port) for name, _, host, port in wanted_listeners(config)
        }
        return staged

    def use(self, staged: Staged) -> dict[str, socket.socket]:
        """Workers started from now on get ``staged``'s sockets; returns the ones before."""
        before, self.sockets = self.sockets, dict(staged.sockets)
        return before

    def accept(self, staged: Staged) -> None:
        """``staged`` is how the master listens from now on: close what it retired."""
        self.sockets = dict(staged.sockets)
        self._addresses = dict(self._pending)
        for sock in staged.retired:
            sock.close()

    def revert(self, staged: Staged, before: dict[str, socket.socket]) -> None:
        """``staged`` was refused: close what it bound, go back to ``before``."""
        self.sockets = before
        for sock in staged.opened:
            sock.close()

    def extra(self) -> list[str]:
        """The names of the listeners besides ``main``, in the order they were bound."""
        return [name for name in self.sockets if name != "main"]

    def close(self) -> None:
        """Close every socket."""
        for sock in self.sockets.values():
            sock.close()
        self.sockets.clear()
