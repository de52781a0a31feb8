"""Faults a training run meets (issue 19): SIGTERM, two runs in one directory, damaged checkpoints,
a full disk, bad data values. Each test injects one and checks that nothing is lost; the long seeded
repetitions are in ``tests/faults/`` (run on their own, see docs/guides/training.md, "Faults")."""

from __future__ import annotations

import re
import signal

import pytest

from rnnjax import checkpoint, cli
from tests.faults import runs


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    return runs.tiny_text(tmp_path_factory.mktemp("data") / "tiny.txt")


@pytest.fixture(scope="module")
def reference(text, tmp_path_factory):
    """An uninterrupted 80-step run, the one every interrupted run must end equal to."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert cli.main(runs.train_args(text, out)) == 0
    return out


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
