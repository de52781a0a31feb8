"""The fused backward pass (rnnjax.fused) equals autodiff of the scan."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rnnjax
from conftest import CELLS, B, F, H, T, assert_trees_close, random_carry, random_inputs, slow_unless
from rnnjax import cells, fused, scan

LENGTHS = jnp.array([T, 3, 1, 5])


# The cells with a Recurrence split (the linear ones have a parallel path instead, the sLSTM neither), and a
# multi-head LSTM (block-diagonal W_hh: its own recurrent product and weight gradient).
FUSED = {**{name: make for name, make in CELLS.items() if make().recurrence is not None},
         "lstm_heads2": lambda: cells.lstm(H, heads=2)}
FUSED_CELLS = sorted(FUSED)


@pytest.fixture
def cell(cell_name):
    return FUSED[cell_name]()


def loss(cell, params, xs, carry, *, backward, **kw):
    # backward= chooses between two XLA paths; backend="auto" would run the native kernels' own backward for
    # LSTM, GRU and Elman on most x86-64 CPUs, and the comparison would be of the kernels with themselves
    final, ys = rnnjax.unroll(cell, params, xs, carry=carry, backward=backward, backend="xla", **kw)
    weights = jnp.cos(jnp.arange(ys.size, dtype=ys.dtype)).reshape(ys.shape)
    return jnp.sum(ys * weights) + sum(jnp.sum(jnp.sin(leaf)) for leaf in jax.tree_util.tree_leaves(final))


FUSED_OPTIONS = {
    "saved-lengths": (True, dict(hoist=False, lengths=LENGTHS)),
    "recomputed-reverse": (False, dict(hoist=True, lengths=LENGTHS, reverse=True)),
    "saved-resets": (True, dict(hoist=True, resets=jnp.zeros((B, T), bool).at[:, 3].set(True).at[0, 5].set(True))),
    "recomputed-mask-unroll2": (False, dict(hoist=False, unroll=2,
                                            mask=jnp.asarray(np.random.default_rng(0).random((B, T)) < 0.7))),
}


# The default run gives each cell one option, in turn from cell to cell (so each option, saved or recomputed,
# runs on a quarter of the cells); every pair with -m slow.
@pytest.mark.parametrize("cell_name,option", [
    slow_unless(i == k % len(FUSED_OPTIONS), name, option) for k, name in enumerate(FUSED_CELLS)
    for i, option in enumerate(FUSED_OPTIONS)])
def test_fused_gradients_equal_autodiff(cell, params, option, monkeypatch):
    save_pointwise, options = FUSED_OPTIONS[option]
    monkeypatch.setattr(scan, "fused_unroll", functools.partial(fused.fused_unroll, save_pointwise=save_pointwise))
    xs = random_inputs()
    carry = random_carry(cell, params, (B,))
    grad = jax.value_and_grad(functools.partial(loss, cell), argnums=(0, 1, 2))
    value_f, grads_f = grad(params, xs, carry, backward="fused", **options)
    value_a, grads_a = grad(params, xs, carry, backward="autodiff", **options)
    np.testing.assert_allclose(value_f, value_a, rtol=2e-6)  # float32 sums in another order
    assert_trees_close(grads_f, grads_a)


def test_fused_under_vmap_and_two_batch_dims():
    cell = cells.lstm(6)
    params = cell.init(jax.random.key(0), F)
    xs = random_inputs(shape=(2, 3, T, F))
    lengths = jnp.array([[T, 2, 5], [1, 4, T]])

    def one(p, x, n, backward):
        return jnp.sum(rnnjax.unroll(cell, p, x, lengths=n, backward=backward, backend="xla")[1] ** 2)

    for backward in ("fused", "autodiff"):
        batched = jax.grad(lambda p: jnp.sum(jax.vmap(jax.vmap(lambda x, n: one(p, x, n, backward)))(xs, lengths)))
        assert_trees_close(batched(params), jax.grad(one)(params, xs, lengths, "autodiff"))


def test_fused_bfloat16_accumulates_weight_gradients_in_float32():
    """Over 256 steps a bfloat16 per-step accumulation (autodiff's) drifts by ~6% of the largest
    entry here; the fused pass sums all rows in one float32-accumulated matmul and stays within 1%."""
    cell = cells.gru(8, param_dtype=jnp.bfloat16)
    params = cell.init(jax.random.key(0), 3)
    xs = random_inputs(shape=(4, 256, 3)).astype(jnp.bfloat16)
    grads = jax.grad(lambda p: jnp.sum(rnnjax.unroll(cell, p, xs, backward="fused", backend="xla")[1]
                                       .astype(jnp.float32)))(params)
    ref = jax.grad(lambda p: jnp.sum(rnnjax.unroll(cell, p, xs.astype(jnp.float32), backward="autodiff",
                                                   backend="xla")[1]))(
        jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), params))
    assert grads.w_hh.dtype == jnp.bfloat16
    error = np.abs(np.asarray(grads.w_hh, np.float32) - np.asarray(ref.w_hh)).max()
    assert error < 0.01 * np.abs(np.asarray(ref.w_hh)).max()


def test_fused_refuses_remat_with_a_clear_error():
    cell = cells.lstm(4)
    params = cell.init(jax.random.key(0), F)
    with pytest.raises(ValueError) as info:
        rnnjax.unroll(cell, params, random_inputs(), backward="fused", remat=True)
    assert str(info.value) == ("rnnjax.unroll: backward='fused' is not available here: remat recomputes steps in "
                               "the backward pass. Fix: pass backward='auto' or 'autodiff'.")


def test_a_cell_without_recurrence_uses_autodiff_and_refuses_fused():
    elman = cells.elman(5)
    plain = rnnjax.Cell(elman.init, elman.initial_carry, elman.project, elman.step, elman.input_size,
                        elman.output_size, "my_elman")
    params = elman.init(jax.random.key(0), F)
    xs = random_inputs(shape=(2, T, F))

    def loss(cell, backward):
        return jax.grad(lambda p: jnp.sum(rnnjax.unroll(cell, p, xs, backward=backward, backend="xla")[1] ** 2))(
            params)

    assert_trees_close(loss(plain, "auto"), loss(elman, "fused"))
    with pytest.raises(ValueError) as info:
        loss(plain, "fused")
    assert str(info.value) == ("rnnjax.unroll: backward='fused' is not available here: the cell 'my_elman' has no "
                               "Recurrence split. Fix: pass backward='auto' or 'autodiff'.")
