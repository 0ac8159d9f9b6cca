"""
Socket activation: reading the sockets systemd passes, and matching them to listeners.

The matching tests bind real sockets and pass them in as :class:`InheritedSocket`; the
descriptor-reading tests run a child that has the sockets at fd 3, 4, ... as systemd would
leave them; the last tests run ``systemd-socket-activate`` itself.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import selectors
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from typing import Any, Optional

import pytest

import bungate
from bungate.config.schema import ServerConfig
from bungate.ops.socket_activation import (
    ActivationError,
    InheritedSocket,
    describe,
    inherited_sockets,
    match_listeners,
    unset_environment,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(bungate.__file__)))
TIMEOUT = 30.0


def _ipv6_works() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::", 0))
    except OSError:
        return False
    return True


needs_ipv6 = pytest.mark.skipif(not _ipv6_works(), reason="IPv6 is not available here")


@pytest.fixture
def sockets() -> Iterator[Any]:
    """``sockets(host, ...)`` binds and listens; every socket is closed afterwards."""
    made: list[socket.socket] = []

    def listen(
        host: str = "127.0.0.1",
        port: int = 0,
        name: Optional[str] = None,
        v6only: Optional[bool] = None,
    ) -> InheritedSocket:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        made.append(sock)
        if v6only is not None:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
        sock.bind((host, port))
        sock.listen(8)
        return InheritedSocket.from_socket(sock, name)

    yield listen
    for sock in made:
        sock.close()


# --- describing one socket ---------------------------------------------------------------


def test_a_listening_socket_is_described(sockets):
    item = sockets("127.0.0.1", name="main")
    assert item.fd == item.sock.fileno()
    assert (item.family, item.socktype) == (socket.AF_INET, socket.SOCK_STREAM)
    assert item.host == "127.0.0.1" and item.port == item.sock.getsockname()[1] > 0
    assert item.address == f"127.0.0.1:{item.port}"
    assert item.name == "main" and not item.dual_stack
    assert item.sock.getblocking() is False
    assert item.sock.get_inheritable() is True


@needs_ipv6
def test_an_ipv6_socket_says_whether_it_is_dual_stack(sockets):
    both = sockets("::", v6only=False)
    only = sockets("::", v6only=True)
    assert both.dual_stack and not only.dual_stack
    assert both.address == f"[::]:{both.port}"


def test_a_datagram_socket_is_refused():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        with pytest.raises(ActivationError, match="SOCK_DGRAM socket, not a stream"):
            InheritedSocket.from_socket(udp)


def test_a_socket_that_is_not_listening_is_refused():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
        tcp.bind(("127.0.0.1", 0))
        with pytest.raises(ActivationError, match="not listening"):
            InheritedSocket.from_socket(tcp)


def test_a_unix_socket_is_refused(tmp_path):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unix:
        unix.bind(str(tmp_path / "s"))
        unix.listen(1)
        with pytest.raises(ActivationError, match="AF_UNIX socket, not TCP"):
            InheritedSocket.from_socket(unix)


# --- matching ------------------------------------------------------------------------------


def test_match_by_exact_address(sockets):
    main = sockets("127.0.0.1")
    metrics = sockets("127.0.0.1")
    wanted = [
        ("main", "server.port", "127.0.0.1", main.port),
        ("metrics", "metrics.listen", "127.0.0.1", metrics.port),
    ]
    matched = match_listeners([metrics, main], wanted)
    assert list(matched) == ["main", "metrics"]
    assert matched["main"] is main.sock and matched["metrics"] is metrics.sock


def test_a_wildcard_host_matches_the_same_wildcard(sockets):
    any4 = sockets("0.0.0.0")
    assert match_listeners([any4], [("main", "server.port", "0.0.0.0", any4.port)]) == {
        "main": any4.sock
    }
    assert match_listeners([any4], [("main", "server.port", "", any4.port)]) == {"main": any4.sock}


def test_a_wildcard_host_does_not_take_a_specific_address(sockets):
    loopback = sockets("127.0.0.1")
    with pytest.raises(ActivationError) as caught:
        match_listeners([loopback], [("main", "server.port", "0.0.0.0", loopback.port)])
    message = str(caught.value)
    assert f"systemd passed 127.0.0.1:{loopback.port} (fd {loopback.fd})" in message
    assert f"server.port wants 0.0.0.0:{loopback.port}" in message


def test_a_host_name_matches_its_address(sockets):
    loopback = sockets("127.0.0.1")
    matched = match_listeners([loopback], [("main", "server.port", "localhost", loopback.port)])
    assert matched == {"main": loopback.sock}


@needs_ipv6
def test_ipv4_wildcard_takes_a_dual_stack_socket_only(sockets):
    both = sockets("::", v6only=False)
    assert match_listeners([both], [("main", "server.port", "0.0.0.0", both.port)]) == {
        "main": both.sock
    }
    only6 = sockets("::", v6only=True)
    with pytest.raises(ActivationError, match="no listener asks for"):
        match_listeners([only6], [("main", "server.port", "0.0.0.0", only6.port)])


@needs_ipv6
def test_ipv6_wildcard_takes_any_ipv6_wildcard_but_never_ipv4(sockets):
    only6 = sockets("::", v6only=True)
    assert match_listeners([only6], [("main", "server.port", "::", only6.port)]) == {
        "main": only6.sock
    }
    any4 = sockets("0.0.0.0")
    with pytest.raises(ActivationError, match=r"server.port wants \[::\]"):
        match_listeners([any4], [("main", "server.port", "::", any4.port)])


def test_port_zero_takes_any_port_but_not_a_socket_another_listener_names(sockets):
    first = sockets("127.0.0.1")
    second = sockets("127.0.0.1")
    wanted = [
        ("main", "server.port", "127.0.0.1", 0),
        ("metrics", "metrics.listen", "127.0.0.1", first.port),
    ]
    matched = match_listeners([first, second], wanted)
    assert matched == {"main": second.sock, "metrics": first.sock}


def test_names_win_over_the_configured_address(sockets):
    named = sockets("127.0.0.1", name="main")
    default = ServerConfig()
    matched = match_listeners([named], [("main", "server.port", default.host, default.port)])
    assert matched == {"main": named.sock}


def test_a_repeated_name_prefers_the_matching_address(sockets):
    # systemd-socket-activate -l A -l B --fdname=main names both sockets "main".
    first = sockets("127.0.0.1", name="main")
    second = sockets("127.0.0.1", name="main")
    wanted = [
        ("main", "server.port", "127.0.0.1", second.port),
        ("metrics", "metrics.listen", "127.0.0.1", first.port),
    ]
    matched = match_listeners([first, second], wanted)
    assert matched == {"main": second.sock, "metrics": first.sock}


def test_every_mismatch_is_named_at_once(sockets):
    stray = sockets("127.0.0.1", name="admin")
    other = sockets("127.0.0.1")
    wanted = [
        ("main", "server.port", "0.0.0.0", 3000),
        ("metrics", "metrics.listen", "127.0.0.1", 0),
        ("redirect", "server.tls.redirect_http.port", "0.0.0.0", 80),
    ]
    with pytest.raises(ActivationError) as caught:
        match_listeners([other, stray], wanted)
    message = str(caught.value)
    # the first free socket went to the any-port metrics listener; the rest is reported
    assert (
        f"systemd passed 127.0.0.1:{stray.port} (fd {stray.fd}, named 'admin'), which no "
        "listener asks for" in message
    )
    assert "server.port wants 0.0.0.0:3000 but systemd passed no socket" in message
    assert "server.tls.redirect_http.port wants 0.0.0.0:80" in message
    assert "metrics.listen" not in message
    assert "FileDescriptorName=" in message


def test_describe(sockets):
    main = sockets("0.0.0.0", name="main")
    metrics = sockets("127.0.0.1", name="metrics")
    assert describe([main, metrics]) == (
        "adopted 2 sockets from systemd (LISTEN_FDS): "
        f"main=0.0.0.0:{main.port}, metrics=127.0.0.1:{metrics.port}"
    )
    unnamed = sockets("127.0.0.1")
    assert describe([unnamed]) == (
        f"adopted 1 socket from systemd (LISTEN_FDS): fd {unnamed.fd}=127.0.0.1:{unnamed.port}"
    )
    assert describe([]) == "adopted no sockets from systemd (LISTEN_FDS)"


# --- the environment -------------------------------------------------------------------------


def test_no_listen_pid_means_no_sockets():
    assert inherited_sockets({}) == []
    assert inherited_sockets({"LISTEN_FDS": "2"}) == []


def test_sockets_meant_for_another_process_are_ignored():
    environ = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "2"}
    assert inherited_sockets(environ) == []
    assert inherited_sockets({"LISTEN_PID": "7", "LISTEN_FDS": "0"}, pid=7) == []


@pytest.mark.parametrize(
    ("environ", "error"),
    [
        ({"LISTEN_PID": "7", "LISTEN_FDS": "two"}, "LISTEN_FDS='two' is not a number"),
        ({"LISTEN_PID": "7", "LISTEN_FDS": "-1"}, "negative"),
        ({"LISTEN_PID": "seven", "LISTEN_FDS": "1"}, "LISTEN_PID='seven' is not a process id"),
        (
            {"LISTEN_PID": "7", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "main"},
            "names 1 descriptors but LISTEN_FDS=2",
        ),
    ],
)
def test_malformed_variables_are_refused(environ, error):
    with pytest.raises(ActivationError, match=error):
        inherited_sockets(environ, pid=7)


def test_unset_environment():
    environ = {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "main", "HOME": "/"}
    unset_environment(environ)
    assert environ == {"HOME": "/"}


# --- real descriptors at 3, 4, ... in a child process ------------------------------------------

CHILD = textwrap.dedent(
    """
    import json, os, sys
    from bungate.ops.socket_activation import ActivationError, inherited_sockets

    passed = [int(fd) for fd in sys.argv[1].split(",")]
    names = sys.argv[2] if len(sys.argv) > 2 else None
    assert min(passed) >= 3 + len(passed), passed
    for index, fd in enumerate(passed):
        os.dup2(fd, 3 + index)
        os.close(fd)
    environ = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": str(len(passed))}
    if names is not None:
        environ["LISTEN_FDNAMES"] = names
    try:
        found = inherited_sockets(environ)
    except ActivationError as e:
        still_open = []
        for index in range(len(passed)):
            try:
                os.fstat(3 + index)
                still_open.append(3 + index)
            except OSError:
                pass
        print(json.dumps({"error": str(e), "still_open": still_open}))
    else:
        print(json.dumps({"found": [
            [s.fd, s.name, s.host, s.port, s.sock.getblocking(), s.sock.get_inheritable()]
            for s in found
        ]}))
    """
)


def run_child(fds: list[int], names: Optional[str] = None) -> Any:
    args = [sys.executable, "-c", CHILD, ",".join(map(str, fds))]
    if names is not None:
        args.append(names)
    done = subprocess.run(
        args, pass_fds=fds, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture
def passed_fds() -> Iterator[Any]:
    opened: list[int] = []

    def make(source: Any) -> int:
        # a duplicate at 10 or above, out of the way of 3, 4, ... where the child puts it
        fd = fcntl.fcntl(source.fileno(), fcntl.F_DUPFD, 10)
        opened.append(fd)
        return fd

    yield make
    for fd in opened:
        with contextlib.suppress(OSError):
            os.close(fd)


def test_descriptors_from_three_on_are_adopted(sockets, passed_fds):
    main = sockets("127.0.0.1")
    metrics = sockets("127.0.0.1")
    fds = [passed_fds(main.sock), passed_fds(metrics.sock)]
    report = run_child(fds, "main:metrics")
    assert report["found"] == [
        [3, "main", "127.0.0.1", main.port, False, True],
        [4, "metrics", "127.0.0.1", metrics.port, False, True],
    ]


def test_without_names_the_sockets_have_none(sockets, passed_fds):
    main = sockets("127.0.0.1")
    report = run_child([passed_fds(main.sock)])
    assert report["found"] == [[3, None, "127.0.0.1", main.port, False, True]]


def test_a_passed_datagram_socket_is_refused_and_left_open(sockets, passed_fds):
    main = sockets("127.0.0.1")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        report = run_child([passed_fds(main.sock), passed_fds(udp)])
    assert "fd 4 is a SOCK_DGRAM socket" in report["error"]
    assert report["still_open"] == [3, 4]


def test_a_passed_file_is_refused(tmp_path, passed_fds):
    with open(tmp_path / "not-a-socket", "w") as f:
        report = run_child([passed_fds(f)])
    assert report["error"] == "fd 3 is not a socket (LISTEN_FDS=1)"


# --- systemd-socket-activate -----------------------------------------------------------------

ACTIVATED = textwrap.dedent(
    """
    import json, os, socket, sys
    from bungate.ops.socket_activation import (
        describe, inherited_sockets, match_listeners, unset_environment,
    )

    # As in a master: Twisted is imported (it takes LISTEN_PID/LISTEN_FDS out of
    # os.environ) and the title is set (which overwrites /proc/self/environ) first.
    twisted_took_them = "LISTEN_PID" not in os.environ
    try:
        import setproctitle
    except ImportError:
        pass
    else:
        setproctitle.setproctitle("bungate master")
    found = inherited_sockets()
    wanted = [tuple(item) for item in json.loads(sys.argv[1])]
    matched = match_listeners(found, wanted)
    report = {
        "sockets": [
            {
                "fd": s.fd, "name": s.name, "family": s.family.name, "type": s.socktype.name,
                "host": s.host, "port": s.port, "dual_stack": s.dual_stack,
                "blocking": s.sock.getblocking(), "inheritable": s.sock.get_inheritable(),
            }
            for s in found
        ],
        "matched": {name: sock.fileno() for name, sock in matched.items()},
        "describe": describe(found),
    }
    unset_environment()
    report["left"] = sorted(name for name in os.environ if name.startswith("LISTEN_"))
    report["twisted_took_them"] = twisted_took_them
    report["found_again"] = len(inherited_sockets())
    print(json.dumps(report), flush=True)
    main = matched["main"]
    main.settimeout(30)
    conn, _ = main.accept()
    conn.settimeout(30)
    conn.sendall(b"pong:" + conn.recv(64))
    conn.close()
    """
)

ACTIVATE = shutil.which("systemd-socket-activate")
needs_activate = pytest.mark.skipif(
    ACTIVATE is None and not os.environ.get("CI"),  # CI installs it: never skipped there
    reason="systemd-socket-activate is not installed (apt-get install systemd)",
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def wait_for_listening(proc: subprocess.Popen[bytes], count: int) -> str:
    """Read the launcher's stderr until it says it listens on ``count`` sockets."""
    assert proc.stderr is not None
    seen = b""
    deadline = time.monotonic() + TIMEOUT
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stderr, selectors.EVENT_READ)
        while seen.count(b"Listening on") < count:
            left = deadline - time.monotonic()
            if left <= 0 or not selector.select(left):
                raise AssertionError(f"systemd-socket-activate did not listen: {seen!r}")
            chunk = os.read(proc.stderr.fileno(), 4096)
            if not chunk:
                raise AssertionError(f"systemd-socket-activate exited: {seen!r}")
            seen += chunk
    return seen.decode()


def activate(
    listen: list[str], fdname: Optional[str], wanted: list[Any], connect_port: int
) -> tuple[Any, bytes]:
    """
    Run the script under systemd-socket-activate, make one connection to
    ``connect_port`` (which also makes the launcher start it), and return its report and
    what the connection got back.
    """
    assert ACTIVATE is not None
    args = [ACTIVATE]
    for address in listen:
        args += ["-l", address]
    if fdname is not None:
        args.append(f"--fdname={fdname}")
    args += ["-E", f"PYTHONPATH={ROOT}", sys.executable, "-c", ACTIVATED, json.dumps(wanted)]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    answer = b""
    try:
        wait_for_listening(proc, len(listen))
        with socket.create_connection(("127.0.0.1", connect_port), timeout=TIMEOUT) as client:
            client.sendall(b"ping")
            try:
                while True:
                    chunk = client.recv(64)
                    if not chunk:
                        break
                    answer += chunk
            except ConnectionResetError:
                pass  # the script failed before answering: its stderr says why, below
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(TIMEOUT)
    assert proc.returncode == 0, err.decode()
    return json.loads(out.decode().strip().splitlines()[-1]), answer


@needs_activate
def test_systemd_socket_activate_passes_named_sockets():
    main, metrics = free_port(), free_port()
    wanted = [
        ["main", "server.port", "127.0.0.1", main],
        ["metrics", "metrics.listen", "127.0.0.1", metrics],
    ]
    report, answer = activate(
        [f"127.0.0.1:{main}", f"127.0.0.1:{metrics}"], "main:metrics", wanted, main
    )
    assert answer == b"pong:ping"  # the adopted fd 3 is the socket we connected to
    # importing bungate (Twisted's endpoints) emptied os.environ: the import-time copy served
    assert report["twisted_took_them"]
    assert report["sockets"] == [
        {
            "fd": 3,
            "name": "main",
            "family": "AF_INET",
            "type": "SOCK_STREAM",
            "host": "127.0.0.1",
            "port": main,
            "dual_stack": False,
            "blocking": False,
            "inheritable": True,
        },
        {
            "fd": 4,
            "name": "metrics",
            "family": "AF_INET",
            "type": "SOCK_STREAM",
            "host": "127.0.0.1",
            "port": metrics,
            "dual_stack": False,
            "blocking": False,
            "inheritable": True,
        },
    ]
    assert report["matched"] == {"main": 3, "metrics": 4}
    assert report["describe"] == (
        f"adopted 2 sockets from systemd (LISTEN_FDS): main=127.0.0.1:{main}, "
        f"metrics=127.0.0.1:{metrics}"
    )
    assert report["left"] == []
    assert report["found_again"] == 0  # adopted once: unset_environment forgot them


@needs_activate
def test_systemd_socket_name_wins_over_the_configured_port():
    port = free_port()
    default = ServerConfig()
    wanted = [["main", "server.port", default.host, default.port]]
    report, answer = activate([f"127.0.0.1:{port}"], "main", wanted, port)
    assert answer == b"pong:ping"
    assert report["matched"] == {"main": 3}
    assert [s["name"] for s in report["sockets"]] == ["main"]


@needs_activate
@needs_ipv6
def test_systemd_port_only_socket_is_dual_stack_and_serves_the_ipv4_wildcard():
    # ListenStream=PORT (here -l PORT) binds [::]:PORT, which the default host 0.0.0.0 takes.
    port = free_port()
    wanted = [["main", "server.port", ServerConfig().host, port]]
    report, answer = activate([str(port)], None, wanted, port)
    assert answer == b"pong:ping"
    (only,) = report["sockets"]
    assert (only["family"], only["host"], only["dual_stack"], only["name"]) == (
        "AF_INET6",
        "::",
        True,
        None,
    )
    assert report["describe"] == f"adopted 1 socket from systemd (LISTEN_FDS): fd 3=[::]:{port}"
