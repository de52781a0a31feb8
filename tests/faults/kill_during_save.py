"""SIGKILL at random moments while checkpoints are written, then --resume, many times (seeded).

    python -m tests.faults.kill_during_save --runs 10 --kills 5 --seed 0

Each run trains the same tiny `rnnjax train charlm` model (80 steps, a checkpoint every 2 steps) in a
subprocess, and kills it ``--kills`` times: once an unfinished checkpoint folder appears (Orbax writes
``<step>.orbax-checkpoint-tmp*`` first and renames it when complete), after a random 0-30 ms. After
each kill it checks that the newest complete checkpoint can be restored and that the one complete
before the kill is still there (or a newer one replaced it), then resumes. Finally it resumes to the
end and compares the training state bit for bit with an uninterrupted run. Prints one line per run
and a total; exits 1 if anything was lost.
"""

from __future__ import annotations

import argparse
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

from tests.faults import runs

STEPS = 80


def _kill_while_saving(proc, run: Path, rng: random.Random, timeout: float = 900.0) -> bool:
    """Kills ``proc`` a random 0-30 ms after an unfinished checkpoint appears; False if it ended first."""
    d, deadline = run / "checkpoints", time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if d.is_dir() and any(".orbax-checkpoint-tmp" in p.name for p in d.iterdir()):
            time.sleep(rng.uniform(0.0, 0.03))
            proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=60)
            return True
        time.sleep(0.001)
    proc.kill()
    raise AssertionError("no checkpoint was written in time")


def _command(run: Path, args: list[str]) -> list[str]:
    """--resume when a complete checkpoint exists; else a new run (--overwrite: killed before its first)."""
    if runs.steps_on_disk(run):
        return ["train", "charlm", "--out", str(run), "--resume"]
    return [*args, "--overwrite"] if (run / "config.json").exists() else args


def one_run(text: Path, reference: Path, work: Path, kills: int, rng: random.Random) -> tuple[int, list[str]]:
    """``(kills done, problems)`` of one run killed up to ``kills`` times and resumed to the end."""
    from rnnjax import checkpoint

    run, problems, done = work / "run", [], 0
    args = runs.train_args(text, run, STEPS, "--save-every-steps", "2")
    for _ in range(kills):
        before = runs.steps_on_disk(run)
        proc = runs.start(_command(run, args), work / "cache")
        if not _kill_while_saving(proc, run, rng):
            break
        done += 1
        after = runs.steps_on_disk(run)
        if before and (not after or after[-1] < before[-1]):
            problems.append(f"kill {done}: the newest complete checkpoint {before[-1]} was lost (left: {after})")
        if after:
            try:
                runs.final_state(run)
            except checkpoint.CheckpointError as e:
                problems.append(f"kill {done}: the newest complete checkpoint cannot be restored: {e}")
    proc = runs.start(_command(run, args), work / "cache")
    _, err = proc.communicate(timeout=3600)
    if proc.returncode != 0:
        problems.append(f"the final --resume failed (status {proc.returncode}): {err.strip().splitlines()[-1:]}")
    elif not runs.same_state(reference, run):
        problems.append("the final state differs from the uninterrupted run's")
    return done, problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--kills", type=int, default=5, help="kills per run")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    rng = random.Random(a.seed)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        text = runs.tiny_text(base / "tiny.txt")
        reference = base / "reference"
        proc = runs.start(runs.train_args(text, reference, STEPS), base / "cache")
        assert proc.communicate(timeout=3600) and proc.returncode == 0, "the reference run failed"
        total, failed = 0, 0
        for i in range(a.runs):
            work = base / f"run{i}"
            work.mkdir()
            done, problems = one_run(text, reference, work, a.kills, rng)
            total += done
            failed += bool(problems)
            print(f"run {i}: killed {done} times during saves; "
                  f"{'; '.join(problems) if problems else 'nothing lost, final state equal bit for bit'}", flush=True)
    print(f"total: {total} kills in {a.runs} runs; {a.runs - failed} of {a.runs} runs lost nothing and ended equal "
          "to the uninterrupted run", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
