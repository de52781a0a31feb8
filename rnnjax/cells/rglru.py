"""The Real-Gated Linear Recurrent Unit of Griffin / RecurrentGemma (De et al. 2024)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from rnnjax.cells import base as policy  # the mixed-precision policy's helpers
from rnnjax.cells.base import Cell, Linear, check_size, gate_blocks, init_config, linear_cell
from rnnjax.types import Array, InitSpec


class RGLRUParams(NamedTuple):
    w: Array  # [F, 3H]: recurrence gate r, input gate i, value x blocks
    b: Array  # [3H]
    a_param: Array  # [H]: a = exp(-softplus(a_param)), the decay at r = 1/c


def rglru(hidden_size: int, *, c: float = 8.0, min_rad: float = 0.9, max_rad: float = 0.999,
          input_init: InitSpec = "xavier", param_dtype=jnp.float32, dtype=None) -> Cell:
    """RG-LRU: a real diagonal recurrence whose decay is gated by the input::

        r_t = sigmoid(x W_r + b_r),  i_t = sigmoid(x W_i + b_i),  v_t = x W_v + b_v
        log a_t = -c * r_t * softplus(a_param)                  # a_t = a^(c r_t), a = exp(-softplus(a_param))
        h_t = a_t * h_{t-1} + sqrt(1 - a_t^2) * (i_t * v_t)

    as in RecurrentGemma's ``RGLRU`` (``c = 8``; ``a`` initialised uniformly
    on the ring ``[min_rad, max_rad]`` by area; ``sqrt(1 - a_t^2)`` computed as
    ``sqrt(-expm1(2 log a_t))``). Griffin's gates read the ``H``-wide branch
    through block-diagonal weights; this cell reads its own input through
    dense ``[F, H]`` blocks (the value projection ``W_v`` is the branch's
    linear layer; Griffin's short convolution is not part of the cell). A
    reset starts from the initial carry, as for every rnnjax cell
    (RecurrentGemma instead drops the normalisation at a segment's first
    step). The carry ``h [..., H]`` is float32 or wider; the cell has a
    :class:`~rnnjax.cells.base.Linear` form for ``jax.lax.associative_scan``.
    ``dtype``: the compute dtype (None: the parameters'); with ``jnp.bfloat16``
    the projection takes bfloat16 operands and accumulates in float32, the
    gates and the state stay float32, and ``y`` is bfloat16
    (:mod:`rnnjax.cells.base`, "Mixed precision").
    """
    fn = "rnnjax.cells.rglru"
    dtype = policy.compute_dtype(fn, dtype)
    H = check_size(fn, "hidden_size", hidden_size)
    if not 0.0 < min_rad < max_rad < 1.0:
        raise ValueError(f"{fn}: expected 0 < min_rad < max_rad < 1, got min_rad={min_rad}, max_rad={max_rad}. "
                         "Fix: pass e.g. min_rad=0.9, max_rad=0.999.")
    if not c > 0:
        raise ValueError(f"{fn}: expected c > 0, got {c}. Fix: pass c=8.0 (Griffin's constant).")
    cfg = init_config(fn, H, input_init, "uniform", "zeros", param_dtype)

    def init(key, input_size: int) -> RGLRUParams:
        k_w, k_a = jax.random.split(key)
        w = gate_blocks(cfg.input, k_w, check_size(fn, "input_size", input_size), H, 3, cfg.dtype)
        unif = jax.random.uniform(k_a, (H,), jnp.float32)
        log_a = 0.5 * jnp.log(unif * (max_rad**2 - min_rad**2) + min_rad**2)  # |a| uniform on the ring by area
        a_param = jnp.log(jnp.expm1(-log_a))  # softplus(a_param) = -log a
        return RGLRUParams(w, jnp.zeros((3 * H,), cfg.dtype), a_param.astype(cfg.dtype))

    def initial_carry(params: RGLRUParams, batch_shape=()) -> Array:
        return jnp.zeros((*tuple(batch_shape), H), policy.state_dtype(policy.carry_dtype(params.w.dtype, dtype)))

    def project(params: RGLRUParams, xs: Array) -> Array:
        return policy.matmul(xs, params.w, dtype) + params.b

    def coefficients(params: RGLRUParams, px: Array):
        k = px.astype(policy.state_dtype(px.dtype))
        r, i, v = jax.nn.sigmoid(k[..., :H]), jax.nn.sigmoid(k[..., H:2 * H]), k[..., 2 * H:]
        log_a = -c * r * jax.nn.softplus(params.a_param.astype(k.dtype))
        return jnp.exp(log_a), jnp.sqrt(-jnp.expm1(2 * log_a)) * (i * v)

    def output(params, h: Array, px: Array) -> Array:
        return h.astype(px.dtype)

    lin = Linear(coefficients, lambda h: h, lambda h: h, output)
    return linear_cell(lin, init, initial_carry, project, lambda p: p.w.shape[0], H, "rglru", dtype=dtype)
