"""What the sequence tasks (classify, digits, forecast, anomaly, adding, copy) share: their flags and defaults,
evaluation over a whole data set in fixed-size chunks, the test metrics printed after a run, and
``rnnjax eval`` on one of their runs."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from rnnjax import engine
from rnnjax.engine import UsageError
from rnnjax.recipes import Recipe, flags
from rnnjax.recipes.flags import OPTIMISATION, Flag, in_range, non_negative_int, positive

OPTIM_DEFAULTS = dict(lr=3e-3, warmup=None, end_lr=0.0, weight_decay=0.0, clip=1.0, accumulate=1, seed=0,
                      population=None)
MODEL_DEFAULTS = dict(cell="lstm", layers=1, hidden=128, bidirectional=False, dropout=0.0)
TASK_DEFAULTS = {**MODEL_DEFAULTS, **OPTIM_DEFAULTS}  # what every task's defaults start from
RUN_FILES = ("config.json", "metrics.jsonl", "loss.png", "confusion.png", "forecast.png", "accuracy.png")
EVAL_BATCH = 256


def model_flags(*names: str) -> tuple[Flag, ...]:
    """The model flags of a task, by setting name, in that order."""
    from rnnjax.models import POOLINGS

    known = {
        "cell": flags.cell(),
        "layers": Flag("layers", positive(int), "stacked recurrent layers"),
        "hidden": Flag("hidden", positive(int), "hidden units per layer (and direction)"),
        "embed": Flag("embed", positive(int), "token embedding width"),
        "bidirectional": Flag("bidirectional", "bool", "read each sequence in both directions"),
        "dropout": Flag("dropout", in_range(0, 1), "dropout between layers and before the readout"),
        "pooling": Flag("pooling", str, f"how outputs are pooled over the valid steps: {', '.join(POOLINGS)}"),
        "chrono": Flag("chrono", "bool", "chrono-initialise the gate biases (LSTM forget/input, GRU update) for "
                                         "memories up to the sequence length (Tallec & Ollivier 2018)"),
    }
    return tuple(known[n] for n in names)


def training_flags(*extra: Flag) -> tuple[Flag, ...]:
    """``--batch``, the optimisation flags, ``--seed`` and the task's ``extra`` ones."""
    return (Flag("batch", positive(int), "sequences per batch", "optimisation"), *OPTIMISATION,
            Flag("seed", int, "seed for initialisation, data order and splits", "optimisation"), *extra)


VAL_FRACTION = Flag("val_fraction", in_range(0, 1, lo_open=True), "fraction of the training data held out for "
                    "validation", "task")
SHIFT = Flag("shift", non_negative_int, "augment the training images: shift each by up to this many pixels per axis",
             "task")


def task_recipe(name: str, help: str, description: str, *, defaults: dict, steps: int, prepare, task_flags=(),
                model=("cell", "layers", "hidden", "bidirectional", "dropout"), run_files=RUN_FILES) -> Recipe:
    """The :class:`~rnnjax.recipes.Recipe` of a sequence task: a budget of ``steps`` by default, its
    ``task_flags``, the ``model`` flags named, the training flags, and the files its runs write."""
    return Recipe(name=name, help=help, description=description, defaults=defaults, budget={"steps": steps},
                  run_files=run_files, flags=(*task_flags, *model_flags(*model), *training_flags()), prepare=prepare)


def model_or_usage(cmd: str, build: Callable):
    """``build()``, its ValueError or TypeError (a bad setting) as a :class:`UsageError`."""
    try:
        return build()
    except (ValueError, TypeError) as e:
        raise UsageError(f"{cmd}: {e}") from None


def load_or_usage(cmd: str, load: Callable):
    """``load()``, a missing package (ImportError) or bad data (ValueError) as a :class:`UsageError`."""
    try:
        return load()
    except ImportError as e:
        raise UsageError(str(e)) from None
    except ValueError as e:
        raise UsageError(f"{cmd}: {e}") from None


def nll(logits, labels):
    """Per-example negative log-likelihood of integer ``labels`` under ``logits [..., C]``."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]


def _chunks(arrays: dict, size: int):
    """Fixed-size chunks (the last one padded, with ``weight`` 0 on the padding): one compile."""
    n = len(next(iter(arrays.values())))
    size = min(size, n)
    for i in range(0, n, size):
        part = {k: v[i:i + size] for k, v in arrays.items()}
        m = len(next(iter(part.values())))
        pad = size - m
        part = {k: np.concatenate([v, np.repeat(v[:1], pad, axis=0)]) if pad else v for k, v in part.items()}
        part["weight"] = np.r_[np.ones(m, np.float32), np.zeros(pad, np.float32)]
        yield part


def sums_over(fn: Callable, arrays: dict, params, size: int = EVAL_BATCH) -> dict:
    """Sums over the examples of ``arrays`` of the per-example values ``fn(params, chunk) -> {name: [n]}``."""
    total = {}
    for chunk in _chunks(arrays, size):
        out = fn(params, {k: jnp.asarray(v) for k, v in chunk.items() if k != "weight"})
        for k, v in out.items():
            total[k] = total.get(k, 0.0) + float(jnp.sum(v * chunk["weight"]))
    return total


def predict_all(fn: Callable, arrays: dict, params, size: int = EVAL_BATCH):
    """``fn(params, chunk)`` over every example of ``arrays``, concatenated (each array of a dict of outputs)."""
    outs = []
    n = len(next(iter(arrays.values())))
    for chunk in _chunks(arrays, size):
        outs.append(fn(params, {k: jnp.asarray(v) for k, v in chunk.items() if k != "weight"}))
    return jax.tree.map(lambda *parts: np.concatenate([np.asarray(p) for p in parts])[:n], *outs)


def print_test_metrics(outcome) -> int:
    """After a task's run: its test metrics as one JSON line on stdout."""
    if outcome.status == 0 and outcome.test_metrics is not None:
        print(json.dumps(outcome.test_metrics))
    return outcome.status


def evaluate_run(recipe, args, config: dict) -> int:
    """``rnnjax eval`` on a run of ``recipe``: its data and model prepared again from the run's settings,
    the chosen checkpoint's validation metrics and (when the task has them) test metrics, as one JSON
    line on stdout."""
    cmd = "rnnjax eval"
    for flag in ("text", "window"):
        if getattr(args, flag, None) is not None:
            raise UsageError(f"{cmd}: --{flag} reads a text for a character model, and {args.checkpoint!r} is a run "
                             f"of `rnnjax train {recipe.name}`. Fix: drop --{flag}.")
    plan = engine.Plan(cmd=cmd, out=Path(args.checkpoint).expanduser(), settings=config["settings"],
                       total_steps=None, seconds=None, options=config.get("options", {}), saved=config)
    job = recipe.prepare(plan)
    params, _, step = engine.load_params(args.checkpoint, engine.which_checkpoint(args), job.init, cmd)
    val = job.evaluate(params)
    metrics = {"step": step, **(val if isinstance(val, dict) else {"val_loss": val})}
    if job.finish is not None:
        metrics.update(job.finish(params, [], None))
    metrics = {k: (round(float(v), 6) if isinstance(v, (float, np.floating)) else v) for k, v in metrics.items()}
    print(f"rnnjax: {job.model_name} at step {step} of {args.checkpoint!r}", file=sys.stderr)
    print(json.dumps(metrics))
    return 0
