"""The training engine behind every ``rnnjax train TASK``: run directories, resume, progress,
checkpoints, ``metrics.jsonl``, plots and the final test metrics.

A task (the character model, a classifier, a forecaster, ...) prepares its
data and model, describes them in a :class:`Job`, and calls :func:`run`:

::

    out, saved = check_out(out, resume=False, overwrite=False, cmd=cmd, run_files=RUN_FILES)
    total_steps, seconds = budget(steps=None, minutes=2.0, saved=saved, default_minutes=5.0)
    write_config(out, config, overwrite=False, cmd=cmd)
    outcome = run(Job(cmd=cmd, out=out, init=model_init, loss_fn=loss_fn, batches=batches,
                      evaluate=evaluate, settings=settings, total_steps=total_steps, seconds=seconds, ...))

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

RUN_MARKER = "rnnjax_run"  # in every config.json written by rnnjax
WARMUP = 50  # default warmup steps (a tenth of a shorter --steps run)
MAX_SKIPPED = 25  # non-finite steps in a row that stop a run


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit status 2."""


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
    existing = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
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
    settings = {k: saved["settings"].get(k) for k in defaults}
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


def resume_step(out: Path, cmd: str) -> int:
    """The latest checkpoint of the run in ``out`` (a UsageError when there is none or it is unfinished)."""
    from rnnjax import checkpoint

    try:
        probe, step = checkpoint.open_run(out, fn=f"{cmd} --resume", which="latest")
        probe.close()
    except checkpoint.CheckpointError as e:
        raise UsageError(str(e)) from None
    return step


def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def write_metrics(path: Path, history: list[dict]) -> None:
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in history), encoding="utf-8")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------
# Plots


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


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
# The run


class Interrupt:
    """First Ctrl-C: ask the loop to save and stop. Second: the usual KeyboardInterrupt."""

    def __init__(self):
        self.requested = False
        self.previous = None

    def __enter__(self):
        try:
            self.previous = signal.signal(signal.SIGINT, self.handle)
        except ValueError:  # not the main thread: no handler
            self.previous = None
        return self

    def handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nrnnjax: stopping after this step and saving a checkpoint (Ctrl-C again to quit at once)",
              file=sys.stderr)

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


@dataclass
class Job:
    """Everything :func:`run` needs for one training run.

    Attributes:
      cmd: the command, for messages (``"rnnjax train classify"``).
      out: the run directory (``config.json`` already written).
      model_name: e.g. ``"lstm-1x128"``.
      init: ``key -> params``.
      loss_fn: ``(params, batch, key) -> loss`` (or with ``carry``: ``(params, batch, key, carry) -> (loss, carry)``).
      batches: an iterator of batches with a settable ``position`` (the step it yields next).
      evaluate: ``params -> val_loss`` or a dict with ``val_loss`` and more validation metrics.
      settings: ``lr``, ``warmup`` (None: default), ``end_lr``, ``weight_decay``, ``clip``,
        ``accumulate`` and ``seed``.
      total_steps, seconds: the budget (one of them, or both).
      resume_step: the checkpoint to resume from (None: a new run).
      rest_of_time: on resume, ``seconds`` is the run's whole budget: go on with what is left of it.
      initial_carry: ``params -> carry`` for truncated BPTT (the carry is threaded through the steps).
      meta: JSON-able data stored in every checkpoint (model settings, vocabulary, ...).
      describe: what the start line says after the model (data, batch shape).
      tokens_per_step, unit: throughput shown as ``unit``/s (``"characters"``, ``"sequences"``).
      metric_unit: the unit of the validation loss in messages (``"nats/char"``, ``"MSE"``).
      eval_text: ``(record, state) -> str``: extra lines printed after each evaluation (e.g. a sample).
      finish: ``(params, history) -> dict`` of test metrics (and plots), run on the best checkpoint's
        parameters after training; the dict is appended to ``metrics.jsonl`` with ``"split": "test"``.
      files: what the closing line lists as written into ``out``.
      plot_title: the title of ``loss.png``.
      evals, patience, min_delta, save_every_steps, save_every_minutes, no_plot, start_time: as the
        CLI flags of the same names.
      devices: data-parallel over this many local devices (:func:`device_count`), batches split
        along their first axis; 1: no mesh.
      population: train this many models at once (:func:`population_members`; ``settings["lr"]`` and
        ``settings["weight_decay"]`` may then be lists, one value per member). None or 1: one model.
    """

    cmd: str
    out: Path
    model_name: str
    init: Callable
    loss_fn: Callable
    batches: Any
    evaluate: Callable
    settings: dict
    total_steps: int | None
    seconds: float | None
    resume_step: int | None = None
    rest_of_time: bool = False
    initial_carry: Callable | None = None
    meta: dict = field(default_factory=dict)
    describe: str = ""
    tokens_per_step: int = 1
    unit: str = "sequences"
    metric_unit: str = ""
    eval_text: Callable | None = None
    finish: Callable | None = None
    files: tuple[str, ...] = ("metrics.jsonl", "loss.png")
    plot_title: str = ""
    evals: int = 5
    patience: int | None = None
    min_delta: float = 0.0
    save_every_steps: int | None = None
    save_every_minutes: float | None = None
    no_plot: bool = False
    start_time: float | None = None
    devices: int = 1
    population: int | None = None


@dataclass
class Outcome:
    """What :func:`run` ends with: the exit status, the fit result, the sampling key, the test metrics
    and the trained parameters (a population's: its kept member's)."""

    status: int
    result: Any
    sample_key: Any
    test_metrics: dict | None = None
    params: Any = None


def run(job: Job) -> Outcome:
    """Trains ``job`` with :func:`rnnjax.train.fit`: a progress bar (loss, throughput, ETA), the
    validation metrics at each evaluation, Orbax checkpoints (latest and best), ``metrics.jsonl``,
    ``loss.png``; Ctrl-C saves and stops (status 130). Then ``job.finish`` on the best parameters."""
    import jax
    import numpy as np
    from tqdm.auto import tqdm

    from rnnjax import checkpoint, train

    s, out, cmd = job.settings, job.out, job.cmd
    total_steps, seconds = job.total_steps, job.seconds
    members = population_members(s, job.population, cmd)
    n_members = len(members)
    keys = [jax.random.split(jax.random.key(m["seed"]), 3) for m in members]
    k_sample = keys[0][2]
    warmup = s["warmup"] or (min(WARMUP, max(1, total_steps // 10)) if total_steps else WARMUP)
    optimizer = train.default_optimizer(members[0]["lr"], total_steps=total_steps or 10 ** 9, warmup_steps=warmup,
                                        end_fraction=s["end_lr"], weight_decay=members[0]["weight_decay"],
                                        clip_norm=s["clip"])
    carried = job.initial_carry is not None

    def init_all(k1, k2):
        st = train.init_train_state(job.init(k1), optimizer, k2)
        return st, (job.initial_carry(st.params) if carried else None)

    # One compiled call, not one per initialiser (which costs seconds on CPU).
    init_all = jax.jit(init_all)
    evaluate = job.evaluate
    if n_members == 1:
        state, carry = init_all(keys[0][0], keys[0][1])
        train_step = train.make_train_step(job.loss_fn, optimizer, carry=carried, accumulate=s["accumulate"])
    else:
        states, carries = [], []
        for m, (k1, k2, _) in zip(members, keys):
            st, c = init_all(k1, k2)
            states.append(st._replace(opt_state=train.set_hyperparams(
                st.opt_state, learning_rate=m["lr"], weight_decay=m["weight_decay"])))
            carries.append(c)
        state = train.stack_states(states)
        carry = train.stack_states(carries) if carried else None
        train_step = train.make_population_step(job.loss_fn, optimizer, carry=carried, accumulate=s["accumulate"],
                                                summarise=train.population_summary)
        evaluate = _population_evaluate(job.evaluate, n_members)
    kept = {"member": 0}  # the best member at the latest evaluation
    ckpt = checkpoint.Checkpointer(out)
    progress, curve = None, []
    if job.resume_step is not None:
        try:
            state, carry, meta = ckpt.restore(job.resume_step, jax.eval_shape(lambda: state),
                                              jax.eval_shape(lambda: carry) if carried else None)
        except checkpoint.CheckpointError as e:
            ckpt.close()
            raise UsageError(f"{cmd} --resume: {e}") from None
        progress = meta["progress"]
        step0 = train.step_of(state)
        curve = [p for p in meta.get("curve", []) if p[0] <= step0]
        kept["member"] = meta.get("population", {}).get("best", 0)
        if seconds is not None and job.rest_of_time:
            seconds = max(seconds - progress["elapsed_s"], 0.0)  # the rest of the run's time budget
        if total_steps is not None:
            state = state._replace(opt_state=train.set_hyperparams(state.opt_state, total_steps=total_steps))
        job.batches.position = step0
    step0 = train.step_of(state)
    batches = job.batches
    if job.devices > 1:
        from rnnjax import parallel

        mesh = parallel.make_mesh(job.devices)
        train_step, state, batches, carry = parallel.distribute(train_step, state, batches, mesh, carry=carry)
    metrics_path = out / "metrics.jsonl"
    write_metrics(metrics_path, (progress or {}).get("history", []))
    early = None
    if job.patience:
        es = (progress or {}).get("early_stopping")
        early = train.EarlyStopping.from_dict(es) if es else train.EarlyStopping(job.patience, job.min_delta)
        early.patience, early.min_delta = job.patience, job.min_delta
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(state.params)) // n_members
    population_meta = {"members": [{k: m[k] for k in ("seed", *MEMBER_SETTINGS)} for m in members]}

    def save(st, c, metrics, prog):
        at = train.step_of(st)
        ckpt.save(at, st, carry=c, metrics=metrics, meta={
            **job.meta, "progress": prog, "curve": [p for p in curve if p[0] <= at],
            "data": {**job.meta.get("data", {}), "position": at},
            **({"population": {**population_meta, "best": kept["member"]}} if n_members > 1 else {})})

    what = f"{total_steps} steps" if total_steps else f"{seconds / 60:g} min"
    how = ""
    if job.devices > 1:
        how = f"; data-parallel over {job.devices} {jax.default_backend()} devices"
    if n_members > 1:
        how = (f"; a population of {n_members} (seeds {members[0]['seed']}..{members[-1]['seed']}, lr "
               f"{','.join(format(m['lr'], 'g') for m in members)}) in one compiled step")
    print(f"rnnjax: {job.model_name} ({n_params / 1e6:.2f}M parameters{' each' if n_members > 1 else ''}) on "
          f"{job.describe}; budget {what}{f'; resuming at step {step0}' if job.resume_step is not None else ''}"
          f"{how}; backend {jax.default_backend()}; run directory {str(out)!r}", file=sys.stderr)

    bar = tqdm(total=total_steps, initial=step0, unit="step", dynamic_ncols=True, file=sys.stderr,
               desc=job.model_name, smoothing=0.1, mininterval=0.1 if sys.stderr.isatty() else 10.0)
    postfix = {}
    recent_losses = []
    rate_name = {"characters": "tok/s"}.get(job.unit, f"{job.unit[:3]}/s")

    def on_step(step, m, tps, horizon):
        if total_steps is None and horizon < 10 ** 9 and bar.total != horizon:
            bar.total = horizon
        if not m["skipped"]:
            recent_losses.append(m["loss"])
        if step % 10 == 0 and recent_losses:
            curve.append([step, round(float(np.mean(recent_losses)), 4)])
            postfix["loss"] = f"{curve[-1][1]:.3f}"
            if tps:
                postfix[rate_name] = f"{tps:,.0f}"
            bar.set_postfix(postfix, refresh=False)
            recent_losses.clear()
        bar.update(1)

    history_so_far = list((progress or {}).get("history", []))

    def on_eval(record, st):
        postfix["val"] = f"{record['val_loss']:.3f}"
        write_metrics(metrics_path, history_so_far + [record])
        history_so_far.append(record)
        train_part = "" if record["train_loss"] is None else f", train {record['train_loss']:.4f}"
        unit = f" {job.metric_unit}" if job.metric_unit else ""
        extras = "".join(f", {k.removeprefix('val_').replace('_', ' ')} {v:.4f}" for k, v in record.items()
                         if k.startswith("val_") and k != "val_loss" and isinstance(v, float))
        line = (f"step {record['step']}: validation loss {record['val_loss']:.4f}{unit}{extras}{train_part} "
                f"({record['elapsed_s']:.0f} s)")
        if n_members > 1:
            kept["member"] = record["member"]
            line += f"; best member {record['member']}; members " + " ".join(
                f"{v:.4f}" for v in record["member_val_loss"])
            st = train.member(st, record["member"])
        if job.eval_text is not None:
            line += job.eval_text(record, st)
        bar.write(line, file=sys.stderr)

    with Interrupt() as interrupt:
        try:
            result = train.fit(
                train_step, state, batches, carry=carry, total_steps=total_steps, seconds=seconds,
                start_time=job.start_time, evaluate=evaluate, evals=job.evals, early_stopping=early, save=save,
                save_every_steps=job.save_every_steps,
                save_every_seconds=None if job.save_every_minutes is None else job.save_every_minutes * 60,
                tokens_per_step=job.tokens_per_step, on_step=on_step, on_eval=on_eval,
                should_stop=lambda: interrupt.requested, max_consecutive_skipped=MAX_SKIPPED, progress=progress)
        finally:
            bar.close()
            ckpt.wait()
    best_step = ckpt.best_step()
    history = result.history
    if history and not job.no_plot:
        try:
            plot_history(history, out / "loss.png", job.plot_title, curve,
                         ylabel=f"loss ({job.metric_unit})" if job.metric_unit else "loss")
        except Exception as e:  # noqa: BLE001 - a failed plot must not fail a finished run
            print(f"rnnjax: could not write loss.png ({type(e).__name__}: {e})", file=sys.stderr)
    step = train.step_of(result.state)
    val = history[-1]["val_loss"] if history and history[-1]["step"] == step else None
    skipped = f"; {result.skipped_steps} step(s) skipped for non-finite gradients" if result.skipped_steps else ""
    unit = f" {job.metric_unit}" if job.metric_unit else ""
    bits = f" ({val / math.log(2):.3f} bits/char)" if job.metric_unit == "nats/char" and val is not None else ""
    summary = (f"rnnjax: step {step} after {result.elapsed_s:.0f} s ({result.tokens_per_s:,.0f} {job.unit}/s after "
               f"compilation)" + (f"; validation loss {val:.4f}{unit}{bits}" if val is not None else "") + skipped)
    print(summary, file=sys.stderr)
    final_params = result.state.params
    if n_members > 1:
        # Kept: the best member of the best evaluation (the best checkpoint's), else of the last one.
        best_record = min((r for r in history if "member" in r), key=lambda r: r["val_loss"], default=None)
        kept["member"] = best_record["member"] if best_record else kept["member"]
        _print_members(members, history, kept["member"])
        final_params = train.member(final_params, kept["member"])
    if result.stop_reason == "interrupted":
        ckpt.close()
        print(f"rnnjax: interrupted; checkpoint of step {step} saved in {str(out / 'checkpoints')!r}. Resume with: "
              f"{cmd} --out {job.out} --resume", file=sys.stderr)
        return Outcome(130, result, k_sample, params=final_params)
    if result.stop_reason == "not_finite":
        ckpt.close()
        print(f"rnnjax: error: the gradients were not finite for {MAX_SKIPPED} steps in a row (skipped, never "
              f"applied) at step {step}; the last good parameters are saved. Fix: lower --lr (now "
              f"{','.join(format(m['lr'], 'g') for m in members)}) or "
              "--clip.",
              file=sys.stderr)
        return Outcome(1, result, k_sample, params=final_params)
    if result.stop_reason == "early_stopping":
        print(f"rnnjax: early stopping: no improvement for {early.patience} evaluations (best "
              f"{early.best:.4f} at step {early.best_step})", file=sys.stderr)
    test = None
    if job.finish is not None:
        params = result.state.params
        if best_step is not None and best_step != step:
            params, _ = ckpt.restore_params(best_step, jax.eval_shape(lambda: result.state.params))
        if n_members > 1:
            params = train.member(params, kept["member"])
        test = {k: (round(float(v), 6) if isinstance(v, (float, np.floating)) else v)
                for k, v in job.finish(params, history).items()}
        record = {"step": best_step if best_step is not None else step, "split": "test",
                  **({"member": kept["member"]} if n_members > 1 else {}), **test}
        write_metrics(metrics_path, history + [record])
        shown = ", ".join(f"{k.removeprefix('test_').replace('_', ' ')} {v:.4f}" for k, v in test.items()
                          if isinstance(v, float))
        print(f"rnnjax: test ({'best checkpoint, ' if best_step not in (None, step) else ''}step "
              f"{record['step']}{', member ' + str(kept['member']) if n_members > 1 else ''}): {shown}",
              file=sys.stderr)
    ckpt.close()
    files = [f for f in job.files if not (job.no_plot and f.endswith(".png"))]
    print(f"rnnjax: checkpoints, {', '.join(files[:-1])}{' and ' if len(files) > 1 else ''}{files[-1]} are in "
          f"{str(out)!r}", file=sys.stderr)
    return Outcome(0, result, k_sample, test, final_params)
