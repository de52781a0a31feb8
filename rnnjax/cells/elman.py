"""Simple recurrent networks: Elman (hidden-state feedback) and Jordan (output feedback)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from rnnjax.cells.base import (
    Cell,
    Recurrence,
    affine,
    carry_dtype,
    cell_from,
    check_heads,
    check_size,
    compute_dtype,
    get_activation,
    hidden_cell_functions,
    hidden_only,
    init_config,
    init_weights,
    zeros_carry,
)
from rnnjax.types import Array, InitSpec


def _identity(h: Array) -> Array:
    return h


def elman(hidden_size: int, *, activation: str = "tanh", bias: bool = True,
          input_init: InitSpec = "uniform", recurrent_init: InitSpec = "uniform",
          bias_init: InitSpec = "uniform", heads: int = 1, param_dtype=jnp.float32, dtype=None) -> Cell:
    """Elman network, ``h' = act(x W_ih + b_ih + h W_hh + b_hh)``; equals ``torch.nn.RNN``.

    Params are :class:`~rnnjax.cells.base.Weights` (``w_ih [F, H]``,
    ``w_hh [H, H]``, ``b_ih``, ``b_hh``); the carry is ``h [..., H]``.
    ``activation`` is ``"tanh"`` or ``"relu"`` (any name in
    ``rnnjax.cells.ACTIVATIONS``). ``dtype``: the compute dtype (None: the
    parameters'); with ``jnp.bfloat16`` the matmuls take bfloat16 operands
    and accumulate in float32, the carry stays float32 and ``y`` is bfloat16
    (:mod:`rnnjax.cells.base`, "Mixed precision").

    ``heads=n``: a block-diagonal ``W_hh`` of ``n`` heads of ``H/n`` units,
    stored as ``w_hh [n, H/n, H/n]`` (one batched product per step); as for
    :func:`~rnnjax.cells.lstm`.
    """
    fn = "rnnjax.cells.elman"
    dtype = compute_dtype(fn, dtype)
    H = check_size(fn, "hidden_size", hidden_size)
    act = get_activation(fn, activation)
    n_heads = check_heads(fn, heads, H)
    cfg = init_config(fn, H, input_init, recurrent_init, bias_init, param_dtype)

    init, initial_carry, project = hidden_cell_functions(fn, cfg, H, 1, bias, dtype, n_heads)

    def pointwise(_, h: Array, px: Array, hz: Array):
        h = act(px + hz)
        return h, h

    rec = Recurrence(lambda p: (p.w_hh, p.b_hh), lambda p: (), _identity, pointwise)
    native = hidden_only(f"elman_{activation}", n_heads) if activation in ("tanh", "relu") else None
    return cell_from(rec, init, initial_carry, project, lambda p: p.w_ih.shape[0], H, "elman", native, dtype=dtype)


class JordanParams(NamedTuple):
    w_ih: Array  # [F, H]
    w_yh: Array  # [O, H]: the context (previous output) into the hidden layer
    b_h: Array | None  # [H]
    w_hy: Array  # [H, O]
    b_y: Array | None  # [O]


def jordan(hidden_size: int, output_size: int, *, activation: str = "tanh",
           output_activation: str = "tanh", bias: bool = True, input_init: InitSpec = "uniform",
           recurrent_init: InitSpec = "uniform", bias_init: InitSpec = "uniform",
           param_dtype=jnp.float32, dtype=None) -> Cell:
    """Jordan network: the context fed back is the previous *output*, not the hidden state::

        h_t = act(x_t W_ih + y_{t-1} W_yh + b_h)
        y_t = output_act(h_t W_hy + b_y)

    The carry is ``y_{t-1} [..., O]`` and the step returns ``y_t``. ``dtype``:
    the compute dtype, as for :func:`elman` (the fed-back ``y_{t-1}`` is the
    float32 carry; the returned ``y_t`` is in ``dtype``).
    """
    fn = "rnnjax.cells.jordan"
    dtype = compute_dtype(fn, dtype)
    H = check_size(fn, "hidden_size", hidden_size)
    O = check_size(fn, "output_size", output_size)
    act = get_activation(fn, activation)
    out_act = get_activation(fn, output_activation)
    cfg = init_config(fn, H, input_init, recurrent_init, bias_init, param_dtype)

    def init(key, input_size: int) -> JordanParams:
        k1, k2, k3 = jax.random.split(key, 3)
        hidden = init_weights(cfg, k1, check_size(fn, "input_size", input_size), O, H, 1, bias)
        w_hy = cfg.input(k2, (H, O), cfg.dtype)
        b_y = cfg.bias(k3, (O,), cfg.dtype) if bias else None
        return JordanParams(hidden.w_ih, hidden.w_hh, hidden.b_ih, w_hy, b_y)

    def initial_carry(params: JordanParams, batch_shape=()) -> Array:
        return zeros_carry(batch_shape, O, carry_dtype(params.w_hy.dtype, dtype))

    def project(params: JordanParams, xs: Array) -> Array:
        return affine(xs, params.w_ih, params.b_h, dtype)

    def pointwise(readout, y_prev: Array, px: Array, hz: Array):
        y = out_act(affine(act(px + hz), *readout, dtype))
        return y, y

    rec = Recurrence(lambda p: (p.w_yh, None), lambda p: (p.w_hy, p.b_y), _identity, pointwise)
    return cell_from(rec, init, initial_carry, project, lambda p: p.w_ih.shape[0], O, "jordan", dtype=dtype)
