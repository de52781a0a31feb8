"""Synthetic tasks (seeded NumPy): sequence-to-sequence reversal and sorting, and the classic
long-memory tasks.

Source ids are ``1..vocab_size`` (0 pads); target ids are the same symbols
shifted by 2 (``3..vocab_size+2``) because targets reserve 0, 1, 2 for PAD,
BOS and EOS (:mod:`rnnjax.models.seq2seq`), so a target vocabulary has
``vocab_size + 3`` ids.

- :func:`adding`: the adding problem (Hochreiter & Schmidhuber 1997). Each step
  has a random value in [0, 1) and a marker; exactly two steps are marked, one
  in each half of the sequence; the target is the sum of the two marked values.
  Predicting the mean (1) gives an MSE of 1/6 ~ 0.167 (the variance of a sum of
  two uniform values).
- :func:`copy`: the copy task. ``symbols`` random symbols from an alphabet of
  ``alphabet`` (ids 1..alphabet), then ``delay - 1`` blanks (id 0), a "go"
  marker (id ``alphabet + 1``) and ``symbols`` more blanks; during those last
  steps the model must output the symbols in order. Guessing gives an accuracy
  of 1/alphabet on the recalled symbols.
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



def adding(rng: np.random.Generator, batch_size: int, length: int) -> dict:
    """``{"x": [B, T, 2] float32 (value, marker), "y": [B] float32, "lengths": [B]}``."""
    if length < 2:
        raise ValueError(f"rnnjax.data.adding: length must be >= 2 (one marked step in each half), got {length}.")
    values = rng.random((batch_size, length), dtype=np.float32)
    half = length // 2
    first = rng.integers(0, half, batch_size)
    second = rng.integers(half, length, batch_size)
    markers = np.zeros((batch_size, length), np.float32)
    rows = np.arange(batch_size)
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    y = values[rows, first] + values[rows, second]
    return {"x": np.stack([values, markers], axis=-1), "y": y.astype(np.float32),
            "lengths": np.full(batch_size, length, np.int32)}


def copy(rng: np.random.Generator, batch_size: int, delay: int, *, symbols: int = 10, alphabet: int = 8) -> dict:
    """``{"x": [B, T] int32 tokens, "y": [B, T] int32 targets, "mask": [B, T] bool (the recalled
    steps), "lengths": [B]}`` with ``T = symbols + delay + symbols``: the go marker is at step
    ``symbols + delay - 1``, and the symbols are recalled at the last ``symbols`` steps."""
    if delay < 1 or symbols < 1 or alphabet < 2:
        raise ValueError(f"rnnjax.data.copy: expected delay >= 1, symbols >= 1 and alphabet >= 2, got "
                         f"delay={delay}, symbols={symbols}, alphabet={alphabet}.")
    T = 2 * symbols + delay
    seq = rng.integers(1, alphabet + 1, (batch_size, symbols)).astype(np.int32)
    x = np.zeros((batch_size, T), np.int32)
    x[:, :symbols] = seq
    x[:, symbols + delay - 1] = alphabet + 1
    y = np.zeros((batch_size, T), np.int32)
    y[:, -symbols:] = seq
    mask = np.zeros((batch_size, T), bool)
    mask[:, -symbols:] = True
    return {"x": x, "y": y, "mask": mask, "lengths": np.full(batch_size, T, np.int32)}
