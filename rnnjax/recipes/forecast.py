"""``rnnjax train forecast``: multi-step time-series forecasting, against the seasonal-naive forecast
and ridge regression on the same windows."""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rnnjax import data, engine, models
from rnnjax.engine import UsageError
from rnnjax.recipes import common
from rnnjax.recipes.flags import Flag, in_range, positive

DEFAULTS = {**common.TASK_DEFAULTS, "dataset": "taylor", "horizon": 48, "window": 144,
            "mode": "direct", "hidden": 64, "batch": 64, "test_fraction": 0.2, "val_fraction": 0.1}
RIDGE_PENALTIES = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)


def ridge_forecast(x_train, y_train, x_eval, lam: float) -> np.ndarray:
    """Ridge regression of ``y [N, H]`` on the flattened windows ``x [N, W, F]`` plus a bias (NumPy,
    closed form, the bias not penalised)."""
    A = np.c_[x_train.reshape(len(x_train), -1), np.ones(len(x_train))].astype(np.float64)
    reg = lam * np.eye(A.shape[1])
    reg[-1, -1] = 0.0
    w = np.linalg.solve(A.T @ A + reg, A.T @ y_train.astype(np.float64))
    return (np.c_[x_eval.reshape(len(x_eval), -1), np.ones(len(x_eval))] @ w).astype(np.float32)


class Windows(NamedTuple):
    """The scaled series and its training, validation and test windows (``x [N, W, 1]``, ``y [N, H]``)."""

    z: np.ndarray
    scaler: data.Scaler
    train: tuple
    val: tuple
    test: tuple
    test_start: int
    period: int
    description: str


def _windows(s: dict, cmd: str) -> Windows:
    try:
        series = data.load_series(s["dataset"])
    except ImportError as e:
        raise UsageError(str(e)) from None
    except ValueError as e:
        raise UsageError(f"{cmd}: {e}") from None
    values, period = series["values"], series["period"]
    found = data.first_non_finite(values)
    if found is not None:  # never scaled or trained on silently
        raise UsageError(f"{cmd}: the series {s['dataset']!r} has a non-finite value ({found[1]}) at step "
                         f"{found[0][0]} of {len(values)}; expected finite values. Fix: fill or drop its missing "
                         "values first.")
    W, Hz, n = s["window"], s["horizon"], len(series["values"])
    test_start = int(round(n * (1 - s["test_fraction"])))
    val_start = int(round(test_start * (1 - s["val_fraction"])))
    # Scaling from the fitting part only; windows' inputs may reach back into earlier parts (they
    # are past observations), their targets never cross into a later part.
    scaler = data.Scaler.fit(values[:val_start, None])
    z = scaler.transform(values[:, None])[:, 0]
    try:
        parts = [data.sliding_windows(z, W, Hz, start=a, stop=b)
                 for a, b in ((0, val_start), (val_start - W, test_start), (test_start - W, n))]
    except ValueError as e:
        raise UsageError(f"{cmd}: --window {W} and --horizon {Hz} do not fit the {n} points of {s['dataset']!r} "
                         f"({e}). Fix: use a shorter --window or --horizon.") from None
    if period > W:
        raise UsageError(f"{cmd}: the seasonal-naive baseline needs the value one season ({period} steps) earlier "
                         f"inside the window, got --window {W}. Fix: pass --window {period} or more.")
    return Windows(z, scaler, *parts, test_start, period, series["description"])


def _baselines(w: Windows, s: dict) -> dict:
    """The seasonal-naive forecast (the same half-hour one season earlier) and ridge regression on the
    same lag window (its penalty chosen on the validation windows), on the test windows."""
    (x_tr, y_tr), (x_va, y_va), (x_te, _) = w.train, w.val, w.test
    val_err = [np.mean((ridge_forecast(x_tr, y_tr, x_va, lam) - y_va) ** 2) for lam in RIDGE_PENALTIES]
    lam = RIDGE_PENALTIES[int(np.argmin(val_err))]
    ridge = ridge_forecast(np.concatenate([x_tr, x_va]), np.concatenate([y_tr, y_va]), x_te, lam)
    idx = s["window"] - w.period + (np.arange(s["horizon"]) % w.period)
    return {"seasonal_naive": x_te[:, idx, 0], "ridge": ridge, "ridge_lambda": lam}


def forecast_loss(model, autoregressive: bool):
    """The training loss of a forecaster: MSE of the direct forecast, or of the next value at every step
    (``autoregressive``, teacher forcing) of ``batch["x"] [B, W, 1]`` followed by ``batch["y"] [B, H]``."""
    def loss_fn(params, batch, key):
        if autoregressive:  # teacher forcing: the true values in, the next value out, at every step
            seq = jnp.concatenate([batch["x"][..., 0], batch["y"]], axis=-1)
            pred = model.apply(params, seq[..., :-1, None], key=key)[..., 0]
            return jnp.mean((pred - seq[..., 1:]) ** 2)
        return jnp.mean((model.apply(params, batch["x"], key=key) - batch["y"]) ** 2)

    return loss_fn


def _finisher(model, w: Windows, s: dict):
    Hz, (x_te, y_te), sd = s["horizon"], w.test, float(w.scaler.std[0])
    base = _baselines(w, s)
    forecast = jax.jit(lambda params, batch: model.forecast(params, batch["x"], Hz))

    def rmse(pred):
        return float(np.sqrt(np.mean((pred - y_te) ** 2))) * sd

    def finish(params, history, plot_dir):
        pred = common.predict_all(forecast, {"x": x_te, "y": y_te}, params)
        r = {"test_rmse": rmse(pred), "test_mse": float(np.mean((pred - y_te) ** 2)),
             "seasonal_naive_rmse": rmse(base["seasonal_naive"]), "ridge_rmse": rmse(base["ridge"]),
             "ridge_lambda": base["ridge_lambda"], "test_windows": len(y_te)}
        r["vs_seasonal_naive"] = r["test_rmse"] / r["seasonal_naive_rmse"]
        r["vs_ridge"] = r["test_rmse"] / r["ridge_rmse"]
        if plot_dir is not None:
            inverse = w.scaler.inverse
            plot_forecast(inverse(w.z[:, None])[:, 0], w.test_start, s["window"], Hz, w.period,
                          inverse(pred[..., None])[..., 0], inverse(base["ridge"][..., None])[..., 0],
                          Path(plot_dir) / "forecast.png", f"{model.name} on {s['dataset']}: {Hz} steps ahead, test "
                          f"RMSE {r['test_rmse']:.0f} (seasonal naive {r['seasonal_naive_rmse']:.0f}, ridge "
                          f"{r['ridge_rmse']:.0f})")
        return r

    return finish


def prepare(plan: engine.Plan) -> engine.Job:
    s, cmd = plan.settings, plan.cmd
    w = _windows(s, cmd)
    Hz = s["horizon"]
    model = common.model_or_usage(cmd, lambda: models.forecaster(
        Hz, mode=s["mode"], cell=s["cell"], layers=s["layers"], hidden=s["hidden"], dropout=s["dropout"]))

    @jax.jit
    def per_example(params, batch):
        return {"se": jnp.mean((model.forecast(params, batch["x"], Hz) - batch["y"]) ** 2, axis=-1)}

    (x_tr, y_tr), (x_va, y_va), (_, y_te) = w.train, w.val, w.test

    def evaluate(params):
        mse = common.sums_over(per_example, {"x": x_va, "y": y_va}, params)["se"] / len(y_va)
        return {"val_loss": mse, "val_rmse": math.sqrt(mse) * float(w.scaler.std[0])}

    return engine.Job(
        model_name=model.name, after=common.print_test_metrics, init=model.init,
        loss_fn=forecast_loss(model, s["mode"] == "autoregressive"),
        batches=data.ExampleBatches({"x": x_tr, "y": y_tr}, s["batch"], seed=s["seed"]), evaluate=evaluate,
        finish=_finisher(model, w, s),
        describe=f"{s['dataset']} ({w.description}): {Hz} steps ahead from windows of {s['window']}; "
                 f"{len(y_tr)} train / {len(y_va)} validation / {len(y_te)} test windows (the last "
                 f"{s['test_fraction']:.0%} of the series is the test part); batch {s['batch']}",
        metric_unit="MSE, scaled", files=("metrics.jsonl", "loss.png", "forecast.png"),
        meta={"scaler": {"mean": w.scaler.mean.tolist(), "std": w.scaler.std.tolist()}}, tokens_per_step=s["batch"],
        plot_title=f"{model.name}: {cmd}")


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
    engine.save_figure(fig, path)



def _series_flag() -> Flag:
    from rnnjax.data import SERIES

    return Flag("dataset", str, f"a series: {', '.join(SERIES)}", "task")


RECIPE = common.task_recipe(
    "forecast", "multi-step time-series forecasting",
    "Train a recurrent forecaster on a series (pmdarima's taylor, statsmodels' sunspots, nile, co2, vega_datasets' "
    "seattle_temps): from a window of past values, predict the next --horizon values. The last --test-fraction of "
    "the series is the test part, the end of the rest validates; the scaling is fitted on the training part only. "
    "The test RMSE is compared with the seasonal-naive forecast (the value one season earlier) and with ridge "
    "regression on the same window.",
    defaults=DEFAULTS, steps=1500, prepare=prepare,
    task_flags=(_series_flag(), Flag("horizon", positive(int), "steps to forecast", "task"),
                Flag("window", positive(int), "past values the model reads (the lag window; ridge regression gets "
                                              "the same)", "task"),
                Flag("mode", str, "direct (one head predicts all steps) or autoregressive (one step ahead, fed "
                                  "back)", "task"),
                Flag("test_fraction", in_range(0, 1, lo_open=True), "the last fraction of the series held out for "
                                                                    "testing", "task"), common.VAL_FRACTION))
