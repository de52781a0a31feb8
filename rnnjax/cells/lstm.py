"""Long short-term memory: the PyTorch-compatible LSTM and the layer-normalised LSTM."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from rnnjax.cells.base import (
    Cell,
    Native,
    Recurrence,
    affine,
    carry_dtype,
    cell_from,
    check_heads,
    check_size,
    compute_dtype,
    gain_shift,
    gate_layer_norm,
    init_config,
    init_weights,
    layer_norm,
    matmul,
    zeros_carry,
)
from rnnjax.types import Array, InitSpec


class LSTMParams(NamedTuple):
    w_ih: Array  # [F, 4H], gate order i, f, g, o (PyTorch's)
    w_hh: Array  # [P or H, 4H]
    b_ih: Array | None  # [4H]
    b_hh: Array | None  # [4H]
    w_hr: Array | None  # [H, P] projection of h (proj_size), else None
    w_peep: Array | None  # [3, H] peephole weights for i, f, o, else None


class LSTMCarry(NamedTuple):
    h: Array  # [..., P or H]
    c: Array  # [..., H]


def _read_h(carry: LSTMCarry) -> Array:
    return carry.h


def _forget_bias(fn: str, forget_bias: float, bias: bool) -> float:
    if forget_bias and not bias:
        raise ValueError(
            f"{fn}: forget_bias={forget_bias} needs bias=True (it is added to the forget gate's bias). "
            "Fix: pass bias=True or forget_bias=0.0."
        )
    return float(forget_bias)


def lstm(hidden_size: int, *, proj_size: int = 0, peepholes: bool = False, forget_bias: float = 0.0,
         bias: bool = True, input_init: InitSpec = "uniform", recurrent_init: InitSpec = "uniform",
         bias_init: InitSpec = "uniform", heads: int = 1, param_dtype=jnp.float32, dtype=None) -> Cell:
    """LSTM with fused gates; equals ``torch.nn.LSTM`` (including ``proj_size``).

    One ``[.., P or H] x [P or H, 4H]`` matmul per step computes all four
    gates. ``forget_bias`` is added to the forget gate's initial input bias
    (1.0 is the common choice for training from scratch; 0.0 keeps PyTorch's
    initialisation). ``peepholes=True`` adds Gers & Schmidhuber's diagonal
    connections from the cell state to the input, forget and output gates.
    With ``proj_size=P > 0`` the hidden state is projected, ``h = (o *
    tanh(c)) W_hr``, and ``y``/``h`` have ``P`` features.

    ``heads=n`` (FlashRNN's multi-head LSTM) makes the recurrent matrix
    block-diagonal: ``n`` heads of ``H/n`` units, each feeding back only to
    its own units of the four gates, stored as ``w_hh [n, H/n, 4H/n]`` and
    run as one batched product per step (``1/n`` of the dense product's
    FLOPs). ``heads=1`` is the dense cell. Not with ``proj_size``.

    ``param_dtype`` stores the parameters; ``dtype`` is the compute dtype
    (None: the parameters'). ``dtype=jnp.bfloat16`` runs every matmul on
    bfloat16 operands with float32 accumulation and keeps the gates, the cell
    state and the carry in float32; ``y`` comes back in bfloat16
    (:mod:`rnnjax.cells.base`, "Mixed precision").
    """
    fn = "rnnjax.cells.lstm"
    dtype = compute_dtype(fn, dtype)
    H = check_size(fn, "hidden_size", hidden_size)
    P = check_size(fn, "proj_size", proj_size, minimum=0)
    if P >= H and P:
        raise ValueError(f"{fn}: proj_size must be smaller than hidden_size={H}, got {P} (as in torch.nn.LSTM). "
                         "Fix: pass a smaller proj_size, or 0 for no projection.")
    out = P or H
    n_heads = check_heads(fn, heads, H)
    if n_heads > 1 and P:
        raise ValueError(f"{fn}: heads={n_heads} needs proj_size=0 (each head feeds back its own H/heads units, "
                         f"which a projection mixes), got proj_size={P}. Fix: pass proj_size=0 or heads=1.")
    fb = _forget_bias(fn, forget_bias, bias)
    cfg = init_config(fn, H, input_init, recurrent_init, bias_init, param_dtype)

    def init(key, input_size: int) -> LSTMParams:
        k_w, k_r, k_p = jax.random.split(key, 3)
        w = init_weights(cfg, k_w, check_size(fn, "input_size", input_size), out, H, 4, bias, n_heads)
        b_ih = w.b_ih.at[H:2 * H].add(fb) if bias else None
        w_hr = cfg.input(k_r, (H, P), cfg.dtype) if P else None
        w_peep = cfg.bias(k_p, (3, H), cfg.dtype) if peepholes else None
        return LSTMParams(w.w_ih, w.w_hh, b_ih, w.b_hh, w_hr, w_peep)

    def initial_carry(params: LSTMParams, batch_shape=()) -> LSTMCarry:
        state = carry_dtype(params.w_hh.dtype, dtype)
        return LSTMCarry(zeros_carry(batch_shape, out, state), zeros_carry(batch_shape, H, state))

    def project(params: LSTMParams, xs: Array) -> Array:
        return affine(xs, params.w_ih, params.b_ih, dtype)

    def pointwise(extras, carry: LSTMCarry, px: Array, hz: Array):
        w_hr, w_peep = extras
        zi, zf, zg, zo = jnp.split(px + hz, 4, axis=-1)
        if w_peep is not None:
            zi = zi + carry.c * w_peep[0]
            zf = zf + carry.c * w_peep[1]
        c = jax.nn.sigmoid(zf) * carry.c + jax.nn.sigmoid(zi) * jnp.tanh(zg)
        if w_peep is not None:
            zo = zo + c * w_peep[2]
        h = jax.nn.sigmoid(zo) * jnp.tanh(c)
        if w_hr is not None:
            h = matmul(h, w_hr, dtype)
        return LSTMCarry(h, c), h

    rec = Recurrence(lambda p: (p.w_hh, p.b_hh), lambda p: (p.w_hr, p.w_peep), _read_h, pointwise)
    native = None if P or peepholes else Native(
        "lstm", lambda p: (p.w_ih, p.w_hh, p.b_ih, p.b_hh), lambda c: (c.h, c.c), LSTMCarry, n_heads)
    return cell_from(rec, init, initial_carry, project, lambda p: p.w_ih.shape[0], out, "lstm", native, dtype=dtype)


class LayerNormLSTMParams(NamedTuple):
    w_ih: Array  # [F, 4H]
    w_hh: Array  # [H, 4H]
    ln_x: Array  # [2, 4, H]: gain and shift of each gate's input part
    ln_h: Array  # [2, 4, H]: gain and shift of each gate's recurrent part
    ln_c: Array  # [2, H]: gain and shift of the cell state before the output tanh


def layer_norm_lstm(hidden_size: int, *, forget_bias: float = 0.0, eps: float = 1e-5,
                    input_init: InitSpec = "uniform", recurrent_init: InitSpec = "uniform",
                    param_dtype=jnp.float32, dtype=None) -> Cell:
    """Layer-normalised LSTM (Ba, Kiros & Hinton 2016)::

        z = LN(x W_ih) + LN(h W_hh)          (each gate's block normalised on its own)
        c' = σ(f) c + σ(i) tanh(g);   h' = σ(o) tanh(LN(c'))

    Each layer norm has a gain (init 1) and a shift (init 0); the shifts
    play the part of the biases. ``forget_bias`` initialises the forget
    gate's input shift. The input part is normalised in ``project``, so it
    is hoisted with the input matmul. ``dtype``: the compute dtype, as for
    :func:`lstm` (the layer norms' statistics are float32 in any case).
    """
    fn = "rnnjax.cells.layer_norm_lstm"
    dtype = compute_dtype(fn, dtype)
    H = check_size(fn, "hidden_size", hidden_size)
    cfg = init_config(fn, H, input_init, recurrent_init, "zeros", param_dtype)

    def init(key, input_size: int) -> LayerNormLSTMParams:
        w = init_weights(cfg, key, check_size(fn, "input_size", input_size), H, H, 4, False)
        gate_ln = gain_shift((4, H), cfg.dtype)
        return LayerNormLSTMParams(w.w_ih, w.w_hh, gate_ln.at[1, 1].set(forget_bias), gate_ln,
                                   gain_shift((H,), cfg.dtype))

    def initial_carry(params: LayerNormLSTMParams, batch_shape=()) -> LSTMCarry:
        state = carry_dtype(params.w_hh.dtype, dtype)
        return LSTMCarry(zeros_carry(batch_shape, H, state), zeros_carry(batch_shape, H, state))

    def project(params: LayerNormLSTMParams, xs: Array) -> Array:
        return gate_layer_norm(matmul(xs, params.w_ih, dtype), params.ln_x[0], params.ln_x[1], 4, eps)

    def pointwise(norms, carry: LSTMCarry, px: Array, hz: Array):
        ln_h, ln_c = norms
        zi, zf, zg, zo = jnp.split(px + gate_layer_norm(hz, ln_h[0], ln_h[1], 4, eps), 4, axis=-1)
        c = jax.nn.sigmoid(zf) * carry.c + jax.nn.sigmoid(zi) * jnp.tanh(zg)
        h = jax.nn.sigmoid(zo) * jnp.tanh(layer_norm(c, ln_c[0], ln_c[1], eps))
        return LSTMCarry(h, c), h

    rec = Recurrence(lambda p: (p.w_hh, None), lambda p: (p.ln_h, p.ln_c), _read_h, pointwise)
    return cell_from(rec, init, initial_carry, project, lambda p: p.w_ih.shape[0], H, "layer_norm_lstm", dtype=dtype)
