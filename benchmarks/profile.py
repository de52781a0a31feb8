"""``rnnjax-bench profile``: where the time of one training step goes, op by op, next to PyTorch.

    rnnjax-bench profile --preset C1,C2 --cell lstm [--steps 5] [--json profile.jsonl]

JAX side: XLA's CPU runtime runs a compiled program as a sequence of
*thunks* (a matmul, a fused elementwise kernel, a copy, a loop); with
``--xla_cpu_enable_xprof_traceme`` each thunk is recorded in the
profiler's trace. A child process sets that flag, runs ``--steps`` train
steps (``--mode train`` of the main benchmark: an Adam step on a dense
readout) under ``jax.profiler.trace``, and sums the time of each thunk.
Each is labelled from the compiled HLO: its kind (a matmul with its
``M x K x N``, an elementwise fusion, a copy, a slice update) and its
phase, from the op's metadata (forward scan, backward scan, outside the
loops, optimiser). The two cores run independent thunks side by side, so
the thunk times can add up to more than the wall time; and a large matmul
runs asynchronously on the thread pool, so its event can end before its
work does (a rate above the machine's matmul peak shows it): read the
per-step ops in the loops, which are small and synchronous, as exact, and
the big after-loop matmuls as lower bounds.

PyTorch side: ``torch.profiler`` over the same steps, self time per op.

Matmul rates: every matmul shape of the rnnjax step, timed alone in a
loop (``lax.fori_loop``, so no dispatch per call) and with ``torch.mm``,
and a ``2048^3`` product as each library's peak; the rnnjax ops' rates
are also given as a fraction of XLA's peak.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks.config import PRESETS, Config
from benchmarks.hlo import parse_hlo

PROG = "rnnjax-bench profile"
TRACEME_FLAG = "--xla_cpu_enable_xprof_traceme=true"
# Ops that contain other thunks: their events would count their children twice.
_CONTAINERS = {"while", "conditional", "call"}

PEAK_SHAPE = (2048, 2048, 2048)


def phase(op_name: str) -> str:
    """Which part of the train step an op belongs to, from its metadata ``op_name``."""
    backward = "transpose(" in op_name
    if "/while/" in op_name or op_name.endswith("/while"):
        return "backward scan" if backward else "forward scan"
    if backward:
        return "backward, outside loops"
    if "jvp(" in op_name:
        return "forward, outside loops"
    return "optimiser and other"


def kind(ins: dict) -> str:
    """A readable kind: ``matmul MxKxN`` (one or more), else the op or fusion kind."""
    if ins["dots"]:
        return " + ".join(f"matmul {m}x{k}x{n}" for m, k, n, _ in ins["dots"])
    if ins["opcode"] == "fusion":
        base = re.sub(r"[.]\d+$", "", ins["name"])
        return f"fusion ({base})"
    return ins["opcode"]


def thunk_times(trace_dir: str) -> tuple[dict[str, float], dict[str, int]]:
    """Total microseconds and call counts per event name in the Perfetto trace under ``trace_dir``."""
    paths = [os.path.join(d, f) for d, _, fs in os.walk(trace_dir) for f in fs if f.endswith(".trace.json.gz")]
    if not paths:
        raise RuntimeError(f"{PROG}: jax.profiler wrote no .trace.json.gz under {trace_dir}")
    with gzip.open(paths[0]) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    total: dict[str, float] = collections.Counter()
    count: dict[str, int] = collections.Counter()
    for e in events:
        if e.get("ph") == "X":
            total[e["name"]] += float(e.get("dur", 0.0))
            count[e["name"]] += 1
    return total, count


def profile_compiled(compiled, args, steps: int, feedback=None) -> dict:
    """Runs ``compiled(*args)`` ``steps`` times under the profiler (``XLA_FLAGS`` must hold
    :data:`TRACEME_FLAG`); returns ``{"wall_ms", "ops": [...]}`` with per-step times."""
    import jax

    instructions = parse_hlo(compiled.as_text())
    jax.block_until_ready(args)  # calls still running from before are not traced
    walls = []
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(steps):
                start = time.perf_counter()
                out = jax.block_until_ready(compiled(*args))
                walls.append(time.perf_counter() - start)
                if feedback is not None:
                    args = feedback(args, out)
        total, count = thunk_times(trace_dir)
    ops = []
    for name, us in total.items():
        ins = instructions.get(name)
        if ins is None or ins["opcode"] in _CONTAINERS:
            continue
        calls = count[name] / steps
        flops = sum(d[3] for d in ins["dots"])
        ops.append(dict(op=name, kind=kind(ins), phase=phase(ins["op_name"]), calls_per_step=calls,
                        flops_per_step=flops * calls,
                        ms_per_step=us / steps / 1e3, us_per_call=us / count[name],
                        gflops=(flops * count[name] / (us * 1e-6) / 1e9) if flops and us else None,
                        dots=[d[:3] for d in ins["dots"]]))
    ops.sort(key=lambda o: -o["ms_per_step"])
    return dict(wall_ms=statistics.median(walls) * 1e3, ops=ops)


def _rnnjax_step(cfg: Config):
    from benchmarks import impls

    runner = impls.rnnjax_impl(cfg, backend="xla")  # a profile of XLA's ops: the native kernels are one op
    runner()  # compiles
    runner()
    call = runner._call
    return call.compiled, call.args, call.feedback


def child(cfg: Config, steps: int) -> dict:
    """The JAX half, run in a process whose ``XLA_FLAGS`` enable per-thunk tracing."""
    compiled, args, feedback = _rnnjax_step(cfg)
    return profile_compiled(compiled, args, steps, feedback)


def jax_profile(cfg: Config, steps: int) -> dict:
    """:func:`child` in a subprocess with the tracing flag added to ``XLA_FLAGS``."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + TRACEME_FLAG).strip()
    cmd = [sys.executable, "-m", "benchmarks.profile", "--child", json.dumps(cfg._asdict()), "--steps", str(steps)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"{PROG}: the profiling subprocess failed:\n{out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def torch_profile(cfg: Config, steps: int) -> dict | None:
    """Self CPU time per op of ``steps`` torch train steps (the ``torch`` runner of ``--mode train``)."""
    from benchmarks import impls

    if not impls.installed("torch"):
        return None
    import torch

    runner = impls.torch_impl(cfg)
    if runner is None:
        return None
    runner()
    runner()
    walls = []
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            start = time.perf_counter()
            runner()
            walls.append(time.perf_counter() - start)
    ops = [dict(op=e.key, calls_per_step=e.count / steps, ms_per_step=e.self_cpu_time_total / steps / 1e3)
           for e in prof.key_averages() if e.self_cpu_time_total > 0]
    ops.sort(key=lambda o: -o["ms_per_step"])
    return dict(wall_ms=statistics.median(walls) * 1e3, ops=ops)


def matmul_rates(shapes: list[tuple[int, int, int]], *, flops_per_round: float = 1e10, max_repeats: int = 200,
                 rounds: int = 5) -> list[dict]:
    """GFLOP/s of ``[M, K] @ [K, N]`` alone, XLA (a ``fori_loop`` of products) against ``torch.mm``
    (a Python loop), medians of ``rounds`` interleaved rounds; each round runs about
    ``flops_per_round`` FLOPs (at most ``max_repeats`` products)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks import impls

    rows = []
    for m, k, n in shapes:
        repeats = max(3, min(max_repeats, math.ceil(flops_per_round / (2 * m * k * n))))
        rng = np.random.default_rng(0)
        # B scaled by 1/sqrt(K) keeps the chained products near unit size: with 1/K they decay into
        # subnormal floats, which XLA flushes to zero but torch.mm computes at a sixth of its rate.
        a = rng.normal(size=(m, k)).astype(np.float32)
        b = (rng.normal(size=(k, n)) / math.sqrt(k)).astype(np.float32)
        # Each product feeds the next (a data dependence, as in a scan), through a cheap slice or tile.
        jb = jnp.asarray(b)

        def loop(a0, b_):
            def body(_, x):
                y = x @ b_
                return y[:, :k] if n >= k else jnp.tile(y, (1, -(-k // n)))[:, :k]
            return jax.lax.fori_loop(0, repeats, body, a0)

        xla = jax.jit(loop)
        ja = jnp.asarray(a)
        jax.block_until_ready(xla(ja, jb))
        runners = {"xla": lambda: jax.block_until_ready(xla(ja, jb))}
        if impls.installed("torch"):
            import torch

            ta, tb = torch.from_numpy(a), torch.from_numpy(b)

            def torch_loop():
                x = ta
                for _ in range(repeats):
                    y = torch.mm(x, tb)
                    x = y[:, :k] if n >= k else y.repeat(1, -(-k // n))[:, :k]
                return x

            runners["torch"] = torch_loop
        samples = collections.defaultdict(list)
        for r in range(rounds):
            for name in (list(runners) if r % 2 == 0 else list(runners)[::-1]):
                start = time.perf_counter()
                runners[name]()
                samples[name].append(time.perf_counter() - start)
        flops = 2 * m * k * n * repeats
        rows.append(dict(shape=(m, k, n), repeats=repeats, **{f"{name}_gflops": flops / statistics.median(s) / 1e9
                                             for name, s in samples.items()}))
    return rows


def summarise(jax_result: dict, torch_result: dict | None, rates: list[dict]) -> dict:
    """Phase totals, matmul vs other time, and the matmul time if each matmul ran as much faster as
    ``torch.mm`` runs its shape alone (its time times XLA's rate over torch's, so an asynchronous
    matmul whose event under-counts its work is scaled, not replaced by torch's full time)."""
    by_phase: dict[str, float] = collections.Counter()
    mm_ms = other_ms = 0.0
    mm_at_torch_ms = 0.0
    rate = {tuple(r["shape"]): r for r in rates}
    for op in jax_result["ops"]:
        by_phase[op["phase"]] += op["ms_per_step"]
        if op["dots"]:
            mm_ms += op["ms_per_step"]
            alone = rate.get(tuple(op["dots"][0]), {})
            speedup = alone["torch_gflops"] / alone["xla_gflops"] if alone.get("torch_gflops") else 1.0
            mm_at_torch_ms += op["ms_per_step"] / speedup
        else:
            other_ms += op["ms_per_step"]
    out = dict(wall_ms=jax_result["wall_ms"], thunk_ms=mm_ms + other_ms, matmul_ms=mm_ms, other_ms=other_ms,
               matmul_at_torch_rate_ms=mm_at_torch_ms, phases=dict(by_phase))
    if torch_result is not None:
        out["torch_wall_ms"] = torch_result["wall_ms"]
    return out


def _fmt_ops(ops: list[dict], top: int, torch: bool = False, peak: float | None = None) -> str:
    lines = []
    if torch:
        lines.append(f"  {'ms/step':>8} {'calls':>6}  op")
        for o in ops[:top]:
            lines.append(f"  {o['ms_per_step']:8.2f} {o['calls_per_step']:6.0f}  {o['op']}")
        return "\n".join(lines)
    lines.append(f"  {'ms/step':>8} {'calls':>6} {'us/call':>8} {'GFLOP/s':>8} {'%peak':>6}  {'phase':<24} "
                 "kind (thunk)")
    for o in ops[:top]:
        g = f"{o['gflops']:.0f}" if o["gflops"] else "-"
        pct = f"{100 * o['gflops'] / peak:.0f}%" if o["gflops"] and peak else "-"
        lines.append(f"  {o['ms_per_step']:8.2f} {o['calls_per_step']:6.0f} {o['us_per_call']:8.1f} {g:>8} {pct:>6}  "
                     f"{o['phase']:<24} {o['kind']} ({o['op']})")
    return "\n".join(lines)


def report(cfg: Config, jax_result: dict, torch_result: dict | None, rates: list[dict], top: int) -> str:
    s = summarise(jax_result, torch_result, rates)
    out = [f"== {cfg.label()} train step | B{cfg.batch} T{cfg.time} F{cfg.features} H{cfg.hidden}",
           f"rnnjax: {s['wall_ms']:.1f} ms/step wall; thunks {s['thunk_ms']:.1f} ms (matmuls {s['matmul_ms']:.1f}, "
           f"other {s['other_ms']:.1f}; more than the wall where the two cores overlap)"]
    out.append("  by phase: " + ", ".join(f"{k} {v:.1f} ms" for k, v in sorted(s["phases"].items(),
                                                                                 key=lambda kv: -kv[1])))
    peak = next((r for r in rates if tuple(r["shape"]) == PEAK_SHAPE), None)
    out.append(_fmt_ops(jax_result["ops"], top, peak=peak["xla_gflops"] if peak else None))
    if torch_result is not None:
        out.append(f"torch: {torch_result['wall_ms']:.1f} ms/step wall (rnnjax / torch time: "
                   f"{s['wall_ms'] / torch_result['wall_ms']:.2f})")
        out.append(_fmt_ops(torch_result["ops"], top, torch=True))
    if rates:
        out.append("matmul shapes of the rnnjax step, alone in a loop:")
        for r in rates:
            m, k, n = r["shape"]
            t = r.get("torch_gflops")
            out.append(f"  {m}x{k}x{n}{' (peak)' if r is peak else ''}: XLA {r['xla_gflops']:.0f} GFLOP/s" + (
                f", torch.mm {t:.0f} ({r['xla_gflops'] / t:.2f}x)" if t else ""))
        out.append(f"  the step's matmuls, each sped up by torch.mm's ratio for its shape: "
                   f"{s['matmul_at_torch_rate_ms']:.1f} ms instead of {s['matmul_ms']:.1f} ms of thunk time")
    return "\n".join(out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[1].strip())
    p.add_argument("--preset", default="C1,C2", help="comma list of C1..C4 (default C1,C2)")
    p.add_argument("--cell", default="lstm", help="lstm, gru or elman (default lstm)")
    p.add_argument("--steps", type=int, default=5, help="profiled train steps after compile and warm-up (default 5)")
    p.add_argument("--top", type=int, default=12, help="ops listed per implementation (default 12)")
    p.add_argument("--no-rates", action="store_true", help="skip timing each matmul shape alone")
    p.add_argument("--torch-threads", type=int, default=2,
                   help="torch.set_num_threads (default 2; 1 is steadier on a busy machine)")
    p.add_argument("--json", help="also write one JSON line per preset to this file")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.child:
        cfg = Config.from_dict(json.loads(args.child))
        print(json.dumps(child(cfg, args.steps)))
        return 0
    presets = [p.strip() for p in args.preset.split(",") if p.strip()]
    unknown = [p for p in presets if p not in PRESETS]
    if unknown or args.cell not in ("lstm", "gru", "elman") or args.steps < 1:
        print(f"{PROG}: error: expected --preset from {', '.join(PRESETS)}, --cell lstm|gru|elman and "
              f"--steps >= 1; got --preset {args.preset!r} --cell {args.cell!r} --steps {args.steps}",
              file=sys.stderr)
        return 2
    from benchmarks import impls

    impls.TORCH_THREADS = args.torch_threads
    json_file = open(args.json, "w") if args.json else None
    try:
        for preset in presets:
            cfg = Config(**PRESETS[preset], cell=args.cell, mode="train", preset=preset)
            jax_result = jax_profile(cfg, args.steps)
            torch_result = torch_profile(cfg, args.steps)
            shapes = sorted({tuple(d) for o in jax_result["ops"] for d in o["dots"]})
            rates = [] if args.no_rates else matmul_rates([s for s in shapes if s != PEAK_SHAPE] + [PEAK_SHAPE])
            print(report(cfg, jax_result, torch_result, rates, args.top), flush=True)
            if json_file:
                json_file.write(json.dumps(dict(config=cfg._asdict(), rnnjax=jax_result, torch=torch_result,
                                                matmul_rates=rates,
                                                summary=summarise(jax_result, torch_result, rates))) + "\n")
    finally:
        if json_file:
            json_file.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
