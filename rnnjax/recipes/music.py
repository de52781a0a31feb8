"""``rnnjax train music``: polyphonic music as a piano roll (by default Bach's chorales from music21's
bundled corpus, the pieces of the JSB benchmark), each step a multi-label Bernoulli over the pitch
range given the steps before it; scored in nats per step against two baselines (independent per-pitch
frequencies, and "repeat the previous step" smoothed towards them). ``rnnjax generate`` samples a
piece and writes it as MIDI and as a piano-roll PNG."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rnnjax import data, engine, models
from rnnjax.engine import UsageError
from rnnjax.recipes import common
from rnnjax.recipes.flags import Flag, positive

# Defaults measured on the 2-core CPU this project is developed on (docs/guides/tasks.md, Music).
DEFAULTS = {**common.TASK_DEFAULTS, "data": None, "step": 1.0, "cell": "gru", "hidden": 128, "batch": 16,
            "dropout": 0.2, "weight_decay": 0.01}
SPLIT_SEED = 0  # the pieces' split never moves with --seed: every run is scored on the same test pieces
FRACTIONS = (0.6, 0.2, 0.2)  # train, validation, test: the proportions of the JSB benchmark's 229/76/77
BUCKET = 32  # training batches are cut to the longest piece in them, rounded up to this many steps
SMOOTHING = np.r_[np.geomspace(1e-4, 0.5, 40), 0.6, 0.7, 0.8, 0.9, 1.0]  # the repeat baseline's choices
SAMPLE_STEPS = 64  # what a finished run samples into sample.mid, and `rnnjax generate`'s default --length
RUN_FILES = (*common.RUN_FILES, "prediction.png", "sample.mid", "sample.png")


# ----------------------------------------------------------------------------
# Data


class Pieces(NamedTuple):
    """The rolls of the training, validation and test pieces (``[T_i, P]`` each, column ``j`` the MIDI
    pitch ``lowest + j``) and where they came from."""

    train: list
    val: list
    test: list
    lowest: int
    source: str

    @property
    def pitches(self) -> int:
        return self.train[0].shape[1]


def split_pieces(n: int, seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices of the training, validation and test pieces: a seeded shuffle cut by :data:`FRACTIONS`."""
    if n < 3:
        raise ValueError(f"rnnjax.recipes.music.split_pieces: the data has {n} piece(s); expected at least 3 (one "
                         "each for training, validation and test). Fix: add more score files.")
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, round(n * FRACTIONS[1]))
    n_test = max(1, round(n * FRACTIONS[2]))
    cut = n - n_val - n_test
    return np.sort(order[:cut]), np.sort(order[cut:cut + n_val]), np.sort(order[cut + n_val:])


def _load(s: dict, cmd: str) -> Pieces:
    from rnnjax.data import music

    try:
        d = music.load_folder(s["data"], s["step"]) if s["data"] else music.load_chorales(s["step"])
        lo, hi = music.pitch_range(d["rolls"])
        parts = split_pieces(len(d["rolls"]))
    except ImportError as e:
        raise UsageError(str(e)) from None
    except ValueError as e:
        raise UsageError(f"{cmd}: {e}") from None
    rolls = [r[:, lo:hi + 1].astype(np.float32) for r in d["rolls"]]
    source = s["data"] or "Bach chorales (music21)"
    return Pieces(*([rolls[i] for i in idx] for idx in parts), lowest=lo, source=source)


def sequences(rolls: list) -> dict:
    """Inputs and targets of a model that predicts every step from the ones before: ``y`` the rolls,
    ``x`` the rolls one step late behind an all-silent start frame, padded, with ``lengths``."""
    y, lengths = data.pad_sequences(rolls)
    x = np.concatenate([np.zeros_like(y[:, :1]), y[:, :-1]], axis=1)
    return {"x": x, "y": y, "lengths": lengths}


class Trimmed(data.BatchesView):
    """Training batches cut to their longest piece, rounded up to :data:`BUCKET` steps (a few
    compiled shapes, not one per length; the padding is masked by ``lengths``)."""

    def __next__(self) -> dict:
        b = next(self.batches)
        T = min(b["x"].shape[1], -(-int(b["lengths"].max()) // BUCKET) * BUCKET)
        return {**b, "x": b["x"][:, :T], "y": b["y"][:, :T]}


# ----------------------------------------------------------------------------
# The baselines (NumPy)


def frequencies(rolls: list) -> np.ndarray:
    """Each pitch's chance to sound at a step, from ``rolls``: ``(count + 1/2) / (steps + 1)`` (the
    Krichevsky-Trofimov estimate, so a pitch never heard keeps a finite loss)."""
    on = np.concatenate(rolls)
    return (on.sum(axis=0, dtype=np.float64) + 0.5) / (len(on) + 1.0)


def bernoulli_nll(probs: np.ndarray, roll: np.ndarray) -> float:
    """``-sum log p(roll)`` in nats of independent Bernoullis ``probs`` (``[T, P]`` or ``[P]``)."""
    p = np.broadcast_to(np.asarray(probs, np.float64), roll.shape)
    return float(-np.sum(np.where(roll > 0, np.log(p), np.log1p(-p))))


def repeat_probs(roll: np.ndarray, freq: np.ndarray, smoothing: float) -> np.ndarray:
    """"Repeat the previous step", smoothed: ``p_t = (1 - smoothing) * roll[t - 1] + smoothing * freq``
    (before the first step: silence)."""
    prev = np.concatenate([np.zeros((1, roll.shape[1])), roll[:-1]])  # float64
    return (1.0 - smoothing) * prev + smoothing * freq


def nats_per_step(probs_of, rolls: list) -> float:
    """The mean over all steps of ``rolls`` of the NLL (summed over pitches) of ``probs_of(roll)``."""
    return sum(bernoulli_nll(probs_of(r), r) for r in rolls) / sum(len(r) for r in rolls)


def baselines(p: Pieces) -> dict:
    """Both baselines fitted on the training pieces (the smoothing chosen on validation) and their test
    NLL in nats per step."""
    freq = frequencies(p.train)
    val = [nats_per_step(lambda r, a=a: repeat_probs(r, freq, a), p.val) for a in SMOOTHING]
    a = float(SMOOTHING[int(np.argmin(val))])
    return {"frequency_nll": nats_per_step(lambda r: freq, p.test),
            "repeat_nll": nats_per_step(lambda r: repeat_probs(r, freq, a), p.test), "repeat_smoothing": a}


# ----------------------------------------------------------------------------
# The model


def build_model(s: dict, pitches: int, cmd: str):
    """One output per pitch and step (a logit), reading the previous step's roll: causal, so never
    bidirectional."""
    return common.model_or_usage(cmd, lambda: models.tagger(
        pitches, input_size=pitches, cell=s["cell"], layers=s["layers"], hidden=s["hidden"], dropout=s["dropout"]))


def step_nll(logits, y):
    """The NLL in nats of each step's roll ``y [..., T, P]`` under independent Bernoullis ``sigmoid(logits)``,
    summed over pitches: ``[..., T]``."""
    z = logits.astype(jnp.float32)
    return jnp.sum(jax.nn.softplus(z) - y * z, axis=-1)


def _nll_sums(model):
    @jax.jit
    def per_example(params, batch):
        T = batch["y"].shape[-2]
        mask = jnp.arange(T) < batch["lengths"][:, None]
        logits = model.apply(params, batch["x"], lengths=batch["lengths"])
        return {"nll": jnp.sum(jnp.where(mask, step_nll(logits, batch["y"]), 0.0), axis=-1),
                "steps": batch["lengths"].astype(jnp.float32)}

    return per_example


def _loss(model):
    def loss_fn(params, batch, key):
        T = batch["y"].shape[-2]
        mask = jnp.arange(T) < batch["lengths"][:, None]
        logits = model.apply(params, batch["x"], lengths=batch["lengths"], key=key)
        return jnp.sum(jnp.where(mask, step_nll(logits, batch["y"]), 0.0)) / jnp.sum(mask)

    return loss_fn


def sampler(model, pitches: int):
    """``sample(params, key, length, temperature) -> roll [length, P]`` (jitted): from silence, each
    step's pitches drawn independently from ``sigmoid(logit / temperature)`` (temperature 0: every
    pitch whose chance is above one half) and fed back. Each step runs the model over the steps so
    far (one compiled loop; cheap at the lengths of a chorale)."""

    @jax.jit
    def sample(params, key, length_buffer, temperature):
        length = length_buffer.shape[0]

        def body(t, buf):
            z = jax.lax.dynamic_index_in_dim(model.apply(params, buf[:-1]), t, keepdims=False)
            drawn = jax.random.bernoulli(jax.random.fold_in(key, t), jax.nn.sigmoid(z / jnp.maximum(temperature, 1e-6)))
            on = jnp.where(temperature > 0, drawn, z > 0)
            return buf.at[t + 1].set(on.astype(buf.dtype))

        return jax.lax.fori_loop(0, length, body, jnp.zeros((length + 1, pitches), jnp.float32))[1:]

    return lambda params, key, length, temperature=1.0: np.asarray(
        sample(params, key, jnp.zeros((length,), jnp.int8), jnp.float32(temperature)))


# ----------------------------------------------------------------------------
# Plots and files


def _pitch_ticks(ax, lowest: int, pitches: int) -> None:
    cs = [p for p in range(lowest, lowest + pitches) if p % 12 == 0]
    ax.set_yticks([p - lowest for p in cs], [f"C{p // 12 - 1}" for p in cs], fontsize=8)


def plot_rolls(panels: list, lowest: int, path: Path, title: str, step: float) -> None:
    """Piano rolls ``[(label, array [T, P])]`` one above the other (time across, pitch up), as a PNG."""
    plt = engine.pyplot()
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 2.6 * len(panels) + 0.4), dpi=100, squeeze=False)
    for ax, (label, roll) in zip(axes[:, 0], panels):
        ax.imshow(np.asarray(roll).T, origin="lower", aspect="auto", cmap="Greys", vmin=0, vmax=1,
                  interpolation="nearest")
        _pitch_ticks(ax, lowest, roll.shape[1])
        ax.set_ylabel(label, fontsize=9)
    axes[-1, 0].set_xlabel(f"step ({'quarter' if step == 1 else 'eighth' if step == 0.5 else f'{step:g} quarter'} "
                           f"note{'s' if step not in (1, 0.5) else ''})")
    axes[0, 0].set_title(title, fontsize=9)
    engine.save_figure(fig, path)


def write_sample(roll: np.ndarray, lowest: int, step: float, midi: Path, png: Path | None, title: str) -> None:
    """A sampled roll as MIDI (music21 writes it) and, unless ``png`` is None, as a piano-roll PNG."""
    from rnnjax.data import music

    try:
        music.write_midi(roll, lowest, midi, step)
    except ImportError as e:
        raise UsageError(str(e)) from None
    if png is not None:
        plot_rolls([("sample", roll)], lowest, png, title, step)


# ----------------------------------------------------------------------------
# train music


def _finisher(model, per_example, p: Pieces, s: dict):
    test = sequences(p.test)
    predict = jax.jit(lambda params, x: jax.nn.sigmoid(model.apply(params, x)))

    def finish(params, history, plot_dir):
        t = common.sums_over(per_example, test, params)
        r = {"test_nll": t["nll"] / t["steps"], **baselines(p), "test_pieces": len(p.test),
             "test_steps": int(t["steps"])}
        r["vs_frequency"] = r["test_nll"] / r["frequency_nll"]
        r["vs_repeat"] = r["test_nll"] / r["repeat_nll"]
        if plot_dir is not None:
            roll = p.test[0]
            probs = np.asarray(predict(params, test["x"][0, :len(roll)]))
            plot_rolls([("truth", roll), ("model", probs)], p.lowest, Path(plot_dir) / "prediction.png",
                       f"{model.name}, the first test piece and each step's predicted chances from the steps "
                       f"before: {r['test_nll']:.2f} nats/step on all test pieces", s["step"])
        return r

    return finish


def _after(plan: engine.Plan, model, p: Pieces):
    def after(outcome) -> int:
        status = common.print_test_metrics(outcome)
        roll = sampler(model, p.pitches)(outcome.params, jax.random.key(plan.settings["seed"]), SAMPLE_STEPS)
        write_sample(roll, p.lowest, plan.settings["step"], plan.out / "sample.mid",
                     None if plan.no_plot else plan.out / "sample.png", f"{model.name}: a sample of {SAMPLE_STEPS} "
                     "steps from silence (temperature 1)")
        return status

    return after


def prepare(plan: engine.Plan) -> engine.Job:
    s, cmd = plan.settings, plan.cmd
    build_model(s, 2, cmd)  # a bad --cell fails before the data is read
    p = _load(s, cmd)
    saved = (plan.saved or {}).get("lowest_pitch"), (plan.saved or {}).get("pitches")
    if plan.saved and saved != (p.lowest, p.pitches):
        raise UsageError(f"{cmd}: the run's pieces had pitches {saved[0]}..{saved[0] + saved[1] - 1} (MIDI), the "
                         f"data read now {p.lowest}..{p.lowest + p.pitches - 1}: the data changed since the run "
                         "started. Fix: restore it, or start a new run in another --out.")
    model = build_model(s, p.pitches, cmd)
    per_example, val = _nll_sums(model), sequences(p.val)

    def evaluate(params):
        t = common.sums_over(per_example, val, params)
        return {"val_loss": t["nll"] / t["steps"]}

    n_steps = [sum(len(r) for r in part) for part in (p.train, p.val, p.test)]
    step = {1.0: "quarter note", 0.5: "eighth note"}.get(s["step"], f"{s['step']:g} quarter notes")
    return engine.Job(
        model_name=model.name, init=model.init, loss_fn=_loss(model),
        batches=Trimmed(data.ExampleBatches(sequences(p.train), s["batch"], seed=s["seed"])), evaluate=evaluate,
        finish=_finisher(model, per_example, p, s), after=_after(plan, model, p),
        config={"lowest_pitch": p.lowest, "pitches": p.pitches},
        meta={"lowest_pitch": p.lowest, "pitches": p.pitches},
        describe=f"{p.source}: {len(p.train)} train / {len(p.val)} validation / {len(p.test)} test pieces "
                 f"({n_steps[0]:,} / {n_steps[1]:,} / {n_steps[2]:,} steps of a {step}), {p.pitches} pitches "
                 f"(MIDI {p.lowest}-{p.lowest + p.pitches - 1}); batch {s['batch']} (padded, masked by lengths)",
        metric_unit="nats/step", files=("metrics.jsonl", "loss.png", "prediction.png", "sample.mid", "sample.png"),
        tokens_per_step=s["batch"], plot_title=f"{model.name}: {cmd}")


# ----------------------------------------------------------------------------
# generate


def generate(args, config: dict) -> int:
    """``rnnjax generate`` on a music run: ``--length`` steps sampled from silence, written as MIDI
    (``--midi``, default ``RUN/generated.mid``) and as a piano-roll PNG beside it."""
    cmd = "rnnjax generate"
    for flag, given in (("prompt", args.prompt), ("top-k", args.top_k), ("top-p", args.top_p)):
        if given is not None:
            raise UsageError(f"{cmd}: --{flag} is for a character model, and {args.checkpoint!r} is a music run, "
                             "which samples each pitch on or off. Fix: drop --" + flag + ".")
    if args.words:
        raise UsageError(f"{cmd}: a music model samples from silence and takes no WORDs, got {args.words!r}. Fix: "
                         "drop them.")
    s, lowest, pitches = config["settings"], config["lowest_pitch"], config["pitches"]
    model = build_model(s, pitches, cmd)
    params, _, step = engine.load_params(args.checkpoint, engine.which_checkpoint(args), model.init, cmd)
    length = args.length if args.length is not None else SAMPLE_STEPS
    if not length:
        raise UsageError(f"{cmd}: --length 0 samples nothing. Fix: pass a number of steps, e.g. --length 64.")
    roll = sampler(model, pitches)(params, jax.random.key(args.seed), length, args.temperature)
    midi = Path(args.midi).expanduser() if args.midi else Path(args.checkpoint).expanduser() / "generated.mid"
    png = midi.with_suffix(".png")
    write_sample(roll, lowest, s["step"], midi, png, f"{model.name} (step {step}): {length} steps sampled from "
                 f"silence, seed {args.seed}, temperature {args.temperature:g}")
    notes = int(np.sum(np.diff(np.pad(roll, ((1, 0), (0, 0))), axis=0) > 0))
    print(f"rnnjax: {length} steps, {notes} notes: {str(midi)!r} and {str(png)!r}", file=sys.stderr)
    return 0


RECIPE = common.task_recipe(
    "music", "polyphonic music as a piano roll (Bach chorales)",
    "Train a recurrent model of polyphonic music: each step of a piano roll (quarter notes by default) is a set of "
    "independent on/off chances, one per pitch of the data's range, given the steps before it (the multi-label "
    "Bernoulli of the JSB chorale benchmark). By default the pieces are Bach's four-part chorales from music21's "
    "bundled corpus (parsed once, then cached in ~/.cache/rnnjax); --data reads a folder of MusicXML or MIDI files "
    "instead. A fixed seed splits the pieces 60/20/20 into training, validation and test. The test loss, in nats "
    "per step, is compared with independent per-pitch frequencies and with repeating the previous step (smoothed "
    "towards the frequencies, the smoothing chosen on validation).",
    defaults=DEFAULTS, steps=2000, prepare=prepare,
    task_flags=(Flag("data", str, "a folder of score files (MusicXML, MIDI, Humdrum) to read instead of the Bach "
                                  "chorales; every part of each", "task", metavar="DIR"),
                Flag("step", positive(float), "the quantisation step in quarter notes: 1 (a quarter note, as the "
                                              "JSB benchmark) or 0.5 (an eighth)", "task")),
    model=("cell", "layers", "hidden", "dropout"))._replace(run_files=RUN_FILES, generate=generate)
