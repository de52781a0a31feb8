"""Faults a training run meets (issue 19): SIGTERM, two runs in one directory, damaged checkpoints,
a full disk, bad data values. Each test injects one and checks that nothing is lost; the long seeded
repetitions are in ``tests/faults/`` (run on their own, see docs/guides/training.md, "Faults")."""

from __future__ import annotations

import gc
import re
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from rnnjax import checkpoint, cli
from tests.faults import runs


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    return runs.tiny_text(tmp_path_factory.mktemp("data") / "tiny.txt")


@pytest.fixture(scope="module")
def reference(text, tmp_path_factory):
    """An uninterrupted 80-step run, the one every interrupted run must end equal to. Its checkpoint of
    step 40 (deleted by the run once a better one is saved) is copied aside as it appears, to
    ``reference/../step40``."""
    out = tmp_path_factory.mktemp("reference") / "run"
    watcher = threading.Thread(target=_copy_when_written, args=(out / "checkpoints" / "40", out.parent / "step40"))
    watcher.start()
    assert cli.main(runs.train_args(text, out)) == 0
    watcher.join()
    assert (out.parent / "step40").is_dir() and runs.steps_on_disk(out) == [80]
    return out


def _copy_when_written(src: Path, dst: Path, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not src.is_dir() and time.monotonic() < deadline:  # Orbax renames a finished save into place
        time.sleep(0.002)
    shutil.copytree(src, dst)


def test_sigterm_saves_stops_and_resumes_exactly(text, reference, tmp_path, capsys):
    run = tmp_path / "run"
    proc = runs.start(runs.train_args(text, run, 80, "--save-every-steps", "5"), tmp_path / "cache")
    runs.wait_for_checkpoint(run, proc, 10)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    assert "SIGTERM received: stopping after this step and saving a checkpoint (SIGTERM again to quit at once)" in err
    stopped = int(re.search(r"rnnjax: stopped by SIGTERM; checkpoint of step (\d+) saved in '.*checkpoints'\. "
                            r"Resume with: rnnjax train charlm --out .* --resume\n", err)[1])
    assert 10 <= stopped < 80 and runs.steps_on_disk(run)[-1] == stopped
    assert checkpoint.open_run(run)[1] == stopped

    assert cli.main(["train", "charlm", "--out", str(run), "--resume"]) == 0
    assert f"resuming at step {stopped}" in capsys.readouterr().err
    assert runs.same_state(reference, run)
    assert runs.metrics_steps(run) == [20, 40, 60, 80]


def test_a_second_run_into_a_live_runs_directory_is_refused_and_a_dead_runs_lock_blocks_nothing(
        text, tmp_path, capsys):
    run = tmp_path / "run"
    proc = runs.start(runs.train_args(text, run, 5000, "--save-every-steps", "5"), tmp_path / "cache")
    try:
        runs.wait_for_checkpoint(run, proc, 5)
        refused = (f"rnnjax: error: rnnjax train charlm: --out {str(run)!r} is being written by another run (process "
                   f"{proc.pid}, `rnnjax train charlm`); two runs in one directory would overwrite each other's "
                   "checkpoints. Fix: wait for it to finish or stop it, or choose another --out.\n")
        for again in (["--resume"], ["--overwrite"], []):
            assert cli.main(runs.train_args(text, run, 20, *again)) == 2
            assert capsys.readouterr().err == refused
    finally:
        proc.kill()
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert (run / "rnnjax.lock").read_text() == f"{proc.pid}, `rnnjax train charlm`\n"  # left by the dead run

    killed_at = checkpoint.open_run(run)[1]
    assert cli.main(["train", "charlm", "--out", str(run), "--resume", "--steps", str(killed_at + 2)]) == 0
    assert f"resuming at step {killed_at}" in capsys.readouterr().err
    assert runs.steps_on_disk(run)[-1] == killed_at + 2 and not (run / "rnnjax.lock").exists()


# ----------------------------------------------------------------------------
# Damaged checkpoints

DAMAGE = {"truncated": lambda b: b[:len(b) // 2], "zeroed": lambda b: bytes(len(b)), "deleted": None}


def damage(path: Path, how: str) -> None:
    if DAMAGE[how] is None:
        path.unlink()
    else:
        path.write_bytes(DAMAGE[how](path.read_bytes()))


def params_data_file(step_dir: Path) -> Path:
    """The largest array data file of a checkpoint's parameters."""
    return max((step_dir / "params" / "ocdbt.process_0" / "d").iterdir(), key=lambda p: p.stat().st_size)


@pytest.fixture
def two_checkpoints(reference, tmp_path):
    """A copy of the reference run holding its checkpoints of steps 40 and 80 (as a run whose validation
    loss got worse at the end would)."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    shutil.copytree(reference.parent / "step40", run / "checkpoints" / "40")
    return run


def _files(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("part,how", [("params data", "truncated"), ("params data", "zeroed"),
                                      ("params data", "deleted"), ("params/manifest.ocdbt", "zeroed"),
                                      ("meta/metadata", "truncated")])
def test_eval_and_generate_on_a_damaged_newest_checkpoint_say_so_in_one_clean_line(two_checkpoints, capfd, part,
                                                                                     how, monkeypatch):
    run, step_dir = two_checkpoints, two_checkpoints / "checkpoints" / "80"
    unraisable = []  # what Python would print as tracebacks after the message (e.g. "Event loop is closed")
    monkeypatch.setattr(sys, "unraisablehook", lambda u: unraisable.append(f"{u.exc_type.__name__}: {u.exc_value}"))
    damage(params_data_file(step_dir) if part == "params data" else step_dir / part, how)
    before = _files(run)
    what = "its meta (meta/)" if part.startswith("meta") else "its parameters (params/)"
    expected = (f"rnnjax: error: rnnjax.checkpoint: the checkpoint at step 80 in {str(run / 'checkpoints')!r} is "
                f"damaged: {what} cannot be read (a file in it is truncated, zeroed or missing); readable "
                "checkpoints: step 40. Fix: use step 40 (rnnjax eval/generate --step 40; rnnjax train --resume falls "
                f"back to it by itself), or restore {str(step_dir)!r} from a backup.\n")
    for command in (["eval"], ["generate", "--length", "5"]):
        assert cli.main([*command, "--checkpoint", str(run), "--latest"]) == 2
        gc.collect()
        time.sleep(0.2)  # Orbax's abandoned reads finish in other threads
        out, err = capfd.readouterr()
        assert (out, err) == ("", expected)
    assert unraisable == []
    assert _files(run) == before  # nothing deleted or rewritten
    assert cli.main(["eval", "--checkpoint", str(run), "--step", "40"]) == 0
    assert "lstm-1x16 at step 40: " in capfd.readouterr().out


def test_resume_continues_from_the_newest_readable_checkpoint_and_keeps_the_damaged_one(two_checkpoints, reference,
                                                                                         capsys):
    run = two_checkpoints
    damage(run / "checkpoints" / "80" / "train" / "manifest.ocdbt", "truncated")
    damaged = _files(run / "checkpoints" / "80")
    assert cli.main(["train", "charlm", "--out", str(run), "--resume", "--steps", "80"]) == 0
    err = capsys.readouterr().err
    moved = run / "checkpoints" / "80.damaged"
    assert (f"rnnjax: the checkpoint at step 80 is damaged (its training state (train/) cannot be read); resuming "
            f"from step 40, the newest readable one. The damaged one is kept, moved to {str(moved)!r}.\n") in err
    assert "resuming at step 40" in err and "Traceback" not in err
    assert _files(moved) == damaged
    assert runs.same_state(reference, run)  # 40 -> 80 again, bit for bit
    assert runs.metrics_steps(run) == [20, 40, 60, 80]
