"""Gated recurrent units: both formulations, the layer-normalised GRU, and the minimal gated unit."""

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
    gain_shift,
    gate_layer_norm,
    hidden_cell_functions,
    hidden_only,
    init_config,
    init_weights,
    matmul,
    zeros_carry,
)
from rnnjax.types import Array, InitSpec


def _identity(h: Array) -> Array:
    return h


def _gate_columns(w_hh: Array, start: int, stop: int) -> Array:
    """Gates ``start:stop`` of the three in ``w_hh``: columns of the dense ``[H, 3H]``, or of each head's
    ``[H/n, 3H/n]``."""
    width = w_hh.shape[-1] // 3
    return w_hh[..., start * width:stop * width]


def gru(hidden_size: int, *, reset_after: bool = True, bias: bool = True, input_init: InitSpec = "uniform",
        recurrent_init: InitSpec = "uniform", bias_init: InitSpec = "uniform", heads: int = 1,
        param_dtype=jnp.float32, dtype=None) -> Cell:
    """GRU, gate order r, z, n (PyTorch's); params are ``Weights`` with ``3H`` columns.

    ``reset_after=True`` (default) is the cuDNN/PyTorch formulation and
    equals ``torch.nn.GRU``: ``n = tanh(x W_in + b_in + r * (h W_hn + b_hn))``.
    ``reset_after=False`` is Cho et al. (2014): the reset gate acts before
    the recurrent matmul, ``n = tanh(x W_in + b_in + (r * h) W_hn + b_hn)``,
    which costs a second, dependent matmul per step.
    In both, ``h' = (1 - z) * n + z * h``.

    ``dtype``: the compute dtype (None: the parameters'); with
    ``jnp.bfloat16`` the matmuls (both of Cho's) take bfloat16 operands and
    accumulate in float32, the gates and the carry stay float32, and ``y``
    is bfloat16 (:mod:`rnnjax.cells.base`, "Mixed precision").

    ``heads=n``: a block-diagonal ``W_hh`` of ``n`` heads of ``H/n`` units,
    stored as ``w_hh [n, H/n, 3H/n]`` (one batched product per step, two
    for Cho's form); as for :func:`~rnnjax.cells.lstm`.
    """
    fn = "rnnjax.cells.gru"
    dtype = compute_dtype(fn, dtype)
    H = check_size(fn, "hidden_size", hidden_size)
    n_heads = check_heads(fn, heads, H)
    cfg = init_config(fn, H, input_init, recurrent_init, bias_init, param_dtype)

    init, initial_carry, project = hidden_cell_functions(fn, cfg, H, 3, bias, dtype, n_heads)

    def pointwise(candidate, h: Array, px: Array, hz: Array):
        x_r, x_z, x_n = jnp.split(px, 3, axis=-1)
        if reset_after:
            h_r, h_z, h_n = jnp.split(hz, 3, axis=-1)
            r, z = jax.nn.sigmoid(x_r + h_r), jax.nn.sigmoid(x_z + h_z)
            n = jnp.tanh(x_n + r * h_n)
        else:  # the candidate's recurrent matmul needs r first, so it stays in the pointwise part
            h_r, h_z = jnp.split(hz, 2, axis=-1)
            r, z = jax.nn.sigmoid(x_r + h_r), jax.nn.sigmoid(x_z + h_z)
            n = jnp.tanh(x_n + affine(r * h, *candidate, dtype))
        h = n + z * (h - n)
        return h, h

    def bias_part(b, part):
        return None if b is None else b[part]

    if reset_after:
        rec = Recurrence(lambda p: (p.w_hh, p.b_hh), lambda p: (), _identity, pointwise)
    else:
        rz, n = slice(0, 2 * H), slice(2 * H, 3 * H)
        rec = Recurrence(lambda p: (_gate_columns(p.w_hh, 0, 2), bias_part(p.b_hh, rz)),
                         lambda p: (_gate_columns(p.w_hh, 2, 3), bias_part(p.b_hh, n)), _identity, pointwise)
    native = hidden_only("gru" if reset_after else "gru_cho", n_heads)
    return cell_from(rec, init, initial_carry, project, lambda p: p.w_ih.shape[0], H, "gru", native, dtype=dtype)


def mgu(hidden_size: int, *, reset_gate: bool = True, bias: bool = True, input_init: InitSpec = "uniform",
        recurrent_init: InitSpec = "uniform", bias_init: InitSpec = "uniform", param_dtype=jnp.float32,
        dtype=None) -> Cell:
    """Minimal gated unit (Zhou et al. 2016): a GRU whose one forget gate ``f`` also resets; equals Flax's
    ``MGUCell``::

        f = σ(x W_if + b_if + h W_hf + b_hf)
        n = tanh(x W_in + b_in + f * (h W_hn + b_hn))      (reset_gate=False: + h W_hn + b_hn, no f)
        h' = (1 - f) * n + f * h

    Params are ``Weights`` with ``2H`` columns, gate order f, n (``w_ih [F, 2H]``, ``w_hh [H, 2H]``,
    ``b_ih``, ``b_hh [2H]``); as in :func:`gru`, ``b_hf`` only adds to ``b_if`` (Flax has no ``b_hf``,
    and no ``b_hn`` with ``reset_gate=False``). One ``[.., H] x [H, 2H]`` product per step, so the
    fused backward pass applies (:mod:`rnnjax.fused`); there is no native kernel. ``dtype``: the
    compute dtype, as for :func:`gru`.
    """
    fn = "rnnjax.cells.mgu"
    dtype = compute_dtype(fn, dtype)
    H = check_size(fn, "hidden_size", hidden_size)
    cfg = init_config(fn, H, input_init, recurrent_init, bias_init, param_dtype)

    init, initial_carry, project = hidden_cell_functions(fn, cfg, H, 2, bias, dtype)

    def pointwise(_, h: Array, px: Array, hz: Array):
        x_f, x_n = jnp.split(px, 2, axis=-1)
        h_f, h_n = jnp.split(hz, 2, axis=-1)
        f = jax.nn.sigmoid(x_f + h_f)
        n = jnp.tanh(x_n + (f * h_n if reset_gate else h_n))
        h = n + f * (h - n)
        return h, h

    rec = Recurrence(lambda p: (p.w_hh, p.b_hh), lambda p: (), _identity, pointwise)
    return cell_from(rec, init, initial_carry, project, lambda p: p.w_ih.shape[0], H, "mgu", dtype=dtype)


class LayerNormGRUParams(NamedTuple):
    w_ih: Array  # [F, 3H]
    w_hh: Array  # [H, 3H]
    ln_x: Array  # [2, 3, H]: gain and shift of each gate's input part
    ln_h: Array  # [2, 3, H]: gain and shift of each gate's recurrent part


def layer_norm_gru(hidden_size: int, *, eps: float = 1e-5, input_init: InitSpec = "uniform",
                   recurrent_init: InitSpec = "uniform", param_dtype=jnp.float32, dtype=None) -> Cell:
    """Layer-normalised GRU (Ba et al. 2016), in the reset-after form::

        a = LN(x W_ih);  b = LN(h W_hh)      (each gate's block normalised on its own)
        r = σ(a_r + b_r);  z = σ(a_z + b_z);  n = tanh(a_n + r * b_n)
        h' = (1 - z) * n + z * h

    ``dtype``: the compute dtype, as for :func:`gru`.
    """
    fn = "rnnjax.cells.layer_norm_gru"
    dtype = compute_dtype(fn, dtype)
    H = check_size(fn, "hidden_size", hidden_size)
    cfg = init_config(fn, H, input_init, recurrent_init, "zeros", param_dtype)

    def init(key, input_size: int) -> LayerNormGRUParams:
        w = init_weights(cfg, key, check_size(fn, "input_size", input_size), H, H, 3, False)
        gate_ln = gain_shift((3, H), cfg.dtype)
        return LayerNormGRUParams(w.w_ih, w.w_hh, gate_ln, gate_ln)

    def initial_carry(params: LayerNormGRUParams, batch_shape=()) -> Array:
        return zeros_carry(batch_shape, H, carry_dtype(params.w_hh.dtype, dtype))

    def project(params: LayerNormGRUParams, xs: Array) -> Array:
        return gate_layer_norm(matmul(xs, params.w_ih, dtype), params.ln_x[0], params.ln_x[1], 3, eps)

    def pointwise(ln_h, h: Array, px: Array, hz: Array):
        x_r, x_z, x_n = jnp.split(px, 3, axis=-1)
        h_r, h_z, h_n = jnp.split(gate_layer_norm(hz, ln_h[0], ln_h[1], 3, eps), 3, axis=-1)
        r, z = jax.nn.sigmoid(x_r + h_r), jax.nn.sigmoid(x_z + h_z)
        n = jnp.tanh(x_n + r * h_n)
        h = n + z * (h - n)
        return h, h

    rec = Recurrence(lambda p: (p.w_hh, None), lambda p: p.ln_h, _identity, pointwise)
    return cell_from(rec, init, initial_carry, project, lambda p: p.w_ih.shape[0], H, "layer_norm_gru", dtype=dtype)
