"""
A real ``redis-server`` for the tests: on 127.0.0.1, a free port, nothing saved to disk.

:class:`RedisServer` starts it and returns once it answers ``PING`` (or fails within a
bounded time, with the server's log), and can kill, pause and restart it on the same
port, which is how the tests make Redis fail. :meth:`RedisServer.command` talks to it
directly (blocking, for setting up and checking), independently of the client under test.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from typing import Any, Optional, Sequence

__all__ = ["REDIS_SERVER", "RedisServer", "free_port"]

#: The server binary (Debian's package ``redis-server``).
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def free_port() -> int:
    """
    A TCP port free on 127.0.0.1 right now.

    :returns: the port number.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _encode(*args: Any) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        raw = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(out)


class _Reader:
    """Just enough of RESP2 to read one reply."""

    def __init__(self, sock: socket.socket) -> None:
        self._file = sock.makefile("rb")

    def reply(self) -> Any:
        line = self._file.readline()
        if not line:
            raise ConnectionError("Redis closed the connection")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            return RuntimeError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            size = int(rest)
            return None if size < 0 else self._file.read(size + 2)[:-2]
        if kind == b"*":
            size = int(rest)
            return None if size < 0 else [self.reply() for _ in range(size)]
        raise ValueError(f"not a RESP reply: {line!r}")

    def close(self) -> None:
        self._file.close()


class RedisServer:
    """
    One ``redis-server`` process, started by :meth:`start`, for one test or module.

    :param password: the ``requirepass`` to set, if any.
    :param tls: ``(certificate, key, ca)`` PEM files: the server then speaks only TLS, on
        its port (clients are not asked for a certificate).
    :param extra_args: more ``--option value`` arguments for the server.
    :param binary: the server binary.
    """

    def __init__(
        self,
        password: Optional[str] = None,
        tls: Optional[tuple[str, str, str]] = None,
        extra_args: Sequence[str] = (),
        binary: str = REDIS_SERVER,
    ) -> None:
        self.password = password
        self.tls = tls
        self.extra_args = list(extra_args)
        self.binary = binary
        self.port = 0
        self.process: Optional[subprocess.Popen[bytes]] = None
        self._dir = tempfile.mkdtemp(prefix="bungate-redis-")
        self._log = os.path.join(self._dir, "redis.log")

    @property
    def url(self) -> str:
        """
        ``redis://127.0.0.1:<port>/0``, or ``rediss://localhost:<port>/0`` with TLS
        (without the password).

        :returns: the URL.
        """
        if self.tls is not None:
            return f"rediss://localhost:{self.port}/0"
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 15.0) -> RedisServer:
        """
        Start the server (on the port it had, after a :meth:`stop`), and wait until it
        answers ``PING``.

        :param timeout: seconds to wait for it.
        :returns: this server.
        :raises RuntimeError: if it exits or does not answer in time.
        """
        if self.process is not None:
            raise RuntimeError("redis-server is already running")
        if not self.port:
            self.port = free_port()
        if self.tls is None:
            ports = ["--port", str(self.port)]
        else:
            cert, key, ca = self.tls
            ports = [
                "--port", "0",
                "--tls-port", str(self.port),
                "--tls-cert-file", cert,
                "--tls-key-file", key,
                "--tls-ca-cert-file", ca,
                "--tls-auth-clients", "no",
            ]  # fmt: skip
        args = [
            self.binary,
            *ports,
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", self._dir,
            "--logfile", self._log,
            "--daemonize", "no",
        ]  # fmt: skip
        if self.password is not None:
            args += ["--requirepass", self.password]
        args += self.extra_args
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL)
        self._wait_until_answering(timeout)
        return self

    def _wait_until_answering(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"redis-server exited with {self.process.returncode}: {self.log()}"
                )
            try:
                if self.command("PING") == "PONG":
                    return
            except OSError as e:
                last = e
            time.sleep(0.01)  # a bounded poll of a port that is not open yet
        self.kill()
        raise RuntimeError(f"redis-server did not answer PING in {timeout}s ({last}): {self.log()}")

    def command(self, *args: Any, db: int = 0, timeout: float = 5.0) -> Any:
        """
        Send one command on a connection of its own and return the reply (an error reply
        is returned as a :class:`RuntimeError`, not raised).

        :param args: the command and its arguments.
        :param db: the database to run it in.
        :param timeout: seconds for the connection and the reply.
        :returns: the reply.
        :raises OSError: if the server cannot be reached.
        """
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as raw:
            sock = raw
            if self.tls is not None:
                context = ssl.create_default_context(cafile=self.tls[2])
                sock = context.wrap_socket(raw, server_hostname="localhost")
            reader = _Reader(sock)
            try:
                if self.password is not None:
                    sock.sendall(_encode("AUTH", self.password))
                    reader.reply()
                if db:
                    sock.sendall(_encode("SELECT", db))
                    reader.reply()
                sock.sendall(_encode(*args))
                return reader.reply()
            finally:
                reader.close()
                if sock is not raw:
                    sock.close()

    def log(self) -> str:
        """
        The end of the server's log, for messages.

        :returns: up to its last 2000 characters.
        """
        try:
            with open(self._log, errors="replace") as log:
                return log.read()[-2000:]
        except OSError:
            return "(no log)"

    def kill(self, timeout: float = 15.0) -> None:
        """
        ``kill -9`` the server (a crash: nothing is saved) and wait until it is gone.

        :param timeout: seconds to wait for it to exit.
        """
        process, self.process = self.process, None
        if process is not None:
            if process.poll() is None:
                process.send_signal(signal.SIGCONT)  # in case it was paused
                process.kill()
            process.wait(timeout)

    stop = kill

    def restart(self, timeout: float = 15.0) -> RedisServer:
        """
        Kill the server and start a new one on the same port (with an empty data set and
        an empty script cache, as after a crash).

        :param timeout: seconds for each step.
        :returns: this server.
        """
        self.kill(timeout)
        return self.start(timeout)

    def pause(self) -> None:
        """Stop the server process (SIGSTOP): its connections stay open, it answers nothing."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Let a paused server go on (SIGCONT)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def close(self) -> None:
        """Kill the server and remove its directory."""
        self.kill()
        shutil.rmtree(self._dir, ignore_errors=True)
