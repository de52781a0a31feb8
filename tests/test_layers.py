"""Combinators against their hand-composed twins."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rnnjax
from conftest import B, F, T, assert_trees_close, random_inputs
from rnnjax import cells, layers

LENGTHS = jnp.array([T, 2, 1, 5])


def valid(lengths=LENGTHS):
    return (jnp.arange(T)[None, :] < lengths[:, None])[..., None]


def np_layer_norm(x, gain, shift, eps=1e-5):
    x = np.asarray(x, np.float64)
    return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps) * gain + shift


def test_stack_equals_chained_unrolls_with_per_layer_sizes():
    stack = layers.stack([cells.lstm(6), cells.gru(4), cells.elman(3)])
    params = stack.init(jax.random.key(0), F)
    xs = random_inputs()
    carry, ys = stack.apply(params, xs, lengths=LENGTHS)
    h, expected_carry = xs, []
    for cell, p in zip([cells.lstm(6), cells.gru(4), cells.elman(3)], params.layers):
        c, h = rnnjax.unroll(cell, p, h, lengths=LENGTHS)
        expected_carry.append(c)
    assert_trees_close((carry, ys), (tuple(expected_carry), h))
    assert stack.output_size == 3 and ys.shape[-1] == 3


def test_residual_and_layer_norm_equal_manual_composition():
    stack = layers.stack([cells.gru(5), cells.gru(5), cells.gru(5)], residual=True, layer_norm=True)
    params = stack.init(jax.random.key(0), F)
    params = params._replace(norms=tuple((g * 1.5, s + 0.1 * i) for i, (g, s) in enumerate(params.norms)))
    xs = random_inputs()
    _, ys = stack.apply(params, xs, lengths=LENGTHS)
    h = xs
    for i, p in enumerate(params.layers):
        _, out = rnnjax.unroll(cells.gru(5), p, h, lengths=LENGTHS)
        out = np.asarray(out) + (np.asarray(h) if i > 0 else 0.0)
        h = jnp.asarray(np_layer_norm(out, *map(np.asarray, params.norms[i])) * np.asarray(valid()), jnp.float32)
    assert_trees_close(ys, h)
    np.testing.assert_array_equal(np.asarray(ys)[1, 2:], 0.0)


def test_bidirectional_merges_equal_the_two_directions():
    xs = random_inputs()
    results = {}
    for merge in ("concat", "sum", "mean", "none"):
        bi = layers.bidirectional(cells.lstm(4), merge=merge)
        params = bi.init(jax.random.key(1), F)
        results[merge] = bi.apply(params, xs, lengths=LENGTHS)
    c_f, y_f = rnnjax.unroll(cells.lstm(4), params.forward, xs, lengths=LENGTHS)
    c_b, y_b = rnnjax.unroll(cells.lstm(4), params.backward, xs, lengths=LENGTHS, reverse=True)
    assert_trees_close(results["none"], ((c_f, c_b), (y_f, y_b)))
    assert_trees_close(results["concat"][1], jnp.concatenate([y_f, y_b], -1))
    assert_trees_close(results["sum"][1], y_f + y_b)
    assert_trees_close(results["mean"][1], (y_f + y_b) / 2)


def test_deep_bidirectional_padded_equals_unpadded():
    model = layers.stack([layers.bidirectional(cells.lstm(4))] * 2, dropout=0.3)
    params = model.init(jax.random.key(0), F)
    xs = random_inputs()
    carry, ys = model.apply(params, xs, lengths=LENGTHS)
    for b, n in enumerate(np.asarray(LENGTHS)):
        c_b, y_b = model.apply(params, xs[b, :n])
        assert_trees_close(ys[b, :n], y_b)
        assert_trees_close(jax.tree_util.tree_map(lambda a: a[b], carry), c_b)


def test_dropout_only_with_a_key_and_inverted_scaling():
    model = layers.stack([cells.gru(8), cells.gru(8)], dropout=0.5)
    plain = layers.stack([cells.gru(8), cells.gru(8)])
    params = model.init(jax.random.key(0), F)
    xs = random_inputs()
    assert_trees_close(model.apply(params, xs), plain.apply(params, xs))
    trained = model.apply(params, xs, key=jax.random.key(5))[1]
    assert float(jnp.abs(trained - plain.apply(params, xs)[1]).max()) > 1e-3
    # the first layer's input is never dropped: its final carry equals the plain stack's
    first_carry = model.apply(params, xs, key=jax.random.key(5))[0][0]
    assert_trees_close(first_carry, rnnjax.unroll(cells.gru(8), params.layers[0], xs)[0])


@pytest.mark.parametrize("variational", [False, True])
def test_dropout_masks(variational):
    x = jnp.ones((64, 50, 16))
    y = np.asarray(layers.dropout(x, 0.25, jax.random.key(0), variational=variational))
    assert set(np.unique(y)) == {0.0, np.float32(1 / 0.75)}
    assert abs(y.mean() - 1.0) < 0.03  # inverted dropout keeps the expectation
    same_over_time = np.all(y == y[:, :1, :])
    assert same_over_time == variational
    np.testing.assert_array_equal(layers.dropout(x, 0.25, None), x)


def test_variational_dropout_time_major_shares_the_mask_over_axis_0():
    y = np.asarray(layers.dropout(jnp.ones((30, 8, 16)), 0.5, jax.random.key(0), variational=True, time_major=True))
    assert np.all(y == y[:1])


def test_stack_step_equals_apply():
    model = layers.stack([cells.lstm(5, proj_size=3), cells.gru(3), cells.elman(3)], residual=True, layer_norm=True)
    params = model.init(jax.random.key(0), F)
    xs = random_inputs()
    carry, ys = model.apply(params, xs)
    c, outs = model.initial_carry(params, (B,)), []
    for t in range(T):
        c, y = model.step(params, c, xs[:, t])
        outs.append(y)
    assert_trees_close((c, jnp.stack(outs, 1)), (carry, ys))


def test_stack_streaming_with_resets_equals_fresh_start():
    model = layers.stack([cells.gru(4), cells.gru(4)])
    params = model.init(jax.random.key(0), F)
    xs = random_inputs()
    resets = jnp.zeros((B, T), bool).at[:, 4].set(True)
    _, ys = model.apply(params, xs, resets=resets)
    _, tail = model.apply(params, xs[:, 4:])
    assert_trees_close(ys[:, 4:], tail)


def test_time_major_stack_equals_batch_major():
    model = layers.stack([layers.bidirectional(cells.gru(4)), cells.lstm(3)], residual=False, layer_norm=True)
    params = model.init(jax.random.key(0), F)
    xs = random_inputs()
    c_b, y_b = model.apply(params, xs, lengths=LENGTHS)
    c_t, y_t = model.apply(params, jnp.swapaxes(xs, 0, 1), lengths=LENGTHS, time_major=True)
    assert_trees_close((c_t, jnp.swapaxes(y_t, 0, 1)), (c_b, y_b))


def test_dense_embedding_layer_norm_equal_numpy():
    d = layers.dense(3)
    p = d.init(jax.random.key(0), F)
    x = random_inputs()
    np.testing.assert_allclose(d.apply(p, x), np.asarray(x) @ np.asarray(p.w) + np.asarray(p.b), atol=1e-5)
    assert np.abs(np.asarray(p.w)).max() <= 1 / np.sqrt(F)
    e = layers.embedding(11, 4)
    table = e.init(jax.random.key(1))
    ids = jnp.array([[0, 10, 3]])
    np.testing.assert_array_equal(e.apply(table, ids), np.asarray(table)[np.asarray(ids)])
    norm = layers.layer_norm()
    g, s = norm.init(None, F)
    np.testing.assert_allclose(norm.apply((g * 2, s + 1), x), np_layer_norm(x, 2.0, 1.0), atol=1e-5)


def test_reverse_layer_equals_unroll_reverse_and_refuses_to_step():
    layer = layers.rnn(cells.gru(4), reverse=True)
    params = layer.init(jax.random.key(0), F)
    xs = random_inputs()
    assert_trees_close(layer.apply(params, xs, lengths=LENGTHS),
                       rnnjax.unroll(cells.gru(4), params, xs, lengths=LENGTHS, reverse=True))
    with pytest.raises(ValueError) as e:
        layer.step(params, layer.initial_carry(params, (B,)), xs[:, 0])
    assert str(e.value) == ("rnnjax.layers.rnn: a reverse layer reads the sequence from its end and cannot be stepped "
                            "forward in time. Fix: stream with reverse=False, or call apply on the whole sequence.")
