"""xLSTM's cells (Beck et al. 2024, "xLSTM: Extended Long Short-Term Memory"): the sLSTM, a scalar
memory with exponential gating and block-diagonal (multi-head) recurrence, and the mLSTM, a matrix
memory with exponential gating and no hidden-to-hidden recurrence (so it has a linear form).

Both use the paper's stabiliser: with ``log i`` and ``log f`` the logs of the input and forget gates,
``m' = max(log f + m, log i)``, and the states are kept scaled by ``exp(-m)`` (the gates become
``exp(log i - m')`` and ``exp(log f + m - m')``, each at most one). The outputs do not depend on ``m``
(the scale cancels in ``c / n`` and in the mLSTM's normalised read-out), so neither do their gradients.
The forget gate is the paper's sigmoid option, ``log f = log_sigmoid(f~)`` (as xLSTM's own code).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from rnnjax.cells.base import (
    Cell,
    Linear,
    affine,
    carry_dtype,
    cast_output,
    check_size,
    compute_dtype,
    gate_blocks,
    init_config,
    initializer,
    linear_cell,
    matmul,
    state_dtype,
    zeros_carry,
)
from rnnjax.types import Array, InitSpec

# exp(-m) in the mLSTM's read-out floor is computed as exp(clip(-m, -LOG_FLOOR, LOG_FLOOR)): finite in
# float32; it differs from exp(-m) only where the read-out is ~exp(-80) of its scale.
LOG_FLOOR = 80.0


def _heads(fn: str, hidden_size: int, heads: int) -> tuple[int, int]:
    H = check_size(fn, "hidden_size", hidden_size)
    K = check_size(fn, "heads", heads, example=1)
    if H % K:
        raise ValueError(f"{fn}: hidden_size={H} must be a multiple of heads={K} (each head has hidden_size / heads "
                         f"units). Fix: pass heads dividing {H}, e.g. heads=1.")
    return H, K


def _forget_bias(K: int, dtype) -> Array:
    """The forget gates' initial biases: ``linspace(3, 6)`` over ``K`` gates (xLSTM's mLSTM init)."""
    return jnp.linspace(3.0, 6.0, K, dtype=dtype)


class SLSTMParams(NamedTuple):
    w: Array  # [F, 4H]: the i, f, z, o blocks
    r: Array  # [K, d, 4, d]: head k's recurrent weights from its d units to its units of each gate (d = H / K)
    b: Array  # [4H]


class SLSTMCarry(NamedTuple):
    h: Array  # [..., H]
    c: Array  # [..., H]: the cell state, scaled by exp(-m)
    n: Array  # [..., H]: the normaliser, scaled by exp(-m)
    m: Array  # [..., H]: the stabiliser


def _block_diagonal(h: Array, r: Array, dtype) -> Array:
    """``h [..., K*d] -> [..., 4*K*d]``: each head's ``d`` units times its own ``[d, 4, d]`` block, gate-major."""
    K, d = r.shape[0], r.shape[1]
    hk = h.reshape(*h.shape[:-1], K, d)
    if dtype is None:
        out = jnp.einsum("...kd,kdge->...gke", hk, r)
    else:
        out = jnp.einsum("...kd,kdge->...gke", hk.astype(dtype), r.astype(dtype),
                         preferred_element_type=jnp.promote_types(dtype, jnp.float32))
    return out.reshape(*h.shape[:-1], 4 * K * d)


def slstm(hidden_size: int, *, heads: int = 4, input_init: InitSpec = "uniform", recurrent_init: InitSpec = "uniform",
          param_dtype=jnp.float32, dtype=None) -> Cell:
    """sLSTM: exponential input gate, sigmoid forget gate, normaliser state and stabiliser::

        i~, f~, z~, o~ = x W + h R + b               # R block-diagonal: one [d, 4d] block per head (d = H / heads)
        m' = max(log_sigmoid(f~) + m, i~)            # m' = i~ at a sequence's first step (n = 0)
        i = exp(i~ - m'),  f = exp(log_sigmoid(f~) + m - m')
        c' = f c + i tanh(z~),  n' = f n + i,  h' = sigmoid(o~) * c' / n'

    equal to the paper's unstabilised equations (``c`` and ``n`` are scaled by
    ``exp(-m)``, which cancels in ``c / n``, and ``n >= 1`` after the first
    step, so nothing overflows or divides by zero). Params ``w [F, 4H]``
    (i, f, z, o blocks), ``r [heads, d, 4, d]``, ``b [4H]`` (forget biases
    ``linspace(3, 6)``, others zero); the carry is :class:`SLSTMCarry`
    ``(h, c, n, m)``, zeros at the start. ``heads=1`` is a dense recurrence.
    The recurrence reads ``h``, so the cell runs in the sequential scan
    (autodiff backward, no fused or native path). ``dtype``: the compute dtype
    (None: the parameters'); with ``jnp.bfloat16`` both products take
    bfloat16 operands with float32 accumulation, and the gates and states
    stay float32.
    """
    fn = "rnnjax.cells.slstm"
    dtype = compute_dtype(fn, dtype)
    H, K = _heads(fn, hidden_size, heads)
    d = H // K
    cfg = init_config(fn, H, input_init, "uniform", "zeros", param_dtype)
    recurrent = initializer(fn, recurrent_init, d)  # U(+-1/sqrt(d)): a head's fan-in

    def init(key, input_size: int) -> SLSTMParams:
        k_w, k_r = jax.random.split(key)
        w = gate_blocks(cfg.input, k_w, check_size(fn, "input_size", input_size), H, 4, cfg.dtype)
        r = jnp.stack([gate_blocks(recurrent, k, d, d, 4, cfg.dtype) for k in jax.random.split(k_r, K)])
        b = jnp.zeros((4, H), cfg.dtype).at[1].set(jnp.repeat(_forget_bias(K, cfg.dtype), d)).reshape(4 * H)
        return SLSTMParams(w, r.reshape(K, d, 4, d), b)

    def initial_carry(params: SLSTMParams, batch_shape=()) -> SLSTMCarry:
        return SLSTMCarry(*(zeros_carry(batch_shape, H, carry_dtype(params.w.dtype, dtype)) for _ in range(4)))

    def project(params: SLSTMParams, xs: Array) -> Array:
        return affine(xs, params.w, params.b, dtype)

    def step(params: SLSTMParams, carry: SLSTMCarry, px: Array):
        pre = px + _block_diagonal(carry.h, params.r, dtype)
        i_raw, f_raw, z_raw, o_raw = jnp.split(pre.astype(carry.c.dtype), 4, axis=-1)
        log_f = jax.nn.log_sigmoid(f_raw)
        first = carry.n == 0
        m = jnp.where(first, i_raw, jnp.maximum(log_f + carry.m, i_raw))
        i = jnp.exp(i_raw - m)
        f = jnp.exp(jnp.where(first, 0.0, log_f + carry.m - m))  # 0 * f where c = n = 0
        c = f * carry.c + i * jnp.tanh(z_raw)
        n = f * carry.n + i
        h = jax.nn.sigmoid(o_raw) * c / n
        return SLSTMCarry(h, c, n, m), cast_output(h, dtype)

    return Cell(init, initial_carry, project, step, lambda p: p.w.shape[0], H, "slstm")


class MLSTMParams(NamedTuple):
    w: Array  # [F, 4H + 2K]: q, k, v, o blocks [H] each, then the input and forget gates [K] each
    b: Array  # [4H + 2K]


class MLSTMCarry(NamedTuple):
    c: Array  # [..., K, d, d]: each head's matrix memory C[value, key], scaled by exp(-m)
    n: Array  # [..., K, d]: each head's normaliser, scaled by exp(-m)
    m: Array  # [..., K]: each head's stabiliser


def mlstm(hidden_size: int, *, heads: int = 4, input_init: InitSpec = "xavier", param_dtype=jnp.float32,
          dtype=None) -> Cell:
    """mLSTM: a matrix memory per head, exponential input gate, sigmoid forget gate::

        q, k, v = x W_q + b_q, (x W_k + b_k) / sqrt(d), x W_v + b_v     # [heads, d] each (d = H / heads)
        i~, f~ = x w_i + b_i, x w_f + b_f                               # one scalar gate per head
        C' = f C + i v k^T,  n' = f n + i k                             # i = exp(i~), f = sigmoid(f~)
        h = sigmoid(x W_o + b_o) * C' q / max(|n'^T q|, 1)

    kept stabilised (module docstring: ``C`` and ``n`` scaled by ``exp(-m)``,
    the floor 1 becoming ``exp(-m)``, so the outputs equal the unstabilised
    equations). There is no hidden-to-hidden recurrence: the state update is
    linear in the carry, so the cell has a stabilised
    :class:`~rnnjax.cells.base.Linear` form and ``rnnjax.unroll(...,
    parallel=True)`` runs it without a step loop (the stabiliser by a
    max-plus associative scan, the memory by :func:`rnnjax.linear_scan.linear_scan`).
    That state is ``heads * d * (d + 1)`` numbers per sequence (``H * (H /
    heads + 1)``), so the parallel forms hold it for every step: ``T * B * H *
    (d + 1)`` floats.

    Params ``w [F, 4H + 2K]``, ``b`` (forget biases ``linspace(3, 6)``, others
    zero); the carry is :class:`MLSTMCarry` ``(c, n, m)``, zeros at the start,
    in float32 or wider. ``dtype``: the compute dtype (None: the
    parameters'); with ``jnp.bfloat16`` the projection takes bfloat16 operands
    with float32 accumulation and the memory stays float32.
    """
    fn = "rnnjax.cells.mlstm"
    dtype = compute_dtype(fn, dtype)
    H, K = _heads(fn, hidden_size, heads)
    d = H // K
    cfg = init_config(fn, H, input_init, "uniform", "zeros", param_dtype)

    def init(key, input_size: int) -> MLSTMParams:
        F = check_size(fn, "input_size", input_size)
        k_w, k_g = jax.random.split(key)
        w = jnp.concatenate([gate_blocks(cfg.input, k_w, F, H, 4, cfg.dtype),
                             gate_blocks(cfg.input, k_g, F, K, 2, cfg.dtype)], axis=1)
        b = jnp.zeros((4 * H + 2 * K,), cfg.dtype).at[4 * H + K:].set(_forget_bias(K, cfg.dtype))
        return MLSTMParams(w, b)

    def initial_carry(params: MLSTMParams, batch_shape=()) -> MLSTMCarry:
        real = state_dtype(carry_dtype(params.w.dtype, dtype))
        B = tuple(batch_shape)
        return MLSTMCarry(jnp.zeros((*B, K, d, d), real), jnp.zeros((*B, K, d), real), jnp.zeros((*B, K), real))

    def project(params: MLSTMParams, xs: Array) -> Array:
        return matmul(xs, params.w, dtype) + params.b

    def parts(px: Array):
        """``q, k, v, o [..., K, d]`` and the gates' logs ``log_f, log_i [..., K]``, float32 or wider."""
        px = px.astype(state_dtype(px.dtype))
        q, k, v, o = (px[..., j * H:(j + 1) * H].reshape(*px.shape[:-1], K, d) for j in range(4))
        return q, k / math.sqrt(d), v, o, jax.nn.log_sigmoid(px[..., 4 * H + K:]), px[..., 4 * H:4 * H + K]

    def stabiliser(params, px: Array):
        return parts(px)[4:]

    def coefficients(params, px: Array, m_prev: Array, m: Array):
        _, k, v, _, log_f, log_i = parts(px)
        f = jnp.exp(log_f + m_prev - m)[..., None]
        i = jnp.exp(log_i - m)[..., None, None]
        b = jnp.concatenate([(i * v[..., :, None] * k[..., None, :]).reshape(*k.shape[:-1], d * d), i[..., 0] * k], -1)
        return jnp.broadcast_to(f, b.shape).reshape(*b.shape[:-2], -1), b.reshape(*b.shape[:-2], -1)

    def state(carry: MLSTMCarry):
        flat = jnp.concatenate([carry.c.reshape(*carry.c.shape[:-2], d * d), carry.n], axis=-1)
        return flat.reshape(*flat.shape[:-2], K * d * (d + 1)), carry.m

    def to_carry(hm) -> MLSTMCarry:
        h, m = hm
        h = h.reshape(*h.shape[:-1], K, d * (d + 1))
        return MLSTMCarry(h[..., :d * d].reshape(*h.shape[:-1], d, d), h[..., d * d:], m)

    def output(params, hm, px: Array) -> Array:
        c, n, m = to_carry(hm)
        q, _, _, o, _, _ = parts(px)
        floor = jnp.exp(jnp.clip(-m, -LOG_FLOOR, LOG_FLOOR))
        den = jnp.maximum(jnp.abs(jnp.sum(n * q, -1)), floor)[..., None]
        h = jax.nn.sigmoid(o) * jnp.einsum("...vk,...k->...v", c, q) / den
        return h.reshape(*h.shape[:-2], H).astype(px.dtype)

    def chunkwise(params, px: Array, hm, ms: Array, valid, resets):
        """``C`` steps at once: ``C_t q_t`` as ``sum_s w_ts (q_t . k_s) v_s`` plus the entering state's share,
        with ``w_ts = exp(log_f_{s+1} + ... + log_f_t + log_i_s - m_t)`` (at most 1, since ``m_t`` is the
        step form's stabiliser); a reset at step ``r`` cuts every ``s < r`` (and the entering state) off."""
        q, k, v, o, log_f, log_i = parts(px)
        if valid is not None:  # a held step forgets nothing and adds nothing
            log_f = jnp.where(valid[..., None], log_f, 0.0)
            log_i = jnp.where(valid[..., None], log_i, -jnp.inf)
        seg = jnp.zeros(px.shape[:-1], jnp.int32) if resets is None else jnp.cumsum(resets, axis=0, dtype=jnp.int32)
        if resets is not None:  # what the reset step forgets is dropped anyway
            log_f = jnp.where(resets[..., None], 0.0, log_f)
        F = jnp.cumsum(log_f, axis=0)
        C = px.shape[0]
        causal = jnp.tril(jnp.ones((C, C), bool)).reshape(C, C, *([1] * (F.ndim - 1)))
        same = causal & (seg[:, None] == seg[None, :])[..., None]
        log_w = jnp.where(same, F[:, None] - F[None, :] + log_i[None, :] - ms[:, None], -jnp.inf)
        w = jnp.exp(log_w) * jnp.einsum("t...d,s...d->ts...", q, k)  # [t, s, *B, K]
        c0, n0, m0 = to_carry(hm)
        g0 = jnp.exp(jnp.where((seg == 0)[..., None], F + m0 - ms, -jnp.inf))  # the entering state's weight
        num = jnp.einsum("ts...,s...d->t...d", w, v) + g0[..., None] * jnp.einsum("...vd,t...d->t...v", c0, q)
        den = jnp.sum(w, axis=1) + g0 * jnp.einsum("...d,t...d->t...", n0, q)
        floor = jnp.exp(jnp.clip(-ms, -LOG_FLOOR, LOG_FLOOR))
        h = jax.nn.sigmoid(o) * num / jnp.maximum(jnp.abs(den), floor)[..., None]
        w_end = jnp.exp(log_w[-1])  # the state after the last step: the same weights, without q
        c = jnp.einsum("s...,s...v,s...d->...vd", w_end, v, k) + g0[-1][..., None, None] * c0
        n = jnp.einsum("s...,s...d->...d", w_end, k) + g0[-1][..., None] * n0
        return state(MLSTMCarry(c, n, ms[-1])), h.reshape(*h.shape[:-2], H).astype(px.dtype)

    # chunkwise jitted: eager calls (unroll outside jit) compile it as one program, not op by op (4.5 s a shape).
    lin = Linear(coefficients, state, to_carry, output, stabiliser=stabiliser, chunkwise=jax.jit(chunkwise))
    return linear_cell(lin, init, initial_carry, project, lambda p: p.w.shape[0], H, "mlstm", dtype=dtype)
