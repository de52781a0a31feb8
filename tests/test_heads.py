"""Multi-head recurrences (``heads=n`` on lstm, gru and elman): the dense cell whose recurrent matrix is zero
off the heads' diagonal blocks, in values and gradients; ``heads=1`` is today's cell; the refusals."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rnnjax
from conftest import B, F, H, T, assert_trees_close, dense_from_heads, random_carry, random_inputs
from rnnjax import backend, cells, layers
from rnnjax.interop import torch as torch_interop

LENGTHS = jnp.array([T, 3, 1, 5])
# (factory taking heads=, gates, heads): H = 6 units in 3 heads of 2 or 2 heads of 3.
CASES = {
    "lstm": (cells.lstm, 4, 2),
    "gru": (cells.gru, 3, 3),
    "gru_cho": (functools.partial(cells.gru, reset_after=False), 3, 2),
    "elman": (functools.partial(cells.elman, activation="relu"), 1, 3),
}


def _loss(cell, params, xs, carry, **kw):
    """A loss weighing every output and the final carry differently, with ``(final carry, ys)`` as aux."""
    final, ys = rnnjax.unroll(cell, params, xs, carry=carry, **kw)
    weights = jnp.cos(jnp.arange(ys.size, dtype=ys.dtype)).reshape(ys.shape)
    loss = jnp.sum(ys * weights) + sum(jnp.sum(jnp.sin(leaf)) for leaf in jax.tree_util.tree_leaves(final))
    return loss, (final, ys)


_grads = jax.grad(_loss, argnums=(1, 2, 3), has_aux=True)


@pytest.mark.parametrize("path", ["xla", "auto"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_heads_equal_the_dense_cell_with_zero_off_diagonal_blocks(name, path):
    """Values, final carry and the gradients of params, inputs and initial carry, on the XLA path (its fused
    backward pass, which test_fused.py checks against autodiff for an LSTM with heads) and on "auto" (the native
    kernels where they run, the XLA path elsewhere)."""
    factory, gates, n = CASES[name]
    multi = factory(H, heads=n)
    params = multi.init(jax.random.key(0), F)
    assert params.w_hh.shape == (n, H // n, gates * H // n)
    dense_params = params._replace(w_hh=jnp.asarray(dense_from_heads(params.w_hh, gates)))
    xs, carry = random_inputs(), random_carry(multi, params, (B,))
    (g, gx, gc), out = _grads(multi, params, xs, carry, lengths=LENGTHS, reverse=True, backend=path)
    (g_d, gx_d, gc_d), out_d = _grads(factory(H), dense_params, xs, carry, lengths=LENGTHS, reverse=True,
                                      backend=path)
    assert_trees_close(out, out_d)
    on_blocks = dense_from_heads(np.ones(params.w_hh.shape), gates) > 0
    np.testing.assert_allclose(dense_from_heads(g.w_hh, gates), np.where(on_blocks, g_d.w_hh, 0.0), atol=1e-5,
                               rtol=1e-5)
    assert_trees_close((g._replace(w_hh=None), gx, gc), (g_d._replace(w_hh=None), gx_d, gc_d))


@pytest.mark.parametrize("path", ["xla", "auto"])
def test_heads_bfloat16_policy_equals_the_dense_cell(path):
    """The same bfloat16 products (the dense matrix adds only exact zeros) with float32 accumulation: equal to
    float32 round-off (bit-equal on the CPU), on the XLA path and on "auto" where it runs XLA."""
    multi, dense = cells.lstm(H, heads=2, dtype=jnp.bfloat16), cells.lstm(H, dtype=jnp.bfloat16)
    if backend.choose("f", path, backend.Request(dense, jnp.bfloat16, None, jax.default_backend())) is not None:
        pytest.skip("auto runs the dense cell's bfloat16 products natively here; test_native.py compares them with "
                    "the XLA path")
    params = multi.init(jax.random.key(0), F)
    dense_params = params._replace(w_hh=jnp.asarray(dense_from_heads(params.w_hh, 4)))
    carry, ys = rnnjax.unroll(multi, params, random_inputs(), backend=path)
    carry_d, ys_d = rnnjax.unroll(dense, dense_params, random_inputs(), backend=path)
    assert ys.dtype == jnp.bfloat16 and carry.c.dtype == jnp.float32
    assert_trees_close((carry, ys.astype(jnp.float32)), (carry_d, ys_d.astype(jnp.float32)), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", ["lstm", "gru_cho"])
def test_one_head_is_todays_cell_bit_for_bit(name):
    factory, gates, _ = CASES[name]
    one, today = factory(H, heads=1), factory(H)
    params = one.init(jax.random.key(0), F)
    equal = functools.partial(jax.tree_util.tree_map, np.testing.assert_array_equal)
    equal(params, today.init(jax.random.key(0), F))
    assert params.w_hh.shape == (H, gates * H)
    xs = random_inputs()
    equal(_grads(one, params, xs, None), _grads(today, params, xs, None))
    assert (one.native is None) == (today.native is None)


def test_heads_must_divide_hidden_size():
    with pytest.raises(ValueError) as info:
        cells.gru(6, heads=4)
    assert str(info.value) == ("rnnjax.cells.gru: heads=4 must divide hidden_size=6 (each head has hidden_size / "
                               "heads units). Fix: pass heads=1 or a divisor of 6, or a hidden_size that is a "
                               "multiple of 4.")
    with pytest.raises(ValueError) as info:
        cells.elman(6, heads=0)
    assert str(info.value) == ("rnnjax.cells.elman: expected heads to be an integer >= 1, got 0. Fix: pass a whole "
                               "number such as heads=1.")
    with pytest.raises(ValueError) as info:
        cells.lstm(8, heads=2, proj_size=4)
    assert str(info.value) == ("rnnjax.cells.lstm: heads=2 needs proj_size=0 (each head feeds back its own "
                               "H/heads units, which a projection mixes), got proj_size=4. Fix: pass proj_size=0 "
                               "or heads=1.")


def test_auto_runs_bfloat16_heads_where_it_runs_the_dense_cell_natively():
    """The native kernels run multi-head cells in float32 and bfloat16 (tests/test_native.py compares both with
    XLA): "auto" makes the same choice for a bfloat16 cell with heads as for its dense twin."""
    for dtype in (jnp.float32, jnp.bfloat16):
        multi, dense = cells.gru(8, heads=4, dtype=dtype), cells.gru(8, dtype=dtype)
        choice = [backend.choose("f", "auto", backend.Request(c, dtype, None, "cpu")) for c in (multi, dense)]
        assert choice[0] == choice[1], dtype


def test_torch_interop_refuses_multi_head_params():
    spec = torch_interop.TorchSpec("LSTM", F, 8)
    params = layers.stack([layers.rnn(cells.lstm(8, heads=2))]).init(jax.random.key(0), F)
    with pytest.raises(ValueError) as info:
        torch_interop.to_state_dict(spec, params)
    assert str(info.value) == (
        "rnnjax.interop.torch.to_state_dict: params hold a multi-head recurrent weight w_hh of shape [2, 4, 16] "
        "(a cell built with heads=2); torch.nn.RNN/LSTM/GRU have one dense recurrent matrix. Fix: build the cells "
        "with heads=1 for models exchanged with PyTorch.")
