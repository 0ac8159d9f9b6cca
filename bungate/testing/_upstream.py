"""A real HTTP upstream for tests, served by the test's own reactor."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import defer
from twisted.web import resource, server

__all__ = ["UpstreamServer"]


class _Upstream(resource.Resource):
    isLeaf = True

    def __init__(self, owner: UpstreamServer) -> None:
        super().__init__()
        self.owner = owner

    def render(self, request: server.Request) -> Any:
        self.owner.requests.append(request)
        # Endpoints match the last segment, so a gateway route like /api/* that forwards
        # the whole path reaches them too.
        full = request.path
        path = b"/" + full.rsplit(b"/", 1)[-1]
        if b"/status/" in full:
            path = b"/status/" + path[1:]
        args = {k.decode(): v[0].decode() for k, v in request.args.items()}
        if path.startswith(b"/status/"):
            request.setResponseCode(int(path.split(b"/")[2]))
            return b"" if request.code in (204, 304) else b"status body"
        if path == b"/slow":
            delay = float(args.get("delay", "1"))
            call = self.owner.reactor.callLater(delay, self._finish, request, b"slow done")

            def gone(failure: Any) -> None:
                if call.active():
                    call.cancel()
                self.owner.cancelled.append(request)

            request.notifyFinish().addErrback(gone)
            return server.NOT_DONE_YET
        if path == b"/big":
            size = int(args.get("size", str(1024 * 1024)))
            request.setHeader(b"content-length", b"%d" % size)
            _stream(request, size, self.owner.reactor)
            return server.NOT_DONE_YET
        if path == b"/chunked":
            request.write(b"part1-")
            self.owner.reactor.callLater(0.01, self._finish, request, b"part2")
            return server.NOT_DONE_YET
        if path == b"/reset-mid-body":
            request.setHeader(b"content-length", b"100000")
            request.write(b"x" * 1000)
            transport: Any = request.channel.transport
            self.owner.reactor.callLater(0.01, transport.abortConnection)
            return server.NOT_DONE_YET
        if path == b"/stall-mid-body":
            request.setHeader(b"content-length", b"100000")
            request.write(b"x" * 1000)  # ... and nothing more, until the client gives up
            request.notifyFinish().addErrback(lambda _: self.owner.cancelled.append(request))
            return server.NOT_DONE_YET
        if path == b"/hold":
            # Nothing until the test writes to the request (found in ``requests``).
            request.notifyFinish().addErrback(lambda _: self.owner.cancelled.append(request))
            return server.NOT_DONE_YET
        if path == b"/cookies":
            request.responseHeaders.setRawHeaders(b"set-cookie", [b"a=1; Path=/", b"b=2; Path=/"])
            request.setHeader(b"x-custom", b"kept")
            request.setHeader(b"keep-alive", b"timeout=5")
            request.setHeader(b"connection", b"x-drop-me")
            request.setHeader(b"x-drop-me", b"hop")
            return b"cookies"
        if path == b"/redirect":
            request.setResponseCode(302)
            request.setHeader(b"location", b"/elsewhere")
            return b""
        if path == b"/gzip":
            request.setHeader(b"content-encoding", b"gzip")
            request.setHeader(b"content-type", b"application/octet-stream")
            return b"\x1f\x8b\x08\x00fakegzipbytes"
        body = request.content.read() if request.content is not None else b""
        doc = {
            "method": request.method.decode(),
            "uri": request.uri.decode("latin-1"),
            "headers": {
                k.decode().lower(): [x.decode("latin-1") for x in v]
                for k, v in request.requestHeaders.getAllRawHeaders()
            },
            "body": body.decode("latin-1"),
            "body_len": len(body),
            "server": self.owner.name,
        }
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(doc).encode()

    @staticmethod
    def _finish(request: server.Request, body: bytes) -> None:
        if not request._disconnected and not request.finished:
            request.write(body)
            request.finish()


def _stream(request: server.Request, size: int, reactor: Any) -> None:
    """Write ``size`` bytes honouring the client's backpressure."""
    chunk = b"b" * 65536
    state = {"left": size, "paused": False}

    class Producer:
        def resumeProducing(self) -> None:
            state["paused"] = False
            while state["left"] > 0 and not state["paused"] and not request._disconnected:
                n = min(len(chunk), state["left"])
                state["left"] -= n
                request.write(chunk[:n])
            if state["left"] <= 0 and not request._disconnected and not request.finished:
                request.unregisterProducer()
                request.finish()

        def pauseProducing(self) -> None:
            state["paused"] = True

        def stopProducing(self) -> None:
            state["left"] = 0

    producer = Producer()
    request.registerProducer(producer, True)
    reactor.callLater(0, producer.resumeProducing)


class UpstreamServer:
    """
    A real upstream HTTP server on 127.0.0.1, served by the test's reactor.

    Endpoints: anything else echoes the request as JSON; ``/status/NNN``; ``/slow?delay=S``;
    ``/big?size=N`` (streams with backpressure); ``/chunked``; ``/reset-mid-body``;
    ``/stall-mid-body`` (sends part of the body, then nothing); ``/hold`` (sends nothing
    until the test writes to the request itself);
    ``/cookies`` (repeated Set-Cookie, hop-by-hop headers to strip); ``/redirect``;
    ``/gzip``.
    """

    def __init__(self, reactor: Any, name: str = "upstream") -> None:
        self.reactor = reactor
        self.name = name
        self.requests: list[server.Request] = []
        self.cancelled: list[server.Request] = []
        #: server-side protocols of every connection accepted so far.
        self.connections: list[Any] = []
        self.port: Any = None

    def start(self, port: int = 0) -> UpstreamServer:
        """Listen (on ``port``, default any free one)."""
        site = server.Site(_Upstream(self))
        site.noisy = False
        build = site.buildProtocol

        def tracking(addr: Any) -> Any:
            protocol = build(addr)
            self.connections.append(protocol)
            return protocol

        site.buildProtocol = tracking  # type: ignore[method-assign]
        self.port = self.reactor.listenTCP(port, site, interface="127.0.0.1")
        return self

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        return f"http://127.0.0.1:{self.port.getHost().port}"

    def stop(self) -> defer.Deferred[Any]:
        """Stop listening (connections already open stay)."""
        return defer.maybeDeferred(self.port.stopListening)

    @defer.inlineCallbacks
    def kill(self) -> Any:
        """
        Die like a process: refuse new connections and close every open one (a
        gateway's pooled connections included).
        """
        yield self.stop()
        for protocol in self.connections:
            channel = getattr(protocol, "_channel", protocol)  # Site wraps its HTTPChannel
            if channel.transport is not None:
                channel.transport.loseConnection()
