"""``rnnjax train frames``: video prediction on moving digits (:mod:`rnnjax.data.frames`) with a stack of
convolutional recurrent cells: read 10 frames, predict the next 10. Scored by the test MSE per pixel
against copying the last frame, a blank frame, and the mean of the frames read."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from rnnjax import cells, engine, models
from rnnjax.data import frames as moving
from rnnjax.recipes import common
from rnnjax.recipes.flags import Flag, positive

# Measured on the 2-core CPU this project is developed on (docs/guides/tasks.md, Moving digits).
DEFAULTS = {**common.OPTIM_DEFAULTS, "cell": "conv_lstm", "layers": 2, "hidden": 32, "kernel": 3, "patch": 4,
            "batch": 16}
CONTEXT, HORIZON, SIZE = 10, 10, 32  # frames read, frames predicted, frame side in pixels
VAL_SEQUENCES, TEST_SEQUENCES = 256, 1000
SPLIT_SEED = 0  # the digit images' split and the validation/test sequences never move with --seed
CELL_FACTORIES = {"conv_lstm": cells.conv_lstm, "conv_gru": cells.conv_gru}
RUN_FILES = (*common.RUN_FILES, "frames.png")


class TrainingSequences:
    """Batches of fresh moving-digit sequences from the training digits: batch ``i`` is drawn from
    ``(seed, i)`` alone, so a resumed run reads what an uninterrupted one would (``position``)."""

    def __init__(self, images: np.ndarray, batch: int, seed: int, patch: int):
        self.images, self.batch, self.seed, self.patch, self.position = images, batch, seed, patch, 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        seq = moving.moving_digits(self.images, self.batch, frames=CONTEXT + HORIZON, size=SIZE,
                                   seed=np.random.SeedSequence([self.seed, self.position]).generate_state(1)[0])
        self.position += 1
        return {"frames": moving.to_patches(seq, self.patch)}


def model_inputs(frames):
    """The inputs of steps ``0 .. T-2`` (``frames [B, T, ...]`` as patches): the first :data:`CONTEXT` frames,
    then blanks; the output of step ``t`` predicts frame ``t + 1``."""
    seen = jnp.arange(frames.shape[1] - 1) < CONTEXT
    return jnp.where(seen.reshape(-1, *(1,) * (frames.ndim - 2)), frames[:, :-1], 0.0)


def build_model(s: dict, cmd: str):
    factory = CELL_FACTORIES[s["cell"]]

    def cell(hidden, **options):
        return factory(hidden, (s["kernel"], s["kernel"]), **options)

    cell.__name__ = s["cell"]
    return common.model_or_usage(cmd, lambda: models.tagger(s["patch"] ** 2, input_size=s["patch"] ** 2, cell=cell,
                                                            layers=s["layers"], hidden=s["hidden"]))


def _predict(model):
    @jax.jit
    def predict(params, frames):
        """The predicted frames ``CONTEXT .. T-1`` (patches, in [0, 1])."""
        return jax.nn.sigmoid(model.apply(params, model_inputs(frames))[:, CONTEXT - 1:])

    return predict


def _loss(model):
    """Binary cross-entropy of every step's predicted next frame: the context steps' (each frame from the frames
    before it, which teaches the motion) and the predicted future's. Pixels are grey levels in [0, 1]; on these
    mostly blank frames the squared error alone sat at the blank-frame prediction for 800 steps."""
    def loss_fn(params, batch, key):
        del key
        frames = batch["frames"]
        logits = model.apply(params, model_inputs(frames)).astype(jnp.float32)
        return jnp.mean(jax.nn.softplus(logits) - frames[:, 1:] * logits)

    return loss_fn


def baselines(frames: np.ndarray) -> dict:
    """The MSE per pixel of the predicted frames under three guesses that need no training."""
    future, seen = frames[:, CONTEXT:], frames[:, :CONTEXT]
    return {"copy_last_mse": float(np.mean(np.square(future - seen[:, -1:]))),
            "blank_mse": float(np.mean(np.square(future))),
            "mean_frame_mse": float(np.mean(np.square(future - seen.mean(axis=1, keepdims=True))))}


def _mse(predict, frames: np.ndarray, params) -> float:
    sums = common.sums_over(lambda p, b: {"se": jnp.sum(jnp.square(predict(p, b["frames"]) - b["frames"][:, CONTEXT:]),
                                                        axis=tuple(range(1, b["frames"].ndim)))},
                            {"frames": frames}, params, size=64)
    return sums["se"] / (len(frames) * HORIZON * SIZE * SIZE)


def plot_frames(truth: np.ndarray, pred: np.ndarray, path: Path, title: str) -> None:
    """For each sequence two rows: the true frames (context then future), and the predicted future frames
    under the true ones."""
    plt = engine.pyplot()
    n, T = len(truth), truth.shape[1]
    fig, axes = plt.subplots(2 * n, T, figsize=(T * 0.62, 2 * n * 0.7 + 0.5), dpi=100, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i in range(n):
        for t in range(T):
            axes[2 * i, t].imshow(truth[i, t], cmap="Greys", vmin=0, vmax=1)
        for t in range(pred.shape[1]):
            axes[2 * i + 1, CONTEXT + t].imshow(pred[i, t], cmap="Greys", vmin=0, vmax=1)
        axes[2 * i, 0].set_title("true", fontsize=7, loc="left")
        axes[2 * i + 1, CONTEXT].set_title("predicted", fontsize=7, loc="left")
    fig.suptitle(title, fontsize=8)
    engine.save_figure(fig, path)


def _finisher(model, predict, test: np.ndarray, s: dict):
    def finish(params, history, plot_dir):
        r = {"test_mse": _mse(predict, test, params), **baselines(moving.from_patches(test, s["patch"])),
             "test_sequences": len(test)}
        r["vs_copy_last"] = r["test_mse"] / r["copy_last_mse"]
        r["vs_blank"] = r["test_mse"] / r["blank_mse"]
        if plot_dir is not None:
            pred = moving.from_patches(np.asarray(predict(params, jnp.asarray(test[:3]))), s["patch"])
            plot_frames(moving.from_patches(test[:3], s["patch"]), pred, Path(plot_dir) / "frames.png",
                        f"{model.name}: {CONTEXT} frames read, {HORIZON} predicted (test MSE {r['test_mse']:.4f}; "
                        f"copying the last frame {r['copy_last_mse']:.4f}, blank frames {r['blank_mse']:.4f})")
        return r

    return finish


def prepare(plan: engine.Plan) -> engine.Job:
    s, cmd = plan.settings, plan.cmd
    if SIZE % s["patch"]:
        raise engine.UsageError(f"{cmd}: --patch {s['patch']} must divide the frame side, {SIZE}. Fix: pass 1, 2, 4, "
                                "8 or 16.")
    model = build_model(s, cmd)
    images = {part: common.load_or_usage(cmd, lambda p=part: moving.digit_images(p, SPLIT_SEED))
              for part in ("train", "val", "test")}
    val, test = (moving.to_patches(moving.moving_digits(images[part], n, frames=CONTEXT + HORIZON, size=SIZE,
                                                        seed=seed), s["patch"])
                 for part, n, seed in (("val", VAL_SEQUENCES, 1), ("test", TEST_SEQUENCES, 2)))
    predict = _predict(model)
    grid = SIZE // s["patch"]
    return engine.Job(
        model_name=model.name, init=model.init, loss_fn=_loss(model),
        batches=TrainingSequences(images["train"], s["batch"], s["seed"], s["patch"]),
        evaluate=lambda params: {"val_loss": _mse(predict, val, params)},
        finish=_finisher(model, predict, test, s), after=common.print_test_metrics,
        describe=f"moving digits ({len(images['train'])} / {len(images['val'])} / {len(images['test'])} train / "
                 f"validation / test images, 2 per {SIZE}x{SIZE} frame): {CONTEXT} frames read, {HORIZON} predicted, "
                 f"as a {grid}x{grid} grid of {s['patch']}x{s['patch']} patches; batch {s['batch']} fresh training "
                 f"sequences, {VAL_SEQUENCES} validation, {TEST_SEQUENCES} test",
        metric_unit="MSE per pixel", files=("metrics.jsonl", "loss.png", "frames.png"),
        tokens_per_step=s["batch"], plot_title=f"{model.name}: {cmd}")


RECIPE = common.task_recipe(
    "frames", "video prediction on moving digits (ConvLSTM/ConvGRU)",
    "Train a stack of convolutional recurrent cells to predict video: each sequence shows two of scikit-learn's "
    "8x8 handwritten digits moving in a 32x32 frame, each with its own velocity, bouncing off the edges (Moving "
    "MNIST's recipe). The model reads 10 frames, then runs 10 more steps on blank inputs, predicting each next "
    "frame; the frames are cut into patches (space to depth) so the cells work on a coarser grid. Training "
    "sequences are drawn fresh from the training digits; the test sequences show digit images training never saw. "
    "The test MSE per pixel is compared with copying the last frame read, blank frames, and the mean frame read.",
    defaults=DEFAULTS, steps=2000, prepare=prepare,
    task_flags=(Flag("cell", str, "the convolutional cell", choices=tuple(CELL_FACTORIES)),
                Flag("layers", positive(int), "stacked recurrent layers"),
                Flag("hidden", positive(int), "channels of each layer's state"),
                Flag("kernel", positive(int), "the side of the convolutions' square window"),
                Flag("patch", positive(int), "the side of the square patches each grid position reads", "task")),
    model=())._replace(run_files=RUN_FILES)
