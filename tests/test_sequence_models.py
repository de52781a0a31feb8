"""rnnjax.models.sequence: masked pooling equals pooling the unpadded sequence; taggers and
forecasters against their own step-by-step twins."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rnnjax import models
from rnnjax.models import sequence


def _ragged(seed=0, F=3, lengths=(2, 5, 1)):
    rng = np.random.default_rng(seed)
    T = max(lengths)
    x = rng.normal(size=(len(lengths), T, F)).astype(np.float32)
    for i, n in enumerate(lengths):
        x[i, n:] = rng.normal(size=(T - n, F)) * 100  # garbage in the padding must not matter
    return jnp.asarray(x), jnp.asarray(lengths, jnp.int32)


@pytest.mark.parametrize("pooling, bidirectional, layers", [
    ("last", False, 2), ("last", True, 1), ("mean", True, 1), ("attention", False, 1)])
def test_masked_pooling_equals_pooling_the_unpadded_sequence(pooling, bidirectional, layers):
    model = models.classifier(4, input_size=3, cell="gru", hidden=6, layers=layers, bidirectional=bidirectional,
                              pooling=pooling)
    params = model.init(jax.random.key(0))
    x, lengths = _ragged()
    padded = model.apply(params, x, lengths=lengths)
    assert padded.shape == (3, 4)
    for i, n in enumerate(np.asarray(lengths)):
        alone = model.apply(params, x[i, :n])  # no batch dimension, no padding, no lengths
        np.testing.assert_allclose(padded[i], alone, rtol=2e-5, atol=2e-6)


def test_pool_against_numpy():
    rng = np.random.default_rng(1)
    ys = rng.normal(size=(2, 4, 3)).astype(np.float32)
    lengths = np.array([2, 4])
    np.testing.assert_allclose(sequence.pool(ys, lengths, "last"), [ys[0, 1], ys[1, 3]], rtol=1e-6)
    np.testing.assert_allclose(sequence.pool(ys, lengths, "mean"), [ys[0, :2].mean(0), ys[1].mean(0)], rtol=1e-6)
    np.testing.assert_allclose(sequence.pool(ys, lengths, "last", backward_features=1),
                               [np.r_[ys[0, 1, :2], ys[0, 0, 2]], np.r_[ys[1, 3, :2], ys[1, 0, 2]]], rtol=1e-6)
    att = sequence.attention_pool_init(jax.random.key(0), 3, 5)
    scores = np.tanh(ys[0, :2] @ np.asarray(att.w) + np.asarray(att.b)) @ np.asarray(att.v)
    w = np.exp(scores - scores.max())
    w /= w.sum()
    np.testing.assert_allclose(sequence.pool(ys, lengths, "attention", attention=att)[0], w @ ys[0, :2],
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=re.escape(
            "rnnjax.models.pool: unknown pooling 'max'; expected one of last, mean, attention. Fix: pass one of "
            "those.") + "$"):
        sequence.pool(ys, lengths, "max")


def test_tagger_outputs_are_the_unpadded_outputs():
    model = models.tagger(5, vocab_size=7, cell="lstm", hidden=8)
    params = model.init(jax.random.key(1))
    ids = jnp.asarray(np.random.default_rng(2).integers(0, 7, (2, 6)), jnp.int32)
    lengths = jnp.asarray([6, 3])
    out = model.apply(params, ids, lengths=lengths)
    assert out.shape == (2, 6, 5) and not np.any(np.asarray(out[1, 3:]) != np.asarray(out[1, 3]))
    for i, n in enumerate([6, 3]):
        np.testing.assert_allclose(out[i, :n], model.apply(params, ids[i, :n]), rtol=2e-5, atol=2e-6)


def test_autoregressive_forecast_feeds_its_predictions_back():
    model = models.forecaster(3, mode="autoregressive", cell="gru", hidden=8)
    params = model.init(jax.random.key(2))
    window = jnp.asarray(np.random.default_rng(3).normal(size=(2, 6, 1)), jnp.float32)
    fc = model.forecast(params, window)
    assert fc.shape == (2, 3)
    # Twin: re-read the whole extended sequence each time and take the last one-step prediction.
    seq = window
    for h in range(3):
        nxt = model.apply(params, seq)[:, -1, :]  # [B, 1]
        np.testing.assert_allclose(fc[:, h], nxt[:, 0], rtol=2e-5, atol=2e-6)
        seq = jnp.concatenate([seq, nxt[:, None, :]], axis=1)
    direct = models.forecaster(4, input_size=2, mode="direct", hidden=8)
    p2 = direct.init(jax.random.key(0))
    x2 = jnp.ones((3, 5, 2))
    np.testing.assert_array_equal(direct.forecast(p2, x2), direct.apply(p2, x2))
    with pytest.raises(ValueError, match=re.escape(
            "rnnjax.models.forecaster: mode='autoregressive' feeds its predictions back as inputs, so it needs "
            "input_size=1 (the series alone), got 2. Fix: use mode='direct' with covariates.") + "$"):
        models.forecaster(4, input_size=2, mode="autoregressive")


def test_chrono_init_sets_the_memory_gates_only():
    for cell, gates in (("lstm", 4), ("gru", 3)):
        model = models.regressor(1, input_size=2, cell=cell, hidden=5, bidirectional=True)
        base = model.init(jax.random.key(0))
        new = models.chrono_init(base, jax.random.key(1), 100, cell)
        leaves = [jax.tree_util.tree_leaves(m.rnn.layers[0]) for m in (base, new)]
        for old_p, new_p in zip(*leaves):
            assert old_p.shape == new_p.shape
        for direction in (new.rnn.layers[0].forward, new.rnn.layers[0].backward):
            b_ih, b_hh = np.asarray(direction.b_ih).reshape(gates, 5), np.asarray(direction.b_hh).reshape(gates, 5)
            keep = b_ih[1]  # LSTM: the forget gate; GRU: the update gate z
            assert np.all((keep >= 0) & (keep <= np.log(99))) and np.all(b_hh[1] == 0)
            if cell == "lstm":
                np.testing.assert_array_equal(b_ih[0], -keep)
                np.testing.assert_array_equal(b_hh[0], 0)
        # Every other parameter is the one model.init gave.
        np.testing.assert_array_equal(new.rnn.layers[0].forward.w_hh, base.rnn.layers[0].forward.w_hh)
        np.testing.assert_array_equal(np.asarray(new.rnn.layers[0].forward.b_ih).reshape(gates, 5)[2:],
                                      np.asarray(base.rnn.layers[0].forward.b_ih).reshape(gates, 5)[2:])
    elman = models.regressor(1, input_size=2, cell="elman", hidden=5)
    p = elman.init(jax.random.key(0))
    assert models.chrono_init(p, jax.random.key(1), 100, "elman") is p
