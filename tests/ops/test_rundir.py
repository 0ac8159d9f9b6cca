"""Per-run private directories, and the sweep of those a killed master left behind."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

from bungate.ops.rundir import make_run_dir, sweep_stale_run_dirs


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_run_dir_is_private_and_named_after_the_master(tmp_path):
    path = make_run_dir("tls", str(tmp_path))
    assert os.path.basename(path).startswith(f"bungate-tls-{os.getpid()}-")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o700


def test_sweep_removes_only_dead_masters_dirs_of_its_kind(tmp_path):
    dead = dead_pid()
    stale = tmp_path / f"bungate-tls-{dead}-abc123"
    stale.mkdir()
    (stale / "key.pem").write_text("secret")
    live = tmp_path / f"bungate-tls-{os.getppid()}-def456"
    live.mkdir()
    mine = make_run_dir("tls", str(tmp_path))
    other_kind = tmp_path / f"bungate-metrics-{dead}-xyz"
    other_kind.mkdir()
    unrelated = tmp_path / "bungate-tls-notapid"
    unrelated.mkdir()

    removed = sweep_stale_run_dirs("tls", str(tmp_path))

    assert removed == [str(stale)]
    assert not stale.exists()
    assert live.exists() and os.path.exists(mine) and other_kind.exists() and unrelated.exists()
