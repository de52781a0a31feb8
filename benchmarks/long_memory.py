"""A long-memory task: the adding problem (Hochreiter & Schmidhuber 1997).

    rnnjax-bench memory [--cell elman,lru,mingru] [--time 200] [--steps 1500]

Each sequence has ``T`` steps of two inputs: a value uniform in ``[0, 1]``
and a marker that is 1 at one random step of the first half and one of the
second half; the target is the sum of the two marked values, read at the
last step. Predicting the mean gives MSE 1/6 ≈ 0.167; a model that
remembers the first value across up to ``T`` steps gets near 0.

Every cell gets the same model (dense input projection to ``H``, two
:func:`rnnjax.layers.residual_block` of the cell, RMS norm, dense readout of
the last step), the same data, optimiser (AdamW with a warmup and cosine
decay, clipping at 1) and step count. Reported: the MSE on 1,000 held-out
sequences during and after training, and the wall time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

PROG = "rnnjax-bench memory"
CELLS = ("elman", "gru", "lstm", "lru", "mingru", "minlstm", "rglru")


def adding_batch(rng, batch: int, T: int):
    """``(x [batch, T, 2], y [batch])`` of the adding problem, from a NumPy ``Generator``."""
    import numpy as np

    values = rng.random((batch, T))
    first = rng.integers(0, T // 2, batch)
    second = rng.integers(T // 2, T, batch)
    marks = np.zeros((batch, T))
    marks[np.arange(batch), first] = 1.0
    marks[np.arange(batch), second] = 1.0
    x = np.stack([values, marks], -1).astype(np.float32)
    return x, (values * marks).sum(1).astype(np.float32)


def cell_for(name: str, hidden: int):
    from rnnjax import cells

    options = {"lru": dict(r_min=0.9, r_max=0.999, max_phase=3.14 / 10)}  # the paper's long-range ring
    return getattr(cells, name)(hidden, **options.get(name, {}))


def train(name: str, *, T: int, steps: int, batch: int, hidden: int, lr: float, seed: int, evals: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from rnnjax import layers

    cell = cell_for(name, hidden)
    inp, readout = layers.dense(hidden), layers.dense(1)
    blocks = layers.stack([layers.residual_block(cell), layers.residual_block(cell)])

    def init(key):
        k1, k2, k3 = jax.random.split(key, 3)
        return dict(inp=inp.init(k1, 2), blocks=blocks.init(k2, hidden), norm=jnp.ones(hidden),
                    out=readout.init(k3, hidden))

    def predict(params, x):
        _, h = blocks.apply(params["blocks"], inp.apply(params["inp"], x))
        return readout.apply(params["out"], layers.rms_norm(h[:, -1], params["norm"]))[:, 0]

    def loss(params, x, y):
        return jnp.mean((predict(params, x) - y) ** 2)

    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(100, steps // 10), steps)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.0))

    @jax.jit
    def step(params, state, x, y):
        value, grads = jax.value_and_grad(loss)(params, x, y)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    rng = np.random.default_rng(seed)
    x_test, y_test = adding_batch(np.random.default_rng(10_000 + seed), 1000, T)
    evaluate = jax.jit(loss)
    params = init(jax.random.key(seed))
    state = opt.init(params)
    curve, start = [], time.perf_counter()
    for i in range(1, steps + 1):
        params, state, _ = step(params, state, *adding_batch(rng, batch, T))
        if i % max(1, steps // evals) == 0 or i == steps:
            curve.append((i, float(evaluate(params, x_test, y_test))))
    return dict(cell=name, T=T, steps=steps, batch=batch, hidden=hidden, lr=lr, seed=seed,
                test_mse=curve[-1][1], curve=curve, seconds=time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--cell", default="elman,lru,mingru", help=f"comma list of {', '.join(CELLS)}")
    p.add_argument("--time", type=int, default=200, help="sequence length T (default 200)")
    p.add_argument("--steps", type=int, default=1500, help="training steps (default 1500)")
    p.add_argument("--batch", type=int, default=64, help="sequences per step (default 64)")
    p.add_argument("--hidden", type=int, default=64, help="width H of the blocks (default 64)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default 3e-3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--evals", type=int, default=5, help="held-out evaluations during training (default 5)")
    p.add_argument("--json", metavar="FILE", help="append one JSON line per cell")
    try:
        args = p.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    names = [c for c in args.cell.split(",") if c]
    unknown = [c for c in names if c not in CELLS]
    if unknown or not names or min(args.time, args.steps, args.batch, args.hidden, args.evals) < 2 or args.lr <= 0:
        what = (f"unknown --cell {', '.join(unknown)}; expected a comma list of {', '.join(CELLS)}"
                if unknown or not names else "--time, --steps, --batch, --hidden and --evals must be >= 2 and "
                                             "--lr positive")
        print(f"{PROG}: error: {what}.", file=sys.stderr)
        return 2
    print(f"adding problem, T = {args.time}: test MSE (predicting the mean: 0.167)", flush=True)
    for name in names:
        row = train(name, T=args.time, steps=args.steps, batch=args.batch, hidden=args.hidden, lr=args.lr,
                    seed=args.seed, evals=args.evals)
        curve = "  ".join(f"{i}: {mse:.4f}" for i, mse in row["curve"])
        print(f"{name:>8}  final {row['test_mse']:.4f}  ({row['seconds']:.0f} s)   {curve}", flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
