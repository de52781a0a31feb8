"""The native sequence op: one ``jax.ffi`` call runs a whole sequence, one runs its backward pass.

:func:`native_unroll` is what :func:`rnnjax.unroll` calls for ``backend="native"``.
The op is a ``jax.custom_vjp`` whose forward call stores the per-step
residuals (gate activations, the state each step read) and whose backward
call returns the weight gradients: the input projection and the weight
gradients are single products over all ``T x N`` rows inside the kernel,
and the input gradient is a third call that XLA drops where it is unused.
Under ``vmap`` the mapped axes are folded into the batch
(``jax.custom_batching.custom_vmap``), so a vmapped call is one kernel call
over a bigger batch; mapped weights (a vmapped population) run one call per
member with ``lax.map``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

KINDS = {"lstm": 0, "gru": 1, "gru_cho": 2, "elman_tanh": 3, "elman_relu": 4}
# Cells whose forward call keeps a [T, N, H] array besides the gates for the backward call (LSTM: the cell state
# each step read; GRU: the recurrent part of n; Cho GRU: r*h).
EXTRA = ("lstm", "gru", "gru_cho")

F32 = jnp.float32


def _units(w_hh) -> tuple[int, int, int]:
    """``(H, G, heads)`` of a recurrent weight: dense ``[H, G]``, or the ``[heads, H/heads, G/heads]`` blocks of a
    multi-head cell (block-diagonal; :mod:`rnnjax.cells.base`, "Multi-head recurrences")."""
    if w_hh.ndim == 3:
        n, d, e = w_hh.shape
        return n * d, n * e, n
    return *w_hh.shape, 1


def _empty_mask():
    return jnp.zeros((0,), jnp.uint8)


def _fold(x, batched: bool, axis_size: int, batch_axis: int):
    """Moves the vmapped axis 0 of ``x`` next to its batch axis and merges the two (broadcasting an unmapped x)."""
    if x.ndim == 1 and x.shape[0] == 0:  # an absent mask
        return x
    if not batched:
        x = jnp.broadcast_to(x, (axis_size, *x.shape))
    x = jnp.moveaxis(x, 0, batch_axis)
    return x.reshape(*x.shape[:batch_axis], -1, *x.shape[batch_axis + 2:])


def _unfold(x, axis_size: int, batch_axis: int):
    x = x.reshape(*x.shape[:batch_axis], axis_size, -1, *x.shape[batch_axis + 1:])
    return jnp.moveaxis(x, batch_axis, 0)


def _vmappable(call, batch_axes_in: tuple, batch_axes_out: tuple, weights: tuple):
    """``call`` under ``custom_vmap``: mapped axes fold into the batch axis of each operand
    (``batch_axes_in``/``_out``: that axis, or None for operands without one); where any operand in
    ``weights`` (positions) is mapped, ``lax.map`` runs one call per mapped slice instead."""
    fn = jax.custom_batching.custom_vmap(call)

    @fn.def_vmap
    def rule(axis_size, in_batched, *args):
        if any(in_batched[i] for i in weights):
            full = [a if b else jnp.broadcast_to(a, (axis_size, *a.shape)) for a, b in zip(args, in_batched)]
            return tuple(jax.lax.map(lambda xs: fn(*xs), tuple(full))), (True,) * len(batch_axes_out)
        folded = [a if axis is None else _fold(a, b, axis_size, axis)
                  for a, b, axis in zip(args, in_batched, batch_axes_in)]
        outs = fn(*folded)
        return (tuple(o if axis is None else _unfold(o, axis_size, axis) for o, axis in zip(outs, batch_axes_out)),
                tuple(axis is not None for axis in batch_axes_out))

    return fn


@functools.cache
def _forward_call(kind: str, reverse: bool, bf16: bool, save: bool):
    """``(x, w_ih, w_hh, b_ih, b_hh, h0, c0, valid, resets) -> (ys, h, c, hs_prev, gates, extra)``; without
    ``save`` (inference) the last three, the residuals of the backward call, are empty."""

    def call(x, w_ih, w_hh, b_ih, b_hh, h0, c0, valid, resets):
        T, N, _ = x.shape
        H, G, _ = _units(w_hh)
        kept = [(T, N, H), (T, N, G), (T, N, H) if kind in EXTRA else (0,)] if save else [(0,)] * 3
        out = [jax.ShapeDtypeStruct(s, F32) for s in [(T, N, H), (N, H), (N, H), *kept]]
        return tuple(jax.ffi.ffi_call("rnnjax_rnn_fwd", out)(
            x, w_ih, w_hh, b_ih, b_hh, h0, c0, valid, resets, kind=np.int64(KINDS[kind]), reverse=reverse, bf16=bf16,
            save=save))

    # batch axes: x [T, N, F] -> 1; h0, c0 [N, H] -> 0; valid/resets [T, N] -> 1; weights: none
    extra = 1 if save and kind in EXTRA else None
    return _vmappable(call, (1, None, None, None, None, 0, 0, 1, 1), (1, 0, 0, 1 if save else None,
                                                                      1 if save else None, extra), weights=(1, 2, 3, 4))


@functools.cache
def _backward_call(kind: str, reverse: bool, bf16: bool):
    """``(x, w_ih, w_hh, valid, resets, hs_prev, gates, extra, dys, dh, dc) -> (dx, dw_ih, dw_hh, db_ih, db_hh,
    dh0, dc0)``. Under ``vmap`` each mapped slice runs its own call (``vmap_method="sequential"``): a vmapped
    gradient needs each slice's weight gradients, which one call over the folded batch would sum. ``dx`` is a
    call of its own (:func:`_input_grad_call`), so XLA leaves its product out where the input's gradient is not
    used (the first layer over data: a sixth of the FLOPs of a training step where ``F = H``)."""
    input_grad = _input_grad_call(bf16)

    def call(x, w_ih, w_hh, valid, resets, hs_prev, gates, extra, dys, dh, dc):
        T, N, F = x.shape
        H, G, _ = _units(w_hh)
        shapes = [(F, G), w_hh.shape, (G,), (G,), (N, H), (N, H), (T, N, G), (T, N, H) if kind == "gru" else (0,)]
        out = [jax.ShapeDtypeStruct(s, F32) for s in shapes]
        # The kernel works in place: its dzx output is the gates' buffer, and the GRU's dzh_n the extras'.
        aliases = {5: 6, 6: 7} if kind == "gru" else {5: 6}
        *grads, dzx, _ = jax.ffi.ffi_call("rnnjax_rnn_bwd", out, vmap_method="sequential",
                                          input_output_aliases=aliases)(
            x, w_hh, valid, resets, hs_prev, gates, extra, dys, dh, dc, kind=np.int64(KINDS[kind]), reverse=reverse,
            bf16=bf16)
        return input_grad(dzx, w_ih)[0], *grads

    return call


@functools.cache
def _input_grad_call(bf16: bool):
    """``(dzx [T, N, G], w_ih [F, G]) -> (dx [T, N, F],)``: the input's cotangent, ``dzx W_ih^T``."""

    def call(dzx, w_ih):
        out = jax.ShapeDtypeStruct((*dzx.shape[:2], w_ih.shape[0]), F32)
        return (jax.ffi.ffi_call("rnnjax_input_grad", out)(dzx, w_ih, bf16=bf16),)

    return _vmappable(call, (1, None), (1,), weights=(1,))


def _reference(kind: str, reverse: bool, x, w_ih, w_hh, b_ih, b_hh, h0, c0, valid, resets):
    """The same sequence on the XLA path (:func:`rnnjax.unroll`, float32): what the kernels' own derivatives are
    differentiated through, so second-order gradients work (at XLA's speed)."""
    from rnnjax import cells, scan
    from rnnjax.cells.base import Weights
    from rnnjax.cells.lstm import LSTMCarry, LSTMParams

    H, _, heads = _units(w_hh)
    if kind == "lstm":
        cell, carry = cells.lstm(H, heads=heads), LSTMCarry(h0, c0)
        params = LSTMParams(w_ih, w_hh, b_ih, b_hh, None, None)
    else:
        cell = {"gru": lambda: cells.gru(H, heads=heads),
                "gru_cho": lambda: cells.gru(H, reset_after=False, heads=heads),
                "elman_tanh": lambda: cells.elman(H, heads=heads),
                "elman_relu": lambda: cells.elman(H, activation="relu", heads=heads)}[kind]()
        params, carry = Weights(w_ih, w_hh, b_ih, b_hh), h0
    carry, ys = scan.unroll(cell, params, x, carry=carry, mask=valid.astype(bool) if valid.size else None,
                            resets=resets.astype(bool) if resets.size else None, reverse=reverse, time_major=True,
                            backend="xla")
    return (ys, carry.h, carry.c) if kind == "lstm" else (ys, carry, jnp.zeros_like(carry))


DIFFERENTIABLE = 7  # x, w_ih, w_hh, b_ih, b_hh, h0, c0; then the masks valid, resets


@functools.cache
def _forward(kind: str, reverse: bool, bf16: bool, save: bool):
    """The forward call as a ``custom_jvp`` whose tangents come from :func:`_reference` (the residuals' tangents
    are zero: the backward call's own tangents are computed from the inputs, not from them)."""
    call = _forward_call(kind, reverse, bf16, save)
    fn = jax.custom_jvp(call)

    @fn.defjvp
    def jvp(primals, tangents):
        out = fn(*primals)
        masks = primals[DIFFERENTIABLE:]
        _, t = jax.jvp(lambda *a: _reference(kind, reverse, *a, *masks), primals[:DIFFERENTIABLE],
                       tangents[:DIFFERENTIABLE])
        return out, (*t, *(jnp.zeros_like(o) for o in out[3:]))

    return fn


@functools.cache
def _backward(kind: str, reverse: bool, bf16: bool):
    """``(x, w_ih, w_hh, b_ih, b_hh, h0, c0, valid, resets, hs_prev, gates, extra, dys, dh, dc) -> gradients``,
    a ``custom_jvp`` whose tangents are those of :func:`_reference`'s VJP (second-order gradients)."""
    call = _backward_call(kind, reverse, bf16)

    def run(x, w_ih, w_hh, b_ih, b_hh, h0, c0, valid, resets, hs_prev, gates, extra, dys, dh, dc):
        return call(x, w_ih, w_hh, valid, resets, hs_prev, gates, extra, dys, dh, dc)

    fn = jax.custom_jvp(run)

    @fn.defjvp
    def jvp(primals, tangents):
        inputs, (valid, resets), cotangents = primals[:DIFFERENTIABLE], primals[7:9], primals[12:]

        def pullback(*args):
            f = functools.partial(_reference, kind, reverse, valid=valid, resets=resets)
            return jax.vjp(f, *args[:DIFFERENTIABLE])[1](args[DIFFERENTIABLE:])

        _, t = jax.jvp(pullback, (*inputs, *cotangents), (*tangents[:DIFFERENTIABLE], *tangents[12:]))
        return fn(*primals), t

    return fn


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def sequence(kind: str, reverse: bool, bf16: bool, x, w_ih, w_hh, b_ih, b_hh, h0, c0, valid, resets):
    """Time-major ``x [T, N, F]`` (float32) -> ``(ys [T, N, H], h [N, H], c [N, H])``."""
    ys, h, c, *_ = _forward(kind, reverse, bf16, False)(x, w_ih, w_hh, b_ih, b_hh, h0, c0, valid, resets)
    return ys, h, c


def _sequence_fwd(kind, reverse, bf16, *inputs):
    ys, h, c, *kept = _forward(kind, reverse, bf16, True)(*inputs)
    return (ys, h, c), (*inputs, *kept)


def _sequence_bwd(kind, reverse, bf16, saved, cotangents):
    return (*_backward(kind, reverse, bf16)(*saved, *cotangents), None, None)


sequence.defvjp(_sequence_fwd, _sequence_bwd)


def _mask(m, T: int, N: int):
    return _empty_mask() if m is None else m.reshape(T, N).astype(jnp.uint8)


def native_unroll(cell, params, xs, carry, valid, resets, *, reverse: bool, bf16: bool):
    """Time-major ``xs [T, *B, F]`` -> ``(carry, ys [T, *B, O])`` with the native kernels; ``valid``/``resets``
    are time-major boolean masks or None, with the semantics of :func:`rnnjax.unroll`. ``bf16``: products
    in bfloat16 operands with float32 accumulation; everything else in float32."""
    spec = cell.native
    w_ih, w_hh, b_ih, b_hh = spec.weights(params)
    policy = cell.recurrence.dtype if cell.recurrence is not None else None  # outputs in the cell's compute dtype
    out_dtype = jnp.result_type(xs.dtype, w_hh.dtype) if policy is None else policy
    T, batch_shape, F = xs.shape[0], tuple(xs.shape[1:-1]), xs.shape[-1]
    N = math.prod(batch_shape)
    H, G, _ = _units(w_hh)
    h0, c0 = spec.split(carry)
    zeros = jnp.zeros((G,), F32)
    b_ih = zeros if b_ih is None else b_ih.astype(F32)
    b_hh = zeros if b_hh is None else b_hh.astype(F32)
    h0_flat = h0.reshape(N, H).astype(F32)
    c0_flat = jnp.zeros_like(h0_flat) if c0 is None else c0.reshape(N, H).astype(F32)
    ys, h, c = sequence(spec.kind, reverse, bf16, xs.reshape(T, N, F).astype(F32), w_ih.astype(F32),
                        w_hh.astype(F32), b_ih, b_hh, h0_flat, c0_flat, _mask(valid, T, N), _mask(resets, T, N))
    h = h.reshape(*batch_shape, H).astype(h0.dtype)
    c = None if c0 is None else c.reshape(*batch_shape, H).astype(c0.dtype)
    return spec.join(h, c), ys.reshape(T, *batch_shape, H).astype(out_dtype)
