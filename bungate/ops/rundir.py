"""
Private per-run directories of a master (metrics files, certificate copies).

A master that stops normally removes its directories. One killed with SIGKILL cannot, so
every directory carries the master's pid in its name, and the next master on the machine
removes those whose master is gone: private keys and stale metrics do not pile up in the
temporary directory of a host where the gateway runs for months.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from typing import Optional

__all__ = ["make_run_dir", "own_run_dirs", "sweep_stale_run_dirs"]


def make_run_dir(kind: str, parent: Optional[str] = None) -> str:
    """
    Make a fresh directory ``bungate-<kind>-<pid>-XXXXXXXX``, mode 0700.

    :param kind: what it holds, e.g. ``tls`` or ``metrics``.
    :param parent: where to make it; the system temporary directory when ``None``.
    :return: its absolute path.
    """
    return tempfile.mkdtemp(prefix=f"bungate-{kind}-{os.getpid()}-", dir=parent)


def own_run_dirs(kind: str, parent: Optional[str] = None) -> list[str]:
    """
    The ``bungate-<kind>-<pid>-*`` directories of this process (to hand them to the
    user the master runs as once it drops root).

    :param kind: as for :func:`make_run_dir`.
    :param parent: where to look; the system temporary directory when ``None``.
    :return: their absolute paths.
    """
    parent = parent or tempfile.gettempdir()
    prefix = f"bungate-{kind}-{os.getpid()}-"
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    found = []
    for name in sorted(names):
        path = os.path.join(parent, name)
        if name.startswith(prefix) and os.path.isdir(path) and not os.path.islink(path):
            found.append(path)
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: not ours to judge
    return True


def sweep_stale_run_dirs(kind: str, parent: Optional[str] = None) -> list[str]:
    """
    Remove the ``bungate-<kind>-<pid>-*`` directories this user owns whose master is dead.

    A directory whose pid is alive is kept even if that pid now belongs to another
    program: leaving a directory behind is harmless, removing a live one is not.

    :param kind: as for :func:`make_run_dir`.
    :param parent: where to look; the system temporary directory when ``None``.
    :return: the directories removed.
    """
    parent = parent or tempfile.gettempdir()
    pattern = re.compile(rf"bungate-{re.escape(kind)}-(\d+)-\w+\Z")
    removed: list[str] = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    uid = os.getuid()
    for name in names:
        match = pattern.match(name)
        if match is None:
            continue
        path = os.path.join(parent, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if st.st_uid != uid or not os.path.isdir(path) or os.path.islink(path):
            continue
        pid = int(match.group(1))
        if pid == os.getpid() or _alive(pid):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed
