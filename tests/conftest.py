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
from twisted.internet import reactor

import bungate
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
