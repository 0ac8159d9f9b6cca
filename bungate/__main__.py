"""``python -m bungate``: the ``bungate`` command (:mod:`bungate.cli`)."""

import sys

from bungate.cli import main

if __name__ == "__main__":
    sys.exit(main())
