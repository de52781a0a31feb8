"""The driver against independent twins: a Python loop, streaming, flipping,
unpadded sequences, jit, vmap, reshaped batches, finite differences."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rnnjax
from conftest import CELLS, B, F, T, assert_trees_close, jit_step, jit_unroll, random_carry, random_inputs, slow_unless
from rnnjax import cells

LENGTHS = jnp.array([T, 3, 1, 5])

# The driver is the same for every cell; what differs is the path it takes and the carry's shape. The default run
# checks each path and shape on one cell: the native kernels with a pair and an array carry (lstm, gru); the XLA
# scan with a pair of two widths (lstm_proj), output feedback (jordan) and four arrays (slstm); a linear cell's
# step in the sequential scan (lru, and the Mamba's state of state_size columns per unit), the mLSTM's chunkwise
# form and its matrix carry. Every cell with -m slow.
DRIVER_CELLS = ("gru", "jordan", "lru", "lstm", "lstm_proj", "mamba", "mlstm", "slstm")
# Cells whose gradients have an independent reference elsewhere (PyTorch's in tests/test_torch_parity.py, the
# float64 equations in tests/test_xlstm_mamba.py): their finite-difference check runs with -m slow. The LSTM has
# PyTorch's too, but stays: the default run's finite-difference check of the driver on a native-capable cell.
GRADIENTS_ELSEWHERE = ("elman_relu", "elman_tanh", "gru", "lstm_proj", "mamba", "mlstm", "slstm")


@pytest.fixture(params=[slow_unless(name in DRIVER_CELLS, name) for name in sorted(CELLS)])
def cell_name(request):
    return request.param


def python_loop(cell, params, xs, carry):
    """The reference: one cell.step per time step in plain Python, batch-major xs."""
    ys = []
    for t in range(xs.shape[-2]):
        carry, y = cell.step(params, carry, cell.project(params, xs[..., t, :]))
        ys.append(y)
    return carry, jnp.stack(ys, axis=-2)


def _default_leaves_the_scan(name):
    """Whether backend="auto", parallel="auto" take a path other than the XLA scan here (T < CPU_PARALLEL_MIN_T):
    the native kernels (where the CPU has them), or the mLSTM's chunkwise form."""
    cell = CELLS[name]()
    return cell.native is not None or (cell.linear is not None and cell.linear.chunkwise is not None)


# The XLA scan with the input projection hoisted out of the loop and inside it (parallel=False: the linear forms
# ignore hoist and backend), and the defaults where they take another path (the native kernels ignore hoist).
SCAN_PATHS, DEFAULT_PATH = [("xla", True, False), ("xla", False, False)], ("auto", "auto", "auto")
UNROLL_PATHS = [slow_unless(name in DRIVER_CELLS, name, *path) for name in sorted(CELLS)
                for path in SCAN_PATHS + ([DEFAULT_PATH] if _default_leaves_the_scan(name) else [])]


@pytest.mark.parametrize("cell_name,backend,hoist,parallel", UNROLL_PATHS)
def test_unroll_equals_python_loop(cell, params, backend, hoist, parallel):
    xs = random_inputs()
    carry0 = random_carry(cell, params, (B,))
    expected = python_loop(cell, params, xs, carry0)
    got = jit_unroll(cell, params, xs, carry=carry0, hoist=hoist, backend=backend, parallel=parallel)
    assert_trees_close(got, expected)


def test_unroll_equals_streaming(cell, params):
    xs = random_inputs()
    carry = cell.initial_carry(params, (B,))
    ys = []
    for t in range(T):
        carry, y = jit_step(cell, params, carry, xs[:, t])
        ys.append(y)
    assert_trees_close(jit_unroll(cell, params, xs), (carry, jnp.stack(ys, 1)))


def test_padded_equals_unpadded(cell, params):
    xs = random_inputs()
    carry, ys = jit_unroll(cell, params, xs, lengths=LENGTHS)
    for b, n in enumerate(np.asarray(LENGTHS)):
        c_b, y_b = jit_unroll(cell, params, xs[b, :n])
        assert_trees_close(jax.tree_util.tree_map(lambda a: a[b], carry), c_b)
        assert_trees_close(ys[b, :n], y_b)
        np.testing.assert_array_equal(np.asarray(ys[b, n:]), 0.0)


def test_reverse_equals_flipped_within_length(cell, params):
    xs = random_inputs()
    carry, ys = jit_unroll(cell, params, xs, lengths=LENGTHS, reverse=True)
    for b, n in enumerate(np.asarray(LENGTHS)):
        c_b, y_b = jit_unroll(cell, params, xs[b, :n][::-1])
        assert_trees_close(jax.tree_util.tree_map(lambda a: a[b], carry), c_b)
        assert_trees_close(ys[b, :n], y_b[::-1])
        np.testing.assert_array_equal(np.asarray(ys[b, n:]), 0.0)


def test_mask_equals_lengths(cell, params):
    xs = random_inputs()
    mask = jnp.arange(T)[None, :] < LENGTHS[:, None]
    for reverse in (False, True):
        assert_trees_close(jit_unroll(cell, params, xs, mask=mask, reverse=reverse),
                           jit_unroll(cell, params, xs, lengths=LENGTHS, reverse=reverse))


def test_mask_holds_carry_on_masked_steps(cell, params):
    """A mask with holes: the result equals running only the kept steps, outputs zero in the holes."""
    xs = random_inputs()
    keep = np.array([1, 0, 1, 1, 0, 0, 1], bool)
    mask = jnp.broadcast_to(jnp.asarray(keep), (B, T))
    carry, ys = jit_unroll(cell, params, xs, mask=mask)
    c_ref, y_ref = jit_unroll(cell, params, xs[:, keep])
    assert_trees_close(carry, c_ref)
    assert_trees_close(ys[:, keep], y_ref)
    np.testing.assert_array_equal(np.asarray(ys[:, ~keep]), 0.0)


def test_time_major_equals_batch_major(cell, params):
    xs = random_inputs()
    mask = jnp.arange(T)[None, :] < LENGTHS[:, None]
    c_b, y_b = jit_unroll(cell, params, xs, mask=mask)
    c_t, y_t = jit_unroll(cell, params, jnp.swapaxes(xs, 0, 1), mask=mask.T, time_major=True)
    assert_trees_close(c_t, c_b)
    assert_trees_close(jnp.swapaxes(y_t, 0, 1), y_b)


def test_jit_equals_eager(cell, params):
    xs = random_inputs()
    run = functools.partial(rnnjax.unroll, cell, reverse=True)
    assert_trees_close(jax.jit(run)(params, xs, lengths=LENGTHS), run(params, xs, lengths=LENGTHS))


def test_vmap_of_unbatched_equals_batched(cell, params):
    xs = random_inputs()
    one = lambda x, n: jit_unroll(cell, params, x, lengths=n)  # noqa: E731
    assert_trees_close(jax.vmap(one)(xs, LENGTHS), jit_unroll(cell, params, xs, lengths=LENGTHS))


def test_two_batch_dimensions_equal_flattened(cell, params):
    xs = random_inputs(shape=(2, 3, T, F))
    lengths = jnp.array([[T, 2, 5], [1, 4, T]])
    carry, ys = jit_unroll(cell, params, xs, lengths=lengths, reverse=True)
    c_flat, y_flat = jit_unroll(cell, params, xs.reshape(6, T, F), lengths=lengths.reshape(6), reverse=True)
    assert_trees_close(carry, jax.tree_util.tree_map(lambda a: a.reshape(2, 3, *a.shape[1:]), c_flat))
    assert_trees_close(ys, y_flat.reshape(ys.shape))


# remat is the driver's, the same for every cell: by default three carries' shapes (a pair, an array, the
# sLSTM's four arrays) take it; every cell with -m slow.
REMAT_CELLS = ("lstm_proj", "gru", "slstm")


@pytest.mark.parametrize("remat", [True, 3, 100])
@pytest.mark.parametrize("name", [n if n in REMAT_CELLS else pytest.param(n, marks=pytest.mark.slow)
                                  for n in sorted(CELLS)])
def test_remat_equals_plain_values_and_gradients(name, remat):
    cell = CELLS[name]()
    params = cell.init(jax.random.key(0), F)
    xs = random_inputs()

    def loss(p, x, remat):  # remat is an XLA-path option: both runs on XLA, so they agree to round-off
        carry, ys = rnnjax.unroll(cell, p, x, lengths=LENGTHS, remat=remat, backend="xla")
        return jnp.sum(ys**2) + sum(jnp.sum(c) for c in jax.tree_util.tree_leaves(carry))

    value, grads = jax.jit(jax.value_and_grad(lambda p, x: loss(p, x, None), argnums=(0, 1)))(params, xs)
    value_r, grads_r = jax.jit(jax.value_and_grad(lambda p, x: loss(p, x, remat), argnums=(0, 1)))(params, xs)
    np.testing.assert_allclose(value_r, value, rtol=1e-6)
    assert_trees_close(grads_r, grads)


def test_resets_start_new_sequences(cell, params):
    """A reset at step 3 equals running steps 3.. from a fresh carry."""
    xs = random_inputs()
    resets = jnp.zeros((B, T), bool).at[:, 3].set(True).at[1, 3].set(False)
    carry, ys = jit_unroll(cell, params, xs, resets=resets)
    _, y_head = jit_unroll(cell, params, xs[:, :3])
    c_tail, y_tail = jit_unroll(cell, params, xs[:, 3:])
    c_all, y_all = jit_unroll(cell, params, xs)
    keep = np.array([True, False, True, True])
    assert_trees_close(ys[keep, :3], y_head[keep])
    assert_trees_close(ys[keep, 3:], y_tail[keep])
    assert_trees_close(jax.tree_util.tree_map(lambda a: a[keep], carry),
                       jax.tree_util.tree_map(lambda a: a[keep], c_tail))
    assert_trees_close(ys[1], y_all[1])


def test_streaming_reset_equals_fresh_carry(cell, params):
    xs = random_inputs()
    warm, _ = jit_unroll(cell, params, xs)
    reset = jnp.array([True, False, True, False])
    carry, y = jit_step(cell, params, warm, xs[:, 0], reset=reset)
    c_fresh, y_fresh = jit_step(cell, params, cell.initial_carry(params, (B,)), xs[:, 0])
    c_warm, y_warm = jit_step(cell, params, warm, xs[:, 0])
    assert_trees_close(y, jnp.where(reset[:, None], y_fresh, y_warm))
    per_row = lambda f, w: jnp.where(reset.reshape(-1, *[1] * (f.ndim - 1)), f, w)  # noqa: E731
    assert_trees_close(carry, jax.tree_util.tree_map(per_row, c_fresh, c_warm))


@pytest.mark.parametrize("name", [slow_unless(name not in GRADIENTS_ELSEWHERE, name) for name in sorted(CELLS)])
def test_check_grads(name):
    """Reverse-mode gradients of the driver (with lengths and reverse) against finite differences, in float64."""
    with jax.enable_x64(True):
        cell = CELLS[name]()
        params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), cell.init(jax.random.key(0), 3))
        xs = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4, 3)))
        lengths = jnp.array([4, 2])

        def f(p, x):
            carry, ys = rnnjax.unroll(cell, p, x, lengths=lengths, reverse=True)
            return jnp.sum(ys * jnp.arange(ys.size).reshape(ys.shape) / ys.size) + sum(
                jnp.sum(jnp.sin(c)) for c in jax.tree_util.tree_leaves(carry))

        jax.test_util.check_grads(jax.jit(f), (params, xs), order=1, modes=["rev"], atol=1e-5, rtol=1e-5)


def test_jitted_loss_traces_once():
    cell = CELLS["lstm"]()
    params = cell.init(jax.random.key(0), F)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def loss(p, x, n):
        return jnp.mean(rnnjax.unroll(cell, p, x, lengths=n)[1] ** 2)

    values = [float(jax.value_and_grad(loss)(params, random_inputs(seed), LENGTHS - (seed % 2))[0])
              for seed in range(3)]
    assert len(set(values)) == 3  # each call saw its own data through the one trace


@pytest.mark.parametrize("name", ["lstm", "gru", "mingru", "mlstm", "mamba", "lru"])
def test_float64_inputs_with_float32_params_name_the_fix(name):
    """Under x64, float64 xs would turn a float32 carry into float64 inside the scan; unroll says so, and the
    fix it names (casting xs) gives the float32 run."""
    cell = CELLS[name]()
    params = cell.init(jax.random.key(0), F)
    xs = random_inputs()
    expected = rnnjax.unroll(cell, params, xs)
    with jax.enable_x64(True):
        xs64 = jnp.asarray(np.asarray(xs), jnp.float64)
        with pytest.raises(TypeError) as e:
            rnnjax.unroll(cell, params, xs64)
        got = rnnjax.unroll(cell, params, xs64.astype(jnp.float32))
    assert str(e.value) == ("rnnjax.unroll: xs of dtype float64 turn the cell's float32 carry into float64 after one "
                            "step, and a scan's carry must keep its dtype. Fix: cast xs to the carry's dtype "
                            "(xs.astype(jnp.float32)), or build the cell with param_dtype=jnp.float64.")
    assert_trees_close(got, expected)


def test_float32_inputs_with_bfloat16_params_name_the_fix():
    cell = cells.lstm(5, param_dtype=jnp.bfloat16)
    params = cell.init(jax.random.key(0), F)
    with pytest.raises(TypeError) as e:
        rnnjax.unroll(cell, params, random_inputs())
    assert str(e.value) == ("rnnjax.unroll: xs of dtype float32 turn the cell's bfloat16 carry into float32 after one "
                            "step, and a scan's carry must keep its dtype. Fix: cast xs to the carry's dtype "
                            "(xs.astype(jnp.bfloat16)), or build the cell with param_dtype=jnp.float32.")
