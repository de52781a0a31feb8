"""``rnnjax train classify``: a recurrent classifier on a UCR/UEA data set (``digits`` reuses it)."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from rnnjax import data, engine, models
from rnnjax.engine import UsageError
from rnnjax.recipes import common
from rnnjax.recipes.flags import Flag

# Defaults chosen so that the plain command reaches the acceptance numbers of the README (Tasks) on
# the 2-core CPU this project is developed on, in a few minutes.
DEFAULTS = {**common.TASK_DEFAULTS, "dataset": "japanese_vowels", "pooling": "mean", "hidden": 64,
            "bidirectional": True, "batch": 32, "val_fraction": 0.1}


def _dataset_flag() -> Flag:
    from rnnjax.data import CLASSIFICATION

    return Flag("dataset", str, f"a data set: {', '.join(c for c in CLASSIFICATION if c != 'digits')}, or the path "
                                "of a *_TRAIN.ts file", "task")


def _load(s: dict, cmd: str):
    try:
        return data.load_digits() if s.get("dataset", "digits") == "digits" else data.load_classification(s["dataset"])
    except ImportError as e:
        raise UsageError(str(e)) from None
    except ValueError as e:
        raise UsageError(f"{cmd}: {e}") from None


def _parts(d: dict, s: dict):
    """The fitting, validation and test parts, missing values filled and standardised with the fitting
    part's statistics only (never the validation or test data); and the scaler."""
    train, test = d["train"], dict(d["test"])
    kept, held = data.split(len(train["y"]), s["val_fraction"], seed=s["seed"], labels=train["y"])
    fit_part = {k: v[kept] for k, v in train.items()}
    val_part = {k: v[held] for k, v in train.items()}
    for part in (fit_part, val_part, test):
        part["x"] = data.fill_missing(part["x"], part["lengths"])
    scaler = data.Scaler.fit(fit_part["x"], fit_part["lengths"])
    for part in (fit_part, val_part, test):
        part["x"] = scaler.transform(part["x"], part["lengths"])
    return fit_part, val_part, test, scaler


def _metrics(model):
    @jax.jit
    def per_example(params, batch):
        logits = model.apply(params, batch["x"], lengths=batch["lengths"])
        correct = (jnp.argmax(logits, -1) == batch["y"]).astype(jnp.float32)
        return {"loss": common.nll(logits, batch["y"]), "correct": correct}

    return per_example


def _finisher(model, per_example, test: dict, d: dict):
    predict = jax.jit(lambda params, batch: jnp.argmax(model.apply(params, batch["x"], lengths=batch["lengths"]), -1))

    def finish(params, history, plot_dir):
        t = common.sums_over(per_example, test, params)
        n = len(test["y"])
        if plot_dir is not None:
            plot_confusion(test["y"], common.predict_all(predict, test, params), d["classes"],
                           Path(plot_dir) / "confusion.png",
                           f"{model.name} on {d['name']}: test accuracy {t['correct'] / n:.2%}")
        return {"test_accuracy": t["correct"] / n, "test_loss": t["loss"] / n, "test_examples": n}

    return finish


def prepare(plan: engine.Plan) -> engine.Job:
    s, cmd = plan.settings, plan.cmd
    d = _load(s, cmd)
    fit_part, val_part, test, scaler = _parts(d, s)
    C, F = len(d["classes"]), d["train"]["x"].shape[-1]
    model = common.model_or_usage(cmd, lambda: models.classifier(
        C, input_size=F, cell=s["cell"], layers=s["layers"], hidden=s["hidden"], bidirectional=s["bidirectional"],
        pooling=s["pooling"], dropout=s["dropout"]))

    def loss_fn(params, batch, key):
        logits = model.apply(params, batch["x"], lengths=batch["lengths"], key=key)
        return jnp.mean(common.nll(logits, batch["y"]))

    per_example = _metrics(model)

    def evaluate(params):
        t = common.sums_over(per_example, val_part, params)
        n = len(val_part["y"])
        return {"val_loss": t["loss"] / n, "val_accuracy": t["correct"] / n}

    batches = data.ExampleBatches(fit_part, s["batch"], seed=s["seed"])
    if s.get("shift"):
        batches = ShiftedImages(batches, 8, 8, s["shift"], float(scaler.transform(np.zeros((1, 1)))[0, 0]), s["seed"])
    lengths = d["train"]["lengths"]
    ragged = f"lengths {lengths.min()}-{lengths.max()}" if lengths.min() != lengths.max() else f"length {lengths[0]}"
    return engine.Job(
        model_name=model.name, after=common.print_test_metrics, init=model.init, loss_fn=loss_fn, batches=batches,
        evaluate=evaluate,
        finish=_finisher(model, per_example, test, d),
        describe=f"{d['name']}: {len(fit_part['y'])} train / {len(val_part['y'])} validation / {len(test['y'])} test "
                 f"sequences, {F} feature(s), {ragged}, {C} classes; batch {s['batch']} (padded, masked by lengths)",
        metric_unit="nats", files=("metrics.jsonl", "loss.png", "confusion.png"),
        meta={"classes": d["classes"], "scaler": {"mean": scaler.mean.tolist(), "std": scaler.std.tolist()}},
        tokens_per_step=s["batch"], plot_title=f"{model.name}: {plan.cmd}")


class ShiftedImages(data.BatchesView):
    """Training batches of images read as pixel sequences (``x [B, rows * cols, 1]``), each image
    shifted by a random whole number of pixels in ``[-shift, shift]`` per axis (the uncovered
    border filled with ``fill``, the scaled value of a blank pixel): data augmentation. Seeded by
    ``(seed, batch index)``, so a resumed run sees the same batches."""

    def __init__(self, batches, rows: int, cols: int, shift: int, fill: float, seed: int):
        super().__init__(batches)
        self.rows, self.cols, self.shift, self.fill, self.seed = rows, cols, shift, fill, seed

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
    engine.save_figure(fig, path)


RECIPE = common.task_recipe(
    "classify", "sequence classification (UCR/UEA .ts archives)",
    "Train a recurrent classifier on a UCR/UEA data set (from the installed sktime package, or any *_TRAIN.ts file "
    "with its *_TEST.ts beside it). Variable-length series are padded and masked by their lengths, never truncated; "
    "the classifier pools over the valid steps only. A stratified part of the training set validates; the test set "
    "is scored once, at the end, with the best checkpoint.",
    defaults=DEFAULTS, steps=800, prepare=prepare, task_flags=(_dataset_flag(), common.VAL_FRACTION),
    model=("cell", "layers", "hidden", "bidirectional", "dropout", "pooling"))
