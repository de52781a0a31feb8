"""``rnnjax train copy``: the copy task (long-range memory), fresh sequences every step."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp

from rnnjax import data, engine, models
from rnnjax.engine import UsageError
from rnnjax.recipes import common
from rnnjax.recipes.flags import Flag, positive
from rnnjax.recipes.synthetic import TEST_SEQUENCES, VAL_SEQUENCES, chrono, fixed_sets

DEFAULTS = {**common.TASK_DEFAULTS, "delay": 100, "symbols": 10, "alphabet": 8, "chrono": True,
            "cell": "lstm", "hidden": 128, "batch": 64, "lr": 1e-2}


def _check(s: dict, cmd: str) -> None:
    if s["delay"] < 1 or s["symbols"] < 1 or s["alphabet"] < 2:
        raise UsageError(f"{cmd}: expected --delay >= 1, --symbols >= 1 and --alphabet >= 2, got --delay "
                         f"{s['delay']}, --symbols {s['symbols']}, --alphabet {s['alphabet']}.")


def _metrics(model):
    def loss_fn(params, batch, key):
        logits = model.apply(params, batch["x"], key=key)
        m = batch["mask"]
        return jnp.sum(jnp.where(m, common.nll(logits, batch["y"]), 0.0)) / jnp.sum(m)

    @jax.jit
    def per_example(params, batch):
        logits = model.apply(params, batch["x"])
        m = batch["mask"]
        loss = jnp.where(m, common.nll(logits, batch["y"]), 0.0).sum(-1)
        correct = jnp.where(m, jnp.argmax(logits, -1) == batch["y"], False).sum(-1)
        return {"loss": loss, "correct": correct.astype(jnp.float32)}

    return loss_fn, per_example


def prepare(plan: engine.Plan) -> engine.Job:
    s, cmd = plan.settings, plan.cmd
    _check(s, cmd)
    make = partial(data.synthetic.copy, delay=s["delay"], symbols=s["symbols"], alphabet=s["alphabet"])
    K = s["alphabet"]
    model = common.model_or_usage(cmd, lambda: models.tagger(
        K + 1, vocab_size=K + 2, cell=s["cell"], layers=s["layers"], hidden=s["hidden"], dropout=s["dropout"]))
    loss_fn, per_example = _metrics(model)
    val, test = fixed_sets(make, s["seed"])
    per_seq = s["symbols"]

    def evaluate(params):
        t = common.sums_over(per_example, val, params)
        n = VAL_SEQUENCES * per_seq
        return {"val_loss": t["loss"] / n, "val_accuracy": t["correct"] / n}

    def finish(params, history, plot_dir):
        t = common.sums_over(per_example, test, params)
        n = TEST_SEQUENCES * per_seq
        if plot_dir is not None and history:
            plot_accuracy(history, Path(plot_dir) / "accuracy.png", f"{model.name}: copy task, delay {s['delay']} "
                          "(validation accuracy on the recalled symbols)", chance=1.0 / K)
        return {"test_accuracy": t["correct"] / n, "test_loss": t["loss"] / n, "baseline_accuracy": 1.0 / K,
                "test_symbols": n}

    T = 2 * s["symbols"] + s["delay"]
    return engine.Job(
        model_name=model.name, after=common.print_test_metrics, init=chrono(model, s, T), loss_fn=loss_fn,
        batches=data.GeneratedBatches(make, s["batch"], seed=s["seed"]), evaluate=evaluate, finish=finish,
        describe=f"the copy task: {s['symbols']} symbols of {K}, recalled after a delay of {s['delay']} (T = {T}); "
                 f"fresh sequences every step, {VAL_SEQUENCES} validation / {TEST_SEQUENCES} test; guessing gives "
                 f"accuracy {1 / K:.3f}; batch {s['batch']}",
        metric_unit="nats", files=("metrics.jsonl", "loss.png", "accuracy.png"), tokens_per_step=s["batch"],
        plot_title=f"{model.name}: {cmd}")


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
    engine.save_figure(fig, path)


RECIPE = common.task_recipe(
    "copy", "the copy task (long-range memory)",
    "Train on the copy task: --symbols random symbols, a delay of --delay steps, then recall them in order. "
    "Accuracy counts the recalled symbols only. Fresh sequences every step.",
    defaults=DEFAULTS, steps=3000, prepare=prepare,
    task_flags=(Flag("delay", positive(int), "steps between the symbols and their recall", "task"),
                Flag("symbols", positive(int), "symbols to remember", "task"),
                Flag("alphabet", positive(int), "distinct symbols", "task")),
    model=("cell", "layers", "hidden", "bidirectional", "dropout", "chrono"))
