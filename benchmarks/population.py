"""``rnnjax-bench population``: N language models trained by one compiled step against N sequential runs.

    rnnjax-bench population [--members 8] [--hidden 16,32,64,128,256] [--batch 16] [--time 64] [--rounds 7]
    rnnjax-bench population --sweep 100,1000 [--members 8] [--hidden 128] [--rounds 3]

Per step (the default): each round times, in rotated order, one step of the
population (:func:`rnnjax.train.make_population_step`, members with their own
seeds and learning rates on a shared batch) with ``strategy="vmap"`` and with
``strategy="map"``, and the same step of every member run one after another
with :func:`rnnjax.train.make_train_step` (what N separate runs do), and one
step of a single model on the members' N batches stacked into one ``N*B``
batch: the same element-wise work and matmul rows as the population, with
the best batching XLA gives one model, so ``N single steps / that step``
bounds what any population strategy could reach at that shape (``bound``).
Reports the medians and the ratios, after compile and warm-up.

``--sweep STEPS``: what a user waits for. Each round times, in alternating
order and each in a fresh process, ``rnnjax train charlm --steps STEPS
--population N --lr l1,...,lN`` and the N commands ``rnnjax train charlm
--steps STEPS --lr li --seed i`` one after another (the same models: member i
starts from seed i), start-up, data, compilation, evaluations and
checkpoints included. Reports the medians and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time

PROG = "rnnjax-bench population"


def measure(members: int, hidden: int, batch: int, time_steps: int, rounds: int, vocab: int = 65) -> dict:
    import jax
    import numpy as np

    from rnnjax import train
    from rnnjax.models import language_model

    model = language_model(vocab, layers=1, hidden=hidden, embed=min(hidden, 64))
    opt = train.default_optimizer(2e-3, total_steps=1000)
    lrs = np.geomspace(1e-3, 1e-2, members)

    def states():
        out = []
        for i, lr in enumerate(lrs):
            s = train.init_train_state(model.init(jax.random.key(i)), opt, jax.random.key(1000 + i))
            out.append(s._replace(opt_state=train.set_hyperparams(s.opt_state, learning_rate=float(lr))))
        return out

    rng = np.random.default_rng(0)
    batch_ = {k: rng.integers(0, vocab, size=(batch, time_steps)) for k in ("x", "y")}
    batch_ = jax.tree_util.tree_map(jax.numpy.asarray, batch_)
    loss_fn = train.language_model_loss(model)
    single_step = train.make_train_step(loss_fn, opt)
    box = {"singles": states()}

    def population(strategy):
        step = train.make_population_step(loss_fn, opt, strategy=strategy)
        box[strategy] = train.stack_states(states())

        def run():
            box[strategy], metrics = step(box[strategy], batch_)
            jax.block_until_ready(metrics)

        return run

    def run_sequential():
        for i, state in enumerate(box["singles"]):
            box["singles"][i], metrics = single_step(state, batch_)
            jax.block_until_ready(metrics)

    stacked = jax.tree_util.tree_map(lambda x: jax.numpy.tile(x, (members, 1)), batch_)
    box["batched"] = states()[0]

    def run_batched():
        box["batched"], metrics = single_step(box["batched"], stacked)
        jax.block_until_ready(metrics)

    runners = {"vmap": population("vmap"), "map": population("map"), "sequential": run_sequential,
               "batched": run_batched}
    for run in runners.values():  # compile, then warm up
        run()
        run()
    samples = {name: [] for name in runners}
    names = list(runners)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotated each round
            start = time.perf_counter()
            runners[name]()
            samples[name].append(time.perf_counter() - start)
    med = {name: statistics.median(v) for name, v in samples.items()}
    return dict(members=members, hidden=hidden, batch=batch, time=time_steps, vmap_s=med["vmap"], map_s=med["map"],
                sequential_s=med["sequential"], batched_s=med["batched"], vmap_speedup=med["sequential"] / med["vmap"],
                map_speedup=med["sequential"] / med["map"], bound=med["sequential"] / med["batched"])


def sweep(members: int, hidden: int, steps: int, rounds: int) -> dict:
    """Wall seconds of one population command against ``members`` single commands (see the module doc)."""
    import numpy as np

    lrs = [f"{lr:.3g}" for lr in np.geomspace(1e-3, 1e-2, members)]
    common = [sys.executable, "-m", "rnnjax", "train", "charlm", "--steps", str(steps), "--hidden", str(hidden),
              "--sample-length", "0", "--eval-sample-length", "0", "--evals", "2", "--no-plot", "--overwrite"]

    def timed(commands):
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            for i, argv in enumerate(commands):
                done = subprocess.run(argv + ["--out", f"{tmp}/run{i}"], capture_output=True, text=True)
                if done.returncode:
                    raise RuntimeError(f"{PROG}: {' '.join(argv)} failed:\n{done.stderr[-2000:]}")
            return time.perf_counter() - start

    runs = {"population": [common + ["--lr", ",".join(lrs)]],
            "sequential": [common + ["--lr", lr, "--seed", str(i)] for i, lr in enumerate(lrs)]}
    samples = {name: [] for name in runs}
    for r in range(rounds):
        for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            samples[name].append(timed(runs[name]))
    pop, seq = statistics.median(samples["population"]), statistics.median(samples["sequential"])
    return dict(members=members, hidden=hidden, steps=steps, population_s=pop, sequential_s=seq, speedup=seq / pop)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--members", type=int, default=8)
    p.add_argument("--hidden", default="16,32,64,128,256", help="comma list of LSTM widths (default 16,...,256)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--time", type=int, default=64)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--sweep", default=None, metavar="STEPS",
                   help="time whole `rnnjax train charlm` commands of these comma-separated step counts instead "
                        "(--hidden: one width; --batch and --time are the command's defaults, 64 x 8)")
    args = p.parse_args(argv)
    widths = [int(h) for h in args.hidden.split(",")]
    if args.members < 2 or args.rounds < 1 or min(widths) < 1:
        print(f"{PROG}: error: expected --members >= 2, --rounds >= 1 and positive --hidden; got --members "
              f"{args.members} --rounds {args.rounds} --hidden {args.hidden}", file=sys.stderr)
        return 2
    if args.sweep is not None:
        parts = args.sweep.split(",")
        if not all(part.isdigit() and int(part) > 0 for part in parts):
            print(f"{PROG}: error: --sweep expects comma-separated positive step counts, e.g. 100,1000; got "
                  f"{args.sweep!r}", file=sys.stderr)
            return 2
        print(f"{'members':>7} {'H':>5} {'steps':>6} {'one population command':>23} {'N single commands':>18} "
              f"{'speedup':>8}")
        for steps in map(int, parts):
            for h in widths:
                r = sweep(args.members, h, steps, args.rounds)
                print(f"{r['members']:>7} {h:>5} {steps:>6} {r['population_s']:>21.1f} s {r['sequential_s']:>16.1f} s "
                      f"{r['speedup']:>7.2f}x", flush=True)
        return 0
    print(f"{'members':>7} {'H':>5} {'B':>4} {'T':>4} {'vmap step':>10} {'map step':>10} {'N single steps':>15} "
          f"{'1 step of N*B':>14} {'vmap speedup':>13} {'map speedup':>12} {'bound':>7}")
    for h in widths:
        r = measure(args.members, h, args.batch, args.time, args.rounds)
        print(f"{r['members']:>7} {h:>5} {r['batch']:>4} {r['time']:>4} {r['vmap_s'] * 1e3:>7.1f} ms "
              f"{r['map_s'] * 1e3:>7.1f} ms {r['sequential_s'] * 1e3:>12.1f} ms {r['batched_s'] * 1e3:>11.1f} ms "
              f"{r['vmap_speedup']:>12.2f}x {r['map_speedup']:>11.2f}x {r['bound']:>6.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
