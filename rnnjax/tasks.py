"""The tasks of ``rnnjax train``: sequence classification (UCR/UEA, digits), forecasting, and the
adding and copy problems, each a :class:`Task` that prepares data, model, loss, evaluation and the
final test metrics for :func:`rnnjax.engine.run`.

``rnnjax/cli.py`` parses the flags into a settings dict; everything here works from that dict
(``prepare(settings) -> Prepared``), so the same runs can be started from Python::

    from rnnjax import tasks
    outcome = tasks.train("adding", {"length": 200, "cell": "lstm"}, out="runs/adding", steps=2000)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from rnnjax import data, engine, models
from rnnjax.engine import RUN_MARKER, UsageError

OPTIM_DEFAULTS = dict(lr=3e-3, warmup=None, end_lr=0.0, weight_decay=0.0, clip=1.0, accumulate=1, seed=0,
                      population=None)
MODEL_DEFAULTS = dict(cell="lstm", layers=1, hidden=128, bidirectional=False, dropout=0.0)

# Defaults per task: chosen so that the plain command reaches the acceptance numbers of the README
# (Tasks) on the 2-core CPU this project is developed on, each in a few minutes.
DEFAULTS = {
    "classify": {**MODEL_DEFAULTS, **OPTIM_DEFAULTS, "dataset": "japanese_vowels", "pooling": "mean",
                 "hidden": 64, "bidirectional": True, "batch": 32, "val_fraction": 0.1, "steps": 800},
    "digits": {**MODEL_DEFAULTS, **OPTIM_DEFAULTS, "pooling": "mean", "cell": "gru", "hidden": 128,
               "bidirectional": True, "dropout": 0.2, "weight_decay": 0.01, "batch": 64, "val_fraction": 0.1,
               "shift": 1, "steps": 2000},
    "adding": {**MODEL_DEFAULTS, **OPTIM_DEFAULTS, "length": 200, "chrono": True, "hidden": 64, "batch": 64,
               "lr": 1e-2, "steps": 1500},
    "copy": {**MODEL_DEFAULTS, **OPTIM_DEFAULTS, "delay": 100, "symbols": 10, "alphabet": 8, "chrono": True,
             "cell": "lstm", "hidden": 128, "batch": 64, "lr": 1e-2, "steps": 3000},
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
    init: Callable | None = None  # key -> params (default: model.init)


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

    def finish(params, out, no_plot, history):
        t = sums_over(per_example, test, params)
        n = len(test["y"])
        pred = _predict_all(predict, test, params)
        if not no_plot:
            plot_confusion(test["y"], pred, d["classes"], out / "confusion.png",
                           f"{model.name} on {d['name']}: test accuracy {t['correct'] / n:.2%}")
        return {"test_accuracy": t["correct"] / n, "test_loss": t["loss"] / n, "test_examples": n}

    batches = data.ExampleBatches(fit_part, s["batch"], seed=s["seed"])
    if s.get("shift"):
        batches = ShiftedImages(batches, 8, 8, s["shift"], float(scaler.transform(np.zeros((1, 1)))[0, 0]), s["seed"])
    lengths = train["lengths"]
    ragged = f"lengths {lengths.min()}-{lengths.max()}" if lengths.min() != lengths.max() else f"length {lengths[0]}"
    return Prepared(
        model=model, loss_fn=loss_fn,
        batches=batches, evaluate=evaluate, finish=finish,
        describe=f"{d['name']}: {len(kept)} train / {len(held)} validation / {len(test['y'])} test sequences, "
                 f"{F} feature(s), {ragged}, {C} classes; batch {s['batch']} (padded, masked by lengths)",
        metric_unit="nats", files=("metrics.jsonl", "loss.png", "confusion.png"),
        meta={"classes": d["classes"], "scaler": {"mean": scaler.mean.tolist(), "std": scaler.std.tolist()}},
        tokens_per_step=s["batch"])


class ShiftedImages:
    """Training batches of images read as pixel sequences (``x [B, rows * cols, 1]``), each image
    shifted by a random whole number of pixels in ``[-shift, shift]`` per axis (the uncovered
    border filled with ``fill``, the scaled value of a blank pixel): data augmentation. Seeded by
    ``(seed, batch index)``, so a resumed run sees the same batches."""

    def __init__(self, batches, rows: int, cols: int, shift: int, fill: float, seed: int):
        self.batches, self.rows, self.cols, self.shift, self.fill, self.seed = batches, rows, cols, shift, fill, seed

    @property
    def position(self):
        return self.batches.position

    @position.setter
    def position(self, value):
        self.batches.position = value

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        i = self.batches.position
        b = dict(next(self.batches))
        rng = np.random.default_rng([self.seed, 7, i])
        n, k = len(b["x"]), self.shift
        img = b["x"].reshape(n, self.rows, self.cols)
        pad = np.pad(img, ((0, 0), (k, k), (k, k)), constant_values=self.fill)
        dy, dx = rng.integers(-k, k + 1, (2, n))
        out = np.stack([pad[j, k + dy[j]:k + dy[j] + self.rows, k + dx[j]:k + dx[j] + self.cols] for j in range(n)])
        b["x"] = out.reshape(b["x"].shape).astype(np.float32)
        return b


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
# The adding problem and the copy task (fresh generated data every step)


VAL_SEQUENCES, TEST_SEQUENCES = 1000, 2000


def _fixed_set(make, n: int, seed: int, which: int) -> dict:
    return make(np.random.default_rng([seed, which]), n)


def _model_or_usage(cmd, build):
    try:
        return build()
    except (ValueError, TypeError) as e:
        raise UsageError(f"{cmd}: {e}") from None


def _chrono(model, s: dict, t_max: int):
    """``key -> params`` with chrono-initialised gate biases when ``s["chrono"]`` (else ``model.init``)."""
    if not s["chrono"]:
        return model.init

    def init(key):
        k_model, k_chrono = jax.random.split(key)
        return models.chrono_init(model.init(k_model), k_chrono, t_max, s["cell"])

    return init


def prepare_adding(s: dict, cmd: str) -> Prepared:
    if s["length"] < 2:
        raise UsageError(f"{cmd}: --length must be at least 2 (one marked step in each half), got {s['length']}.")
    make = partial(data.synthetic.adding, length=s["length"])
    model = _model_or_usage(cmd, lambda: models.regressor(
        1, input_size=2, cell=s["cell"], layers=s["layers"], hidden=s["hidden"], bidirectional=s["bidirectional"],
        pooling="last", dropout=s["dropout"]))

    def loss_fn(params, batch, key):
        pred = model.apply(params, batch["x"], key=key)[..., 0]
        return jnp.mean((pred - batch["y"]) ** 2)

    @jax.jit
    def per_example(params, batch):
        return {"se": (model.apply(params, batch["x"])[..., 0] - batch["y"]) ** 2}

    val = _fixed_set(make, VAL_SEQUENCES, s["seed"], 2)
    test = _fixed_set(make, TEST_SEQUENCES, s["seed"], 3)

    def evaluate(params):
        return {"val_loss": sums_over(per_example, val, params)["se"] / VAL_SEQUENCES}

    def finish(params, out, no_plot, history):
        mse = sums_over(per_example, test, params)["se"] / TEST_SEQUENCES
        return {"test_mse": mse, "baseline_mse": float(np.mean((test["y"] - 1.0) ** 2)), "test_examples": TEST_SEQUENCES}

    return Prepared(
        model=model, loss_fn=loss_fn, batches=data.GeneratedBatches(make, s["batch"], seed=s["seed"]),
        evaluate=evaluate, finish=finish,
        describe=f"the adding problem, T = {s['length']}: fresh sequences every step, {VAL_SEQUENCES} validation / "
                 f"{TEST_SEQUENCES} test; predicting the mean gives MSE 1/6 = 0.167; batch {s['batch']}",
        metric_unit="MSE", files=("metrics.jsonl", "loss.png"), tokens_per_step=s["batch"],
        init=_chrono(model, s, s["length"]))


def prepare_copy(s: dict, cmd: str) -> Prepared:
    if s["delay"] < 1 or s["symbols"] < 1 or s["alphabet"] < 2:
        raise UsageError(f"{cmd}: expected --delay >= 1, --symbols >= 1 and --alphabet >= 2, got --delay "
                         f"{s['delay']}, --symbols {s['symbols']}, --alphabet {s['alphabet']}.")
    make = partial(data.synthetic.copy, delay=s["delay"], symbols=s["symbols"], alphabet=s["alphabet"])
    K = s["alphabet"]
    model = _model_or_usage(cmd, lambda: models.tagger(
        K + 1, vocab_size=K + 2, cell=s["cell"], layers=s["layers"], hidden=s["hidden"], dropout=s["dropout"]))

    def loss_fn(params, batch, key):
        logits = model.apply(params, batch["x"], key=key)
        m = batch["mask"]
        return jnp.sum(jnp.where(m, _nll(logits, batch["y"]), 0.0)) / jnp.sum(m)

    @jax.jit
    def per_example(params, batch):
        logits = model.apply(params, batch["x"])
        m = batch["mask"]
        nll = jnp.where(m, _nll(logits, batch["y"]), 0.0).sum(-1)
        correct = jnp.where(m, jnp.argmax(logits, -1) == batch["y"], False).sum(-1)
        return {"loss": nll, "correct": correct.astype(jnp.float32)}

    val = _fixed_set(make, VAL_SEQUENCES, s["seed"], 2)
    test = _fixed_set(make, TEST_SEQUENCES, s["seed"], 3)
    per_seq = s["symbols"]

    def evaluate(params):
        t = sums_over(per_example, val, params)
        n = VAL_SEQUENCES * per_seq
        return {"val_loss": t["loss"] / n, "val_accuracy": t["correct"] / n}

    def finish(params, out, no_plot, history):
        t = sums_over(per_example, test, params)
        n = TEST_SEQUENCES * per_seq
        if not no_plot and history:
            plot_accuracy(history, out / "accuracy.png", f"{model.name}: copy task, delay {s['delay']} (validation "
                          "accuracy on the recalled symbols)", chance=1.0 / K)
        return {"test_accuracy": t["correct"] / n, "test_loss": t["loss"] / n, "baseline_accuracy": 1.0 / K,
                "test_symbols": n}

    T = 2 * s["symbols"] + s["delay"]
    return Prepared(
        model=model, loss_fn=loss_fn, batches=data.GeneratedBatches(make, s["batch"], seed=s["seed"]),
        evaluate=evaluate, finish=finish,
        describe=f"the copy task: {s['symbols']} symbols of {K}, recalled after a delay of {s['delay']} (T = {T}); "
                 f"fresh sequences every step, {VAL_SEQUENCES} validation / {TEST_SEQUENCES} test; guessing gives "
                 f"accuracy {1 / K:.3f}; batch {s['batch']}",
        metric_unit="nats", files=("metrics.jsonl", "loss.png", "accuracy.png"), tokens_per_step=s["batch"],
        init=_chrono(model, s, T))


def plot_accuracy(history: list[dict], path: Path, title: str, chance: float | None = None) -> None:
    """Validation accuracy against steps, as a PNG."""
    plt = engine.pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    ax.plot([r["step"] for r in history], [r["val_accuracy"] for r in history], "o-", color="tab:green", ms=4,
            label="validation accuracy")
    if chance is not None:
        ax.axhline(chance, color="gray", ls=":", label="chance")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("step")
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ----------------------------------------------------------------------------
# Forecasting


def ridge_forecast(x_train, y_train, x_eval, lam: float) -> np.ndarray:
    """Ridge regression of ``y [N, H]`` on the flattened windows ``x [N, W, F]`` plus a bias (NumPy,
    closed form, the bias not penalised)."""
    A = np.c_[x_train.reshape(len(x_train), -1), np.ones(len(x_train))].astype(np.float64)
    reg = lam * np.eye(A.shape[1])
    reg[-1, -1] = 0.0
    w = np.linalg.solve(A.T @ A + reg, A.T @ y_train.astype(np.float64))
    return (np.c_[x_eval.reshape(len(x_eval), -1), np.ones(len(x_eval))] @ w).astype(np.float32)


def prepare_forecast(s: dict, cmd: str) -> Prepared:
    try:
        series = data.load_series(s["dataset"])
    except ImportError as e:
        raise UsageError(str(e)) from None
    except ValueError as e:
        raise UsageError(f"{cmd}: {e}") from None
    values, period = series["values"], series["period"]
    W, Hz = s["window"], s["horizon"]
    n = len(values)
    test_start = int(round(n * (1 - s["test_fraction"])))
    val_start = int(round(test_start * (1 - s["val_fraction"])))
    # Scaling from the fitting part only; windows' inputs may reach back into earlier parts (they
    # are past observations), their targets never cross into a later part.
    scaler = data.Scaler.fit(values[:val_start, None])
    z = scaler.transform(values[:, None])[:, 0]
    try:
        x_tr, y_tr = data.sliding_windows(z, W, Hz, start=0, stop=val_start)
        x_va, y_va = data.sliding_windows(z, W, Hz, start=val_start - W, stop=test_start)
        x_te, y_te = data.sliding_windows(z, W, Hz, start=test_start - W, stop=n)
    except ValueError as e:
        raise UsageError(f"{cmd}: --window {W} and --horizon {Hz} do not fit the {n} points of {s['dataset']!r} "
                         f"({e}). Fix: use a shorter --window or --horizon.") from None
    if period > W:
        raise UsageError(f"{cmd}: the seasonal-naive baseline needs the value one season ({period} steps) earlier "
                         f"inside the window, got --window {W}. Fix: pass --window {period} or more.")
    autoregressive = s["mode"] == "autoregressive"
    model = _model_or_usage(cmd, lambda: models.forecaster(
        Hz, mode=s["mode"], cell=s["cell"], layers=s["layers"], hidden=s["hidden"], dropout=s["dropout"]))

    def loss_fn(params, batch, key):
        if autoregressive:  # teacher forcing: the true values in, the next value out, at every step
            seq = jnp.concatenate([batch["x"][..., 0], batch["y"]], axis=-1)
            pred = model.apply(params, seq[..., :-1, None], key=key)[..., 0]
            return jnp.mean((pred - seq[..., 1:]) ** 2)
        return jnp.mean((model.apply(params, batch["x"], key=key) - batch["y"]) ** 2)

    @jax.jit
    def per_example(params, batch):
        return {"se": jnp.mean((model.forecast(params, batch["x"], Hz) - batch["y"]) ** 2, axis=-1)}

    forecast = jax.jit(lambda params, batch: model.forecast(params, batch["x"], Hz))
    val, test = {"x": x_va, "y": y_va}, {"x": x_te, "y": y_te}
    sd = float(scaler.std[0])

    def evaluate(params):
        mse = sums_over(per_example, val, params)["se"] / len(y_va)
        return {"val_loss": mse, "val_rmse": math.sqrt(mse) * sd}

    # Baselines on the same windows: the same half-hour one season earlier, and ridge regression
    # on the same lag window (its penalty chosen on the validation windows).
    def seasonal_naive(x):
        idx = W - period + (np.arange(Hz) % period)
        return x[:, idx, 0]

    lams = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
    val_err = [np.mean((ridge_forecast(x_tr, y_tr, x_va, lam) - y_va) ** 2) for lam in lams]
    lam = lams[int(np.argmin(val_err))]
    x_fit, y_fit = np.concatenate([x_tr, x_va]), np.concatenate([y_tr, y_va])
    ridge_test = ridge_forecast(x_fit, y_fit, x_te, lam)

    def rmse(pred):
        return float(np.sqrt(np.mean((pred - y_te) ** 2))) * sd

    def finish(params, out, no_plot, history):
        pred = _predict_all(forecast, test, params)
        result = {"test_rmse": rmse(pred), "test_mse": float(np.mean((pred - y_te) ** 2)),
                  "seasonal_naive_rmse": rmse(seasonal_naive(x_te)), "ridge_rmse": rmse(ridge_test),
                  "ridge_lambda": lam, "test_windows": len(y_te)}
        result["vs_seasonal_naive"] = result["test_rmse"] / result["seasonal_naive_rmse"]
        result["vs_ridge"] = result["test_rmse"] / result["ridge_rmse"]
        if not no_plot:
            plot_forecast(scaler.inverse(z[:, None])[:, 0], test_start, W, Hz, period,
                          scaler.inverse(pred[..., None])[..., 0], scaler.inverse(ridge_test[..., None])[..., 0],
                          out / "forecast.png", f"{model.name} on {s['dataset']}: {Hz} steps ahead, test RMSE "
                          f"{result['test_rmse']:.0f} (seasonal naive {result['seasonal_naive_rmse']:.0f}, ridge "
                          f"{result['ridge_rmse']:.0f})")
        return result

    return Prepared(
        model=model, loss_fn=loss_fn, batches=data.ExampleBatches({"x": x_tr, "y": y_tr}, s["batch"], seed=s["seed"]),
        evaluate=evaluate, finish=finish,
        describe=f"{s['dataset']} ({series['description']}): {Hz} steps ahead from windows of {W}; "
                 f"{len(y_tr)} train / {len(y_va)} validation / {len(y_te)} test windows (the last "
                 f"{s['test_fraction']:.0%} of the series is the test part); batch {s['batch']}",
        metric_unit="MSE, scaled", files=("metrics.jsonl", "loss.png", "forecast.png"),
        meta={"scaler": {"mean": scaler.mean.tolist(), "std": scaler.std.tolist()}}, tokens_per_step=s["batch"])


def plot_forecast(values, test_start, W, Hz, period, pred, ridge, path: Path, title: str, days: int = 7) -> None:
    """The first ``days`` seasons of the test part: the truth, and forecasts from every ``Hz``-th
    origin (non-overlapping) of the model and of ridge regression."""
    plt = engine.pyplot()
    fig, ax = plt.subplots(figsize=(10, 4.0), dpi=100)
    span = min(days * period, len(values) - test_start)
    t = np.arange(test_start, test_start + span)
    ax.plot(t, values[t], color="black", lw=1, label="truth")
    for k, i in enumerate(range(0, span - Hz + 1, Hz)):
        ax.plot(t[i:i + Hz], pred[i], color="tab:red", lw=1.2, label="rnnjax forecast" if k == 0 else None)
        ax.plot(t[i:i + Hz], ridge[i], color="tab:blue", lw=0.8, ls="--", label="ridge" if k == 0 else None)
    ax.set_xlabel("step")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ----------------------------------------------------------------------------
# The task table and the run


PREPARE = {"classify": prepare_classify, "digits": prepare_classify, "forecast": prepare_forecast,
           "adding": prepare_adding, "copy": prepare_copy}


def train(task: str, settings: dict, *, out: str, steps: int | None = None, minutes: float | None = None,
          resume: bool = False, overwrite: bool = False, evals: int = 5, patience: int | None = None,
          min_delta: float = 0.0, save_every_steps: int | None = None, save_every_minutes: float | None = None,
          no_plot: bool = False, start_time: float | None = None, devices: int | None = None) -> engine.Outcome:
    """Runs ``rnnjax train TASK``: ``settings`` are the task's fixed settings that differ from
    :data:`DEFAULTS` (on ``resume``, those that were given, checked against the run's); a
    ``population`` setting (or a list of ``lr``/``weight_decay`` values) trains several models at once.
    ``devices``: data-parallel over that many local devices (None: as many as divide the batch)."""
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
    members = engine.population_members(s, s["population"], cmd)
    devices = engine.device_count(devices, s["batch"], cmd, population=len(members))
    resume_step = engine.resume_step(out_path, cmd) if saved else None
    default_steps = DEFAULTS[task].get("steps")
    if steps is None and minutes is None and not saved and default_steps:
        steps = default_steps
    total_steps, seconds = engine.budget(steps, minutes, saved, 5.0)
    config = saved or {RUN_MARKER: 1, "task": task, "settings": s, "model": p.model.name,
                       "budget": {"steps": total_steps, "seconds": seconds}}
    engine.write_config(out_path, config, overwrite=overwrite, cmd=cmd, out_arg=out, run_files=run_files)
    return engine.run(engine.Job(
        cmd=cmd, out=out_path, model_name=p.model.name, init=p.init or p.model.init, loss_fn=p.loss_fn, batches=p.batches,
        evaluate=p.evaluate, settings=s, total_steps=total_steps, seconds=seconds, resume_step=resume_step,
        rest_of_time=minutes is None, meta={"task": task, "settings": s, **p.meta}, describe=p.describe,
        tokens_per_step=p.tokens_per_step, unit="sequences", metric_unit=p.metric_unit,
        finish=partial(_finish, p.finish, out_path, no_plot), files=p.files,
        plot_title=f"{p.model.name}: rnnjax train {task}", evals=evals, patience=patience, min_delta=min_delta,
        save_every_steps=save_every_steps, save_every_minutes=save_every_minutes, no_plot=no_plot,
        start_time=start_time, devices=devices, population=len(members)))


def _finish(fn, out, no_plot, params, history):
    return fn(params, out, no_plot, history)
