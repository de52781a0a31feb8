"""Bad input raises the documented exception with a message naming the
function, what was expected, what was given and the fix. Messages are
compared in full."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rnnjax
from rnnjax import cells, layers

CELL = cells.lstm(6)
PARAMS = CELL.init(jax.random.key(0), 5)
XS = jnp.zeros((4, 7, 5))


def message(exc_type, fn):
    with pytest.raises(exc_type) as info:
        fn()
    return str(info.value)


CASES = {
    "wrong feature size": (
        ValueError, lambda: rnnjax.unroll(CELL, PARAMS, jnp.zeros((4, 7, 3))),
        "rnnjax.unroll: expected xs with 5 features in the last axis (the parameters were initialised with "
        "input_size=5), got shape (4, 7, 3). Fix: pass inputs of shape [..., 5] or re-initialise with input_size=3."),
    "rank 1": (
        ValueError, lambda: rnnjax.unroll(CELL, PARAMS, jnp.zeros((5,))),
        "rnnjax.unroll: expected xs of rank >= 2, [*batch, T, F] (or [T, *batch, F] with time_major=True), got "
        "shape (5,). Fix: a single sequence is [T, F]; a single step goes through rnnjax.step instead."),
    "T = 0": (
        ValueError, lambda: rnnjax.unroll(CELL, PARAMS, jnp.zeros((4, 0, 5))),
        "rnnjax.unroll: expected xs with T >= 1 time steps, got shape (4, 0, 5) (T = 0). Fix: drop empty sequences "
        "before calling, or pad them to length 1 with lengths=0."),
    "lengths > T": (
        ValueError, lambda: rnnjax.unroll(CELL, PARAMS, XS, lengths=jnp.array([1, 2, 3, 8])),
        "rnnjax.unroll: lengths must be <= T = 7 (the time axis of xs), got a maximum of 8. Fix: pad xs to the "
        "longest sequence or clip the lengths."),
    "negative lengths": (
        ValueError, lambda: rnnjax.unroll(CELL, PARAMS, XS, lengths=jnp.array([1, 2, 3, -1])),
        "rnnjax.unroll: lengths must be >= 0, got a minimum of -1. Fix: pass the number of valid steps of each "
        "sequence."),
    "fractional lengths": (
        TypeError, lambda: rnnjax.unroll(CELL, PARAMS, XS, lengths=jnp.array([1, 2, 3, 2.5])),
        "rnnjax.unroll: expected integer lengths, got dtype float32. Fix: pass lengths.astype(jnp.int32) holding "
        "whole numbers of valid steps."),
    "lengths of the wrong shape": (
        ValueError, lambda: rnnjax.unroll(CELL, PARAMS, XS, lengths=jnp.array([1, 2, 3])),
        "rnnjax.unroll: expected lengths of shape (4,) (the batch dimensions of xs), got shape (3,). Fix: pass one "
        "length per sequence."),
    "carry of the wrong batch": (
        ValueError, lambda: rnnjax.unroll(CELL, PARAMS, XS, carry=CELL.initial_carry(PARAMS, (3,))),
        "rnnjax.unroll: carry does not match: expected LSTMCarry(h=float32[4, 6], c=float32[4, 6]), got "
        "LSTMCarry(h=float32[3, 6], c=float32[3, 6]). Fix: build it with cell.initial_carry(params, "
        "batch_shape=(4,))."),
    "carry of the wrong structure": (
        ValueError, lambda: rnnjax.unroll(CELL, PARAMS, XS, carry=jnp.zeros((4, 6))),
        "rnnjax.unroll: carry does not match: expected LSTMCarry(h=float32[4, 6], c=float32[4, 6]), got "
        "float32[4, 6]. Fix: build it with cell.initial_carry(params, batch_shape=(4,))."),
    "carry of the wrong dtype": (
        ValueError, lambda: rnnjax.unroll(CELL, PARAMS, XS, carry=CELL.initial_carry(PARAMS, (4,))._replace(
            c=jnp.zeros((4, 6), jnp.bfloat16))),
        "rnnjax.unroll: carry does not match: expected LSTMCarry(h=float32[4, 6], c=float32[4, 6]), got "
        "LSTMCarry(h=float32[4, 6], c=bfloat16[4, 6]). Fix: build it with cell.initial_carry(params, "
        "batch_shape=(4,))."),
    "integer xs": (
        TypeError, lambda: rnnjax.unroll(CELL, PARAMS, XS.astype(jnp.int32)),
        "rnnjax.unroll: expected a floating-point xs, got dtype int32 (token ids go through "
        "rnnjax.layers.embedding first). Fix: pass xs.astype(jnp.float32)."),
    "string xs": (
        TypeError, lambda: rnnjax.unroll(CELL, PARAMS, "hello"),
        "rnnjax.unroll: expected xs, a floating-point array [*batch, T, F], got str 'hello'. Fix: pass numbers as a "
        "float array, e.g. jnp.asarray(xs, jnp.float32) (text goes through a vocabulary and rnnjax.layers.embedding "
        "first)."),
    "object xs": (
        TypeError, lambda: rnnjax.unroll(CELL, PARAMS, np.full((4, 7, 5), object())),
        "rnnjax.unroll: expected xs, a floating-point array [*batch, T, F], got ndarray of dtype object. Fix: pass "
        "numbers as a float array, e.g. jnp.asarray(xs, jnp.float32) (text goes through a vocabulary and "
        "rnnjax.layers.embedding first)."),
    "complex xs": (
        TypeError, lambda: rnnjax.unroll(CELL, PARAMS, XS.astype(jnp.complex64)),
        "rnnjax.unroll: expected a floating-point xs, got dtype complex64. Fix: pass xs.astype(jnp.float32)."),
    "string x in step": (
        TypeError, lambda: rnnjax.step(CELL, PARAMS, CELL.initial_carry(PARAMS, ()), "hello"),
        "rnnjax.step: expected x, a floating-point array [*batch, F], got str 'hello'. Fix: pass numbers as a float "
        "array, e.g. jnp.asarray(x, jnp.float32) (text goes through a vocabulary and rnnjax.layers.embedding "
        "first)."),
    "object x in step": (
        TypeError, lambda: rnnjax.step(CELL, PARAMS, CELL.initial_carry(PARAMS, ()), [None] * 5),
        "rnnjax.step: expected x, a floating-point array [*batch, F], got list [None, None, None, None, None]. Fix: "
        "pass numbers as a float array, e.g. jnp.asarray(x, jnp.float32) (text goes through a vocabulary and "
        "rnnjax.layers.embedding first)."),
    "complex x in step": (
        TypeError, lambda: rnnjax.step(CELL, PARAMS, CELL.initial_carry(PARAMS, ()), jnp.zeros(5, jnp.complex64)),
        "rnnjax.step: expected a floating-point x, got dtype complex64. Fix: pass x.astype(jnp.float32)."),
    "mask of the wrong shape": (
        ValueError, lambda: rnnjax.unroll(CELL, PARAMS, XS, mask=jnp.ones((4, 6), bool)),
        "rnnjax.unroll: expected mask of shape (4, 7) (xs without its feature axis), got shape (4, 6). Fix: pass "
        "one boolean per step of each sequence."),
    "non-boolean mask": (
        TypeError, lambda: rnnjax.unroll(CELL, PARAMS, XS, mask=jnp.ones((4, 7))),
        "rnnjax.unroll: expected a boolean mask, got dtype float32. Fix: pass mask.astype(bool)."),
    "bad remat": (
        ValueError, lambda: rnnjax.unroll(CELL, PARAMS, XS, remat=0),
        "rnnjax.unroll: remat must be None, True or a positive int k (store the carry every k steps), got 0. "
        "Fix: pass e.g. remat=64 for long sequences."),
    "not a cell": (
        TypeError, lambda: rnnjax.unroll(lambda x: x, PARAMS, XS),
        "rnnjax.unroll: expected an rnnjax.cells.Cell, got function. Fix: build one with a factory such as "
        "rnnjax.cells.lstm(hidden_size)."),
    "step feature size": (
        ValueError, lambda: rnnjax.step(CELL, PARAMS, CELL.initial_carry(PARAMS, (4,)), jnp.zeros((4, 2))),
        "rnnjax.step: expected x with 5 features in the last axis (the parameters were initialised with "
        "input_size=5), got shape (4, 2). Fix: pass inputs of shape [..., 5] or re-initialise with input_size=2."),
    "step reset shape": (
        ValueError, lambda: rnnjax.step(CELL, PARAMS, CELL.initial_carry(PARAMS, (4,)), jnp.zeros((4, 5)),
                                        reset=jnp.zeros((3,), bool)),
        "rnnjax.step: expected a boolean reset of shape (4,) (x without its feature axis), got bool[3]. Fix: one "
        "boolean per sequence."),
    "hidden size 0": (
        ValueError, lambda: cells.lstm(0),
        "rnnjax.cells.lstm: expected hidden_size to be an integer >= 1, got 0. Fix: pass a whole number such as "
        "hidden_size=64."),
    "unknown activation": (
        ValueError, lambda: cells.elman(3, activation="gelu"),
        "rnnjax.cells.elman: unknown activation 'gelu'; expected one of ['identity', 'relu', 'sigmoid', 'tanh']. "
        "Fix: pass one of those names."),
    "unknown initialiser": (
        ValueError, lambda: cells.gru(3, recurrent_init="glorot"),
        "rnnjax.cells.gru: unknown initialiser 'glorot'; expected 'uniform', 'xavier', 'he', 'orthogonal', "
        "'zeros' or a callable (key, shape, dtype) -> array. Fix: pass one of those."),
    "proj_size too large": (
        ValueError, lambda: cells.lstm(4, proj_size=4),
        "rnnjax.cells.lstm: proj_size must be smaller than hidden_size=4, got 4 (as in torch.nn.LSTM). Fix: pass "
        "a smaller proj_size, or 0 for no projection."),
    "forget bias without bias": (
        ValueError, lambda: cells.lstm(4, bias=False, forget_bias=1.0),
        "rnnjax.cells.lstm: forget_bias=1.0 needs bias=True (it is added to the forget gate's bias). Fix: pass "
        "bias=True or forget_bias=0.0."),
    "residual size mismatch": (
        ValueError, lambda: layers.stack([cells.lstm(4), cells.lstm(5)], residual=True),
        "rnnjax.layers.stack: residual=True adds each layer's input to its output, so layer 1 must output 4 "
        "features (its input size), got 5. Fix: give the layers equal sizes or pass residual=False."),
    "unknown merge": (
        ValueError, lambda: layers.bidirectional(cells.gru(3), merge="avg"),
        "rnnjax.layers.bidirectional: unknown merge 'avg'; expected one of ('concat', 'sum', 'mean', 'none'). "
        "Fix: pass one of those."),
    "sum of unequal directions": (
        ValueError, lambda: layers.bidirectional(cells.gru(3), cells.gru(4), merge="sum"),
        "rnnjax.layers.bidirectional: merge='sum' needs equal output sizes, got forward 3 and reverse 4. Fix: use "
        "merge='concat'."),
    "stepping a bidirectional layer": (
        ValueError, lambda: layers.bidirectional(cells.gru(3)).step(None, None, None),
        "rnnjax.layers.bidirectional: a bidirectional layer needs the whole sequence and cannot be stepped one "
        "step at a time. Fix: call apply on the whole sequence, or stream a unidirectional stack."),
    "dropout rate": (
        ValueError, lambda: layers.stack([cells.gru(3)], dropout=1.0),
        "rnnjax.layers.stack: dropout must be in [0, 1), got 1.0. Fix: pass a rate such as 0.2."),
    "embedding ids out of range": (
        ValueError, lambda: layers.embedding(10, 4).apply(jnp.zeros((10, 4)), jnp.array([3, 10])),
        "rnnjax.layers.embedding: token ids must be in [0, 10), got values in [3, 10]. Fix: map tokens through "
        "the model's vocabulary."),
    "embedding float ids": (
        TypeError, lambda: layers.embedding(10, 4).apply(jnp.zeros((10, 4)), jnp.array([3.0])),
        "rnnjax.layers.embedding: expected ids, an integer array of token ids [...], got dtype float32. Fix: pass "
        "ids.astype(jnp.int32) holding whole numbers."),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_error_message(case):
    exc_type, fn, expected = CASES[case]
    assert message(exc_type, fn) == expected


def test_value_checks_are_skipped_under_jit_but_shapes_are_not():
    """Under jit lengths are tracers (values unknown); a length of T+1 then simply means 'all valid'."""
    run = jax.jit(lambda n: rnnjax.unroll(CELL, PARAMS, XS + 1.0, lengths=n)[1])
    full = rnnjax.unroll(CELL, PARAMS, XS + 1.0)[1]
    assert jnp.allclose(run(jnp.array([8, 8, 8, 8])), full)
    assert message(ValueError, lambda: run(jnp.array([1, 2]))) == (
        "rnnjax.unroll: expected lengths of shape (4,) (the batch dimensions of xs), got shape (2,). "
        "Fix: pass one length per sequence.")


def test_value_checks_read_constants_that_a_jitted_function_closes_over():
    """Ids, prompts and source lengths closed over by a jitted function are known at trace time: their values
    are checked there (with NumPy: jnp's min of a constant is traced under jit) and the function runs."""
    from rnnjax.models import generate, language_model, seq2seq

    table = jax.random.normal(jax.random.key(0), (10, 4))
    ids, bad = jnp.array([[0, 9, 3]]), jnp.array([[3, 10]])  # indexed outside the jitted lambdas: constants
    emb = layers.embedding(10, 4)
    np.testing.assert_array_equal(jax.jit(lambda t: emb.apply(t, ids))(table), np.asarray(table)[np.asarray(ids)])
    assert message(ValueError, lambda: jax.jit(lambda t: emb.apply(t, bad))(table)) == (
        "rnnjax.layers.embedding: token ids must be in [0, 10), got values in [3, 10]. Fix: map tokens through "
        "the model's vocabulary.")
    lm = language_model(10, hidden=4, embed=3)
    lm_params = lm.init(jax.random.key(1))
    prompt, bad_prompt = ids[0], bad[0]
    greedy = jax.jit(lambda p: generate(lm, p, jax.random.key(2), prompt, 4, temperature=0.0))
    np.testing.assert_array_equal(greedy(lm_params), generate(lm, lm_params, jax.random.key(2), prompt, 4,
                                                              temperature=0.0))
    assert message(ValueError, lambda: jax.jit(lambda p: generate(lm, p, jax.random.key(2), bad_prompt, 4))(
        lm_params)) == ("rnnjax.models.generate: prompt_ids must be in [0, 10) (the vocabulary), got values in "
                        "[3, 10]. Fix: encode the prompt with the model's vocabulary.")
    s2s = seq2seq(10, 10, hidden=4, embed=3)
    s2s_params = s2s.init(jax.random.key(3))
    src, lengths = jnp.array([[1, 2], [3, 0]]), jnp.array([2, 1])
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.jit(lambda p: s2s.encode(p, src, lengths))(s2s_params),
                           s2s.encode(s2s_params, src, lengths))
    empty = jnp.array([2, 0])
    assert message(ValueError, lambda: jax.jit(lambda p: s2s.encode(p, src, empty))(s2s_params)) == (
        "rnnjax.models.seq2seq.encode: every source needs at least one token, got a length of 0. Fix: drop empty "
        "sources before encoding.")
