"""Combinators over cells: sequence layers (``rnn``, ``bidirectional``, ``stack``, ``residual_block``,
``mamba_block``)
and pointwise modules (``dense``, ``embedding``, ``layer_norm``).

A :class:`Layer` maps whole sequences to sequences with the driver's
semantics (lengths, mask, resets, time_major); a :class:`Module` maps each
position on its own. A 2-layer bidirectional LSTM with dropout over a padded
batch::

    model = layers.stack([layers.bidirectional(cells.lstm(128))] * 2, dropout=0.3)
    params = model.init(key, input_size=F)
    carry, ys = model.apply(params, xs, lengths=lengths, key=dropout_key)   # training
    carry, ys = model.apply(params, xs, lengths=lengths)                   # evaluation

Dropout is on exactly when a PRNG ``key`` is passed.

Mixed precision follows the cells' policy (:mod:`rnnjax.cells.base`):
``rnn`` and ``bidirectional`` compute as their cells do (build the cells
with ``dtype=jnp.bfloat16``); the layers that own parameters take
``param_dtype`` (storage) and ``dtype`` (compute: matmuls on ``dtype``
operands accumulated in float32, normalisation statistics in float32,
outputs in ``dtype``; None computes in the parameters' dtype).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rnnjax import _checks, scan
from rnnjax._tree import where_batch
from rnnjax.cells.base import Cell, affine, carry_dtype, cast_output, check_size, compute_dtype, initializer, matmul
from rnnjax.cells.base import layer_norm as _layer_norm
from rnnjax.types import Array, InitSpec


class Layer(NamedTuple):
    """A sequence layer.

    Attributes:
      init: ``(key, input_size) -> params``.
      apply: ``(params, xs, *, carry=None, lengths=None, mask=None,
        resets=None, key=None, time_major=False) -> (carry, ys)``.
      initial_carry: ``(params, batch_shape=()) -> carry``.
      step: ``(params, carry, x[*B, F], *, reset=None) -> (carry, y)``:
        one step of streaming inference (no dropout).
      output_size: features of ``ys``.
      name: a short name for messages.
    """

    init: Callable[..., Any]
    apply: Callable[..., tuple[Any, Any]]
    initial_carry: Callable[..., Any]
    step: Callable[..., tuple[Any, Any]]
    output_size: int
    name: str


class Module(NamedTuple):
    """A pointwise module: ``init(key, input_size) -> params``, ``apply(params, x) -> y``."""

    init: Callable[..., Any]
    apply: Callable[..., Any]
    output_size: int


def rnn(cell: Cell, *, reverse: bool = False, unroll: int = 1, remat: scan.Remat = None,
        hoist: scan.Hoist = "auto", backward: scan.Backward = "auto", parallel: scan.Parallel = "auto",
        backend: str = "auto") -> Layer:
    """A cell as a sequence layer: ``apply`` is :func:`rnnjax.unroll` (with these options)."""

    def apply(params, xs, *, carry=None, lengths=None, mask=None, resets=None, key=None, time_major=False):
        del key
        return scan.unroll(cell, params, xs, carry=carry, lengths=lengths, mask=mask, resets=resets,
                           reverse=reverse, time_major=time_major, unroll=unroll, remat=remat, hoist=hoist,
                           backward=backward, parallel=parallel, backend=backend)

    def step(params, carry, x, *, reset=None):
        if reverse:
            raise ValueError("rnnjax.layers.rnn: a reverse layer reads the sequence from its end and cannot be "
                             "stepped forward in time. Fix: stream with reverse=False, or call apply on the "
                             "whole sequence.")
        return scan.step(cell, params, carry, x, reset=reset)

    return Layer(cell.init, apply, cell.initial_carry, step, cell.output_size, cell.name)


class BidirectionalParams(NamedTuple):
    forward: Any
    backward: Any


MERGES = ("concat", "sum", "mean", "none")


def bidirectional(forward: Cell, reverse: Cell | None = None, *, merge: str = "concat", unroll: int = 1,
                  remat: scan.Remat = None, hoist: scan.Hoist = "auto", backward: scan.Backward = "auto",
                  parallel: scan.Parallel = "auto", backend: str = "auto") -> Layer:
    """Runs ``forward`` left to right and ``reverse`` (default: the same cell
    type, own parameters) right to left within each sequence's length.
    ``unroll``, ``remat``, ``hoist``, ``backward``, ``parallel`` and ``backend`` are passed to
    :func:`rnnjax.unroll` for both directions.

    ``merge``: ``"concat"`` (features ``O_f + O_b``), ``"sum"``, ``"mean"``,
    or ``"none"`` to return the pair ``(ys_forward, ys_backward)``. The
    carry is ``(forward_carry, backward_carry)``; the backward one is the
    state after reading each sequence's first step, as in PyTorch's ``h_n``.
    """
    fn = "rnnjax.layers.bidirectional"
    reverse_cell = forward if reverse is None else reverse
    if merge not in MERGES:
        raise ValueError(f"{fn}: unknown merge {merge!r}; expected one of {MERGES}. Fix: pass one of those.")
    if merge in ("sum", "mean") and forward.output_size != reverse_cell.output_size:
        raise ValueError(f"{fn}: merge={merge!r} needs equal output sizes, got forward {forward.output_size} "
                         f"and reverse {reverse_cell.output_size}. Fix: use merge='concat'.")
    size = forward.output_size + reverse_cell.output_size if merge == "concat" else forward.output_size

    def init(key, input_size: int) -> BidirectionalParams:
        k_f, k_b = jax.random.split(key)
        return BidirectionalParams(forward.init(k_f, input_size), reverse_cell.init(k_b, input_size))

    def initial_carry(params: BidirectionalParams, batch_shape=()):
        return (forward.initial_carry(params.forward, batch_shape),
                reverse_cell.initial_carry(params.backward, batch_shape))

    def apply(params, xs, *, carry=None, lengths=None, mask=None, resets=None, key=None, time_major=False):
        del key
        if resets is not None:
            raise ValueError(f"{fn}: resets are not defined for a bidirectional layer (the backward pass would "
                             "cross the boundary from the other side). Fix: split the sequences and pass lengths.")
        if carry is not None and not (isinstance(carry, (tuple, list)) and len(carry) == 2):
            raise ValueError(f"{fn}: expected carry, a pair (forward_carry, backward_carry) or None, got "
                             f"{_checks.tree_shapes(carry)}. Fix: build it with layer.initial_carry(params, "
                             "batch_shape).")
        c_f, c_b = (None, None) if carry is None else carry
        opts = dict(lengths=lengths, mask=mask, time_major=time_major, unroll=unroll, remat=remat, hoist=hoist,
                    backward=backward, parallel=parallel, backend=backend)
        c_f, y_f = scan.unroll(forward, params.forward, xs, carry=c_f, **opts)
        c_b, y_b = scan.unroll(reverse_cell, params.backward, xs, carry=c_b, reverse=True, **opts)
        if merge == "concat":
            ys = jnp.concatenate([y_f, y_b], axis=-1)
        elif merge == "sum":
            ys = y_f + y_b
        elif merge == "mean":
            ys = (y_f + y_b) / 2
        else:
            ys = (y_f, y_b)
        return (c_f, c_b), ys

    def step(params, carry, x, *, reset=None):
        raise ValueError(f"{fn}: a bidirectional layer needs the whole sequence and cannot be stepped one "
                         "step at a time. Fix: call apply on the whole sequence, or stream a unidirectional stack.")

    return Layer(init, apply, initial_carry, step, size, f"bi{forward.name}")


class StackParams(NamedTuple):
    layers: tuple  # per-layer params
    norms: tuple | None  # per-layer (gain, shift) when layer_norm=True


def stack(layers: Sequence[Cell | Layer], *, dropout: float = 0.0, variational: bool = False,
          residual: bool = False, layer_norm: bool = False, eps: float = 1e-5, dtype=None) -> Layer:
    """A deep RNN: each layer reads the previous layer's outputs.

    Args:
      layers: cells (wrapped with :func:`rnn`) or layers; sizes may differ.
      dropout: rate applied to the input of every layer but the first (as
        ``torch.nn.LSTM(dropout=...)``), only when ``apply`` gets a ``key``.
      variational: one dropout mask per sequence, shared by all its steps
        (Gal & Ghahramani 2016; "locked" dropout) instead of one per step.
      residual: add each layer's input to its output (all layers but the
        first); needs equal input and output sizes.
      layer_norm: layer-normalise each layer's output (learned gain and shift).
      dtype: the dtype of the outputs between layers (after the residual sum
        and the layer norm, whose statistics are float32), for stacks of
        cells built with the same ``dtype``; None keeps what the sum or norm
        gives.

    The carry is a tuple with one carry per layer. Outputs are zero past
    each sequence's length.
    """
    fn = "rnnjax.layers.stack"
    dtype = compute_dtype(fn, dtype)
    layers = tuple(rnn(layer) if isinstance(layer, Cell) else layer for layer in layers)
    if not layers:
        raise ValueError(f"{fn}: expected at least one layer, got none. Fix: pass a list of cells or layers.")
    _checks.require_rate(fn, "dropout", dropout)
    if residual:
        for i in range(1, len(layers)):
            if layers[i].output_size != layers[i - 1].output_size:
                raise ValueError(
                    f"{fn}: residual=True adds each layer's input to its output, so layer {i} must output "
                    f"{layers[i - 1].output_size} features (its input size), got {layers[i].output_size}. "
                    "Fix: give the layers equal sizes or pass residual=False.")

    def init(key, input_size: int) -> StackParams:
        keys = jax.random.split(key, len(layers))
        params, size = [], input_size
        for layer, k in zip(layers, keys):
            params.append(layer.init(k, size))
            size = layer.output_size
        norms = None
        if layer_norm:
            norms = tuple((jnp.ones(layer.output_size), jnp.zeros(layer.output_size)) for layer in layers)
        return StackParams(tuple(params), norms)

    def initial_carry(params: StackParams, batch_shape=()):
        return tuple(layer.initial_carry(p, batch_shape) for layer, p in zip(layers, params.layers))

    def between(i, params, h, inp):
        if residual and i > 0:
            h = h + inp
        if params.norms is not None:
            h = _layer_norm(h, *params.norms[i], eps)
        return cast_output(h, dtype)

    def apply(params, xs, *, carry=None, lengths=None, mask=None, resets=None, key=None, time_major=False):
        xs = _checks.as_float_array(fn, "xs", xs, "[*batch, T, F]")
        if carry is not None and not (isinstance(carry, (tuple, list)) and len(carry) == len(layers)):
            raise ValueError(f"{fn}: expected carry, a tuple of {len(layers)} carries (one per layer) or None, got "
                             f"{_checks.tree_shapes(carry)}. Fix: build it with layer.initial_carry(params, "
                             "batch_shape).")
        carries = (None,) * len(layers) if carry is None else carry
        valid = None
        if (residual or layer_norm) and (lengths is not None or mask is not None):
            t_axis = 0 if time_major else xs.ndim - 2
            T, batch_shape = xs.shape[t_axis], tuple(s for a, s in enumerate(xs.shape[:-1]) if a != t_axis)
            valid = scan.valid_steps(fn, batch_shape, T, lengths=lengths, mask=mask, time_major=time_major)
            valid = valid if time_major else jnp.moveaxis(valid, 0, -1)
        out_carries, h = [], xs
        for i, layer in enumerate(layers):
            inp = h
            if i > 0 and dropout > 0.0 and key is not None:
                h = _dropout(jax.random.fold_in(key, i), h, dropout, variational, time_major)
            c, h = layer.apply(params.layers[i], h, carry=carries[i], lengths=lengths, mask=mask, resets=resets,
                               time_major=time_major)
            h = between(i, params, h, inp)
            if valid is not None:
                h = jnp.where(valid[..., None], h, 0)
            out_carries.append(c)
        return tuple(out_carries), h

    def step(params, carry, x, *, reset=None):
        out_carries, h = [], x
        for i, layer in enumerate(layers):
            inp = h
            c, h = layer.step(params.layers[i], carry[i], h, reset=reset)
            h = between(i, params, h, inp)
            out_carries.append(c)
        return tuple(out_carries), h

    return Layer(init, apply, initial_carry, step, layers[-1].output_size, "stack")


class BlockParams(NamedTuple):
    norm_rnn: Array  # [D]: RMS-norm gain before the recurrence
    cell: Any
    norm_mlp: Array  # [D]: RMS-norm gain before the MLP
    w_gate: Array  # [D, M]
    w_up: Array  # [D, M]
    w_down: Array  # [M, D]


def rms_norm(x: Array, gain: Array, eps: float = 1e-6) -> Array:
    """``x / rms(x) * gain`` over the last axis, statistics in float32."""
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return (x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + eps)).astype(x.dtype) * gain


def residual_block(cell: Cell, *, mlp_expansion: int = 3, reverse: bool = False, remat: scan.Remat = None,
                   parallel: scan.Parallel = "auto", eps: float = 1e-6, param_dtype=jnp.float32,
                   dtype=None) -> Layer:
    """The residual block of LRU, Griffin and minGRU stacks (pre-norm)::

        h = x + cell(rms_norm(x))                        # the recurrence, via rnnjax.unroll
        y = h + W_down(gelu(rms_norm(h) W_gate) * (rms_norm(h) W_up))   # gated MLP (GeGLU), width M = expansion * D

    ``D`` is the cell's output size and must equal the block's input size.
    Same semantics as :func:`rnn` (lengths, mask, resets, ``time_major``;
    outputs zero at invalid steps); ``step`` streams one step. Matrices start
    as ``torch.nn.Linear``'s U(±1/√fan_in), the RMS-norm gains at one.
    ``dtype``: the compute dtype of the MLP and of the block's output (the
    module docstring); build ``cell`` with the same ``dtype``.
    """
    fn = "rnnjax.layers.residual_block"
    dtype = compute_dtype(fn, dtype)
    D = cell.output_size
    M = check_size(fn, "mlp_expansion", mlp_expansion, example=4) * D

    def init(key, input_size: int) -> BlockParams:
        if input_size != D:
            raise ValueError(f"{fn}: the block adds its input to the output of cell {cell.name!r}, so input_size "
                             f"must equal the cell's output size {D}, got {input_size}. Fix: build the cell with "
                             f"hidden_size={input_size}, or project the inputs to {D} features first.")
        k_c, k_g, k_u, k_d = jax.random.split(key, 4)
        dense_init = initializer(fn, "uniform", D)
        return BlockParams(jnp.ones(D, param_dtype), cell.init(k_c, D), jnp.ones(D, param_dtype),
                           dense_init(k_g, (D, M), param_dtype), dense_init(k_u, (D, M), param_dtype),
                           initializer(fn, "uniform", M)(k_d, (M, D), param_dtype))

    def mlp(params: BlockParams, h: Array) -> Array:
        u = rms_norm(h, params.norm_mlp, eps)
        gated = jax.nn.gelu(matmul(u, params.w_gate, dtype)) * matmul(u, params.w_up, dtype)
        return cast_output(h + matmul(gated, params.w_down, dtype), dtype)

    def apply(params: BlockParams, xs, *, carry=None, lengths=None, mask=None, resets=None, key=None,
              time_major=False):
        del key
        xs = _checks.as_float_array(fn, "xs", xs, "[*batch, T, D]")
        _checks.require_features(fn, "xs", xs, D)
        carry, ys = scan.unroll(cell, params.cell, rms_norm(xs, params.norm_rnn, eps), carry=carry, lengths=lengths,
                                mask=mask, resets=resets, reverse=reverse, time_major=time_major, remat=remat,
                                parallel=parallel)
        ys = mlp(params, xs + ys)
        if lengths is not None or mask is not None:
            t_axis = 0 if time_major else xs.ndim - 2
            T, batch_shape = xs.shape[t_axis], tuple(s for a, s in enumerate(xs.shape[:-1]) if a != t_axis)
            valid = scan.valid_steps(fn, batch_shape, T, lengths=lengths, mask=mask, time_major=time_major)
            ys = jnp.where((valid if time_major else jnp.moveaxis(valid, 0, -1))[..., None], ys, 0)
        return carry, ys

    def step(params: BlockParams, carry, x, *, reset=None):
        if reverse:
            raise ValueError(f"{fn}: a reverse block reads the sequence from its end and cannot be stepped forward "
                             "in time. Fix: stream with reverse=False, or call apply on the whole sequence.")
        x = _checks.as_float_array(fn, "x", x, "[*batch, D]")
        _checks.require_features(fn, "x", x, D)
        carry, y = scan.step(cell, params.cell, carry, rms_norm(x, params.norm_rnn, eps), reset=reset)
        return carry, mlp(params, x + y)

    def initial_carry(params: BlockParams, batch_shape=()):
        return cell.initial_carry(params.cell, batch_shape)

    return Layer(init, apply, initial_carry, step, D, f"block-{cell.name}")


class MambaBlockParams(NamedTuple):
    norm: Array  # [D]: RMS-norm gain
    w_in: Array  # [D, 2E]: the SSM's channels u, then the gate z
    conv_w: Array  # [K, E]: the causal depthwise convolution, oldest tap first
    conv_b: Array  # [E]
    cell: Any
    w_out: Array  # [E, D]


def _causal_conv(u: Array, state: Array, w: Array, valid, resets):
    """Causal depthwise convolution ``out_t = sum_j w[K-1-j] u_(t-j)`` of time-major ``u [T, *B, E]``
    continuing from ``state [*B, K-1, E]`` (the last inputs read, oldest first), with the driver's semantics
    as the step form has them: a step whose ``valid`` is False is skipped (it neither reads nor enters the
    window), and a reset empties the window. Returns ``(out [T, *B, E], the state after the last step)``.

    The valid steps are gathered to the front (a stable sort), convolved there with taps that reach
    back no further than the last reset, and scattered back.
    """
    T, K = u.shape[0], w.shape[0]
    valid = jnp.ones(u.shape[:-1], bool) if valid is None else valid
    resets = jnp.zeros(u.shape[:-1], bool) if resets is None else resets
    order = jnp.argsort(jnp.logical_not(valid).astype(jnp.int8), axis=0, stable=True)
    n = jnp.sum(valid, 0)
    seen = jnp.take_along_axis(jnp.cumsum(resets, 0), order, 0)  # resets up to each gathered step
    fresh = seen > jnp.concatenate([jnp.zeros_like(seen[:1]), seen[:-1]])  # a reset since the previous valid step
    index = jnp.arange(T).reshape((T,) + (1,) * (u.ndim - 2))
    since = index - jax.lax.cummax(jnp.where(fresh, index, -(T + K)), axis=0)  # >= T: no reset yet
    ext = jnp.concatenate([jnp.moveaxis(state, -2, 0), jnp.take_along_axis(u, order[..., None], 0)])
    out = sum(jnp.where((j <= since)[..., None], ext[K - 1 - j:K - 1 - j + T], 0) * w[K - 1 - j] for j in range(K))
    out = jnp.take_along_axis(out, jnp.maximum(jnp.cumsum(valid, 0) - 1, 0)[..., None], 0)
    last = jnp.maximum(n - 1, 0)[None]
    since_end = jnp.where(n > 0, jnp.take_along_axis(since, last, 0)[0], T + K)
    later_reset = jnp.cumsum(resets, 0)[-1] > jnp.where(n > 0, jnp.take_along_axis(seen, last, 0)[0], 0)
    since_end = jnp.where(later_reset, -1, since_end)
    tail = n[None] + jnp.arange(K - 1).reshape((K - 1,) + (1,) * (u.ndim - 2))
    keep = (K - 2 - jnp.arange(K - 1)).reshape(tail.shape[:1] + (1,) * (u.ndim - 2)) <= since_end[None]
    new_state = jnp.where(keep[..., None], jnp.take_along_axis(ext, tail[..., None], 0), 0)
    return out, jnp.moveaxis(new_state, 0, -2)


def mamba_block(cell: Cell, *, features: int, conv_kernel: int = 4, remat: scan.Remat = None,
                parallel: scan.Parallel = "auto", eps: float = 1e-6, param_dtype=jnp.float32, dtype=None) -> Layer:
    """Mamba's block (Gu & Dao 2023) around ``cell``, pre-norm with a residual::

        u, z = rms_norm(x) W_in                        # [E] each: E = cell.output_size (Mamba: 2 * features)
        u = silu(causal_depthwise_conv1d(u) + b)       # kernel conv_kernel, over time, per channel
        y = x + (cell(u) * silu(z)) W_out              # cell: rnnjax.cells.mamba(E) for Mamba itself

    so a stack of blocks (:func:`stack`, or ``language_model(cell="mamba")``)
    is Mamba's language model. ``features`` ``D`` is the block's input and
    output width. The cell reads ``E`` features (build it with
    ``hidden_size=E``). Same semantics as :func:`rnn` (lengths, mask, resets,
    ``time_major``, outputs zero at invalid steps): the convolution skips
    invalid steps and restarts at resets, as the step form does. The carry
    is ``(conv_state [*B, conv_kernel - 1, E], cell_carry)``, so a carried
    state continues the convolution too, and ``step`` streams one step.
    Matrices start as ``torch.nn.Linear``'s U(±1/√fan_in), the conv as
    ``torch.nn.Conv1d``'s (U(±1/√conv_kernel)), the gain at one (no biases
    in the projections, as in Mamba). ``dtype``: the compute dtype of the
    projections and the output (build ``cell`` with the same ``dtype``).
    """
    fn = "rnnjax.layers.mamba_block"
    dtype = compute_dtype(fn, dtype)
    D = check_size(fn, "features", features)
    K = check_size(fn, "conv_kernel", conv_kernel, example=4)
    E = cell.output_size

    def init(key, input_size: int) -> MambaBlockParams:
        if input_size != D:
            raise ValueError(f"{fn}: the block adds its input to its output, so input_size must equal features={D}, "
                             f"got {input_size}. Fix: build the block with features={input_size}, or project the "
                             f"inputs to {D} features first.")
        k_in, k_w, k_b, k_c, k_out = jax.random.split(key, 5)
        conv = initializer(fn, "uniform", K)
        return MambaBlockParams(jnp.ones(D, param_dtype), initializer(fn, "uniform", D)(k_in, (D, 2 * E), param_dtype),
                                conv(k_w, (K, E), param_dtype), conv(k_b, (E,), param_dtype), cell.init(k_c, E),
                                initializer(fn, "uniform", E)(k_out, (E, D), param_dtype))

    def initial_carry(params: MambaBlockParams, batch_shape=()):
        state = jnp.zeros((*tuple(batch_shape), K - 1, E), carry_dtype(params.w_in.dtype, dtype))
        return state, cell.initial_carry(params.cell, batch_shape)

    def branches(params: MambaBlockParams, x: Array):
        return jnp.split(matmul(rms_norm(x, params.norm, eps), params.w_in, dtype), 2, axis=-1)

    def out(params: MambaBlockParams, x: Array, y: Array, z: Array) -> Array:
        return cast_output(x + matmul(y * jax.nn.silu(z), params.w_out, dtype), dtype)

    def apply(params: MambaBlockParams, xs, *, carry=None, lengths=None, mask=None, resets=None, key=None,
              time_major=False):
        del key
        xs = jnp.asarray(xs)
        xs_t = xs if time_major else jnp.moveaxis(xs, -2, 0)
        T, batch_shape = xs_t.shape[0], tuple(xs_t.shape[1:-1])
        valid = scan.valid_steps(fn, batch_shape, T, lengths=lengths, mask=mask, time_major=time_major)
        if resets is not None:
            resets = _checks.check_mask(fn, resets, batch_shape, T, time_major, name="resets")
        conv_state, cell_carry = initial_carry(params, batch_shape) if carry is None else carry
        u, z = branches(params, xs_t)
        u, conv_state = _causal_conv(u, conv_state, params.conv_w, valid, resets)
        cell_carry, y = scan.unroll(cell, params.cell, jax.nn.silu(u + params.conv_b), carry=cell_carry, mask=valid,
                                    resets=resets, time_major=True, remat=remat, parallel=parallel)
        ys = out(params, xs_t, y, z)
        if valid is not None:
            ys = jnp.where(valid[..., None], ys, 0)
        return (conv_state, cell_carry), ys if time_major else jnp.moveaxis(ys, 0, -2)

    def step(params: MambaBlockParams, carry, x, *, reset=None):
        x = jnp.asarray(x)
        conv_state, cell_carry = carry
        if reset is not None:
            conv_state = where_batch(jnp.asarray(reset), jnp.zeros_like(conv_state), conv_state)
        u, z = branches(params, x)
        window = jnp.concatenate([conv_state, u[..., None, :]], axis=-2)
        conv = jnp.sum(window * params.conv_w, axis=-2) + params.conv_b
        cell_carry, y = scan.step(cell, params.cell, cell_carry, jax.nn.silu(conv), reset=reset)
        return (window[..., 1:, :], cell_carry), out(params, x, y, z)

    return Layer(init, apply, initial_carry, step, D, f"mamba-block-{cell.name}")


def _dropout(key, x: Array, rate: float, variational: bool, time_major: bool) -> Array:
    shape = list(x.shape)
    if variational:
        shape[0 if time_major else x.ndim - 2] = 1
    keep = jax.random.bernoulli(key, 1.0 - rate, tuple(shape))
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def dropout(x: Array, rate: float, key: Array | None, *, variational: bool = False, time_major: bool = False) -> Array:
    """Inverted dropout of a sequence ``[*B, T, F]``; identity when ``key`` is None.

    ``variational=True`` draws one mask per sequence, shared over time.
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"rnnjax.layers.dropout: rate must be in [0, 1), got {rate}. Fix: pass a rate such as 0.2.")
    if key is None or rate == 0.0:
        return x
    return _dropout(key, x, rate, variational, time_major)


class DenseParams(NamedTuple):
    w: Array  # [F, O]
    b: Array | None  # [O]


def dense(features: int, *, bias: bool = True, init: InitSpec = "uniform", param_dtype=jnp.float32,
          dtype=None) -> Module:
    """``y = x W + b`` on the last axis. ``init="uniform"`` is ``torch.nn.Linear``'s U(±1/√F).

    ``dtype``: the compute dtype: ``x`` and ``W`` are cast to it, the product
    accumulates in float32, ``b`` is added in float32, and ``y`` comes back
    in ``dtype`` (None: the parameters' dtype, JAX's promotion).
    """
    fn = "rnnjax.layers.dense"
    dtype = compute_dtype(fn, dtype)
    O = check_size(fn, "features", features)

    def init_fn(key, input_size: int) -> DenseParams:
        F = check_size(fn, "input_size", input_size)
        w_init, b_init = initializer(fn, init, F), initializer(fn, "uniform", F)
        k_w, k_b = jax.random.split(key)
        return DenseParams(w_init(k_w, (F, O), param_dtype), b_init(k_b, (O,), param_dtype) if bias else None)

    def apply(params: DenseParams, x: Array) -> Array:
        x = _checks.as_float_array(fn, "x", x, "[..., F]")
        _checks.require_features(fn, "x", x, params.w.shape[0])
        return cast_output(affine(x, params.w, params.b, dtype), dtype)

    return Module(init_fn, apply, O)


def embedding(vocab_size: int, features: int, *, param_dtype=jnp.float32, dtype=None) -> Module:
    """Token ids ``[...]`` to vectors ``[..., features]`` (N(0, 1) init, as ``torch.nn.Embedding``).

    ``init`` ignores ``input_size`` (pass the vocabulary size, or anything).
    ``dtype``: the dtype of the vectors returned (None: the table's).
    """
    fn = "rnnjax.layers.embedding"
    dtype = compute_dtype(fn, dtype)
    V = check_size(fn, "vocab_size", vocab_size)
    E = check_size(fn, "features", features)

    def init_fn(key, input_size: int | None = None) -> Array:
        del input_size
        return jax.random.normal(key, (V, E), param_dtype)

    def apply(table: Array, ids: Array) -> Array:
        ids = _checks.as_int_array(fn, "ids", ids, "of token ids [...]")
        seen = _checks.concrete_range(ids)
        if seen and not 0 <= seen[0] <= seen[1] < V:
            raise ValueError(f"{fn}: token ids must be in [0, {V}), got values in [{seen[0]}, {seen[1]}]. "
                             "Fix: map tokens through the model's vocabulary.")
        return cast_output(table[ids], dtype)

    return Module(init_fn, apply, E)


def layer_norm(*, eps: float = 1e-5, param_dtype=jnp.float32, dtype=None) -> Module:
    """Layer norm over the last axis with a learned gain (1) and shift (0).

    Statistics are float32 (or wider); ``dtype`` is the output's dtype (None: what JAX's promotion gives).
    """
    fn = "rnnjax.layers.layer_norm"
    dtype = compute_dtype(fn, dtype)

    def init_fn(key, input_size: int):
        del key
        return jnp.ones(input_size, param_dtype), jnp.zeros(input_size, param_dtype)

    def apply(params, x: Array) -> Array:
        x = _checks.as_float_array(fn, "x", x, "[..., F]")
        _checks.require_features(fn, "x", x, params[0].shape[-1])
        return cast_output(_layer_norm(x, params[0], params[1], eps), dtype)

    return Module(init_fn, apply, -1)
