"""``python -m benchmarks``: the same as ``rnnjax-bench``."""

import sys

from benchmarks.cli import main

sys.exit(main())
