"""``python -m rnnjax ...``: the same as the ``rnnjax`` command."""

import sys

from rnnjax.cli import main

if __name__ == "__main__":
    sys.exit(main())
