"""Checkpoints of a training run (the only module that imports Orbax).

A run directory keeps its checkpoints in ``<run>/checkpoints/<step>/``,
each with three items:

- ``params``: the model parameters (all that inference needs);
- ``train``: the rest of the training state: step, optimiser state, PRNG
  key, and the carried recurrent state of truncated BPTT;
- ``meta``: JSON written by the caller (model configuration, vocabulary,
  data position, progress) plus this module's format marker.

::

    ckpt = Checkpointer(run_dir)                       # creates <run_dir>/checkpoints
    ckpt.save(step, state, carry=carry, meta={...}, metrics={"val_loss": 1.52})
    ckpt.wait()                                        # saves are asynchronous
    state, carry, meta = ckpt.restore(ckpt.latest_step(), abstract_state, abstract_carry)
    params, meta = restore_params(run_dir, abstract_params)   # inference: no optimiser state

Retention: the latest checkpoint and the best one (lowest ``val_loss`` among
those saved with metrics) are kept, older ones deleted only after a newer
one is completely written, so a crash never leaves a run without its last
good checkpoint. Errors (:class:`CheckpointError`, a ``ValueError``) name the
directory, what was expected and the fix for a missing directory, one with
no checkpoint, an unfinished (partial) save, damaged files, a directory of
another program, and a state that does not fit the model asked for. A
damaged checkpoint (:class:`DamagedCheckpoint`: a file truncated, zeroed or
missing) is reported in one line naming the part that cannot be read and the
readable checkpoints, never with Orbax's or TensorStore's internals;
:meth:`Checkpointer.set_aside` moves one out of the way (``<step>.damaged``)
without deleting it.
"""

from __future__ import annotations

import errno
import json
import os
import re
import sys
import warnings
from pathlib import Path

import jax
import numpy as np

FORMAT = 1
SUBDIR = "checkpoints"
META_KEY = "rnnjax_checkpoint"  # the marker in every checkpoint's meta; its value is FORMAT
_TMP = ".orbax-checkpoint-tmp"



class CheckpointError(ValueError):
    """A checkpoint that is missing, unfinished, damaged, foreign or does not fit."""


class DamagedCheckpoint(CheckpointError):
    """A checkpoint whose files cannot be read (truncated, zeroed, missing); ``step`` says which, ``what``
    which part (``"its parameters (params/)"``)."""

    def __init__(self, message: str, step: int, what: str):
        super().__init__(message)
        self.step, self.what = step, what


class CheckpointWriteError(RuntimeError):
    """A checkpoint that could not be written (e.g. the disk is full); the complete ones are kept."""


def _why_not_written(error: BaseException) -> str:
    """Why a write failed, in the user's words: a full disk, else the error's class and first line."""
    text = str(error).strip()
    if getattr(error, "errno", None) == errno.ENOSPC or "RESOURCE_EXHAUSTED" in text or "No space left" in text:
        return "the disk is full (no space left on device)"
    first = text.splitlines()[0][:160] if text else ""
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


DAMAGED_SUFFIX = ".damaged"  # a damaged checkpoint moved aside by --resume keeps its files under <step>.damaged


def _ignore_closed_loop(previous):
    """``sys.unraisablehook`` without Orbax's leftovers: when one read of a damaged checkpoint fails,
    Orbax closes its event loop while TensorStore's other reads are still running, and their
    callbacks then raise ``RuntimeError: Event loop is closed`` in TensorStore's threads; its other
    read coroutines are dropped with their errors (TensorStore reprs). Both are reported as
    unraisable, after the real error, which :class:`DamagedCheckpoint` already says in one line.
    Everything else goes to ``previous``."""

    def hook(unraisable):
        closed_loop = unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed"
        code = getattr(unraisable.object, "cr_code", None)  # an abandoned Orbax coroutine's failed read
        if not (closed_loop or (code is not None and "orbax" in code.co_filename)):
            previous(unraisable)

    hook.rnnjax = True
    return hook


def _install_hook() -> None:
    if not getattr(sys.unraisablehook, "rnnjax", False):
        sys.unraisablehook = _ignore_closed_loop(sys.unraisablehook)


def _ocp():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import orbax.checkpoint as ocp
    return ocp


def checkpoint_dir(directory: str | os.PathLike) -> Path:
    """The folder of step folders: ``<run>/checkpoints`` for a run directory,
    or the directory itself when it already is one (holds step folders)."""
    d = Path(directory).expanduser()
    if (d / SUBDIR).is_dir() or not d.is_dir():
        return d / SUBDIR
    if any(_step_of(p) is not None or _TMP in p.name for p in d.iterdir()):
        return d
    return d / SUBDIR


def _step_of(p: Path) -> int | None:
    return int(p.name) if p.is_dir() and re.fullmatch(r"\d+", p.name) else None


def _partial_steps(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if _TMP in p.name) if d.is_dir() else []


def _abstract(tree):
    """``ShapeDtypeStruct``s of a pytree of arrays (or of ``ShapeDtypeStruct``s), keeping each leaf's
    sharding where it has one (:func:`rnnjax.parallel.abstract_state`) and placing the others on the first
    local device: a checkpoint saved on any number of devices restores where the target says."""
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def leaf(x):
        sharding = getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding if sharding is not None else default)

    return jax.tree_util.tree_map(leaf, tree)


def _describe(path) -> str:
    """A tree path as ``a/b/0/c``, the same for NamedTuple fields, dict keys and list indices."""
    parts = []
    for k in path:
        for attr in ("name", "key", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts) or "(root)"


def _as_stored(x):
    """The shape and dtype a leaf is stored with (a typed PRNG key as its raw key data)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.eval_shape(jax.random.key_data, x)
    return x


class Checkpointer:
    """Orbax checkpoints of one run.

    Args:
      directory: the run directory (checkpoints go to ``<directory>/checkpoints``)
        or a checkpoints folder itself.
      keep_best: how many of the best checkpoints (lowest ``best_metric``) to keep
        besides the latest.
      async_save: write in a background thread (``save`` returns once the
        arrays are copied); :meth:`wait` or :meth:`close` waits for it.
      read_only: open for restoring only (no folder is created or cleaned).
    """

    def __init__(self, directory: str | os.PathLike, *, keep_best: int = 1, best_metric: str = "val_loss",
                 async_save: bool = True, read_only: bool = False):
        ocp = _ocp()
        _install_hook()
        self.directory = checkpoint_dir(directory).absolute()  # Orbax wants absolute paths
        self._saving = None  # the step of the latest save begun
        self.best_metric = best_metric
        self.read_only = read_only
        pp = ocp.checkpoint_managers
        policy = pp.AnyPreservationPolicy([
            pp.LatestN(n=1),
            pp.BestN(get_metric_fn=lambda m: m[best_metric], reverse=True, n=keep_best,
                     keep_checkpoints_without_metrics=False),
        ])
        options = ocp.CheckpointManagerOptions(
            preservation_policy=None if read_only else policy, enable_async_checkpointing=async_save,
            create=not read_only, read_only=read_only, cleanup_tmp_directories=not read_only,
            save_interval_steps=0 if read_only else 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers={
                "params": ocp.StandardCheckpointHandler(), "train": ocp.StandardCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler()})

    # -- inspecting --------------------------------------------------------------------------------

    def steps(self) -> list[int]:
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def best_step(self) -> int | None:
        """The step with the lowest ``best_metric`` in its meta's ``metrics`` (the latest when none has one)."""
        best, best_value = None, None
        for step in self.steps():
            try:
                value = (self.read_meta(step).get("metrics") or {}).get(self.best_metric)
            except CheckpointError:
                continue
            if value is not None and (best_value is None or value < best_value):
                best, best_value = step, value
        return best if best is not None else self.latest_step()

    def read_meta(self, step: int) -> dict:
        """The JSON meta saved with ``step`` (checked to be an rnnjax checkpoint's)."""
        ocp = _ocp()
        try:
            meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        except Exception:  # noqa: BLE001 - any failure to read is reported the same way
            raise self._damaged(step, "meta") from None
        if not isinstance(meta, dict) or meta.get(META_KEY) != FORMAT:
            raise CheckpointError(
                f"rnnjax.checkpoint: step {step} in {str(self.directory)!r} is not an rnnjax checkpoint (its meta "
                f"has no {META_KEY!r} = {FORMAT} marker). Fix: point at a run directory written by `rnnjax train`.")
        return meta

    # -- saving ------------------------------------------------------------------------------------

    def save(self, step: int, state, *, carry=None, meta: dict | None = None, metrics: dict | None = None) -> bool:
        """Saves ``state`` (a :class:`rnnjax.train.TrainState`), the TBPTT ``carry`` and
        ``meta`` (JSON-serialisable) as checkpoint ``step``; returns False (and
        saves nothing) when that step is already saved: a checkpoint is never
        deleted to be rewritten. ``metrics`` (e.g. ``{"val_loss": 1.5}``) rank
        it for keeping the best; they are also stored in the meta."""
        ocp = _ocp()
        if self.read_only:
            raise CheckpointError(f"rnnjax.checkpoint.Checkpointer.save: {str(self.directory)!r} was opened "
                                  "read-only. Fix: open it with read_only=False.")
        # Copies: the arrays are written in the background while the caller's train step
        # donates (reuses) the buffers of ``state`` and ``carry``.
        params, train = _copy((state.params, {"step": state.step, "opt_state": state.opt_state, "key": state.key,
                                              "carry": carry}))
        meta = dict(meta or {}, **{META_KEY: FORMAT, "step": int(step), "metrics": metrics})
        json.dumps(meta)  # fail here, not in a background thread
        if step in self._manager.all_steps():
            return False
        try:  # Orbax first waits for the previous background save: its error, if any, comes here
            self._manager.save(int(step), args=ocp.args.Composite(
                params=ocp.args.StandardSave(params), train=ocp.args.StandardSave(train),
                meta=ocp.args.JsonSave(meta)), metrics=metrics, force=True)
        except Exception as e:  # noqa: BLE001 - reported as one line, with what is kept
            raise self._write_failed(e) from None
        self._saving = int(step)
        return True

    def wait(self) -> None:
        """Waits for a background save to finish (a :class:`CheckpointWriteError` when it failed)."""
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise self._write_failed(e) from None

    def _write_failed(self, error: BaseException) -> CheckpointWriteError:
        try:
            kept = sorted(s for s in (_step_of(p) for p in self.directory.iterdir()) if s is not None)
        except OSError:
            kept = []
        what = f"step {', '.join(map(str, kept))}" if kept else "none"
        return CheckpointWriteError(
            f"a checkpoint (step {self._saving} or later) could not be written in {str(self.directory)!r}: "
            f"{_why_not_written(error)}; the complete checkpoints are kept ({what}; an unfinished one is cleared "
            "on --resume)")

    def close(self) -> None:
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- restoring ---------------------------------------------------------------------------------

    def readable(self, step: int) -> bool:
        """Whether every item of checkpoint ``step`` (meta, parameters, training state) can be read."""
        ocp = _ocp()
        try:
            self.read_meta(step)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._manager.restore(step, args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(), train=ocp.args.StandardRestore()))
        except Exception:  # noqa: BLE001
            return False
        return True

    def _damaged(self, step: int, item: str) -> DamagedCheckpoint:
        """The one-line error for checkpoint ``step`` whose ``item`` cannot be read, naming the readable
        checkpoints (checked now) and leaving the damaged one where it is."""
        what = {"meta": "its meta (meta/)", "params": "its parameters (params/)",
                "train": "its training state (train/)"}[item]
        others = [s for s in reversed(self.steps()) if s != step and self.readable(s)]
        where = str(self.directory / str(step))
        if others:
            fix = (f"readable checkpoints: step {', '.join(map(str, others))}. Fix: use step {others[0]} (rnnjax "
                   f"eval/generate --step {others[0]}; rnnjax train --resume falls back to it by itself), or restore "
                   f"{where!r} from a backup")
        else:
            fix = f"no other checkpoint is readable. Fix: restore {where!r} from a backup, or train again"
        return DamagedCheckpoint(
            f"rnnjax.checkpoint: the checkpoint at step {step} in {str(self.directory)!r} is damaged: {what} cannot "
            f"be read (a file in it is truncated, zeroed or missing); {fix}.", step, what)

    def set_aside(self, step: int) -> Path:
        """Moves damaged checkpoint ``step`` to ``<step>.damaged`` in the same folder (kept, not deleted),
        out of the way of new checkpoints; returns its new path."""
        target = self.directory / f"{step}{DAMAGED_SUFFIX}"
        n = 1
        while target.exists():
            n += 1
            target = self.directory / f"{step}{DAMAGED_SUFFIX}{n}"
        os.replace(self.directory / str(step), target)
        self._manager.reload()
        return target

    def _check_fits(self, step: int, item: str, target, what: str) -> None:
        """Compares the saved arrays' tree, shapes and dtypes with ``target``'s."""
        from etils import epath

        try:  # this item's alone: another damaged item must not stop reading this one
            saved = _ocp().StandardCheckpointHandler().metadata(epath.Path(self.directory / str(step) / item))
        except Exception:  # noqa: BLE001
            raise self._damaged(step, item) from None
        if saved is None:
            raise self._damaged(step, item)
        saved_tree = getattr(saved, "tree", saved)
        want = {_describe(p): _as_stored(x) for p, x in jax.tree_util.tree_flatten_with_path(target)[0]}
        have = {_describe(p): x for p, x in jax.tree_util.tree_flatten_with_path(_plain(saved_tree))[0]}
        problems = []
        for name in sorted(set(want) | set(have)):
            w, h = want.get(name), have.get(name)
            if w is None:
                problems.append(f"{name} is in the checkpoint but not in the {what}")
            elif h is None:
                problems.append(f"{name} is missing from the checkpoint")
            elif tuple(h.shape) != tuple(w.shape) or np.dtype(h.dtype) != np.dtype(w.dtype):
                problems.append(f"{name} has {h.dtype}{list(h.shape)} in the checkpoint, the {what} expects "
                                f"{w.dtype}{list(w.shape)}")
        if problems:
            shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
            raise CheckpointError(
                f"rnnjax.checkpoint: the checkpoint at step {step} in {str(self.directory)!r} does not fit the "
                f"{what}: {shown}. Fix: build the model with the settings it was trained with (they are in its "
                "meta), or train a new one in another directory.")

    def restore(self, step: int, abstract_state, abstract_carry=None):
        """``(state, carry, meta)`` of checkpoint ``step``: ``abstract_state`` is
        the :class:`~rnnjax.train.TrainState` structure (from ``jax.eval_shape``)
        the arrays are restored into, so NamedTuples come back as NamedTuples."""
        ocp = _ocp()
        meta = self.read_meta(step)
        train_target = {"step": abstract_state.step, "opt_state": abstract_state.opt_state,
                        "key": abstract_state.key, "carry": abstract_carry}
        self._check_fits(step, "params", _abstract(abstract_state.params), "model")
        self._check_fits(step, "train", _abstract(train_target), "training state (optimiser and carry)")
        try:
            r = self._manager.restore(step, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(_abstract(abstract_state.params)),
                train=ocp.args.StandardRestore(_abstract(train_target))))
        except Exception:  # noqa: BLE001
            raise self._damaged(step, "params" if self._unreadable("params", step) else "train") from None
        t = r.train
        state = type(abstract_state)(t["step"], r.params, t["opt_state"], t["key"])
        return state, t["carry"], meta

    def _unreadable(self, item: str, step: int) -> bool:
        ocp = _ocp()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore()}))
        except Exception:  # noqa: BLE001
            return True
        return False

    def restore_params(self, step: int, abstract_params):
        """``(params, meta)`` of checkpoint ``step``, without the optimiser state."""
        ocp = _ocp()
        meta = self.read_meta(step)
        self._check_fits(step, "params", _abstract(abstract_params), "model")
        try:
            r = self._manager.restore(step, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(_abstract(abstract_params))))
        except Exception:  # noqa: BLE001
            raise self._damaged(step, "params") from None
        return r.params, meta


@jax.jit
def _copy(tree):
    """New buffers with the same values (one compiled call for the whole tree)."""
    return jax.tree_util.tree_map(lambda x: x.copy(), tree)


def _plain(tree):
    """Orbax's array metadata leaves as objects with ``shape`` and ``dtype``."""
    return jax.tree_util.tree_map(lambda m: _Leaf(tuple(m.shape), m.dtype), tree,
                                  is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))


class _Leaf:
    def __init__(self, shape, dtype):
        self.shape, self.dtype = shape, dtype


def open_run(directory: str | os.PathLike, *, fn: str = "rnnjax.checkpoint.open_run",
             which: str | int = "latest") -> tuple[Checkpointer, int]:
    """Opens the checkpoints of a run directory read-only and picks one:
    ``which`` is ``"latest"``, ``"best"`` or a step number.

    Raises :class:`CheckpointError` (with ``fn`` in the message) when the
    directory is missing, holds no checkpoint (or only an unfinished one), or
    holds something else than rnnjax checkpoints.
    """
    run = Path(directory).expanduser()
    if not run.exists():
        raise CheckpointError(f"{fn}: no directory at {str(directory)!r}; expected a run directory written by "
                              "`rnnjax train` (it holds checkpoints/). Fix: check the path, or train a model first.")
    if not run.is_dir():
        raise CheckpointError(f"{fn}: {str(directory)!r} is a file; expected a run directory written by "
                              "`rnnjax train` (it holds checkpoints/). Fix: pass the directory, not a file in it.")
    d = checkpoint_dir(run)
    steps = sorted(s for s in (_step_of(p) for p in d.iterdir()) if s is not None) if d.is_dir() else []
    if not steps:
        partial = _partial_steps(d)
        if partial:
            raise CheckpointError(
                f"{fn}: {str(directory)!r} holds only an unfinished checkpoint ({partial[-1]}: the run stopped "
                "while saving it), nothing that can be restored. Fix: train again (--overwrite), or pick the "
                "directory of a run that saved a checkpoint.")
        raise CheckpointError(
            f"{fn}: {str(directory)!r} holds no checkpoint (no {SUBDIR}/<step> folders); expected a run "
            "directory written by `rnnjax train`. Fix: check the path, or train a model first.")
    ckpt = Checkpointer(run, read_only=True)
    if which == "latest":
        step = steps[-1]
    elif which == "best":
        step = ckpt.best_step()
    else:
        if which not in steps:
            raise CheckpointError(f"{fn}: {str(directory)!r} has no checkpoint at step {which}; it has steps "
                                  f"{', '.join(map(str, steps))}. Fix: pass one of those.")
        step = int(which)
    ckpt.read_meta(step)  # a foreign or damaged checkpoint fails here, with its message
    return ckpt, step


def restore_params(directory: str | os.PathLike, abstract_params, *, which: str | int = "best"):
    """``(params, meta)`` from a run directory, for inference (no optimiser state)."""
    ckpt, step = open_run(directory, fn="rnnjax.checkpoint.restore_params", which=which)
    try:
        return ckpt.restore_params(step, abstract_params)
    finally:
        ckpt.close()
