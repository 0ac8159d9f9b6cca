"""
The master's pid file: written atomically, refused while another master holds it.

:meth:`PidFile.acquire` never leaves a half-written file: the pid goes into a temporary
file in the same directory, which is flushed to disk and then put in place with
``os.link`` (fails if the file appeared meanwhile) or, over a stale file, ``os.rename``.

A file is *held* when the pid it names is alive **and** that process's command line
(``/proc/<pid>/cmdline``) mentions ``bungate`` (the master's title is ``bungate master``).
Anything else is stale and is replaced: a pid that is not running, a pid reused by an
unrelated program (common after a reboot or in a container, where the master is often pid
1 on every start), content that is not a pid. Where ``/proc`` cannot tell (another OS, a
hidden process), a live pid counts as held: refusing to start is safer than two masters.

Two masters starting in the same instant over the same *stale* file can both replace it
(the last rename wins); a service manager runs one master per unit, so this is not guarded
with a lock.
"""

from __future__ import annotations

import errno
import os
import tempfile
from typing import Optional

import attrs

__all__ = ["PidFile", "PidFileError"]

_ATTEMPTS = 5


class PidFileError(Exception):
    """
    The pid file is held by a live bungate process, or cannot be written.

    :ivar path: the pid file.
    :ivar pid: the pid holding it, or ``None`` when the failure is of another kind.
    """

    def __init__(self, message: str, path: str, pid: Optional[int] = None) -> None:
        super().__init__(message)
        self.path = path
        self.pid = pid


@attrs.frozen
class _Found:
    """What the pid file held: ``kind`` is missing, held, dead, foreign, ours or garbage."""

    kind: str
    pid: Optional[int] = None
    detail: str = ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _cmdline(pid: int) -> Optional[str]:
    """The process's command line, NULs as spaces; ``None`` when it cannot be read."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        # /proc is mounted but the pid is gone: an empty command line (not bungate).
        return "" if os.path.isdir("/proc/self") else None
    except OSError:
        return None
    return raw.rstrip(b"\0").replace(b"\0", b" ").decode("utf-8", "replace")


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class PidFile:
    """
    A pid file at ``path``.

    :param path: where the file lives, e.g. ``/run/bungate/bungate.pid``.
    :param marker: the word a live holder's command line must contain to count as a
        bungate process.
    """

    def __init__(self, path: str, marker: str = "bungate") -> None:
        self.path = os.path.abspath(path)
        self.marker = marker
        self._pid: Optional[int] = None

    def read(self) -> Optional[int]:
        """
        The pid the file holds now.

        :returns: the pid, or ``None`` when the file is missing or holds no pid.
        """
        found = self._inspect(os.getpid())
        return found.pid if found.kind != "garbage" else None

    def _inspect(self, me: int) -> _Found:
        try:
            with open(self.path, "rb") as f:
                raw = f.read(64)
        except FileNotFoundError:
            return _Found("missing")
        except OSError as e:
            raise PidFileError(
                f"cannot read pid file {self.path}: {e.strerror or e}", self.path
            ) from None
        text = raw.decode("ascii", "replace").strip()
        if not text.isdigit() or int(text) <= 0:
            return _Found("garbage", detail=text)
        pid = int(text)
        if pid == me:
            return _Found("ours", pid)
        if not _alive(pid):
            return _Found("dead", pid)
        cmdline = _cmdline(pid)
        if cmdline is None or self.marker in cmdline:
            return _Found("held", pid, cmdline or "command line unknown")
        return _Found("foreign", pid, cmdline)

    def _describe(self, found: _Found, me: int) -> str:
        where = self.path
        if found.kind == "missing":
            return f"wrote pid {me} to {where}"
        if found.kind == "dead":
            return f"replaced stale {where}: pid {found.pid} is not running"
        if found.kind == "foreign":
            shown = found.detail or "a zombie or kernel thread"
            return (
                f"replaced stale {where}: pid {found.pid} is running but is not "
                f"{self.marker} ({shown})"
            )
        if found.kind == "ours":
            return f"replaced {where}: it already held this process's pid {me}"
        if not found.detail:
            return f"replaced {where}: it was empty"
        return f"replaced {where}: it held {found.detail[:40]!r}, not a pid"

    def _write_temp(self, me: int) -> str:
        directory = os.path.dirname(self.path)
        fd, temp = tempfile.mkstemp(
            prefix=f".{os.path.basename(self.path)}.", suffix=".tmp", dir=directory
        )
        try:
            os.write(fd, f"{me}\n".encode("ascii"))
            os.fchmod(fd, 0o644)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(temp)
            raise
        os.close(fd)
        return temp

    def check(self) -> None:
        """
        Refuse early, before anything is bound: the file names a live bungate process.

        :meth:`acquire` looks again when it writes the file.

        :raises PidFileError: as :meth:`acquire` does for a held file, or when the file
            cannot be read.
        """
        found = self._inspect(os.getpid())
        if found.kind == "held":
            raise self._held(found)

    def _held(self, found: _Found) -> PidFileError:
        return PidFileError(
            f"pid file {self.path} is held by pid {found.pid}, a running "
            f"{self.marker} process ({found.detail}): stop it first, or remove "
            "the file if it is not a gateway",
            self.path,
            found.pid,
        )

    def acquire(self) -> str:
        """
        Write this process's pid to the file, unless a live bungate process holds it.

        :returns: what was found and done, for the log, e.g. ``wrote pid 12 to
            /run/bungate/bungate.pid`` or ``replaced stale /run/bungate/bungate.pid: pid 7
            is not running``.
        :raises PidFileError: the file names a live bungate process (the error names the
            path and the pid), or it cannot be read or written.
        """
        me = os.getpid()
        for _attempt in range(_ATTEMPTS):
            found = self._inspect(me)
            if found.kind == "held":
                raise self._held(found)
            try:
                temp = self._write_temp(me)
            except OSError as e:
                raise PidFileError(
                    f"cannot write pid file {self.path}: {e.strerror or e}", self.path
                ) from None
            try:
                if found.kind == "missing":
                    os.link(temp, self.path)
                else:
                    os.rename(temp, self.path)
            except OSError as e:
                if e.errno == errno.EEXIST:
                    continue  # another process wrote it since we looked: look again
                raise PidFileError(
                    f"cannot write pid file {self.path}: {e.strerror or e}", self.path
                ) from None
            finally:
                try:
                    os.unlink(temp)
                except FileNotFoundError:
                    pass
            _fsync_dir(os.path.dirname(self.path))
            self._pid = me
            return self._describe(found, me)
        raise PidFileError(
            f"pid file {self.path} kept changing while it was being written", self.path
        )

    def release(self) -> bool:
        """
        Remove the file if it still holds this process's pid.

        :returns: whether it was removed; a file taken over by another process, or gone,
            is left alone.
        """
        me = self._pid if self._pid is not None else os.getpid()
        try:
            found = self._inspect(me)
        except PidFileError:
            return False
        if found.kind != "ours":
            return False
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            return False
        self._pid = None
        return True
