"""The ``rnnjax`` command line (the only module that reads argv).

    rnnjax train charlm [--text FILE] [--cell lstm] [--layers 1] [--hidden 256] [--minutes M | --steps N]
                        [--out DIR] [--resume | --overwrite] ...
    rnnjax train g2p|classify|digits|forecast|anomaly|adding|copy|textclass|tag|music
                 [--steps N | --minutes M] [--out DIR] ...
    rnnjax eval --checkpoint DIR [--text FILE]
    rnnjax generate --checkpoint DIR [--prompt "ROMEO:"] [--length 500] [--temperature 0.8] [--midi FILE] [WORD ...]
    rnnjax g2p --checkpoint DIR WORD ... [--nbest N] [--beam K] [--heatmap PNG] [--eval dev|test]
    rnnjax info

Every ``train TASK`` is a recipe (``rnnjax/recipes/``): this module builds its parser from the recipe's
flags and the flags every run shares (budget, evaluation, output, populations and devices), and
hands the parsed values to :func:`rnnjax.engine.train`, which shows a progress bar, evaluates a few
times, and writes into ``--out``: ``config.json``, ``metrics.jsonl`` (one JSON object per
evaluation), ``loss.png``, the task's own files and ``checkpoints/`` (Orbax; the latest and the
best). Ctrl-C (or SIGTERM) saves a checkpoint and exits; ``--resume`` continues exactly where the last checkpoint
left off. ``eval`` and ``generate`` read the task from the run's ``config.json``; ``g2p`` pronounces
words with a g2p model (greedy or beam search, N-best, an attention heat map) or scores a split.

Bad input (a missing, empty, binary or non-UTF-8 text, a text shorter than
one batch, an unknown cell, a prompt with characters the model does not
know, a missing, damaged or foreign checkpoint, an existing run directory
without ``--resume`` or ``--overwrite``) prints one line and exits with
status 2, before anything is written.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from rnnjax import engine, recipes
from rnnjax.engine import UsageError
from rnnjax.recipes.flags import non_negative_float, non_negative_int, positive

_IMPORTED = time.perf_counter()
_CALLS = 0
SHARED = ("out", "resume", "overwrite", "steps", "minutes", "no_plot", "devices", "start_time")


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


# ----------------------------------------------------------------------------
# Parsers


def _add_flag(group, flag, default) -> None:
    """One :class:`rnnjax.recipes.flags.Flag` as an argparse argument (``None``: not given)."""
    name = "--" + flag.dest.replace("_", "-")
    shown = "on" if default is True else "off" if default is False else default
    plain = "default" in flag.help or default is None
    text = flag.help if plain else f"{flag.help} (default: {shown})"
    if flag.kind == "off":
        group.add_argument(f"--no-{name[2:]}", dest=flag.dest, action="store_const", const=False,
                           help=f"do not {flag.help}")
    elif flag.kind == "bool":
        group.add_argument(name, action="store_const", const=True, help=text)
        if default:
            group.add_argument(f"--no-{name[2:]}", dest=flag.dest, action="store_const", const=False,
                               help=f"do not {flag.help[0].lower() + flag.help[1:]}")
    else:
        group.add_argument(name, type=flag.kind, choices=flag.choices, metavar=flag.metavar, help=text)


def _budget_flags(g, recipe) -> None:
    steps, minutes = recipe.budget.get("steps"), recipe.budget.get("minutes")
    budget = g.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=positive(float), default=None,
                        help="wall-clock budget from the command's start to the final validation loss and checkpoint, "
                             "compilation and evaluation included, summed over resumed sessions"
                             + (f" (default {minutes:g} unless --steps)" if minutes else "")
                             + "; the learning-rate schedule is fitted to it")
    budget.add_argument("--steps", type=positive(int), default=None,
                        help="train for exactly this many steps" + (f" (default: {steps})" if steps else ""))
    evals = {**engine.OPTIONS, **recipe.options}["evals"]
    g.add_argument("--evals", type=positive(int), default=None,
                   help=f"validation evaluations, evenly spaced, the last at the end (default: {evals})")
    g.add_argument("--patience", type=positive(int), default=None,
                   help="early stopping: stop after this many evaluations without improvement (default: off)")
    g.add_argument("--min-delta", type=non_negative_float, default=None,
                   help="early stopping: the improvement of the validation loss that counts (default: 0)")


def _output_flags(g, recipe) -> None:
    g.add_argument("--out", default=f"runs/{recipe.name}", metavar="DIR",
                   help=f"run directory: checkpoints, {', '.join(recipe.run_files)} (default: %(default)s)")
    again = g.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    again.add_argument("--overwrite", action="store_true",
                       help="start afresh in an existing --out (deletes its checkpoints, metrics and plots)")
    every = {**engine.OPTIONS, **recipe.options}["save_every_minutes"]
    g.add_argument("--save-every-steps", type=positive(int), default=None,
                   help="also save a checkpoint every N steps (checkpoints are saved at every evaluation, at the "
                        "end and on Ctrl-C)")
    g.add_argument("--save-every-minutes", type=positive(float), default=None,
                   help="also save a checkpoint every M minutes" + (f" (default: {every:g})" if every else ""))
    g.add_argument("--no-plot", action="store_true", help="write no plots")


def _population_flags(p) -> None:
    g = p.add_argument_group("populations and devices")
    g.add_argument("--population", type=positive(int), default=None, metavar="N",
                   help="train N models at once in one compiled step: member i starts from --seed + i and takes "
                        "the i-th value of --lr and --weight-decay when they are comma-separated lists (a list "
                        "alone sets N); all read the same batches; the best by validation loss is kept")
    g.add_argument("--devices", type=positive(int), default=None, metavar="N",
                   help="data-parallel over N local devices, each batch split between them (default: as many as "
                        "divide the batch: all of a TPU's cores, 1 on a CPU)")


def _train_parser(sub, recipe) -> argparse.ArgumentParser:
    p = sub.add_parser(recipe.name, help=recipe.help, description=recipe.description)
    groups = {None: p}
    for title in ("task", "model", "optimisation"):
        if any(f.group == title for f in recipe.flags):
            groups[title] = p.add_argument_group(title)
    groups["budget"] = p.add_argument_group("budget and evaluation")
    _budget_flags(groups["budget"], recipe)
    groups["output"] = p.add_argument_group("output")
    _output_flags(groups["output"], recipe)
    defaults = {**recipe.defaults, **recipe.options}
    for flag in recipe.flags:
        _add_flag(groups[flag.group], flag, defaults.get(flag.dest))
    _population_flags(p)
    p.set_defaults(run=train_command, recipe=recipe)
    return p


def _checkpoint_args(p) -> None:
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="a run directory written by `rnnjax train`")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--step", type=non_negative_int, default=None, help="use the checkpoint of this step")
    which.add_argument("--latest", action="store_true",
                       help="use the latest checkpoint (default: the best, by validation loss)")


def _decoding_args(p) -> None:
    p.add_argument("--beam", type=positive(int), default=None,
                   help="g2p: beam width (default: 1, greedy; --nbest N uses max(N, 5))")
    p.add_argument("--nbest", type=positive(int), default=1, help="g2p: print the N best pronunciations")
    p.add_argument("--length-penalty", type=non_negative_float, default=0.0,
                   help="g2p: beam scores are log p / length ** this (default: 0, the plain log-probability)")


def _generate_parser(commands) -> None:
    from rnnjax.recipes.charlm import OPTIONS, sampling_flags

    gen = commands.add_parser("generate", help="sample from a trained model: continue text, pronounce words, or "
                                               "compose music",
                              description="Continue a prompt with a model trained by `rnnjax train charlm`, "
                                          "pronounce WORDs with one trained by `rnnjax train g2p`, or sample a piece "
                                          "with one trained by `rnnjax train music` (a MIDI file and its piano roll "
                                          "as a PNG).")
    _checkpoint_args(gen)
    gen.add_argument("words", nargs="*", metavar="WORD", help="g2p: words to pronounce")
    gen.add_argument("--prompt", default=None, help="text to continue (default: the run's prompt)")
    gen.add_argument("--length", type=non_negative_int, default=None,
                     help=f"characters to generate (default: {OPTIONS['sample_length']}); music: steps (default: "
                          "64)")
    gen.add_argument("--midi", metavar="FILE", default=None,
                     help="music: the MIDI file to write (default: generated.mid in the run directory); the piano "
                          "roll goes beside it as a PNG")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    for flag in sampling_flags(None, option=False):
        _add_flag(gen, flag, OPTIONS[flag.dest])
    _decoding_args(gen)
    gen.set_defaults(run=generate_command, temperature=OPTIONS["temperature"])


def _eval_parser(commands) -> None:
    ev = commands.add_parser("eval", help="evaluate a trained model",
                             description="Evaluate a checkpoint of any `rnnjax train` run. A character model: its loss "
                                         "in nats per character on its validation part (the last 10% of its text), or "
                                         "on all of --text. Other tasks: the validation metrics and, where the task "
                                         "has them, the test metrics, as one JSON line.")
    _checkpoint_args(ev)
    ev.add_argument("--text", metavar="FILE", help="charlm: evaluate on all of this UTF-8 file instead")
    ev.add_argument("--window", type=positive(int), default=None, metavar="N",
                    help="charlm: read the text as separate windows of N characters, each from a fresh state (how "
                         "window-based models such as transformers are scored); default: one long read with the "
                         "state carried")
    ev.set_defaults(run=eval_command)


def _g2p_parser(commands) -> None:
    p = commands.add_parser(
        "g2p", help="pronounce words with a trained g2p model",
        description="Print the phonemes of each WORD (greedy, or the --nbest best of a beam search with their "
                    "log-probabilities), or score a whole split of the dictionary with --eval.")
    _checkpoint_args(p)
    p.add_argument("words", nargs="*", metavar="WORD", help="words to pronounce")
    _decoding_args(p)
    p.add_argument("--eval", choices=("dev", "test"), default=None,
                   help="score every word of this split: phoneme and word error rates")
    p.add_argument("--heatmap", metavar="PNG", default=None,
                   help="write the attention weights of the first WORD's best pronunciation as a heat map")
    p.set_defaults(run=g2p_command)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rnnjax", description="Recurrent sequence models in JAX.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    train = commands.add_parser("train", help="train a model", description="Train a model.")
    tasks = train.add_subparsers(dest="task", metavar="TASK", required=True)
    for name in recipes.NAMES:
        _train_parser(tasks, recipes.get(name))
    _generate_parser(commands)
    _eval_parser(commands)
    _g2p_parser(commands)
    info = commands.add_parser("info", help="versions, the CPU, and which backend runs which cell here",
                               description="Versions, the CPU model and flags, whether the native kernels loaded, "
                                           "and which backend unroll's 'auto' picks for each cell and dtype.")
    info.set_defaults(run=info_command)
    return parser


# ----------------------------------------------------------------------------
# Commands


def train_command(args) -> int:
    recipe = args.recipe
    names = [f.dest for f in recipe.flags] + list(engine.OPTIONS) + ["population"]
    given = {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}
    return engine.train(recipe, given, {k: getattr(args, k) for k in SHARED}).status


def _run_recipe(args, cmd: str):
    """The recipe and ``config.json`` of the run in ``--checkpoint`` (a run of `rnnjax train charlm`
    written before runs named their task counts as one)."""
    config = engine.read_config(Path(args.checkpoint).expanduser())
    task = (config or {}).get("task", "charlm")
    if task not in recipes.NAMES:
        raise UsageError(f"{cmd}: {args.checkpoint!r} is a run of an unknown task {task!r}; expected one of "
                         f"{', '.join(recipes.NAMES)}. Fix: point --checkpoint at a run of `rnnjax train`.")
    return recipes.get(task), config


def eval_command(args) -> int:
    from rnnjax.recipes.common import evaluate_run

    recipe, config = _run_recipe(args, "rnnjax eval")
    if recipe.evaluate is not None:
        return recipe.evaluate(args, config)
    return evaluate_run(recipe, args, config)


def generate_command(args) -> int:
    recipe, config = _run_recipe(args, "rnnjax generate")
    if recipe.generate is None:
        raise UsageError(f"rnnjax generate: {args.checkpoint!r} is a run of `rnnjax train {recipe.name}`, which "
                         "generates nothing. Fix: use rnnjax eval on it, or point at a charlm, g2p or music run.")
    return recipe.generate(args, config or {})


def g2p_command(args) -> int:
    from rnnjax.recipes import g2p

    return g2p.pronounce(args)


def info_command(args) -> int:
    from rnnjax import info

    print(info.report())
    return 0


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
    except engine.RunError as e:
        print(f"rnnjax: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("rnnjax: interrupted", file=sys.stderr)
        return 130


def _quiet_libraries():
    import logging
    import warnings

    logging.getLogger("absl").setLevel(logging.CRITICAL)  # Orbax logs every save, and internals on errors
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # Orbax's abandoned writes after a failed save
    warnings.filterwarnings("ignore", module="orbax")
