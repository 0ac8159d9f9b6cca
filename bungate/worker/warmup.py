"""
A new worker's warm-up: before it reports READY, it proxies requests through its own
request path on a private port to a private upstream, for ``cluster.warmup`` seconds.

PyPy compiles a loop only once it has run it often: a fresh PyPy worker serves a few
thousand requests a second in its first second and reaches full speed after ten. A roll
replaces workers surge-first, so while a replacement warms up the old workers still
serve, and the new one takes traffic already compiled. Nothing of the warm-up reaches
the real upstreams, the metrics, the access log or the shared accept table: its routes,
middlewares and listener are its own, and it is all closed before READY.
"""

from __future__ import annotations

import platform
from typing import Any, Optional

import attrs
from twisted.internet import defer, protocol
from twisted.logger import Logger

from bungate.config import GatewayConfig, parse_route
from bungate.http.app import GatewayApp
from bungate.ops.listeners import bind_listener
from bungate.worker.ports import adopt_port

__all__ = ["AUTO_SECONDS", "warm_up", "warmup_seconds"]

#: ``cluster.warmup: auto`` on PyPy (none on CPython, which has no JIT to warm).
AUTO_SECONDS = 3.0
#: Client connections the warm-up keeps busy at once. One: the JIT needs iterations,
#: not throughput, and the warm-up's CPU is taken from the workers serving meanwhile
#: (measured by bench/run's roll-pypy on 2 cores: 8 connections gave 0.48-0.58x of the
#: steady throughput in the 5 s after a USR2, 2 gave 0.61-0.63x, 1 gave 0.64-0.70x;
#: none, before cluster.warmup existed, 0.37x).
CONNECTIONS = 1

log = Logger(namespace="bungate.worker")

_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"
_REQUEST = (
    b"GET /warm/up?n=1 HTTP/1.1\r\nHost: warm.invalid\r\nUser-Agent: bungate-warmup\r\n"
    b"Accept: */*\r\n\r\n"
)


def warmup_seconds(config: GatewayConfig, implementation: Optional[str] = None) -> float:
    """How long this worker warms up: ``cluster.warmup``, or its ``auto`` value here."""
    value = config.cluster.warmup
    if value is not None:
        return value
    implementation = implementation or platform.python_implementation()
    return AUTO_SECONDS if implementation == "PyPy" else 0.0


class _Upstream(protocol.Protocol):
    """Answers every request head with the same small response (GETs, no bodies)."""

    def __init__(self) -> None:
        self.pending = b""

    def dataReceived(self, data: bytes) -> None:
        self.pending += data
        answers = self.pending.count(b"\r\n\r\n")
        if answers:
            self.pending = self.pending.rsplit(b"\r\n\r\n", 1)[1]
            self.transport.write(_ANSWER * answers)  # type: ignore[union-attr]


class _Client(protocol.Protocol):
    """One keep-alive connection sending the next request as each answer ends."""

    def __init__(self, run: _Run) -> None:
        self.run = run
        self.buffer = b""

    def connectionMade(self) -> None:
        self.run.clients.append(self)
        self.transport.write(_REQUEST)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        done = self.buffer.count(b"\r\n\r\nok")
        if not done:
            return
        self.buffer = self.buffer.rsplit(b"\r\n\r\nok", 1)[1]
        self.run.requests += done
        if self.run.running:
            self.transport.write(_REQUEST)  # type: ignore[union-attr]
        else:
            self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Any = None) -> None:
        if self in self.run.clients:
            self.run.clients.remove(self)
        if self.run.running:  # the gateway closes a connection after so many requests
            self.run.connect()
        else:
            self.run.lost()


@attrs.define
class _Run:
    reactor: Any
    address: tuple[str, int]
    running: bool = True
    requests: int = 0
    clients: list[_Client] = attrs.Factory(list)
    finished: defer.Deferred[None] = attrs.Factory(defer.Deferred)

    def connect(self) -> None:
        creator = protocol.ClientCreator(self.reactor, _Client, self)
        creator.connectTCP(*self.address).addErrback(lambda _: self.lost())

    def lost(self) -> None:
        if not self.clients and not self.finished.called:
            self.finished.callback(None)


def warm_up(config: GatewayConfig, reactor: Any, seconds: float) -> defer.Deferred[int]:
    """
    Exercise the request path for ``seconds``; fires with the number of requests served
    (0 at once when ``seconds`` is 0). Never fails: a warm-up that cannot run is logged
    and skipped (the worker then starts cold).
    """
    if seconds <= 0:
        return defer.succeed(0)
    try:
        return _warm_up(config, reactor, seconds)
    except Exception:
        log.failure("Warm-up could not start: this worker starts cold")
        return defer.succeed(0)


def _warm_up(config: GatewayConfig, reactor: Any, seconds: float) -> defer.Deferred[int]:
    upstream_port = reactor.listenTCP(
        0, protocol.Factory.forProtocol(_Upstream), interface="127.0.0.1"
    )
    target = f"http://127.0.0.1:{upstream_port.getHost().port}"
    route = parse_route(config.source, 0, {"pattern": "/*", "target": target})
    warm_config = attrs.evolve(
        config,
        routes=(route,),
        middlewares=(),
        server=attrs.evolve(config.server, tls=attrs.evolve(config.server.tls, enabled=False)),
        logger=attrs.evolve(config.logger, request_logging=False),
        metrics=attrs.evolve(config.metrics, enabled=False),
        health=attrs.evolve(config.health, enabled=False),
    )
    app = GatewayApp(warm_config, reactor, status=lambda: {"status": "warming-up"})
    listener = bind_listener("127.0.0.1", 0, 64)
    try:
        port = adopt_port(reactor, listener.fileno(), app.main_factory(), False, None, app.eager)
        address = listener.getsockname()
    finally:
        listener.close()
    run = _Run(reactor, (address[0], address[1]))
    for _ in range(CONNECTIONS):
        run.connect()
    started = reactor.seconds()

    def stop() -> None:
        run.running = False
        if not run.clients and not run.finished.called:
            run.finished.callback(None)

    reactor.callLater(seconds, stop)
    # The clients end after their answer in flight; a stuck one is cut after a second.
    run.finished.addTimeout(seconds + 1.0, reactor)
    run.finished.addErrback(lambda _: None)

    def close(_: Any) -> defer.Deferred[int]:
        for client in list(run.clients):
            client.transport.abortConnection()  # type: ignore[union-attr]
        d = app.close([port], 0.0)
        d.addBoth(lambda _: upstream_port.stopListening())

        def report(_: Any) -> int:
            log.info(
                "Warmed up: {requests} requests in {seconds:.1f}s through the request path",
                requests=run.requests,
                seconds=reactor.seconds() - started,
            )
            return run.requests

        return d.addBoth(report)

    return run.finished.addCallback(close)
