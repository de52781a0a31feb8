"""``rnnjax train anomaly``: anomaly detection by the error of a one-step-ahead recurrent forecaster,
against a rolling z-score and an isolation forest on the same lag windows.

Why a forecaster rather than a sequence autoencoder: it scores every step by itself (the error of
predicting that step from the ``--window`` steps before it), so a point anomaly is located to its
step, not smeared over the windows that contain it; it trains on every step of every window (teacher
forcing) with no bottleneck size to choose; and it reuses :func:`rnnjax.models.forecaster`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np

from rnnjax import data, engine, metrics, models
from rnnjax.data.datasets import require
from rnnjax.engine import UsageError
from rnnjax.recipes import common
from rnnjax.recipes.flags import Flag, in_range, positive
from rnnjax.recipes.forecast import forecast_loss

INPUTS = ("differences", "values")
DEFAULTS = {**common.TASK_DEFAULTS, "dataset": "mitdb", "value_column": None, "label_column": None,
            "inputs": "differences", "window": 64, "smooth": 1, "train_fraction": 0.4, "val_fraction": 0.2,
            "hidden": 64, "batch": 64}
FILES = ("metrics.jsonl", "loss.png", "anomaly.png", "scores.csv")


def rolling_zscore(values, window: int) -> np.ndarray:
    """``|x[t] - mean| / std`` of each step against the ``window`` steps before it (NaN for the first
    ``window`` steps); a constant window's std counts as 1e-12."""
    v = np.asarray(values, np.float64)
    past = np.lib.stride_tricks.sliding_window_view(v, window)[:-1]  # past[i] = v[i:i + window], before step i + window
    z = np.abs(v[window:] - past.mean(axis=1)) / np.maximum(past.std(axis=1), 1e-12)
    return np.r_[np.full(min(window, len(v)), np.nan), z]


def smooth(score, k: int) -> np.ndarray:
    """The mean of ``score`` over the ``k`` steps centred on each step (``[t - k // 2, t + k - k // 2)``,
    cut at the ends; NaNs skipped and kept where they were)."""
    score = np.asarray(score, np.float64)
    ok = ~np.isnan(score)
    total, count = np.r_[0.0, np.cumsum(np.where(ok, score, 0.0))], np.r_[0, np.cumsum(ok)]
    t = np.arange(len(score))
    lo, hi = np.clip(t - k // 2, 0, len(score)), np.clip(t + k - k // 2, 0, len(score))
    return np.where(ok, (total[hi] - total[lo]) / np.maximum(count[hi] - count[lo], 1), np.nan)


def isolation_forest_scores(z, window: int, fit_stop: int, seed: int) -> np.ndarray:
    """scikit-learn's ``IsolationForest`` on the lag windows ``z[t - window : t + 1]``: fitted on those
    ending before ``fit_stop``, the score of every step ``t >= window`` (higher: more anomalous; NaN before)."""
    ensemble = require("sklearn.ensemble", "rnnjax train anomaly", "the isolation forest baseline")
    lags = np.lib.stride_tricks.sliding_window_view(np.asarray(z, np.float64), window + 1)  # lags[i] ends at i + window
    forest = ensemble.IsolationForest(random_state=seed).fit(lags[:fit_stop - window])
    return np.r_[np.full(window, np.nan), -forest.score_samples(lags)]


class Series(NamedTuple):
    """The series, its labels (or None), what the model reads (``z``: the values or their differences,
    scaled on the fitting part) and where the parts start: fitting ``[0, val_start)``, validation
    ``[val_start, test_start)``, test ``[test_start, n)``."""

    values: np.ndarray
    labels: np.ndarray | None
    z: np.ndarray
    scale: float
    val_start: int
    test_start: int
    name: str
    description: str


def _series(s: dict, cmd: str) -> Series:
    if s["inputs"] not in INPUTS:
        raise UsageError(f"{cmd}: unknown --inputs {s['inputs']!r}; expected one of {', '.join(INPUTS)}.")
    d = common.load_or_usage(cmd, lambda: data.load_anomaly(s["dataset"], value_column=s["value_column"],
                                                           label_column=s["label_column"]))
    v, W = d["values"], s["window"]
    n = len(v)
    test_start = int(round(n * s["train_fraction"]))
    val_start = int(round(test_start * (1 - s["val_fraction"])))
    if val_start < W + 2 or val_start == test_start or test_start == n:
        raise UsageError(f"{cmd}: the {n} steps of {d['name']!r} split as --train-fraction {s['train_fraction']:g} "
                         f"and --val-fraction {s['val_fraction']:g} say leave {val_start} for fitting, "
                         f"{test_start - val_start} for validation and {n - test_start} for testing; expected more "
                         f"than --window {W} + 1 for fitting and at least one of each other. Fix: pass a shorter "
                         "--window or other fractions, or a longer series.")
    u = np.r_[0.0, np.diff(v)] if s["inputs"] == "differences" else v  # a step's change: no change before the first
    scaler = data.Scaler.fit(u[1:val_start, None])
    z = scaler.transform(u[:, None])[:, 0]
    return Series(v, d["labels"], z, float(scaler.std[0]), val_start, test_start, d["name"], d["description"])


def _errors(forecast, params, z, W: int, start: int, stop: int) -> np.ndarray:
    """The model's one-step-ahead errors ``pred - z[t]`` at the steps ``t`` of ``[max(start, W), stop)``."""
    x, y = data.sliding_windows(z, W, 1, start=max(start, W) - W, stop=stop)
    return common.predict_all(forecast, {"x": x}, params)[:, 0] - y[:, 0]


def _ranking(labels, scores: dict) -> dict:
    """AUROC and best F1 of each named score against the labels (where both classes are present)."""
    out = {"test_anomalies": int(labels.sum())}
    if 0 < out["test_anomalies"] < len(labels):
        for name, score in scores.items():
            out[f"{name}_auroc"] = metrics.auroc(labels, score)
            out[f"{name}_best_f1"] = metrics.best_f1(labels, score)[0]
    return out


def _finisher(model, ser: Series, s: dict):
    W, n, t0 = s["window"], len(ser.values), ser.test_start
    forecast = jax.jit(lambda params, batch: model.forecast(params, batch["x"], 1))
    zscore = smooth(rolling_zscore(ser.values, W), s["smooth"])
    forest = smooth(isolation_forest_scores(ser.z, W, t0, s["seed"]), s["smooth"])

    def finish(params, history, plot_dir):
        error = np.r_[np.full(W, np.nan), _errors(forecast, params, ser.z, W, W, n)]
        r = {"test_steps": n - t0, "test_mse": float(np.mean(error[t0:] ** 2))}
        scores = {"test": smooth(np.abs(error), s["smooth"]), "zscore": zscore, "iforest": forest}
        if ser.labels is not None:
            r.update(_ranking(ser.labels[t0:], {k: v[t0:] for k, v in scores.items()}))
        if plot_dir is not None:
            write_scores(Path(plot_dir) / "scores.csv", ser, scores)
            plot_anomalies(ser, scores, Path(plot_dir) / "anomaly.png", _title(model.name, ser, r))
        return r

    return finish


def _title(model_name: str, ser: Series, r: dict) -> str:
    if "test_auroc" not in r:
        return f"{model_name} on {ser.name}: one-step forecast error (no labels)"
    return (f"{model_name} on {ser.name}: test AUROC {r['test_auroc']:.3f} (rolling z-score {r['zscore_auroc']:.3f}, "
            f"isolation forest {r['iforest_auroc']:.3f})")


def prepare(plan: engine.Plan) -> engine.Job:
    s, cmd = plan.settings, plan.cmd
    ser = _series(s, cmd)
    W = s["window"]
    model = common.model_or_usage(cmd, lambda: models.forecaster(
        1, mode="autoregressive", cell=s["cell"], layers=s["layers"], hidden=s["hidden"], dropout=s["dropout"]))
    x_fit, y_fit = data.sliding_windows(ser.z, W, 1, stop=ser.val_start)

    @jax.jit
    def per_example(params, batch):
        return {"se": (model.forecast(params, batch["x"], 1)[..., 0] - batch["y"][..., 0]) ** 2}

    x_val, y_val = data.sliding_windows(ser.z, W, 1, start=ser.val_start - W, stop=ser.test_start)

    def evaluate(params):
        mse = common.sums_over(per_example, {"x": x_val, "y": y_val}, params)["se"] / len(y_val)
        return {"val_loss": mse, "val_rmse": math.sqrt(mse) * ser.scale}

    labelled = "" if ser.labels is None else f" ({int(ser.labels[ser.test_start:].sum())} labelled anomalous)"
    return engine.Job(
        model_name=model.name, after=common.print_test_metrics, init=model.init, loss_fn=forecast_loss(model, True),
        batches=data.ExampleBatches({"x": x_fit, "y": y_fit}, s["batch"], seed=s["seed"]), evaluate=evaluate,
        finish=_finisher(model, ser, s),
        describe=f"{ser.name} ({ser.description}): the next step from {W} steps of its {s['inputs']}; steps "
                 f"[0, {ser.val_start}) fit, [{ser.val_start}, {ser.test_start}) validate, [{ser.test_start}, "
                 f"{len(ser.values)}) are scored{labelled}; the labels are never trained on; batch {s['batch']}",
        metric_unit="MSE, scaled", files=FILES, tokens_per_step=s["batch"], plot_title=f"{model.name}: {cmd}")


def write_scores(path: Path, ser: Series, scores: dict) -> None:
    """One line per step: its part, value, label (if any) and each score (empty where undefined)."""
    parts = np.where(np.arange(len(ser.values)) < ser.val_start, "fit",
                     np.where(np.arange(len(ser.values)) < ser.test_start, "validation", "test"))
    names = {"test": "score", "zscore": "rolling_zscore", "iforest": "isolation_forest"}
    head = ["step", "part", "value"] + (["label"] if ser.labels is not None else []) + [names[k] for k in scores]
    lines = [",".join(head)]
    for t in range(len(ser.values)):
        row = [str(t), parts[t], f"{ser.values[t]:.9g}"] + ([str(ser.labels[t])] if ser.labels is not None else [])
        lines.append(",".join(row + ["" if np.isnan(v[t]) else f"{v[t]:.6g}" for v in scores.values()]))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def plot_anomalies(ser: Series, scores: dict, path: Path, title: str) -> None:
    """The series with its parts and labelled anomalies; below, each score scaled to [0, 1] on the test part."""
    plt = engine.pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 5.0), dpi=100, sharex=True)
    t = np.arange(len(ser.values))
    top.plot(t, ser.values, color="black", lw=0.6)
    for ax in (top, bottom):
        ax.axvspan(ser.val_start, ser.test_start, color="tab:green", alpha=0.08, lw=0)
        ax.axvline(ser.test_start, color="gray", lw=0.8, ls=":")
        ax.grid(alpha=0.3)
    if ser.labels is not None and ser.labels.any():
        hit = np.flatnonzero(ser.labels)
        top.plot(hit, ser.values[hit], "o", color="tab:red", ms=2.5, label="labelled anomalous")
        top.legend(fontsize=8, loc="upper left")
    top.set_title(title + "\n(green: validation; right of the dotted line: test)", fontsize=9)
    styles = {"test": ("tab:red", 1.0, "recurrent model"), "zscore": ("tab:blue", 0.6, "rolling z-score"),
              "iforest": ("tab:orange", 0.6, "isolation forest")}
    for name, score in scores.items():
        part = score[ser.test_start:]
        lo, hi = np.nanmin(part), np.nanmax(part)
        color, lw, label = styles[name]
        bottom.plot(t, (score - lo) / (hi - lo if hi > lo else 1.0), color=color, lw=lw, label=label,
                    zorder=3 if name == "test" else 2)  # the model's on top
    bottom.set_ylim(-0.05, 1.05)
    bottom.set_ylabel("score (test range = [0, 1])", fontsize=8)
    bottom.set_xlabel("step")
    bottom.legend(fontsize=8, loc="upper left")
    engine.save_figure(fig, path)


def _dataset_flag() -> Flag:
    return Flag("dataset", str, f"a labelled series: {', '.join(data.ANOMALY)}, or the path of a CSV file (a header "
                                "line, a value column, an optional 0/1 label column)", "task")


RECIPE = common.task_recipe(
    "anomaly", "anomaly detection in a series (labelled or not)",
    "Train a recurrent one-step-ahead forecaster on the leading --train-fraction of a series (its last "
    "--val-fraction validates), never reading the labels, and score every later step by the forecaster's absolute "
    "error (or its mean over --smooth steps). With labels, the test part's AUROC and best F1 are compared with a "
    "rolling z-score and scikit-learn's IsolationForest on the same lag windows. The scores of every step go to "
    "scores.csv, the plot to anomaly.png.",
    defaults=DEFAULTS, steps=600, prepare=prepare, model=("cell", "layers", "hidden", "dropout"),
    run_files=(*common.RUN_FILES, "anomaly.png", "scores.csv"),
    task_flags=(_dataset_flag(),
                Flag("value_column", str, "a CSV file's value column: a header name or a number from 1 (default: the "
                                          "one column that is not a label or a time stamp, or 'value' or 'data')",
                     "task"),
                Flag("label_column", str, "a CSV file's 0/1 label column (default: a column named label, labels, "
                                          "anomaly, is_anomaly or outlier, if there is one)", "task"),
                Flag("inputs", str, "what the model reads and predicts: the values' differences (step to step; "
                                    "level-free, for series with trends) or the values", "task", choices=INPUTS),
                Flag("window", positive(int), "steps the model reads before each step it predicts (the rolling "
                                              "z-score's and the isolation forest's lag window too)", "task"),
                Flag("smooth", positive(int), "score each step by the mean of the scores of the SMOOTH steps "
                                              "centred on it (all three scores alike; 1: no smoothing)", "task"),
                Flag("train_fraction", in_range(0, 1, lo_open=True), "the leading fraction of the series trained on "
                                                                     "(its end validates); the rest is scored", "task"),
                common.VAL_FRACTION))
