"""The encoder-decoder: teacher forcing against step-by-step decoding, padding, losses, a task it must learn."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rnnjax import train
from rnnjax.data.g2p import make_batch
from rnnjax.data.synthetic import seq2seq_task
from rnnjax.models import sampling_schedule, seq2seq, seq2seq_loss, translate
from rnnjax.models.seq2seq import BOS, token_losses

VS, VT = 9, 11


def _batch(seed=0):
    src, tgt = seq2seq_task("reverse", 5, vocab_size=VS - 1, max_len=5, seed=seed)
    return make_batch(src, tgt, shape=(5, 6))


@pytest.fixture(scope="module", params=[("lstm", "general", "luong"), ("gru", "additive", "bahdanau")],
                ids=lambda p: "-".join(p))
def model_params(request):
    cell, attention, style = request.param
    model = seq2seq(VS, VT, cell=cell, hidden=6, embed=5, decoder_hidden=7, attention=attention, style=style)
    return model, model.init(jax.random.key(0))


def test_teacher_forced_loss_equals_step_by_step_sum(model_params):
    model, params = model_params
    b = _batch()
    loss = seq2seq_loss(model)(params, b)
    carry, context = model.start(params, b["src"], b["src_lengths"])
    total, count = 0.0, 0
    for t in range(b["tgt_in"].shape[1]):
        carry, logits = model.step(params, carry, b["tgt_in"][:, t], context)
        lp = np.asarray(jax.nn.log_softmax(logits), np.float64)
        for i in range(len(b["src"])):
            if t < b["tgt_lengths"][i]:
                total -= lp[i, b["tgt_out"][i, t]]
                count += 1
    np.testing.assert_allclose(float(loss), total / count, rtol=1e-5)


def test_padding_does_not_change_the_outputs(model_params):
    model, params = model_params
    b = _batch(1)
    logits = model.apply(params, b["src"], b["src_lengths"], b["tgt_in"], b["tgt_lengths"])
    for i in range(3):
        s, t = b["src_lengths"][i], b["tgt_lengths"][i]
        one = model.apply(params, b["src"][i:i + 1, :s], b["src_lengths"][i:i + 1], b["tgt_in"][i:i + 1, :t],
                          b["tgt_lengths"][i:i + 1])
        np.testing.assert_allclose(logits[i, :t], one[0], rtol=1e-5, atol=1e-5)


def test_label_smoothing_matches_numpy():
    logits = np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32)
    targets = np.array([0, 3, 4])
    lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    q = np.full((3, 5), 0.2 / 5)
    q[np.arange(3), targets] += 0.8
    np.testing.assert_allclose(token_losses(jnp.asarray(logits), jnp.asarray(targets), 0.2), -(q * lp).sum(-1),
                               rtol=1e-5)


def test_scheduled_sampling(model_params):
    model, params = model_params
    b = _batch(2)
    teacher = seq2seq_loss(model)(params, b, jax.random.key(0))
    scheduled = seq2seq_loss(model, scheduled_sampling=True)
    np.testing.assert_allclose(scheduled(params, {**b, "sampling_prob": np.float32(0.0)}, jax.random.key(0)),
                               teacher, rtol=1e-5)
    # probability 1: every input after BOS is the model's previous greedy prediction
    own = scheduled(params, {**b, "sampling_prob": np.float32(1.0)}, jax.random.key(0))
    carry, context = model.start(params, b["src"], b["src_lengths"])
    tok, total, count = jnp.full((len(b["src"]),), BOS), 0.0, 0
    for t in range(b["tgt_out"].shape[1]):
        carry, logits = model.step(params, carry, tok, context)
        lp = np.asarray(jax.nn.log_softmax(logits), np.float64)
        tok = jnp.argmax(logits, -1)
        for i in range(len(b["src"])):
            if t < b["tgt_lengths"][i]:
                total -= lp[i, b["tgt_out"][i, t]]
                count += 1
    np.testing.assert_allclose(float(own), total / count, rtol=1e-5)
    lin = sampling_schedule("linear", max_prob=0.4, start_step=10, end_step=110)
    assert [lin(0), lin(10), lin(60), lin(500)] == [0.0, 0.0, pytest.approx(0.2), pytest.approx(0.4)]
    inv = sampling_schedule("inverse_sigmoid", max_prob=1.0, start_step=0, end_step=100, k=10.0)
    assert inv(0) == pytest.approx(1 - 10 / 11) and inv(100) == pytest.approx(1 - 10 / (10 + np.exp(5.0)))


def test_reversal_reaches_exact_match():
    V = 6
    src, tgt = seq2seq_task("reverse", 4000, vocab_size=V, max_len=6, seed=0)
    model = seq2seq(V + 1, V + 3, hidden=32, embed=16, decoder_hidden=32)
    steps = 300
    optimizer = train.default_optimizer(1e-2, total_steps=steps, warmup_steps=20)
    state = train.init_train_state(model.init(jax.random.key(0)), optimizer, jax.random.key(1))
    step = train.make_train_step(seq2seq_loss(model), optimizer)
    rng = np.random.default_rng(0)
    for _ in range(steps):
        idx = rng.integers(0, len(src), 64)
        state, _ = step(state, make_batch([src[j] for j in idx], [tgt[j] for j in idx], shape=(6, 7)))
    test_src, test_tgt = seq2seq_task("reverse", 200, vocab_size=V, max_len=6, seed=1)
    b = make_batch(test_src, shape=(6, 7))
    d = translate(model, state.params, b["src"], b["src_lengths"], max_length=8)
    tokens = np.asarray(d.tokens[:, 0])
    exact = [list(tokens[i, :len(t) + 1]) == list(t) + [2] for i, t in enumerate(test_tgt)]
    assert np.mean(exact) == 1.0


def test_sorting_task_targets():
    src, tgt = seq2seq_task("sort", 3, vocab_size=5, min_len=2, max_len=4, seed=3)
    for s, t in zip(src, tgt):
        assert list(t - 2) == sorted(s) and 1 <= s.min() and s.max() <= 5


def test_bad_input():
    model = seq2seq(VS, VT, hidden=4, embed=3)
    params = model.init(jax.random.key(0))
    with pytest.raises(ValueError, match=re.escape(
            "rnnjax.models.seq2seq.encode: every source needs at least one token, got a length of 0. "
            "Fix: drop empty sources before encoding.") + "$"):
        model.encode(params, np.array([[1, 2], [0, 0]]), np.array([2, 0]))
    with pytest.raises(ValueError, match=re.escape(
            "rnnjax.models.seq2seq.encode: expected integer source ids of shape [B, S] with S >= 1, got "
            "int32[2, 0]. Fix: encode each word with the source vocabulary and pad with 0.") + "$"):
        model.encode(params, np.zeros((2, 0), np.int32), np.array([0, 0]))
    with pytest.raises(ValueError, match=re.escape(
            "rnnjax.models.seq2seq: unknown cell 'rnn'; expected one of lstm, gru, elman, layer_norm_lstm, "
            "layer_norm_gru, lru, mingru, minlstm, rglru, mgu, slstm, mlstm, mamba. Fix: pass one of those names or a "
            "factory hidden_size -> Cell.") + "$"):
        seq2seq(VS, VT, cell="rnn")
    with pytest.raises(ValueError, match=re.escape(
            "rnnjax.models.seq2seq_loss: label_smoothing must be in [0, 1), got 1.0. Fix: pass e.g. 0.1, or 0 "
            "for none.") + "$"):
        seq2seq_loss(model, label_smoothing=1.0)
    with pytest.raises(ValueError, match=re.escape(
            "rnnjax.data.synthetic.seq2seq_task: expected 1 <= min_len <= max_len, got min_len=0, max_len=3. "
            "Fix: every source needs at least one symbol.") + "$"):
        seq2seq_task("reverse", 3, min_len=0, max_len=3)
