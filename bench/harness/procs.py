"""Processes: spawning in their own session, killing whole trees, and reading /proc.

Everything here is Linux-only and stdlib-only: process trees come from
``/proc/<pid>/task/*/children``, memory from ``VmRSS`` in ``/proc/<pid>/status``, CPU time
from ``utime + stime`` in ``/proc/<pid>/stat``, and socket ownership from ``/proc/net/tcp``
matched against ``/proc/<pid>/fd``. Accept queues of listening sockets come from ``ss``
(iproute2), when it is there.
"""

import errno
import glob
import os
import shutil
import signal
import socket
import subprocess
import time
from typing import Dict, Iterable, List, Optional, Sequence, Set

CLK_TCK = os.sysconf("SC_CLK_TCK")
TCP_ESTABLISHED = "01"
TCP_LISTEN = "0A"


def free_port() -> int:
    """
    Ask the kernel for a free TCP port on 127.0.0.1.

    :return: a port number nobody listened on a moment ago.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(
    argv: Sequence[str],
    log_path: str,
    cwd: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
) -> subprocess.Popen:
    """
    Start a process in a new session (its own process group), output to a log file.

    :param argv: the command line.
    :param log_path: where stdout and stderr go (appended).
    :param cwd: the working directory.
    :param env: the environment; the current one when ``None``.
    :return: the started process.
    """
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
            start_new_session=True,
        )


def _signal_quietly(pid: int, sig: int, group: bool = False) -> None:
    try:
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except OSError as e:
        if e.errno not in (errno.ESRCH, errno.EPERM):
            raise


def stop(proc: Optional[subprocess.Popen], grace: float = 3.0) -> None:
    """
    Stop a process started by :func:`spawn` and everything it started.

    SIGTERM to its process group, wait up to ``grace`` seconds, then SIGKILL to the group
    and to every process of its tree (in case a child moved to another group).

    :param proc: the process; ``None`` is ignored.
    :param grace: seconds to wait for a clean exit.
    """
    if proc is None:
        return
    tree = process_tree(proc.pid) if proc.poll() is None else []
    _signal_quietly(proc.pid, signal.SIGTERM, group=True)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    _signal_quietly(proc.pid, signal.SIGKILL, group=True)
    for pid in tree:
        _signal_quietly(pid, signal.SIGKILL)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass


def children(pid: int) -> List[int]:
    """
    The direct children of a process.

    :param pid: the parent.
    :return: child pids; empty when the process is gone.
    """
    kids: List[int] = []
    for path in glob.glob(f"/proc/{pid}/task/*/children"):
        try:
            with open(path) as f:
                kids.extend(int(p) for p in f.read().split())
        except OSError:
            continue
    return kids


def process_tree(pid: int) -> List[int]:
    """
    A process and all its descendants, parents first.

    :param pid: the root.
    :return: pids; empty when the root is gone.
    """
    if not os.path.exists(f"/proc/{pid}"):
        return []
    tree = [pid]
    i = 0
    while i < len(tree):
        tree.extend(c for c in children(tree[i]) if c not in tree)
        i += 1
    return tree


def group_members(pgid: int) -> List[int]:
    """
    The processes of a process group (a server we spawned leads its own).

    :param pgid: the group id (the pid of the process we started).
    :return: pids whose group is ``pgid``, in pid order.
    """
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # After the last ")": state, ppid, pgrp, ...
        fields = stat[stat.rindex(")") + 2 :].split()
        if len(fields) > 2 and int(fields[2]) == pgid:
            members.append(int(entry))
    return sorted(members)


def cmdline(pid: int) -> str:
    """
    A process's command line, or its title if it set one (setproctitle).

    :param pid: the process.
    :return: the command line with NULs as spaces; ``""`` when gone.
    """
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode("utf-8", "replace").strip()


def rss_kib(pid: int) -> Optional[int]:
    """
    Resident set size of a process.

    :param pid: the process.
    :return: ``VmRSS`` in KiB; ``None`` when the process is gone.
    """
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> Optional[float]:
    """
    CPU time a process has used so far (user + system).

    :param pid: the process.
    :return: seconds; ``None`` when the process is gone.
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name in parentheses may contain spaces: split after the last ")".
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _tcp_table() -> List[tuple]:
    """
    The kernel's TCP sockets of this network namespace.

    :return: ``(local_port, remote_port, state, inode)`` tuples from /proc/net/tcp{,6}.
    """
    rows = []
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    local_port = int(parts[1].rsplit(":", 1)[1], 16)
                    remote_port = int(parts[2].rsplit(":", 1)[1], 16)
                    rows.append((local_port, remote_port, parts[3], parts[9]))
        except OSError:
            continue
    return rows


def _socket_inodes(pid: int) -> Set[str]:
    inodes = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def established_per_pid(pids: Iterable[int], server_port: int) -> Dict[int, int]:
    """
    How many established client connections each process holds on a listening port.

    :param pids: the server processes (e.g. the workers).
    :param server_port: the port they serve.
    :return: ``{pid: count}``; a connection shared by several pids counts for each.
    """
    conns = {
        inode
        for lport, _rport, state, inode in _tcp_table()
        if lport == server_port and state == TCP_ESTABLISHED
    }
    return {pid: len(_socket_inodes(pid) & conns) for pid in pids}


def listeners(port: int, pids: Iterable[int]) -> List[int]:
    """
    Which of some processes hold a socket listening on a TCP port.

    :param port: the port.
    :param pids: the candidates (e.g. workers that each listen with ``SO_REUSEPORT``).
    :return: those holding one, in the order given.
    """
    listening = {
        inode
        for lport, _rport, state, inode in _tcp_table()
        if lport == port and state == TCP_LISTEN
    }
    return [pid for pid in pids if _socket_inodes(pid) & listening]


def have_ss() -> bool:
    """:return: whether ``ss`` (iproute2) is on PATH."""
    return shutil.which("ss") is not None


def _ss(args: Sequence[str]) -> List[str]:
    out = subprocess.run(
        ["ss", "-H", *args], capture_output=True, text=True, timeout=10, check=True
    )
    return [line for line in out.stdout.splitlines() if line.strip()]


def listen_queues(port: int) -> List[Dict[str, int]]:
    """
    The accept queues of the sockets listening on a TCP port (``ss -ltn``).

    For a listening socket ``Recv-Q`` is the number of connections the kernel completed
    and queued that no process has accepted yet, ``Send-Q`` the queue's limit (the
    backlog). A server whose workers each listen (``SO_REUSEPORT``) has one per worker.

    :param port: the port.
    :return: ``[{"recv_q": queued, "send_q": backlog}, ...]``, one per listening socket.
    :raises OSError: or ``subprocess`` errors when ``ss`` cannot run.
    """
    queues = []
    for line in _ss(["-ltn", f"sport = :{port}"]):
        parts = line.split()  # State Recv-Q Send-Q Local Peer
        queues.append({"recv_q": int(parts[1]), "send_q": int(parts[2])})
    return queues


def established_count(port: int) -> int:
    """
    Established TCP connections whose local port is ``port``: the server side of every
    client connection, accepted or still queued (``ss -tn state established``).

    :param port: the server's port.
    :return: the count.
    :raises OSError: or ``subprocess`` errors when ``ss`` cannot run.
    """
    return len(_ss(["-tn", "state", "established", f"sport = :{port}"]))


def server_of(client_port: int, server_port: int, pids: Iterable[int]) -> Optional[int]:
    """
    Which process accepted a given client connection.

    :param client_port: the local port of our client socket (still open).
    :param server_port: the port we connected to.
    :param pids: the candidate server processes.
    :return: the pid holding the server side of the connection, or ``None``.
    """
    inodes = {
        inode
        for lport, rport, _state, inode in _tcp_table()
        if lport == server_port and rport == client_port
    }
    for pid in pids:
        if _socket_inodes(pid) & inodes:
            return pid
    return None


def wait_for(predicate, timeout: float, interval: float = 0.05):
    """
    Poll a predicate until it returns something truthy or the time is up.

    :param predicate: a callable taking no arguments.
    :param timeout: seconds.
    :param interval: seconds between attempts.
    :return: the first truthy result, or the last falsy one at the deadline.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result or time.monotonic() >= deadline:
            return result
        time.sleep(interval)
