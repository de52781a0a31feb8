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


@pytest.mark.parametrize("kind", KINDS)
def test_weights_match_numpy_sum_to_one_and_are_zero_on_padding(kind):
    memory, mask, query = _memory()
    attn = attention(kind)
    p = attn.init(jax.random.key(1), Q, M)
    context, weights = attn.apply(p, attn.prepare(p, memory), memory, mask, query)
    scores = _numpy_scores(kind, p, memory.astype(np.float64), query.astype(np.float64))
    ref = np.where(mask, np.exp(scores - np.where(mask, scores, -np.inf).max(-1, keepdims=True)), 0.0)
    ref /= ref.sum(-1, keepdims=True)
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


@pytest.mark.parametrize("style,feed", DECODERS)
def test_decoder_unroll_equals_step_by_step(style, feed):
    attn, dec, bound = _decoder(style, feed)
    xs = np.random.default_rng(3).normal(size=(B, 4, F)).astype(np.float32)
    carry0 = dec.initial_carry(bound, (B,))
    carry, ys = rnnjax.unroll(dec, bound, xs, carry=carry0)
    c = carry0
    for t in range(4):
        c, y = rnnjax.step(dec, bound, c, xs[:, t])
        np.testing.assert_allclose(ys[:, t], y, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(c.weights).sum(-1), 1.0, rtol=1e-5)
        assert np.all(np.asarray(c.weights)[~bound.mask] == 0.0)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), carry, c)


def test_luong_step_matches_numpy():
    """One Luong step with input feeding, written out in NumPy (LSTM inner cell, 'general' scores)."""
    attn, dec, bound = _decoder("luong", True)
    carry0 = dec.initial_carry(bound, (B,))
    x = np.random.default_rng(4).normal(size=(B, F)).astype(np.float32)
    _, y = rnnjax.step(dec, bound, carry0, x)
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), bound)
    inp = np.concatenate([x, np.zeros((B, Q))], -1)
    z = inp @ p.cell.w_ih + p.cell.b_ih + p.cell.b_hh  # h0 = c0 = 0
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    i, f, g, o = np.split(z, 4, -1)
    h = sig(o) * np.tanh(sig(i) * np.tanh(g))
    scores = np.einsum("bsq,bq->bs", p.memory @ p.attention.w_k, h)
    scores = np.where(p.mask, scores, -np.inf)
    w = np.exp(scores - scores.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    context = np.einsum("bs,bsm->bm", w, p.memory)
    ref = np.tanh(np.concatenate([h, context], -1) @ p.w_out + p.b_out)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


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
            "Fix: params = rnnjax.attention.bind_memory(attn, params, memory, mask) first.")):
        dec.initial_carry(params, (B,))
    with pytest.raises(ValueError, match=re.escape(
            "rnnjax.attention.bind_memory: expected memory of shape [*batch, S, M] with S >= 1, got shape "
            "(3, 0, 6). Fix: pass the encoder's outputs for a non-empty source.")):
        bind_memory(attn, params, jnp.zeros((B, 0, M)))
    with pytest.raises(ValueError, match=re.escape(
            "rnnjax.attention.attention: dot attention needs the query and memory sizes to be equal, got "
            "query_size=4 and memory_size=6. Fix: use kind='general', which learns a [M, Q] matrix between them.")):
        attention("dot").init(jax.random.key(0), 4, 6)
    with pytest.raises(ValueError, match=re.escape(
            "rnnjax.attention.attention: unknown kind 'mlp'; expected one of additive, dot, general, concat. "
            "Fix: pass kind='additive' (Bahdanau) or 'dot', 'general', 'concat' (Luong).")):
        attention("mlp")
    with pytest.raises(ValueError, match=re.escape(
            "rnnjax.attention.bind_memory: expected a memory with 6 features (the decoder's memory_size), got "
            "shape (3, 5, 7). Fix: bind the outputs of the encoder the decoder was built for.")):
        bind_memory(attn, params, jnp.zeros((B, S, M + 1)))
    dot = attention("dot")
    dot_dec = attention_decoder(cells.lstm(M), dot, memory_size=M)
    bound = bind_memory(dot, dot_dec.init(jax.random.key(0), F), jnp.zeros((B, S, M + 1)))
    with pytest.raises(ValueError, match=re.escape(
            "rnnjax.attention.attention_decoder.initial_carry: expected a memory with 6 features (memory_size), "
            "got shape (3, 5, 7). Fix: bind the outputs of the encoder the decoder was built for.")):
        dot_dec.initial_carry(bound, (B,))
    assert isinstance(params, DecoderParams) and params.memory is None
