"""Mamba's selective state-space core, S6 (Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with
Selective State Spaces"): a diagonal linear recurrence whose step size and input and output matrices
depend on the input. :func:`rnnjax.layers.mamba_block` puts it in Mamba's block."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from rnnjax.cells.base import (
    Cell,
    Linear,
    carry_dtype,
    check_size,
    compute_dtype,
    initializer,
    linear_cell,
    matmul,
    state_dtype,
)
from rnnjax.types import Array


class MambaParams(NamedTuple):
    w_in: Array | None  # [F, H]: the input's map to the H channels where F != H, else None (channels = inputs)
    w_x: Array  # [H, R + 2N]: the channels' map to the step's low-rank part and to B and C
    w_dt: Array  # [R, H]
    b_dt: Array  # [H]: softplus(b_dt) is the initial step size
    a_log: Array  # [H, N]: A = -exp(a_log)
    d: Array  # [H]: the skip connection


def mamba(hidden_size: int, *, state_size: int = 16, dt_rank: int | None = None, dt_min: float = 1e-3,
          dt_max: float = 0.1, param_dtype=jnp.float32, dtype=None) -> Cell:
    """S6, Mamba's selective SSM, one diagonal recurrence of ``N = state_size`` states per channel::

        u = x                      (x W_in where input_size != hidden_size)
        delta = softplus(u W_x,dt W_dt + b_dt)     # [H], through a rank-R bottleneck (R = dt_rank)
        B, C = u W_x,B, u W_x,C                     # [N] each, shared by the channels
        h' = exp(delta A) * h + (delta u) B         # [H, N]; A = -exp(a_log) diagonal, zero-order hold
        y = h' C + D u                              # [H]

    The discretisation is Mamba's: ``A`` by zero-order hold, ``exp(delta A)``,
    and ``B`` by the simplified ``delta B`` (Euler). Initialisation as in
    Mamba: ``A`` S4D-real (``a_log[:, n] = log(n + 1)``), ``D = 1``, the step
    size ``softplus(b_dt)`` log-uniform in ``[dt_min, dt_max]``, ``W_dt``
    U(±R^-1/2), ``W_x`` and ``W_in`` U(±1/√fan_in). ``dt_rank`` defaults to
    ``ceil(hidden_size / 16)``.

    The carry ``h [..., H * N]`` is float32 (or wider). The state update is
    linear in the carry, so the cell has a :class:`~rnnjax.cells.base.Linear`
    form and ``rnnjax.unroll(..., parallel=True)`` runs it as an associative
    scan, with lengths, masks, resets and reverse as for the other linear
    cells. ``dtype``: the compute dtype (None: the parameters'); with
    ``jnp.bfloat16`` the products take bfloat16 operands with float32
    accumulation, the recurrence stays float32, ``y`` is bfloat16.
    """
    fn = "rnnjax.cells.mamba"
    dtype = compute_dtype(fn, dtype)
    H = check_size(fn, "hidden_size", hidden_size)
    N = check_size(fn, "state_size", state_size)
    R = check_size(fn, "dt_rank", math.ceil(H / 16) if dt_rank is None else dt_rank)
    if not 0.0 < dt_min < dt_max:
        raise ValueError(f"{fn}: expected 0 < dt_min < dt_max, got dt_min={dt_min}, dt_max={dt_max}. "
                         "Fix: pass e.g. dt_min=0.001, dt_max=0.1 (Mamba's).")
    pdt = jnp.dtype(param_dtype)

    def init(key, input_size: int) -> MambaParams:
        F = check_size(fn, "input_size", input_size)
        k_in, k_x, k_w, k_b = jax.random.split(key, 4)
        w_in = None if F == H else initializer(fn, "uniform", F)(k_in, (F, H), pdt)
        unif = jax.random.uniform(k_b, (H,), jnp.float32)
        dt = jnp.maximum(jnp.exp(unif * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)), 1e-4)
        b_dt = dt + jnp.log(-jnp.expm1(-dt))  # softplus(b_dt) = dt
        a_log = jnp.broadcast_to(jnp.log(jnp.arange(1, N + 1, dtype=jnp.float32)), (H, N))
        return MambaParams(w_in, initializer(fn, "uniform", H)(k_x, (H, R + 2 * N), pdt),
                           initializer(fn, "uniform", R)(k_w, (R, H), pdt), b_dt.astype(pdt), a_log.astype(pdt),
                           jnp.ones((H,), pdt))

    def initial_carry(params: MambaParams, batch_shape=()) -> Array:
        return jnp.zeros((*tuple(batch_shape), H * N), state_dtype(carry_dtype(params.w_x.dtype, dtype)))

    def project(params: MambaParams, xs: Array) -> Array:
        """``[..., 2H + 2N]``: the channels ``u``, the step size's pre-activation, ``B`` and ``C``."""
        u = xs if params.w_in is None else matmul(xs, params.w_in, dtype)
        low, bc = jnp.split(matmul(u, params.w_x, dtype), [R], axis=-1)
        dt = matmul(low, params.w_dt, dtype) + params.b_dt
        return jnp.concatenate([u.astype(dt.dtype), dt, bc.astype(dt.dtype)], axis=-1)

    def split(px: Array):
        px = px.astype(state_dtype(px.dtype))
        return jnp.split(px, [H, 2 * H, 2 * H + N], axis=-1)

    def coefficients(params: MambaParams, px: Array):
        u, dt, b, _ = split(px)
        delta = jax.nn.softplus(dt)[..., None]
        a = jnp.exp(delta * -jnp.exp(params.a_log.astype(delta.dtype)))
        return a.reshape(*a.shape[:-2], H * N), (delta * u[..., None] * b[..., None, :]).reshape(*a.shape[:-2], H * N)

    def output(params: MambaParams, h: Array, px: Array) -> Array:
        u, _, _, c = split(px)
        y = jnp.einsum("...hn,...n->...h", h.reshape(*h.shape[:-1], H, N), c) + params.d.astype(u.dtype) * u
        return y.astype(px.dtype)

    lin = Linear(coefficients, lambda h: h, lambda h: h, output)
    return linear_cell(lin, init, initial_carry, project,
                       lambda p: p.w_x.shape[0] if p.w_in is None else p.w_in.shape[0], H, "mamba", dtype=dtype)
