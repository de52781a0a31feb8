"""Sequence metrics (NumPy/Python): edit distance, phoneme (token) and word error rates."""

from __future__ import annotations

from collections.abc import Sequence


def edit_distance(a: Sequence, b: Sequence) -> int:
    """Levenshtein distance: the fewest insertions, deletions and substitutions turning ``a`` into ``b``."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def error_rates(predictions: Sequence[Sequence], references: Sequence[Sequence[Sequence]]) -> dict:
    """Phoneme and word error rates of ``predictions`` against *sets* of references.

    ``references[i]`` holds every correct answer for item ``i`` (e.g. all
    pronunciations of a word). For each item the closest reference (fewest
    edits; the shorter on ties) is chosen; ``per`` = total edits / total
    length of the chosen references; ``wer`` = fraction of items whose
    prediction equals none of its references. Returns ``{"per", "wer",
    "edits", "ref_tokens", "errors", "items"}``.
    """
    if len(predictions) != len(references):
        raise ValueError(f"rnnjax.metrics.error_rates: expected one set of references per prediction, got "
                         f"{len(predictions)} predictions and {len(references)} reference sets.")
    if not predictions:
        raise ValueError("rnnjax.metrics.error_rates: expected at least one prediction, got none.")
    edits = ref_tokens = errors = 0
    for pred, refs in zip(predictions, references):
        if not refs:
            raise ValueError("rnnjax.metrics.error_rates: every item needs at least one reference, got an empty set.")
        pred = tuple(pred)
        best = min((edit_distance(pred, tuple(r)), len(r)) for r in refs)
        edits += best[0]
        ref_tokens += best[1]
        errors += best[0] != 0
    return {"per": edits / max(ref_tokens, 1), "wer": errors / len(predictions), "edits": edits,
            "ref_tokens": ref_tokens, "errors": errors, "items": len(predictions)}
