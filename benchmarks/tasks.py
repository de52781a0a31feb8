"""``rnnjax-bench tasks``: every ``rnnjax train TASK`` with fixed seeds (default settings, except the
GRU copy run's step count, below), each against a baseline, and the memory sweeps; writes a results
table.

    rnnjax-bench tasks                                   # all runs, table on stdout
    rnnjax-bench tasks --only classify,digits --markdown results.md --json results.jsonl
    rnnjax-bench tasks --only adding-sweep --sweep-lengths 50,100,200,400 --sweep-steps 600 --plots docs

Each run is the command shown in the table, started as a fresh process (its
wall time is the whole command's: start-up, compilation, training,
evaluations and the test), writing into ``--out/<name>``. The baselines:

- classification: logistic regression (scikit-learn) on each channel's mean,
  standard deviation, first and last value over the valid steps (digits: on
  the 64 pixels), fitted on the same training part;
- adding: predicting the mean (MSE 1/6); copy: guessing a symbol (1/8);
- forecasting: seasonal naive (the value one season earlier) and ridge
  regression on the same lag window (both computed by the run itself).

The GRU copy run asks for ``--steps 7000`` (the default 3,000 suit the
LSTM; the GRU needs more steps to pass 99%).

``adding-sweep`` trains Elman, GRU and LSTM on the adding problem for each T
of ``--sweep-lengths`` with ``--sweep-steps`` steps and plots test MSE
against T; ``copy`` runs GRU and LSTM at delay 100 and plots their
validation accuracy against steps.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PROG = "rnnjax-bench tasks"
# name -> (rnnjax train arguments, metric key, what the metric is)
RUNS = {
    "classify": (["classify", "--dataset", "japanese_vowels"], "test_accuracy", "JapaneseVowels test accuracy"),
    "digits": (["digits"], "test_accuracy", "digits (64 pixel steps) test accuracy"),
    "adding": (["adding", "--length", "200", "--cell", "lstm"], "test_mse", "adding T=200, LSTM: test MSE"),
    "copy-gru": (["copy", "--delay", "100", "--cell", "gru", "--steps", "7000"], "test_accuracy",
                 "copy, delay 100, GRU: recalled-symbol accuracy"),
    "copy-lstm": (["copy", "--delay", "100", "--cell", "lstm"], "test_accuracy",
                  "copy, delay 100, LSTM: recalled-symbol accuracy"),
    "forecast": (["forecast", "--dataset", "taylor", "--horizon", "48"], "test_rmse",
                 "taylor, 48 steps ahead: test RMSE (MW)"),
}
GROUPS = {"copy": ("copy-gru", "copy-lstm"), "adding-sweep": ()}
SWEEP_CELLS = ("elman", "gru", "lstm")


def _train(args: list[str], out: Path, log: Path) -> tuple[dict, float, str]:
    cmd = [sys.executable, "-m", "rnnjax", "train", *args, "--out", str(out), "--overwrite"]
    shown = "rnnjax train " + " ".join(args)
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=f, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{shown} exited with status {proc.returncode}; see {log}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), wall, shown


def _history(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def classification_baseline(name: str) -> float:
    """Test accuracy of logistic regression on summary features (digits: the pixels), trained on the
    training part the run uses (its validation part held out the same way)."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from rnnjax import data

    d = data.load_digits() if name == "digits" else data.load_classification(name)
    kept, _ = data.split(len(d["train"]["y"]), 0.1, seed=0, labels=d["train"]["y"])

    def features(part, idx=None):
        x, n = part["x"], part["lengths"]
        if idx is not None:
            x, n = x[idx], n[idx]
        if name == "digits":
            return x[..., 0]
        x = data.fill_missing(x, n)
        mask = data.valid_mask(n, x.shape[1])[..., None]
        mean = (x * mask).sum(1) / n[:, None]
        std = np.sqrt((((x - mean[:, None]) * mask) ** 2).sum(1) / n[:, None])
        return np.concatenate([mean, std, x[:, 0], x[np.arange(len(n)), n - 1]], axis=1)

    x_tr, x_te = features(d["train"], kept), features(d["test"])
    scaler = StandardScaler().fit(x_tr)
    clf = LogisticRegression(max_iter=5000).fit(scaler.transform(x_tr), d["train"]["y"][kept])
    return float(np.mean(clf.predict(scaler.transform(x_te)) == d["test"]["y"]))


def plot_copy(histories: dict, path: Path) -> None:
    from rnnjax.engine import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for label, hist in histories.items():
        recs = [r for r in hist if "val_accuracy" in r]
        ax.plot([r["step"] for r in recs], [r["val_accuracy"] for r in recs], "o-", ms=3, label=label)
    ax.axhline(1 / 8, color="gray", ls=":", label="chance (1/8)")
    ax.axhline(0.99, color="black", lw=0.6, ls="--", label="99%")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("step")
    ax.set_ylabel("validation accuracy on the recalled symbols")
    ax.set_title("copy task, 10 symbols recalled after a delay of 100", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def plot_sweep(rows: list[dict], path: Path, steps: int) -> None:
    from rnnjax.engine import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for cell in SWEEP_CELLS:
        pts = sorted((r["T"], r["test_mse"]) for r in rows if r["cell"] == cell)
        if pts:
            ax.plot(*zip(*pts), "o-", label=cell)
    ax.axhline(1 / 6, color="gray", ls=":", label="predicting the mean (1/6)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    Ts = sorted({r["T"] for r in rows})
    ax.set_xticks(Ts, [str(t) for t in Ts])
    ax.set_xlabel("sequence length T")
    ax.set_ylabel("test MSE")
    ax.set_title(f"adding problem: test MSE after {steps} steps (1x64, batch 64)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    save_figure(fig, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=",".join([*RUNS, "adding-sweep"]),
                   help=f"comma list of {', '.join([*RUNS, *GROUPS])} (default: all)")
    p.add_argument("--out", default="runs/bench-tasks", help="folder for the runs (default: %(default)s)")
    p.add_argument("--sweep-lengths", default="50,100,200,400", help="T of the adding sweep (default: %(default)s)")
    p.add_argument("--sweep-steps", type=int, default=500, help="steps per sweep run (default: %(default)s)")
    p.add_argument("--plots", default=None, metavar="DIR", help="also write the sweep and copy plots here")
    p.add_argument("--markdown", default=None, metavar="FILE", help="write the table as Markdown")
    p.add_argument("--json", default=None, metavar="FILE", help="write one JSON line per run")
    p.add_argument("--add-json", default="", metavar="FILES",
                   help="comma list of --json files of earlier invocations: their runs join the table and plots "
                        "(to split the runs into several sessions)")
    args = p.parse_args(argv)
    chosen = []
    for name in [n.strip() for n in args.only.split(",") if n.strip()]:
        if name not in RUNS and name not in GROUPS:
            print(f"{PROG}: error: unknown run {name!r}; known: {', '.join([*RUNS, *GROUPS])}", file=sys.stderr)
            return 2
        chosen.extend(GROUPS.get(name, (name,)) if name != "adding-sweep" else ("adding-sweep",))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plots = [out] + ([Path(args.plots)] if args.plots else [])
    rows, histories, sweep = [], {}, []
    for name in [f for f in args.add_json.split(",") if f]:
        for line in Path(name).read_text().splitlines():
            r = json.loads(line)
            (sweep if "T" in r else rows).append(r)
            if r.get("run", "").startswith("copy-") and r.get("history"):
                histories[r["run"].split("-")[1].upper()] = r["history"]
    for name in chosen:
        if name == "adding-sweep":
            continue
        targs, key, what = RUNS[name]
        m, wall, shown = _train(targs, out / name, out / f"{name}.log")
        if name in ("classify", "digits"):
            dataset = "digits" if name == "digits" else "japanese_vowels"
            baseline = f"logistic regression {classification_baseline(dataset):.2%}"
            value = f"{m[key]:.2%}"
        elif name == "adding":
            baseline, value = f"mean predictor {m['baseline_mse']:.3f}", f"{m[key]:.5f}"
        elif name.startswith("copy"):
            baseline, value = "chance 12.5%", f"{m[key]:.2%}"
            histories[name.split("-")[1].upper()] = _history(out / name)
        else:
            baseline = (f"seasonal naive {m['seasonal_naive_rmse']:.0f} ({m['vs_seasonal_naive'] - 1:+.0%}); "
                        f"ridge on the same window {m['ridge_rmse']:.0f} ({m['vs_ridge'] - 1:+.0%})")
            value = f"{m[key]:.0f}"
        row = {"run": name, "metric": what, "value": value, "baseline": baseline, "wall_s": round(wall, 1),
               "command": shown, "test": m}
        if name.startswith("copy"):
            row["history"] = histories[name.split("-")[1].upper()]
        rows.append(row)
        print(f"{what}: {value} (baseline: {baseline}) in {wall:.0f} s: {shown}", flush=True)
    if histories:
        for d in plots:
            plot_copy(histories, d / "copy-delay100.png")
    if "adding-sweep" in chosen:
        for T in [int(t) for t in args.sweep_lengths.split(",")]:
            for cell in SWEEP_CELLS:
                m, wall, shown = _train(["adding", "--length", str(T), "--cell", cell, "--steps", str(args.sweep_steps),
                                         "--evals", "1"], out / f"sweep-{cell}-{T}", out / f"sweep-{cell}-{T}.log")
                sweep.append({"T": T, "cell": cell, "test_mse": m["test_mse"], "wall_s": round(wall, 1),
                              "steps": args.sweep_steps, "command": shown})
                print(f"adding sweep T={T} {cell}: test MSE {m['test_mse']:.5f} in {wall:.0f} s: {shown}", flush=True)
    if sweep:
        for d in plots:
            plot_sweep(sweep, d / "adding-mse-vs-T.png", sweep[0]["steps"])
    lines = ["| run | result | baseline | wall time | command |", "|---|---|---|---|---|"]
    lines += [f"| {r['metric']} | **{r['value']}** | {r['baseline']} | {r['wall_s']:.0f} s | `{r['command']}` |"
              for r in rows]
    if sweep:
        Ts = sorted({r["T"] for r in sweep})
        lines += ["", f"Adding problem, test MSE after {sweep[0]['steps']} steps:", "",
                  "| cell | " + " | ".join(f"T = {t}" for t in Ts) + " |", "|---|" + "---|" * len(Ts)]
        for cell in SWEEP_CELLS:
            vals = {r["T"]: r["test_mse"] for r in sweep if r["cell"] == cell}
            lines.append(f"| {cell} | " + " | ".join(f"{vals[t]:.4f}" if t in vals else "–" for t in Ts) + " |")
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    if args.json:
        with open(args.json, "w") as f:
            for r in rows + sweep:
                f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
