"""xLSTM's sLSTM and mLSTM and Mamba's S6 against loops written from the papers' equations: the
unstabilised equations in float64 (values and gradients), the stabilised steps (tests/test_cells.py
runs them from random carries) and over 10,000 steps of large inputs; the Mamba block
against its equations and against streaming; the native backend leaves them to XLA."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rnnjax
from conftest import assert_trees_close, slow_unless
from rnnjax import backend, cells, layers
from rnnjax.models import language_model

RNG = np.random.default_rng(0)


def sig(x, xp=np):
    return 1 / (1 + xp.exp(-x))


def dense_recurrent(r, xp=np):
    """The sLSTM's block-diagonal ``r [K, d, 4, d]`` as a dense ``[K*d, 4*K*d]`` matrix, zero off the diagonal."""
    K, d = r.shape[:2]
    zero = xp.zeros((d, d), r.dtype)
    return xp.concatenate([xp.concatenate([r[k, :, g] if j == k else zero for g in range(4) for j in range(K)], 1)
                           for k in range(K)], 0)


# The stabilised steps of the papers' appendices, in NumPy float64 (used by tests/test_cells.py).

def step_slstm(p, carry, x):
    h, c, n, m = carry
    H = h.shape[-1]
    z = x @ p.w + p.b + h @ dense_recurrent(p.r)
    i, f, zz, o = (z[:, g * H:(g + 1) * H] for g in range(4))
    log_f = -np.logaddexp(0.0, -f)  # log sigmoid(f), without overflow at f in the -hundreds
    m_new = np.where(n == 0, i, np.maximum(log_f + m, i))  # xLSTM's code: m = i~ at the first step
    f_s = np.where(n == 0, 0.0, np.exp(log_f + m - m_new))
    c = f_s * c + np.exp(i - m_new) * np.tanh(zz)
    n = f_s * n + np.exp(i - m_new)
    h = sig(o) * c / n
    return (h, c, n, m_new), h


def _mlstm_parts(p, x, K):
    H = (p.w.shape[1] - 2 * K) // 4
    d = H // K
    z = x @ p.w + p.b
    q, k, v, o = (z[:, j * H:(j + 1) * H].reshape(-1, K, d) for j in range(4))
    return q, k / math.sqrt(d), v, o, z[:, 4 * H:4 * H + K], z[:, 4 * H + K:]


def step_mlstm(p, carry, x):
    C, n, m = carry
    q, k, v, o, i, f = _mlstm_parts(p, x, m.shape[-1])
    log_f = -np.logaddexp(0.0, -f)  # log sigmoid(f), without overflow at f in the -hundreds
    m_new = np.maximum(log_f + m, i)
    f_s, i_s = np.exp(log_f + m - m_new), np.exp(i - m_new)
    C = f_s[..., None, None] * C + i_s[..., None, None] * v[..., :, None] * k[..., None, :]
    n = f_s[..., None] * n + i_s[..., None] * k
    den = np.maximum(np.abs(np.sum(n * q, -1)), np.exp(-m_new))
    h = sig(o) * np.einsum("bkvd,bkd->bkv", C, q) / den[..., None]
    return (C, n, m_new), h.reshape(h.shape[0], -1)


def step_mamba(p, h, x, xp=np):
    H, N = p.a_log.shape
    R = p.w_dt.shape[0]
    u = x if p.w_in is None else x @ p.w_in
    proj = u @ p.w_x
    delta = xp.log1p(xp.exp(proj[:, :R] @ p.w_dt + p.b_dt))
    b, c = proj[:, R:R + N], proj[:, R + N:]
    h = xp.exp(delta[..., None] * -xp.exp(p.a_log)) * h.reshape(-1, H, N) + (delta * u)[..., None] * b[:, None, :]
    return h.reshape(-1, H * N), xp.einsum("bhn,bn->bh", h, c) + p.d * u


# The unstabilised equations (the papers' main text) as plain jax.numpy loops, run in float64.

def unstable_slstm(p, xs):
    B, H = xs.shape[0], p.w.shape[1] // 4
    h = c = n = jnp.zeros((B, H))
    ys = []
    for t in range(xs.shape[1]):
        z = xs[:, t] @ p.w + p.b + h @ dense_recurrent(p.r, jnp)
        i, f, zz, o = (z[:, g * H:(g + 1) * H] for g in range(4))
        c = sig(f, jnp) * c + jnp.exp(i) * jnp.tanh(zz)
        n = sig(f, jnp) * n + jnp.exp(i)
        h = sig(o, jnp) * c / n
        ys.append(h)
    return jnp.stack(ys, 1)


def unstable_mlstm(p, xs, K):
    B, H = xs.shape[0], (p.w.shape[1] - 2 * K) // 4
    C, n = jnp.zeros((B, K, H // K, H // K)), jnp.zeros((B, K, H // K))
    ys = []
    for t in range(xs.shape[1]):
        q, k, v, o, i, f = _mlstm_parts(p, xs[:, t], K)
        C = sig(f, jnp)[..., None, None] * C + jnp.exp(i)[..., None, None] * jnp.einsum("bkv,bkd->bkvd", v, k)
        n = sig(f, jnp)[..., None] * n + jnp.exp(i)[..., None] * k
        h = sig(o, jnp) * jnp.einsum("bkvd,bkd->bkv", C, q) / jnp.maximum(jnp.abs(jnp.sum(n * q, -1)), 1)[..., None]
        ys.append(h.reshape(B, H))
    return jnp.stack(ys, 1)


def unstable_mamba(p, xs):
    h = jnp.zeros((xs.shape[0], p.a_log.size))
    ys = []
    for t in range(xs.shape[1]):
        h, y = step_mamba(p, h, xs[:, t], jnp)
        ys.append(y)
    return jnp.stack(ys, 1)


F, T, B = 3, 6, 2
CASES = {
    "slstm": (lambda: cells.slstm(6, heads=2), unstable_slstm),
    "slstm-1head": (lambda: cells.slstm(4, heads=1), unstable_slstm),
    "mlstm": (lambda: cells.mlstm(6, heads=2), functools.partial(unstable_mlstm, K=2)),
    "mamba": (lambda: cells.mamba(4, state_size=3), unstable_mamba),
    "mamba-square": (lambda: cells.mamba(F, state_size=2, dt_rank=2), unstable_mamba),
}


def _weighted(ys):
    return jnp.sum(ys * jnp.cos(jnp.arange(ys.size, dtype=ys.dtype)).reshape(ys.shape))


@pytest.mark.parametrize("parallel", [False, "associative"])  # the loop form: tests/test_linear_cells.py
@pytest.mark.parametrize("name", [slow_unless("-" not in name, name) for name in sorted(CASES)])  # variants: slow
def test_values_and_gradients_equal_the_unstabilised_equations_in_float64(name, parallel):
    make, reference = CASES[name]
    cell = make()
    if parallel and cell.linear is None:
        pytest.skip("a cell without a linear form runs sequentially")
    params = cell.init(jax.random.key(1), F)
    rng = np.random.default_rng(0)  # its own draws: the module's RNG depends on which tests ran before, per worker
    params = params._replace(b=params.b + 0.5 * rng.normal(size=params.b.shape)) if hasattr(params, "b") else params
    xs = jnp.asarray(rng.normal(size=(B, T, F)), jnp.float32)
    with jax.enable_x64(True):
        p64, x64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), (params, xs))
        want, want_grads = jax.jit(jax.value_and_grad(lambda p, x: _weighted(reference(p, x)), (0, 1)))(p64, x64)
        want_ys = np.asarray(jax.jit(reference)(p64, x64))
    ys = jax.jit(lambda p, x: rnnjax.unroll(cell, p, x, parallel=parallel)[1])(params, xs)
    np.testing.assert_allclose(np.asarray(ys), want_ys, atol=1e-5, rtol=1e-5)
    got, grads = jax.jit(jax.value_and_grad(lambda p, x: _weighted(rnnjax.unroll(cell, p, x, parallel=parallel)[1]),
                                            (0, 1)))(params, xs)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)  # a weighted sum with cancellation: atol as below
    assert_trees_close(grads, want_grads, atol=1e-5, rtol=1e-5)


def test_mlstm_chunkwise_equals_the_unstabilised_equations_in_float64():
    """parallel='chunkwise' (the mLSTM's [C, C] form) against the same float64 reference."""
    test_values_and_gradients_equal_the_unstabilised_equations_in_float64("mlstm", "chunkwise")


def _stabilised_loop(name, cell, params, xs):
    """ys of the papers' stabilised steps (above) in NumPy float64, one step at a time from the cell's zero carry."""
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    carry = tuple(np.asarray(a, np.float64) for a in cell.initial_carry(params, (1,)))
    step = {"slstm": step_slstm, "mlstm": step_mlstm}[name]
    ys = []
    with np.errstate(over="ignore"):  # exp(-m) at m in the -hundreds: inf, so h = 0 as the limit is
        for x in np.asarray(xs, np.float64):
            carry, y = step(p, carry, x[None])
            ys.append(y[0])
    return np.stack(ys)


@pytest.mark.parametrize("name,parallel,steps", [("slstm", False, 10_000),
                                                 pytest.param("mlstm", False, 10_000, marks=pytest.mark.slow),
                                                 ("mlstm", "associative", 1_000), ("mlstm", "chunkwise", 1_000)])
def test_ten_thousand_steps_of_large_inputs_equal_the_stabilised_steps(name, parallel, steps):
    """Gate pre-activations in the hundreds, both signs: exp(i~) alone would overflow float32 at 89. The outputs
    equal the stabilised steps' in float64 (the unstabilised equations overflow float64 too); the gradients are
    finite (their values: tests/test_linear_cells.py and the float64 test above, at small inputs)."""
    cell = getattr(cells, name)(4, heads=2)
    params = cell.init(jax.random.key(0), 2)
    xs = jnp.asarray(np.random.default_rng(1).normal(size=(steps, 2)) * 300, jnp.float32)
    if parallel:
        carry, ys = rnnjax.unroll(cell, params, xs, parallel=parallel)
        leaves = (carry, ys)
    else:
        def loss(p, x):  # parallel=False: "auto" would run the mLSTM's chunkwise form
            carry, ys = rnnjax.unroll(cell, p, x, parallel=False)
            return jnp.mean(ys), (carry, ys)

        (value, (carry, ys)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, xs)
        leaves = (value, carry, ys, grads)
    for leaf in jax.tree_util.tree_leaves(leaves):
        assert bool(jnp.all(jnp.isfinite(leaf)))
    want = _stabilised_loop(name, cell, params, xs)
    np.testing.assert_allclose(np.asarray(ys), want, atol=2e-4, rtol=1e-3)
    assert np.max(np.abs(want)) > 0.1  # the outputs stay alive, not flushed to zero


def test_slstm_heads_equal_a_dense_recurrence_with_zero_off_diagonal_blocks():
    """heads=2 against a heads=1 cell whose dense [H, 4H] recurrent block is the block-diagonal matrix."""
    multi, dense = cells.slstm(6, heads=2), cells.slstm(6, heads=1)
    p = multi.init(jax.random.key(0), F)
    p1 = p._replace(r=jnp.asarray(dense_recurrent(np.asarray(p.r)).reshape(1, 6, 4, 6)))
    xs = jnp.asarray(RNG.normal(size=(B, T, F)), jnp.float32)
    assert_trees_close(rnnjax.unroll(multi, p, xs), rnnjax.unroll(dense, p1, xs))


def test_native_backend_leaves_the_new_cells_to_xla():
    for cell in (cells.slstm(4, heads=2), cells.mlstm(4, heads=2), cells.mamba(4)):
        params = cell.init(jax.random.key(0), 3)
        why = f"the cell '{cell.name}' has no native kernel (the kernels run lstm, gru and elman)"
        assert backend.describe(cell) == f"xla (native cannot run it: {why})"
        with pytest.raises(ValueError) as e:
            rnnjax.unroll(cell, params, jnp.ones((1, 2, 3)), backend="native")
        assert str(e.value) == (f"rnnjax.unroll: backend='native' cannot run this call: {why}. Fix: pass "
                                "backend='auto' (which falls back to XLA) or 'xla'.")


def test_initialisation_follows_the_papers():
    p = cells.mamba(4, state_size=3, dt_min=0.01, dt_max=0.05).init(jax.random.key(0), 4)
    assert p.w_in is None
    np.testing.assert_allclose(np.exp(p.a_log), np.tile([1.0, 2.0, 3.0], (4, 1)), rtol=1e-6)  # S4D-real
    dt = np.log1p(np.exp(np.asarray(p.b_dt)))
    assert 0.01 - 1e-6 <= dt.min() and dt.max() <= 0.05 + 1e-6
    np.testing.assert_array_equal(p.d, 1.0)
    m = cells.mlstm(8, heads=4).init(jax.random.key(0), 3)
    np.testing.assert_allclose(m.b[-4:], [3, 4, 5, 6])  # the forget gates' biases
    s = cells.slstm(8, heads=2).init(jax.random.key(0), 3)
    np.testing.assert_allclose(s.b[8:16], [3, 3, 3, 3, 6, 6, 6, 6])


# The Mamba block.

D, E, K_CONV = 4, 6, 4


def _block_reference(p, xs, cell_step, carry):
    """Mamba's block, step by step in NumPy float64: RMS norm, in-projection, causal depthwise conv (kernel 4),
    SiLU, the SSM, the SiLU(z) gate, out-projection, residual."""
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), p)
    window, h = (np.asarray(c, np.float64) for c in carry)
    ys = []
    for t in range(xs.shape[1]):
        x = np.asarray(xs[:, t], np.float64)
        normed = x / np.sqrt(np.mean(x**2, -1, keepdims=True) + 1e-6) * p.norm
        u, z = np.split(normed @ p.w_in, 2, axis=-1)
        window = np.concatenate([window, u[:, None]], 1)
        conv = np.einsum("bke,ke->be", window, p.conv_w) + p.conv_b
        window = window[:, 1:]
        h, y = cell_step(p.cell, h, conv * sig(conv))
        ys.append(x + (y * z * sig(z)) @ p.w_out)
    return np.stack(ys, 1), (window, h)


def _block():
    block = layers.mamba_block(cells.mamba(E, state_size=3), features=D)
    params = block.init(jax.random.key(3), D)
    return block, params._replace(conv_b=params.conv_b + 0.3)


def test_mamba_block_equals_its_equations_from_a_carry():
    block, params = _block()
    xs = jnp.asarray(RNG.normal(size=(B, T, D)), jnp.float32)
    carry = (jnp.asarray(RNG.normal(size=(B, K_CONV - 1, E)), jnp.float32),
             jnp.asarray(RNG.normal(size=(B, E * 3)), jnp.float32))
    want, want_carry = _block_reference(params, xs, step_mamba, carry)
    got_carry, got = block.apply(params, xs, carry=carry)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    assert_trees_close(got_carry, want_carry)


@pytest.mark.parametrize("options", ["lengths", "mask-resets"])
def test_mamba_block_streams_like_the_whole_sequence(options):
    """rnnjax.step-style streaming (the block's step, holding the carry where the mask is False) equals apply,
    with the conv state carried in and out, resets mid-sequence and (with a mask) holes in the sequence."""
    block, params = _block()
    steps = 9
    xs = jnp.asarray(RNG.normal(size=(3, steps, D)), jnp.float32)
    if options == "lengths":
        lengths = jnp.array([steps, 5, 0])
        mask, resets, kw = jnp.arange(steps) < lengths[:, None], jnp.zeros((3, steps), bool), dict(lengths=lengths)
    else:
        mask = jnp.asarray(RNG.random((3, steps)) < 0.6).at[:, 0].set(False)
        resets = jnp.zeros((3, steps), bool).at[0, 3].set(True).at[1, 0].set(True).at[2, 7].set(True)
        kw = dict(mask=mask, resets=resets)
    carry = jax.tree_util.tree_map(lambda a: jnp.asarray(RNG.normal(size=a.shape), a.dtype),
                                   block.initial_carry(params, (3,)))
    got_carry, got = block.apply(params, xs, carry=carry, **kw)
    ys = []
    for t in range(steps):
        new, y = block.step(params, carry, xs[:, t], reset=resets[:, t])
        reset = jax.tree_util.tree_map(lambda z, c: jnp.where(resets[:, t].reshape(-1, *[1] * (c.ndim - 1)), z, c),
                                       block.initial_carry(params, (3,)), carry)
        carry = jax.tree_util.tree_map(lambda n, c: jnp.where(mask[:, t].reshape(-1, *[1] * (c.ndim - 1)), n, c),
                                       new, reset)
        ys.append(jnp.where(mask[:, t, None], y, 0))
    assert_trees_close((got_carry, got), (carry, jnp.stack(ys, 1)))


def test_mamba_language_model_generates_like_apply():
    model = language_model(11, cell="mamba", layers=2, hidden=8, cell_options={"state_size": 4})
    params = model.init(jax.random.key(0))
    ids = jnp.asarray(RNG.integers(0, 11, size=(2, 7)))
    carry, logits = model.apply(params, ids, resets=jnp.zeros((2, 7), bool).at[1, 4].set(True))
    c = model.initial_carry(params, (2,))
    for t in range(7):
        c, step_logits = model.step(params, c, ids[:, t]) if (t != 4) else model.step(
            params, jax.tree_util.tree_map(lambda z, v: v.at[1].set(z[1]), model.initial_carry(params, (2,)), c),
            ids[:, t])
        np.testing.assert_allclose(step_logits, logits[:, t], atol=1e-5, rtol=1e-5)
    assert_trees_close(c, carry)
    assert model.name == "mamba-2x8+block"


ERRORS = [
    (lambda: cells.slstm(6, heads=4),
     "rnnjax.cells.slstm: hidden_size=6 must be a multiple of heads=4 (each head has hidden_size / heads units). "
     "Fix: pass heads dividing 6, e.g. heads=1."),
    (lambda: cells.mlstm(8, heads=0),
     "rnnjax.cells.mlstm: expected heads to be an integer >= 1, got 0. Fix: pass a whole number such as heads=1."),
    (lambda: cells.mamba(8, dt_min=0.1, dt_max=0.01),
     "rnnjax.cells.mamba: expected 0 < dt_min < dt_max, got dt_min=0.1, dt_max=0.01. Fix: pass e.g. dt_min=0.001, "
     "dt_max=0.1 (Mamba's)."),
    (lambda: layers.mamba_block(cells.mamba(8), features=4).init(jax.random.key(0), 5),
     "rnnjax.layers.mamba_block: the block adds its input to its output, so input_size must equal features=4, "
     "got 5. Fix: build the block with features=5, or project the inputs to 4 features first."),
    (lambda: layers.mamba_block(cells.mamba(8), features=4, conv_kernel=0),
     "rnnjax.layers.mamba_block: expected conv_kernel to be an integer >= 1, got 0. Fix: pass a whole number such "
     "as conv_kernel=4."),
]


@pytest.mark.parametrize("case", range(len(ERRORS)))
def test_error_message(case):
    build, message = ERRORS[case]
    with pytest.raises(ValueError) as info:
        build()
    assert str(info.value) == message
