"""The parallel (associative-scan) path of the linear cells against the
sequential scan and against streaming one step at a time, with every masking
option; gradients against finite differences; float32 accumulation; the
cells' documented initialisation; the residual block."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest

import rnnjax
from conftest import CELLS, LINEAR, assert_trees_close, random_carry, slow_unless
from rnnjax import cells, layers

F, T, B = 5, 13, 4
LENGTHS = jnp.array([T, 6, 0, 9])
RNG = np.random.default_rng(0)
XS = jnp.asarray(RNG.normal(size=(B, T, F)), jnp.float32)
MASK = jnp.asarray(RNG.random((B, T)) < 0.7)
RESETS = jnp.asarray(RNG.random((B, T)) < 0.15).at[:, 4].set(True)

OPTIONS = {
    "lengths-reverse": dict(lengths=LENGTHS, reverse=True),
    "mask-holes": dict(mask=MASK),
    "resets-lengths-reverse": dict(resets=RESETS, lengths=LENGTHS, reverse=True),
    "resets-mask": dict(resets=RESETS, mask=MASK),
}


# The batteries over the masking options run on a complex (lru) and a real (minlstm) linear form by default; the
# four linear cells share one scan, and every cell runs with -m slow.
@pytest.fixture(params=[slow_unless(name in ("lru", "minlstm"), name) for name in LINEAR])
def linear(request):
    cell = CELLS[request.param]()
    return cell, cell.init(jax.random.key(0), F)


def loss(cell, params, xs, carry, parallel, **kw):
    final, ys = rnnjax.unroll(cell, params, xs, carry=carry, parallel=parallel, **kw)
    weights = jnp.cos(jnp.arange(ys.size, dtype=ys.dtype)).reshape(ys.shape)
    return jnp.sum(ys * weights) + sum(jnp.sum(jnp.sin(leaf)) for leaf in jax.tree_util.tree_leaves(final))


def jitted(fn, cell, parallel, opts):
    """``fn(cell, params, xs, carry, parallel, **opts)`` jitted as ``(params, xs, carry) -> ...``: one compile,
    not op-by-op dispatch (``reverse`` static, the masks traced)."""
    static = {k: v for k, v in opts.items() if isinstance(v, bool)}
    arrays = {k: v for k, v in opts.items() if not isinstance(v, bool)}
    run = jax.jit(lambda p, x, c, a: fn(cell, p, x, c, parallel, **static, **a))
    return lambda p, x, c: run(p, x, c, arrays)


def unroll(cell, params, xs, carry, parallel, **kw):
    return rnnjax.unroll(cell, params, xs, carry=carry, parallel=parallel, **kw)


def value_and_grad(cell, params, xs, carry, parallel, **kw):
    return jax.value_and_grad(loss, argnums=(1, 2, 3))(cell, params, xs, carry, parallel, **kw)


@pytest.mark.parametrize("method,name", [
    slow_unless(name == "resets-lengths-reverse", "associative", name) for name in sorted(OPTIONS)] + [
    slow_unless(False, "loop", "resets-lengths-reverse"), ("loop", "resets-mask")])
def test_parallel_equals_sequential_values_and_gradients(linear, method, name):
    cell, params = linear
    carry = random_carry(cell, params, (B,))
    opts = OPTIONS[name]
    assert_trees_close(jitted(unroll, cell, method, opts)(params, XS, carry),
                       jitted(unroll, cell, False, opts)(params, XS, carry))
    value_p, grads_p = jitted(value_and_grad, cell, method, opts)(params, XS, carry)
    value_s, grads_s = jitted(value_and_grad, cell, False, opts)(params, XS, carry)
    np.testing.assert_allclose(value_p, value_s, rtol=1e-5)
    assert_trees_close(grads_p, grads_s, atol=2e-5)


@pytest.mark.parametrize("name", [slow_unless(name == "resets-lengths-reverse", name) for name in sorted(OPTIONS)])
def test_mlstm_chunkwise_equals_sequential_across_chunks(name):
    """parallel='chunkwise': 150 steps are two whole chunks of CHUNKWISE_STEPS and a remainder. In float64 the
    outputs, the final carry (its stabiliser included) and the gradients equal the step form's to 1e-9; in
    float32 the outputs and carry to 2e-5 (their gradients differ from float64 by ~1e-3 relative in both forms:
    float32 rounding, which the chunkwise form has less of)."""
    from rnnjax.linear_scan import CHUNKWISE_STEPS

    steps = 2 * CHUNKWISE_STEPS + 22
    rng = np.random.default_rng(3)
    cell = cells.mlstm(8, heads=2)
    params = cell.init(jax.random.key(3), F)
    xs = jnp.asarray(rng.normal(size=(B, steps, F)), jnp.float32)
    long = {"lengths": jnp.array([steps, 70, 0, CHUNKWISE_STEPS + 1]),
            "mask": jnp.asarray(rng.random((B, steps)) < 0.7),
            "resets": jnp.asarray(rng.random((B, steps)) < 0.02).at[:, CHUNKWISE_STEPS + 5].set(True)}
    opts = {k: long[k] if k in long else v for k, v in OPTIONS[name].items()}
    carry = random_carry(cell, params, (B,))
    assert_trees_close(jitted(unroll, cell, "chunkwise", opts)(params, xs, carry),
                       jitted(unroll, cell, False, opts)(params, xs, carry), atol=2e-5, rtol=2e-5)
    with jax.enable_x64(True):
        p64, x64, c64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), (params, xs, carry))
        assert_trees_close(jitted(value_and_grad, cell, "chunkwise", opts)(p64, x64, c64),
                           jitted(value_and_grad, cell, False, opts)(p64, x64, c64), atol=1e-9, rtol=1e-9)
        assert_trees_close(jitted(unroll, cell, "chunkwise", opts)(p64, x64, c64),
                           jitted(unroll, cell, False, opts)(p64, x64, c64), atol=1e-9, rtol=1e-9)


def _batch(flags, leaf):
    """``flags [B]`` shaped to broadcast over a carry leaf ``[B, ...]``."""
    return flags.reshape(flags.shape + (1,) * (leaf.ndim - 1))


def test_parallel_equals_streaming_with_resets_and_mask(linear):
    """rnnjax.step one step at a time, holding the carry by hand where the mask is False."""
    cell, params = linear
    carry = random_carry(cell, params, (B,))
    c_par, ys_par = rnnjax.unroll(cell, params, XS, carry=carry, resets=RESETS, mask=MASK, parallel=True)
    ys = []
    for t in range(T):
        new, y = rnnjax.step(cell, params, carry, XS[:, t], reset=RESETS[:, t])
        reset_carry = jax.tree_util.tree_map(
            lambda z, c: jnp.where(_batch(RESETS[:, t], c), z, c), cell.initial_carry(params, (B,)), carry)
        carry = jax.tree_util.tree_map(lambda n, c: jnp.where(_batch(MASK[:, t], c), n, c), new, reset_carry)
        ys.append(jnp.where(MASK[:, t, None], y, 0))
    assert_trees_close((c_par, ys_par), (carry, jnp.stack(ys, 1)))


def test_parallel_reverse_equals_flipped_unpadded(linear):
    cell, params = linear
    carry, ys = rnnjax.unroll(cell, params, XS, lengths=LENGTHS, reverse=True, parallel=True)
    for b, n in enumerate(np.asarray(LENGTHS)):
        if n == 0:
            assert_trees_close(carry[b], cell.initial_carry(params, ()))
            continue
        c_b, y_b = rnnjax.unroll(cell, params, XS[b, :n][::-1], parallel=False)
        assert_trees_close(carry[b], c_b)
        assert_trees_close(ys[b, :n], y_b[::-1])
        np.testing.assert_array_equal(np.asarray(ys[b, n:]), 0.0)


def test_parallel_two_batch_dims_time_major_and_vmap(linear):
    cell, params = linear
    xs = XS.reshape(2, 2, T, F)
    lengths = LENGTHS.reshape(2, 2)
    ref = rnnjax.unroll(cell, params, XS, lengths=LENGTHS, parallel=False)
    c2, y2 = rnnjax.unroll(cell, params, xs, lengths=lengths, parallel=True)
    assert_trees_close((jax.tree_util.tree_map(lambda a: a.reshape(B, *a.shape[2:]), c2), y2.reshape(B, T, -1)), ref)
    c_t, y_t = rnnjax.unroll(cell, params, jnp.swapaxes(XS, 0, 1), lengths=LENGTHS, time_major=True, parallel=True)
    assert_trees_close((c_t, jnp.swapaxes(y_t, 0, 1)), ref)
    one = lambda x, n: rnnjax.unroll(cell, params, x, lengths=n, parallel=True)  # noqa: E731
    assert_trees_close(jax.jit(jax.vmap(one))(XS, LENGTHS), ref)


@pytest.mark.parametrize("name,steps,chunk", [
    slow_unless(name == "resets-lengths-reverse", name, T, 4) for name in sorted(OPTIONS)] + [
    slow_unless(False, "resets-lengths-reverse", 12, 4), ("resets-mask", T, 1)])
def test_chunked_loop_form_equals_sequential(linear, monkeypatch, name, steps, chunk):
    """The loop form chunk by chunk (a remainder chunk at T = 13, none at T = 12, one step per chunk), each
    chunk's projection kept or recomputed in the backward pass as the cell's ``save_projection`` says:
    values and gradients equal the sequential scan's."""
    cell, params = linear
    monkeypatch.setattr(rnnjax.linear_scan, "loop_chunk", lambda T, step_bytes: chunk)
    carry = random_carry(cell, params, (B,))
    xs = XS[:, :steps]
    cut = {"lengths": lambda v: jnp.minimum(v, steps), "mask": lambda v: v[:, :steps],
           "resets": lambda v: v[:, :steps], "reverse": lambda v: v}
    opts = {k: cut[k](v) for k, v in OPTIONS[name].items()}
    assert_trees_close(jitted(unroll, cell, "loop", opts)(params, xs, carry),
                       jitted(unroll, cell, False, opts)(params, xs, carry))
    assert_trees_close(jitted(value_and_grad, cell, "loop", opts)(params, xs, carry),
                       jitted(value_and_grad, cell, False, opts)(params, xs, carry), atol=2e-5)


def test_loop_chunk_sizes():
    """Powers of two near LOOP_CHUNK_BYTES per chunk, a divisor of T when one is near, one chunk when short."""
    per_step = rnnjax.linear_scan.LOOP_CHUNK_BYTES // 256
    assert rnnjax.linear_scan.loop_chunk(16384, per_step) == 256
    assert rnnjax.linear_scan.loop_chunk(16384, per_step * 3) == 64
    assert rnnjax.linear_scan.loop_chunk(1000, per_step) == 250
    assert rnnjax.linear_scan.loop_chunk(1031, per_step) == 256  # prime: whole chunks and a remainder
    assert rnnjax.linear_scan.loop_chunk(511, per_step) == 511
    assert rnnjax.linear_scan.loop_chunk(5000, rnnjax.linear_scan.LOOP_CHUNK_BYTES * 10) == 8


@pytest.mark.parametrize("name,products", [("mingru", 3), ("minlstm", 4), ("rglru", 3)])
def test_loop_form_backward_runs_the_projection_once_where_it_is_saved(monkeypatch, name, products):
    """Counted in the compiled fwd+bwd of the chunked loop form: the projection ``x W`` forward, ``dx`` and
    ``dW`` (3 products of ``2 T B F G`` FLOPs each), plus the forward's recomputation where the cell does not
    keep the projection (minLSTM: ``save_projection=False``)."""
    from benchmarks.hlo import compiled_matmul_flops

    monkeypatch.setattr(rnnjax.linear_scan, "loop_chunk", lambda T, step_bytes: 8)
    steps, batch, features, hidden = 64, 2, 8, 16
    cell = getattr(cells, name)(hidden)
    params = cell.init(jax.random.key(0), features)
    xs = jax.random.normal(jax.random.key(1), (batch, steps, features))
    assert cell.linear.save_projection == (products == 3)

    def loss(p, x):
        return jnp.sum(rnnjax.unroll(cell, p, x, parallel="loop")[1])

    text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, xs).compile().as_text()
    gates = params.w.shape[1]
    assert compiled_matmul_flops(text) == products * 2 * steps * batch * features * gates


@pytest.mark.parametrize("name", [slow_unless(name in ("mingru", "minlstm"), name) for name in LINEAR])
def test_parallel_check_grads_float64(name):
    """Reverse-mode gradients of the parallel path (lengths, reverse, resets) against finite differences."""
    with jax.enable_x64(True):
        cell = CELLS[name]()
        params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), cell.init(jax.random.key(0), 3))
        xs = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 3)))
        lengths = jnp.array([5, 3])
        resets = jnp.zeros((2, 5), bool).at[0, 2].set(True)

        def f(p, x):
            carry, ys = rnnjax.unroll(cell, p, x, lengths=lengths, resets=resets, reverse=True, parallel=True)
            return jnp.sum(ys * jnp.arange(ys.size).reshape(ys.shape) / ys.size) + jnp.sum(jnp.sin(carry))

        jax.test_util.check_grads(f, (params, xs), order=1, modes=["rev"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", [slow_unless(name in ("lru", "minlstm"), name) for name in LINEAR])
def test_bfloat16_accumulates_in_float32(name):
    """bfloat16 parameters and inputs: the carry stays float32 on both paths, and the two paths agree to
    float32 round-off (each step is rounded to bfloat16 nowhere but in the input projection). Measured on the
    2-core CPU over 300 steps: carries (|c| up to 2.4) within 1.2e-7; outputs (|y| up to 5) equal but for one
    bfloat16 rounding that the float32 difference flips (one ulp, 2^-7 relative at most)."""
    cell = CELLS[name]()
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), cell.init(jax.random.key(0), F))
    xs = jnp.asarray(np.random.default_rng(1).normal(size=(2, 300, F)), jnp.bfloat16)
    c_p, y_p = rnnjax.unroll(cell, params, xs, parallel=True)
    c_s, y_s = rnnjax.unroll(cell, params, xs, parallel=False)
    assert c_p.dtype == c_s.dtype == jnp.float32 and y_p.dtype == y_s.dtype == jnp.bfloat16
    np.testing.assert_allclose(c_p, c_s, atol=1e-6, rtol=0)
    np.testing.assert_allclose(y_p.astype(jnp.float32), y_s.astype(jnp.float32), atol=0, rtol=2**-7)


def test_auto_picks_the_loop_form_for_long_sequences_on_cpu(monkeypatch):
    """parallel='auto' on CPU: the linear form with a loop from CPU_PARALLEL_MIN_T steps on, not under remat."""
    cell = cells.mingru(4)
    params = cell.init(jax.random.key(0), 3)
    methods = []
    real = rnnjax.linear_scan.linear_scan
    monkeypatch.setattr(rnnjax.linear_scan, "linear_scan", lambda a, b, r, m: methods.append(m) or real(a, b, r, m))
    n = rnnjax.linear_scan.CPU_PARALLEL_MIN_T
    rnnjax.unroll(cell, params, jnp.ones((2, n - 1, 3)))
    rnnjax.unroll(cell, params, jnp.ones((2, n, 3)), remat=4)
    assert methods == []
    rnnjax.unroll(cell, params, jnp.ones((2, n, 3)))
    rnnjax.unroll(cell, params, jnp.ones((2, n - 1, 3)), parallel=True)
    assert methods == ["loop", "associative"]


def _numpy_states(a, b, reverse):
    a = np.broadcast_to(a, b.shape)
    h, out = np.zeros_like(b[0]), np.zeros_like(b)
    for t in (range(len(b) - 1, -1, -1) if reverse else range(len(b))):
        h = a[t] * h + b[t]
        out[t] = h
    return out


@pytest.mark.parametrize("method", ["associative", "loop"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("kind", ["real", "complex", "real-constant", "complex-constant"])
def test_linear_scan_against_a_numpy_loop(method, reverse, kind):
    """States against a NumPy loop, gradients against finite differences (float64), for coefficients
    ``a`` given per step or once for all steps (``[S]``, the LRU's lambda), real and complex."""
    rng = np.random.default_rng(3)
    with jax.enable_x64(True):
        shape = (4,) if kind.endswith("constant") else (7, 3, 4)

        def draw(s):
            x = rng.uniform(-0.9, 0.9, size=s)
            return x + 1j * rng.uniform(-0.4, 0.4, size=s) if kind.startswith("complex") else x

        a, b = draw(shape), draw((7, 3, 4))
        np.testing.assert_allclose(rnnjax.linear_scan.linear_scan(jnp.asarray(a), jnp.asarray(b), reverse, method),
                                   _numpy_states(a, b, reverse), atol=1e-12)

        def f(a, b):
            h = rnnjax.linear_scan.linear_scan(a, b, reverse, method)
            w = jnp.cos(jnp.arange(h.size)).reshape(h.shape)
            return jnp.sum(jnp.abs(h * w) ** 2)

        jax.test_util.check_grads(f, (jnp.asarray(a), jnp.asarray(b)), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


def test_min_cell_coefficients_equal_the_log_space_form():
    """minGRU/minLSTM coefficients against the paper's log-space expressions (float64), and finite, normalised
    minLSTM gates where both sigmoids underflow."""
    from rnnjax.cells.minrnn import _mingru_coefficients, _minlstm_coefficients

    def log_g(x):
        return np.where(x >= 0, np.log(np.maximum(x, 0) + 0.5), -np.logaddexp(0, -x))

    def softplus(x):
        return np.logaddexp(0, x)

    k = np.random.default_rng(4).normal(scale=6, size=(3, 200))
    with jax.enable_x64(True):
        a, b = _mingru_coefficients(jnp.asarray(k[0]), jnp.asarray(k[1]))
        np.testing.assert_allclose(a, np.exp(-softplus(k[0])), rtol=1e-12)
        np.testing.assert_allclose(b, np.exp(-softplus(-k[0]) + log_g(k[1])), rtol=1e-12)
        a, b = _minlstm_coefficients(*(jnp.asarray(x) for x in k))
        diff = softplus(-k[0]) - softplus(-k[1])
        np.testing.assert_allclose(a, np.exp(-softplus(diff)), rtol=1e-12)
        np.testing.assert_allclose(b, np.exp(-softplus(-diff) + log_g(k[2])), rtol=1e-12)
    a, b = _minlstm_coefficients(jnp.array([-300.0, -200.0]), jnp.array([-301.0, 50.0]), jnp.array([1.0, 1.0]))
    np.testing.assert_allclose(a, [1 / (1 + np.exp(-1)), 0.0], rtol=1e-6)
    np.testing.assert_allclose(b, [1.5 / (1 + np.exp(1)), 1.5], rtol=1e-6)


def _ks_distance_from_uniform(samples, low, high):
    """The Kolmogorov-Smirnov distance of ``samples``' empirical CDF from the uniform CDF on ``[low, high]``."""
    u = np.sort((np.asarray(samples) - low) / (high - low))
    n = len(u)
    return max(np.max(np.arange(1, n + 1) / n - u), np.max(u - np.arange(n) / n))


def test_lru_ring_initialisation_and_gamma():
    """|lambda| uniform on the ring by area: |lambda|^2 uniform on [r_min^2, r_max^2], by the Kolmogorov-Smirnov
    distance of its 512 draws against the 1% critical value 1.63/sqrt(512) = 0.072 (measured 0.046). On the whole
    disc (r_min=0, r_max=1) a |lambda| uniform in radius would be 0.25 away; on the thin ring it is not told apart."""
    params = cells.lru(64, state_size=512, r_min=0.9, r_max=0.999, max_phase=np.pi / 10).init(jax.random.key(0), 3)
    modulus = np.exp(-np.exp(np.asarray(params.nu_log)))
    phase = np.exp(np.asarray(params.theta_log))
    assert modulus.min() >= 0.9 and modulus.max() <= 0.999 and modulus.min() < 0.91 and modulus.max() > 0.99
    assert phase.min() >= 0 and phase.max() <= np.pi / 10 and phase.max() > 0.95 * np.pi / 10
    assert _ks_distance_from_uniform(modulus**2, 0.9**2, 0.999**2) < 1.63 / np.sqrt(512)
    np.testing.assert_allclose(np.exp(np.asarray(params.gamma_log)), np.sqrt(1 - modulus**2), rtol=1e-4)
    disc = cells.lru(4, state_size=512).init(jax.random.key(0), 3)
    distance = _ks_distance_from_uniform(np.exp(-2 * np.exp(np.asarray(disc.nu_log, np.float64))), 0, 1)
    assert distance < 1.63 / np.sqrt(512), distance


def test_rglru_decay_initialised_on_its_ring():
    params = cells.rglru(512, min_rad=0.9, max_rad=0.999).init(jax.random.key(0), 3)
    a = np.exp(-np.log1p(np.exp(np.asarray(params.a_param, np.float64))))
    assert a.min() >= 0.9 - 1e-6 and a.max() <= 0.999 + 1e-6 and a.min() < 0.91 and a.max() > 0.99


def test_linear_cells_in_a_bidirectional_layer_equal_sequential():
    layer = layers.bidirectional(cells.lru(6, state_size=4))
    seq = layers.bidirectional(cells.lru(6, state_size=4), parallel=False)
    par = layers.bidirectional(cells.lru(6, state_size=4), parallel=True)
    params = layer.init(jax.random.key(0), F)
    assert_trees_close(par.apply(params, XS, lengths=LENGTHS), seq.apply(params, XS, lengths=LENGTHS))


def _rms(x, g):
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-6) * g


def test_residual_block_equals_manual_composition_and_streams():
    cell = cells.mingru(6)
    block = layers.residual_block(cell, mlp_expansion=2)
    params = block.init(jax.random.key(0), 6)
    xs = jnp.asarray(np.random.default_rng(3).normal(size=(B, T, 6)), jnp.float32)
    carry, ys = block.apply(params, xs, lengths=LENGTHS)
    c_ref, r = rnnjax.unroll(cell, params.cell, jnp.asarray(_rms(np.asarray(xs), params.norm_rnn)), lengths=LENGTHS)
    h = np.asarray(xs) + np.asarray(r)
    u = _rms(h, np.asarray(params.norm_mlp))
    want = h + (np.asarray(jax.nn.gelu(u @ params.w_gate)) * (u @ params.w_up)) @ np.asarray(params.w_down)
    want = np.where((np.arange(T)[None, :] < np.asarray(LENGTHS)[:, None])[..., None], want, 0)
    np.testing.assert_allclose(ys, want, atol=1e-5, rtol=1e-5)
    assert_trees_close(carry, c_ref)
    c, streamed = block.initial_carry(params, (B,)), []
    for t in range(T):
        c, y = block.step(params, c, xs[:, t])
        streamed.append(y)
    assert_trees_close(block.apply(params, xs), (c, jnp.stack(streamed, 1)))


def test_block_language_model_step_equals_apply():
    from rnnjax.models import language_model

    model = language_model(11, cell="lru", layers=2, hidden=8, block=True)
    params = model.init(jax.random.key(0))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 11, size=(2, 40)))
    _, logits = model.apply(params, ids)
    carry, steps = model.initial_carry(params, (2,)), []
    for t in range(ids.shape[1]):
        carry, lt = model.step(params, carry, ids[:, t])
        steps.append(lt)
    np.testing.assert_allclose(jnp.stack(steps, 1), logits, atol=1e-5, rtol=1e-5)


ERRORS = [
    (lambda: rnnjax.unroll(cells.lstm(4), cells.lstm(4).init(jax.random.key(0), 3), jnp.ones((2, 5, 3)),
                           parallel=True),
     "rnnjax.unroll: parallel=True is not available here: the cell 'lstm' has no linear form (its recurrence is "
     "not linear in the carry). Fix: pass parallel='auto' or False."),
    (lambda: rnnjax.unroll(cells.mingru(4), cells.mingru(4).init(jax.random.key(0), 3), jnp.ones((2, 5, 3)),
                           parallel=True, remat=2),
     "rnnjax.unroll: parallel=True is not available here: remat applies to the sequential scan only. "
     "Fix: pass parallel='auto' or False."),
    (lambda: rnnjax.unroll(cells.mingru(4), cells.mingru(4).init(jax.random.key(0), 3), jnp.ones((2, 5, 3)),
                           parallel="yes"),
     "rnnjax.unroll: parallel must be one of True, False, 'auto', 'associative', 'loop' or 'chunkwise', got "
     "'yes'. Fix: pass one of those."),
    (lambda: rnnjax.unroll(cells.mingru(4), cells.mingru(4).init(jax.random.key(0), 3), jnp.ones((2, 5, 3)),
                           parallel="chunkwise"),
     "rnnjax.unroll: parallel='chunkwise' is not available here: the cell 'mingru' has no chunkwise form (the "
     "mLSTM has one; 'associative' and 'loop' run every linear cell). Fix: pass parallel='auto' or False."),
    (lambda: cells.lru(4, r_min=0.9, r_max=0.5),
     "rnnjax.cells.lru: expected 0 <= r_min < r_max <= 1, got r_min=0.9, r_max=0.5. Fix: pass a ring inside the "
     "unit circle, e.g. r_min=0.9, r_max=0.999."),
    (lambda: cells.rglru(4, min_rad=0.0),
     "rnnjax.cells.rglru: expected 0 < min_rad < max_rad < 1, got min_rad=0.0, max_rad=0.999. Fix: pass e.g. "
     "min_rad=0.9, max_rad=0.999."),
    (lambda: layers.residual_block(cells.mingru(4)).init(jax.random.key(0), 3),
     "rnnjax.layers.residual_block: the block adds its input to the output of cell 'mingru', so input_size must "
     "equal the cell's output size 4, got 3. Fix: build the cell with hidden_size=3, or project the inputs to 4 "
     "features first."),
]


@pytest.mark.parametrize("case", range(len(ERRORS)))
def test_error_message(case):
    make, message = ERRORS[case]
    with pytest.raises(ValueError, match=re.escape(message) + "$"):
        make()
