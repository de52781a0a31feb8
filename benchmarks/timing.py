"""Interleaved timing: every implementation runs once per round, in a rotating
order, so drift on a shared machine (±20% here) hits all of them alike.

The house rule: compile (first call) first, then warm-up calls, then
``rounds`` rounds; in round ``r`` the implementations run in the order
``names[r % n:] + names[:r % n]``. Only the rounds are timed as samples.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def rotation(names: list[str], r: int) -> list[str]:
    """The order of round ``r``: the list rotated left by ``r``."""
    k = r % len(names) if names else 0
    return names[k:] + names[:k]


def measure(runners: dict[str, Callable[[], object]], *, rounds: int = 7, warmup: int = 1,
            clock: Callable[[], float] = time.perf_counter) -> dict[str, dict]:
    """Times each runner over ``rounds`` interleaved rounds.

    Each runner is first called once (its compile / first-call time, timed on
    its own), then ``warmup`` more times untimed. A runner whose first call
    raises is dropped and reported as ``{"error": "..."}``.

    Returns, per name: ``first_call_s``, ``median_s``, ``min_s``, ``max_s``
    and ``samples_s`` (seconds per call, one per round).
    """
    if rounds < 1:
        raise ValueError(f"benchmarks.timing.measure: rounds must be >= 1, got {rounds}.")
    first, failed = {}, {}
    for name, run in runners.items():
        start = clock()
        try:
            run()
        except Exception as error:  # e.g. an XLA compile failure of one implementation
            failed[name] = {"error": f"{type(error).__name__}: {error}"}
            continue
        first[name] = clock() - start
        for _ in range(warmup):
            run()
    names = list(first)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in rotation(names, r):
            start = clock()
            runners[name]()
            samples[name].append(clock() - start)
    results: dict[str, dict] = {
        name: dict(first_call_s=first[name], median_s=statistics.median(s), min_s=min(s), max_s=max(s), samples_s=s)
        for name, s in samples.items()
    }
    results.update(failed)
    return results
