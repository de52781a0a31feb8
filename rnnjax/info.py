"""``python -m rnnjax info``: the machine, the versions, and which backend runs which cell here, and why."""

from __future__ import annotations

import importlib.metadata

import jax
import jax.numpy as jnp

from rnnjax import backend, cells, native

# The CPU features that decide the native backend's rules (rnnjax.backend), shown when present.
FLAGS_SHOWN = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def report() -> str:
    """A few lines for people and bug reports: versions, CPU, native kernels, and the path each cell takes."""
    state = native.status()
    shown = [flag for flag in FLAGS_SHOWN if flag in native.cpu_flags()]
    lines = [
        f"rnnjax {_version('rnnjax')}, jax {jax.__version__}, jaxlib {_version('jaxlib')}, "
        f"oneDNN ({native.ONEDNN}) {_version(native.ONEDNN)}",
        f"JAX backend: {jax.default_backend()} ({jax.devices()[0].device_kind})",
        f"CPU: {native.cpu_model()}; flags: {', '.join(shown) or 'none of ' + ', '.join(FLAGS_SHOWN)}",
        f"native kernels: {'available' if state.available else 'unavailable'} ({state.reason})",
    ]
    for name, cell in (("lstm", cells.lstm(8)), ("gru", cells.gru(8)), ("elman", cells.elman(8)),
                       ("lstm(peepholes=True)", cells.lstm(8, peepholes=True))):
        for dtype in (jnp.float32, jnp.bfloat16):
            lines.append(f"  {name}, {jnp.dtype(dtype).name} compute: backend='auto' runs "
                         f"{backend.describe(cell, dtype)}")
    return "\n".join(lines)
