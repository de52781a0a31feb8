"""`rnnjax train ... --population N` and `--devices N`: a population's member 0 trains exactly like the
single run with the same settings, the best member is kept (for the test metrics and for `rnnjax
eval`), and data-parallel runs over simulated CPU devices equal the one-device run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from rnnjax import cli

ROOT = Path(__file__).resolve().parents[1]
ADDING = ["train", "adding", "--length", "16", "--hidden", "8", "--steps", "12", "--evals", "2", "--no-plot"]


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _tiny_text(path: Path) -> Path:
    rng = np.random.default_rng(0)
    words = "to be or not that is the question whether tis nobler in the mind".split()
    path.write_text("\n".join(" ".join(rng.choice(words, 8)) for _ in range(150)), encoding="utf-8")
    return path


def test_population_member_0_is_the_single_run_and_the_best_member_is_kept(tmp_path, capsys):
    pop, one = tmp_path / "pop", tmp_path / "one"
    # Member 1's learning rate is far too small to learn anything in 12 steps: member 0 is the best.
    assert cli.main(ADDING + ["--lr", "1e-2,1e-7", "--out", str(pop)]) == 0
    err = capsys.readouterr().err
    assert "a population of 2 (seeds 0..1, lr 0.01,1e-07) in one compiled step" in err
    assert re.search(r"\n +0\* +0 +0\.01 +0 ", err) and re.search(r"\n +1 +1 +1e-07 +0 ", err)
    assert cli.main(ADDING + ["--lr", "1e-2", "--out", str(one)]) == 0
    p, o = _records(pop), _records(one)
    assert [r["step"] for r in p[:-1]] == [r["step"] for r in o[:-1]] == [6, 12]
    for rp, ro in zip(p[:-1], o[:-1]):
        assert rp["member_val_loss"][0] == pytest.approx(ro["val_loss"], abs=1e-5)  # the twin run
        assert rp["val_loss"] == min(rp["member_val_loss"]) and rp["member"] == int(np.argmin(rp["member_val_loss"]))
        assert rp["lr"][1] == pytest.approx(rp["lr"][0] * 1e-5, rel=1e-4)  # each member's own schedule
    assert p[-1]["split"] == "test" and p[-1]["member"] == 0
    assert p[-1]["test_mse"] == pytest.approx(o[-1]["test_mse"], abs=1e-5)
    config = json.loads((pop / "config.json").read_text())
    assert config["settings"]["lr"] == [1e-2, 1e-7] and config["settings"]["population"] is None


def test_eval_and_generate_use_the_kept_member(tmp_path, capsys):
    text, out = _tiny_text(tmp_path / "tiny.txt"), tmp_path / "run"
    # This time member 0 cannot learn: member 1 (seed 1) is kept.
    assert cli.main(["train", "charlm", "--text", str(text), "--hidden", "16", "--embed", "8", "--batch", "4",
                     "--seq-len", "16", "--steps", "30", "--evals", "1", "--population", "2", "--lr", "1e-7,2e-2",
                     "--sample-length", "0", "--eval-sample-length", "0", "--out", str(out)]) == 0
    record = _records(out)[-1]
    assert record["member"] == 1 and record["member_val_loss"][1] < record["member_val_loss"][0] - 0.1
    capsys.readouterr()
    assert cli.main(["eval", "--checkpoint", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"lstm-1x16 at step 30: {record['val_loss']:.4f} nats/char")
    assert cli.main(["generate", "--checkpoint", str(out), "--prompt", "to", "--length", "5"]) == 0


def test_population_and_device_errors(tmp_path, capsys):
    cases = [
        (["--lr", "1e-2,3e-3,1e-3", "--population", "2"],
         "rnnjax train adding: --lr has 3 values (0.01,0.003,0.001) for a population of 2; expected one value, or "
         "one per member. Fix: give --lr 2 comma-separated values, or --population 3."),
        (["--lr", "1e-2,3e-3", "--weight-decay", "0,0.1,0.2"],
         "rnnjax train adding: the lists of member settings differ in length (--lr 2 and --weight-decay 3 "
         "values); expected one value per member in each. Fix: give them the same number of values (or one value "
         "for all members)."),
        (["--population", "2", "--devices", "2"],
         "rnnjax train adding: --population 2 trains its members on one device; got --devices 2. Fix: drop "
         "--devices, or train one model (no --population) on 2 devices."),
        (["--devices", "64"],
         f"rnnjax train adding: --devices 64, but only {jax.local_device_count()} cpu device"
         f"{'s are' if jax.local_device_count() > 1 else ' is'} visible. Fix: pass --devices "
         f"{jax.local_device_count()} or fewer (on a CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N "
         "simulates N devices)."),
    ]
    for flags, message in cases:
        out = tmp_path / "never"
        assert cli.main(ADDING + flags + ["--out", str(out)]) == 2
        assert capsys.readouterr().err.strip() == f"rnnjax: error: {message}"
        assert not out.exists()  # nothing written


def _simulated(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "rnnjax", *argv], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)


@pytest.mark.parametrize("task", ["adding", "charlm"])
def test_data_parallel_over_two_devices_equals_one(tmp_path, task):
    if task == "adding":
        argv = ADDING
    else:
        argv = ["train", "charlm", "--text", str(_tiny_text(tmp_path / "tiny.txt")), "--hidden", "16", "--embed", "8",
                "--batch", "4", "--seq-len", "16", "--steps", "12", "--evals", "2", "--sample-length", "0",
                "--eval-sample-length", "0", "--no-plot"]
    # Without --devices, both simulated devices are used (they divide the batch).
    two = _simulated(tmp_path, *argv, "--out", "two")
    one = _simulated(tmp_path, *argv, "--devices", "1", "--out", "one")
    assert two.returncode == 0 and one.returncode == 0, two.stderr[-2000:] + one.stderr[-2000:]
    assert "data-parallel over 2 cpu devices" in two.stderr and "data-parallel" not in one.stderr
    a, b = _records(tmp_path / "two"), _records(tmp_path / "one")
    assert len(a) == len(b) >= 2
    for ra, rb in zip(a, b):
        for k, v in rb.items():
            if k.startswith(("val_", "train_", "test_")) and isinstance(v, float):
                assert ra[k] == pytest.approx(v, abs=1e-5), k
    if task == "adding":
        bad = _simulated(tmp_path, *argv, "--devices", "2", "--batch", "3", "--out", "bad")
        assert bad.returncode == 2
        assert bad.stderr.strip().splitlines()[-1] == (
            "rnnjax: error: rnnjax train adding: --devices 2 must divide the batch size 3 (each device reads an "
            "equal part of every batch). Fix: pass a --batch that is a multiple of 2, or another --devices.")


class _Batches:
    position = 0

    def __next__(self):
        self.position += 1
        return {"x": np.ones(2, np.float32)}


def test_a_population_whose_every_member_diverges_stops_with_each_learning_rate(tmp_path, capsys):
    import jax.numpy as jnp

    from rnnjax import engine

    settings = dict(lr=[1e-2, 3e-2], weight_decay=0.0, warmup=None, end_lr=0.0, clip=1.0, accumulate=1, seed=0)
    job = engine.Job(model_name="nan", init=lambda key: {"w": jnp.zeros(2)},
                     loss_fn=lambda p, b, key: jnp.sum(p["w"] * b["x"]) * jnp.nan, batches=_Batches(),
                     evaluate=lambda p: 1.0)
    plan = engine.Plan(cmd="test", out=tmp_path, settings=settings, total_steps=100, seconds=None, population=2,
                       no_plot=True)
    outcome = engine.run(job, plan)
    assert outcome.status == 1 and outcome.result.skipped_steps == engine.MAX_SKIPPED
    assert (f"rnnjax: error: the gradients were not finite for {engine.MAX_SKIPPED} steps in a row (skipped, never "
            f"applied) at step {engine.MAX_SKIPPED}; the last good parameters are saved. Fix: lower --lr (now "
            "0.01,0.03) or --clip.") in capsys.readouterr().err
    np.testing.assert_array_equal(outcome.params["w"], [0.0, 0.0])  # the kept member's, never updated
