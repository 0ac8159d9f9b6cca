"""The sd_notify protocol against real AF_UNIX datagram sockets."""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
from twisted.logger import globalLogPublisher

from bungate.ops.sdnotify import SystemdNotifier, unset_environment

TIMEOUT = 5.0


def short_dir(tmp_path: Path) -> str:
    """``tmp_path``, or a shorter temporary directory when a socket path would not fit."""
    if len(str(tmp_path / "notify.sock")) < 100:
        return str(tmp_path)
    return tempfile.mkdtemp(prefix="sdn-", dir="/tmp")


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket bound to a path, as systemd's notify socket is."""
    path = os.path.join(short_dir(tmp_path), "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(TIMEOUT)
    yield sock, path
    sock.close()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def received(sock: socket.socket) -> bytes:
    """The next datagram (waits at most TIMEOUT seconds)."""
    return sock.recv(4096)


def nothing_more(sock: socket.socket) -> bool:
    """True when no further datagram is queued."""
    sock.setblocking(False)
    try:
        sock.recv(4096)
    except BlockingIOError:
        return True
    finally:
        sock.settimeout(TIMEOUT)
    return False


@pytest.fixture
def log_events() -> Iterator[list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []
    observer: Any = events.append  # an ILogObserver is any callable taking the event
    globalLogPublisher.addObserver(observer)
    yield events
    globalLogPublisher.removeObserver(observer)


def test_no_notify_socket_means_no_notifier():
    assert SystemdNotifier.from_environ({}) is None
    assert SystemdNotifier.from_environ({"NOTIFY_SOCKET": ""}) is None


def test_vsock_address_is_not_supported():
    assert SystemdNotifier.from_environ({"NOTIFY_SOCKET": "vsock:2:1234"}) is None


def test_helpers_send_exactly_the_protocol_lines(receiver):
    sock, path = receiver
    notifier = SystemdNotifier.from_environ({"NOTIFY_SOCKET": path})
    assert notifier is not None

    assert notifier.ready("serving on 0.0.0.0:3000 with 2 workers")
    assert received(sock) == b"READY=1\nSTATUS=serving on 0.0.0.0:3000 with 2 workers\n"
    assert notifier.status("rolling: 1 of 2")
    assert received(sock) == b"STATUS=rolling: 1 of 2\n"
    assert notifier.watchdog()
    assert received(sock) == b"WATCHDOG=1\n"
    assert notifier.stopping()
    assert received(sock) == b"STOPPING=1\n"
    assert nothing_more(sock)
    assert (notifier.sent, notifier.failures) == (4, 0)
    notifier.close()


def test_notify_sends_all_fields_in_one_datagram(receiver):
    sock, path = receiver
    notifier = SystemdNotifier(path)
    assert notifier.notify(READY=1, STATUS="two\nlines", MAINPID=os.getpid())
    assert received(sock) == f"READY=1\nSTATUS=two lines\nMAINPID={os.getpid()}\n".encode()
    assert nothing_more(sock)
    assert not notifier.notify()  # nothing to say: nothing sent
    assert nothing_more(sock)


def test_reloading_carries_the_monotonic_clock(receiver):
    sock, path = receiver
    notifier = SystemdNotifier(path)
    before = time.monotonic_ns() // 1000
    assert notifier.reloading()
    after = time.monotonic_ns() // 1000
    lines = received(sock).decode().splitlines()
    assert lines[0] == "RELOADING=1"
    key, _, value = lines[1].partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after
    assert len(lines) == 2


def test_reloading_uses_the_given_clock(receiver):
    sock, path = receiver
    notifier = SystemdNotifier(path, monotonic_usec=lambda: 1234567)
    notifier.reloading()
    assert received(sock) == b"RELOADING=1\nMONOTONIC_USEC=1234567\n"


def test_abstract_socket():
    name = f"bungate-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(TIMEOUT)
    try:
        notifier = SystemdNotifier.from_environ({"NOTIFY_SOCKET": "@" + name})
        assert notifier is not None
        assert notifier.ready("up")
        assert received(sock) == b"READY=1\nSTATUS=up\n"
    finally:
        sock.close()


def test_unreachable_socket_never_raises_and_logs_once(tmp_path, log_events):
    notifier = SystemdNotifier(str(tmp_path / "nobody-listens.sock"))
    assert not notifier.ready("up")
    assert not notifier.watchdog()
    assert not notifier.stopping()
    assert notifier.failures == 3
    assert notifier.sent == 0
    warnings = [e for e in log_events if e.get("log_namespace") == "bungate.sdnotify"]
    assert len(warnings) == 1
    assert str(tmp_path / "nobody-listens.sock") in warnings[0]["address"]


def test_a_socket_that_goes_away_is_counted(receiver, log_events):
    sock, path = receiver
    notifier = SystemdNotifier(path)
    assert notifier.status("one")
    assert received(sock) == b"STATUS=one\n"
    sock.close()
    os.unlink(path)
    assert not notifier.status("two")
    assert (notifier.sent, notifier.failures) == (1, 1)


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "10000000"}, 5.0),
        ({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "{me}"}, 5.0),
        ({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "{other}"}, None),
        ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": ""}, 1.5),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "x"}, None),
    ],
)
def test_watchdog_interval(environ, expected):
    me = os.getpid()
    values = {k: v.format(me=me, other=me + 1) for k, v in environ.items()}
    values["NOTIFY_SOCKET"] = "/run/systemd/notify"
    notifier = SystemdNotifier.from_environ(values)
    assert notifier is not None
    assert notifier.watchdog_interval == expected


def test_watchdog_pid_can_be_given():
    environ = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "42"}
    notifier = SystemdNotifier.from_environ(environ, pid=42)
    assert notifier is not None and notifier.watchdog_interval == 1.0


def test_unset_environment_removes_only_the_notify_variables():
    environ = {
        "NOTIFY_SOCKET": "@x",
        "WATCHDOG_USEC": "1",
        "WATCHDOG_PID": "1",
        "PATH": "/usr/bin",
    }
    unset_environment(environ)
    assert environ == {"PATH": "/usr/bin"}
