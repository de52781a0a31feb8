"""Faults a training run meets (issue 19): SIGTERM, two runs in one directory, damaged checkpoints,
a full disk, bad data values. Each test injects one and checks that nothing is lost; the long seeded
repetitions are in ``tests/faults/`` (run on their own, see docs/guides/training.md, "Faults")."""

from __future__ import annotations

import errno
import gc
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
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
    watcher = threading.Thread(target=runs.copy_when_written, args=(out / "checkpoints" / "40", out.parent / "step40"))
    watcher.start()
    assert cli.main(runs.train_args(text, out)) == 0
    watcher.join()
    assert (out.parent / "step40").is_dir() and runs.steps_on_disk(out) == [80]
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


# ----------------------------------------------------------------------------
# Damaged checkpoints

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
    runs.damage(runs.params_data_file(step_dir) if part == "params data" else step_dir / part, how)
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
    runs.damage(run / "checkpoints" / "80" / "train" / "manifest.ocdbt", "truncated")
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


# ----------------------------------------------------------------------------
# A full disk


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_a_full_disk_stops_the_run_in_one_line_keeping_checkpoints_and_metrics(text, reference, tmp_path, capfd):
    """A real full disk: a 400 KiB tmpfs (root only), then room again and --resume."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "400k"):
        pytest.skip("mounting a tmpfs needs root")
    try:
        run = disk / "run"
        assert cli.main(runs.train_args(text, run, 80, "--save-every-steps", "5")) == 1
        gc.collect()
        time.sleep(0.2)
        err = capfd.readouterr().err
        kept = runs.steps_on_disk(run)
        assert kept and kept[-1] < 80
        line = (f"rnnjax: error: rnnjax train charlm: a checkpoint (step {kept[-1] + 5} or later) could not be written "
                f"in {str(run / 'checkpoints')!r}: the disk is full (no space left on device); the complete "
                f"checkpoints are kept (step {', '.join(map(str, kept))}; an unfinished one is cleared on --resume). "
                f"The run stopped. Fix: free space on the disk (or copy the run elsewhere), then resume with: "
                f"rnnjax train charlm --out {run} --resume\n")
        assert err.endswith(line) and "Traceback" not in err and "RESOURCE_EXHAUSTED" not in err
        records = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]  # whole lines only
        # Saves run in the background: the failed one (step kept[-1] + 5) reports its error when the next one starts,
        # at kept[-1] + 10, after that step's evaluation line is written. So the lines run up to two saves past the
        # last complete checkpoint (one where the error surfaced sooner), never further; --resume rewrites them.
        steps = [r["step"] for r in records]
        assert steps in [[s for s in (20, 40, 60, 80) if s <= kept[-1] + lag] for lag in (5, 10)], (steps, kept)
        assert checkpoint.open_run(run)[1] == kept[-1] and runs.final_state(run)[0]["step"] == kept[-1]

        assert subprocess.run(["mount", "-o", "remount,size=8m", str(disk)]).returncode == 0  # room again
        assert cli.main(["train", "charlm", "--out", str(run), "--resume"]) == 0
        assert runs.same_state(reference, run)
        assert runs.metrics_steps(run) == runs.metrics_steps(reference)  # no line twice
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_metrics_that_cannot_be_written_stop_the_run_and_the_file_stays_whole(text, tmp_path, capsys, monkeypatch):
    """ENOSPC on the third write of metrics.jsonl (patched): the second one's content stays."""
    run, writes, real = tmp_path / "run", [], Path.write_text

    def write_text(self, data, *args, **kwargs):
        if self.name == "metrics.jsonl.tmp":
            writes.append(data)
            if len(writes) == 3:
                real(self, data[:10], *args, **kwargs)  # a partial write, then the disk is full
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    assert cli.main(runs.train_args(text, run, 80)) == 1
    assert capsys.readouterr().err.endswith(
        f"rnnjax: error: rnnjax train charlm: metrics.jsonl could not be written in {str(run)!r}: the disk is full (no "
        "space left on device); the previous one is kept whole. The run stopped. Fix: free space on the disk (or copy "
        f"the run elsewhere), then resume with: rnnjax train charlm --out {run} --resume\n")
    assert (run / "metrics.jsonl").read_text() == writes[1] and not (run / "metrics.jsonl.tmp").exists()
    assert runs.metrics_steps(run) == [20] and checkpoint.open_run(run)[1] == 20


# ----------------------------------------------------------------------------
# Bad data values

TS = """@problemName Tiny
@univariate true
@classLabel true a b
@data
1,2,3,4:a
2,3,4,5:b
1,2,?,4:a
2,3,4,5:b
"""


@pytest.mark.parametrize("value", ["inf", "-Infinity", "1e39"])  # 1e39 overflows float32
def test_classify_refuses_infinite_features_naming_their_position(tmp_path, capsys, value):
    train = tmp_path / "Tiny_TRAIN.ts"
    train.write_text(TS.replace("2,3,4,5:b\n1,2,?", f"2,3,4,5:b\n1,{value},?"), encoding="utf-8")
    shutil.copy(train, tmp_path / "Tiny_TEST.ts")
    out = tmp_path / "run"
    assert cli.main(["train", "classify", "--dataset", str(train), "--steps", "2", "--out", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"rnnjax: error: rnnjax train classify: rnnjax.data.read_ts: {str(train)!r}, line 7: dimension 1, value 2 is "
        f"{value!r}, which is not a finite float32 number. Fix: correct the value, or write ? for a missing one.\n")
    assert not out.exists()


def test_classify_reads_nan_and_question_marks_as_missing_values_and_fills_them(tmp_path):
    from rnnjax import data

    path = tmp_path / "Tiny_TRAIN.ts"
    path.write_text(TS.replace("1,2,?,4", "1,NaN,?,4"), encoding="utf-8")
    d = data.read_ts(path)
    assert np.isnan(d["x"][2, 1:3, 0]).all()  # missing, as the .ts format defines them
    np.testing.assert_array_equal(data.fill_missing(d["x"], d["lengths"])[2, :, 0], [1, 1, 1, 4])


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_forecast_refuses_a_non_finite_series_naming_the_step(tmp_path, capsys, monkeypatch, value):
    from rnnjax import data

    series = np.sin(np.arange(400, dtype=np.float32) / 7.0)
    series[123] = value
    monkeypatch.setattr(data, "load_series", lambda name: {"values": series, "period": 48, "name": name,
                                                           "description": "a test series"})
    out = tmp_path / "run"
    assert cli.main(["train", "forecast", "--dataset", "taylor", "--steps", "2", "--out", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"rnnjax: error: rnnjax train forecast: the series 'taylor' has a non-finite value ({value}) at step 123 of "
        "400; expected finite values. Fix: fill or drop its missing values first.\n")
    assert not out.exists()
    with pytest.raises(ValueError) as e:
        data.sliding_windows(np.stack([np.zeros_like(series), series], axis=1), 8, 2)
    assert str(e.value) == (f"rnnjax.data.sliding_windows: expected finite values, got {value} at step 123, feature 1 "
                            "of the series. Fix: fill or drop missing values first (e.g. interpolate them, or "
                            "rnnjax.data.fill_missing).")
    x, y = data.sliding_windows(series, 8, 2, stop=120)  # the part before it is fine
    assert np.isfinite(x).all() and x.shape == (111, 8, 1)


def test_a_text_with_a_byte_order_mark_and_crlf_trains_exactly_as_its_plain_twin(text, tmp_path):
    """A BOM is dropped and CRLF read as LF (as Windows editors write them): same vocabulary, same model."""
    plain = text.read_text(encoding="utf-8")
    windows = tmp_path / "windows.txt"
    windows.write_bytes(b"\xef\xbb\xbf" + plain.replace("\n", "\r\n").encode("utf-8"))
    for name, path in (("plain", text), ("windows", windows)):
        assert cli.main(["train", "charlm", "--text", str(path), "--steps", "4", "--evals", "1", *runs.TINY,
                         "--out", str(tmp_path / name), "--no-plot"]) == 0
    assert runs.final_state(tmp_path / "plain")[0]["vocab"] == runs.final_state(tmp_path / "windows")[0]["vocab"]
    assert runs.same_state(tmp_path / "plain", tmp_path / "windows")


def test_a_single_two_megabyte_line_works(tmp_path, capsys):
    """No line structure is assumed: one long line is a text like any other (100 MB works the same way,
    given the memory: 4 bytes per character for the ids)."""
    rng = np.random.default_rng(0)
    words = np.array("to be or not that is the question".split())
    line = " ".join(rng.choice(words, 700_000))[:2_000_000]
    assert len(line) == 2_000_000
    path = tmp_path / "one_line.txt"
    path.write_text(line, encoding="utf-8")
    out = tmp_path / "run"
    assert cli.main(["train", "charlm", "--text", str(path), "--steps", "2", "--evals", "1", *runs.TINY,
                     "--out", str(out), "--no-plot"]) == 0
    assert "1,800,000 train / 200,000 validation characters" in capsys.readouterr().err
    assert runs.final_state(out)[0]["vocab"]["chars"] == "".join(sorted(set(line)))
