"""Synthetic sequence-to-sequence tasks (seeded NumPy): reversal and sorting.

Source ids are ``1..vocab_size`` (0 pads); target ids are the same symbols
shifted by 2 (``3..vocab_size+2``) because targets reserve 0, 1, 2 for PAD,
BOS and EOS (:mod:`rnnjax.models.seq2seq`), so a target vocabulary has
``vocab_size + 3`` ids.
"""

from __future__ import annotations

import numpy as np

TASKS = ("reverse", "sort")


def seq2seq_task(task: str, n: int, *, vocab_size: int = 8, min_len: int = 1, max_len: int = 8,
                 seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``n`` random sources of ``min_len..max_len`` symbols and their targets:
    the source reversed (``"reverse"``) or sorted (``"sort"``)."""
    fn = "rnnjax.data.synthetic.seq2seq_task"
    if task not in TASKS:
        raise ValueError(f"{fn}: unknown task {task!r}; expected 'reverse' or 'sort'.")
    if not 1 <= min_len <= max_len:
        raise ValueError(f"{fn}: expected 1 <= min_len <= max_len, got min_len={min_len}, max_len={max_len}. "
                         "Fix: every source needs at least one symbol.")
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_len, max_len + 1, n)
    src = [rng.integers(1, vocab_size + 1, k).astype(np.int32) for k in lengths]
    tgt = [(s[::-1] if task == "reverse" else np.sort(s)).astype(np.int32) + 2 for s in src]
    return src, tgt
