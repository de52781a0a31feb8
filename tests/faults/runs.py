"""Small `rnnjax train charlm` runs in subprocesses, and what a fault test checks afterwards: the
checkpoints on disk, the restored training state bit for bit, ``metrics.jsonl``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np

REPO = Path(__file__).resolve().parents[2]
TINY = ["--hidden", "16", "--embed", "8", "--batch", "4", "--seq-len", "16", "--sample-length", "0",
        "--eval-sample-length", "0"]


def tiny_text(path: Path, lines: int = 400) -> Path:
    rng = np.random.default_rng(0)
    words = "to be or not that is the question whether tis nobler in the mind".split()
    path.write_text("\n".join(" ".join(rng.choice(words, 8)) for _ in range(lines)), encoding="utf-8")
    return path


def train_args(text: Path, out: Path, steps: int = 80, *extra: str) -> list[str]:
    return ["train", "charlm", "--text", str(text), "--steps", str(steps), "--evals", "4", *TINY, "--seed", "5",
            "--out", str(out), *extra]


def start(args: list[str], cache: Path) -> subprocess.Popen:
    """``python -m rnnjax ARGS`` from this checkout, its output captured."""
    env = dict(os.environ, XDG_CACHE_HOME=str(cache), PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "rnnjax", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def steps_on_disk(run: Path) -> list[int]:
    """The step folders in ``run/checkpoints`` (complete ones; Orbax writes into ``*.orbax-checkpoint-tmp*``)."""
    d = run / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def wait_for_checkpoint(run: Path, proc: subprocess.Popen | None, at_least: int, timeout: float = 180.0) -> int:
    """Waits until a checkpoint of step ``at_least`` or later exists (``proc`` still running); returns its step."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = steps_on_disk(run)
        if steps and steps[-1] >= at_least:
            return steps[-1]
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run ended (status {proc.returncode}) first: {proc.communicate()}")
        time.sleep(0.005)
    raise AssertionError("no checkpoint appeared")


def final_state(run: Path):
    """``(meta, leaves)`` of the latest checkpoint: every array of the training state (params, optimiser
    state, step, key) and TBPTT carry, as NumPy arrays to compare bit for bit."""
    from rnnjax import checkpoint, train
    from rnnjax.models import language_model

    ckpt, step = checkpoint.open_run(run, which="latest")
    try:
        meta = ckpt.read_meta(step)
        cfg = dict(meta["model"])
        model = language_model(cfg.pop("vocab_size"), **cfg)
        init = model.init(jax.random.key(0))
        abstract = jax.eval_shape(lambda: train.init_train_state(init, train.default_optimizer(total_steps=1),
                                                                 jax.random.key(0)))
        batch = meta["settings"]["batch"]
        carry = jax.eval_shape(lambda: model.initial_carry(init, (batch,)))
        state, carry, _ = ckpt.restore(step, abstract, carry)
    finally:
        ckpt.close()
    leaves = [np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x)
              for x in jax.tree_util.tree_leaves((state, carry))]
    return meta, leaves


def same_state(run_a: Path, run_b: Path) -> bool:
    """Both runs' latest checkpoints hold the same step and the same training state, bit for bit, and
    the same validation history."""
    meta_a, a = final_state(run_a)
    meta_b, b = final_state(run_b)
    history = [[(r["step"], r["val_loss"]) for r in m["progress"]["history"]] for m in (meta_a, meta_b)]
    return (meta_a["step"] == meta_b["step"] and history[0] == history[1] and len(a) == len(b)
            and all(x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes() for x, y in zip(a, b)))


def metrics_steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def copy_when_written(src: Path, dst: Path, timeout: float = 300.0) -> None:
    """Copies the checkpoint folder ``src`` to ``dst`` as soon as it appears (the run may delete it later)."""
    deadline = time.monotonic() + timeout
    while not src.is_dir() and time.monotonic() < deadline:  # Orbax renames a finished save into place
        time.sleep(0.002)
    shutil.copytree(src, dst)


DAMAGE = {"truncated": lambda b: b[:len(b) // 2], "zeroed": lambda b: bytes(len(b)), "deleted": None}


def damage(path: Path, how: str) -> None:
    if DAMAGE[how] is None:
        path.unlink()
    else:
        path.write_bytes(DAMAGE[how](path.read_bytes()))


def params_data_file(step_dir: Path) -> Path:
    """The largest array data file of a checkpoint's parameters."""
    return max((step_dir / "params" / "ocdbt.process_0" / "d").iterdir(), key=lambda p: p.stat().st_size)
