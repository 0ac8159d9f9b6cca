"""
``python -m bungate.worker``: the built-in worker program a master spawns, and its check.

Without arguments it serves the validated config the master passes down (see
:mod:`bungate.wire`). With ``--check`` it is a throwaway process that does what a
worker's boot does with a config short of serving it (imports the handlers, looks up the
plugins, loads the certificates) and says whether that worked, so the master never has
to import user code itself: a handler module that exits or hangs at import costs the
check, not the fleet.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from twisted.internet.defer import Deferred

from bungate.config.convert import from_json
from bungate.wire import WorkerLaunch
from bungate.worker.service import WorkerService, run_worker_reactor

#: The exit status of a check that refused the config (sysexits' EX_CONFIG).
EX_CONFIG = 78


def check(stream: Any = None) -> int:
    """
    Read ``{"config": <config JSON>, "names": {copy: original}}`` from stdin, check it as a
    worker's boot would, print one JSON line (``{"ok": true}`` or ``{"errors": [...]}``).

    :returns: the exit status: 0, or :data:`EX_CONFIG`.
    """
    from bungate.config import ConfigError
    from bungate.http.app import check_config

    stream = stream or sys.stdin
    try:
        request = json.loads(stream.read())
        config = from_json(request["config"])
        names = {str(k): str(v) for k, v in request.get("names", {}).items()}
    except (ValueError, KeyError, TypeError) as e:
        print(json.dumps({"errors": [f"<master>: the check got no config: {e}"]}))
        return EX_CONFIG
    try:
        check_config(config, names)
    except ConfigError as e:
        lines = [str(x) for x in e.errors]
        print(json.dumps({"errors": lines}))
        return EX_CONFIG
    except SystemExit as e:
        print(json.dumps({"errors": [f"{config.source}: a handler module exited ({e.code})"]}))
        return EX_CONFIG
    print(json.dumps({"ok": True}))
    return 0


def main() -> None:
    """Serve, or exit 2 with one line on stderr when not started by a master."""
    if sys.argv[1:2] == ["--check"]:
        sys.stdout.flush()
        raise SystemExit(check())
    from twisted.internet import reactor

    launch = WorkerLaunch.from_env()
    if launch is None or launch.config_json is None:
        sys.stderr.write("bungate worker: not started by a bungate master (no BUNGATE_CONFIG)\n")
        raise SystemExit(2)
    try:
        config = from_json(launch.config_json)
    except ValueError as e:
        sys.stderr.write(f"bungate worker: bad configuration from the master: {e}\n")
        raise SystemExit(2) from None
    service = WorkerService(config, reactor, launch)
    def cannot_start(e: Any) -> None:
        sys.stderr.write(f"bungate worker: cannot start: {e}\n")
        sys.stderr.flush()
        os._exit(3)

    try:
        started = service.start()
    except Exception as e:
        cannot_start(e)
    if isinstance(started, Deferred):
        started.addErrback(lambda f: cannot_start(f.value))
    run_worker_reactor(reactor, lambda: service)


if __name__ == "__main__":
    main()
