"""``python -m sb3_trpo``: the ``sb3-trpo`` command line."""

import sys

from sb3_trpo.cli import main

if __name__ == "__main__":
    sys.exit(main())
