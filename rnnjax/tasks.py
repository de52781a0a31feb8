"""The tasks of ``rnnjax train``: sequence classification (UCR/UEA, digits), forecasting, and the
adding and copy problems, each a :class:`Task` that prepares data, model, loss, evaluation and the
final test metrics for :func:`rnnjax.engine.run`.

``rnnjax/cli.py`` parses the flags into a settings dict; everything here works from that dict
(``prepare(settings) -> Prepared``), so the same runs can be started from Python::

    from rnnjax import tasks
    outcome = tasks.train("adding", {"length": 200, "cell": "lstm"}, out="runs/adding", steps=2000)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from rnnjax import data, engine, models
from rnnjax.engine import RUN_MARKER, UsageError

OPTIM_DEFAULTS = dict(lr=3e-3, warmup=None, end_lr=0.0, weight_decay=0.0, clip=1.0, accumulate=1, seed=0)
MODEL_DEFAULTS = dict(cell="lstm", layers=1, hidden=128, bidirectional=False, dropout=0.0)

# Defaults per task: chosen so that the plain command reaches the acceptance numbers of the README
# (Tasks) on the 2-core CPU this project is developed on, each in a few minutes.
DEFAULTS = {
    "classify": {**MODEL_DEFAULTS, **OPTIM_DEFAULTS, "dataset": "japanese_vowels", "pooling": "mean",
                 "hidden": 64, "bidirectional": True, "batch": 32, "val_fraction": 0.1, "steps": 800},
    "digits": {**MODEL_DEFAULTS, **OPTIM_DEFAULTS, "pooling": "last", "cell": "gru", "hidden": 128, "batch": 64,
               "val_fraction": 0.1, "steps": 1500},
    "adding": {**MODEL_DEFAULTS, **OPTIM_DEFAULTS, "length": 200, "batch": 64, "lr": 3e-3, "steps": 2000},
    "copy": {**MODEL_DEFAULTS, **OPTIM_DEFAULTS, "delay": 100, "symbols": 10, "alphabet": 8, "cell": "gru",
             "hidden": 128, "batch": 64, "steps": 3000},
    "forecast": {**MODEL_DEFAULTS, **OPTIM_DEFAULTS, "dataset": "taylor", "horizon": 48, "window": 144,
                 "mode": "direct", "hidden": 64, "batch": 64, "test_fraction": 0.2, "val_fraction": 0.1,
                 "steps": 1500},
}
BUDGET_KEYS = ("steps",)  # in DEFAULTS but part of the budget, not of the fixed settings
RUN_FILES = ("config.json", "metrics.jsonl", "loss.png", "confusion.png", "forecast.png", "accuracy.png")
EVAL_BATCH = 256


@dataclass
class Prepared:
    """What a task hands the engine (see :class:`rnnjax.engine.Job`)."""

    model: Any
    loss_fn: Callable
    batches: Any
    evaluate: Callable
    finish: Callable
    describe: str
    metric_unit: str
    files: tuple[str, ...]
    meta: dict = field(default_factory=dict)
    tokens_per_step: int = 1


def fixed_keys(task: str) -> tuple[str, ...]:
    return tuple(k for k in DEFAULTS[task] if k not in BUDGET_KEYS)


# ----------------------------------------------------------------------------
# Evaluation over a whole data set


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


def _predict_all(fn: Callable, arrays: dict, params, size: int = EVAL_BATCH) -> np.ndarray:
    outs = []
    n = len(next(iter(arrays.values())))
    for chunk in _chunks(arrays, size):
        outs.append(np.asarray(fn(params, {k: jnp.asarray(v) for k, v in chunk.items() if k != "weight"})))
    return np.concatenate(outs)[:n]


# ----------------------------------------------------------------------------
# Classification (UCR/UEA archives, digits)


def _classification_data(s: dict, cmd: str):
    try:
        d = data.load_digits() if s.get("dataset", "digits") == "digits" else data.load_classification(s["dataset"])
    except ImportError as e:
        raise UsageError(str(e)) from None
    except ValueError as e:
        raise UsageError(f"{cmd}: {e}") from None
    return d


def prepare_classify(s: dict, cmd: str) -> Prepared:
    d = _classification_data(s, cmd)
    train, test = d["train"], d["test"]
    kept, held = data.split(len(train["y"]), s["val_fraction"], seed=s["seed"], labels=train["y"])
    fit_part = {k: v[kept] for k, v in train.items()}
    val_part = {k: v[held] for k, v in train.items()}
    # Missing values: the last valid value of the feature; then standardise with the training part's
    # statistics only (never the validation or test data).
    for part in (fit_part, val_part, test):
        part["x"] = data.fill_missing(part["x"], part["lengths"])
    scaler = data.Scaler.fit(fit_part["x"], fit_part["lengths"])
    for part in (fit_part, val_part, test):
        part["x"] = scaler.transform(part["x"], part["lengths"])
    C, F = len(d["classes"]), train["x"].shape[-1]
    try:
        model = models.classifier(C, input_size=F, cell=s["cell"], layers=s["layers"], hidden=s["hidden"],
                                  bidirectional=s["bidirectional"], pooling=s["pooling"], dropout=s["dropout"])
    except (ValueError, TypeError) as e:
        raise UsageError(f"{cmd}: {e}") from None

    def loss_fn(params, batch, key):
        logits = model.apply(params, batch["x"], lengths=batch["lengths"], key=key)
        return jnp.mean(_nll(logits, batch["y"]))

    @jax.jit
    def per_example(params, batch):
        logits = model.apply(params, batch["x"], lengths=batch["lengths"])
        return {"loss": _nll(logits, batch["y"]), "correct": (jnp.argmax(logits, -1) == batch["y"]).astype(jnp.float32)}

    def evaluate(params):
        t = sums_over(per_example, val_part, params)
        n = len(val_part["y"])
        return {"val_loss": t["loss"] / n, "val_accuracy": t["correct"] / n}

    predict = jax.jit(lambda params, batch: jnp.argmax(model.apply(params, batch["x"], lengths=batch["lengths"]), -1))

    def finish(params, out: Path, no_plot: bool):
        t = sums_over(per_example, test, params)
        n = len(test["y"])
        pred = _predict_all(predict, test, params)
        if not no_plot:
            plot_confusion(test["y"], pred, d["classes"], out / "confusion.png",
                           f"{model.name} on {d['name']}: test accuracy {t['correct'] / n:.2%}")
        return {"test_accuracy": t["correct"] / n, "test_loss": t["loss"] / n, "test_examples": n}

    lengths = train["lengths"]
    ragged = f"lengths {lengths.min()}-{lengths.max()}" if lengths.min() != lengths.max() else f"length {lengths[0]}"
    return Prepared(
        model=model, loss_fn=loss_fn,
        batches=data.ExampleBatches(fit_part, s["batch"], seed=s["seed"]), evaluate=evaluate, finish=finish,
        describe=f"{d['name']}: {len(kept)} train / {len(held)} validation / {len(test['y'])} test sequences, "
                 f"{F} feature(s), {ragged}, {C} classes; batch {s['batch']} (padded, masked by lengths)",
        metric_unit="nats", files=("metrics.jsonl", "loss.png", "confusion.png"),
        meta={"classes": d["classes"], "scaler": {"mean": scaler.mean.tolist(), "std": scaler.std.tolist()}},
        tokens_per_step=s["batch"])


def _nll(logits, labels):
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]


def plot_confusion(y_true, y_pred, classes, path: Path, title: str) -> None:
    """A confusion matrix (rows: true class, columns: predicted) as a PNG."""
    C = len(classes)
    m = np.zeros((C, C), np.int64)
    np.add.at(m, (np.asarray(y_true), np.asarray(y_pred)), 1)
    plt = engine.pyplot()
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * C, 1.0 + 0.45 * C), dpi=100)
    ax.imshow(m, cmap="Blues")
    for i in range(C):
        for j in range(C):
            if m[i, j]:
                ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if m[i, j] > m.max() / 2 else "black")
    ax.set_xticks(range(C), classes, fontsize=8)
    ax.set_yticks(range(C), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ----------------------------------------------------------------------------
# The task table and the run


PREPARE = {"classify": prepare_classify, "digits": prepare_classify}


def train(task: str, settings: dict, *, out: str, steps: int | None = None, minutes: float | None = None,
          resume: bool = False, overwrite: bool = False, evals: int = 5, patience: int | None = None,
          min_delta: float = 0.0, save_every_steps: int | None = None, save_every_minutes: float | None = None,
          no_plot: bool = False, start_time: float | None = None) -> engine.Outcome:
    """Runs ``rnnjax train TASK``: ``settings`` are the task's fixed settings that differ from
    :data:`DEFAULTS` (on ``resume``, those that were given, checked against the run's)."""
    cmd = f"rnnjax train {task}"
    if task not in DEFAULTS:
        raise UsageError(f"{cmd}: unknown task {task!r}; known: {', '.join(DEFAULTS)}.")
    run_files = RUN_FILES
    out_path, saved = engine.check_out(out, resume=resume, overwrite=overwrite, cmd=cmd, run_files=run_files)
    defaults = {k: v for k, v in DEFAULTS[task].items() if k not in BUDGET_KEYS}
    s = engine.fixed_settings(settings, defaults, saved, cmd)
    if task == "digits":
        s["dataset"] = "digits"
    p = PREPARE[task](s, cmd)
    resume_step = engine.resume_step(out_path, cmd) if saved else None
    default_steps = DEFAULTS[task].get("steps")
    if steps is None and minutes is None and not saved and default_steps:
        steps = default_steps
    total_steps, seconds = engine.budget(steps, minutes, saved, 5.0)
    config = saved or {RUN_MARKER: 1, "task": task, "settings": s, "model": p.model.name,
                       "budget": {"steps": total_steps, "seconds": seconds}}
    engine.write_config(out_path, config, overwrite=overwrite, cmd=cmd, out_arg=out, run_files=run_files)
    return engine.run(engine.Job(
        cmd=cmd, out=out_path, model_name=p.model.name, init=p.model.init, loss_fn=p.loss_fn, batches=p.batches,
        evaluate=p.evaluate, settings=s, total_steps=total_steps, seconds=seconds, resume_step=resume_step,
        rest_of_time=minutes is None, meta={"task": task, "settings": s, **p.meta}, describe=p.describe,
        tokens_per_step=p.tokens_per_step, unit="sequences", metric_unit=p.metric_unit,
        finish=partial(_finish, p.finish, out_path, no_plot), files=p.files,
        plot_title=f"{p.model.name}: rnnjax train {task}", evals=evals, patience=patience, min_delta=min_delta,
        save_every_steps=save_every_steps, save_every_minutes=save_every_minutes, no_plot=no_plot,
        start_time=start_time))


def _finish(fn, out, no_plot, params):
    return fn(params, out, no_plot)
