"""Parallel against sequential evaluation of the linear cells: fwd+bwd time,
XLA's planned peak memory and compile time against the sequence length.

    rnnjax-bench parallel [--cell lru,mingru,minlstm,rglru] [--time 16,...,65536] [--batch 8] [--hidden 256]

For each cell and ``T`` three forms of ``rnnjax.unroll(cell, ..., parallel=...)``
are compiled (the gradient of ``sum(ys)`` with respect to the parameters and
the inputs), then timed interleaved in the same rounds (medians after the
compile call and one warm-up call): ``associative`` (``parallel=True``: the
coefficients of all steps at once, ``jax.lax.associative_scan``), ``loop``
(the same with a loop of the multiply-add alone) and ``sequential``
(``parallel=False``: the cell's step in ``lax.scan``). ``speedup`` is the
sequential median over the associative one (``loop_speedup``: over the loop
form); the crossover is the smallest ``T`` from which the associative path
is faster at every longer measured length.

The bound: every form performs the same matrix products (the input
projection and, for the LRU, the readout, forward and backward), so no
evaluation order can take less than their FLOPs (counted from the jaxpr of
the fwd+bwd, :func:`matmul_flops`) divided by the matmul peak measured in
the same run: the faster of a square GEMM (:func:`matmul_peak`) and the
cell's own input projection as one product, ``[B T, F] @ [F, G]`` (summed,
so no fresh ``[B T, G]`` buffer is returned per call), timed in the same
rounds as the three forms (``projection_flops``, FLOP/s: on a CPU whose
square GEMM is slower than that tall product, the square peak alone would
overstate the floor). ``matmul_floor_s``; ``max_speedup``
(sequential time over that floor) is the largest speed-up any parallel
evaluation could reach on this machine.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys

from benchmarks import timing

PROG = "rnnjax-bench parallel"
CELLS = ("lru", "mingru", "minlstm", "rglru")
DEFAULT_TIME = "16,32,64,128,256,512,1024,2048,4096,16384,65536"


FORMS = (("associative", True), ("loop", "loop"), ("sequential", False))
GEMM_SIZE = 2048


def _subjaxprs(value):
    from jax.extend import core

    if isinstance(value, core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, core.Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _subjaxprs(item)


def _jaxpr_matmul_flops(jaxpr) -> int:
    import math

    import numpy as np

    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval
            flops = 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs.shape[d] for d in lhs_contract)
            total += flops * (4 if np.issubdtype(lhs.dtype, np.complexfloating) else 1)
            continue
        if eqn.primitive.name == "while":
            raise ValueError("benchmarks.parallel.matmul_flops: a while loop's trip count is unknown; "
                             "expected only scans (lax.scan), conds and calls.")
        inner = [_jaxpr_matmul_flops(j) for v in eqn.params.values() for j in _subjaxprs(v)]
        if eqn.primitive.name == "cond":
            total += max(inner, default=0)
        else:
            total += sum(inner) * eqn.params.get("length", 1)
    return total


def matmul_flops(fn, *args) -> int:
    """The FLOPs of every matrix product in ``fn(*args)`` (2 per multiply-add, 4x for complex), counted from
    its jaxpr: scan bodies times their length, the larger branch of a cond."""
    import jax

    return _jaxpr_matmul_flops(jax.make_jaxpr(fn)(*args).jaxpr)


def matmul_peak(rounds: int, size: int = GEMM_SIZE) -> float:
    """FLOP/s of a jitted float32 ``[size, size] @ [size, size]`` product, median of ``rounds`` calls."""
    import jax

    a = jax.random.normal(jax.random.key(2), (size, size))
    b = jax.random.normal(jax.random.key(3), (size, size))
    product = jax.jit(lambda a, b: a @ b).lower(a, b).compile()
    result = timing.measure({"gemm": lambda: jax.block_until_ready(product(a, b))}, rounds=rounds, warmup=1)
    return 2 * size**3 / result["gemm"]["median_s"]


def _loss(cell, parallel):
    import jax.numpy as jnp

    import rnnjax

    def loss(p, x):
        return jnp.sum(rnnjax.unroll(cell, p, x, parallel=parallel)[1])

    return loss


def _compiled(cell, params, xs, parallel):
    import time

    import jax

    loss = _loss(cell, parallel)

    start = time.perf_counter()
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, xs).compile()
    compile_s = time.perf_counter() - start
    mem = compiled.memory_analysis()
    planned = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
    return compiled, compile_s, planned


def measure(cell_name: str, T: int, *, batch: int, features: int, hidden: int, rounds: int,
            peak_flops: float) -> dict:
    """One row: the three forms of ``cell_name`` at length ``T``, compiled and timed interleaved with the
    cell's projection product, and the matmul bound from the faster of that product and ``peak_flops``
    (FLOP/s, :func:`matmul_peak`)."""
    import jax
    import jax.numpy as jnp

    from rnnjax import cells

    cell = getattr(cells, cell_name)(hidden)
    params = cell.init(jax.random.key(0), features)
    xs = jax.random.normal(jax.random.key(1), (batch, T, features))
    runs, row = {}, dict(cell=cell_name, T=T, batch=batch, features=features, hidden=hidden, rounds=rounds)
    for name, parallel in FORMS:
        compiled, compile_s, planned = _compiled(cell, params, xs, parallel)
        runs[name] = (lambda c=compiled: jax.block_until_ready(c(params, xs)))
        row[f"{name}_compile_s"] = compile_s
        row[f"{name}_peak_mib"] = planned / 2**20
    rows_x = xs.reshape(batch * T, features)
    projection = jax.jit(lambda p, x: jnp.sum(cell.project(p, x))).lower(params, rows_x).compile()
    runs["projection"] = lambda: jax.block_until_ready(projection(params, rows_x))
    gates = jax.eval_shape(cell.project, params, rows_x[0]).shape[-1]
    result = timing.measure(runs, rounds=rounds, warmup=1)
    row["projection_flops"] = 2 * batch * T * features * gates / result.pop("projection")["median_s"]
    for name in result:
        row[f"{name}_s"] = result[name]["median_s"]
        row[f"{name}_samples_s"] = result[name]["samples_s"]
    row["speedup"] = row["sequential_s"] / row["associative_s"]
    row["loop_speedup"] = row["sequential_s"] / row["loop_s"]
    row["matmul_flops"] = matmul_flops(jax.grad(_loss(cell, True), argnums=(0, 1)), params, xs)
    row["peak_flops"] = peak_flops
    row["matmul_floor_s"] = row["matmul_flops"] / max(peak_flops, row["projection_flops"])
    row["max_speedup"] = row["sequential_s"] / row["matmul_floor_s"]
    return row


def crossover(rows: list[dict]) -> int | None:
    """The smallest measured ``T`` from which the parallel path is faster at every longer measured ``T``."""
    best = None
    for row in sorted(rows, key=lambda r: r["T"], reverse=True):
        if row["speedup"] <= 1.0:
            break
        best = row["T"]
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--cell", default=",".join(CELLS), help=f"comma list of {', '.join(CELLS)} (default: all)")
    p.add_argument("--time", default=DEFAULT_TIME, help=f"comma list of sequence lengths (default {DEFAULT_TIME})")
    p.add_argument("--batch", type=int, default=8, help="batch B (default 8)")
    p.add_argument("--features", type=int, default=256, help="input features F (default 256)")
    p.add_argument("--hidden", type=int, default=256, help="hidden units H (default 256)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (default 5)")
    p.add_argument("--json", metavar="FILE", help="append one JSON line per (cell, T)")
    try:
        args = p.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    names = [c for c in args.cell.split(",") if c]
    unknown = [c for c in names if c not in CELLS]
    try:
        times = [int(t) for t in args.time.split(",") if t]
    except ValueError:
        times = []
    if unknown or not names or not times or min(times) < 1 or min(args.batch, args.features, args.hidden,
                                                                  args.rounds) < 1:
        what = (f"unknown --cell {', '.join(unknown)}; expected a comma list of {', '.join(CELLS)}" if unknown or
                not names else "--time must be a comma list of positive integers, and --batch, --features, "
                                   "--hidden and --rounds positive")
        print(f"{PROG}: error: {what}.", file=sys.stderr)
        return 2
    peak = matmul_peak(args.rounds)
    print(f"matmul peak: {peak / 1e9:.1f} GFLOP/s (float32 [{GEMM_SIZE}, {GEMM_SIZE}] @ [{GEMM_SIZE}, {GEMM_SIZE}], "
          f"median of {args.rounds})", flush=True)
    print(f"{'cell':>8} {'T':>7} {'assoc ms':>10} {'loop ms':>9} {'seq ms':>9} {'seq/assoc':>9} {'seq/loop':>8} "
          f"{'matmul GFLOP':>12} {'proj GFLOP/s':>12} {'floor ms':>9} {'max seq/par':>11} "
          f"{'peak MiB assoc/loop/seq':>24} {'compile s assoc/loop/seq':>25}", flush=True)
    for name in names:
        rows = []
        for T in times:
            row = measure(name, T, batch=args.batch, features=args.features, hidden=args.hidden, rounds=args.rounds,
                          peak_flops=peak)
            rows.append(row)
            gc.collect()
            mib = "/".join(f"{row[f'{f}_peak_mib']:.0f}" for f, _ in FORMS)
            comp = "/".join(f"{row[f'{f}_compile_s']:.2f}" for f, _ in FORMS)
            print(f"{name:>8} {T:>7} {row['associative_s'] * 1e3:>10.2f} {row['loop_s'] * 1e3:>9.2f} "
                  f"{row['sequential_s'] * 1e3:>9.2f} {row['speedup']:>8.2f}x {row['loop_speedup']:>7.2f}x "
                  f"{row['matmul_flops'] / 1e9:>12.2f} {row['projection_flops'] / 1e9:>12.1f} "
                  f"{row['matmul_floor_s'] * 1e3:>9.2f} {row['max_speedup']:>10.2f}x "
                  f"{mib:>24} {comp:>25}", flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(row) + "\n")
        cross = crossover(rows)
        loop_cross = crossover([dict(T=r["T"], speedup=r["loop_speedup"]) for r in rows])
        print(f"{name:>8} crossover: associative faster than sequential from T = "
              f"{cross if cross else 'never (in this range)'}; loop form from T = "
              f"{loop_cross if loop_cross else 'never (in this range)'}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
