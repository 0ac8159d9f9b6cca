"""
Telling systemd how the master is doing (the ``sd_notify`` protocol), without libsystemd.

A service started with ``Type=notify`` (or ``notify-reload``) gets ``NOTIFY_SOCKET`` in its
environment: the address of an ``AF_UNIX`` datagram socket, either a filesystem path or,
when it starts with ``@``, a name in the abstract namespace. Each message is one datagram
of ``KEY=VALUE`` lines (``READY=1``, ``STATUS=...``, ``WATCHDOG=1``, ...).

When ``WatchdogSec=`` is set, systemd also exports ``WATCHDOG_USEC`` (and ``WATCHDOG_PID``):
the service must send ``WATCHDOG=1`` more often than that, or it is killed and restarted.
:attr:`SystemdNotifier.watchdog_interval` says how often to ping (half the limit, as
``sd_watchdog_enabled(3)`` advises).

Sending never raises: the gateway must keep serving when systemd is restarting or the
socket is gone. The first failure is logged; every failure is counted in
:attr:`SystemdNotifier.failures`.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping, MutableMapping
from typing import Callable, Optional, Union

from twisted.logger import Logger

__all__ = ["ENVIRONMENT", "SystemdNotifier", "unset_environment"]

ENVIRONMENT = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
"""The variables systemd sets for the notify protocol (removed by :func:`unset_environment`)."""

_log = Logger(namespace="bungate.sdnotify")


def _monotonic_usec() -> int:
    # CLOCK_MONOTONIC in microseconds: what systemd compares MONOTONIC_USEC= against.
    return time.monotonic_ns() // 1000


def _socket_address(value: str) -> Union[str, bytes]:
    """The ``sendto`` address for a ``NOTIFY_SOCKET`` value."""
    if value.startswith("@"):
        # Abstract namespace: a leading NUL byte instead of the '@', no terminator.
        return b"\0" + os.fsencode(value[1:])
    return value


def _watchdog_interval(environ: Mapping[str, str], pid: int) -> Optional[float]:
    usec = environ.get("WATCHDOG_USEC", "")
    owner = environ.get("WATCHDOG_PID", "")
    if owner:
        try:
            if int(owner) != pid:
                return None
        except ValueError:
            return None
    try:
        limit = int(usec)
    except ValueError:
        return None
    if limit <= 0:
        return None
    return limit / 2 / 1_000_000


class SystemdNotifier:
    """
    Sends state notifications to the service manager over its notify socket.

    Build one with :meth:`from_environ`, which returns ``None`` outside a notify service, so
    callers write ``if notifier is not None: notifier.ready(...)``.

    :param address: the socket's address as ``NOTIFY_SOCKET`` spells it: an absolute path
        or ``@name`` for an abstract socket.
    :param watchdog_interval: seconds between two :meth:`watchdog` pings, or ``None`` when
        systemd does not watch this process.
    :param monotonic_usec: the clock for ``MONOTONIC_USEC=`` (CLOCK_MONOTONIC, microseconds).
    """

    def __init__(
        self,
        address: str,
        watchdog_interval: Optional[float] = None,
        monotonic_usec: Callable[[], int] = _monotonic_usec,
    ) -> None:
        self.address = address
        self._target = _socket_address(address)
        self._watchdog_interval = watchdog_interval
        self._monotonic_usec = monotonic_usec
        self._socket: Optional[socket.socket] = None
        #: how many notifications could not be sent.
        self.failures = 0
        #: how many notifications were sent.
        self.sent = 0

    @classmethod
    def from_environ(
        cls, environ: Mapping[str, str] = os.environ, pid: Optional[int] = None
    ) -> Optional[SystemdNotifier]:
        """
        The notifier systemd asked for through the environment, if any.

        :param environ: where to read ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and
            ``WATCHDOG_PID``.
        :param pid: this process's id (for ``WATCHDOG_PID``); :func:`os.getpid` by default.
        :returns: a notifier, or ``None`` when ``NOTIFY_SOCKET`` is unset or empty, or names
            a transport other than a Unix socket (``vsock:``, which is logged).
        """
        address = environ.get("NOTIFY_SOCKET", "")
        if not address:
            return None
        if not address.startswith(("/", "@")):
            _log.warn(
                "NOTIFY_SOCKET={address!r} is neither a path nor an abstract socket: "
                "not notifying systemd",
                address=address,
            )
            return None
        interval = _watchdog_interval(environ, os.getpid() if pid is None else pid)
        return cls(address, watchdog_interval=interval)

    @property
    def watchdog_interval(self) -> Optional[float]:
        """
        Seconds between two :meth:`watchdog` pings: half of ``WATCHDOG_USEC``.

        :returns: ``None`` when ``WATCHDOG_USEC`` is unset, not a positive number, or
            ``WATCHDOG_PID`` names another process.
        """
        return self._watchdog_interval

    def notify(self, **fields: Union[str, int]) -> bool:
        """
        Send ``KEY=VALUE`` lines, one per field, in a single datagram.

        Newlines inside a value are replaced by spaces, since they would end the line.
        Never raises: a failure is counted and, the first time, logged.

        :param fields: the variables to send, e.g. ``READY=1, STATUS="serving"``.
        :returns: whether the datagram was sent.
        """
        if not fields:
            return False
        lines = []
        for key, value in fields.items():
            flat = str(value).replace("\r", " ").replace("\n", " ")
            lines.append(f"{key}={flat}\n")
        payload = "".join(lines).encode("utf-8")
        try:
            if self._socket is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                # Never block the reactor: a full queue is a failed send, not a stall.
                sock.setblocking(False)
                self._socket = sock
            self._socket.sendto(payload, self._target)
        except OSError as e:
            self.failures += 1
            if self.failures == 1:
                _log.warn(
                    "cannot notify systemd at {address}: {error} (further failures are "
                    "counted, not logged)",
                    address=self.address,
                    error=e,
                )
            return False
        self.sent += 1
        return True

    def ready(self, status: str) -> bool:
        """
        Say the service is up (``READY=1``), or done reloading, with a status line.

        :param status: a one-line description shown by ``systemctl status``.
        :returns: whether it was sent.
        """
        return self.notify(READY=1, STATUS=status)

    def reloading(self) -> bool:
        """
        Say a reload has begun; follow it with :meth:`ready` once it is done.

        Sends ``RELOADING=1`` with ``MONOTONIC_USEC=`` (the CLOCK_MONOTONIC time in
        microseconds), which systemd 253 and later require for ``Type=notify-reload``;
        older versions ignore the extra field.

        :returns: whether it was sent.
        """
        return self.notify(RELOADING=1, MONOTONIC_USEC=self._monotonic_usec())

    def stopping(self) -> bool:
        """
        Say the service is shutting down (``STOPPING=1``).

        :returns: whether it was sent.
        """
        return self.notify(STOPPING=1)

    def status(self, text: str) -> bool:
        """
        Update the status line (``STATUS=``).

        :param text: the new status.
        :returns: whether it was sent.
        """
        return self.notify(STATUS=text)

    def watchdog(self) -> bool:
        """
        Ping the watchdog (``WATCHDOG=1``); call it every :attr:`watchdog_interval`.

        :returns: whether it was sent.
        """
        return self.notify(WATCHDOG=1)

    def close(self) -> None:
        """Close the sending socket (a later notification opens a new one)."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def unset_environment(environ: MutableMapping[str, str] = os.environ) -> None:
    """
    Remove the notify variables, so that processes started afterwards (the workers) do
    not talk to systemd in the master's name.

    :param environ: the environment to clean.
    """
    for name in ENVIRONMENT:
        environ.pop(name, None)
