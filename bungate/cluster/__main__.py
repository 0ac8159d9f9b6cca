"""``python -m bungate.cluster``: the built-in worker program the master spawns."""

from bungate.cluster.child import main

main()
