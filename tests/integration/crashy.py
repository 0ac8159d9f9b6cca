"""A handler module whose import kills worker 2 at boot (for crash-loop tests)."""

import os

if os.environ.get("CLUSTER_WORKER") == "true" and os.environ.get("CLUSTER_WORKER_ID") == "2":
    os._exit(3)


def hello(request):
    return {"hello": os.environ.get("CLUSTER_WORKER_ID")}
