"""minGRU and minLSTM (Feng et al. 2024, "Were RNNs All We Needed?"): gates
that read only the input, so the recurrence is linear in the carry."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from rnnjax.cells.base import (
    Cell,
    Linear,
    check_size,
    gate_blocks,
    init_config,
    linear_cell,
    state_dtype,
)
from rnnjax.types import Array, InitSpec


def log_g(x: Array) -> Array:
    """``log g(x)`` with Feng et al.'s positive activation ``g(x) = x + 1/2`` for ``x >= 0``, ``sigmoid(x)`` below."""
    return jnp.where(x >= 0, jnp.log(jnp.maximum(x, 0) + 0.5), -jax.nn.softplus(-x))


class MinRNNParams(NamedTuple):
    w: Array  # [F, G*H]: gate blocks then the candidate block
    b: Array | None  # [G*H]


def _min_cell(fn: str, name: str, gates: int, log_coefficients, hidden_size: int, bias: bool, input_init: InitSpec,
              bias_init: InitSpec, param_dtype) -> Cell:
    H = check_size(fn, "hidden_size", hidden_size)
    cfg = init_config(fn, H, input_init, "uniform", bias_init, param_dtype)

    def init(key, input_size: int) -> MinRNNParams:
        k_w, k_b = jax.random.split(key)
        w = gate_blocks(cfg.input, k_w, check_size(fn, "input_size", input_size), H, gates + 1, cfg.dtype)
        return MinRNNParams(w, cfg.bias(k_b, ((gates + 1) * H,), cfg.dtype) if bias else None)

    def initial_carry(params: MinRNNParams, batch_shape=()) -> Array:
        return jnp.zeros((*tuple(batch_shape), H), state_dtype(params.w.dtype))

    def project(params: MinRNNParams, xs: Array) -> Array:
        z = xs @ params.w
        return z if params.b is None else z + params.b

    def coefficients(params, px: Array):
        k = px.astype(state_dtype(px.dtype))
        log_a, log_b = log_coefficients(*(k[..., i * H:(i + 1) * H] for i in range(gates + 1)))
        return jnp.exp(log_a), jnp.exp(log_b)

    def output(params, h: Array, px: Array) -> Array:
        return h.astype(px.dtype)

    lin = Linear(coefficients, lambda c: c, lambda h: h, output)
    return linear_cell(lin, init, initial_carry, project, lambda p: p.w.shape[0], H, name)


def _mingru_log(k_z, k_h):
    # z = sigmoid(k_z): log(1 - z) = -softplus(k_z), log z = -softplus(-k_z)
    return -jax.nn.softplus(k_z), -jax.nn.softplus(-k_z) + log_g(k_h)


def _minlstm_log(k_f, k_i, k_h):
    # f' = f / (f + i), i' = i / (f + i) with f = sigmoid(k_f), i = sigmoid(k_i), in log space
    diff = jax.nn.softplus(-k_f) - jax.nn.softplus(-k_i)
    return -jax.nn.softplus(diff), -jax.nn.softplus(-diff) + log_g(k_h)


def mingru(hidden_size: int, *, bias: bool = True, input_init: InitSpec = "uniform", bias_init: InitSpec = "uniform",
           param_dtype=jnp.float32) -> Cell:
    """minGRU: ``z = sigmoid(x W_z + b_z)``, ``h~ = g(x W_h + b_h)``, ``h' = (1 - z) h + z h~``.

    The log-space form of the paper: ``g`` is the positive activation
    (``x + 1/2`` for ``x >= 0``, ``sigmoid(x)`` below) and the coefficients
    are formed from logs (``log(1 - z) = -softplus(k)``, ``log z + log h~``),
    so no gate saturates to exactly 0 or 1 by rounding. Params are
    ``w [F, 2H]`` (z block, then candidate) and ``b [2H]`` (PyTorch-style
    U(±1/√H) by default); the carry is ``h [..., H]`` in float32 (or wider),
    also for bfloat16 parameters. The step reads no matmul of ``h``, so the
    cell has a :class:`~rnnjax.cells.base.Linear` form and
    :func:`rnnjax.unroll` can run it with ``jax.lax.associative_scan``.
    """
    return _min_cell("rnnjax.cells.mingru", "mingru", 1, _mingru_log, hidden_size, bias, input_init, bias_init,
                     param_dtype)


def minlstm(hidden_size: int, *, bias: bool = True, input_init: InitSpec = "uniform", bias_init: InitSpec = "uniform",
            param_dtype=jnp.float32) -> Cell:
    """minLSTM: ``f = sigmoid(x W_f + b_f)``, ``i = sigmoid(x W_i + b_i)``, ``h~ = g(x W_h + b_h)``,
    normalised gates ``f' = f / (f + i)``, ``i' = i / (f + i)``, ``h' = f' h + i' h~``.

    Log-space form as :func:`mingru` (``log f' = -softplus(softplus(-k_i) - softplus(-k_f))``).
    Params ``w [F, 3H]`` (f, i, candidate blocks) and ``b [3H]``; carry ``h [..., H]``.
    """
    return _min_cell("rnnjax.cells.minlstm", "minlstm", 2, _minlstm_log, hidden_size, bias, input_init, bias_init,
                     param_dtype)
