"""
The master keeps private copies of the files its workers load (bungate.master).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trustme
from twisted.internet import defer, reactor
from twisted.python.failure import Failure

from bungate.config import ConfigError, TLSConfig, parse_config
from bungate.config.convert import from_json
from bungate.http.app import check_config
from bungate.ops.tlsfiles import (
    check_tls,
)
from tests.tlskit import (
    write_pair,
)


def settled(d: defer.Deferred[Any]) -> Any:
    """The result of a Deferred that has fired (a failure is raised)."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def test_manager_keeps_the_copies_of_the_accepted_config(ca: trustme.CA, tmp_path: Path) -> None:
    """accept_config: a refused config leaves the accepted copies; an accepted one replaces them."""
    from bungate.master.fleet import ClusterManager

    def config_for(cert: str, key: str) -> Any:
        return parse_config(
            {
                "server": {
                    "host": "127.0.0.1",
                    "port": 0,
                    "tls": {"enabled": True, "cert": cert, "key": key},
                },
                "cluster": {"enabled": True, "workers": 1},
            },
            source="gw.yaml",
        )

    first = ca.issue_cert("localhost")
    cert, key = write_pair(first, tmp_path, "server")
    manager = ClusterManager(config_for(cert, key), reactor=reactor, validate=check_config)
    settled(manager.accept_config(manager.config))  # as the master does before it starts
    manager.listeners.bind(manager.config)  # what a worker is started with needs them

    def worker_tls() -> TLSConfig:
        launch, _ = manager.spawner.launch_for(manager._new_slot())
        assert launch.config_json is not None
        built = from_json(launch.config_json)
        # ... and the worker is told which operator's file each copy stands for.
        named = launch.tls_copies
        assert (named[built.server.tls.cert], named[built.server.tls.key]) == (cert, key)
        return built.server.tls

    def copy_dirs(root: Path) -> list[Path]:
        return sorted(root.iterdir()) if root.exists() else []

    tls = worker_tls()
    assert tls.cert is not None and tls.key is not None
    first_copies = Path(tls.cert).parent
    root = first_copies.parent
    assert Path(tls.cert).read_bytes() == Path(cert).read_bytes()
    assert root.stat().st_mode & 0o777 == 0o700
    assert first_copies.stat().st_mode & 0o777 == 0o700

    # The operator overwrites the certificate with garbage: refused, naming their file.
    Path(cert).write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n")
    with pytest.raises(ConfigError) as caught:
        settled(manager.accept_config(config_for(cert, key)))
    assert caught.value.key == "server.tls.cert" and cert in str(caught.value)
    assert str(root) not in str(caught.value)
    assert worker_tls() == tls and copy_dirs(root) == [first_copies]
    check_tls(tls, "gw.yaml")  # the copy still holds the accepted certificate

    # Fixed in place: accepted; new copies, and the old ones are gone (no worker booting).
    second = ca.issue_cert("localhost")
    write_pair(second, tmp_path, "server")
    settled(manager.accept_config(config_for(cert, key)))
    new_tls = worker_tls()
    assert new_tls.cert is not None and Path(new_tls.cert).read_bytes() == Path(cert).read_bytes()
    assert copy_dirs(root) == [Path(new_tls.cert).parent]

    # Stopping the master removes the whole directory.
    stopped = manager.stop()
    assert stopped.called
    assert not root.exists()
