"""The training engine behind every ``rnnjax train TASK``: run directories, resume, progress,
checkpoints, ``metrics.jsonl``, plots and the final test metrics.

A recipe (``rnnjax/recipes/``: the character model, a classifier, a forecaster, ...) prepares its
data and model and describes them in a :class:`Job`; :func:`train` does the rest: it checks the run
directory, resolves the settings, options and budget (flags, else the run's own on ``--resume``,
else the recipe's defaults) into a :class:`Plan`, writes ``config.json`` and calls :func:`run`, the
one training loop. From Python::

    from rnnjax import engine, recipes
    outcome = engine.train(recipes.get("adding"), {"length": 200}, {"out": "runs/adding", "steps": 2000})

or, for a job of your own, with the run directory and its ``config.json`` made by hand::

    out, saved = check_out("runs/mine", resume=False, overwrite=False, cmd=cmd, run_files=RUN_FILES)
    write_config(out, config, overwrite=False, cmd=cmd, out_arg="runs/mine", run_files=RUN_FILES)
    outcome = run(Job(model_name="mine", init=init, loss_fn=loss_fn, batches=batches, evaluate=evaluate),
                  Plan(cmd=cmd, out=out, settings=settings, total_steps=1000, seconds=None))

The engine knows no argv (``rnnjax/cli.py`` parses it) and no task: what
differs between tasks comes in through the job's callables. Bad input is a
:class:`UsageError`, printed by the CLI as one line with exit status 2.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RUN_MARKER = "rnnjax_run"  # in every config.json written by rnnjax
LOCK = "rnnjax.lock"  # held (flock) by the run writing a directory; names its process
WARMUP = 50  # default warmup steps (a tenth of a shorter --steps run)
MAX_SKIPPED = 25  # non-finite steps in a row that stop a run
NO_HORIZON = 10 ** 9  # the schedule's horizon while a time budget has not yet fixed it
# Run options every recipe has, and their defaults: they may change when a run is resumed (when not
# given, they are the run's own).
OPTIONS = dict(evals=5, patience=None, min_delta=0.0, save_every_steps=None, save_every_minutes=None)


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit status 2."""


class RunError(Exception):
    """A run that cannot go on (e.g. the disk is full): printed as one line, exit status 1."""


# ----------------------------------------------------------------------------
# Run directories


def read_config(out: Path) -> dict | None:
    """The ``config.json`` of an rnnjax run in ``out``, or None."""
    try:
        config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) and config.get(RUN_MARKER) == 1 else None


def check_out(out_arg: str, *, resume: bool, overwrite: bool, cmd: str,
              run_files: tuple[str, ...]) -> tuple[Path, dict | None]:
    """Validates the run directory with --resume/--overwrite; returns it and, on --resume, its config.

    ``run_files``: the files a run of this task writes (besides ``checkpoints/``); ``--overwrite``
    deletes only those, and refuses a directory that holds anything else.
    """
    out = Path(out_arg).expanduser()
    if out.exists() and not out.is_dir():
        raise UsageError(f"{cmd}: --out {out_arg!r} is a file; expected a directory for the run. "
                         "Fix: choose another --out.")
    existing = sorted(p.name for p in out.iterdir() if p.name != LOCK) if out.is_dir() else []
    config = read_config(out) if existing else None
    if resume:
        if not existing:
            raise UsageError(f"{cmd}: --resume found no run in {out_arg!r} (the directory is missing or empty). "
                             "Fix: drop --resume to start a new run, or point --out at an existing run.")
        if config is None:
            raise UsageError(f"{cmd}: --resume found no rnnjax run in {out_arg!r} (no config.json written by "
                             f"`{cmd}`). Fix: point --out at a run directory.")
        if config.get("task", "charlm") != cmd.rsplit(" ", 1)[-1]:
            raise UsageError(f"{cmd}: --resume found a run of `rnnjax train {config.get('task', 'charlm')}` in "
                             f"{out_arg!r}, not of `{cmd}`. Fix: resume it with its own command, or choose "
                             "another --out.")
        return out, config
    if not existing:
        return out, None
    if not overwrite:
        what = "a run" if config is not None else "files"
        raise UsageError(f"{cmd}: --out {out_arg!r} already holds {what} ({', '.join(existing[:5])}"
                         f"{', ...' if len(existing) > 5 else ''}). Fix: pass --resume to continue it, --overwrite "
                         "to start afresh (deletes its checkpoints and metrics), or choose another --out.")
    foreign = [n for n in existing if n not in run_files + ("checkpoints",)]
    if config is None or foreign:
        raise UsageError(f"{cmd}: --overwrite only replaces an rnnjax run, and {out_arg!r} "
                         f"{'is not one (no config.json written by rnnjax)' if config is None else 'also holds'}"
                         f"{': ' + ', '.join(foreign[:5]) if foreign else ''}; nothing was deleted. "
                         "Fix: choose another --out.")
    return out, None


class RunLock:
    """An exclusive ``flock`` on ``<run>/rnnjax.lock`` while a run writes the directory; the file names
    the process. The kernel drops the lock when its process dies, however it dies, so a lock file
    left by a killed run blocks nothing."""

    def __init__(self, out: Path, cmd: str, out_arg: str):
        self.path, self.cmd, self.out_arg, self.fd = out / LOCK, cmd, out_arg, None

    def acquire(self) -> RunLock:
        """Takes the lock (a :class:`UsageError` naming the other process when a live run holds it). A
        directory where no lock file can be written is left to the checks that report it."""
        import fcntl

        while self.fd is None:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError:
                return self
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "unknown"
                os.close(fd)
                raise UsageError(f"{self.cmd}: --out {self.out_arg!r} is being written by another run (process "
                                 f"{holder}); two runs in one directory would overwrite each other's checkpoints. "
                                 "Fix: wait for it to finish or stop it, or choose another --out.") from None
            if _same_file(fd, self.path):  # not unlinked by a run that just finished
                self.fd = fd
            else:
                os.close(fd)
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"{os.getpid()}, `{self.cmd}`\n".encode())
        return self

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def clear_run(out: Path, run_files: tuple[str, ...]) -> None:
    for name in run_files:
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)


def fixed_settings(given: dict, defaults: dict, saved: dict | None, cmd: str, *,
                   same: Callable[[str, Any, Any], bool] | None = None) -> dict:
    """The fixed settings of a run: ``given`` (flags that were passed) over ``defaults``; on
    --resume the saved ones, refusing flags that contradict them. ``same(key, given, saved)``
    overrides the equality test (e.g. for paths)."""
    if saved is None:
        return {**defaults, **given}
    settings = {k: saved["settings"].get(k, v) for k, v in defaults.items()}  # a newer setting: its default
    same = same or (lambda k, a, b: a == b)
    clash = [k for k, v in given.items() if not same(k, v, settings.get(k))]
    if clash:
        shown = ", ".join(f"--{k.replace('_', '-')} {given[k]!r} (the run has {settings.get(k)!r})" for k in clash)
        raise UsageError(f"{cmd}: --resume continues a run with its own settings, and these differ: {shown}. "
                         "Fix: drop those flags, or start a new run in another --out.")
    return settings


def budget(steps: int | None, minutes: float | None, saved: dict | None,
           default_minutes: float) -> tuple[int | None, float | None]:
    """``(total_steps, seconds)``: the steps or minutes given, else the run's own on --resume, else
    ``default_minutes``."""
    if steps is not None:
        return steps, None
    if minutes is not None:
        return None, minutes * 60
    if saved:
        return saved["budget"].get("steps"), saved["budget"].get("seconds")
    return None, default_minutes * 60


def write_config(out: Path, config: dict, *, overwrite: bool, cmd: str, out_arg: str,
                 run_files: tuple[str, ...]) -> None:
    """Creates the run directory (clearing an old run with ``overwrite``) and writes ``config.json``."""
    try:
        if overwrite:
            clear_run(out, run_files)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", config)
    except OSError as e:
        raise UsageError(f"{cmd}: cannot write to --out {out_arg!r}: {e.strerror}. Fix: choose a writable "
                         "folder.") from None


def resume_point(out: Path, cmd: str) -> tuple[int, dict]:
    """The newest checkpoint of the run in ``out`` whose meta can be read, and its meta (a UsageError when
    there is none or it is unfinished). :func:`run` falls back further if its arrays cannot be read."""
    from rnnjax import checkpoint

    try:
        probe, _ = checkpoint.open_run(out, fn=f"{cmd} --resume", which="latest")
    except checkpoint.DamagedCheckpoint:
        probe = checkpoint.Checkpointer(out, read_only=True)
    except checkpoint.CheckpointError as e:
        raise UsageError(str(e)) from None
    try:
        for step in reversed(probe.steps()):
            try:
                return step, probe.read_meta(step)
            except checkpoint.DamagedCheckpoint:
                continue
            except checkpoint.CheckpointError as e:
                raise UsageError(str(e)) from None
    finally:
        probe.close()
    raise UsageError(f"{cmd} --resume: no checkpoint in {str(checkpoint.checkpoint_dir(out))!r} can be read (all are "
                     "damaged; they are left as they are). Fix: restore one from a backup, or start afresh with "
                     "--overwrite.")


def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def write_metrics(path: Path, history: list[dict]) -> None:
    """Replaces ``path`` with ``history`` (one JSON object a line) in one step: when writing fails (a
    full disk) the previous file stays whole and a :class:`RunError` says so."""
    from rnnjax.checkpoint import _why_not_written

    tmp = path.with_suffix(".jsonl.tmp")
    try:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in history), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise RunError(f"{path.name} could not be written in {str(path.parent)!r}: {_why_not_written(e)}; the "
                       "previous one is kept whole") from None


# ----------------------------------------------------------------------------
# Plots


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    """Lays out ``fig``, writes it to ``path`` and closes it (also when writing fails)."""
    plt = pyplot()
    try:
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)


def plot_history(history: list[dict], path: Path, title: str, curve: list | None = None, *,
                 ylabel: str = "loss (nats/char)") -> None:
    """The training loss (``curve``: ``[step, mean loss]`` pairs) and the validation loss of each
    evaluation against steps, as a PNG."""
    import numpy as np

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    if curve:
        k = max(1, len(curve) // 100)  # smooth to ~100 points
        steps = [p[0] for p in curve][k - 1:]
        smooth = np.convolve([p[1] for p in curve], np.ones(k) / k, mode="valid")
        ax.plot(steps, smooth, "-", label=f"train (mean of {10 * k} steps)", color="tab:blue", lw=1)
    else:
        train = [(r["step"], r["train_loss"]) for r in history if r.get("train_loss") is not None]
        if train:
            ax.plot(*zip(*train), "o-", label="train (mean since the previous evaluation)", color="tab:blue", ms=3)
    ax.plot([r["step"] for r in history], [r["val_loss"] for r in history], "o-", label="validation",
            color="tab:orange", ms=4)
    values = sorted(r["val_loss"] for r in history)
    if len(values) >= 3:  # keep the early, high losses from squashing the part that matters
        low = min(values[0], min(v for _, v in curve) if curve else values[0])
        if low > 0 and values[-1] > 20 * low:  # orders of magnitude (a regression loss): a log axis
            ax.set_yscale("log")
        else:
            scale = min(1.0, abs(values[-2]))  # margins of 0.05 and 0.25 for losses around 1 or more
            ax.set_ylim(low - 0.05 * scale, values[-2] + 0.25 * scale)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    last = history[-1]
    ax.annotate(f"{last['val_loss']:.3f} at {last['elapsed_s'] / 60:.1f} min", (last["step"], last["val_loss"]),
                textcoords="offset points", xytext=(-10, 12), ha="right", fontsize=9)
    save_figure(fig, path)


# ----------------------------------------------------------------------------
# Devices and populations

MEMBER_SETTINGS = ("lr", "weight_decay")  # settings a population's members may each have their own of


def device_count(requested: int | None, batch_size: int, cmd: str, *, population: int | None = None) -> int:
    """The local devices a run trains on, data-parallel: ``requested`` (``--devices``), checked, or by
    default as many as divide ``batch_size`` (all of them when they do; 1 on a plain CPU). A
    population runs on one device."""
    import jax

    available = jax.local_device_count()
    platform = jax.local_devices()[0].platform
    if population and population > 1:
        if requested not in (None, 1):
            raise UsageError(f"{cmd}: --population {population} trains its members on one device; got --devices "
                             f"{requested}. Fix: drop --devices, or train one model (no --population) on "
                             f"{requested} devices.")
        return 1
    if requested is None:
        return max(d for d in range(1, available + 1) if batch_size % d == 0)
    if requested > available:
        raise UsageError(f"{cmd}: --devices {requested}, but only {available} {platform} device"
                         f"{'s are' if available > 1 else ' is'} visible. Fix: pass --devices {available} or "
                         "fewer (on a CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N simulates N "
                         "devices).")
    if batch_size % requested:
        raise UsageError(f"{cmd}: --devices {requested} must divide the batch size {batch_size} (each device "
                         f"reads an equal part of every batch). Fix: pass a --batch that is a multiple of "
                         f"{requested}, or another --devices.")
    return requested


def population_members(settings: dict, population: int | None, cmd: str) -> list[dict]:
    """The settings of each member of a population: member ``i`` has ``seed + i`` (its initial
    parameters and dropout) and the ``i``-th value of every list in :data:`MEMBER_SETTINGS`
    (a single value is every member's). Without ``population``, the longest list sets the count.
    All members read the same batches (those of ``seed``)."""
    lists = {k: list(settings[k]) for k in MEMBER_SETTINGS if isinstance(settings.get(k), (list, tuple))}
    lengths = {len(v) for v in lists.values()} - {1}
    if population is None and len(lengths) > 1:
        shown = " and ".join(f"--{k.replace('_', '-')} {len(v)}" for k, v in lists.items())
        raise UsageError(f"{cmd}: the lists of member settings differ in length ({shown} values); expected one "
                         "value per member in each. Fix: give them the same number of values (or one value for "
                         "all members).")
    n = population or max((len(v) for v in lists.values()), default=1)
    for k, v in lists.items():
        if len(v) not in (1, n):
            raise UsageError(f"{cmd}: --{k.replace('_', '-')} has {len(v)} values ({','.join(map(str, v))}) for a "
                             f"population of {n}; expected one value, or one per member. Fix: give --"
                             f"{k.replace('_', '-')} {n} comma-separated values, or --population {len(v)}.")
    return [{**settings, **{k: v[i % len(v)] for k, v in lists.items()}, "seed": settings["seed"] + i}
            for i in range(n)]


def _best_member(values) -> int:
    import numpy as np

    v = np.asarray(values, dtype=np.float64)
    return int(np.argmin(np.where(np.isfinite(v), v, np.inf)))


def _population_evaluate(evaluate: Callable, n: int) -> Callable:
    """``evaluate`` of one model run on every member: the best member's metrics, plus ``member``
    (its index) and ``member_val_loss`` (every member's)."""
    from rnnjax import train

    def run(params):
        results = [evaluate(train.member(params, i)) for i in range(n)]
        losses = [float(r["val_loss"] if isinstance(r, dict) else r) for r in results]
        best = _best_member(losses)
        chosen = dict(results[best]) if isinstance(results[best], dict) else {}
        return {**chosen, "val_loss": losses[best], "member": best, "member_val_loss": losses}

    return run


def _print_members(members: list[dict], history: list[dict], kept: int) -> None:
    """The closing table of a population: each member's settings and validation losses."""
    import numpy as np

    evals = [r["member_val_loss"] for r in history if "member_val_loss" in r]
    print("rnnjax: population (validation loss of each member; * the member kept):", file=sys.stderr)
    print(f"  {'member':>6} {'seed':>6} {'lr':>10} {'weight decay':>12} {'best':>10} {'last':>10}", file=sys.stderr)
    for i, m in enumerate(members):
        mine = [e[i] for e in evals]
        best = f"{np.nanmin(mine):.4f}" if mine and np.isfinite(mine).any() else "-"
        last = f"{mine[-1]:.4f}" if mine else "-"
        print(f"  {i:>5}{'*' if i == kept else ' '} {m['seed']:>6} {m['lr']:>10.3g} {m['weight_decay']:>12.3g} "
              f"{best:>10} {last:>10}", file=sys.stderr)


# ----------------------------------------------------------------------------
# Ctrl-C and SIGTERM


class Interrupt:
    """First Ctrl-C (SIGINT) or SIGTERM (what SLURM, Kubernetes and ``kill`` send): ask the loop to save
    and stop; ``signal_name`` says which came. A second one: the usual KeyboardInterrupt."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self.signal_name = None
        self.previous = {}

    def __enter__(self):
        for sig in self.SIGNALS:
            try:
                self.previous[sig] = signal.signal(sig, self.handle)
            except ValueError:  # not the main thread: no handler
                pass
        return self

    def handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        what = ("", "Ctrl-C") if signum == signal.SIGINT else (f"{self.signal_name} received: ", self.signal_name)
        print(f"\nrnnjax: {what[0]}stopping after this step and saving a checkpoint ({what[1]} again to quit at "
              "once)", file=sys.stderr)

    def __exit__(self, *exc):
        for sig, previous in self.previous.items():
            if previous is not None:
                signal.signal(sig, previous)


# ----------------------------------------------------------------------------
# What a recipe says, and how the run goes


@dataclass
class Job:
    """What a recipe hands the engine for one training run.

    Attributes:
      model_name: e.g. ``"lstm-1x128"``.
      init: ``key -> params``.
      loss_fn: ``(params, batch, key) -> loss`` (or with ``initial_carry``: ``(params, batch, key, carry) ->
        (loss, carry)``).
      batches: an iterator of batches with a settable ``position`` (the step it yields next).
      evaluate: ``params -> val_loss`` or a dict with ``val_loss`` and more validation metrics.
      initial_carry: ``params -> carry`` for truncated BPTT (the carry is threaded through the steps).
      meta: JSON-able data stored in every checkpoint (model settings, vocabulary, ...).
      config: JSON-able data a new run adds to its ``config.json`` (what ``--resume`` checks against).
      describe: what the start line says after the model (data, batch shape).
      tokens_per_step, unit: throughput shown as ``unit``/s (``"characters"``, ``"sequences"``).
      metric_unit: the unit of the validation loss in messages (``"nats/char"``, ``"MSE"``).
      val_name: what messages call the validation part (``"validation"``, ``"dev"``).
      eval_text: ``(record, state) -> str``: extra lines printed after each evaluation (e.g. a sample).
      finish: ``(params, history, plot_dir) -> dict`` of test metrics (``plot_dir``: where plots go, None
        for none), run on the best checkpoint's parameters after training; the dict is appended to
        ``metrics.jsonl`` with ``"split": "test"``.
      files: what the closing line lists as written into the run directory.
      plot_title: the title of ``loss.png``.
      after: ``outcome -> status``: what follows a finished run (a sample, the test metrics printed).
    """

    model_name: str
    init: Callable
    loss_fn: Callable
    batches: Any
    evaluate: Callable
    initial_carry: Callable | None = None
    meta: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    describe: str = ""
    tokens_per_step: int = 1
    unit: str = "sequences"
    metric_unit: str = ""
    val_name: str = "validation"
    eval_text: Callable | None = None
    finish: Callable | None = None
    files: tuple[str, ...] = ("metrics.jsonl", "loss.png")
    plot_title: str = ""
    after: Callable | None = None


@dataclass
class Plan:
    """How a run goes: what :func:`train` resolved from the flags, the run's ``config.json`` and the
    recipe's defaults (a recipe's ``prepare`` reads it; :func:`run` follows it).

    Attributes:
      cmd: the command, for messages (``"rnnjax train classify"``).
      out: the run directory.
      settings: the fixed settings: the recipe's, and ``lr`` (a list: one per population member),
        ``warmup`` (None: default), ``end_lr``, ``weight_decay`` (maybe a list), ``clip``,
        ``accumulate`` and ``seed``.
      total_steps, seconds: the budget (one of them, or both).
      options: the run options (:data:`OPTIONS` and the recipe's own): may change on ``--resume``.
      saved: the run's ``config.json`` on ``--resume`` (None: a new run).
      given: the fixed settings given as flags.
      resume_step, progress: the checkpoint to resume from and its saved progress (None: a new run).
      rest_of_time: on resume, ``seconds`` is the run's whole budget: go on with what is left of it.
      no_plot, start_time: as the CLI flags of the same names (``start_time``: the command's start).
      devices: data-parallel over this many local devices (:func:`device_count`), batches split
        along their first axis; 1: no mesh.
      population: train this many models at once (:func:`population_members`). None or 1: one model.
    """

    cmd: str
    out: Path
    settings: dict
    total_steps: int | None
    seconds: float | None
    options: dict = field(default_factory=dict)
    saved: dict | None = None
    given: dict = field(default_factory=dict)
    resume_step: int | None = None
    progress: dict | None = None
    rest_of_time: bool = False
    no_plot: bool = False
    start_time: float | None = None
    devices: int = 1
    population: int | None = None

    def option(self, name: str):
        return self.options[name] if self.options.get(name) is not None else OPTIONS.get(name)


@dataclass
class Outcome:
    """What :func:`run` ends with: the exit status, the fit result, the sampling key, the test metrics
    and the trained parameters (a population's: its kept member's)."""

    status: int
    result: Any
    sample_key: Any
    test_metrics: dict | None = None
    params: Any = None


# ----------------------------------------------------------------------------
# The run, piece by piece


@dataclass
class _Setup:
    """The compiled step and the state it starts from (a population's: stacked), and what the loop's
    callbacks share while it runs."""

    members: list[dict]  # each member's settings (one: a single model)
    state: Any  # the train state (a population's: stacked), replaced on resume
    carry: Any  # the TBPTT carry, or None
    train_step: Callable  # compiled: one member's or the whole population's
    evaluate: Callable  # the job's, or the population's (the best member's metrics)
    sample_key: Any  # the third key of member 0's seed: for samples drawn during and after the run
    progress: dict | None = None  # a resumed run's progress (history, elapsed time, early stopping)
    curve: list = field(default_factory=list)  # [step, mean training loss] every 10 steps
    kept: int = 0  # the best member at the latest evaluation
    stopped_by: str | None = None  # the signal that stopped the run ("SIGINT", "SIGTERM"), if one did


def _set_up(job: Job, plan: Plan) -> _Setup:
    """The optimiser, the initial state (every member's, stacked) and the train step."""
    import jax

    from rnnjax import train

    s, total_steps = plan.settings, plan.total_steps
    members = population_members(s, plan.population, plan.cmd)
    keys = [jax.random.split(jax.random.key(m["seed"]), 3) for m in members]
    warmup = s["warmup"] or (min(WARMUP, max(1, total_steps // 10)) if total_steps else WARMUP)
    optimizer = train.default_optimizer(members[0]["lr"], total_steps=total_steps or NO_HORIZON,
                                        warmup_steps=warmup, end_fraction=s["end_lr"],
                                        weight_decay=members[0]["weight_decay"], clip_norm=s["clip"])
    carried = job.initial_carry is not None

    @jax.jit  # one compiled call, not one per initialiser (which costs seconds on CPU)
    def init_all(k1, k2):
        st = train.init_train_state(job.init(k1), optimizer, k2)
        return st, (job.initial_carry(st.params) if carried else None)

    if len(members) == 1:
        state, carry = init_all(keys[0][0], keys[0][1])
        step = train.make_train_step(job.loss_fn, optimizer, carry=carried, accumulate=s["accumulate"])
        return _Setup(members, state, carry, step, job.evaluate, keys[0][2])
    states, carries = [], []
    for m, (k1, k2, _) in zip(members, keys):
        st, c = init_all(k1, k2)
        states.append(st._replace(opt_state=train.set_hyperparams(
            st.opt_state, learning_rate=m["lr"], weight_decay=m["weight_decay"])))
        carries.append(c)
    step = train.make_population_step(job.loss_fn, optimizer, carry=carried, accumulate=s["accumulate"],
                                      summarise=train.population_summary)
    return _Setup(members, train.stack_states(states), train.stack_states(carries) if carried else None, step,
                  _population_evaluate(job.evaluate, len(members)), keys[0][2])


def _restore(ckpt, job: Job, plan: Plan, setup: _Setup) -> float | None:
    """On ``--resume``: the checkpoint's state, carry, progress and curve into ``setup``, the batches
    positioned at its step; returns the seconds left of the budget."""
    from rnnjax import checkpoint, train

    seconds = plan.seconds
    if plan.resume_step is None:
        return seconds
    try:
        state, carry, meta = _restore_readable(ckpt, plan, setup)
    except checkpoint.CheckpointError as e:
        ckpt.close()
        raise UsageError(f"{plan.cmd} --resume: {e}") from None
    setup.progress = meta["progress"]
    step0 = train.step_of(state)
    setup.curve = [p for p in meta.get("curve", []) if p[0] <= step0]
    setup.kept = meta.get("population", {}).get("best", 0)
    if seconds is not None and plan.rest_of_time:
        seconds = max(seconds - setup.progress["elapsed_s"], 0.0)  # the rest of the run's time budget
    if plan.total_steps is not None:
        state = state._replace(opt_state=train.set_hyperparams(state.opt_state, total_steps=plan.total_steps))
    setup.state, setup.carry = state, carry
    job.batches.position = step0
    return seconds


def _restore_readable(ckpt, plan: Plan, setup: _Setup):
    """``(state, carry, meta)`` of the newest readable checkpoint at or before ``plan.resume_step``. Damaged
    newer ones are said so and moved aside (``<step>.damaged``, kept for the user), out of the way of the
    checkpoints this run will save."""
    import jax

    from rnnjax import checkpoint

    steps = ckpt.steps()
    damaged = {s: "its meta (meta/) cannot be read" for s in steps if s > plan.resume_step}  # see resume_point
    abstract = jax.eval_shape(lambda: setup.state)
    abstract_carry = jax.eval_shape(lambda: setup.carry) if setup.carry is not None else None
    for step in reversed([s for s in steps if s <= plan.resume_step]):
        try:
            restored = ckpt.restore(step, abstract, abstract_carry)
        except checkpoint.DamagedCheckpoint as e:
            damaged[e.step] = f"{e.what} cannot be read"
            continue
        for bad in sorted(damaged, reverse=True):
            moved = ckpt.set_aside(bad)
            print(f"rnnjax: the checkpoint at step {bad} is damaged ({damaged[bad]}); resuming from step {step}, the "
                  f"newest readable one. The damaged one is kept, moved to {str(moved)!r}.", file=sys.stderr)
        return restored
    raise checkpoint.CheckpointError(f"no checkpoint in {str(ckpt.directory)!r} can be read (steps "
                                     f"{', '.join(map(str, steps))} are all damaged; they are left as they are). "
                                     "Fix: restore one from a backup, or start afresh with --overwrite.")


def _early_stopping(plan: Plan, progress: dict | None):
    from rnnjax import train

    patience, min_delta = plan.option("patience"), plan.option("min_delta")
    if not patience:
        return None
    es = (progress or {}).get("early_stopping")
    early = train.EarlyStopping.from_dict(es) if es else train.EarlyStopping(patience, min_delta)
    early.patience, early.min_delta = patience, min_delta
    return early


def _saver(ckpt, job: Job, setup: _Setup) -> Callable:
    """``save(state, carry, metrics, progress)`` for :func:`rnnjax.train.fit`: a checkpoint with the job's
    meta, the progress, the loss curve so far, the data position and a population's members."""
    from rnnjax import train

    population = {"members": [{k: m[k] for k in ("seed", *MEMBER_SETTINGS)} for m in setup.members]}

    def save(st, c, metrics, prog):
        at = train.step_of(st)
        ckpt.save(at, st, carry=c, metrics=metrics, meta={
            **job.meta, "progress": prog, "curve": [p for p in setup.curve if p[0] <= at],
            "data": {**job.meta.get("data", {}), "position": at},
            **({"population": {**population, "best": setup.kept}} if len(setup.members) > 1 else {})})

    return save


def _start_line(job: Job, plan: Plan, setup: _Setup, seconds: float | None) -> str:
    import jax
    import numpy as np

    from rnnjax import train

    members, n = setup.members, len(setup.members)
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(setup.state.params)) // n
    what = f"{plan.total_steps} steps" if plan.total_steps else f"{seconds / 60:g} min"
    resuming = f"; resuming at step {train.step_of(setup.state)}" if plan.resume_step is not None else ""
    how = ""
    if plan.devices > 1:
        how = f"; data-parallel over {plan.devices} {jax.default_backend()} devices"
    if n > 1:
        how = (f"; a population of {n} (seeds {members[0]['seed']}..{members[-1]['seed']}, lr "
               f"{','.join(format(m['lr'], 'g') for m in members)}) in one compiled step")
    return (f"rnnjax: {job.model_name} ({n_params / 1e6:.2f}M parameters{' each' if n > 1 else ''}) on "
            f"{job.describe}; budget {what}{resuming}{how}; backend {jax.default_backend()}; run directory "
            f"{str(plan.out)!r}")


class Display:
    """The progress bar (loss, throughput, ETA), the loss curve it records (``[step, mean loss]`` every 10
    steps) and the line printed at each evaluation, which also rewrites ``metrics.jsonl``."""

    def __init__(self, job: Job, plan: Plan, setup: _Setup):
        from tqdm.auto import tqdm

        from rnnjax import train

        self.job, self.plan, self.setup = job, plan, setup
        self.metrics_path = plan.out / "metrics.jsonl"
        self.history = list((setup.progress or {}).get("history", []))
        write_metrics(self.metrics_path, self.history)
        self.bar = tqdm(total=plan.total_steps, initial=train.step_of(setup.state), unit="step", dynamic_ncols=True,
                        file=sys.stderr, desc=job.model_name, smoothing=0.1,
                        mininterval=0.1 if sys.stderr.isatty() else 10.0)
        self.postfix, self.recent = {}, []
        self.rate_name = {"characters": "tok/s", "pronunciations": "words/s"}.get(job.unit, f"{job.unit[:3]}/s")

    def on_step(self, step, m, tps, horizon):
        import numpy as np

        if self.plan.total_steps is None and horizon < NO_HORIZON and self.bar.total != horizon:
            self.bar.total = horizon
        if not m["skipped"]:
            self.recent.append(m["loss"])
        if step % 10 == 0 and self.recent:
            self.setup.curve.append([step, round(float(np.mean(self.recent)), 4)])
            self.postfix["loss"] = f"{self.setup.curve[-1][1]:.3f}"
            if tps:
                self.postfix[self.rate_name] = f"{tps:,.0f}"
            self.bar.set_postfix(self.postfix, refresh=False)
            self.recent.clear()
        self.bar.update(1)

    def on_eval(self, record, st):
        from rnnjax import train

        job = self.job
        self.postfix["val"] = f"{record['val_loss']:.3f}"
        self.history.append(record)
        write_metrics(self.metrics_path, self.history)
        train_part = "" if record["train_loss"] is None else f", train {record['train_loss']:.4f}"
        unit = f" {job.metric_unit}" if job.metric_unit else ""
        extras = "".join(f", {k.removeprefix('val_').replace('_', ' ')} {v:.4f}" for k, v in record.items()
                         if k.startswith("val_") and k != "val_loss" and isinstance(v, float))
        line = (f"step {record['step']}: {job.val_name} loss {record['val_loss']:.4f}{unit}{extras}{train_part} "
                f"({record['elapsed_s']:.0f} s)")
        if len(self.setup.members) > 1:
            self.setup.kept = record["member"]
            line += f"; best member {record['member']}; members " + " ".join(
                f"{v:.4f}" for v in record["member_val_loss"])
            st = train.member(st, record["member"])
        if job.eval_text is not None:
            line += job.eval_text(record, st)
        self.bar.write(line, file=sys.stderr)


def _fit(job: Job, plan: Plan, setup: _Setup, ckpt, seconds, display: Display, early):
    """:func:`rnnjax.train.fit` on the set-up state, sharded over ``plan.devices``; Ctrl-C or SIGTERM saves
    and stops."""
    from rnnjax import train

    train_step, state, batches, carry = setup.train_step, setup.state, job.batches, setup.carry
    if plan.devices > 1:
        from rnnjax import parallel

        mesh = parallel.make_mesh(plan.devices)
        train_step, state, batches, carry = parallel.distribute(train_step, state, batches, mesh, carry=carry)
    every_minutes = plan.option("save_every_minutes")
    with Interrupt() as interrupt:
        try:
            return train.fit(
                train_step, state, batches, carry=carry, total_steps=plan.total_steps, seconds=seconds,
                start_time=plan.start_time, evaluate=setup.evaluate, evals=plan.option("evals"),
                early_stopping=early, save=_saver(ckpt, job, setup), save_every_steps=plan.option("save_every_steps"),
                save_every_seconds=None if every_minutes is None else every_minutes * 60,
                tokens_per_step=job.tokens_per_step, on_step=display.on_step, on_eval=display.on_eval,
                should_stop=lambda: interrupt.requested, max_consecutive_skipped=MAX_SKIPPED,
                progress=setup.progress)
        finally:
            setup.stopped_by = interrupt.signal_name
            display.bar.close()
            ckpt.wait()


def _close_after_failure(ckpt) -> None:
    """Closes ``ckpt`` after a failed write; a background save's error, raised again, is the one reported."""
    try:
        ckpt.close()
    except Exception:  # noqa: BLE001
        pass


def _plot(job: Job, plan: Plan, history: list, curve: list) -> None:
    if not history or plan.no_plot:
        return
    try:
        plot_history(history, plan.out / "loss.png", job.plot_title, curve,
                     ylabel=f"loss ({job.metric_unit})" if job.metric_unit else "loss")
    except Exception as e:  # noqa: BLE001 - a failed plot must not fail a finished run
        print(f"rnnjax: could not write loss.png ({type(e).__name__}: {e})", file=sys.stderr)


def _report(job: Job, plan: Plan, setup: _Setup, result, early) -> int | None:
    """The closing lines: the final step and loss, a population's table, and why the run stopped; the
    exit status when it did not finish (130: interrupted, 1: not finite), else None."""
    from rnnjax import train

    history, members = result.history, setup.members
    step = train.step_of(result.state)
    val = history[-1]["val_loss"] if history and history[-1]["step"] == step else None
    skipped = f"; {result.skipped_steps} step(s) skipped for non-finite gradients" if result.skipped_steps else ""
    unit = f" {job.metric_unit}" if job.metric_unit else ""
    bits = f" ({val / math.log(2):.3f} bits/char)" if job.metric_unit == "nats/char" and val is not None else ""
    print(f"rnnjax: step {step} after {result.elapsed_s:.0f} s ({result.tokens_per_s:,.0f} {job.unit}/s after "
          f"compilation)" + (f"; {job.val_name} loss {val:.4f}{unit}{bits}" if val is not None else "") + skipped
          + f"; stopped: {result.stop_reason}", file=sys.stderr)
    if len(members) > 1:
        # Kept: the best member of the best evaluation (the best checkpoint's), else of the last one.
        best_record = min((r for r in history if "member" in r), key=lambda r: r["val_loss"], default=None)
        setup.kept = best_record["member"] if best_record else setup.kept
        _print_members(members, history, setup.kept)
    if result.stop_reason == "interrupted":
        term = setup.stopped_by == "SIGTERM"
        print(f"rnnjax: {'stopped by SIGTERM' if term else 'interrupted'}; checkpoint of step {step} saved in "
              f"{str(plan.out / 'checkpoints')!r}. Resume with: {plan.cmd} --out {plan.out} --resume", file=sys.stderr)
        return 128 + signal.SIGTERM if term else 130
    if result.stop_reason == "not_finite":
        print(f"rnnjax: error: the gradients were not finite for {MAX_SKIPPED} steps in a row (skipped, never "
              f"applied) at step {step}; the last good parameters are saved. Fix: lower --lr (now "
              f"{','.join(format(m['lr'], 'g') for m in members)}) or --clip.", file=sys.stderr)
        return 1
    if result.stop_reason == "early_stopping":
        print(f"rnnjax: early stopping: no improvement for {early.patience} evaluations (best "
              f"{early.best:.4f} at step {early.best_step})", file=sys.stderr)
    return None


def _test_metrics(job: Job, plan: Plan, setup: _Setup, ckpt, result) -> dict | None:
    """``job.finish`` on the best checkpoint's parameters (a population's kept member), appended to
    ``metrics.jsonl`` and printed."""
    import jax
    import numpy as np

    from rnnjax import train

    if job.finish is None:
        return None
    step, best_step = train.step_of(result.state), ckpt.best_step()
    params = result.state.params
    if best_step is not None and best_step != step:
        params, _ = ckpt.restore_params(best_step, jax.eval_shape(lambda: result.state.params))
    population = len(setup.members) > 1
    if population:
        params = train.member(params, setup.kept)
    test = {k: (round(float(v), 6) if isinstance(v, (float, np.floating)) else v)
            for k, v in job.finish(params, result.history, None if plan.no_plot else plan.out).items()}
    record = {"step": best_step if best_step is not None else step, "split": "test",
              **({"member": setup.kept} if population else {}), **test}
    write_metrics(plan.out / "metrics.jsonl", result.history + [record])
    shown = ", ".join(f"{k.removeprefix('test_').replace('_', ' ')} {v:.4f}" for k, v in test.items()
                      if isinstance(v, float))
    print(f"rnnjax: test ({'best checkpoint, ' if best_step not in (None, step) else ''}step "
          f"{record['step']}{', member ' + str(setup.kept) if population else ''}): {shown}", file=sys.stderr)
    return test


def run(job: Job, plan: Plan) -> Outcome:
    """Trains ``job`` as ``plan`` says with :func:`rnnjax.train.fit`: a progress bar (loss, throughput,
    ETA), the validation metrics at each evaluation, Orbax checkpoints (latest and best),
    ``metrics.jsonl``, ``loss.png``; Ctrl-C saves and stops (status 130), SIGTERM too (status 143).
    Then ``job.finish`` on the best parameters."""
    from rnnjax import checkpoint, train

    setup = _set_up(job, plan)
    ckpt = checkpoint.Checkpointer(plan.out)
    seconds = _restore(ckpt, job, plan, setup)
    early = _early_stopping(plan, setup.progress)
    print(_start_line(job, plan, setup, seconds), file=sys.stderr)
    try:
        result = _fit(job, plan, setup, ckpt, seconds, Display(job, plan, setup), early)
    except (checkpoint.CheckpointWriteError, RunError) as e:
        _close_after_failure(ckpt)
        raise RunError(f"{plan.cmd}: {e}. The run stopped. Fix: free space on the disk (or copy the run "
                       f"elsewhere), then resume with: {plan.cmd} --out {plan.out} --resume") from None
    _plot(job, plan, result.history, setup.curve)
    status = _report(job, plan, setup, result, early)
    params = result.state.params
    if len(setup.members) > 1:
        params = train.member(params, setup.kept)
    if status is not None:
        ckpt.close()
        return Outcome(status, result, setup.sample_key, params=params)
    test = _test_metrics(job, plan, setup, ckpt, result)
    ckpt.close()
    files = [f for f in job.files if not (plan.no_plot and f.endswith(".png"))]
    print(f"rnnjax: checkpoints, {', '.join(files[:-1])}{' and ' if len(files) > 1 else ''}{files[-1]} are in "
          f"{str(plan.out)!r}", file=sys.stderr)
    return Outcome(0, result, setup.sample_key, test, params)


# ----------------------------------------------------------------------------
# From a recipe and flags to a run


def resolve_options(recipe, given: dict, saved: dict | None) -> dict:
    """The run options: those given (not None), else the run's own on ``--resume``, else the recipe's
    defaults (then :data:`OPTIONS`)."""
    own = (saved or {}).get("options", {})
    defaults = {**OPTIONS, **recipe.options}
    return {k: given[k] if given.get(k) is not None else own.get(k, defaults[k]) for k in defaults}


def plan_run(recipe, given: dict, request: dict) -> Plan:
    """Checks the run directory and resolves settings, options and budget (nothing is written).

    ``given``: the fixed settings and run options given (None: not given); ``request``: ``out``,
    ``resume``, ``overwrite``, ``steps``, ``minutes``, ``no_plot``, ``start_time``."""
    cmd = f"rnnjax train {recipe.name}"
    out, saved = check_out(request["out"], resume=request.get("resume", False),
                           overwrite=request.get("overwrite", False), cmd=cmd, run_files=recipe.run_files)
    fixed = {k: v for k, v in given.items() if k in recipe.defaults and v is not None}
    settings = recipe.adjust(fixed_settings(fixed, recipe.defaults, saved, cmd, same=recipe.same), fixed, saved)
    steps, minutes = request.get("steps"), request.get("minutes")
    if steps is None and minutes is None and not saved:
        steps, minutes = recipe.budget.get("steps"), recipe.budget.get("minutes")
    total_steps, seconds = budget(steps, minutes, saved, recipe.budget.get("minutes", 5.0))
    step, meta = resume_point(out, cmd) if saved else (None, {})
    return Plan(cmd=cmd, out=out, settings=settings, total_steps=total_steps, seconds=seconds,
                options=resolve_options(recipe, given, saved), saved=saved, given=fixed, resume_step=step,
                progress=meta.get("progress"), rest_of_time=request.get("minutes") is None,
                no_plot=request.get("no_plot", False), start_time=request.get("start_time"))


def train(recipe, given: dict, request: dict) -> Outcome:
    """Runs ``rnnjax train TASK`` for ``recipe`` (:mod:`rnnjax.recipes`): plans the run
    (:func:`plan_run`), lets the recipe prepare its :class:`Job`, checks the population and devices,
    writes ``config.json`` (everything that can fail on bad input fails before), trains (:func:`run`)
    and hands a finished run's outcome to the job's ``after``. ``request["devices"]``: data-parallel over that
    many local devices (None: as many as divide the batch). The whole time it holds the directory's
    :class:`RunLock`: a second run into the same ``--out`` is refused while this one lives."""
    cmd, out = f"rnnjax train {recipe.name}", Path(request["out"]).expanduser()
    lock = RunLock(out, cmd, request["out"])
    try:
        if out.is_dir():  # before anything reads it: a live run there may be rewriting it
            lock.acquire()
        return _train(recipe, given, request, lock)
    finally:
        lock.release()


def _train(recipe, given: dict, request: dict, lock: RunLock) -> Outcome:
    plan = plan_run(recipe, given, request)
    job = recipe.prepare(plan)
    s = plan.settings
    plan.population = len(population_members(s, s.get("population"), plan.cmd))
    plan.devices = device_count(request.get("devices"), s["batch"], plan.cmd, population=plan.population)
    if s["batch"] % s["accumulate"]:
        raise UsageError(f"{plan.cmd}: --accumulate {s['accumulate']} must divide --batch {s['batch']} (each update "
                         f"averages {s['accumulate']} equal micro-batches). Fix: pass a divisor of {s['batch']}.")
    config = plan.saved or {RUN_MARKER: 1, "task": recipe.name, "settings": s, "model": job.model_name,
                            **job.config, "budget": {"steps": plan.total_steps, "seconds": plan.seconds}}
    config["options"] = plan.options
    write_config(plan.out, config, overwrite=request.get("overwrite", False), cmd=plan.cmd, out_arg=request["out"],
                 run_files=recipe.run_files)
    lock.acquire()  # a new directory: made just now
    job.meta = {"task": recipe.name, "settings": s, **job.meta}
    outcome = run(job, plan)
    if outcome.status == 0 and job.after is not None:
        outcome.status = job.after(outcome)
    return outcome


# ----------------------------------------------------------------------------
# Trained models, for `rnnjax eval` and `rnnjax generate`


def load_params(directory: str, which, init: Callable, cmd: str, *, check: Callable[[dict, int], None] | None = None):
    """``(params, meta, step)`` of a run's checkpoint (``which``: ``"best"``, ``"latest"`` or a step):
    ``init`` (``key -> params``) gives the structure; a population's checkpoint gives its best member
    at that step. ``check(meta, step)`` may refuse the checkpoint (a :class:`UsageError`) before the
    arrays are read."""
    import jax

    from rnnjax import checkpoint, train

    try:
        ckpt, step = checkpoint.open_run(directory, fn=cmd, which=which)
        try:
            meta = ckpt.read_meta(step)
            if check is not None:
                check(meta, step)
            abstract = jax.eval_shape(init, jax.random.key(0))
            population = meta.get("population")
            if population:
                n = len(population["members"])
                abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct((n, *x.shape), x.dtype), abstract)
            params, _ = ckpt.restore_params(step, abstract)
            if population:
                params = train.member(params, population["best"])
        finally:
            ckpt.close()
    except checkpoint.CheckpointError as e:
        raise UsageError(str(e)) from None
    return params, meta, step


def which_checkpoint(args) -> str | int:
    """``--step N``, ``--latest`` or (by default) the best checkpoint."""
    return args.step if args.step is not None else ("latest" if args.latest else "best")
