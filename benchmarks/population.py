"""``rnnjax-bench population``: N language models trained by one vmapped step against N sequential runs.

    rnnjax-bench population [--members 8] [--hidden 16,32,64,128,256] [--batch 16] [--time 64] [--rounds 7]

Each round times, in alternating order, one step of the population
(:func:`rnnjax.train.make_population_step`, members with their own seeds and
learning rates on a shared batch) and the same step of every member run one
after another with :func:`rnnjax.train.make_train_step` (what N separate
runs do). Reports the medians and their ratio, after compile and warm-up.
"""

from __future__ import annotations

import argparse
import statistics
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
    batch_ = {"x": rng.integers(0, vocab, size=(batch, time_steps)), "y": rng.integers(0, vocab, size=(batch, time_steps))}
    batch_ = jax.tree_util.tree_map(jax.numpy.asarray, batch_)
    loss_fn = train.language_model_loss(model)
    pop_step, single_step = train.make_population_step(loss_fn, opt), train.make_train_step(loss_fn, opt)
    box = {"population": train.stack_states(states()), "singles": states()}

    def run_population():
        box["population"], metrics = pop_step(box["population"], batch_)
        jax.block_until_ready(metrics)

    def run_sequential():
        for i, state in enumerate(box["singles"]):
            box["singles"][i], metrics = single_step(state, batch_)
            jax.block_until_ready(metrics)

    runners = {"population": run_population, "sequential": run_sequential}
    for run in runners.values():  # compile, then warm up
        run()
        run()
    samples = {name: [] for name in runners}
    for r in range(rounds):
        for name in (list(runners) if r % 2 == 0 else list(runners)[::-1]):
            start = time.perf_counter()
            runners[name]()
            samples[name].append(time.perf_counter() - start)
    pop, seq = statistics.median(samples["population"]), statistics.median(samples["sequential"])
    return dict(members=members, hidden=hidden, batch=batch, time=time_steps, population_s=pop, sequential_s=seq,
                speedup=seq / pop)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--members", type=int, default=8)
    p.add_argument("--hidden", default="16,32,64,128,256", help="comma list of LSTM widths (default 16,...,256)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--time", type=int, default=64)
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args(argv)
    widths = [int(h) for h in args.hidden.split(",")]
    if args.members < 2 or args.rounds < 1 or min(widths) < 1:
        print(f"{PROG}: error: expected --members >= 2, --rounds >= 1 and positive --hidden; got --members "
              f"{args.members} --rounds {args.rounds} --hidden {args.hidden}")
        return 2
    print(f"{'members':>7} {'H':>5} {'B':>4} {'T':>4} {'population step':>16} {'N sequential steps':>19} {'speedup':>8}")
    for h in widths:
        r = measure(args.members, h, args.batch, args.time, args.rounds)
        print(f"{r['members']:>7} {h:>5} {r['batch']:>4} {r['time']:>4} {r['population_s'] * 1e3:>13.1f} ms "
              f"{r['sequential_s'] * 1e3:>16.1f} ms {r['speedup']:>7.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
