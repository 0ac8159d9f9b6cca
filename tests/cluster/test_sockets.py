"""Adopting the shared listening socket must leave it non-blocking for the whole fleet."""

from __future__ import annotations

import os
import socket

from twisted.internet.protocol import Factory

from bungate.cluster.sockets import adopt_port, bind_listener


def test_adopt_port_keeps_the_shared_socket_non_blocking() -> None:
    # O_NONBLOCK lives on the open file description the master and all workers share;
    # PyPy clears it when it wraps a descriptor in a socket object (CPython does not).
    from twisted.internet import reactor

    master = bind_listener("127.0.0.1", 0)
    try:
        assert not os.get_blocking(master.fileno())
        default = socket.getdefaulttimeout()
        port = adopt_port(reactor, master.fileno(), Factory())
        try:
            assert not os.get_blocking(master.fileno()), "adopt_port made the listener blocking"
            assert not os.get_blocking(port.fileno())
            assert socket.getdefaulttimeout() == default
        finally:
            port.stopListening()
        assert not os.get_blocking(master.fileno())
    finally:
        master.close()
