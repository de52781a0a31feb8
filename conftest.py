"""Runs the Python code blocks of README.md and docs/ as tests (Sybil): `pytest README.md docs`.

Each page's blocks run in order in one namespace, inside a fresh temporary directory, so a block may use
what an earlier block on the same page defined and may write files (checkpoints, run directories).
A block preceded by `<!-- skip: next -->` is not run; `<!-- invisible-code-block: python -->` comments
hold set-up code that the rendered page does not show. Shell (```bash) blocks are never run.
The default `pytest` run (testpaths = tests) does not collect these pages.
"""

import os
import shutil
import tempfile

import jax
from sybil import Sybil
from sybil.parsers.markdown import PythonCodeBlockParser, SkipParser

# The blocks compile many small programs and run each once: with XLA's optimisations off they take 40% less
# time, and their checks are tolerances that hold either way (tests/conftest.py does the same for the suite).
jax.config.update("jax_disable_most_optimizations", True)


def _enter_scratch_dir(namespace):
    namespace["_cwd"] = os.getcwd()
    namespace["_scratch"] = tempfile.mkdtemp(prefix="rnnjax-docs-")
    os.chdir(namespace["_scratch"])


def _leave_scratch_dir(namespace):
    os.chdir(namespace["_cwd"])
    shutil.rmtree(namespace["_scratch"], ignore_errors=True)


pytest_collect_file = Sybil(
    parsers=[PythonCodeBlockParser(), SkipParser()],
    patterns=["README.md", "docs/*.md", "docs/**/*.md"],
    setup=_enter_scratch_dir,
    teardown=_leave_scratch_dir,
).pytest()
