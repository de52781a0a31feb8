"""`rnnjax eval` on a run whose newest checkpoint lost an array file, in many fresh processes.

    python -m tests.faults.eval_corrupt --evals 20

Trains one tiny `rnnjax train charlm` run whose checkpoints of steps 40 and 80 are both kept, deletes
(or with ``--how truncated``, halves) the largest array file under ``params/`` of step 80 -- the damage
that used to end in Orbax's ``RuntimeError: Event loop is closed`` traceback after the message, in about
1 run of 5 -- then runs ``rnnjax eval --checkpoint RUN --latest`` ``--evals`` times, each in a fresh
process. A run is clean when it exits with status 2, prints nothing on stdout and exactly the one line
naming the damaged checkpoint and the readable one on stderr, with no traceback. Prints one line per
run and a total; exits 1 unless every run was clean.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
from pathlib import Path

from tests.faults import runs


def kept_run(base: Path) -> Path:
    """A tiny 80-step run holding its checkpoints of steps 40 and 80 (as a run whose validation loss
    got worse at the end would: the run itself keeps only the best)."""
    run = base / "run"
    watcher = threading.Thread(target=runs.copy_when_written, args=(run / "checkpoints" / "40", base / "step40"))
    watcher.start()
    proc = runs.start(runs.train_args(runs.tiny_text(base / "tiny.txt"), run), base / "cache")
    _, err = proc.communicate(timeout=1800)
    watcher.join()
    assert proc.returncode == 0, f"the training run failed: {err[-2000:]}"
    shutil.copytree(base / "step40", run / "checkpoints" / "40")
    return run


def expected_line(run: Path) -> str:
    checkpoints, step_dir = run / "checkpoints", run / "checkpoints" / "80"
    return (f"rnnjax: error: rnnjax.checkpoint: the checkpoint at step 80 in {str(checkpoints)!r} is damaged: its "
            "parameters (params/) cannot be read (a file in it is truncated, zeroed or missing); readable "
            "checkpoints: step 40. Fix: use step 40 (rnnjax eval/generate --step 40; rnnjax train --resume falls "
            f"back to it by itself), or restore {str(step_dir)!r} from a backup.\n")


def one_eval(run: Path, cache: Path) -> tuple[bool, str]:
    """``(clean, what was wrong)`` of one ``rnnjax eval`` in a fresh process."""
    proc = runs.start(["eval", "--checkpoint", str(run), "--latest"], cache)
    out, err = proc.communicate(timeout=600)
    problems = []
    if proc.returncode != 2:
        problems.append(f"status {proc.returncode}")
    if "Traceback" in err or "Event loop is closed" in err:
        problems.append("a traceback" + (" (Event loop is closed)" if "Event loop is closed" in err else ""))
    if out or err != expected_line(run):
        problems.append(f"output other than the one line: {(out + err)[-300:]!r}")
    return not problems, "; ".join(problems)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--evals", type=int, default=20, help="fresh `rnnjax eval` processes")
    p.add_argument("--how", choices=["deleted", "truncated"], default="deleted", help="the damage to the file")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        run = kept_run(base)
        runs.damage(runs.params_data_file(run / "checkpoints" / "80"), a.how)
        clean = 0
        for i in range(a.evals):
            ok, problems = one_eval(run, base / "cache")
            clean += ok
            print(f"eval {i}: {'clean: one line, status 2' if ok else problems}", flush=True)
    print(f"total: {clean} of {a.evals} clean (status 2, the one line, no traceback)", flush=True)
    return 0 if clean == a.evals else 1


if __name__ == "__main__":
    sys.exit(main())
