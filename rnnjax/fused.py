"""The fused backward pass: a ``jax.custom_vjp`` over a whole sequence.

Autodiff of ``lax.scan`` accumulates every weight gradient inside the
backward loop: one small ``[H, B] x [B, G]`` matmul per step for ``W_hh``
(and, without hoisting, another for ``W_ih``). For a cell with a
:class:`~rnnjax.cells.base.Recurrence` (``z = read(carry) @ W + b`` then a
pointwise rest) this module runs the backward scan on the carry's
cotangent alone and stores each step's cotangent of ``z`` and of the input
projection; the weight gradients then come from single matmuls over all
``T x B`` rows after the loop, as cuDNN does::

    dW   = H_prev^T @ dZ          [H, T*B] x [T*B, G]
    dW_ih, dxs = vjp(project)(dPX)   (X^T @ dPX and dPX @ W_ih^T)

A multi-head cell (``heads=n``: ``W`` stored as ``[n, H/n, G/n]``, block-
diagonal) keeps its structure here: ``dZ @ W^T`` is one batched product
over the heads per step, and ``dW`` only its diagonal blocks, one batched
product over all rows after the loop.

The pointwise part's own parameters (peepholes, layer-norm gains, the
Jordan readout, the Cho-GRU candidate weights) are small or rare and
accumulate in the loop. Numbers equal autodiff's to float32 round-off
(tests/test_fused.py).

Under the mixed-precision policy (``recurrence.dtype`` set, e.g. bfloat16;
:mod:`rnnjax.cells.base`) the backward pass keeps it: ``dZ @ W^T`` and
``H_prev^T @ dZ`` take ``dtype`` operands and accumulate in float32, the
carry's cotangent stays float32, and ``dW`` comes back in the parameters'
dtype without passing through ``dtype``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rnnjax._tree import tree_add, where_batch
from rnnjax.cells.base import Cell, affine, heads_einsum, matmul, to_heads


def _rows_matmul(a, b, dtype=None):
    """``a[..., K]^T @ b[..., N]`` summed over all leading dims, accumulated in float32
    (on ``dtype`` operands when the cell computes in ``dtype``)."""
    a2, b2 = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    if dtype is not None:
        a2, b2 = a2.astype(dtype), b2.astype(dtype)
    return jnp.dot(a2.T, b2, preferred_element_type=jnp.float32)


def _weight_gradient(hs, dzs, w, dtype=None):
    """``dW = H_prev^T @ dZ`` over all rows; for a multi-head ``w [n, H/n, G/n]`` (:mod:`rnnjax.cells.base`,
    "Multi-head recurrences") only its diagonal blocks, one batched product over the heads."""
    if w.ndim == 2:
        return _rows_matmul(hs, dzs, dtype)
    n, d, e = w.shape
    h, dz = hs.reshape(-1, n, d), to_heads(dzs.reshape(-1, dzs.shape[-1]), n, e // d)
    if dtype is not None:
        h, dz = h.astype(dtype), dz.astype(dtype)
    return jnp.einsum("rnd,rne->nde", h, dz, preferred_element_type=jnp.float32)


def _transposed(w, dtype=None):
    """``dz -> dz @ W^T``, the recurrent product's input cotangent (one batched product for heads)."""
    if w.ndim == 2:
        w_t = w.T
        return lambda dz: matmul(dz, w_t, dtype)
    n, d, e = w.shape
    return lambda dz: heads_einsum("...ne,nde->...nd", to_heads(dz, n, e // d), w, dtype).reshape(
        *dz.shape[:-1], n * d)


def fused_unroll(cell: Cell, params, xs, carry, valid, resets, *, hoist: bool, reverse: bool, unroll: int,
                 save_pointwise: bool | None = None):
    """Time-major ``xs [T, *B, F]`` -> ``(carry, ys [T, *B, O])`` with the fused backward pass.

    ``valid``/``resets`` are time-major boolean masks or None, with the
    semantics of :func:`rnnjax.unroll`. ``save_pointwise``: store each
    step's linearisation of the pointwise part (no recomputation of its
    transcendentals in the backward pass) instead of recomputing it from
    the stored carry.
    """
    rec = cell.recurrence
    batch_shape = tuple(xs.shape[1:-1])
    if save_pointwise is None:
        save_pointwise = True

    def forward(params, xs, carry, valid, resets, save=True):
        w, b = rec.weights(params)
        pw = rec.pointwise_params(params)
        zero = cell.initial_carry(params, batch_shape)
        px_all = cell.project(params, xs) if hoist else None

        def body(c, inp):
            x_t, v_t, r_t = inp
            if r_t is not None:
                c = where_batch(r_t, zero, c)
            px = x_t if hoist else cell.project(params, x_t)
            h = rec.read(c)
            hz = affine(h, w, b, rec.dtype)
            if save and save_pointwise:
                (new_c, y), lin = jax.vjp(rec.pointwise, pw, c, px, hz)
                saved = (h, lin)
            else:
                new_c, y = rec.pointwise(pw, c, px, hz)
                saved = (h, (c, None if hoist else px, hz)) if save else None
            if v_t is not None:
                new_c = where_batch(v_t, new_c, c)
                y = jnp.where(v_t[..., None], y, jnp.zeros_like(y))
            return new_c, (y, saved)

        carry, (ys, residuals) = jax.lax.scan(
            body, carry, (px_all if hoist else xs, valid, resets), reverse=reverse, unroll=unroll)
        if not save:
            return (carry, ys), None
        hs, saved = residuals
        if not save_pointwise and hoist:
            saved = (saved[0], px_all, saved[2])
        return (carry, ys), (hs, saved)

    @jax.custom_vjp
    def run(params, xs, carry, valid, resets):
        # Without differentiation nothing is saved: no linearisation per step (which jax.disable_jit's
        # Python loop could not stack either).
        return forward(params, xs, carry, valid, resets, save=False)[0]

    def run_fwd(params, xs, carry, valid, resets):
        out, saved = forward(params, xs, carry, valid, resets)
        return out, (params, xs, valid, resets, *saved)

    def run_bwd(res, cotangents):
        params, xs, valid, resets, hs, saved = res
        d_carry, d_ys = cotangents
        w, b = rec.weights(params)
        back = _transposed(w, rec.dtype)
        pw = rec.pointwise_params(params)
        zero = cell.initial_carry(params, batch_shape)
        _, read_vjp = jax.vjp(rec.read, zero)  # read is linear: its VJP holds at any point

        def body(acc, inp):
            dc, dpw = acc
            step_saved, dy, v_t, r_t = inp
            if v_t is not None:  # an invalid step passes the carry through and outputs zero
                dy = jnp.where(v_t[..., None], dy, jnp.zeros_like(dy))
                dc_step = where_batch(v_t, dc, jax.tree_util.tree_map(jnp.zeros_like, dc))
            else:
                dc_step = dc
            if save_pointwise:
                pointwise_vjp = step_saved
            else:
                _, pointwise_vjp = jax.vjp(rec.pointwise, pw, *step_saved)
            dpw_t, dc_prev, dpx, dhz = pointwise_vjp((dc_step, dy))
            dc_prev = tree_add(dc_prev, read_vjp(back(dhz).astype(dhz.dtype))[0])
            if v_t is not None:
                dc_prev = where_batch(v_t, dc_prev, dc)
            if r_t is not None:  # the carry before a reset does not reach the output
                dc_prev = where_batch(r_t, jax.tree_util.tree_map(jnp.zeros_like, dc_prev), dc_prev)
            return (dc_prev, tree_add(dpw, dpw_t)), (dpx, dhz)

        dpw0 = jax.tree_util.tree_map(jnp.zeros_like, pw)
        (d_carry0, dpw), (dpxs, dhzs) = jax.lax.scan(
            body, (d_carry, dpw0), (saved, d_ys, valid, resets), reverse=not reverse, unroll=unroll)

        d_w = _weight_gradient(hs, dhzs, w, rec.dtype).astype(w.dtype)
        d_b = None if b is None else dhzs.reshape(-1, dhzs.shape[-1]).sum(0, dtype=jnp.float32).astype(b.dtype)
        d_params = jax.vjp(rec.weights, params)[1]((d_w, d_b))[0]
        d_params = tree_add(d_params, jax.vjp(rec.pointwise_params, params)[1](dpw)[0])
        d_proj, d_xs = jax.vjp(cell.project, params, xs)[1](dpxs)
        return tree_add(d_params, d_proj), d_xs, d_carry0, None, None

    run.defvjp(run_fwd, run_bwd)
    return run(params, xs, carry, valid, resets)
