"""The master's pid file, against real files and real processes."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bungate.ops.pidfile import PidFile, PidFileError

TIMEOUT = 30.0

# Holds until its stdin closes; says it is up on stdout, so no test has to sleep.
HOLDER = "import sys; print('up', flush=True); sys.stdin.read()"


def start_holder(*argv: str) -> subprocess.Popen[str]:
    """A live child whose command line carries ``argv``; returns once it runs."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, *argv],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == "up\n"
    return proc


def stop_holder(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.close()
    proc.wait(TIMEOUT)
    if proc.stdout is not None:
        proc.stdout.close()


@pytest.fixture
def holder() -> Iterator[subprocess.Popen[str]]:
    """A live process whose command line says ``bungate master``."""
    proc = start_holder("bungate master")
    yield proc
    stop_holder(proc)


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(TIMEOUT)
    return proc.pid


def test_a_fresh_path_gets_our_pid(tmp_path):
    path = tmp_path / "bungate.pid"
    pidfile = PidFile(str(path))
    assert pidfile.acquire() == f"wrote pid {os.getpid()} to {path}"
    assert path.read_text() == f"{os.getpid()}\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert pidfile.read() == os.getpid()
    # no temporary file is left beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bungate.pid"]


def test_a_live_bungate_holder_is_refused(tmp_path, holder):
    path = tmp_path / "bungate.pid"
    path.write_text(f"{holder.pid}\n")
    with pytest.raises(PidFileError) as caught:
        PidFile(str(path)).acquire()
    assert caught.value.pid == holder.pid
    assert caught.value.path == str(path)
    message = str(caught.value)
    assert str(path) in message and f"pid {holder.pid}" in message
    assert "bungate master" in message
    assert path.read_text() == f"{holder.pid}\n"  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bungate.pid"]


def test_a_live_process_that_is_not_bungate_is_stale(tmp_path):
    other = start_holder("some-other-daemon")
    try:
        path = tmp_path / "bungate.pid"
        path.write_text(f"{other.pid}\n")
        found = PidFile(str(path)).acquire()
        assert found.startswith(
            f"replaced stale {path}: pid {other.pid} is running but is not bungate ("
        )
        assert "some-other-daemon" in found
        assert path.read_text() == f"{os.getpid()}\n"
    finally:
        stop_holder(other)


def test_a_pid_that_exited_is_stale(tmp_path):
    pid = dead_pid()
    path = tmp_path / "bungate.pid"
    path.write_text(f"{pid}\n")
    assert PidFile(str(path)).acquire() == f"replaced stale {path}: pid {pid} is not running"
    assert path.read_text() == f"{os.getpid()}\n"


@pytest.mark.parametrize(
    ("content", "said"),
    [
        ("not a pid\n", "it held 'not a pid', not a pid"),
        ("", "it was empty"),
        ("-5\n", "it held '-5', not a pid"),
        ("0\n", "it held '0', not a pid"),
        ("12abc", "it held '12abc', not a pid"),
    ],
)
def test_garbage_is_replaced(tmp_path, content, said):
    path = tmp_path / "bungate.pid"
    path.write_text(content)
    pidfile = PidFile(str(path))
    assert pidfile.read() is None
    assert pidfile.acquire() == f"replaced {path}: {said}"
    assert path.read_text() == f"{os.getpid()}\n"


def test_our_own_pid_left_over_is_replaced(tmp_path):
    # In a container the master has the same pid on every start.
    path = tmp_path / "bungate.pid"
    path.write_text(f"{os.getpid()}\n")
    found = PidFile(str(path)).acquire()
    assert found == f"replaced {path}: it already held this process's pid {os.getpid()}"


def test_release_removes_our_file(tmp_path):
    path = tmp_path / "bungate.pid"
    pidfile = PidFile(str(path))
    pidfile.acquire()
    assert pidfile.release() is True
    assert not path.exists()
    assert pidfile.release() is False  # already gone


def test_release_leaves_a_file_someone_else_took(tmp_path, holder):
    path = tmp_path / "bungate.pid"
    pidfile = PidFile(str(path))
    pidfile.acquire()
    path.write_text(f"{holder.pid}\n")  # another master took over
    assert pidfile.release() is False
    assert path.read_text() == f"{holder.pid}\n"


def test_a_missing_directory_is_an_error_naming_the_path(tmp_path):
    path = tmp_path / "missing" / "bungate.pid"
    with pytest.raises(PidFileError, match=f"cannot write pid file {path}"):
        PidFile(str(path)).acquire()


def test_a_relative_path_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pidfile = PidFile("gateway.pid")
    assert pidfile.path == str(Path(tmp_path) / "gateway.pid")
    pidfile.acquire()
    assert (tmp_path / "gateway.pid").read_text() == f"{os.getpid()}\n"


def test_a_second_master_in_another_process_is_refused(tmp_path):
    # The real thing end to end: a child titled "bungate master" acquires, we are refused.
    path = tmp_path / "bungate.pid"
    script = (
        "import sys; from bungate.ops.pidfile import PidFile; "
        f"print(PidFile({str(path)!r}).acquire(), flush=True); sys.stdin.read()"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, "bungate master"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == f"wrote pid {proc.pid} to {path}\n"
        with pytest.raises(PidFileError, match=f"held by pid {proc.pid}"):
            PidFile(str(path)).acquire()
    finally:
        stop_holder(proc)
    # once it has exited, its file is stale and ours to take
    assert PidFile(str(path)).acquire() == f"replaced stale {path}: pid {proc.pid} is not running"
