"""``rnnjax train adding``: the adding problem (long-range memory), fresh sequences every step."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from rnnjax import data, engine, models
from rnnjax.engine import UsageError
from rnnjax.recipes import common
from rnnjax.recipes.flags import Flag, positive
from rnnjax.recipes.synthetic import TEST_SEQUENCES, VAL_SEQUENCES, chrono, fixed_sets

DEFAULTS = {**common.TASK_DEFAULTS, "length": 200, "chrono": True, "hidden": 64, "batch": 64, "lr": 1e-2}


def prepare(plan: engine.Plan) -> engine.Job:
    s, cmd = plan.settings, plan.cmd
    if s["length"] < 2:
        raise UsageError(f"{cmd}: --length must be at least 2 (one marked step in each half), got {s['length']}.")
    make = partial(data.synthetic.adding, length=s["length"])
    model = common.model_or_usage(cmd, lambda: models.regressor(
        1, input_size=2, cell=s["cell"], layers=s["layers"], hidden=s["hidden"], bidirectional=s["bidirectional"],
        pooling="last", dropout=s["dropout"]))

    def loss_fn(params, batch, key):
        pred = model.apply(params, batch["x"], key=key)[..., 0]
        return jnp.mean((pred - batch["y"]) ** 2)

    @jax.jit
    def per_example(params, batch):
        return {"se": (model.apply(params, batch["x"])[..., 0] - batch["y"]) ** 2}

    val, test = fixed_sets(make, s["seed"])

    def evaluate(params):
        return {"val_loss": common.sums_over(per_example, val, params)["se"] / VAL_SEQUENCES}

    def finish(params, history, plot_dir):
        mse = common.sums_over(per_example, test, params)["se"] / TEST_SEQUENCES
        return {"test_mse": mse, "baseline_mse": float(np.mean((test["y"] - 1.0) ** 2)),
                "test_examples": TEST_SEQUENCES}

    return engine.Job(
        model_name=model.name, after=common.print_test_metrics, init=chrono(model, s, s["length"]), loss_fn=loss_fn,
        batches=data.GeneratedBatches(make, s["batch"], seed=s["seed"]), evaluate=evaluate, finish=finish,
        describe=f"the adding problem, T = {s['length']}: fresh sequences every step, {VAL_SEQUENCES} validation / "
                 f"{TEST_SEQUENCES} test; predicting the mean gives MSE 1/6 = 0.167; batch {s['batch']}",
        metric_unit="MSE", tokens_per_step=s["batch"], plot_title=f"{model.name}: {cmd}")


RECIPE = common.task_recipe(
    "adding", "the adding problem (long-range memory)",
    "Train on the adding problem: two marked values in a sequence of --length random values; predict their sum "
    "(predicting the mean gives MSE 0.167). Fresh sequences every step.",
    defaults=DEFAULTS, steps=1500, prepare=prepare,
    task_flags=(Flag("length", positive(int), "sequence length T", "task"),),
    model=("cell", "layers", "hidden", "bidirectional", "dropout", "chrono"))
