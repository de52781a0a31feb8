"""minGRU and minLSTM (Feng et al. 2024, "Were RNNs All We Needed?"): gates
that read only the input, so the recurrence is linear in the carry."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from rnnjax.cells.base import (
    Cell,
    Linear,
    carry_dtype,
    check_size,
    compute_dtype,
    gate_blocks,
    init_config,
    linear_cell,
    matmul,
    state_dtype,
)
from rnnjax.types import Array, InitSpec


def g(x: Array) -> Array:
    """Feng et al.'s positive activation: ``x + 1/2`` for ``x >= 0``, ``sigmoid(x)`` below."""
    return jnp.where(x >= 0, x + 0.5, jax.nn.sigmoid(x))


class MinRNNParams(NamedTuple):
    w: Array  # [F, G*H]: gate blocks then the candidate block
    b: Array | None  # [G*H]


def _min_cell(fn: str, name: str, gates: int, gate_coefficients, save_projection: bool, hidden_size: int, bias: bool,
              input_init: InitSpec, bias_init: InitSpec, param_dtype, dtype) -> Cell:
    dtype = compute_dtype(fn, dtype)
    H = check_size(fn, "hidden_size", hidden_size)
    cfg = init_config(fn, H, input_init, "uniform", bias_init, param_dtype)

    def init(key, input_size: int) -> MinRNNParams:
        k_w, k_b = jax.random.split(key)
        w = gate_blocks(cfg.input, k_w, check_size(fn, "input_size", input_size), H, gates + 1, cfg.dtype)
        return MinRNNParams(w, cfg.bias(k_b, ((gates + 1) * H,), cfg.dtype) if bias else None)

    def initial_carry(params: MinRNNParams, batch_shape=()) -> Array:
        return jnp.zeros((*tuple(batch_shape), H), state_dtype(carry_dtype(params.w.dtype, dtype)))

    def project(params: MinRNNParams, xs: Array) -> Array:
        z = matmul(xs, params.w, dtype)
        return z if params.b is None else z + params.b

    def coefficients(params, px: Array):
        k = px.astype(state_dtype(px.dtype))
        return gate_coefficients(*jnp.split(k, gates + 1, axis=-1))

    def output(params, h: Array, px: Array) -> Array:
        return h.astype(px.dtype)

    lin = Linear(coefficients, lambda c: c, lambda h: h, output, save_projection)
    return linear_cell(lin, init, initial_carry, project, lambda p: p.w.shape[0], H, name, dtype=dtype)


def _mingru_coefficients(k_z, k_h):
    # 1 - z = sigmoid(-k_z): formed directly, so it does not round to 0 where z rounds to 1
    return jax.nn.sigmoid(-k_z), jax.nn.sigmoid(k_z) * g(k_h)


def _minlstm_coefficients(k_f, k_i, k_h):
    # f / (f + i) and i / (f + i) with u = exp(-k_f), v = exp(-k_i):
    # (1 + v) / (2 + u + v) and (1 + u) / (2 + u + v), numerator and denominator scaled by exp(-m),
    # m = max(0, -k_f, -k_i), so no exponential overflows and the denominator is at least 1
    m = jnp.maximum(jnp.maximum(-k_f, -k_i), 0)
    e_m, u, v = jnp.exp(-m), jnp.exp(-k_f - m), jnp.exp(-k_i - m)
    inv = 1 / (2 * e_m + u + v)
    return (e_m + v) * inv, (e_m + u) * inv * g(k_h)


def mingru(hidden_size: int, *, bias: bool = True, input_init: InitSpec = "uniform", bias_init: InitSpec = "uniform",
           param_dtype=jnp.float32, dtype=None) -> Cell:
    """minGRU: ``z = sigmoid(x W_z + b_z)``, ``h~ = g(x W_h + b_h)``, ``h' = (1 - z) h + z h~``.

    ``g`` is the paper's positive activation (``x + 1/2`` for ``x >= 0``,
    ``sigmoid(x)`` below). The paper forms the coefficients in log space
    (``log(1 - z) = -softplus(k)``, ``log z + log h~``) for its log-space
    scan; rnnjax's scans multiply the coefficients themselves, so they are
    formed directly with the same stability: ``1 - z`` is ``sigmoid(-k)``,
    never ``1 - sigmoid(k)``, so no gate rounds to exactly 0 or 1 (the
    values equal ``exp`` of the log-space ones to float32 round-off, with
    a third of the transcendentals; a whole-sequence evaluation on a CPU is
    bound by such elementwise passes). Params are
    ``w [F, 2H]`` (z block, then candidate) and ``b [2H]`` (PyTorch-style
    U(±1/√H) by default); the carry is ``h [..., H]`` in float32 (or wider),
    also for bfloat16 parameters. The step reads no matmul of ``h``, so the
    cell has a :class:`~rnnjax.cells.base.Linear` form and
    :func:`rnnjax.unroll` can run it with ``jax.lax.associative_scan``.
    ``dtype``: the compute dtype (None: the parameters'); with ``jnp.bfloat16``
    the projection takes bfloat16 operands and accumulates in float32, the
    gates and the state stay float32, and ``y`` is bfloat16
    (:mod:`rnnjax.cells.base`, "Mixed precision").
    """
    return _min_cell("rnnjax.cells.mingru", "mingru", 1, _mingru_coefficients, True, hidden_size, bias, input_init,
                     bias_init, param_dtype, dtype)


def minlstm(hidden_size: int, *, bias: bool = True, input_init: InitSpec = "uniform", bias_init: InitSpec = "uniform",
            param_dtype=jnp.float32, dtype=None) -> Cell:
    """minLSTM: ``f = sigmoid(x W_f + b_f)``, ``i = sigmoid(x W_i + b_i)``, ``h~ = g(x W_h + b_h)``,
    normalised gates ``f' = f / (f + i)``, ``i' = i / (f + i)``, ``h' = f' h + i' h~``.

    Formed directly as for :func:`mingru`: with ``u = exp(-k_f)``, ``v = exp(-k_i)``,
    ``f' = (1 + v) / (2 + u + v)`` and ``i' = (1 + u) / (2 + u + v)``, numerator and denominator
    scaled by ``exp(-max(0, -k_f, -k_i))`` so that nothing overflows and the gates stay finite and
    normalised where both ``f`` and ``i`` underflow (the log-space form's guarantee).
    Params ``w [F, 3H]`` (f, i, candidate blocks) and ``b [3H]``; carry ``h [..., H]``.
    ``dtype``: the compute dtype, as for :func:`mingru`.
    """
    return _min_cell("rnnjax.cells.minlstm", "minlstm", 2, _minlstm_coefficients, False, hidden_size, bias,
                     input_init, bias_init, param_dtype, dtype)
