"""
What a process uses, read from ``/proc`` (Linux): resident memory, CPU time, open files.

The master reads its workers' numbers (and its own) for the control API's fleet view and
for the per-worker ``process_*`` metrics; no process is asked anything, so a hung worker
is measured as well as a healthy one. Elsewhere than Linux, or for a process that is gone
or not readable, the answer is ``None``.
"""

from __future__ import annotations

import os
from typing import Optional

import attrs

__all__ = ["ProcessUsage", "open_fds", "usage"]


def _sysconf(name: str, fallback: int) -> int:
    try:
        value = os.sysconf(name)
    except (AttributeError, OSError, ValueError):
        return fallback
    return value if value > 0 else fallback


_TICKS = _sysconf("SC_CLK_TCK", 100)
_PAGE = _sysconf("SC_PAGE_SIZE", 4096)


@attrs.frozen
class ProcessUsage:
    """
    One process's resources at one moment.

    :ivar pid: the process.
    :ivar rss_bytes: its resident set size.
    :ivar cpu_seconds: user plus system CPU time since it started.
    :ivar open_fds: its open descriptors, or ``None`` when ``/proc/<pid>/fd`` cannot be
        listed (another user's process).
    """

    pid: int
    rss_bytes: int
    cpu_seconds: float
    open_fds: Optional[int]


def open_fds(pid: int, proc: str = "/proc") -> Optional[int]:
    """
    How many descriptors ``pid`` holds open.

    :returns: ``None`` when its ``fd`` directory cannot be listed.
    """
    try:
        return len(os.listdir(f"{proc}/{pid}/fd"))
    except OSError:
        return None


def usage(pid: int, proc: str = "/proc") -> Optional[ProcessUsage]:
    """
    What ``pid`` uses now, from ``/proc/<pid>/stat``.

    :param pid: the process.
    :param proc: where procfs is mounted (for tests).
    :returns: ``None`` when the process is gone, a zombie, or ``/proc`` is not there.
    """
    try:
        with open(f"{proc}/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces or ")": split
    # after the last one. fields[0] is then field 3 (the state).
    try:
        fields = raw.rsplit(b")", 1)[1].split()
        state = fields[0]
        utime, stime = int(fields[11]), int(fields[12])
        rss_pages = int(fields[21])
    except (IndexError, ValueError):
        return None
    if state in (b"Z", b"X"):
        return None
    return ProcessUsage(
        pid=pid,
        rss_bytes=max(0, rss_pages) * _PAGE,
        cpu_seconds=(utime + stime) / _TICKS,
        open_fds=open_fds(pid, proc),
    )
