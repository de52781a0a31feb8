"""Attention rules against a NumPy reference; the attention decoder as a cell."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rnnjax
from rnnjax import cells
from rnnjax.attention import KINDS, DecoderParams, attention, attention_decoder, bind_memory, masked_softmax

B, S, M, Q, F = 3, 5, 6, 6, 4
LENGTHS = np.array([5, 2, 3])


def _memory(seed=0):
    rng = np.random.default_rng(seed)
    memory = rng.normal(size=(B, S, M)).astype(np.float32)
    mask = np.arange(S)[None] < LENGTHS[:, None]
    return memory, mask, rng.normal(size=(B, Q)).astype(np.float32)


def _numpy_scores(kind, p, memory, query):
    p = jax.tree_util.tree_map(np.asarray, p)
    if kind == "dot":
        return np.einsum("bsm,bm->bs", memory, query)
    if kind == "general":
        return np.einsum("bsq,bq->bs", memory @ p.w_k, query)
    keys = memory @ p.w_k + (p.b if p.b is not None else 0)
    return np.tanh(keys + (query @ p.w_q)[:, None]) @ p.v


def _numpy_softmax(scores, mask):
    scores = np.where(mask, scores, -np.inf)
    e = np.exp(scores - scores.max(-1, keepdims=True))  # exp(-inf) = 0 on padding
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("kind", KINDS)
def test_weights_match_numpy_sum_to_one_and_are_zero_on_padding(kind):
    memory, mask, query = _memory()
    attn = attention(kind)
    p = attn.init(jax.random.key(1), Q, M)
    context, weights = attn.apply(p, attn.prepare(p, memory), memory, mask, query)
    ref = _numpy_softmax(_numpy_scores(kind, p, memory.astype(np.float64), query.astype(np.float64)), mask)
    np.testing.assert_allclose(weights, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(weights).sum(-1), 1.0, rtol=1e-6)
    assert np.all(np.asarray(weights)[~mask] == 0.0)
    np.testing.assert_allclose(context, np.einsum("bs,bsm->bm", ref, memory), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_padding_values_do_not_matter(kind):
    memory, mask, query = _memory()
    noisy = np.where(mask[..., None], memory, 1e3).astype(np.float32)
    attn = attention(kind)
    p = attn.init(jax.random.key(1), Q, M)
    c1, w1 = attn.apply(p, attn.prepare(p, memory), memory, mask, query)
    c2, w2 = attn.apply(p, attn.prepare(p, noisy), noisy, mask, query)
    np.testing.assert_allclose(c1, c2, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(w1, w2)


def test_masked_softmax_all_false_row_is_zero_and_the_gradient_analytic():
    scores = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = jnp.array([[True, False, True], [False, False, False]])
    w = masked_softmax(scores, mask)
    np.testing.assert_array_equal(w[1], 0.0)
    e = np.exp([1.0, 3.0])
    np.testing.assert_allclose(w[0], [e[0] / e.sum(), 0.0, e[1] / e.sum()], rtol=1e-6)
    g = jax.grad(lambda s: jnp.sum(masked_softmax(s, mask) * jnp.arange(3.0)))(scores)
    # d/ds_i sum_j w_j c_j = w_i (c_i - sum_j w_j c_j) over the kept i; zero where masked and in the empty row
    kept_w, kept_c = np.array([e[0], e[1]]) / e.sum(), np.array([0.0, 2.0])
    want = np.zeros((2, 3))
    want[0, [0, 2]] = kept_w * (kept_c - kept_w @ kept_c)
    np.testing.assert_allclose(g, want, rtol=1e-6, atol=1e-7)


DECODERS = [("luong", True), ("luong", False), ("bahdanau", True), ("bahdanau", False)]


def _decoder(style, feed, cell=None, kind="general"):
    attn = attention(kind)
    dec = attention_decoder(cell or cells.lstm(Q), attn, memory_size=M, style=style, input_feeding=feed)
    params = dec.init(jax.random.key(2), F)
    memory, mask, _ = _memory()
    return attn, dec, bind_memory(attn, params, memory, mask)


def _numpy_lstm(p, h, c, inp):
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    i, f, g, o = np.split(inp @ p.w_ih + p.b_ih + h @ p.w_hh + p.b_hh, 4, -1)
    c = sig(f) * c + sig(i) * np.tanh(g)
    return sig(o) * np.tanh(c), c


def _numpy_decoder(style, feed, kind, p, carry, xs):
    """The attention decoder's equations (module docstring) in float64 around an LSTM; returns the final
    (h, c, attentional, weights), ys [B, T, A] and every step's weights [B, T, S]."""
    (h, c), att, w = carry
    ys, ws = [], []

    def attend(query):
        w = _numpy_softmax(_numpy_scores(kind, p.attention, p.memory, query), p.mask)
        return w, np.einsum("bs,bsm->bm", w, p.memory)

    for x in np.moveaxis(xs, 1, 0):
        parts = [x]
        if style == "bahdanau":
            w, context = attend(h)  # h_{t-1}
            parts.append(context)
        if feed:
            parts.append(att)  # h~_{t-1}
        h, c = _numpy_lstm(p.cell, h, c, np.concatenate(parts, -1))
        if style == "luong":
            w, context = attend(h)  # h_t
        att = np.tanh(np.concatenate([h, context], -1) @ p.w_out + p.b_out)
        ys.append(att)
        ws.append(w)
    return (h, c, att, w), np.stack(ys, 1), np.stack(ws, 1)


DECODER_KINDS = [(style, feed, kind) for style, feed in DECODERS
                 for kind in (("general", "dot") if style == "luong" else ("additive",))]


@pytest.mark.parametrize("style,feed,kind", DECODER_KINDS)
def test_decoder_matches_numpy_from_a_nonzero_carry(style, feed, kind):
    """unroll and step by step against the NumPy twin for 4 steps from a random carry (nonzero h, c and
    h~_{t-1}), with padded memory positions: checks input feeding and which state each style attends with."""
    attn, dec, bound = _decoder(style, feed, kind=kind)
    rng = np.random.default_rng(4)
    carry0 = jax.tree_util.tree_map(lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype),
                                    dec.initial_carry(bound, (B,)))
    xs = rng.normal(size=(B, 4, F)).astype(np.float32)
    f64 = lambda t: jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), t)  # noqa: E731
    (h, c, att, w), ys_ref, ws_ref = _numpy_decoder(style, feed, kind, f64(bound), f64(carry0), f64(xs))
    carry, ys = rnnjax.unroll(dec, bound, xs, carry=carry0)
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)  # noqa: E731
    close(ys, ys_ref)
    jax.tree_util.tree_map(close, carry, type(carry)(type(carry.cell)(h, c), att, w))
    step_carry = carry0
    for t in range(xs.shape[1]):
        step_carry, y = rnnjax.step(dec, bound, step_carry, xs[:, t])
        close(y, ys_ref[:, t])
        close(step_carry.weights, ws_ref[:, t])
        assert np.all(np.asarray(step_carry.weights)[~bound.mask] == 0.0)
    jax.tree_util.tree_map(close, step_carry, carry)


def test_decoder_with_gru_and_vmap_equals_batched():
    attn, dec, bound = _decoder("bahdanau", True, cell=cells.gru(Q), kind="additive")
    xs = np.random.default_rng(5).normal(size=(B, 3, F)).astype(np.float32)
    _, ys = rnnjax.unroll(dec, bound, xs)
    one = jax.vmap(lambda m, k, mask, x: rnnjax.unroll(dec, bound._replace(memory=m, keys=k, mask=mask), x)[1])
    np.testing.assert_allclose(one(bound.memory, bound.keys, bound.mask, xs), ys, rtol=1e-5, atol=1e-6)


def test_errors():
    attn = attention("general")
    dec = attention_decoder(cells.lstm(Q), attn, memory_size=M)
    params = dec.init(jax.random.key(0), F)
    with pytest.raises(ValueError, match=re.escape(
            "rnnjax.attention.attention_decoder.initial_carry: the decoder's parameters have no memory bound. "
            "Fix: params = rnnjax.attention.bind_memory(attn, params, memory, mask) first.") + "$"):
        dec.initial_carry(params, (B,))
    with pytest.raises(ValueError, match=re.escape(
            "rnnjax.attention.bind_memory: expected memory of shape [*batch, S, M] with S >= 1, got shape "
            "(3, 0, 6). Fix: pass the encoder's outputs for a non-empty source.") + "$"):
        bind_memory(attn, params, jnp.zeros((B, 0, M)))
    with pytest.raises(ValueError, match=re.escape(
            "rnnjax.attention.attention: dot attention needs the query and memory sizes to be equal, got "
            "query_size=4 and memory_size=6. Fix: use kind='general', which learns a [M, Q] matrix "
            "between them.") + "$"):
        attention("dot").init(jax.random.key(0), 4, 6)
    with pytest.raises(ValueError, match=re.escape(
            "rnnjax.attention.attention: unknown kind 'mlp'; expected one of additive, dot, general, concat. "
            "Fix: pass kind='additive' (Bahdanau) or 'dot', 'general', 'concat' (Luong).") + "$"):
        attention("mlp")
    with pytest.raises(ValueError, match=re.escape(
            "rnnjax.attention.bind_memory: expected a memory with 6 features (the decoder's memory_size), got "
            "shape (3, 5, 7). Fix: bind the outputs of the encoder the decoder was built for.") + "$"):
        bind_memory(attn, params, jnp.zeros((B, S, M + 1)))
    dot = attention("dot")
    dot_dec = attention_decoder(cells.lstm(M), dot, memory_size=M)
    bound = bind_memory(dot, dot_dec.init(jax.random.key(0), F), jnp.zeros((B, S, M + 1)))
    with pytest.raises(ValueError, match=re.escape(
            "rnnjax.attention.attention_decoder.initial_carry: expected a memory with 6 features (memory_size), "
            "got shape (3, 5, 7). Fix: bind the outputs of the encoder the decoder was built for.") + "$"):
        dot_dec.initial_carry(bound, (B,))
    assert isinstance(params, DecoderParams) and params.memory is None
