"""Each cell's step against an independent NumPy implementation of its
equations, plus the initialisers' documented properties."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_xlstm_mamba import step_mamba, step_mlstm, step_slstm

import rnnjax
from conftest import B, H, T, assert_trees_close, random_carry, random_inputs
from rnnjax import cells


def sig(x):
    return 1.0 / (1.0 + np.exp(-x))


def ln(x, gain, shift, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(x.var(-1, keepdims=True) + eps) * gain + shift


def np_params(params):
    return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)


# The references take the matrix product ``mm`` as a parameter: float64 ``@`` here, bfloat16-rounded operands in
# tests/test_precision.py (the mixed-precision policy).
def ref_elman(p, h, x, act, mm=np.matmul):
    return act(mm(x, p.w_ih) + p.b_ih + mm(h, p.w_hh) + p.b_hh)


def ref_lstm(p, carry, x, mm=np.matmul):
    h, c = carry
    b_ih = 0 if p.b_ih is None else p.b_ih
    b_hh = 0 if p.b_hh is None else p.b_hh
    i, f, g, o = np.split(mm(x, p.w_ih) + b_ih + mm(h, p.w_hh) + b_hh, 4, -1)
    if p.w_peep is not None:
        i, f = i + c * p.w_peep[0], f + c * p.w_peep[1]
    c = sig(f) * c + sig(i) * np.tanh(g)
    if p.w_peep is not None:
        o = o + c * p.w_peep[2]
    h = sig(o) * np.tanh(c)
    if p.w_hr is not None:
        h = mm(h, p.w_hr)
    return (h, c), h


def ref_gru(p, h, x, reset_after, mm=np.matmul):
    W, U, n = p.w_ih, p.w_hh, p.w_hh.shape[0]
    gx = mm(x, W) + p.b_ih
    r = sig(gx[:, :n] + mm(h, U[:, :n]) + p.b_hh[:n])
    z = sig(gx[:, n:2 * n] + mm(h, U[:, n:2 * n]) + p.b_hh[n:2 * n])
    if reset_after:
        n_gate = np.tanh(gx[:, 2 * n:] + r * (mm(h, U[:, 2 * n:]) + p.b_hh[2 * n:]))
    else:
        n_gate = np.tanh(gx[:, 2 * n:] + mm(r * h, U[:, 2 * n:]) + p.b_hh[2 * n:])
    return (1 - z) * n_gate + z * h


def ref_mgu(p, h, x):
    """Zhou et al. (2016) as Flax's MGUCell computes it (gate order f, n)."""
    gx, gh = x @ p.w_ih + p.b_ih, h @ p.w_hh + p.b_hh
    f = sig(gx[:, :H] + gh[:, :H])
    n = np.tanh(gx[:, H:] + f * gh[:, H:])
    return (1 - f) * n + f * h


def _ln_gates(z, gain_shift):
    """Layer norm of each gate's block of ``z`` with that gate's gain and shift (``gain_shift [2, gates, H]``)."""
    blocks = np.split(z, gain_shift.shape[1], -1)
    return [ln(blk, gain_shift[0, k], gain_shift[1, k]) for k, blk in enumerate(blocks)]


def ref_ln_lstm(p, carry, x, mm=np.matmul):
    h, c = carry
    z = [a + b for a, b in zip(_ln_gates(mm(x, p.w_ih), p.ln_x), _ln_gates(mm(h, p.w_hh), p.ln_h))]
    c = sig(z[1]) * c + sig(z[0]) * np.tanh(z[2])
    h = sig(z[3]) * np.tanh(ln(c, p.ln_c[0], p.ln_c[1]))
    return (h, c), h


def ref_ln_gru(p, h, x, mm=np.matmul):
    ga, gb = _ln_gates(mm(x, p.w_ih), p.ln_x), _ln_gates(mm(h, p.w_hh), p.ln_h)
    r, z = sig(ga[0] + gb[0]), sig(ga[1] + gb[1])
    n = np.tanh(ga[2] + r * gb[2])
    return (1 - z) * n + z * h


def ref_jordan(p, y, x, mm=np.matmul):
    h = np.tanh(mm(x, p.w_ih) + p.b_h + mm(y, p.w_yh))
    return np.tanh(mm(h, p.w_hy) + p.b_y)


def g(x):
    return np.where(x >= 0, np.maximum(x, 0) + 0.5, sig(x))


def ref_lru(p, carry, x):
    n = p.nu_log.shape[0]
    lam = np.exp(-np.exp(p.nu_log) + 1j * np.exp(p.theta_log))
    h = carry[:, :n] + 1j * carry[:, n:]
    h = lam * h + np.exp(p.gamma_log) * (x @ (p.b_re + 1j * p.b_im))
    y = (h @ (p.c_re + 1j * p.c_im)).real + x @ p.d
    return np.concatenate([h.real, h.imag], axis=1), y


def ref_mingru(p, h, x, mm=np.matmul):
    k_z, k_h = np.split(mm(x, p.w) + p.b, 2, -1)
    z = sig(k_z)
    return (1 - z) * h + z * g(k_h)


def ref_minlstm(p, h, x, mm=np.matmul):
    f, i, k_h = np.split(mm(x, p.w) + p.b, 3, -1)
    f, i = sig(f), sig(i)
    return f / (f + i) * h + i / (f + i) * g(k_h)


def ref_rglru(p, h, x, c=8.0, mm=np.matmul):
    k_r, k_i, v = np.split(mm(x, p.w) + p.b, 3, -1)
    a = np.exp(-np.log1p(np.exp(p.a_param))) ** (c * sig(k_r))
    return a * h + np.sqrt(1 - a**2) * sig(k_i) * v


def reference_step(name, p, carry, x, mm=np.matmul):
    """(carry, y) of one step of the named cell configuration, in NumPy float64 (products by ``mm``; the LRU and
    the xLSTM and Mamba cells, which tests/test_precision.py does not take from here, by ``@``)."""
    if name.startswith("elman"):
        h = ref_elman(p, carry, x, np.tanh if name == "elman_tanh" else lambda v: np.maximum(v, 0), mm)
        return h, h
    if name == "jordan":
        y = ref_jordan(p, carry, x, mm)
        return y, y
    if name.startswith("lstm"):
        return ref_lstm(p, carry, x, mm)
    if name.startswith("gru"):
        h = ref_gru(p, carry, x, reset_after=name == "gru", mm=mm)
        return h, h
    if name == "layer_norm_lstm":
        return ref_ln_lstm(p, carry, x, mm)
    if name == "lru":
        return ref_lru(p, carry, x)
    if name in ("slstm", "mlstm", "mamba"):  # the stabilised steps of the xLSTM paper; Mamba's S6
        return {"slstm": step_slstm, "mlstm": step_mlstm, "mamba": step_mamba}[name](p, carry, x)
    if name in ("mingru", "minlstm", "rglru"):
        h = {"mingru": ref_mingru, "minlstm": ref_minlstm, "rglru": ref_rglru}[name](p, carry, x, mm=mm)
        return h, h
    h = ref_ln_gru(p, carry, x, mm)
    return h, h


def test_unroll_equals_numpy_reference(cell_name, cell, params):
    xs = random_inputs()
    carry0 = random_carry(cell, params, (B,))
    carry, ys = rnnjax.unroll(cell, params, xs, carry=carry0)
    p = np_params(params)
    c = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), carry0)
    c = tuple(c) if isinstance(c, tuple) else c
    x = np.asarray(xs, np.float64)
    for t in range(T):
        c, y = reference_step(cell_name, p, c, x[:, t])
        np.testing.assert_allclose(np.asarray(ys[:, t]), y, atol=1e-5, rtol=1e-5)
    for got, want in zip(jax.tree_util.tree_leaves(carry), jax.tree_util.tree_leaves(c)):
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)


def test_unbatched_input_equals_batch_of_one(cell, params):
    xs = random_inputs()
    c1, y1 = rnnjax.unroll(cell, params, xs[0])
    cb, yb = rnnjax.unroll(cell, params, xs[:1])
    np.testing.assert_allclose(y1, yb[0], atol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(c1), jax.tree_util.tree_leaves(cb)):
        np.testing.assert_allclose(a, b[0], atol=1e-6)


def test_params_hold_no_keys_and_are_namedtuples(cell, params):
    assert hasattr(params, "_fields")
    for leaf in jax.tree_util.tree_leaves(params):
        assert not jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def test_torch_uniform_initialiser_bound():
    params = cells.lstm(64).init(jax.random.key(3), 10)
    for leaf in (params.w_ih, params.w_hh, params.b_ih, params.b_hh):
        leaf = np.asarray(leaf)
        assert np.abs(leaf).max() <= 1 / 8
        assert np.abs(leaf).max() > 0.95 / 8  # fills the interval, not a narrower one


def test_orthogonal_recurrent_blocks():
    params = cells.gru(16, recurrent_init="orthogonal").init(jax.random.key(0), 4)
    for k in range(3):
        block = np.asarray(params.w_hh[:, k * 16:(k + 1) * 16])
        np.testing.assert_allclose(block.T @ block, np.eye(16), atol=1e-5)


@pytest.mark.parametrize("name,bound", [("xavier", np.sqrt(6 / (100 + 32))), ("he", np.sqrt(6 / 100))])
def test_fan_initialisers_use_one_gate_block(name, bound):
    params = cells.lstm(32, input_init=name).init(jax.random.key(0), 100)
    w = np.asarray(params.w_ih)
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.95 * bound


def test_forget_bias_shifts_only_the_forget_gate():
    base = cells.lstm(8).init(jax.random.key(0), 3)
    biased = cells.lstm(8, forget_bias=1.0).init(jax.random.key(0), 3)
    np.testing.assert_allclose(biased.b_ih - base.b_ih, np.r_[np.zeros(8), np.ones(8), np.zeros(16)], atol=1e-7)
    np.testing.assert_array_equal(biased.b_hh, base.b_hh)


def test_custom_initialiser_callable():
    cell = cells.elman(4, input_init=lambda key, shape, dtype: jnp.full(shape, 0.5, dtype), bias=False)
    np.testing.assert_array_equal(cell.init(jax.random.key(0), 2).w_ih, np.full((2, 4), 0.5))


def test_param_dtype_bfloat16_runs_in_bfloat16():
    """On the XLA path ("auto" runs the native kernels' float32-carry computation where the CPU has bf16 products):
    bfloat16 carries and outputs, against float64 NumPy from the same bfloat16 parameters and inputs (measured
    2-core CPU: 2.2e-3, the per-operation bfloat16 rounding; zeroing w_hh moves the outputs by 6e-2)."""
    cell = cells.lstm(H, param_dtype=jnp.bfloat16)
    params = cell.init(jax.random.key(0), 3)
    xs = random_inputs(shape=(2, 5, 3)).astype(jnp.bfloat16)
    carry, ys = rnnjax.unroll(cell, params, xs, backend="xla")
    assert ys.dtype == carry.h.dtype == carry.c.dtype == jnp.bfloat16
    state, x64, ref_ys = (np.zeros((2, H)), np.zeros((2, H))), np.asarray(xs, np.float64), []
    for t in range(xs.shape[1]):
        state, y = ref_lstm(np_params(params), state, x64[:, t])
        ref_ys.append(y)
    np.testing.assert_allclose(np.asarray(ys, np.float64), np.stack(ref_ys, 1), atol=6e-3, rtol=0)


def _mgu_from_flax(fp, reset_gate):
    """rnnjax's MGU ``Weights`` from Flax ``MGUCell`` params (or their gradients): f and n gate blocks side by
    side; Flax has no ``b_hf`` (and no ``b_hn`` without the reset gate), which are zeros here."""
    zeros, fp = jnp.zeros((H,)), fp["cell"]
    return cells.Weights(
        jnp.concatenate([fp["if"]["kernel"], fp["in"]["kernel"]], axis=1),
        jnp.concatenate([fp["hf"]["kernel"], fp["hn"]["kernel"]], axis=1),
        jnp.concatenate([fp["if"]["bias"], fp["in"]["bias"]]),
        jnp.concatenate([zeros, fp["hn"]["bias"] if reset_gate else zeros]))


@pytest.mark.parametrize("reset_gate", [True, False])
def test_mgu_equals_flax_mgucell(reset_gate):
    """Outputs, final carry and the gradients of params, inputs and initial carry equal flax.linen.MGUCell's."""
    nn = pytest.importorskip("flax.linen")
    module = nn.RNN(nn.MGUCell(H, reset_gate=reset_gate), return_carry=True)
    cell = cells.mgu(H, reset_gate=reset_gate)
    xs = random_inputs()
    h0 = jnp.asarray(np.random.default_rng(2).normal(size=(B, H)) * 0.5, jnp.float32)
    flax_params = module.init(jax.random.key(0), xs, initial_carry=h0)["params"]
    weights = jnp.cos(jnp.arange(B * T * H, dtype=jnp.float32)).reshape(B, T, H)

    def loss(carry_ys):
        carry, ys = carry_ys
        return jnp.sum(ys * weights) + jnp.sum(jnp.sin(carry)), carry_ys

    def flax_loss(p, x, h):
        return loss(module.apply({"params": p}, x, initial_carry=h))

    def rnnjax_loss(p, x, h):
        return loss(rnnjax.unroll(cell, p, x, carry=h))

    grad = functools.partial(jax.grad, argnums=(0, 1, 2), has_aux=True)
    (g_flax, gx_flax, gh_flax), (c_flax, ys_flax) = grad(flax_loss)(flax_params, xs, h0)
    (g, gx, gh), (c, ys) = grad(rnnjax_loss)(_mgu_from_flax(flax_params, reset_gate), xs, h0)
    np.testing.assert_allclose(ys, ys_flax, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(c, c_flax, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(gx, gx_flax, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(gh, gh_flax, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(g.b_hh[:H], g.b_ih[:H], atol=1e-6)  # b_hf only adds to b_if
    b_hh = g.b_hh.at[:H].set(0) if reset_gate else jnp.zeros_like(g.b_hh)
    assert_trees_close(g._replace(b_hh=b_hh), _mgu_from_flax(g_flax, reset_gate))


def _np_mgu_run(p, xs, h0, lengths, *, reverse=False, resets=None):
    """NumPy float64 twin of ``unroll``'s semantics for the MGU: each sequence read within its own length
    (backwards with ``reverse``), the state zeroed before a reset step, zero outputs past the end."""
    ys = np.zeros(xs.shape[:2] + (H,))
    final = np.array(h0, np.float64)
    for b, n in enumerate(lengths):
        h = final[b:b + 1]
        for t in (reversed(range(n)) if reverse else range(n)):
            if resets is not None and resets[b, t]:
                h = np.zeros_like(h)
            h = ref_mgu(p, h, xs[b:b + 1, t])
            ys[b, t] = h[0]
        final[b] = h[0]
    return final, ys


def test_mgu_through_the_driver():
    """Lengths, reverse, resets, vmap, jit and rnnjax.step streaming against the NumPy twin of the equations."""
    cell = cells.mgu(H)
    params = cell.init(jax.random.key(0), 5)
    p, xs = np_params(params), random_inputs()
    h0 = random_carry(cell, params, (B,))
    lengths = np.array([T, 3, 1, 5])
    resets = np.zeros((B, T), bool)
    resets[0, 4] = resets[3, 2] = True
    x64, h64 = np.asarray(xs, np.float64), np.asarray(h0, np.float64)
    for options in (dict(reverse=True), dict(resets=resets)):
        got = rnnjax.unroll(cell, params, xs, carry=h0, lengths=jnp.asarray(lengths), **options)
        assert_trees_close(got, _np_mgu_run(p, x64, h64, lengths, **options))
    whole = _np_mgu_run(p, x64, np.zeros((B, H)), [T] * B)
    assert_trees_close(jax.jit(jax.vmap(lambda x: rnnjax.unroll(cell, params, x)))(xs), whole)
    carry, streamed = cell.initial_carry(params, (B,)), []
    for t in range(T):
        carry, y = rnnjax.step(cell, params, carry, xs[:, t])
        streamed.append(y)
    assert_trees_close((carry, jnp.stack(streamed, axis=1)), whole)
