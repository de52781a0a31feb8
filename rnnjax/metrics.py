"""Sequence metrics (NumPy/Python): edit distance, phoneme (token) and word error rates, macro-F1 of a
classifier, entity (span) F1 of BIO tags, and the ranking metrics of anomaly scores (AUROC, best F1), by
scikit-learn."""

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


def macro_f1(y_true: Sequence, y_pred: Sequence) -> float:
    """The unweighted mean over classes of each class's F1 ``2 TP / (2 TP + FP + FN)``, over the classes
    that occur in ``y_true`` or ``y_pred`` (scikit-learn's ``f1_score(average="macro")``)."""
    if len(y_true) != len(y_pred) or not len(y_true):
        raise ValueError(f"rnnjax.metrics.macro_f1: expected as many predictions as labels, at least one, got "
                         f"{len(y_pred)} predictions and {len(y_true)} labels.")
    pairs = list(zip(y_true, y_pred))
    scores = []
    for c in set(y_true) | set(y_pred):
        tp = sum(t == c and p == c for t, p in pairs)
        wrong = sum((t == c) != (p == c) for t, p in pairs)  # false positives and false negatives
        scores.append(2 * tp / (2 * tp + wrong))
    return sum(scores) / len(scores)


def is_bio(tags) -> bool:
    """Whether every tag is ``O`` or ``B-TYPE``/``I-TYPE`` (the BIO/IOB2 scheme) and one is not ``O``."""
    tags = set(tags)
    return any(t != "O" for t in tags) and all(t == "O" or (t[:2] in ("B-", "I-") and len(t) > 2) for t in tags)


def bio_spans(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """The entities ``(type, start, end)`` (``end`` exclusive) of one sentence's BIO tags, read as the
    CoNLL evaluation script (conlleval) reads them: ``B-X`` starts an entity, ``I-X`` continues one of
    type X and starts one after ``O`` or another type (an ill-formed ``I-`` is not dropped)."""
    spans, start, kind = [], 0, None
    for i, tag in enumerate([*tags, "O"]):
        prefix, typ = (tag[0], tag[2:]) if tag[:2] in ("B-", "I-") else ("O", "")
        if kind is not None and (prefix != "I" or typ != kind):
            spans.append((kind, start, i))
            kind = None
        if prefix != "O" and kind is None:
            start, kind = i, typ
    return spans


def span_f1(true_tags: Sequence[Sequence[str]], pred_tags: Sequence[Sequence[str]]) -> dict:
    """Exact-match entity precision, recall and F1 (micro-averaged over all entities, as conlleval) of
    predicted BIO tag sequences against the true ones, sentence by sentence (:func:`bio_spans`). Returns
    ``{"precision", "recall", "f1", "true_entities", "predicted_entities", "correct_entities"}`` (0 where
    a ratio has nothing to count)."""
    if len(true_tags) != len(pred_tags):
        raise ValueError(f"rnnjax.metrics.span_f1: expected one predicted sequence per true one, got "
                         f"{len(pred_tags)} and {len(true_tags)}.")
    n_true = n_pred = correct = 0
    for t, p in zip(true_tags, pred_tags):
        ts, ps = set(bio_spans(t)), set(bio_spans(p))
        n_true, n_pred, correct = n_true + len(ts), n_pred + len(ps), correct + len(ts & ps)
    precision = correct / n_pred if n_pred else 0.0
    recall = correct / n_true if n_true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "true_entities": n_true, "predicted_entities": n_pred,
            "correct_entities": correct}


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
