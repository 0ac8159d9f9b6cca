"""Fixtures shared by the in-process tests (tests/integration has its own conftest)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Iterator

import pytest
import pytest_twisted
import trustme
from twisted.internet import reactor

import bungate
from bungate.accept_table import AcceptTable
from bungate.testing import UpstreamServer

ROOT = Path(bungate.__file__).resolve().parents[1]


@pytest.fixture
def upstream() -> Iterator[UpstreamServer]:
    """A real upstream HTTP server on 127.0.0.1, stopped after the test."""
    server = UpstreamServer(reactor).start()
    yield server
    stopped: Any = server.stop()
    pytest_twisted.blockon(stopped)


def run_with_plugin(tmp_path: Path, module: str, source: str, script: str) -> Any:
    """
    Install ``source`` as a third-party plugin module ``bungate/plugins/<module>.py`` in a
    sys.path entry of its own (no ``__init__.py`` there, as a distribution would install
    it), run ``script`` in a fresh interpreter that sees it, and return the JSON document
    the script printed last.
    """
    plugins = tmp_path / "site" / "bungate" / "plugins"
    plugins.mkdir(parents=True)
    (plugins / f"{module}.py").write_text(textwrap.dedent(source))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "site"), str(ROOT)])
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture
def table():
    master, backing = AcceptTable.create()
    master.backing = backing  # type: ignore[attr-defined]
    master.views = []  # type: ignore[attr-defined]
    yield master
    for view in master.views:
        view.close()
    master.close()
    backing.close()


def worker_view(master: AcceptTable, slot: int) -> AcceptTable:
    """What a worker inherits: its own descriptor of the table and its slot."""
    view = AcceptTable.inherited(os.dup(master.backing.fileno()), slot)
    assert view is not None
    master.views.append(view)  # closed by the fixture
    return view


def busier_than_its_peer(table: AcceptTable) -> AcceptTable:
    """Two workers in the table: the returned one holds 40 connections, the other none."""
    busy, other = table.claim(), table.claim()
    worker_view(table, other).publish(0)
    view = worker_view(table, busy)
    view.publish(40)
    return view


@pytest.fixture
def ca() -> trustme.CA:
    """A fresh test certificate authority (trustme)."""
    return trustme.CA()


@pytest.fixture
def pair(ca: trustme.CA, tmp_path: Path) -> tuple[str, str]:
    """A certificate for localhost/127.0.0.1 and its key, as files."""
    from tests.tlskit import write_pair

    return write_pair(ca.issue_cert("localhost", "127.0.0.1"), tmp_path, "server")


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> str:
    """The test CA's certificate as a PEM file."""
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)
