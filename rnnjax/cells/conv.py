"""Convolutional recurrent cells (Shi et al., 2015): ConvLSTM and ConvGRU over 1, 2 or 3 spatial dims.

The gates are convolutions instead of matmuls: inputs are ``[*B, T, *spatial, C]``, the carry is
``[*B, *spatial, H]`` (``initial_carry(params, (*B, *spatial))``), and every product of the dense cell
becomes a ``"SAME"``-padded, stride-1 convolution with a ``kernel_size`` window, so the spatial shape is
kept from step to step. The cells set ``Cell.spatial_dims``, which tells :func:`rnnjax.unroll` and
:func:`rnnjax.step` where the time axis is; everything else (lengths, masks, reverse, resets, remat,
``vmap``, ``jit``, streaming) works as for the dense cells.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from rnnjax.cells.base import (
    Cell,
    affine,
    carry_dtype,
    cast_output,
    check_size,
    compute_dtype,
    gate_blocks,
    initializer,
)
from rnnjax.cells.lstm import LSTMCarry, _forget_bias
from rnnjax.types import Array, InitSpec


class ConvParams(NamedTuple):
    w_ih: Array  # [*kernel, C, G]: the input convolution, gate-major columns as in the dense cell
    w_hh: Array  # [*kernel, H, G]: the recurrent convolution
    b_ih: Array | None  # [G]
    b_hh: Array | None  # [G]


def conv(x: Array, w: Array, b: Array | None, dtype=None) -> Array:
    """``"SAME"``, stride-1 convolution of ``x [..., *spatial, C]`` with ``w [*kernel, C, G]``, plus ``b``;
    any number of leading dims; under the policy of :func:`~rnnjax.cells.base.matmul` with ``dtype``.

    It is computed as one matmul of the ``prod(kernel) * C`` shifted copies of ``x`` (im2col) with ``w``
    as a ``[prod(kernel) * C, G]`` matrix: on CPU, with XLA's own convolution a training step of ``rnnjax train
    frames``'s model ran 21x slower, mostly in the gradient (small grids, many channels; docs/guides/cells.md)."""
    n = w.ndim - 2
    kernel, spatial = w.shape[:n], x.shape[x.ndim - n - 1:-1]
    low = [(k - 1) // 2 for k in kernel]  # lax's "SAME" at stride 1: k - 1 pixels, the odd one after
    padded = jnp.pad(x, [(0, 0)] * (x.ndim - n - 1) + [(lo, k - 1 - lo) for lo, k in zip(low, kernel)] + [(0, 0)])
    shifted = [padded[(..., *(slice(o, o + size) for o, size in zip(offset, spatial)), slice(None))]
               for offset in itertools.product(*(range(k) for k in kernel))]
    columns = shifted[0] if len(shifted) == 1 else jnp.concatenate(shifted, axis=-1)
    return affine(columns, w.reshape(-1, w.shape[-1]), b, dtype)


def _kernel(fn: str, kernel_size) -> tuple[int, ...]:
    kernel = (kernel_size,) if isinstance(kernel_size, int) and not isinstance(kernel_size, bool) else kernel_size
    ok = isinstance(kernel, (tuple, list)) and 1 <= len(kernel) <= 3 and all(
        isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in kernel)
    if not ok:
        raise ValueError(f"{fn}: expected kernel_size to be a tuple of 1, 2 or 3 positive integers (one per spatial "
                         f"dim), got {kernel_size!r}. Fix: pass e.g. kernel_size=(3, 3) for frames [*B, T, H, W, C].")
    return tuple(kernel)


def _conv_cell(fn: str, name: str, hidden_size: int, kernel_size, gates: int, *, bias: bool, forget_bias: float,
               input_init: InitSpec, recurrent_init: InitSpec, bias_init: InitSpec, param_dtype, dtype, carry, step):
    """The parts shared by the two cells: params, carry, projection; ``step(params, carry, px, dtype)``."""
    dtype = compute_dtype(fn, dtype)
    H = check_size(fn, "hidden_size", hidden_size)
    kernel = _kernel(fn, kernel_size)
    forget_bias = _forget_bias(fn, forget_bias, bias)
    inits = [initializer(fn, spec, H) for spec in (input_init, recurrent_init, bias_init)]
    p_dtype = jnp.dtype(param_dtype)

    def init(key, input_size: int) -> ConvParams:
        C = check_size(fn, "input_size", input_size)
        k_ih, k_hh, k_bi, k_bh = jax.random.split(key, 4)
        b_ih = inits[2](k_bi, (gates * H,), p_dtype).at[H:2 * H].add(forget_bias) if bias else None
        return ConvParams(gate_blocks(inits[0], k_ih, C, H, gates, p_dtype, kernel),
                          gate_blocks(inits[1], k_hh, H, H, gates, p_dtype, kernel),
                          b_ih, inits[2](k_bh, (gates * H,), p_dtype) if bias else None)

    def initial_carry(params: ConvParams, batch_shape=()):
        zeros = jnp.zeros((*tuple(batch_shape), H), carry_dtype(params.w_hh.dtype, dtype))
        return carry(zeros)

    def project(params: ConvParams, xs: Array) -> Array:
        return conv(xs, params.w_ih, params.b_ih, dtype)

    def cell_step(params, c, px):
        new, y = step(params, c, px, dtype)
        return new, cast_output(y, dtype)

    return Cell(init, initial_carry, project, cell_step, lambda p: p.w_ih.shape[-2], H, name,
                spatial_dims=len(kernel))


def conv_lstm(hidden_size: int, kernel_size, *, forget_bias: float = 1.0, bias: bool = True,
              input_init: InitSpec = "xavier", recurrent_init: InitSpec = "xavier", bias_init: InitSpec = "zeros",
              param_dtype=jnp.float32, dtype=None) -> Cell:
    """Convolutional LSTM (Shi et al., 2015), without peepholes (as Flax's and Keras's)::

        z = conv(x, W_ih) + b_ih + conv(h, W_hh) + b_hh      (gates i, f, g, o: PyTorch's order)
        c' = σ(f) c + σ(i) tanh(g);   h' = σ(o) tanh(c')

    ``kernel_size``: one int (1 spatial dim) or a tuple of 1-3 ints, the window of both convolutions
    (``"SAME"`` padding, stride 1). Inputs ``[*B, T, *spatial, C]``; carry :class:`LSTMCarry` of two
    ``[*B, *spatial, H]`` arrays. ``forget_bias`` (default 1.0, as Flax's ``f + 1`` and Keras's
    ``unit_forget_bias``) is added to the forget gate's initial bias. Kernels are Glorot-uniform per gate
    block, biases zero. ``dtype``: the compute dtype (the convolutions take its operands with float32
    sums; gates and carry stay float32), as for :func:`~rnnjax.cells.lstm`.
    """

    def step(params: ConvParams, carry: LSTMCarry, px: Array, dtype):
        zi, zf, zg, zo = jnp.split(px + conv(carry.h, params.w_hh, params.b_hh, dtype), 4, axis=-1)
        c = jax.nn.sigmoid(zf) * carry.c + jax.nn.sigmoid(zi) * jnp.tanh(zg)
        h = jax.nn.sigmoid(zo) * jnp.tanh(c)
        return LSTMCarry(h, c), h

    return _conv_cell("rnnjax.cells.conv_lstm", "conv_lstm", hidden_size, kernel_size, 4, bias=bias,
                      forget_bias=forget_bias, input_init=input_init, recurrent_init=recurrent_init,
                      bias_init=bias_init, param_dtype=param_dtype, dtype=dtype,
                      carry=lambda zeros: LSTMCarry(zeros, zeros), step=step)


def conv_gru(hidden_size: int, kernel_size, *, reset_after: bool = True, bias: bool = True,
             input_init: InitSpec = "xavier", recurrent_init: InitSpec = "xavier", bias_init: InitSpec = "zeros",
             param_dtype=jnp.float32, dtype=None) -> Cell:
    """Convolutional GRU (Ballas et al., 2016), gate order r, z, n as :func:`~rnnjax.cells.gru`::

        r = σ(conv(x, W_ir) + conv(h, W_hr));   z = σ(conv(x, W_iz) + conv(h, W_hz))
        n = tanh(conv(x, W_in) + r * conv(h, W_hn))        reset_after=True (one recurrent convolution)
        n = tanh(conv(x, W_in) + conv(r * h, W_hn))        reset_after=False (Ballas's form: two)
        h' = (1 - z) n + z h

    (biases as in the dense GRU). Shapes, ``kernel_size``, initialisers and ``dtype`` as for
    :func:`conv_lstm`; the carry is ``h [*B, *spatial, H]``. With ``kernel_size`` 1 it is the dense
    :func:`~rnnjax.cells.gru` at every position.
    """

    def step(params: ConvParams, h: Array, px: Array, dtype):
        x_r, x_z, x_n = jnp.split(px, 3, axis=-1)
        H = h.shape[-1]
        if reset_after:
            h_r, h_z, h_n = jnp.split(conv(h, params.w_hh, params.b_hh, dtype), 3, axis=-1)
            r, z = jax.nn.sigmoid(x_r + h_r), jax.nn.sigmoid(x_z + h_z)
            n = jnp.tanh(x_n + r * h_n)
        else:
            b_rz, b_n = (None, None) if params.b_hh is None else (params.b_hh[:2 * H], params.b_hh[2 * H:])
            h_r, h_z = jnp.split(conv(h, params.w_hh[..., :2 * H], b_rz, dtype), 2, axis=-1)
            r, z = jax.nn.sigmoid(x_r + h_r), jax.nn.sigmoid(x_z + h_z)
            n = jnp.tanh(x_n + conv(r * h, params.w_hh[..., 2 * H:], b_n, dtype))
        h = (1.0 - z) * n + z * h
        return h, h

    return _conv_cell("rnnjax.cells.conv_gru", "conv_gru", hidden_size, kernel_size, 3, bias=bias, forget_bias=0.0,
                      input_init=input_init, recurrent_init=recurrent_init, bias_init=bias_init,
                      param_dtype=param_dtype, dtype=dtype, carry=lambda zeros: zeros, step=step)
