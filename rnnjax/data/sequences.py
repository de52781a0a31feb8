"""Sequences of examples: padding with lengths, splits, scaling fitted on training data only,
sliding windows, and a resumable shuffled batch iterator.

Variable-length data is padded to the longest sequence and carries its
``lengths``; nothing is ever truncated. Loaders return NumPy dicts
``{"x": [N, T, F] float32, "y": ..., "lengths": [N] int32}``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np


def pad_sequences(seqs, *, dtype=np.float32, value: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """``[T_i, F]`` arrays -> ``(x [N, max T_i, F], lengths [N])``, padded with ``value`` at the end."""
    fn = "rnnjax.data.pad_sequences"
    seqs = [np.asarray(s, dtype) for s in seqs]
    if not seqs:
        raise ValueError(f"{fn}: got no sequences; expected at least one.")
    if any(s.ndim != 2 or s.shape[1] != seqs[0].shape[-1] for s in seqs):
        shapes = [list(s.shape) for s in seqs[:3]]
        raise ValueError(f"{fn}: expected sequences of shape [T_i, F] with the same F, got shapes {shapes}"
                         f"{' ...' if len(seqs) > 3 else ''}. Fix: reshape each sequence to [T_i, F].")
    lengths = np.array([len(s) for s in seqs], np.int32)
    x = np.full((len(seqs), int(lengths.max()), seqs[0].shape[1]), value, dtype)
    for i, s in enumerate(seqs):
        x[i, :len(s)] = s
    return x, lengths


def valid_mask(lengths, T: int) -> np.ndarray:
    """Booleans ``[N, T]``: True at the valid steps ``t < lengths[n]``."""
    return np.arange(T)[None, :] < np.asarray(lengths)[:, None]


def fill_missing(x, lengths=None) -> np.ndarray:
    """NaNs in ``x [N, T, F]`` replaced by the last valid value of the same feature (the next one
    before the first), or 0 where a feature has no value at all; padding stays as it is."""
    x = np.array(x, np.float32, copy=True)
    N, T, _ = x.shape
    lengths = np.full(N, T) if lengths is None else np.asarray(lengths)
    for n in range(N):
        s = x[n, :lengths[n]]  # a view
        for f in np.flatnonzero(np.isnan(s).any(axis=0)):
            col = s[:, f]
            ok = np.flatnonzero(~np.isnan(col))
            if not len(ok):
                col[:] = 0.0
                continue
            idx = np.maximum.accumulate(np.where(~np.isnan(col), np.arange(len(col)), -1))
            col[:] = np.where(idx >= 0, col[np.maximum(idx, 0)], col[ok[0]])
    return x


class Scaler(NamedTuple):
    """Per-feature standardisation ``(x - mean) / std``, fitted on training data only."""

    mean: np.ndarray  # [F]
    std: np.ndarray  # [F]

    @classmethod
    def fit(cls, x, lengths=None) -> Scaler:
        """Mean and standard deviation of each feature over the valid steps of ``x [N, T, F]``
        (or over ``x [N, F]`` / ``[T, F]`` rows), NaNs ignored; a constant feature gets std 1."""
        x = np.asarray(x, np.float64)
        if lengths is not None:
            x = x[valid_mask(lengths, x.shape[1])]
        rows = x.reshape(-1, x.shape[-1])
        mean = np.nanmean(rows, axis=0)
        std = np.nanstd(rows, axis=0)
        std = np.where(std > 0, std, 1.0)
        return cls(mean.astype(np.float32), std.astype(np.float32))

    def transform(self, x, lengths=None) -> np.ndarray:
        """Standardised ``x``; padding (past ``lengths``) stays 0."""
        out = ((np.asarray(x, np.float32) - self.mean) / self.std).astype(np.float32)
        if lengths is not None:
            out = np.where(valid_mask(lengths, out.shape[1])[..., None], out, 0.0).astype(np.float32)
        return out

    def inverse(self, x) -> np.ndarray:
        return (np.asarray(x, np.float32) * self.std + self.mean).astype(np.float32)


def split(n: int, fraction: float, *, seed: int = 0, labels=None) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(kept, held_out)`` holding out ``fraction`` of ``n`` examples at random (seeded);
    with ``labels``, the same fraction of every class (stratified)."""
    rng = np.random.default_rng(seed)
    if labels is None:
        perm = rng.permutation(n)
        k = int(round(n * fraction))
        return np.sort(perm[k:]), np.sort(perm[:k])
    labels = np.asarray(labels)
    held = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        held.extend(idx[:int(round(len(idx) * fraction))])
    held = np.sort(np.array(held, np.int64))
    return np.setdiff1d(np.arange(n), held), held


def first_non_finite(x) -> tuple[tuple[int, ...], float] | None:
    """The index and value of the first NaN or infinite element of ``x`` (row-major order), or None."""
    bad = np.argwhere(~np.isfinite(x))
    if not len(bad):
        return None
    index = tuple(int(i) for i in bad[0])
    return index, float(x[index])


def sliding_windows(series, window: int, horizon: int, *, start: int = 0, stop: int | None = None,
                    stride: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Windows of a series ``[T]`` or ``[T, F]``: inputs ``x [N, window, F]`` (the ``window`` values
    before each forecast origin) and targets ``y [N, horizon]`` (the next ``horizon`` values of
    feature 0), for every origin ``o`` with ``start <= o - window`` and ``o + horizon <= stop``."""
    fn = "rnnjax.data.sliding_windows"
    s = np.asarray(series, np.float32)
    s = s[:, None] if s.ndim == 1 else s
    stop = len(s) if stop is None else stop
    origins = np.arange(start + window, stop - horizon + 1, stride)
    if window < 1 or horizon < 1 or not len(origins):
        raise ValueError(f"{fn}: no window of {window} inputs and {horizon} targets fits in steps [{start}, "
                         f"{stop}) of a series of {len(s)}. Fix: use a shorter window or horizon.")
    found = first_non_finite(s[start:stop])
    if found is not None:
        (t, f), value = found
        raise ValueError(f"{fn}: expected finite values, got {value} at step {start + t}"
                         f"{f', feature {f}' if s.shape[1] > 1 else ''} of the series. Fix: fill or drop missing "
                         "values first (e.g. interpolate them, or rnnjax.data.fill_missing).")
    x = s[origins[:, None] - window + np.arange(window)]
    y = s[origins[:, None] + np.arange(horizon), 0]
    return x, y


class BatchesView:
    """Batches read through another iterator of batches (``self.batches``), whose ``position`` (the step
    it yields next) reads and sets through, so a view resumes where its source does; a subclass says in
    ``__next__`` what it does to each batch."""

    def __init__(self, batches):
        self.batches = batches

    @property
    def position(self):
        return self.batches.position

    @position.setter
    def position(self, value):
        self.batches.position = value

    def __iter__(self):
        return self


class IndexedBatches:
    """Endless batches, batch ``i`` given by ``batch(i)``: iterating yields ``batch(position)`` and
    advances ``position``, so setting ``position`` resumes a run where it stopped."""

    position: int

    def batch(self, i: int) -> dict:
        raise NotImplementedError

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        b = self.batch(self.position)
        self.position += 1
        return b


class ExampleBatches(IndexedBatches):
    """Shuffled mini-batches of a data set, every batch full: the examples are read in one
    permutation per epoch (seeded by ``seed`` and the epoch), the permutations end to end.

    Batch ``i`` depends only on ``(seed, i)``, so a resumed run reads what an uninterrupted one
    would: set ``position`` (the index of the next batch). Yields dicts of NumPy arrays with the
    same keys as ``arrays`` (each indexed on its first axis)."""

    def __init__(self, arrays: dict, batch_size: int, *, seed: int = 0, position: int = 0):
        n = {len(v) for v in arrays.values()}
        if len(n) != 1:
            raise ValueError(f"rnnjax.data.ExampleBatches: every array needs the same first axis, got "
                             f"{ {k: len(v) for k, v in arrays.items()} }.")
        self.arrays, self.n, self.batch_size, self.seed = arrays, n.pop(), int(batch_size), seed
        self.position = int(position)

    def _epoch(self, e: int) -> np.ndarray:
        return np.random.default_rng([self.seed, e]).permutation(self.n)

    def batch(self, i: int) -> dict:
        first = i * self.batch_size
        e0, e1 = first // self.n, (first + self.batch_size - 1) // self.n
        order = np.concatenate([self._epoch(e) for e in range(e0, e1 + 1)])
        idx = order[first - e0 * self.n: first - e0 * self.n + self.batch_size]
        return {k: v[idx] for k, v in self.arrays.items()}


class GeneratedBatches(IndexedBatches):
    """Batches made by ``make(rng, batch_size)`` from a NumPy generator seeded by ``(seed, i)``
    for batch ``i``: endless fresh data (synthetic tasks), resumable by ``position``."""

    def __init__(self, make: Callable[[np.random.Generator, int], dict], batch_size: int, *, seed: int = 0,
                 position: int = 0):
        self.make, self.batch_size, self.seed, self.position = make, int(batch_size), seed, int(position)

    def batch(self, i: int) -> dict:
        return self.make(np.random.default_rng([self.seed, 1, i]), self.batch_size)


SHORTEST_BUCKET = 8


def length_buckets(lengths, batch_size: int = 1) -> list[tuple[int, np.ndarray]]:
    """Examples grouped by length: ``(padded length, indices)`` per group, shortest first. An example goes
    to the smallest power of two (at least 8) that holds it, so there are few shapes to compile and
    little padding; a group with fewer than ``batch_size`` examples joins the next longer one (the
    longest joins the one before), so every example is in a group that fills a batch."""
    lengths = np.asarray(lengths)
    sizes = np.maximum(SHORTEST_BUCKET, 2 ** np.ceil(np.log2(np.maximum(lengths, 1)))).astype(np.int64)
    groups = [[int(s), np.flatnonzero(sizes == s)] for s in np.unique(sizes)]
    merged = []
    for size, idx in groups:
        if merged and len(merged[-1][1]) < batch_size:
            idx = np.concatenate([merged.pop()[1], idx])
        merged.append([size, idx])
    if len(merged) > 1 and len(merged[-1][1]) < batch_size:
        size, idx = merged.pop()
        merged[-1] = [size, np.concatenate([merged[-1][1], idx])]
    return [(size, np.sort(idx)) for size, idx in merged]


def pad_groups(sequences: dict, fixed: dict, batch_size: int = 1) -> list[dict]:
    """The examples padded group by group (:func:`length_buckets`): one dict per group with each ragged
    array of ``sequences`` (lists of ``[T_i]`` arrays of equal lengths per example, e.g. token ids and
    their tags) zero-padded to ``[n, padded length]``, each array of ``fixed`` (one value per example,
    e.g. a label) indexed, and ``lengths``."""
    first = next(iter(sequences.values()))
    lengths = np.array([len(s) for s in first], np.int32)
    out = []
    for size, idx in length_buckets(lengths, batch_size):
        group = {"lengths": lengths[idx], **{k: np.asarray(v)[idx] for k, v in fixed.items()}}
        for k, seqs in sequences.items():
            padded = np.zeros((len(idx), size), np.int32)
            for row, i in enumerate(idx):
                padded[row, :lengths[i]] = seqs[i]
            group[k] = padded
        out.append(group)
    return out


class LengthBatches(ExampleBatches):
    """Shuffled training batches of variable-length examples, each batch cut from one length group of
    :func:`pad_groups` (padded to the group's length, masked by ``lengths``). Each epoch shuffles the
    examples within each group and the order of all batches; a group's remainder (fewer than a batch)
    waits for the next epoch's shuffle. Batch ``i`` depends only on ``(seed, i)``: set ``position`` to
    resume (``__next__`` as :class:`ExampleBatches`)."""

    def __init__(self, sequences: dict, fixed: dict, batch_size: int, *, seed: int = 0, position: int = 0):
        n = len(next(iter(sequences.values())))
        if not 1 <= batch_size <= n:
            raise ValueError(f"rnnjax.data.LengthBatches: batch_size must be in [1, {n}] (the number of examples), "
                             f"got {batch_size}. Fix: pass a smaller batch size.")
        self.groups = pad_groups(sequences, fixed, batch_size)
        self.batch_size, self.seed, self.position = int(batch_size), seed, int(position)
        self.per_epoch = sum(len(g["lengths"]) // batch_size for g in self.groups)
        self._cached, self._order = None, None

    def _epoch_batches(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        rng = np.random.default_rng([self.seed, 2, epoch])
        batches = []
        for g, group in enumerate(self.groups):
            idx = rng.permutation(len(group["lengths"]))
            B = self.batch_size
            batches += [(g, idx[i * B:(i + 1) * B]) for i in range(len(idx) // B)]
        return [batches[i] for i in rng.permutation(len(batches))]

    def batch(self, i: int) -> dict:
        epoch, k = divmod(i, self.per_epoch)
        if epoch != self._cached:
            self._cached, self._order = epoch, self._epoch_batches(epoch)
        g, idx = self._order[k]
        return {key: value[idx] for key, value in self.groups[g].items()}
