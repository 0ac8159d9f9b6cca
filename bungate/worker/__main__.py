"""
``python -m bungate.worker``: the built-in worker program a master spawns.

It serves the validated config the master passes down (see :mod:`bungate.wire`).
"""

from __future__ import annotations

import os
import sys

from bungate.config.convert import from_json
from bungate.wire import WorkerLaunch
from bungate.worker.service import WorkerService, run_worker_reactor


def main() -> None:
    """Serve, or exit 2 with one line on stderr when not started by a master."""
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
    try:
        WorkerService(config, reactor, launch).start()
    except Exception as e:
        sys.stderr.write(f"bungate worker: cannot start: {e}\n")
        os._exit(3)
    run_worker_reactor(reactor)


if __name__ == "__main__":
    main()
