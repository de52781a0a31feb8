"""The cell contract: a NamedTuple of pure functions, built by a factory.

A cell is to rnnjax what a ``GradientTransformation`` is to optax::

    cell = rnnjax.cells.lstm(hidden_size=256)
    params = cell.init(key, input_size=128)          # a NamedTuple pytree
    carry = cell.initial_carry(params, batch_shape=(B,))
    px = cell.project(params, xs)                     # input projection, any leading dims
    carry, y = cell.step(params, carry, px[..., t, :])

``step`` has ``lax.scan``'s argument order, so
``lax.scan(partial(cell.step, params), carry, px)`` works as it stands.
Everything works on ``x[..., F]``: any number of leading batch dimensions,
none at all, or under ``vmap``. Static settings live in the factory's
closure, never in ``params``; params and carries hold no PRNG keys.

Mixed precision (Flax's convention)
-----------------------------------

Every cell factory takes ``param_dtype`` (how the parameters are stored,
float32 by default) and ``dtype`` (the compute dtype). ``dtype=None``, the
default, computes in the parameters' own dtype, exactly as without the
option. With ``dtype=jnp.bfloat16`` and float32 parameters the policy is:

- every matmul (the input projection in ``project``, the recurrent
  ``read(carry) @ W`` of a step, the LSTM's ``proj_size`` product, the
  Jordan readout, the LRU's readout) casts both operands to ``dtype`` and
  accumulates in float32 (``preferred_element_type``): :func:`matmul`;
- everything after a matmul stays float32: biases are added to the float32
  sums, so gate pre-activations, gate nonlinearities, the LSTM cell state
  and every carry are float32 (:func:`carry_dtype`; ``initial_carry``
  returns float32 carries, and the linear cells keep their float32 state);
- the outputs ``y`` come back in ``dtype`` (:func:`cast_output`, applied
  once by :func:`cell_from` / :func:`linear_cell`); inputs may be float32
  or ``dtype``;
- the parameters stay float32 (master weights), so the optimiser and its
  state are float32 too. The fused backward pass (:mod:`rnnjax.fused`)
  keeps the policy: ``dz @ W^T`` and the weight-gradient products take
  ``dtype`` operands with float32 accumulation, and the weight gradients
  come back in the parameters' dtype. Autodiff of the scan differentiates
  the casts as JAX does (Flax's behaviour): each product's cotangent stays
  float32, and the gradient of each cast operand is accumulated in float32,
  rounded to ``dtype`` (inside the loop: once per step) and summed into the
  float32 parameter gradient. Both agree with float32 training to ~0.3%
  (tests/test_precision.py).

Why not simply bfloat16 everywhere (``param_dtype=jnp.bfloat16`` with
bfloat16 inputs, ``dtype=None``)? Cell states and carries rounded to 8
significant bits at every step drift: over a 2,000-step LSTM sequence
(tests/test_precision.py) the error the all-bfloat16 computation adds to
its own operands is about 20x the policy's, whose float32 state only sees
the rounding of each step's matmul operands. End to end, against a float64
run of the float32 master weights, the policy's bfloat16 outputs are only
about 2.5x closer: both share the rounding of the weights, the inputs and
the outputs to bfloat16. And on CPUs XLA runs bfloat16 elementwise work and
small bfloat16 products slower than float32, so the all-bfloat16 model is
also the slower one (issue 17: 0.22-0.63x float32 on an AMX Xeon). Only
the matmul operands benefit from bfloat16; the policy keeps the rest in
float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rnnjax.types import Array, InitSpec, PRNGKey


class Recurrence(NamedTuple):
    """A cell's step split into one recurrent matmul and a pointwise rest::

        W, b = weights(params)
        step(params, carry, px) == pointwise(pointwise_params(params), carry, px, affine(read(carry), W, b, dtype))

    With this split :func:`rnnjax.unroll` differentiates a whole sequence with
    a custom VJP: the backward scan only propagates the carry's cotangent,
    and the gradients of ``W`` (and of the input projection) become single
    matmuls over all ``T x B`` rows after the loop. ``read`` must be linear
    (it picks the fed-back state out of the carry).

    ``dtype`` is the cell's compute dtype (None: the parameters' own), the
    precision policy of the recurrent matmul (:func:`matmul`); a backward
    pass or kernel that computes ``read(carry) @ W`` itself must follow it.
    """

    weights: Callable[[Any], tuple[Array, Array | None]]
    pointwise_params: Callable[[Any], Any]
    read: Callable[[Any], Array]
    pointwise: Callable[[Any, Any, Array, Array], tuple[Any, Array]]
    dtype: Any = None


def step_from(rec: Recurrence) -> Callable[[Any, Any, Array], tuple[Any, Array]]:
    """The cell's ``step`` as its :class:`Recurrence` defines it."""

    def step(params, carry, px):
        w, b = rec.weights(params)
        return rec.pointwise(rec.pointwise_params(params), carry, px, affine(rec.read(carry), w, b, rec.dtype))

    return step


class Linear(NamedTuple):
    """A cell whose state update is linear and elementwise in the carry::

        a, b = coefficients(params, px)          # [..., S] each, from the input alone (``a`` may also be
                                                 # [S] alone: the same at every step, like the LRU's lambda)
        h = a * state(carry) + b                 # elementwise; complex for the LRU
        carry', y = carry(h), output(params, h, px)

    ``coefficients`` and ``output`` work on any leading dims (all steps at
    once, or one), and compute in at least float32 whatever the input
    dtype. ``state`` and ``carry`` convert between the carry pytree and the
    state ``h`` (e.g. a real ``[..., 2N]`` carry and a complex ``[..., N]``
    state); both must be linear. With this form :func:`rnnjax.unroll` can
    run the whole sequence with ``jax.lax.associative_scan`` (depth
    ``O(log T)``): steps compose as ``(a1, b1) then (a2, b2) = (a2 a1, a2 b1 + b2)``.

    ``save_projection``: whether the backward pass of ``parallel="loop"``
    keeps each chunk's input projection ``px`` (one ``[C, *B, G]`` array
    per chunk, so the projection is not computed twice) or recomputes it
    with the rest of the chunk (``jax.checkpoint``: memory only for the
    chunk boundaries' states); each cell sets what measured faster
    (docs/performance.md, "Linear cells").

    ``stabiliser``: for a recurrence with exponential gates (xLSTM's mLSTM),
    whose state would overflow, ``(params, px) -> (log_f, log_i)`` (``[..., K]``
    each: the logs of the forget and input gates). The state is then kept
    scaled by ``exp(-m)``, with the stabiliser ``m`` part of the carry::

        m' = max(log_f + m, log_i)                 # a max-plus recurrence, also run as an associative scan
        a, b = coefficients(params, px, m, m')     # e.g. a = exp(log_f + m - m'), b = exp(log_i - m') u
        h' = a * h + b

    and ``state(carry)`` returns ``(h, m)``, ``carry((h, m))`` builds the
    carry, ``output(params, (h, m), px)`` reads both. The cell's outputs must
    not depend on ``m`` (the scale cancels), so only rounding differs where the
    parallel forms' stabilisers differ from the step's in the last bits.

    ``chunkwise``: for a stabilised form whose state is a sum of per-step
    outer products (the mLSTM's matrix memory), ``(params, px [C, *B, G],
    (h, m), ms [C, *B, K], valid, resets) -> ((h, m), ys [C, *B, O])``: a
    chunk of ``C`` steps in order, the state formed only at its end (each
    output reads the chunk's steps through a ``[C, C]`` matrix per head, as
    attention does). ``ms`` are the step form's stabilisers;
    ``valid``/``resets`` ``[C, *B]`` or None. ``parallel="chunkwise"`` runs
    it (:mod:`rnnjax.linear_scan`).
    """

    coefficients: Callable[..., tuple[Array, Array]]
    state: Callable[[Any], Any]
    carry: Callable[[Any], Any]
    output: Callable[[Any, Any, Array], Array]
    save_projection: bool = True
    stabiliser: Callable[[Any, Array], tuple[Array, Array]] | None = None
    chunkwise: Callable[..., tuple[Any, Array]] | None = None


def step_from_linear(lin: Linear) -> Callable[[Any, Any, Array], tuple[Any, Array]]:
    """The cell's ``step`` as its :class:`Linear` form defines it."""

    def step(params, carry, px):
        if lin.stabiliser is None:
            a, b = lin.coefficients(params, px)
            h = a * lin.state(carry) + b
            return lin.carry(h), lin.output(params, h, px)
        h, m = lin.state(carry)
        log_f, log_i = lin.stabiliser(params, px)
        m_new = jnp.maximum(log_f + m, log_i)
        a, b = lin.coefficients(params, px, m, m_new)
        h = a * h + b
        return lin.carry((h, m_new)), lin.output(params, (h, m_new), px)

    return step


class Native(NamedTuple):
    """How the native CPU kernels (:mod:`rnnjax.native`) run a classic cell: one call per sequence.

    ``kind`` names the kernel (``"lstm"``, ``"gru"``, ``"gru_cho"``,
    ``"elman_tanh"``, ``"elman_relu"``); ``weights(params)`` returns
    ``(w_ih [F, G], w_hh [H, G], b_ih [G] | None, b_hh [G] | None)`` in
    PyTorch's gate order; ``split(carry) -> (h, c | None)`` and
    ``join(h, c) -> carry`` convert the carry. A factory sets it only for the
    settings the kernels cover (no peepholes, projections or layer norm).
    ``heads > 1``: ``w_hh`` is block-diagonal, stored ``[heads, H/heads, G/heads]``.
    """

    kind: str
    weights: Callable[[Any], tuple[Array, Array, Array | None, Array | None]]
    split: Callable[[Any], tuple[Array, Array | None]]
    join: Callable[[Array, Array | None], Any]
    heads: int = 1


def hidden_only(kind: str, heads: int = 1) -> Native:
    """The :class:`Native` spec of a cell whose params are :class:`Weights` and whose carry is ``h`` alone."""
    return Native(kind, lambda p: (p.w_ih, p.w_hh, p.b_ih, p.b_hh), lambda h: (h, None), lambda h, c: h, heads)


class Cell(NamedTuple):
    """A recurrent cell: pure functions over a params pytree.

    Attributes:
      init: ``(key, input_size) -> params``.
      initial_carry: ``(params, batch_shape=()) -> carry`` (zeros).
      project: ``(params, xs[..., F]) -> px[..., G]``, the part of the step
        that depends on the input only; the driver may run it on all steps
        at once (one big matmul) or inside the time loop.
      step: ``(params, carry, px[..., G]) -> (carry, y[..., O])``.
      input_size: ``params -> F``, read from the parameter shapes.
      output_size: ``O``, the width of ``y``.
      name: a short name used in messages and benchmarks.
      recurrence: the :class:`Recurrence` split of ``step`` that enables the
        fused backward pass, or None (autodiff of the scan is used).
      linear: the :class:`Linear` form of a cell whose recurrence is linear in
        the carry (LRU, minGRU, minLSTM, RG-LRU), which lets the driver run
        ``jax.lax.associative_scan``; None for the classic cells.
      native: the :class:`Native` spec that lets the driver run the whole
        sequence in one call of a native CPU kernel, or None.
      spatial_dims: ``S``, the number of spatial axes between the time axis
        and the features (convolutional cells: inputs ``[*B, T, *spatial, F]``,
        carries ``[*B, *spatial, H]``, built with ``initial_carry(params,
        (*B, *spatial))``); 0 for every other cell.
    """

    init: Callable[[PRNGKey, int], Any]
    initial_carry: Callable[..., Any]
    project: Callable[[Any, Array], Array]
    step: Callable[[Any, Any, Array], tuple[Any, Array]]
    input_size: Callable[[Any], int]
    output_size: int
    name: str
    recurrence: Recurrence | None = None
    linear: Linear | None = None
    native: Native | None = None
    spatial_dims: int = 0


def cell_from(recurrence: Recurrence, init, initial_carry, project, input_size, output_size: int, name: str,
              native: Native | None = None, *, dtype=None) -> Cell:
    """A :class:`Cell` whose ``step`` is defined by ``recurrence``, computing in ``dtype``.

    ``dtype`` (None or a floating dtype, see :func:`compute_dtype`) becomes
    ``recurrence.dtype``, and ``pointwise``'s output ``y`` is cast to it
    (the carry is not); ``project`` and the pointwise part's own matmuls
    follow :func:`matmul` with the same ``dtype`` in the cell's code. ``native``: the
    :class:`Native` spec of the native kernels, for the settings they cover.
    """
    if dtype is not None:
        pointwise = recurrence.pointwise

        def cast_pointwise(pw, carry, px, hz):
            carry, y = pointwise(pw, carry, px, hz)
            return carry, cast_output(y, dtype)

        recurrence = recurrence._replace(pointwise=cast_pointwise, dtype=dtype)
    return Cell(init, initial_carry, project, step_from(recurrence), input_size, output_size, name, recurrence,
                None, native)


def linear_cell(linear: Linear, init, initial_carry, project, input_size, output_size: int, name: str, *,
                dtype=None) -> Cell:
    """A :class:`Cell` whose ``step`` is defined by its :class:`Linear` form; ``output`` is cast to ``dtype``."""
    if dtype is not None:
        output = linear.output
        linear = linear._replace(output=lambda params, h, px: cast_output(output(params, h, px), dtype))
    return Cell(init, initial_carry, project, step_from_linear(linear), input_size, output_size, name, None, linear)


# The precision policy (module docstring): the only place where compute dtypes are chosen.

def compute_dtype(fn: str, dtype):
    """Validates a cell's or layer's ``dtype`` argument: None (compute in the parameters' dtype) or a floating dtype."""
    if dtype is None:
        return None
    try:
        resolved = jnp.dtype(dtype)
    except TypeError:
        resolved = None
    if resolved is None or not jnp.issubdtype(resolved, jnp.floating):
        raise ValueError(f"{fn}: expected dtype to be None or a floating dtype such as jnp.bfloat16, got {dtype!r}. "
                         "Fix: pass dtype=jnp.bfloat16 for bfloat16 matmuls with float32 state, or None.")
    return resolved


def accumulation_dtype(dtype):
    """The dtype matmuls accumulate in, and state is kept in, when computing in ``dtype``: float32 or wider."""
    return jnp.promote_types(dtype, jnp.float32)


def matmul(x: Array, w: Array, dtype=None) -> Array:
    """``x @ w`` under the policy: with ``dtype`` set both operands are cast
    to it and the product accumulates in (and returns) float32 or wider;
    with None it is ``x @ w`` in JAX's usual promotion."""
    if dtype is None:
        return x @ w
    return jnp.matmul(x.astype(dtype), w.astype(dtype), preferred_element_type=accumulation_dtype(dtype))


def carry_dtype(param_dtype, dtype=None):
    """The dtype of a classic cell's carry: the parameters' with ``dtype=None``, else float32 or wider."""
    return jnp.dtype(param_dtype) if dtype is None else accumulation_dtype(dtype)


def cast_output(y: Array, dtype=None) -> Array:
    """A cell's or layer's output in its compute ``dtype`` (unchanged for None)."""
    return y if dtype is None else y.astype(dtype)


def state_dtype(dtype):
    """The dtype a linear recurrence accumulates in: float32 at least (bfloat16 inputs accumulate in float32)."""
    return jnp.promote_types(dtype, jnp.float32)


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "tanh": jnp.tanh,
    "relu": jax.nn.relu,
    "sigmoid": jax.nn.sigmoid,
    "identity": lambda x: x,
}


def get_activation(fn: str, name: str) -> Callable[[Array], Array]:
    if name not in ACTIVATIONS:
        raise ValueError(
            f"{fn}: unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}. "
            "Fix: pass one of those names."
        )
    return ACTIVATIONS[name]


def check_size(fn: str, name: str, value: int, minimum: int = 1, example: int | None = None) -> int:
    """``value`` if it is an integer >= ``minimum``; else a ValueError whose fix suggests ``{name}={example}``
    (default: 64 times the minimum, a width)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{fn}: expected {name} to be an integer >= {minimum}, got {value!r}. "
                         f"Fix: pass a whole number such as {name}={example or max(minimum, 1) * 64}.")
    return value


# Initialisers. Each takes (key, shape, dtype); ``hidden_size`` fixes the
# PyTorch-style bound 1/sqrt(H) that nn.RNN/LSTM/GRU use for every tensor.

def _torch_uniform(hidden_size: int):
    bound = 1.0 / math.sqrt(hidden_size)

    def init(key, shape, dtype):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


_NAMED = {
    "xavier": jax.nn.initializers.glorot_uniform,
    "he": jax.nn.initializers.he_uniform,
    "orthogonal": jax.nn.initializers.orthogonal,
    "zeros": lambda: jax.nn.initializers.zeros,
}


def initializer(fn: str, spec: InitSpec, hidden_size: int):
    """Resolves ``"uniform"`` (PyTorch's U(±1/√H)), ``"xavier"``, ``"he"``,
    ``"orthogonal"``, ``"zeros"`` or a ``(key, shape, dtype)`` callable."""
    if callable(spec):
        return spec
    if spec == "uniform":
        return _torch_uniform(hidden_size)
    if spec in _NAMED:
        return _NAMED[spec]()
    raise ValueError(
        f"{fn}: unknown initialiser {spec!r}; expected 'uniform', 'xavier', 'he', "
        "'orthogonal', 'zeros' or a callable (key, shape, dtype) -> array. Fix: pass one of those."
    )


def gate_blocks(init, key: PRNGKey, rows: int, hidden: int, gates: int, dtype, kernel: tuple[int, ...] = ()) -> Array:
    """A ``[rows, gates * hidden]`` matrix initialised one ``[rows, hidden]``
    gate block at a time, so fan-based and orthogonal initialisers see the
    shape of one gate (as in Keras and cuDNN). With ``kernel`` (a
    convolution's window) the blocks are ``[*kernel, rows, hidden]``."""
    keys = jax.random.split(key, gates)
    return jnp.concatenate([init(k, (*kernel, rows, hidden), dtype) for k in keys], axis=-1)


def affine(x: Array, w: Array, b: Array | None, dtype=None) -> Array:
    """``x @ w + b`` with the product under the policy of :func:`matmul` (the bias added to its float32 sum).

    A 3-D ``w [n, K/n, N/n]`` is a block-diagonal matrix of ``n`` heads (:func:`heads_matmul`)."""
    y = heads_matmul(x, w, dtype) if w.ndim == 3 else matmul(x, w, dtype)
    return y if b is None else y + b


# Multi-head recurrences (FlashRNN's block-diagonal recurrent matrices). A cell built with ``heads=n``
# stores its recurrent weight as ``[n, H/n, G/n]``: head ``k`` maps units ``k*H/n:(k+1)*H/n`` of ``h`` to
# the same slice of each gate's block of ``z [..., G]`` (gates stay gate-major, as in the dense cell), so
# it equals a dense ``[H, G]`` matrix whose off-diagonal blocks are zero, at ``1/n`` of its products.

def check_heads(fn: str, heads: int, hidden_size: int) -> int:
    """Validates ``heads``: an integer >= 1 that divides ``hidden_size``."""
    n = check_size(fn, "heads", heads, example=1)
    if hidden_size % n:
        raise ValueError(f"{fn}: heads={n} must divide hidden_size={hidden_size} (each head has hidden_size / heads "
                         f"units). Fix: pass heads=1 or a divisor of {hidden_size}, or a hidden_size that is a "
                         f"multiple of {n}.")
    return n


def to_heads(z: Array, heads: int, gates: int) -> Array:
    """Gate-major ``z [..., gates*H]`` as head-major ``[..., heads, gates*H/heads]``."""
    d = z.shape[-1] // (gates * heads)
    blocks = z.reshape(*z.shape[:-1], gates, heads, d)
    return jnp.swapaxes(blocks, -3, -2).reshape(*z.shape[:-1], heads, gates * d)


def from_heads(z: Array, gates: int) -> Array:
    """Head-major ``z [..., heads, gates*d]`` as gate-major ``[..., gates*heads*d]`` (:func:`to_heads` undone)."""
    *lead, heads, width = z.shape
    blocks = z.reshape(*lead, heads, gates, width // gates)
    return jnp.swapaxes(blocks, -3, -2).reshape(*lead, heads * width)


def heads_einsum(spec: str, a: Array, b: Array, dtype=None) -> Array:
    """``jnp.einsum(spec, a, b)`` under the policy of :func:`matmul`."""
    if dtype is None:
        return jnp.einsum(spec, a, b)
    return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), preferred_element_type=accumulation_dtype(dtype))


def heads_matmul(x: Array, w: Array, dtype=None) -> Array:
    """``x [..., H] @ W`` for the block-diagonal ``W`` stored as heads ``w [n, H/n, G/n]``: one batched
    product over the heads; the result is gate-major ``[..., G]``, as the dense product's."""
    n, d, e = w.shape
    return from_heads(heads_einsum("...nd,nde->...ne", x.reshape(*x.shape[:-1], n, d), w, dtype), e // d)


def zeros_carry(batch_shape, size: int, dtype) -> Array:
    return jnp.zeros((*tuple(batch_shape), size), dtype)


class Weights(NamedTuple):
    """The input and recurrent weights shared by the classic cells."""

    w_ih: Array
    w_hh: Array
    b_ih: Array | None
    b_hh: Array | None


class InitConfig(NamedTuple):
    """Initialisers chosen in a cell factory, resolved once."""

    input: Callable
    recurrent: Callable
    bias: Callable
    dtype: Any


def init_config(fn: str, hidden_size: int, input_init: InitSpec, recurrent_init: InitSpec,
                bias_init: InitSpec, param_dtype) -> InitConfig:
    return InitConfig(
        initializer(fn, input_init, hidden_size),
        initializer(fn, recurrent_init, hidden_size),
        initializer(fn, bias_init, hidden_size),
        jnp.dtype(param_dtype),
    )


def init_weights(cfg: InitConfig, key: PRNGKey, input_size: int, recurrent_rows: int,
                 hidden: int, gates: int, bias: bool, heads: int = 1) -> Weights:
    """``w_ih [F, gates*H]``, ``w_hh [rows, gates*H]`` and two biases, as PyTorch lays them out (transposed).

    With ``heads=n > 1`` (and ``rows == H``) ``w_hh`` is block-diagonal, stored as ``[n, H/n, gates*H/n]``,
    each head initialised as a dense ``[H/n, gates*H/n]`` matrix is."""
    k_ih, k_hh, k_bi, k_bh = jax.random.split(key, 4)
    width = gates * hidden
    if heads == 1:
        w_hh = gate_blocks(cfg.recurrent, k_hh, recurrent_rows, hidden, gates, cfg.dtype)
    else:
        d = hidden // heads
        w_hh = jnp.stack([gate_blocks(cfg.recurrent, k, d, d, gates, cfg.dtype) for k in jax.random.split(k_hh, heads)])
    return Weights(
        gate_blocks(cfg.input, k_ih, input_size, hidden, gates, cfg.dtype),
        w_hh,
        cfg.bias(k_bi, (width,), cfg.dtype) if bias else None,
        cfg.bias(k_bh, (width,), cfg.dtype) if bias else None,
    )


def hidden_cell_functions(fn: str, cfg: InitConfig, hidden: int, gates: int, bias: bool, dtype=None, heads: int = 1):
    """``(init, initial_carry, project)`` of a cell whose params are :class:`Weights` (``gates`` blocks of
    ``hidden`` columns, :func:`init_weights`) and whose carry is ``h [..., hidden]`` alone (Elman, GRU, MGU)."""

    def init(key, input_size: int) -> Weights:
        return init_weights(cfg, key, check_size(fn, "input_size", input_size), hidden, hidden, gates, bias, heads)

    def initial_carry(params: Weights, batch_shape=()) -> Array:
        return zeros_carry(batch_shape, hidden, carry_dtype(params.w_hh.dtype, dtype))

    def project(params: Weights, xs: Array) -> Array:
        return affine(xs, params.w_ih, params.b_ih, dtype)

    return init, initial_carry, project


def gain_shift(shape: tuple[int, ...], dtype) -> Array:
    """Stacked layer-norm parameters ``[2, *shape]``: gain (ones) and shift (zeros)."""
    return jnp.stack([jnp.ones(shape, dtype), jnp.zeros(shape, dtype)])


def layer_norm(x: Array, gain: Array | None, shift: Array | None, eps: float) -> Array:
    """Normalises the last axis (float32 statistics), then scales and shifts."""
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)
    if gain is not None:
        y = y * gain
    if shift is not None:
        y = y + shift
    return y


def gate_layer_norm(x: Array, gain: Array, shift: Array, gates: int, eps: float) -> Array:
    """Layer norm of each gate's block of ``x[..., gates*H]`` separately; ``gain``/``shift`` are ``[gates, H]``."""
    blocks = x.reshape(*x.shape[:-1], gates, x.shape[-1] // gates)
    return layer_norm(blocks, gain, shift, eps).reshape(x.shape)
