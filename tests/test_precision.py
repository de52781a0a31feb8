"""The mixed-precision policy (rnnjax.cells.base, "Mixed precision"): ``param_dtype`` stores, ``dtype`` computes.

With ``dtype=jnp.bfloat16`` and float32 parameters: bfloat16 matmul operands with float32 accumulation, float32
gates, cell states and carries, outputs in bfloat16. ``dtype=None`` is the code path of before the option.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from test_cells import ref_lstm, reference_step

from rnnjax import cells, models, unroll
from rnnjax import layers as L
from rnnjax.cells.base import matmul

BF16 = jnp.bfloat16
F, H, T, B = 5, 6, 7, 3

FACTORIES = {
    "elman": lambda **kw: cells.elman(H, **kw),
    "elman_relu": lambda **kw: cells.elman(H, activation="relu", **kw),
    "jordan": lambda **kw: cells.jordan(H, 3, **kw),
    "lstm": lambda **kw: cells.lstm(H, **kw),
    "lstm_proj": lambda **kw: cells.lstm(H, proj_size=3, **kw),
    "lstm_peephole": lambda **kw: cells.lstm(H, peepholes=True, forget_bias=1.0, **kw),
    "gru": lambda **kw: cells.gru(H, **kw),
    "gru_cho": lambda **kw: cells.gru(H, reset_after=False, **kw),
    "layer_norm_lstm": lambda **kw: cells.layer_norm_lstm(H, **kw),
    "layer_norm_gru": lambda **kw: cells.layer_norm_gru(H, **kw),
    "lru": lambda **kw: cells.lru(H, state_size=4, r_min=0.5, r_max=0.95, **kw),
    "mingru": lambda **kw: cells.mingru(H, **kw),
    "minlstm": lambda **kw: cells.minlstm(H, **kw),
    "rglru": lambda **kw: cells.rglru(H, **kw),
}
LINEAR = ("lru", "mingru", "minlstm", "rglru")


def _data(seed=1, shape=(B, T, F)):
    return jax.random.normal(jax.random.PRNGKey(seed), shape)


def _leaf_dtypes(tree):
    return {str(leaf.dtype) for leaf in jax.tree_util.tree_leaves(tree)}


def bf16_round(a) -> np.ndarray:
    """``a`` rounded to bfloat16 (nearest even), as float64."""
    return np.asarray(a, np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_dtype_none_computes_in_the_float32_of_the_parameters(name):
    """``dtype=None`` (every factory's default) computes in the parameters' float32: equal to ``dtype=float32``,
    which runs the policy's branch (float32 operands and accumulation, float32 carries); bit-equal on the CPU. On
    the XLA path, where the cells' own products run (``"auto"`` runs elman, gru and lstm natively on AVX2 CPUs)."""
    none, explicit = FACTORIES[name](dtype=None), FACTORIES[name](dtype=jnp.float32)
    params = none.init(jax.random.PRNGKey(0), F)
    xs = _data()
    c0, y0 = unroll(none, params, xs, backend="xla")
    c1, y1 = unroll(explicit, params, xs, backend="xla")
    assert y0.dtype == y1.dtype == jnp.float32 and _leaf_dtypes(c0) == {"float32"}
    np.testing.assert_allclose(y0, y1, rtol=1e-6, atol=1e-6)
    jax.tree_util.tree_map(partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-6), c0, c1)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_policy_dtypes_and_values_against_the_rounded_operands(name):
    """The policy against float64 NumPy from the operands it multiplies (bfloat16-rounded weights, inputs and
    fed-back states; float32 biases, gains and recurrence parameters), whole sequences from the zero carry.
    Measured on the 2-core CPU: carries within 2e-7 of it and outputs equal to it rounded to bfloat16, while the
    float32 run is 9e-4 to 2e-2 away from it, so a cell that ignores ``dtype`` fails."""
    f32, policy = FACTORIES[name](), FACTORIES[name](dtype=BF16)
    params = f32.init(jax.random.PRNGKey(0), F)
    xs = _data()
    zero = policy.initial_carry(params, (B,))
    assert _leaf_dtypes(zero) == {"float32"}
    c_ref, y_ref = _reference_run(name, params, zero, xs)
    assert np.abs(np.asarray(unroll(f32, params, xs)[1], np.float64) - y_ref).max() > 3e-4
    for inputs in (xs, xs.astype(BF16)):  # inputs may be float32 or bfloat16
        c, y = unroll(policy, params, inputs, backend="xla")  # test_native compares the kernels with XLA
        assert y.dtype == BF16
        assert _leaf_dtypes(c) == {"float32"}
        # y: the float32 output rounded once to bfloat16 (relative error at most 2^-8)
        np.testing.assert_allclose(np.asarray(y, np.float64), y_ref, rtol=2**-8, atol=1e-6)
        jax.tree_util.tree_map(partial(np.testing.assert_allclose, rtol=0, atol=1e-6), c, c_ref)


@pytest.mark.parametrize("name", LINEAR)
def test_policy_parallel_scans_equal_the_sequential_one(name):
    cell = FACTORIES[name](dtype=BF16)
    params = cell.init(jax.random.PRNGKey(0), F)
    xs = _data()
    c_seq, y_seq = unroll(cell, params, xs, parallel=False)
    for method in ("associative", "loop"):
        c, y = unroll(cell, params, xs, parallel=method)
        assert y.dtype == BF16 and c.dtype == jnp.float32
        # measured: carries within 2.4e-7, outputs equal; a float32 difference may flip one bfloat16 rounding
        np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y_seq, np.float32), rtol=2**-7, atol=0)
        np.testing.assert_allclose(c, c_seq, rtol=0, atol=1e-6)


def _f64(a):
    return np.asarray(a, np.float64)


def _mm(a, w):
    """A product under the policy: both operands rounded to bfloat16, summed exactly (in float64)."""
    return bf16_round(a) @ bf16_round(w)


def _lru_step(p, carry, x):
    """The LRU under the policy: B is scaled by gamma in float32 before its cast, as the cell does (so not
    test_cells' reference, which scales the product)."""
    n = p.nu_log.shape[0]
    gamma = np.exp(np.asarray(p.gamma_log))
    px = _mm(x, np.concatenate([np.asarray(p.b_re) * gamma, np.asarray(p.b_im) * gamma, p.d], 1))
    lam = np.exp(-np.exp(_f64(p.nu_log)) + 1j * np.exp(_f64(p.theta_log)))
    h = lam * (carry[..., :n] + 1j * carry[..., n:]) + px[..., :n] + 1j * px[..., n:2 * n]
    carry = np.concatenate([h.real, h.imag], -1)
    return carry, _mm(carry, np.concatenate([p.c_re, -p.c_im])) + px[..., 2 * n:]


def _reference_step(name, p, carry, x):
    """One step of ``FACTORIES[name]`` in float64 NumPy from the bfloat16-rounded matmul operands (the policy's
    casts) and float32 biases: ``(new carry, y before its cast to bfloat16)``; test_cells' reference step with
    the product ``_mm``."""
    carry, x = jax.tree_util.tree_map(_f64, carry), np.asarray(x, np.float32)
    if name == "lru":
        return _lru_step(p, carry, x)
    p64 = jax.tree_util.tree_map(_f64, p)
    new_carry, y = reference_step("elman_tanh" if name == "elman" else name, p64, carry, x, mm=_mm)
    return (cells.LSTMCarry(*new_carry) if isinstance(carry, cells.LSTMCarry) else new_carry), y


def _reference_run(name, p, carry, xs):
    """:func:`_reference_step` over ``xs [B, T, F]``: ``(final carry, ys [B, T, O])``."""
    ys = []
    for t in range(xs.shape[1]):
        carry, y = _reference_step(name, p, carry, xs[:, t])
        ys.append(y)
    return carry, np.stack(ys, 1)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_policy_step_casts_operands_and_keeps_float32_state(name):
    cell = FACTORIES[name](dtype=BF16)
    params = cell.init(jax.random.PRNGKey(0), F)
    carry = jax.tree_util.tree_map(lambda z: 0.5 * jax.random.normal(jax.random.PRNGKey(3), z.shape),
                                   cell.initial_carry(params, (B,)))
    x = _data(shape=(B, F))
    new_carry, y = cell.step(params, carry, cell.project(params, x))
    ref_carry, ref_y = _reference_step(name, params, carry, x)
    # the carry is float32 and equals the float64 evaluation of the rounded operands to float32 round-off
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-6, atol=2e-6), new_carry, ref_carry)
    assert y.dtype == BF16
    if name != "lru":  # y is the float32 state rounded once to bfloat16 (the LRU's is its readout)
        h = new_carry.h if isinstance(new_carry, cells.LSTMCarry) else new_carry
        np.testing.assert_array_equal(np.asarray(y, np.float64), bf16_round(h))
    np.testing.assert_allclose(np.asarray(y, np.float64), ref_y, rtol=2**-8, atol=1e-6)


def test_policy_matmul_accumulates_in_float32():
    # 4096 products of 1 + 2^-7 (exact in bfloat16): a bfloat16 accumulator would stop growing long before the end
    x = jnp.full((1, 4096), 1 + 2**-7, BF16)
    w = jnp.ones((4096, 1), jnp.float32)
    y = matmul(x, w, BF16)
    assert y.dtype == jnp.float32
    assert float(y[0, 0]) == 4096 * (1 + 2**-7)


def _reference_lstm64(params, xs):
    """The LSTM's outputs in float64 NumPy (test_cells' reference step), from the float32 master weights."""
    p, x = jax.tree_util.tree_map(_f64, params), _f64(xs)
    carry, ys = (np.zeros((*x.shape[:-2], p.w_hh.shape[0])),) * 2, []
    for t in range(x.shape[-2]):
        carry, y = ref_lstm(p, carry, x[..., t, :])
        ys.append(y)
    return np.stack(ys, -2)


def _states_and_outputs(cell, params, xs):
    """Every step's carried ``h`` (float32 under the policy, bfloat16 for bfloat16 parameters) and output ``y``,
    from the cell's own step in ``lax.scan`` (the XLA path, whichever backend ``unroll`` would pick)."""
    def body(carry, x):
        carry, y = cell.step(params, carry, cell.project(params, x))
        return carry, (carry.h, y)
    _, (hs, ys) = jax.lax.scan(body, cell.initial_carry(params, xs.shape[:1]), jnp.moveaxis(xs, 1, 0))
    return jnp.moveaxis(hs, 0, 1), jnp.moveaxis(ys, 0, 1)


def test_long_sequence_error_policy_against_all_bfloat16():
    """Issue 17's check over T = 2,000 steps (B=4, H=32, F=16, forget_bias=1), against float64 NumPy.

    Two measures (measured on the 2-core CPU of this project: 20x and 2.5x):
    - the error each path adds to its own inputs over the sequence (its carried states against the float64
      run of exactly the operands it multiplies: for the policy the bfloat16-rounded weights and inputs with
      float32 biases, for the all-bfloat16 path its bfloat16 parameters and inputs): the policy's is more
      than 10x smaller, since its cell state and carries do not drift;
    - the outputs against the float64 run of the float32 master weights and inputs: the policy's error is
      smaller, but only ~2.5x, because both paths share the bfloat16 rounding of the weights, the inputs and
      the outputs themselves, which the policy keeps by design (bfloat16 operands and outputs).
    """
    n_b, n_h, n_f, n_t = 4, 32, 16, 2000
    policy = cells.lstm(n_h, forget_bias=1.0, dtype=BF16)
    all_bf16 = cells.lstm(n_h, forget_bias=1.0, param_dtype=BF16)
    params = policy.init(jax.random.PRNGKey(0), n_f)
    params_bf16 = jax.tree_util.tree_map(lambda a: a.astype(BF16), params)
    xs = jax.random.normal(jax.random.PRNGKey(1), (n_b, n_t, n_f))

    def rounded(a):
        return jnp.asarray(a).astype(BF16).astype(jnp.float32)

    own_policy = params._replace(w_ih=rounded(params.w_ih), w_hh=rounded(params.w_hh))
    own_bf16 = jax.tree_util.tree_map(rounded, params)
    h_policy, y_policy = (np.asarray(a, np.float64) for a in jax.jit(partial(_states_and_outputs, policy))(params, xs))
    h_bf16, y_bf16 = (np.asarray(a, np.float64)
                      for a in jax.jit(partial(_states_and_outputs, all_bf16))(params_bf16, xs.astype(BF16)))
    drift_policy = np.sqrt(np.mean((h_policy - _reference_lstm64(own_policy, rounded(xs))) ** 2))
    drift_bf16 = np.sqrt(np.mean((h_bf16 - _reference_lstm64(own_bf16, rounded(xs))) ** 2))
    assert drift_bf16 > 10 * drift_policy, (drift_bf16, drift_policy)

    reference = _reference_lstm64(params, xs)
    err_policy = np.sqrt(np.mean((y_policy - reference) ** 2))
    err_bf16 = np.sqrt(np.mean((y_bf16 - reference) ** 2))
    assert err_bf16 > 1.5 * err_policy, (err_bf16, err_policy)


def _grads(cell, params, xs, cotangent, backward):
    def loss(p):
        _, ys = unroll(cell, p, xs, backward=backward, backend="xla")
        return jnp.sum(ys.astype(jnp.float32) * cotangent)
    return jax.jit(jax.grad(loss))(params)


def _relative(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.mark.parametrize("name", ["elman", "gru", "gru_cho", "lstm", "lstm_proj", "jordan"])
def test_policy_gradients_are_float32_and_close(name):
    f32, policy = FACTORIES[name](), FACTORIES[name](dtype=BF16)
    params = f32.init(jax.random.PRNGKey(0), F)
    xs = _data(shape=(B, 12, F))
    cotangent = jax.random.normal(jax.random.PRNGKey(2), (B, 12, f32.output_size))
    reference = _grads(f32, params, xs, cotangent, "autodiff")
    autodiff = _grads(policy, params, xs, cotangent, "autodiff")
    fused = _grads(policy, params, xs, cotangent, "fused")
    for g in (autodiff, fused):
        assert _leaf_dtypes(g) == {"float32"}
        jax.tree_util.tree_map(lambda a, b: _relative(a, b) < 2e-2 or pytest.fail(f"{_relative(a, b)}"), g, reference)
    # the fused backward pass keeps the policy: equal to autodiff of the policy's forward to bfloat16 tolerance
    jax.tree_util.tree_map(lambda a, b: _relative(a, b) < 1e-2 or pytest.fail(f"{_relative(a, b)}"), fused, autodiff)


def test_fused_backward_of_policy_with_lengths_and_reverse():
    f32, policy = cells.lstm(H), cells.lstm(H, dtype=BF16)
    params = f32.init(jax.random.PRNGKey(0), F)
    xs = _data(shape=(B, 9, F)).astype(BF16)
    lengths = jnp.array([9, 4, 1])

    def loss(p, cell, backward):
        c, ys = unroll(cell, p, xs, lengths=lengths, reverse=True, backward=backward, backend="xla")
        return jnp.sum(ys.astype(jnp.float32) ** 2) + jnp.sum(c.c ** 2)

    grad = jax.jit(jax.grad(loss), static_argnums=(1, 2))
    g_ad, g_fu, g_32 = grad(params, policy, "autodiff"), grad(params, policy, "fused"), grad(params, f32, "autodiff")
    for name, a, b, ref in zip(params._fields, g_fu, g_ad, g_32):
        if a is not None:
            assert a.dtype == jnp.float32
            assert _relative(a, b) < 1e-2 and _relative(a, ref) < 2e-2, name


def test_bidirectional_stack_passes_the_policy_through():
    def model(dtype):
        layer = L.bidirectional(cells.lstm(H, dtype=dtype), cells.gru(H, dtype=dtype))
        return L.stack([layer, L.bidirectional(cells.lstm(H, dtype=dtype))], residual=True, layer_norm=True,
                       dtype=dtype)

    f32, policy = model(None), model(BF16)
    params = f32.init(jax.random.PRNGKey(0), F)
    xs, lengths = _data(), jnp.array([T, 4, 2])
    c_ref, y_ref = f32.apply(params, xs, lengths=lengths)
    c, y = policy.apply(params, xs, lengths=lengths)
    assert y.dtype == BF16 and _leaf_dtypes(c) == {"float32"}
    np.testing.assert_allclose(np.asarray(y, np.float32), y_ref, atol=5e-2, rtol=0)
    np.testing.assert_array_equal(np.asarray(y[2, 2:]), 0)  # padded steps stay zero
    jax.tree_util.tree_map(partial(np.testing.assert_allclose, atol=3e-2, rtol=0), c, c_ref)


def test_dense_embedding_and_layer_norm_follow_the_policy():
    dense = L.dense(4, dtype=BF16)
    p = dense.init(jax.random.PRNGKey(0), F)
    x = _data(shape=(B, F))
    y = dense.apply(p, x)
    expected = bf16_round(bf16_round(x) @ bf16_round(p.w) + np.asarray(p.b, np.float64))
    assert y.dtype == BF16 and p.w.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y, np.float64), expected, rtol=2**-8, atol=1e-6)
    np.testing.assert_allclose(L.dense(4, dtype=None).apply(p, x), L.dense(4, dtype=jnp.float32).apply(p, x),
                               rtol=1e-6, atol=1e-6)

    table = L.embedding(10, 4).init(jax.random.PRNGKey(1))
    vectors = L.embedding(10, 4, dtype=BF16).apply(table, jnp.array([3, 7]))
    assert vectors.dtype == BF16
    np.testing.assert_array_equal(np.asarray(vectors, np.float64), bf16_round(table[jnp.array([3, 7])]))

    norm = L.layer_norm(dtype=BF16)
    x = 3.0 + _data(shape=(B, 8))
    y = norm.apply(norm.init(None, 8), x)
    xn = np.asarray(x, np.float64)
    expected = (xn - xn.mean(-1, keepdims=True)) / np.sqrt(xn.var(-1, keepdims=True) + 1e-5)
    assert y.dtype == BF16
    np.testing.assert_allclose(np.asarray(y, np.float64), expected, atol=2e-2)


def test_residual_block_follows_the_policy():
    f32 = L.residual_block(cells.mingru(H))
    policy = L.residual_block(cells.mingru(H, dtype=BF16), dtype=BF16)
    params = f32.init(jax.random.PRNGKey(0), H)
    xs = _data(shape=(B, T, H))
    _, y_ref = f32.apply(params, xs)
    c, y = policy.apply(params, xs)
    assert y.dtype == BF16 and c.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y, np.float32), y_ref, atol=5e-2, rtol=2e-2)


def _close_to_float32(policy_out, f32_out, atol):
    """The policy's model output against the float32 model's: within ``atol`` (~3x the difference measured on the
    2-core CPU), and not equal to it beyond float32 round-off (the policy reaches the model's products)."""
    diff = np.abs(np.asarray(policy_out, np.float64) - np.asarray(f32_out, np.float64)).max()
    assert 1e-5 < diff <= atol, diff


@pytest.mark.parametrize("block,atol", [(False, 2.5e-3), (True, 1.5e-2)])  # measured 8.2e-4, 4.9e-3
def test_language_model_dtype(block, atol):
    kw = {"cell": "mingru" if block else "lstm", "layers": 2, "hidden": 16, "block": block}
    f32 = models.language_model(11, **kw)
    policy = models.language_model(11, dtype=BF16, **kw)
    params = f32.init(jax.random.PRNGKey(0))
    ids = jax.random.randint(jax.random.PRNGKey(1), (2, 9), 0, 11)
    _, logits_ref = jax.jit(f32.apply)(params, ids)
    carry, logits = jax.jit(policy.apply)(params, ids)
    assert logits.dtype == jnp.float32 and _leaf_dtypes(carry) == {"float32"}
    _close_to_float32(logits, logits_ref, atol)
    step, carry = jax.jit(policy.step), policy.initial_carry(params, (2,))
    for t in range(ids.shape[1]):  # streaming == whole sequence, at every step
        carry, logits_t = step(params, carry, ids[:, t])
        np.testing.assert_allclose(logits_t, logits[:, t], atol=1e-5, rtol=1e-5)


def test_classifier_and_forecaster_dtype():
    xs, lengths = _data(shape=(B, T, 2)), jnp.array([T, 5, 3])
    f32 = models.classifier(4, input_size=2, hidden=8, bidirectional=True)
    policy = models.classifier(4, input_size=2, hidden=8, bidirectional=True, dtype=BF16)
    params = f32.init(jax.random.PRNGKey(0))
    logits = policy.apply(params, xs, lengths=lengths)
    assert logits.dtype == jnp.float32
    _close_to_float32(logits, f32.apply(params, xs, lengths=lengths), atol=2.2e-3)  # measured 7.4e-4

    f32 = models.forecaster(3, input_size=1, mode="autoregressive", hidden=8)
    policy = models.forecaster(3, input_size=1, mode="autoregressive", hidden=8, dtype=BF16)
    params = f32.init(jax.random.PRNGKey(0))
    window = _data(shape=(B, T, 1))
    out = policy.forecast(params, window)
    assert out.dtype == jnp.float32
    # measured 5.6e-4; consecutive horizon steps of the float32 forecast differ by up to 1.6e-2
    _close_to_float32(out, f32.forecast(params, window), atol=1.7e-3)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_seq2seq_dtype(cell):
    kw = {"cell": cell, "hidden": 8, "embed": 6}
    f32, policy = models.seq2seq(7, 9, **kw), models.seq2seq(7, 9, dtype=BF16, **kw)
    params = f32.init(jax.random.PRNGKey(0))
    src, src_lengths = jax.random.randint(jax.random.PRNGKey(1), (2, 5), 3, 7), jnp.array([5, 3])
    tgt_in, tgt_lengths = jax.random.randint(jax.random.PRNGKey(2), (2, 4), 3, 9).at[:, 0].set(1), jnp.array([4, 2])
    logits = jax.jit(policy.apply)(params, src, src_lengths, tgt_in, tgt_lengths)
    assert logits.dtype == jnp.float32
    # measured 3.3e-4 (lstm) and 5.8e-4 (gru)
    _close_to_float32(logits, f32.apply(params, src, src_lengths, tgt_in, tgt_lengths), atol=1.7e-3)
    carry, context = policy.start(params, src, src_lengths)
    assert _leaf_dtypes(carry.cell) == {"float32"}
    step = jax.jit(policy.step)
    for t in range(tgt_in.shape[1]):  # stepping == teacher forcing, at every step inside each target
        carry, logits_t = step(params, carry, tgt_in[:, t], context)
        valid = np.asarray(t < tgt_lengths)
        np.testing.assert_allclose(logits_t[valid], logits[valid, t], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bad", ["int32", jnp.int8, "not-a-dtype"])
def test_bad_dtype_is_refused(bad):
    for fn, make in (("rnnjax.cells.lstm", cells.lstm), ("rnnjax.layers.dense", L.dense)):
        with pytest.raises(ValueError) as err:
            make(4, dtype=bad)
        assert str(err.value) == (
            f"{fn}: expected dtype to be None or a floating dtype such as jnp.bfloat16, got {bad!r}. "
            "Fix: pass dtype=jnp.bfloat16 for bfloat16 matmuls with float32 state, or None.")
