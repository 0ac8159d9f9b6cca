"""A user script in the spec's style: master when run directly, worker under the master."""

import os
import sys

from bungate import Gateway, run


def whoami(request):
    return {"worker_id": os.environ.get("CLUSTER_WORKER_ID"), "script": True}


gateway = Gateway(
    server={"host": "127.0.0.1", "port": int(sys.argv[1]) if len(sys.argv) > 1 else 0},
    cluster={"enabled": True, "workers": 2},
    logger={"request_logging": False},
    health={"details": True},
)
gateway.add_route("/whoami", handler=whoami)

if __name__ == "__main__":
    run(gateway)
