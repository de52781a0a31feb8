"""What ``rnnjax train textclass`` and ``rnnjax train tag`` share: the user's training and test files (their
paths resolved, the training file checked unchanged on ``--resume`` and ``rnnjax eval``), the label set
and token vocabulary of the training data (kept in the run's config and checkpoints), test labels the
training file lacks as errors, and evaluation over length groups."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from rnnjax import data
from rnnjax.data.g2p import Symbols
from rnnjax.engine import UsageError
from rnnjax.recipes import common
from rnnjax.recipes.flags import Flag, positive

FILES = ("train", "test")
DEFAULTS = {**common.TASK_DEFAULTS, "train": None, "test": None, "min_count": 2, "embed": 64, "hidden": 64,
            "bidirectional": True, "batch": 32, "val_fraction": 0.1}


def file_flags(what: str) -> tuple[Flag, ...]:
    """``--train FILE`` and ``--test FILE`` (both required), ``--min-count`` and ``--val-fraction``."""
    return (Flag("train", str, f"the training file: {what} (required)", "task", metavar="FILE"),
            Flag("test", str, "the test file, in the same format (required); scored once, at the end, with the best "
                              "checkpoint", "task", metavar="FILE"),
            Flag("min_count", positive(int), "tokens seen fewer times in the training part are read as <unk>", "task"),
            common.VAL_FRACTION)


def adjust(settings: dict, given: dict, saved: dict | None) -> dict:
    """A new run's file paths, resolved: ``rnnjax eval`` and ``--resume`` find them from any directory."""
    if saved is None:
        settings.update({k: str(Path(settings[k]).expanduser().resolve()) for k in FILES if settings[k] is not None})
    return settings


def same(key: str, given, saved) -> bool:
    if key in FILES:
        return saved is not None and Path(given).expanduser().resolve() == Path(saved).expanduser().resolve()
    return given == saved


def read(reader, plan, *args) -> tuple[dict, dict]:
    """``reader(path, *args)`` on the training and the test file (a ValueError as a :class:`UsageError`); on
    ``--resume`` and ``rnnjax eval``, the training file must be the one the run was trained on."""
    s, cmd = plan.settings, plan.cmd
    for flag in FILES:
        if s[flag] is None:
            raise UsageError(f"{cmd}: --{flag} FILE is required. Fix: pass --train and --test, the files to train "
                             "on and to test on (docs/guides/tasks.md shows their format).")
    try:
        train, test = reader(s["train"], *args), reader(s["test"], *args)
    except ValueError as e:
        raise UsageError(f"{cmd}: {e}") from None
    digest = hashlib.md5(Path(s["train"]).read_bytes()).hexdigest()
    if plan.saved and plan.saved.get("train_md5") not in (None, digest):
        raise UsageError(f"{cmd}: the training file {s['train']!r} changed since the run was trained (its contents "
                         "differ), so its vocabulary and validation part would too. Fix: restore the original file, "
                         "or train a new run in another --out.")
    train["md5"] = digest
    return train, test


def label_set(plan, labels: list[str]) -> Symbols:
    """The labels (or tags) of the training file, sorted; a run's own on ``--resume`` and ``rnnjax eval``."""
    saved = (plan.saved or {}).get("labels")
    return Symbols(tuple(saved if saved is not None else sorted(set(labels))), (), "label(s)")


def encode_labels(labels: Symbols, values: list[str], lines: list[int], path: str, plan, what: str) -> np.ndarray:
    """The ids of the ``values`` of ``path``; one the training file lacks is a :class:`UsageError` naming its
    line: a model cannot predict a label it never saw, and a different spelling of one ("pos" against
    "positive", "PER" against "B-PER") would otherwise only show as a low score."""
    ids = labels.lookup(values, -1)
    bad = np.flatnonzero(ids < 0)
    if len(bad):
        i, known = bad[0], labels.symbols
        shown = ", ".join(known[:10]) + (", ..." if len(known) > 10 else "")
        raise UsageError(f"{plan.cmd}: {path!r}, line {lines[i]}: the {what} {values[i]!r} is not among the "
                         f"{len(known)} {what}s of the training file ({shown}); a model cannot predict a {what} it "
                         f"never saw. Fix: correct it, or add examples of it to the training file.")
    return ids


def vocabulary(plan, sequences, min_count: int) -> Symbols:
    """The tokens of ``sequences`` (the fitting part) seen ``min_count`` times, after ``<pad>`` and ``<unk>``;
    a run's own on ``--resume`` and ``rnnjax eval``."""
    saved = (plan.saved or {}).get("vocab")
    return Symbols.from_json(saved) if saved is not None else data.token_vocabulary(sequences, min_count)


def split(plan, n: int, labels=None) -> tuple[np.ndarray, np.ndarray]:
    """The fitting and validation indices of ``n`` training examples: ``--val-fraction`` held out by
    ``--seed`` (stratified by ``labels`` when given)."""
    s = plan.settings
    kept, held = data.split(n, s["val_fraction"], seed=s["seed"], labels=labels)
    if not len(held) or not len(kept):
        raise UsageError(f"{plan.cmd}: --val-fraction {s['val_fraction']:g} of the {n} examples of the training file "
                         f"leaves {len(held)} for validation and {len(kept)} to train on; expected at least one each. "
                         "Fix: pass another --val-fraction, or a larger training file.")
    return kept, held


def batches(plan, sequences: dict, fixed: dict):
    """Training batches grouped by length (:class:`rnnjax.data.LengthBatches`)."""
    try:
        return data.LengthBatches(sequences, fixed, plan.settings["batch"], seed=plan.settings["seed"])
    except ValueError as e:
        raise UsageError(f"{plan.cmd}: {e}") from None


EVAL_ROWS = 64  # evaluation reads chunks of this many examples, so validation and test share compilations


def outputs(fn, groups: list[dict], params) -> list[dict]:
    """``fn(params, batch) -> {name: array}`` over every length group (:func:`rnnjax.data.pad_groups`), as
    NumPy, one dict per group; a group of fewer than :data:`EVAL_ROWS` examples is padded to that many
    (copies of its first, dropped from the outputs)."""
    out = []
    for g in groups:
        n = len(g["lengths"])
        padded = {k: np.concatenate([v, np.repeat(v[:1], max(0, EVAL_ROWS - n), axis=0)]) for k, v in g.items()}
        out.append({k: v[:n] for k, v in common.predict_all(fn, padded, params, EVAL_ROWS).items()})
    return out


def run_config(vocab: Symbols, labels: Symbols, train: dict) -> dict:
    """What a run stores in its ``config.json`` and checkpoints: the vocabulary, the labels and the
    training file's digest."""
    return {"vocab": vocab.to_json(), "labels": list(labels.symbols), "train_md5": train["md5"]}


def lengths_text(lengths) -> str:
    lengths = np.asarray(lengths)
    return f"{lengths.min()}-{lengths.max()} tokens" if lengths.min() != lengths.max() else f"{lengths[0]} tokens"


def describe_vocab(vocab: Symbols, min_count: int) -> str:
    return f"vocabulary {vocab.size} (with <pad> and <unk>; tokens seen at least {min_count}x in the training part)"

