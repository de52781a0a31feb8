"""Peak resident-memory growth of one torch call, measured in a fresh subprocess.

PyTorch on CPU has no allocator statistics, so the benchmark measures the
operating system's view: in a new process (Linux only) it builds the torch
runner, calls it once to warm up (one-time allocations: oneDNN primitives,
Adam's state), resets the peak-RSS counter (``/proc/self/clear_refs``),
notes the resident set, calls it again and reports ``VmHWM - VmRSS``: the
memory one steady-state call adds on top of parameters and inputs
(activations, gradients, workspace). glibc's mmap threshold is pinned at
128 KiB so that freed large buffers leave the resident set instead of being
kept in the heap (which would hide them from the next call).

Usage (internal): ``python -m benchmarks.torch_memory '<json list of Config fields>'``;
the last stdout line is ``{"mode": bytes or null, ...}``.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks.config import Config


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _measure(cfgs: list[Config]) -> dict[str, int | None]:
    from benchmarks.impls import torch_impl

    out: dict[str, int | None] = {}
    for cfg in cfgs:
        run = torch_impl(cfg)
        if run is None:
            out[cfg.mode] = None
            continue
        run()
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        base = _status_bytes("VmRSS")
        run()
        out[cfg.mode] = max(0, _status_bytes("VmHWM") - base)
        del run
        gc.collect()
    return out


def start(cfgs: list[Config], *, threads: int) -> subprocess.Popen | None:
    """Starts measuring the torch runners of ``cfgs`` (one config, several modes) in a subprocess;
    :func:`collect` waits for the result. None where it cannot be measured (not Linux)."""
    if not sys.platform.startswith("linux") or not cfgs:
        return None
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", RNNJAX_BENCH_TORCH_THREADS=str(threads),
               PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    return subprocess.Popen([sys.executable, "-m", "benchmarks.torch_memory",
                             json.dumps([c._asdict() for c in cfgs])],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def collect(proc: subprocess.Popen | None, *, timeout: float = 600) -> dict[str, int | None]:
    """``{mode: bytes}`` from a :func:`start`-ed subprocess, or ``{}`` if it failed (with a note)."""
    if proc is None:
        return {}
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
        lines = stdout.strip().splitlines()
        if proc.returncode != 0 or not lines:
            raise RuntimeError(stderr.strip().splitlines()[-1] if stderr.strip() else "no output")
        return json.loads(lines[-1])
    except Exception as error:
        proc.kill()
        proc.wait()
        print(f"note: torch memory not measured: {type(error).__name__}: {error}", flush=True)
        return {}


def measure(cfgs: list[Config], *, threads: int, timeout: float = 600) -> dict[str, int | None]:
    """``{mode: bytes}`` for the torch runners of ``cfgs``; ``{}`` where this cannot be measured."""
    return collect(start(cfgs, threads=threads), timeout=timeout)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cfgs = [Config.from_dict(fields) for fields in json.loads(argv[0])]
    print(json.dumps(_measure(cfgs)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
