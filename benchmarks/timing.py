"""Interleaved timing: every implementation runs once per round, in a rotating
order, so drift on a shared machine hits all of them alike."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def measure(runners: dict[str, Callable[[], object]], *, rounds: int = 7, warmup: int = 2) -> dict[str, dict]:
    """Returns per implementation: compile/first-call seconds and the
    median/min/max seconds of one call over ``rounds`` interleaved rounds."""
    names = list(runners)
    first = {}
    for name in names:
        start = time.perf_counter()
        runners[name]()
        first[name] = time.perf_counter() - start
        for _ in range(warmup - 1):
            runners[name]()
    samples = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            start = time.perf_counter()
            runners[name]()
            samples[name].append(time.perf_counter() - start)
    return {
        name: dict(first_call_s=first[name], median_s=statistics.median(s), min_s=min(s), max_s=max(s))
        for name, s in samples.items()
    }
