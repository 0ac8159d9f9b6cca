"""The master's listening sockets: bound once, kept open for the master's whole life."""

from __future__ import annotations

import socket
from typing import Optional

from bungate.config import GatewayConfig
from bungate.ops.listeners import bind_listener

__all__ = ["Listeners", "wanted_listeners"]


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


class Listeners:
    """The bound sockets by name (``main``, ``redirect``, ``metrics``)."""

    def __init__(self) -> None:
        self.sockets: dict[str, socket.socket] = {}

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
        for name, key, host, port in wanted_listeners(config):
            if name in self.sockets:
                continue
            try:
                self.sockets[name] = bind_listener(host, port, config.server.backlog)
            except OSError as e:
                self.close()
                raise OSError(
                    f"cannot listen on {host}:{port} ({key}): {e.strerror or e}"
                ) from None

    def extra(self) -> list[str]:
        """The names of the listeners besides ``main``, in the order they were bound."""
        return [name for name in self.sockets if name != "main"]

    def close(self) -> None:
        """Close every socket."""
        for sock in self.sockets.values():
            sock.close()
        self.sockets.clear()
