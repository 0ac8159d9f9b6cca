"""
server.user / server.group: looking them up, handing files over, dropping root for good
(in a child process: this one keeps its privileges), and the process options.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import bungate
from bungate.config import ConfigError, parse_config
from bungate.ops.daemon import Identity, ProcessOptions, process_options, resolve_identity
from bungate.ops.pidfile import PidFile, PidFileError

ROOT = Path(bungate.__file__).resolve().parents[1]

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")


def nobody() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user nobody here")


def config(**server: object) -> object:
    return parse_config({"server": server}, "gw.yaml")


def test_no_keys_no_identity():
    assert resolve_identity(config()) is None  # type: ignore[arg-type]


@needs_root
def test_a_user_brings_its_primary_group():
    entry = nobody()
    identity = resolve_identity(config(user="nobody"))  # type: ignore[arg-type]
    assert identity == Identity(
        user="nobody",
        uid=entry.pw_uid,
        gid=entry.pw_gid,
        group=grp.getgrgid(entry.pw_gid).gr_name,
        home=entry.pw_dir,
    )
    assert identity.needed
    assert identity.describe() == (
        f"user nobody ({entry.pw_uid}), group {identity.group} ({entry.pw_gid})"
    )


@needs_root
def test_numeric_ids_and_a_group_of_its_own():
    entry = nobody()
    group = grp.getgrgid(0)
    identity = resolve_identity(
        config(user=str(entry.pw_uid), group=group.gr_name)  # type: ignore[arg-type]
    )
    assert identity is not None
    assert (identity.user, identity.uid, identity.gid) == ("nobody", entry.pw_uid, 0)


def test_an_unknown_user_or_group_names_its_key():
    with pytest.raises(ConfigError) as caught:
        resolve_identity(config(user="no-such-user-here"))  # type: ignore[arg-type]
    assert str(caught.value) == "gw.yaml: server.user: no such user 'no-such-user-here'"
    with pytest.raises(ConfigError) as caught:
        resolve_identity(config(group="no-such-group-here"))  # type: ignore[arg-type]
    assert str(caught.value) == "gw.yaml: server.group: no such group 'no-such-group-here'"


def test_switching_users_needs_root(monkeypatch):
    entry = nobody()
    monkeypatch.setattr(os, "geteuid", lambda: entry.pw_uid + 1)
    with pytest.raises(ConfigError) as caught:
        resolve_identity(config(user="nobody"))  # type: ignore[arg-type]
    assert caught.value.key == "server.user"
    assert "needs the gateway to start as root" in caught.value.problem


def test_running_as_that_user_already_is_fine(monkeypatch):
    entry = nobody()
    monkeypatch.setattr(os, "geteuid", lambda: entry.pw_uid)
    monkeypatch.setattr(os, "getegid", lambda: entry.pw_gid)
    identity = resolve_identity(config(user="nobody"))  # type: ignore[arg-type]
    assert identity is not None and not identity.needed


@needs_root
def test_chown_hands_a_tree_over(tmp_path):
    entry = nobody()
    top = tmp_path / "run"
    (top / "gen").mkdir(parents=True)
    (top / "gen" / "key.pem").write_text("secret")
    identity = resolve_identity(config(user="nobody"))  # type: ignore[arg-type]
    assert identity is not None
    identity.chown([str(top)])
    for path in (top, top / "gen", top / "gen" / "key.pem"):
        st = path.stat()
        assert (st.st_uid, st.st_gid) == (entry.pw_uid, entry.pw_gid), path


DROP = textwrap.dedent(
    """
    import json, os, sys
    from bungate.config import parse_config
    from bungate.ops.daemon import resolve_identity

    identity = resolve_identity(parse_config({"server": {"user": sys.argv[1]}}))
    identity.drop()
    try:
        os.setuid(0)
        regained = True
    except PermissionError:
        regained = False
    print(json.dumps({
        "uids": os.getresuid(), "gids": os.getresgid(), "groups": os.getgroups(),
        "regained": regained, "home": os.environ.get("HOME"), "user": os.environ.get("USER"),
    }))
    """
)


@needs_root
def test_drop_is_for_good():
    entry = nobody()
    done = subprocess.run(
        [sys.executable, "-c", DROP, "nobody"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["uids"] == [entry.pw_uid] * 3
    assert report["gids"] == [entry.pw_gid] * 3
    assert set(report["groups"]) <= {entry.pw_gid}
    assert report["regained"] is False
    assert (report["home"], report["user"]) == (entry.pw_dir, "nobody")


def test_process_options_are_kept_for_the_master():
    before = process_options()
    try:
        assert process_options(ProcessOptions(pidfile="/run/x.pid")).pidfile == "/run/x.pid"
        assert process_options().pidfile == "/run/x.pid"
    finally:
        process_options(before)


# --- PidFile.check: refusing before anything is bound ----------------------------------------


def test_check_passes_for_a_missing_or_stale_file(tmp_path):
    path = tmp_path / "gw.pid"
    PidFile(str(path)).check()
    path.write_text("999999999\n")
    PidFile(str(path)).check()
    assert path.read_text() == "999999999\n"  # checking writes nothing


def test_check_refuses_a_file_held_by_a_live_gateway(tmp_path):
    path = tmp_path / "gw.pid"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; print(1, flush=True); sys.stdin.read()", "bungate"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None
        holder.stdout.readline()  # it runs (its command line is readable)
        path.write_text(f"{holder.pid}\n")
        with pytest.raises(PidFileError, match=f"held by pid {holder.pid}"):
            PidFile(str(path)).check()
    finally:
        holder.communicate(b"")
