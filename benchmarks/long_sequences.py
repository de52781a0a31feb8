"""Memory and compile time against sequence length, remat off and on.

    rnnjax-bench long [--time 1000,10000,100000] [--remat none,316] [--run]

For each T and remat setting it compiles fwd+bwd of a 1-layer LSTM (B=8,
F=H=256 by default) and prints XLA's planned peak memory (arguments +
outputs + temporaries) and the compile time; ``--run`` also executes one
step per setting in a fresh subprocess and reports its peak resident memory
(``ru_maxrss``) and wall time. ``remat=k`` stores the carry every ``k``
steps and recomputes the steps between (``rnnjax.unroll(remat=k)``);
``k ≈ √T`` minimises memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _setting(T: int, remat: str, batch: int, features: int, hidden: int, run: bool) -> dict:
    import jax
    import jax.numpy as jnp

    import rnnjax

    cell = rnnjax.cells.lstm(hidden)
    params = cell.init(jax.random.key(0), features)
    xs = jax.ShapeDtypeStruct((batch, T, features), jnp.float32)
    k = None if remat == "none" else (round(T**0.5) if remat == "sqrt" else int(remat))

    def loss(p, x):
        return jnp.sum(rnnjax.unroll(cell, p, x, remat=k, backend="xla")[1])  # remat is an XLA-path option

    grad = jax.jit(jax.grad(loss))
    start = time.perf_counter()
    compiled = grad.lower(params, xs).compile()
    compile_s = time.perf_counter() - start
    mem = compiled.memory_analysis()
    planned = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
    row = dict(T=T, remat=remat if k is None else k, batch=batch, hidden=hidden, features=features,
               compile_s=round(compile_s, 2), planned_peak_mib=round(planned / 2**20, 1))
    if run:
        x = jnp.asarray(jax.random.normal(jax.random.key(1), (batch, T, features)))
        start = time.perf_counter()
        jax.block_until_ready(compiled(params, x))
        row["run_s"] = round(time.perf_counter() - start, 2)
        row["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="rnnjax-bench long", description=__doc__.split("\n\n")[0])
    parser.add_argument("--time", default="1000,10000,100000")
    parser.add_argument("--remat", default="none,sqrt")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--features", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--run", action="store_true", help="also run each setting once in a subprocess")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:  # a single setting, in this process
        T, remat = args.one.split(":")
        print(json.dumps(_setting(int(T), remat, args.batch, args.features, args.hidden, args.run)))
        return 0
    print(f"{'T':>8} {'remat':>6} {'compile s':>10} {'XLA peak MiB':>13} {'run s':>7} {'RSS MiB':>8}")
    for T in (int(t) for t in args.time.split(",")):
        for remat in args.remat.split(","):
            cmd = [sys.executable, "-m", "benchmarks.long_sequences", "--one", f"{T}:{remat}",
                   "--batch", str(args.batch), "--features", str(args.features), "--hidden", str(args.hidden)]
            out = subprocess.run(cmd + (["--run"] if args.run else []), capture_output=True, text=True)
            if out.returncode:
                print(f"{T:>8} {remat:>6} failed: {out.stderr.strip().splitlines()[-1]}")
                continue
            row = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{T:>8} {str(row['remat']):>6} {row['compile_s']:>10} {row['planned_peak_mib']:>13} "
                  f"{row.get('run_s', '-'):>7} {row.get('peak_rss_mib', '-'):>8}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
