"""Sequence metrics (NumPy/Python): edit distance, phoneme (token) and word error rates; and the
ranking metrics of anomaly scores (AUROC, best F1), by scikit-learn."""

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


def _binary(fn: str, labels, scores):
    import numpy as np

    labels, scores = np.asarray(labels), np.asarray(scores, np.float64)
    if labels.shape != scores.shape or labels.ndim != 1:
        raise ValueError(f"rnnjax.metrics.{fn}: expected labels and scores of the same shape [T], got "
                         f"{list(labels.shape)} and {list(scores.shape)}.")
    if not np.isin(labels, (0, 1)).all() or len(np.unique(labels)) < 2:
        raise ValueError(f"rnnjax.metrics.{fn}: expected 0/1 labels with both classes present, got the values "
                         f"{sorted(set(labels.tolist()))[:5]}. Fix: score a part that holds normal and anomalous "
                         "steps.")
    return labels.astype(int), scores


def auroc(labels, scores) -> float:
    """The area under the ROC curve of ``scores`` (higher: more anomalous) against 0/1 ``labels``
    (scikit-learn's ``roc_auc_score``): the chance that an anomalous step scores above a normal one,
    ties counting half."""
    from rnnjax.data.datasets import require

    labels, scores = _binary("auroc", labels, scores)
    return float(require("sklearn.metrics", "rnnjax.metrics.auroc", "AUROC").roc_auc_score(labels, scores))


def best_f1(labels, scores) -> tuple[float, float]:
    """``(F1, threshold)``: the best F1 of flagging the steps whose score is at least a threshold, over
    all thresholds (from scikit-learn's ``precision_recall_curve``)."""
    import numpy as np

    from rnnjax.data.datasets import require

    labels, scores = _binary("best_f1", labels, scores)
    metrics = require("sklearn.metrics", "rnnjax.metrics.best_f1", "best F1")
    precision, recall, thresholds = metrics.precision_recall_curve(labels, scores)
    p, r = precision[:-1], recall[:-1]  # the last point (recall 0) has no threshold
    f1 = np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-300), 0.0)
    i = int(np.argmax(f1))
    return float(f1[i]), float(thresholds[i])
