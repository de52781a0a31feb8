"""The fault-injection suite (issue 19): helpers shared by ``tests/test_faults.py`` (fast, in CI) and the
long seeded repetitions run on their own, e.g. ``python -m tests.faults.kill_during_save --runs 50``."""
