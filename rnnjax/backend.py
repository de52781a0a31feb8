"""Which implementation runs a call of :func:`rnnjax.unroll`: the registry of backends.

``backend="xla"`` is the reference, and the path on GPU and TPU: a
``lax.scan`` over the cell's step (with the fused backward pass of
:mod:`rnnjax.fused`). Other backends run the whole sequence in one kernel
call where they support the call; each says why it cannot
(:attr:`Backend.unsupported`), so ``backend=NAME`` raises a ``ValueError``
naming the option, and ``backend="auto"`` takes the first backend in
:data:`BACKENDS` that supports the call and that its own rule prefers
(:attr:`Backend.preferred`), else XLA. It never raises.

A GPU kernel (cuDNN through ``jax.experimental.rnn``, or Pallas) is added
as one more :class:`Backend` whose ``platforms`` is ``("gpu",)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rnnjax import native
from rnnjax.cells.base import Cell


class Request(NamedTuple):
    """What a backend needs to know to say whether it can run a call."""

    cell: Cell
    dtype: Any  # the computation's dtype: float32, or bfloat16 for bf16 products
    remat: Any
    platform: str


class Backend(NamedTuple):
    """A way to run a whole sequence.

    Attributes:
      name: what ``backend=`` names it by.
      unsupported: ``Request -> str | None``: why it cannot run the call (None: it can).
      preferred: ``Request -> str | None``: why ``"auto"`` picks it for a call it supports (None: it does not).
      run: ``(cell, params, xs [T, *B, F], carry, valid, resets, *, reverse, bf16) -> (carry, ys)``.
    """

    name: str
    unsupported: Callable[[Request], str | None]
    preferred: Callable[[Request], str | None]
    run: Callable[..., tuple[Any, Any]]


# CPU features under which "auto" prefers the native kernels. Measured with ``rnnjax-bench --compare
# rnnjax-native,rnnjax-xla,torch`` (docs, Performance): on AMD EPYC Zen 5 (AVX-512) oneDNN runs the recurrent
# products at 1.5-3x XLA's rate; on AMD EPYC Zen 3 (AVX2 only) the kernels ran LSTM and GRU at 0.89-3.4x the XLA
# path's tokens/s (C1-C4; under 1x in 3 of 16 cases, at 0.89-0.97x, all at C1 and C4), and after two later changes
# at 1.06-1.34x in those eight C1 and C4 cases. The kernels load only on x86-64-v3 CPUs, so every CPU that loads
# them has avx2.
NATIVE_FLOAT32_FLAGS = ("avx512f", "avx2")
NATIVE_CELLS = ("lstm", "gru", "elman")  # the cells with a native kernel (some of their settings have none)
# bf16 products: oneDNN uses the CPU's bf16 dot-product or AMX instructions; without them it emulates bf16 with
# AVX-512, and without AVX-512 (e.g. AMD Zen 3) oneDNN 3.2 has no bfloat16 matmul at all.
NATIVE_BFLOAT16_FLAGS = ("avx512_bf16", "amx_bf16")
NATIVE_BFLOAT16_NEEDS = ("avx512f", "avx512bw")


def _native_unsupported(request: Request) -> str | None:
    if request.platform != "cpu":
        return f"the native kernels run on CPU, and JAX's default backend here is {request.platform!r}"
    if request.cell.native is None and request.cell.name in NATIVE_CELLS:
        return (f"the cell {request.cell.name!r} has no native kernel with these settings (the kernels run lstm "
                "without peepholes or proj_size, gru, and elman with tanh or relu)")
    if request.cell.native is None:
        return f"the cell {request.cell.name!r} has no native kernel (the kernels run lstm, gru and elman)"
    if not (request.remat is None or request.remat is False):
        return "remat recomputes steps in the backward pass, which the native kernels do not"
    if jnp.dtype(request.dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        return f"the native kernels compute in float32 or bfloat16, not {jnp.dtype(request.dtype).name}"
    missing = [flag for flag in NATIVE_BFLOAT16_NEEDS if flag not in native.cpu_flags()]
    if jnp.dtype(request.dtype) == jnp.dtype(jnp.bfloat16) and missing:
        return f"bfloat16 products need AVX-512 (oneDNN has no bfloat16 matmul for this CPU, which lacks " \
               f"{', '.join(missing)})"
    state = native.status()
    return None if state.available else state.reason


def _native_preferred(request: Request) -> str | None:
    flags = native.cpu_flags()
    wanted = NATIVE_BFLOAT16_FLAGS if jnp.dtype(request.dtype) == jnp.dtype(jnp.bfloat16) else NATIVE_FLOAT32_FLAGS
    have = [flag for flag in wanted if flag in flags]
    return f"the CPU has {have[0]}" if have else None


def _run_native(*args, **kwargs):
    from rnnjax.native.rnn import native_unroll

    return native_unroll(*args, **kwargs)


BACKENDS: tuple[Backend, ...] = (Backend("native", _native_unsupported, _native_preferred, _run_native),)
NAMES = ("auto", "xla", *(b.name for b in BACKENDS))


def choose(fn: str, backend: str, request: Request) -> Backend | None:
    """The backend that runs the call, or None for XLA; ``backend`` as given to ``fn``."""
    if backend not in NAMES:
        raise ValueError(f"{fn}: backend must be one of {', '.join(map(repr, NAMES))}, got {backend!r}. "
                         "Fix: pass one of those.")
    if backend == "xla":
        return None
    for candidate in BACKENDS:
        why_not = candidate.unsupported(request)
        if backend == candidate.name:
            if why_not is not None:
                raise ValueError(f"{fn}: backend={backend!r} cannot run this call: {why_not}. "
                                 "Fix: pass backend='auto' (which falls back to XLA) or 'xla'.")
            return candidate
        if why_not is None and candidate.preferred(request) is not None:
            return candidate
    return None


def describe(cell: Cell, dtype=jnp.float32) -> str:
    """One line: which backend ``"auto"`` picks for ``cell`` computing in ``dtype`` here, and why."""
    request = Request(cell, dtype, None, jax.default_backend())
    for candidate in BACKENDS:
        why_not = candidate.unsupported(request)
        if why_not is not None:
            return f"xla ({candidate.name} cannot run it: {why_not})"
        why = candidate.preferred(request)
        if why is not None:
            return f"{candidate.name} ({why})"
        return f"xla ({candidate.name} supports it, but is preferred only on CPUs with " \
               f"{' or '.join(NATIVE_BFLOAT16_FLAGS if jnp.dtype(dtype) == jnp.bfloat16 else NATIVE_FLOAT32_FLAGS)})"
    return "xla"
