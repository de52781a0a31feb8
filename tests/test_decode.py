"""Greedy, sampling and beam search over any cell-based decoder (seq2seq and the character LM)."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rnnjax import decode
from rnnjax.models import language_model, seq2seq, sequence_log_probs, translate
from rnnjax.models.seq2seq import BOS, EOS, PAD

VS, VT = 9, 7


@pytest.fixture(scope="module")
def s2s():
    model = seq2seq(VS, VT, hidden=8, embed=6, decoder_hidden=10)
    params = model.init(jax.random.key(0))
    # Larger readout weights make the output distributions peaked, so beams finish at different lengths.
    params = params._replace(readout=params.readout._replace(w=params.readout.w * 8))
    src = np.array([[3, 4, 5, 0, 0], [1, 2, 3, 4, 5], [7, 0, 0, 0, 0], [2, 2, 6, 8, 0]], np.int32)
    lengths = np.array([3, 5, 1, 4], np.int32)
    return model, params, src, lengths


def test_beam_width_one_equals_greedy_exactly(s2s):
    model, params, src, lengths = s2s
    g = translate(model, params, src, lengths, max_length=9)
    carry, context = model.start(params, src, lengths)
    b = decode.beam_search(partial(model.step, params), carry, jnp.full((4,), BOS), beam_width=1, max_length=9,
                           eos_id=EOS, vocab_size=VT, context=context, suppress=(PAD, BOS))
    np.testing.assert_array_equal(b.tokens, g.tokens)
    np.testing.assert_array_equal(b.log_probs, g.log_probs)
    np.testing.assert_array_equal(b.lengths, g.lengths)


def _rescore(model, params, src, lengths, d, k):
    tokens = np.asarray(d.tokens[:, k])
    out = np.where(np.arange(tokens.shape[1]) < np.asarray(d.lengths[:, k])[:, None], tokens, PAD)
    return np.asarray(sequence_log_probs(model, params, src, lengths, out, d.lengths[:, k]))


@pytest.mark.parametrize("penalty", [0.0, 0.7])
def test_each_beam_score_is_the_models_log_probability(s2s, penalty):
    model, params, src, lengths = s2s
    d = translate(model, params, src, lengths, beam_width=4, nbest=4, max_length=9, length_penalty=penalty)
    assert np.asarray(d.finished).any() and len(set(np.asarray(d.lengths).ravel().tolist())) > 1
    for k in range(4):
        logp = _rescore(model, params, src, lengths, d, k)
        np.testing.assert_allclose(d.log_probs[:, k], logp, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(d.scores[:, k], logp / np.asarray(d.lengths[:, k], np.float64) ** penalty,
                                   rtol=1e-5, atol=1e-5)
    scores = np.asarray(d.scores)
    assert np.all(scores[:, :-1] >= scores[:, 1:])  # best first


def test_beam_search_is_exhaustive_when_wide_enough(s2s):
    """With max_length 2 and a beam of every token translate can emit (all but PAD and BOS), every
    2-token sequence of those is scored: the best equals the brute-force best over all of them (and
    the 1-token ones ending in EOS)."""
    model, params, src, lengths = s2s
    d = translate(model, params, src, lengths, beam_width=VT - 2, max_length=2)
    carry, context = model.start(params, src, lengths)
    c1, l1 = model.step(params, carry, jnp.full((4,), BOS), context)
    lp1 = jax.nn.log_softmax(l1)
    best = np.asarray(lp1[:, EOS])
    for a in range(VT):
        if a in (EOS, PAD, BOS):
            continue
        _, l2 = model.step(params, c1, jnp.full((4,), a), context)
        second = jax.nn.log_softmax(l2).at[:, jnp.array([PAD, BOS])].set(-jnp.inf)
        best = np.maximum(best, np.asarray(lp1[:, a] + second.max(-1)))
    np.testing.assert_allclose(d.log_probs[:, 0], best, rtol=1e-5)


def test_language_model_beam_greedy_and_scores():
    lm = language_model(11, layers=1, hidden=12, embed=5)
    params = lm.init(jax.random.key(3))
    params = params._replace(readout=params.readout._replace(w=params.readout.w * 6))
    prompt = np.array([[1, 2, 3], [4, 5, 6]], np.int32)
    carry, _ = lm.apply(params, prompt[:, :-1])
    step = lambda c, t, _: lm.step(params, c, t)  # noqa: E731
    g = decode.greedy(step, carry, prompt[:, -1], max_length=6, eos_id=0)
    b1 = decode.beam_search(step, carry, prompt[:, -1], beam_width=1, max_length=6, eos_id=0, vocab_size=11)
    np.testing.assert_array_equal(b1.tokens[:, 0], g.tokens)
    np.testing.assert_array_equal(b1.log_probs[:, 0], g.log_probs)
    b = decode.beam_search(step, carry, prompt[:, -1], beam_width=3, nbest=3, max_length=6, eos_id=0,
                           vocab_size=11)
    apply = jax.jit(lambda p, ids: lm.apply(p, ids)[1])
    for k in range(3):  # rescore prompt + continuation with one teacher-forced apply
        seq = np.concatenate([prompt, np.asarray(b.tokens[:, k])], 1)
        logits = apply(params, seq[:, :-1])
        lp = np.asarray(jax.nn.log_softmax(logits))
        n = np.asarray(b.lengths[:, k])
        ref = [sum(lp[i, 2 + t, seq[i, 3 + t]] for t in range(n[i])) for i in range(2)]
        np.testing.assert_allclose(b.log_probs[:, k], ref, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(b.log_probs[:, 0]) >= np.asarray(g.log_probs) - 1e-5)


def test_sampling_at_temperature_zero_is_greedy_and_sampling_is_reproducible(s2s):
    model, params, src, lengths = s2s
    carry, context = model.start(params, src, lengths)
    step = partial(model.step, params)
    start = jnp.full((4,), BOS)
    g = decode.greedy(step, carry, start, max_length=9, eos_id=EOS, context=context)
    s0 = decode.sample(step, carry, start, jax.random.key(0), max_length=9, eos_id=EOS, context=context,
                       temperature=0.0)
    np.testing.assert_array_equal(s0.tokens, g.tokens)
    s1 = decode.sample(step, carry, start, jax.random.key(1), max_length=9, eos_id=EOS, context=context, top_k=3)
    s2 = decode.sample(step, carry, start, jax.random.key(1), max_length=9, eos_id=EOS, context=context, top_k=3)
    np.testing.assert_array_equal(s1.tokens, s2.tokens)
    d = jax.tree_util.tree_map(lambda x: x[:, None], s1)
    np.testing.assert_allclose(s1.log_probs, _rescore(model, params, src, lengths, d, 0), rtol=1e-5, atol=1e-5)


def test_jit_of_beam_search_equals_eager(s2s):
    model, params, src, lengths = s2s
    carry, context = model.start(params, src, lengths)
    run = partial(decode.beam_search, partial(model.step, params), beam_width=3, max_length=7, eos_id=EOS,
                  vocab_size=VT, nbest=2)
    eager = run(carry, jnp.full((4,), BOS), context=context)
    jitted = jax.jit(lambda c, s, x: run(c, s, context=x))(carry, jnp.full((4,), BOS), context)
    np.testing.assert_array_equal(eager.tokens, jitted.tokens)
    np.testing.assert_allclose(eager.scores, jitted.scores, rtol=1e-6)


def test_suppressed_tokens_are_never_emitted():
    """A decoder that prefers PAD, then BOS: with both suppressed, greedy emits the next most likely token
    at every step with the model's own log-probability, beam search ranks only sequences of the others,
    and sampling never draws them."""
    logits = jnp.array([5.0, 4.0, -1.0, 0.0, 1.0, 2.0, 3.0])  # PAD, BOS, EOS, then 3..6
    logp = np.asarray(jax.nn.log_softmax(logits))

    def step(carry, tokens, context):
        return carry, jnp.broadcast_to(logits, (*tokens.shape, VT))

    carry, start = jnp.zeros((3,)), jnp.full((3,), BOS)
    g = decode.greedy(step, carry, start, max_length=4, eos_id=EOS, suppress=(PAD, BOS))
    np.testing.assert_array_equal(g.tokens, np.full((3, 4), 6))
    np.testing.assert_allclose(g.log_probs, np.full(3, 4 * logp[6]), rtol=1e-6)
    assert np.asarray(decode.greedy(step, carry, start, max_length=4, eos_id=EOS).tokens == PAD).all()
    b = decode.beam_search(step, carry, start, beam_width=3, nbest=3, max_length=2, eos_id=EOS, vocab_size=VT,
                           suppress=[BOS, PAD])
    np.testing.assert_array_equal(b.tokens[0], [[6, 6], [6, 5], [5, 6]])
    np.testing.assert_allclose(b.log_probs[0], [2 * logp[6], logp[6] + logp[5], logp[5] + logp[6]], rtol=1e-6)
    s = decode.sample(step, jnp.zeros((500,)), jnp.full((500,), BOS), jax.random.key(0), max_length=3, eos_id=EOS,
                      temperature=3.0, suppress=(PAD, BOS))
    drawn = np.asarray(s.tokens)[np.arange(3) < np.asarray(s.lengths)[:, None]]
    assert set(drawn.tolist()) == {2, 3, 4, 5, 6}


def test_bad_input(s2s):
    model, params, src, lengths = s2s
    carry, context = model.start(params, src, lengths)
    step = partial(model.step, params)
    start = jnp.full((4,), BOS)
    beam = partial(decode.beam_search, step, carry, start, eos_id=EOS, vocab_size=VT)
    greedy = partial(decode.greedy, step, carry, eos_id=EOS, context=context)
    cases = [
        (lambda: beam(beam_width=8, max_length=5, context=context),
         "rnnjax.decode.beam_search: beam_width must be an integer in [1, 7] (the vocabulary size), got 8. "
         "Fix: use a beam no wider than the tokens it can emit."),
        (lambda: beam(beam_width=2, max_length=0),
         "rnnjax.decode.beam_search: max_length must be an integer >= 1 (the most tokens to generate, EOS "
         "included), got 0. Fix: pass e.g. max_length=32."),
        (lambda: greedy(start, max_length=0),
         "rnnjax.decode.greedy: max_length must be an integer >= 1 (the most tokens to generate, EOS "
         "included), got 0. Fix: pass e.g. max_length=32."),
        (lambda: greedy(jnp.ones(4), max_length=3),
         "rnnjax.decode.greedy: expected start tokens of shape [B] (integers), got float32[4]. "
         "Fix: pass jnp.full((B,), bos_id)."),
        (lambda: beam(beam_width=2, nbest=3, max_length=5),
         "rnnjax.decode.beam_search: nbest must be an integer in [1, beam_width=2], got 3. "
         "Fix: ask for at most as many sequences as the beam holds."),
        (lambda: translate(model, params, src, lengths, beam_width=6),
         "rnnjax.models.translate: beam_width must be an integer in [1, 5] (the vocabulary size, 7, less the 2 "
         "suppressed ids), got 6. Fix: use a beam no wider than the tokens it can emit."),
        (lambda: beam(beam_width=2, max_length=5, suppress=(7,)),
         "rnnjax.decode.beam_search: suppress must be a tuple of token ids in [0, 7), got (7,). "
         "Fix: pass e.g. suppress=(pad_id, bos_id)."),
        (lambda: greedy(start, max_length=3, suppress=tuple(range(VT))),
         "rnnjax.decode.greedy: suppress leaves no token to emit: it holds all 7 ids of the vocabulary. "
         "Fix: suppress fewer tokens."),
        (lambda: translate(model, params, src, lengths, max_length=0),
         "rnnjax.models.translate: max_length must be an integer >= 1 (the most tokens to generate, EOS "
         "included), got 0. Fix: pass e.g. max_length=32."),
        (lambda: translate(model, params, src, np.array([3, 0, 1, 4])),
         "rnnjax.models.translate: every source needs at least one token, got source ids of shape (4, 5) and "
         "lengths [3, 0, 1, 4]. Fix: drop empty sources."),
    ]
    for call, message in cases:
        with pytest.raises(ValueError) as e:  # not match=: pytest matches JAX's traceback note too
            call()
        assert str(e.value) == message
