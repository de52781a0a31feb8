"""Attention over encoder outputs, and an attention decoder that is itself a cell.

Scores (``s`` a memory position, ``h`` the query)::

    "additive" (Bahdanau et al. 2015)   v . tanh(W_q h + W_k m_s + b)
    "dot"      (Luong et al. 2015)      h . m_s              (needs equal sizes)
    "general"  (Luong)                  h . (W m_s)
    "concat"   (Luong)                  v . tanh(W [h; m_s])  (one matrix on the concatenation, no bias)

The weights are a softmax of the scores over the *valid* source positions
(``mask [*B, S]``): they sum to 1 there and are exactly 0 on padding. The
memory-side half of every score (``W_k m``, ``W m``) depends only on the
source, so :meth:`Attention.prepare` computes it once per source sentence,
not once per decoder step.

:func:`attention_decoder` wraps any :class:`~rnnjax.cells.Cell` into a cell
whose carry also holds the previous attentional vector (input feeding) and
the last attention weights. The source is bound into the parameters::

    attn = attention("general")
    dec = attention_decoder(cells.lstm(256), attn, memory_size=512)
    params = dec.init(key, input_size=E)                   # trainable parameters only
    bound = bind_memory(attn, params, memory, mask)        # + memory [*B, S, M] and its mask
    carry = dec.initial_carry(bound, batch_shape=B)
    carry, ys = rnnjax.unroll(dec, bound, embedded_targets, lengths=lengths)   # teacher forcing
    carry, y_t = rnnjax.step(dec, bound, carry, embedded_token)                # one step at a time

Only JAX is imported here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rnnjax.cells.base import Cell, check_size
from rnnjax.types import Array, PRNGKey

KINDS = ("additive", "dot", "general", "concat")


class AttentionParams(NamedTuple):
    w_q: Array | None  # [Q, A] (additive; concat: the query half of W)
    w_k: Array | None  # [M, A] (additive, concat) or [M, Q] (general)
    b: Array | None  # [A] (additive)
    v: Array | None  # [A] (additive, concat)


class Attention(NamedTuple):
    """Pure functions of one attention scoring rule.

    Attributes:
      init: ``(key, query_size, memory_size) -> AttentionParams``.
      prepare: ``(params, memory[*B, S, M]) -> keys``: the memory-side part of the scores.
      apply: ``(params, keys, memory[*B, S, M], mask[*B, S], query[*B, Q]) ->
        (context[*B, M], weights[*B, S])``.
      kind: one of :data:`KINDS`.
    """

    init: Callable[..., AttentionParams]
    prepare: Callable[[AttentionParams, Array], Array]
    apply: Callable[..., tuple[Array, Array]]
    kind: str


def _uniform(key, shape, fan_in):
    bound = 1.0 / jnp.sqrt(fan_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def masked_softmax(scores: Array, mask: Array | None) -> Array:
    """Softmax over the last axis restricted to ``mask``: sums to 1 over the
    valid positions, exactly 0 elsewhere (0 everywhere for an all-False row)."""
    scores = scores.astype(jnp.float32)
    if mask is None:
        return jax.nn.softmax(scores, axis=-1)
    scores = jnp.where(mask, scores, -jnp.inf)
    top = jnp.max(scores, axis=-1, keepdims=True)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    e = jnp.where(mask, jnp.exp(scores - jax.lax.stop_gradient(top)), 0.0)
    total = jnp.sum(e, axis=-1, keepdims=True)
    return e / jnp.where(total > 0, total, 1.0)


def attention(kind: str = "general", *, size: int | None = None) -> Attention:
    """An attention rule: ``"additive"`` (Bahdanau), ``"dot"``, ``"general"`` or
    ``"concat"`` (Luong). ``size`` is the hidden width ``A`` of the additive and
    concat scores (default: the query size)."""
    fn = "rnnjax.attention.attention"
    if kind not in KINDS:
        raise ValueError(f"{fn}: unknown kind {kind!r}; expected one of {', '.join(KINDS)}. "
                         "Fix: pass kind='additive' (Bahdanau) or 'dot', 'general', 'concat' (Luong).")
    if size is not None:
        check_size(fn, "size", size)

    def init(key: PRNGKey, query_size: int, memory_size: int) -> AttentionParams:
        Q = check_size(fn, "query_size", query_size)
        M = check_size(fn, "memory_size", memory_size)
        A = size or Q
        k1, k2, k3 = jax.random.split(key, 3)
        if kind == "dot":
            if Q != M:
                raise ValueError(f"{fn}: dot attention needs the query and memory sizes to be equal, got "
                                 f"query_size={Q} and memory_size={M}. Fix: use kind='general', which learns "
                                 "a [M, Q] matrix between them.")
            return AttentionParams(None, None, None, None)
        if kind == "general":
            return AttentionParams(None, _uniform(k1, (M, Q), M), None, None)
        fan = Q + M if kind == "concat" else None
        w_q = _uniform(k1, (Q, A), fan or Q)
        w_k = _uniform(k2, (M, A), fan or M)
        b = jnp.zeros((A,), jnp.float32) if kind == "additive" else None
        return AttentionParams(w_q, w_k, b, _uniform(k3, (A,), A))

    def prepare(params: AttentionParams, memory: Array) -> Array:
        if kind == "dot":
            return memory
        if kind == "general":
            return memory @ params.w_k  # [*B, S, Q]
        keys = memory @ params.w_k
        return keys if params.b is None else keys + params.b

    def apply(params: AttentionParams, keys: Array, memory: Array, mask: Array | None, query: Array):
        if kind in ("dot", "general"):
            scores = jnp.einsum("...sq,...q->...s", keys, query)
        else:
            hidden = jnp.tanh(keys + (query @ params.w_q)[..., None, :])
            scores = hidden @ params.v
        weights = masked_softmax(scores, mask)
        context = jnp.einsum("...s,...sm->...m", weights.astype(memory.dtype), memory)
        return context, weights

    return Attention(init, prepare, apply, kind)


class DecoderParams(NamedTuple):
    """Parameters of :func:`attention_decoder`. ``memory``, ``keys`` and
    ``mask`` are None until :func:`bind_memory` fills them for one batch of
    sources (they are data, not trained: optimisers and checkpoints see the
    unbound form)."""

    cell: Any
    attention: AttentionParams
    w_out: Array  # [H + M, A]: the attentional layer tanh([h; context] W_out + b_out) (Luong's h~)
    b_out: Array  # [A]
    memory: Array | None = None  # [*B, S, M]
    keys: Array | None = None  # attention.prepare(memory)
    mask: Array | None = None  # [*B, S] booleans


class DecoderCarry(NamedTuple):
    cell: Any  # the wrapped cell's carry
    attentional: Array  # [*B, A]: the previous output, fed back with the next input (input feeding)
    weights: Array  # [*B, S]: the attention weights of the last step


STYLES = ("luong", "bahdanau")


def attention_decoder(cell: Cell, attn: Attention, *, memory_size: int, style: str = "luong",
                      input_feeding: bool = True, output_size: int | None = None) -> Cell:
    """A :class:`~rnnjax.cells.Cell` that attends to a bound memory at every step.

    ``style="luong"``: the cell reads ``[x_t; h~_{t-1}]`` (``h~_{t-1}`` only
    with ``input_feeding``), then attends with its new output ``h_t``:
    ``c_t = attend(h_t)``, ``h~_t = tanh([h_t; c_t] W + b)``.
    ``style="bahdanau"``: attends with the previous output first,
    ``c_t = attend(h_{t-1})``, and the cell reads ``[x_t; c_t]`` (plus
    ``h~_{t-1}`` with ``input_feeding``); ``h~_t = tanh([h_t; c_t] W + b)``.

    The output ``y_t`` is ``h~_t`` (``output_size`` features, default the
    cell's). The carry is a :class:`DecoderCarry`; its ``weights`` are the
    attention weights of the step just taken (for heat maps). ``project`` is
    the identity: the feedback makes every step's input depend on the last.
    """
    fn = "rnnjax.attention.attention_decoder"
    if not isinstance(cell, Cell):
        raise TypeError(f"{fn}: expected an rnnjax.cells.Cell, got {type(cell).__name__}. "
                        "Fix: pass e.g. rnnjax.cells.lstm(256).")
    if style not in STYLES:
        raise ValueError(f"{fn}: unknown style {style!r}; expected 'luong' or 'bahdanau'. Fix: pass one of those.")
    M = check_size(fn, "memory_size", memory_size)
    H = cell.output_size
    A = H if output_size is None else check_size(fn, "output_size", output_size)
    feed = A if input_feeding else 0
    extra = feed + (M if style == "bahdanau" else 0)

    def cell_input(params: DecoderParams) -> int:
        return cell.input_size(params.cell)

    def init(key: PRNGKey, input_size: int) -> DecoderParams:
        F = check_size(fn, "input_size", input_size)
        k_c, k_a, k_w = jax.random.split(key, 3)
        w_out = _uniform(k_w, (H + M, A), H + M)
        return DecoderParams(cell.init(k_c, F + extra), attn.init(k_a, H, M), w_out, jnp.zeros((A,), jnp.float32))

    def require_memory(params: DecoderParams, what: str) -> None:
        if params.memory is None:
            raise ValueError(f"{fn}.{what}: the decoder's parameters have no memory bound. "
                             "Fix: params = rnnjax.attention.bind_memory(attn, params, memory, mask) first.")
        if params.memory.shape[-1] != M:
            raise ValueError(f"{fn}.{what}: expected a memory with {M} features (memory_size), got shape "
                             f"{tuple(params.memory.shape)}. Fix: bind the outputs of the encoder the decoder "
                             "was built for.")

    def initial_carry(params: DecoderParams, batch_shape=()) -> DecoderCarry:
        require_memory(params, "initial_carry")
        batch_shape = tuple(batch_shape)
        S = params.memory.shape[-2]
        dtype = params.memory.dtype
        return DecoderCarry(cell.initial_carry(params.cell, batch_shape), jnp.zeros((*batch_shape, A), dtype),
                            jnp.zeros((*batch_shape, S), jnp.float32))

    def project(params: DecoderParams, xs: Array) -> Array:
        return xs

    def attend(params: DecoderParams, query: Array):
        return attn.apply(params.attention, params.keys, params.memory, params.mask, query)

    def output(params: DecoderParams, h: Array, context: Array) -> Array:
        return jnp.tanh(jnp.concatenate([h, context], axis=-1) @ params.w_out + params.b_out)

    def step(params: DecoderParams, carry: DecoderCarry, x: Array):
        require_memory(params, "step")
        parts = [x]
        if style == "bahdanau":
            context, weights = attend(params, _cell_output(cell, params.cell, carry.cell))
            parts.append(context)
        if input_feeding:
            parts.append(carry.attentional)
        inp = jnp.concatenate(parts, axis=-1) if len(parts) > 1 else x
        c, h = cell.step(params.cell, carry.cell, cell.project(params.cell, inp))
        if style == "luong":
            context, weights = attend(params, h)
        y = output(params, h, context)
        return DecoderCarry(c, y, weights), y

    def input_size(params: DecoderParams) -> int:
        return cell_input(params) - extra

    return Cell(init, initial_carry, project, step, input_size, A, f"attn-{attn.kind}-{style}-{cell.name}")


def _cell_output(cell: Cell, params, carry) -> Array:
    """The output a cell produced last, read from its carry (``h``; an LSTM's ``carry.h``)."""
    if isinstance(carry, jax.Array) or hasattr(carry, "shape"):
        return carry
    h = getattr(carry, "h", None)
    if h is not None:
        return h
    raise ValueError(f"rnnjax.attention.attention_decoder: style='bahdanau' attends with the cell's previous "
                     f"output, which cannot be read from a {type(carry).__name__} carry of cell {cell.name!r}. "
                     "Fix: use style='luong'.")


def bind_memory(attn: Attention, params: DecoderParams, memory: Array, mask: Array | None = None) -> DecoderParams:
    """``params`` of an :func:`attention_decoder` built with ``attn``, with a
    source bound: ``memory [*B, S, M]`` (encoder outputs) and ``mask [*B, S]``
    (valid positions; default all valid). The memory-side half of the scores
    is computed here, once per source."""
    fn = "rnnjax.attention.bind_memory"
    if not isinstance(params, DecoderParams):
        raise TypeError(f"{fn}: expected DecoderParams from an attention_decoder's init, got "
                        f"{type(params).__name__}. Fix: pass decoder.init(key, input_size).")
    memory = jnp.asarray(memory)
    if memory.ndim < 2 or memory.shape[-2] == 0:
        raise ValueError(f"{fn}: expected memory of shape [*batch, S, M] with S >= 1, got shape "
                         f"{tuple(memory.shape)}. Fix: pass the encoder's outputs for a non-empty source.")
    w_k = params.attention.w_k
    if w_k is not None and w_k.shape[0] != memory.shape[-1]:
        raise ValueError(f"{fn}: expected a memory with {w_k.shape[0]} features (the decoder's memory_size), got "
                         f"shape {tuple(memory.shape)}. Fix: bind the outputs of the encoder the decoder was "
                         "built for.")
    if mask is None:
        mask = jnp.ones(memory.shape[:-1], bool)
    mask = jnp.asarray(mask)
    if tuple(mask.shape) != tuple(memory.shape[:-1]) or mask.dtype != jnp.bool_:
        raise ValueError(f"{fn}: expected a boolean mask of shape {tuple(memory.shape[:-1])} (memory without its "
                         f"feature axis), got {mask.dtype}{list(mask.shape)}. Fix: pass "
                         "jnp.arange(S) < lengths[..., None].")
    return params._replace(memory=memory, keys=attn.prepare(params.attention, memory), mask=mask)
