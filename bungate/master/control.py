"""
The master's control API: JSON over HTTP on a UNIX socket (``cluster.control_socket``),
for the ``bungate`` command (:mod:`bungate.cli`) and deploy scripts.

It is off the data path: the socket is a file of mode 0600 (only the master's user, and
root, may connect), served by the master's reactor with ``twisted.web``. Every endpoint
answers a JSON object with ``ok`` (and ``message``, a sentence for a human, or ``error``):

- ``GET /fleet``: the master, and ``worker_info()`` of every worker (id, pid, status,
  restarts, started_at, requests, connections, rss_bytes, cpu_seconds);
- ``POST /scale`` ``{"workers": N}``: grow or shrink the fleet to N workers;
- ``POST /roll``: a rolling restart (as ``USR2``);
- ``POST /reload``: re-read the config file (as ``HUP``);
- ``POST /stop``: drain and stop (as ``TERM``);
- ``POST /signal`` ``{"worker": ID or "all", "signal": "HUP"}``: signal workers.

With ``?wait=1`` a scale, a roll, a reload or a stop answers once it is over, with its
outcome; without, at once (202). Status codes: 200 done, 202 started, 400 a bad request,
404 no such endpoint or worker, 405 a wrong method, 409 refused or failed (a roll that
aborted, a reload that was refused, a master that is stopping).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import stat
from collections.abc import Mapping
from typing import Any, Callable, Optional

from twisted.internet import defer, tcp, unix
from twisted.logger import Logger
from twisted.protocols.policies import WrappingFactory
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from bungate.master.exits import signal_number
from bungate.master.fleet import ClusterError, ClusterManager

__all__ = ["ControlResource", "ControlServer", "check_socket_path"]

log = Logger(namespace="bungate.master")

#: The most workers a scale may ask for (``cluster.workers``' maximum).
MAX_WORKERS = 1024

#: Seconds :meth:`ControlServer.close` lets open connections finish their answer.
CLOSE_GRACE = 2.0

Answer = tuple[int, dict[str, Any]]


def check_socket_path(path: str, key: str = "cluster.control_socket") -> None:
    """
    Make ``path`` free for a new socket: a socket nobody listens on any more (a master
    that was killed) is removed; anything else there is an error.

    :raises ClusterError: the path is held by a live socket (another master), is not a
        socket, or its directory does not exist.
    """
    directory = os.path.dirname(path) or "."
    if not os.path.isdir(directory):
        raise ClusterError(f"{key}: the directory {directory} does not exist")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ClusterError(f"{key}: {path} exists and is not a socket: remove it or pick another")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(path)
    except OSError as e:
        if e.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise ClusterError(f"{key}: cannot check {path}: {e.strerror or e}") from None
    else:
        raise ClusterError(
            f"{key}: {path} is held by a live socket (another master is running: stop it "
            "first, or give this one another control_socket)"
        )
    finally:
        probe.close()
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    log.info("Removed the stale control socket {path} (no one listened on it)", path=path)


class _ControlPort(unix.Port):  # type: ignore[misc]
    """A UNIX port that, when closed, removes its file only if it is still its own."""

    inode: Optional[tuple[int, int]] = None

    def connectionLost(self, reason: Any) -> None:
        # Twisted 26 keeps the path in _bindPath, older releases in port.
        path = os.fsdecode(getattr(self, "_bindPath", None) or self.port)
        try:
            st = os.lstat(path)
            if (st.st_dev, st.st_ino) == self.inode:
                os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warn(
                "Could not remove the control socket {path}: {error} (the next master "
                "removes it, as no one listens on it any more)",
                path=path,
                error=e.strerror or str(e),
            )
        if self.lockFile is not None:
            self.lockFile.unlock()
        # Not unix.Port.connectionLost, which unlinks whatever is at the path.
        tcp.Port.connectionLost(self, reason)


class _ControlSite(Site):
    """The control API's site: no access log (actions are logged by the master)."""

    noisy = False

    def log(self, request: Any) -> None:
        """No access lines."""


class _Connections(WrappingFactory):
    """The site's factory, keeping track of open connections for a graceful close."""

    noisy = False

    def __init__(self, site: Site) -> None:
        super().__init__(site)
        self.idle_waiters: list[defer.Deferred[None]] = []

    def logPrefix(self) -> str:
        """How Twisted names the socket in its own lines."""
        return "bungate control API"

    def unregisterProtocol(self, p: Any) -> None:
        """A connection closed: fire the waiters once none is left."""
        super().unregisterProtocol(p)
        if not self.protocols:
            waiters, self.idle_waiters = self.idle_waiters, []
            for d in waiters:
                d.callback(None)


def _truthy(value: Optional[bytes]) -> bool:
    return value is not None and value.lower() in (b"1", b"true", b"yes", b"on")


class _BadRequest(Exception):
    """A request the API cannot take; the message says why (answered 400)."""


class ControlResource(Resource):
    """
    The endpoints (see the module docstring).

    :param manager: the fleet.
    :param reload: ``reload(wait)``: starts a reload; fires ``True``/``False`` with its
        outcome (with ``wait``, of a reload that starts after the call).
    :param stop: starts the master's stop; fires once the fleet has stopped.
    :param master: a description of the master for ``GET /fleet``.
    :param ready: whether the fleet has started (actions are refused before).
    """

    isLeaf = True

    def __init__(
        self,
        manager: ClusterManager,
        reload: Callable[[bool], defer.Deferred[bool]],
        stop: Callable[[], defer.Deferred[None]],
        master: Callable[[], Mapping[str, Any]] = dict,
        ready: Callable[[], bool] = lambda: True,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.manager = manager
        self.reload = reload
        self.stop = stop
        self.master = master
        self.ready = ready
        self._errors: dict[str, tuple[int, str]] = {}  # what -> (sequence, last error)
        self._sequence = 0
        manager.on("roll-aborted", lambda **f: self._failed("roll", f["reason"]))
        manager.on("reload-refused", lambda **f: self._failed("reload", f["error"]))
        manager.on(
            "reload-aborted",
            lambda **f: self._failed(
                "reload",
                f"the first worker with the config of {f['source']} did not boot; the old "
                f"workers keep serving",
            ),
        )
        self._routes: dict[str, tuple[bytes, Callable[[Any, bool], Any]]] = {
            "/fleet": (b"GET", self._fleet),
            "/scale": (b"POST", self._scale),
            "/roll": (b"POST", self._roll),
            "/reload": (b"POST", self._reload),
            "/stop": (b"POST", self._stop),
            "/signal": (b"POST", self._signal),
        }

    def _failed(self, what: str, error: str) -> None:
        self._sequence += 1
        self._errors[what] = (self._sequence, error)

    def _error_since(self, what: str, mark: int) -> Optional[str]:
        sequence, error = self._errors.get(what, (0, ""))
        return error if sequence > mark else None

    # --- HTTP ---------------------------------------------------------------------------

    def render(self, request: Request) -> Any:
        """Route the request; answer now, or later for a waiting action."""
        path = (request.path or b"/").decode("utf-8", "replace").rstrip("/") or "/"
        route = self._routes.get(path)
        if route is None:
            error = f"no such endpoint {path}"
            return self._answer(
                request, 404, {"ok": False, "error": error, "endpoints": sorted(self._routes)}
            )
        method, handler = route
        if request.method != method:
            request.setHeader(b"allow", method)
            given = (request.method or b"").decode("ascii", "replace")
            error = f"{path} takes {method.decode()}, not {given}"
            return self._answer(request, 405, {"ok": False, "error": error})
        wait = _truthy((request.args or {}).get(b"wait", [None])[-1])
        try:
            body = self._body(request) if method == b"POST" else None
            result = handler(body, wait)
        except _BadRequest as e:
            return self._answer(request, 400, {"ok": False, "error": str(e)})
        if not isinstance(result, defer.Deferred):
            return self._answer(request, *result)
        finished = [False]
        request.notifyFinish().addErrback(lambda _: finished.__setitem__(0, True))

        def send(answer: Answer) -> None:
            if not finished[0]:
                request.write(self._encode(request, *answer))
                request.finish()

        def failed(reason: Failure) -> None:
            log.failure("Control API: {path} failed", reason, path=path)
            send((500, {"ok": False, "error": reason.getErrorMessage()}))

        result.addCallbacks(send, failed)
        return NOT_DONE_YET

    @staticmethod
    def _body(request: Request) -> Any:
        raw = request.content.read() if request.content is not None else b""
        if not raw.strip():
            return {}
        try:
            body = json.loads(raw)
        except ValueError as e:
            raise _BadRequest(f"the body is not JSON: {e}") from None
        if not isinstance(body, dict):
            raise _BadRequest("the body must be a JSON object")
        return body

    @staticmethod
    def _encode(request: Request, code: int, document: Mapping[str, Any]) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(document, sort_keys=True).encode("utf-8") + b"\n"

    def _answer(self, request: Request, code: int, document: Mapping[str, Any]) -> bytes:
        return self._encode(request, code, document)

    def _refused_while_stopping(self) -> Optional[Answer]:
        if self.manager.stopping:
            return 409, {"ok": False, "error": "the master is stopping"}
        if not self.ready():
            return 409, {"ok": False, "error": "the fleet is starting: try again once it is ready"}
        return None

    # --- endpoints ----------------------------------------------------------------------

    def _fleet(self, body: Any, wait: bool) -> Answer:
        manager = self.manager
        workers = manager.worker_info()
        running = sum(1 for w in workers if w["status"] == "running")
        return 200, {
            "ok": True,
            "master": dict(self.master()),
            "desired": manager.desired,
            "running": running,
            "live": manager.worker_count(),
            "stopping": manager.stopping,
            "workers": workers,
        }

    def _scale(self, body: Any, wait: bool) -> Any:
        count = body.get("workers")
        if isinstance(count, bool) or not isinstance(count, int):
            raise _BadRequest('give the new fleet size as {"workers": N}')
        if not 1 <= count <= MAX_WORKERS:
            raise _BadRequest(f"workers must be 1..{MAX_WORKERS}, got {count}")
        refused = self._refused_while_stopping()
        if refused is not None:
            return refused
        before = self.manager.worker_count()
        log.info("Control API: scale to {count} worker(s)", count=count)
        d = self.manager.scale_to(count)
        if not wait:
            d.addErrback(lambda f: log.failure("Scaling failed", f))
            return 202, {
                "ok": True,
                "message": f"scaling from {before} to {count} worker(s)",
            }

        def outcome(ids: list[int]) -> Answer:
            if count > before and len(ids) < count - before:
                return 409, {
                    "ok": False,
                    "error": f"{count - before - len(ids)} of the {count - before} new "
                    "worker(s) did not become ready (see the master's log)",
                    "workers": ids,
                }
            verb = "started" if count > before else "stopped"
            return 200, {
                "ok": True,
                "message": f"scaled from {before} to {self.manager.worker_count()} worker(s)",
                verb: ids,
            }

        return d.addCallback(outcome)

    def _roll(self, body: Any, wait: bool) -> Any:
        refused = self._refused_while_stopping()
        if refused is not None:
            return refused
        log.info("Control API: rolling restart")
        if not wait:
            self.manager.rolling_restart().addErrback(lambda f: log.failure("Roll failed", f))
            return 202, {"ok": True, "message": "rolling restart started"}
        mark = self._sequence

        def outcome(done: bool) -> Answer:
            if done:
                return 200, {"ok": True, "message": "rolling restart done"}
            error = self._error_since("roll", mark) or "the master stopped"
            return 409, {"ok": False, "error": f"rolling restart aborted: {error}"}

        return self.manager.roll_and_wait().addCallback(outcome)

    def _reload(self, body: Any, wait: bool) -> Any:
        refused = self._refused_while_stopping()
        if refused is not None:
            return refused
        log.info("Control API: reload")
        mark = self._sequence
        d = self.reload(wait)
        if not wait:
            d.addErrback(lambda f: log.failure("Reload failed", f))
            return 202, {"ok": True, "message": "reload started"}

        def outcome(done: bool) -> Answer:
            if done:
                return 200, {"ok": True, "message": "configuration reloaded"}
            error = self._error_since("reload", mark) or "the master stopped"
            return 409, {"ok": False, "error": f"reload failed: {error}"}

        return d.addCallback(outcome)

    def _stop(self, body: Any, wait: bool) -> Any:
        log.info("Control API: stop")
        d = self.stop()
        if not wait:
            d.addErrback(lambda f: log.failure("Stop failed", f))
            return 202, {"ok": True, "message": "stopping: the workers drain"}
        return d.addCallback(lambda _: (200, {"ok": True, "message": "the fleet has stopped"}))

    def _signal(self, body: Any, wait: bool) -> Answer:
        worker, name = body.get("worker"), body.get("signal")
        if not isinstance(name, (str, int)) or isinstance(name, bool):
            raise _BadRequest('give the signal as {"signal": "HUP"}')
        try:
            number = signal_number(name)
        except ValueError as e:
            raise _BadRequest(str(e)) from None
        refused = self._refused_while_stopping()
        if refused is not None:
            return refused
        shown = signal.Signals(number).name if number in signal.valid_signals() else number
        if worker == "all":
            count = self.manager.broadcast_signal(number)
            log.info("Control API: {signal} to every worker ({count})", signal=shown, count=count)
            return 200, {"ok": True, "message": f"sent {shown} to {count} worker(s)"}
        if isinstance(worker, bool) or not isinstance(worker, int):
            raise _BadRequest('give the worker as {"worker": ID} (or "all")')
        if not self.manager.send_signal_to_worker(worker, number):
            return 404, {"ok": False, "error": f"worker {worker} has no live process"}
        log.info("Control API: {signal} to worker {worker}", signal=shown, worker=worker)
        return 200, {"ok": True, "message": f"sent {shown} to worker {worker}"}


class ControlServer:
    """
    The control API's listening socket.

    :param path: the socket's path (made absolute).
    :param resource: what it serves.
    :param reactor: listens.
    :param chown: called with the path once bound (to hand it to ``server.user``).
    """

    def __init__(
        self,
        path: str,
        resource: ControlResource,
        reactor: Any,
        chown: Callable[[str], None] = lambda path: None,
    ) -> None:
        self.path = os.path.abspath(path)
        self.resource = resource
        self.reactor = reactor
        self.chown = chown
        self.site = _ControlSite(resource)
        self.connections = _Connections(self.site)
        self._port: Optional[_ControlPort] = None

    def listen(self) -> None:
        """
        Bind the socket, mode 0600, and serve.

        :raises ClusterError: the path is taken (see :func:`check_socket_path`) or cannot
            be bound.
        """
        check_socket_path(self.path)
        port = _ControlPort(os.fsencode(self.path), self.connections, 50, 0o600, self.reactor)
        old = os.umask(0o177)  # never a moment with a wider mode than 0600
        try:
            port.startListening()
        except Exception as e:
            raise ClusterError(
                f"cluster.control_socket: cannot listen on {self.path}: {e}"
            ) from None
        finally:
            os.umask(old)
        st = os.lstat(self.path)
        port.inode = (st.st_dev, st.st_ino)
        self._port = port
        self.chown(self.path)
        log.info(
            "Control API listening on {path} (try: bungate --socket {path} status)",
            path=self.path,
        )

    def close(self) -> defer.Deferred[None]:
        """
        Stop listening, let open connections send what they were answered (up to
        :data:`CLOSE_GRACE` seconds), then close them.
        """
        port, self._port = self._port, None
        if port is None:
            return defer.succeed(None)
        d = defer.maybeDeferred(port.stopListening)
        connections = self.connections
        if not connections.protocols:
            return d
        idle: defer.Deferred[None] = defer.Deferred()
        connections.idle_waiters.append(idle)
        for wrapper in list(connections.protocols):
            wrapper.transport.loseConnection()  # once what was written is sent

        def abort() -> None:
            for wrapper in list(connections.protocols):
                transport: Any = wrapper.transport
                transport.abortConnection()

        timer = self.reactor.callLater(CLOSE_GRACE, abort)

        def done(_: Any) -> None:
            if timer.active():
                timer.cancel()

        idle.addCallback(done)
        return defer.gatherResults([d, idle]).addCallback(lambda _: None)
