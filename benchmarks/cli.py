"""``rnnjax-bench``: rnnjax against its peers, interleaved in the same rounds, reported as ratios.

    rnnjax-bench --preset all --mode fwd,fwdbwd --compare torch,flax,haiku,equinox --cell lstm
    rnnjax-bench --preset C1 --compare rnnjax,rnnjax-hoisted,rnnjax-inloop,torch --json out.jsonl
    rnnjax-bench --quick                      # tiny shapes, all modes, under a minute (CI)
    rnnjax-bench --cell lstm --heads 4 --compare rnnjax-native,rnnjax-native-dense   # 4 heads against 1
    rnnjax-bench --preset V1 --cell conv_lstm --compare rnnjax,flax,haiku   # ConvLSTM on frames [B, T, 8, 8, 16]
    rnnjax-bench long --time 1000,100000      # memory and compile time against T (benchmarks/long_sequences.py)
    rnnjax-bench tasks --markdown tasks.md    # every `rnnjax train` task against its baseline (benchmarks/tasks.py)

A first argument naming a subcommand (:data:`SUBCOMMANDS`) hands the rest of
the arguments to that module's ``main``.

This module reads ``sys.argv`` and parses the main command's flags; each
subcommand's module parses the arguments handed to its ``main``. Bad input
prints one line (``rnnjax-bench: error: ...``) and exits with status 2.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.metadata
import inspect
import os
import platform
import sys

from benchmarks import impls, report, timing, torch_memory
from benchmarks.config import (
    CELLS,
    DTYPES,
    HEADS_CELLS,
    MODES,
    PRESETS,
    QUICK,
    QUICK_SPATIAL,
    SPATIAL_CELLS,
    SPATIAL_PRESETS,
    Config,
)

PROG = "rnnjax-bench"
# name -> (module with main(argv) -> int, one line of help)
SUBCOMMANDS = {
    "long": ("benchmarks.long_sequences", "memory and compile time of fwd+bwd against T, remat off and on"),
    "profile": ("benchmarks.profile", "where one training step's time goes, op by op, next to torch"),
    "parallel": ("benchmarks.parallel", "linear cells: associative_scan against the sequential scan, against T"),
    "population": ("benchmarks.population", "N models trained by one compiled step against N sequential runs"),
    "memory": ("benchmarks.long_memory", "a long-memory task (the adding problem): which cells learn it"),
    "tasks": ("benchmarks.tasks", "every rnnjax train task with fixed seeds against its baseline: a results table"),
}
DEFAULT_ROUNDS, QUICK_ROUNDS, MIN_ROUNDS = 7, 3, 5
DEFAULT_MODES, QUICK_MODES = "fwd,fwdbwd", "fwd,fwdbwd,train"
PEAK_SIZE, QUICK_PEAK_SIZE = 2048, 512


class UsageError(Exception):
    """Bad input: printed as one line, exit status 2."""


def _int_at_least(minimum: int, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_nonnegative_int = _int_at_least(0, "an integer >= 0")


def _grid(text: str) -> tuple[int, ...]:
    """``8x8`` -> ``(8, 8)``: 1 to 3 positive sides, as the convolutional cells take."""
    try:
        sides = tuple(int(side) for side in text.lower().split("x"))
    except ValueError:
        sides = ()
    if not 1 <= len(sides) <= 3 or min(sides) < 1:
        raise argparse.ArgumentTypeError(f"expected 1 to 3 positive sides joined by 'x' (e.g. 8x8), got {text!r}")
    return sides


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Benchmark rnnjax against torch, flax, haiku and equinox: implementations run interleaved "
                    "in rotating order within each round; reports tokens/s (median [min-max]), the ratio to each "
                    "peer, achieved GFLOP/s against a float32 matmul peak timed in the same rounds, first-call "
                    "(compile) time and memory.",
        epilog="subcommands (rnnjax-bench NAME --help): "
               + "; ".join(f"{name}: {text}" for name, (_, text) in SUBCOMMANDS.items()))
    shape = p.add_argument_group("what to run")
    shape.add_argument("--preset", help="comma list of C1 (B64 T128 F=H=256), C2 (B16 T512 F=H=512), "
                                        "C3 (B1 T1024 F=H=128), C4 (B256 T64 F=H=1024), for the convolutional "
                                        "cells V1 (B16 T19, an 8x8 grid of F=16 channels, H=32, 3x3 window: "
                                        "rnnjax train frames' layer), or 'all'; each cell runs on the presets of "
                                        "its kind (default: C1 for a dense cell, V1 for a convolutional one; "
                                        "with --quick tiny B8 T16 F=H=32 and B4 T8 4x4 F=4 H=8 shapes)")
    shape.add_argument("--batch", type=_positive_int, help="custom shape: batch B (others default to C1's, or "
                                                           "V1's for a convolutional cell)")
    shape.add_argument("--time", type=_positive_int, help="custom shape: time steps T")
    shape.add_argument("--features", type=_positive_int, help="custom shape: input features F (channels)")
    shape.add_argument("--hidden", type=_positive_int, help="custom shape: hidden units H (channels)")
    shape.add_argument("--spatial", type=_grid, help=f"custom shape of {', '.join(SPATIAL_CELLS)}: the grid of "
                                                     "each frame, e.g. 8x8 (1-3 sides)")
    shape.add_argument("--kernel", type=_positive_int, help=f"custom shape of {', '.join(SPATIAL_CELLS)}: the "
                                                            "side of the convolutions' window, e.g. 3")
    shape.add_argument("--cell", default="lstm", help=f"comma list of cells: {', '.join(CELLS)} (default lstm); "
                                                      f"the convolutional cells ({', '.join(SPATIAL_CELLS)}) read "
                                                      "frames [B, T, *spatial, F]")
    shape.add_argument("--layers", type=_positive_int, default=1, help="stacked layers (default 1)")
    shape.add_argument("--bidirectional", action="store_true", help="bidirectional layers (outputs concatenated)")
    shape.add_argument("--heads", type=_positive_int, default=1,
                       help=f"block-diagonal recurrent heads of rnnjax's {', '.join(HEADS_CELLS)} (default 1); "
                            "peers are skipped, rnnjax-dense (rnnjax-native-dense) runs the one-head cell on XLA (the "
                            "native kernels) in the same rounds")
    shape.add_argument("--dtype", choices=DTYPES, default="float32", help="parameters and inputs (default float32)")
    shape.add_argument("--compare", help="comma list of implementations (see --list); rnnjax is added unless an "
                                         "rnnjax variant is named (default: rnnjax and every installed peer)")
    shape.add_argument("--mode", help=f"comma list of {', '.join(MODES)} (default {DEFAULT_MODES}; "
                                      f"--quick: {QUICK_MODES})")
    timing_ = p.add_argument_group("timing")
    timing_.add_argument("--rounds", type=_positive_int,
                         help=f"timed rounds, >= {MIN_ROUNDS} (default {DEFAULT_ROUNDS}; --quick {QUICK_ROUNDS})")
    timing_.add_argument("--warmup", type=_nonnegative_int, default=1,
                         help="untimed calls after the first (compile) call (default 1)")
    timing_.add_argument("--peak-size", type=_positive_int,
                         help=f"n of the n^3 float32 matmul peak (default {PEAK_SIZE}; --quick {QUICK_PEAK_SIZE})")
    timing_.add_argument("--torch-threads", type=_positive_int, default=impls.TORCH_THREADS,
                         help=f"torch.set_num_threads (default {impls.TORCH_THREADS}: the shared 2-core machine; "
                              "use the core count elsewhere)")
    timing_.add_argument("--no-torch-memory", action="store_true",
                         help="skip torch's peak-RSS measurement (a subprocess per config)")
    timing_.add_argument("--quick", action="store_true",
                         help="few rounds, all modes, and (unless --preset or a shape is given) tiny shapes: "
                              "a smoke test under a minute (CI)")
    out = p.add_argument_group("output")
    out.add_argument("--json", metavar="FILE", help="write JSON lines, one per implementation x config x mode")
    out.add_argument("--markdown", metavar="FILE", help="write the results table as Markdown")
    out.add_argument("--plot", metavar="FILE.png", help="bar chart of tokens/s per implementation per config")
    out.add_argument("--list", action="store_true", help="list implementations, cells and presets, then exit")
    return p


def _split(text: str) -> list[str]:
    return list(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))


def _choose(option: str, text: str, known, what: str) -> list[str]:
    names = _split(text)
    if not names:
        raise UsageError(f"{option} is empty; expected a comma list of {what}s from: {', '.join(known)}.")
    for name in names:
        if name not in known:
            raise UsageError(f"unknown {what} {name!r} in {option}; expected one of: {', '.join(known)}.")
    return names


def resolve(args: argparse.Namespace) -> dict:
    """Checks the arguments and turns them into a plan: configs (without mode), modes, implementations."""
    cells = _choose("--cell", args.cell, CELLS, "cell")
    modes = _choose("--mode", args.mode or (QUICK_MODES if args.quick else DEFAULT_MODES), MODES, "mode")
    rounds = args.rounds or (QUICK_ROUNDS if args.quick else DEFAULT_ROUNDS)
    if rounds < MIN_ROUNDS and not args.quick:
        raise UsageError(f"--rounds must be >= {MIN_ROUNDS} for a measurement (got {rounds}); "
                         "use --quick for a smoke test.")
    if args.compare is None:
        names = ["rnnjax"]
        for peer in impls.PEERS:
            if impls.installed(peer):
                names.append(peer)
            else:
                impls.note(f"{peer} skipped: package {impls.PACKAGES[peer]!r} is not installed "
                           "(pip install 'rnnjax[bench]')")
    else:
        names = _choose("--compare", args.compare, list(impls.IMPLS), "implementation")
        if not any(impls.is_rnnjax(n) for n in names):
            names.insert(0, "rnnjax")
    groups = [Config(**shape, cell=cell, mode="", layers=args.layers, bidirectional=args.bidirectional,
                     dtype=args.dtype, preset=preset, heads=args.heads)
              for preset, shape, cell in _shapes(args, cells)]
    _check_heads(args.heads, groups)
    return dict(groups=groups, modes=modes, names=names, rounds=rounds, warmup=args.warmup,
                peak_size=args.peak_size or (QUICK_PEAK_SIZE if args.quick else PEAK_SIZE))


def _shapes(args: argparse.Namespace, cells: list[str]) -> list[tuple[str, dict, str]]:
    """``(preset, shape, cell)`` of every config group: each cell on the presets of its kind (dense or
    convolutional), a custom shape over the default preset of its kind, or the tiny --quick shape."""
    names = ("batch", "time", "features", "hidden", "spatial", "kernel")
    dims = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    if args.preset and dims:
        raise UsageError(f"--preset and {'/'.join('--' + k for k in names)} are exclusive; "
                         "pass a preset or a custom shape.")
    dense = [cell for cell in cells if cell not in SPATIAL_CELLS]
    spatial_options = [k for k in ("spatial", "kernel") if k in dims]
    if spatial_options and dense:
        raise UsageError(f"--{spatial_options[0]} applies to the convolutional cells ({', '.join(SPATIAL_CELLS)}), "
                         f"got --cell {dense[0]}. Fix: drop --{spatial_options[0]} or run that cell separately.")

    def default(cell: str) -> tuple[str, dict]:
        conv = cell in SPATIAL_CELLS
        if args.quick:
            return "quick", (QUICK_SPATIAL if conv else QUICK)["quick"]
        return ("V1", SPATIAL_PRESETS["V1"]) if conv else ("C1", PRESETS["C1"])

    if dims:
        return [("custom", {**default(cell)[1], **dims}, cell) for cell in cells]
    if not args.preset:
        return [(*default(cell), cell) for cell in cells]
    known = {**PRESETS, **SPATIAL_PRESETS}
    chosen = _choose("--preset", args.preset, [*known, "all"], "preset")
    chosen = list(known) if "all" in chosen else chosen
    out = [(preset, known[preset], cell) for preset in chosen for cell in cells
           if (preset in SPATIAL_PRESETS) == (cell in SPATIAL_CELLS)]
    for cell in cells:
        if not any(c == cell for _, _, c in out):
            conv = cell in SPATIAL_CELLS
            kind, presets = ("convolutional", SPATIAL_PRESETS) if conv else ("dense", PRESETS)
            raise UsageError(f"--cell {cell} runs on the {kind} presets ({', '.join(presets)}), and --preset "
                             f"{args.preset} names none of them. Fix: add one, e.g. --preset {next(iter(presets))}.")
    return out


def _check_heads(heads: int, groups: list[Config]) -> None:
    if heads == 1:
        return
    for group in groups:
        if group.cell not in HEADS_CELLS:
            raise UsageError(f"--heads {heads} applies to the cells {', '.join(HEADS_CELLS)}, got --cell "
                             f"{group.cell}. Fix: drop --heads or choose one of those cells.")
        if group.hidden % heads:
            raise UsageError(f"--heads {heads} must divide the hidden size, got {group.hidden} "
                             f"({group.label()}). Fix: pass a --hidden that is a multiple of {heads}.")


def environment(torch_threads: int) -> dict:
    """Versions and the machine, recorded in every JSON line."""
    import jax

    import rnnjax
    from rnnjax import native

    def version(dist):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    device = jax.devices()[0]
    return dict(
        backend=jax.default_backend(), device=getattr(device, "device_kind", str(device)),
        cpu_count=os.cpu_count(), machine=platform.machine(), python=platform.python_version(),
        jax=jax.__version__, rnnjax=rnnjax.__version__,
        rnnjax_unroll_backward="backward" in inspect.signature(rnnjax.unroll).parameters,
        cpu=native.cpu_model(), native=native.status().reason,
        torch=version("torch"), torch_threads=torch_threads, flax=version("flax"), haiku=version("dm-haiku"),
        equinox=version("equinox"), optax=version("optax"),
        load_1m=os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    )


def list_all() -> str:
    lines = ["implementations: " + ", ".join(impls.IMPLS),
             "default comparison: rnnjax, " + ", ".join(impls.PEERS),
             "cells: " + ", ".join(CELLS),
             "convolutional cells (frames [B, T, *spatial, F], spatial presets): " + ", ".join(SPATIAL_CELLS),
             "presets: " + ", ".join(f"{k} ({Config(**v).shape()})" for k, v in PRESETS.items()),
             "spatial presets: " + ", ".join(f"{k} ({Config(**v).shape()})" for k, v in SPATIAL_PRESETS.items()),
             "modes: " + ", ".join(MODES)]
    from rnnjax import info

    return "\n".join(lines + ["", info.report()])


def run(plan: dict, args: argparse.Namespace) -> int:
    impls.TORCH_THREADS = args.torch_threads
    env = environment(args.torch_threads)
    print(f"{PROG}: {env['backend']} ({env['device']}, {env['cpu_count']} CPUs), jax {env['jax']}, "
          f"torch {env['torch']} ({env['torch_threads']} threads), flax {env['flax']}, haiku {env['haiku']}, "
          f"equinox {env['equinox']}; {plan['rounds']} rounds, {plan['warmup']} warm-up", flush=True)
    if env["load_1m"] is not None and env["cpu_count"] and env["load_1m"] > 0.5 * env["cpu_count"]:
        impls.note(f"the machine is busy before the run (1-minute load {env['load_1m']:.1f} on {env['cpu_count']} "
                   "CPUs): expect noise; torch's OpenMP threads suffer most when a core is taken "
                   "(try --torch-threads 1), so compare ratios from a quiet machine")
    json_file = open(args.json, "w") if args.json else None
    all_rows, peaks_by_group, rnnjax_failed = [], [], False
    try:
        for group in plan["groups"]:
            # torch's memory is measured in a subprocess that runs while this process builds the
            # first runners (untimed work); it is collected before any timing starts.
            pending_mem = None
            if "torch" in plan["names"] and not args.no_torch_memory and impls.installed("torch") \
                    and group.cell in ("lstm", "gru", "elman") and group.heads == 1 \
                    and impls.torch_device().type == "cpu":
                pending_mem = torch_memory.start([group._replace(mode=m) for m in plan["modes"]],
                                                 threads=args.torch_threads)
            torch_mem: dict = {}
            for mode in plan["modes"]:
                cfg = group._replace(mode=mode)
                runners: dict = {}
                for name in plan["names"]:
                    runner, error = impls.build(name, cfg)
                    if error is not None:
                        print(f"error: {name} failed to build at {cfg.label()} {mode}: {error}", flush=True)
                        rnnjax_failed |= impls.is_rnnjax(name)
                    if runner is not None:
                        runners[name] = runner
                if not runners:
                    continue
                if pending_mem is not None:
                    torch_mem, pending_mem = torch_memory.collect(pending_mem), None
                peaks = impls.peak_runners(plan["peak_size"])
                timed = {**runners, **{report.PEAK_PREFIX + n: f for n, (f, _) in peaks.items()}}
                results = timing.measure(timed, rounds=plan["rounds"], warmup=plan["warmup"])
                for name, r in results.items():
                    if "error" in r:
                        print(f"error: {name} failed at {cfg.label()} {mode}: {r['error']}", flush=True)
                        rnnjax_failed |= impls.is_rnnjax(name)
                infos = {name: dict(r.info) for name, r in runners.items()}
                if "torch" in infos and torch_mem.get(mode) is not None:
                    infos["torch"].update(memory_bytes=torch_mem[mode], memory_kind="rss-delta")
                notes = {name: r.note for name, r in runners.items() if r.note}
                peak = report.peak_stats(results, {n: fl for n, (_, fl) in peaks.items()})
                rows = report.make_rows(cfg, results, infos, notes, peak, rounds=plan["rounds"], env=env)
                print(f"\n== {cfg.label()} | {mode} | {cfg.shape()}", flush=True)
                print(report.text_table(rows))
                print(report.peak_line(peak), flush=True)
                if json_file:
                    for row in rows:
                        json_file.write(report.json_line(row) + "\n")
                    json_file.flush()
                all_rows += rows
                peaks_by_group.append((f"{cfg.label()} {mode}", peak))
                del runners, timed
                gc.collect()
            if pending_mem is not None:  # no runner was built for any mode
                torch_memory.collect(pending_mem)
            impls.clear_cache()
            gc.collect()
    finally:
        if json_file:
            json_file.close()
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(report.markdown(all_rows, peaks_by_group))
        print(f"wrote {args.markdown}")
    if args.plot and all_rows:
        report.plot(all_rows, args.plot)
        print(f"wrote {args.plot}")
    if args.json:
        print(f"wrote {args.json}")
    return 1 if rnnjax_failed else 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``rnnjax-bench``; returns the exit status (0 ok, 1 an rnnjax runner failed, 2 bad input)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in SUBCOMMANDS:
        return importlib.import_module(SUBCOMMANDS[argv[0]][0]).main(argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse: --help (0) or a malformed option (2), message already printed
        return int(exit_.code or 0)
    if args.list:
        print(list_all())
        return 0
    try:
        plan = resolve(args)
    except UsageError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    return run(plan, args)


if __name__ == "__main__":
    sys.exit(main())
