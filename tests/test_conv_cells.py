"""ConvLSTM and ConvGRU: Flax's ConvLSTMCell, the dense GRU at kernel 1 and a NumPy loop are the references;
the driver's options against their unpadded / unbatched / step-by-step twins."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rnnjax
from conftest import assert_trees_close
from rnnjax import cells, layers

B, T, S, C, H = 2, 4, (5, 6), 2, 3


def _xs(seed=0, shape=(B, T, *S, C)):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _params_with_bias(cell, key=0, input_size=C):
    """Random params, biases included (the default initialises them to zero)."""
    p = cell.init(jax.random.key(key), input_size)
    rng = np.random.default_rng(key + 10)
    return p._replace(b_ih=jnp.asarray(rng.normal(size=p.b_ih.shape) * 0.3, jnp.float32),
                      b_hh=jnp.asarray(rng.normal(size=p.b_hh.shape) * 0.3, jnp.float32))


# ------------------------------------------------------------------ references

def _flax_conv_lstm(params, xs, kernel):
    """Flax's ConvLSTMCell scanned over time, with our params mapped to its layout (gates i, g, f, o; f + 1)."""
    linen = pytest.importorskip("flax.linen")
    order = lambda a: jnp.concatenate([a[..., :H], a[..., 2 * H:3 * H], a[..., H:2 * H], a[..., 3 * H:]], -1)  # noqa: E731
    b_ih = params.b_ih.at[H:2 * H].add(-1.0)  # Flax adds 1 to the forget gate itself
    variables = {"params": {"ih": {"kernel": order(params.w_ih), "bias": order(b_ih)},
                            "hh": {"kernel": order(params.w_hh), "bias": order(params.b_hh)}}}
    module = linen.ConvLSTMCell(features=H, kernel_size=kernel)
    zeros = jnp.zeros((xs.shape[0], *xs.shape[2:-1], H))

    def body(carry, x):
        carry, y = module.apply(variables, carry, x)
        return carry, y

    (c, h), ys = jax.lax.scan(body, (zeros, zeros), jnp.moveaxis(xs, 1, 0))
    return (h, c), jnp.moveaxis(ys, 0, 1)


def _np_conv_same(x, w):
    """'SAME' stride-1 2-D convolution by explicit window sums: x [N, X, Y, Ci], w [kx, ky, Ci, Co]."""
    kx, ky = w.shape[:2]
    px, py = (kx - 1) // 2, (ky - 1) // 2
    padded = np.pad(x, ((0, 0), (px, kx - 1 - px), (py, ky - 1 - py), (0, 0)))
    out = np.zeros((*x.shape[:3], w.shape[-1]))
    for i in range(kx):
        for j in range(ky):
            out += padded[:, i:i + x.shape[1], j:j + x.shape[2]] @ w[i, j]
    return out


def _np_conv_gru(params, xs, reset_after):
    """The ConvGRU equations in float64 NumPy, one step at a time."""
    p = [np.asarray(a, np.float64) for a in params]
    w_ih, w_hh, b_ih, b_hh = p
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    h = np.zeros((xs.shape[0], *xs.shape[2:-1], H))
    ys = []
    for t in range(xs.shape[1]):
        gx = _np_conv_same(np.asarray(xs[:, t], np.float64), w_ih) + b_ih
        if reset_after:
            gh = _np_conv_same(h, w_hh) + b_hh
            r, z = sig(gx[..., :H] + gh[..., :H]), sig(gx[..., H:2 * H] + gh[..., H:2 * H])
            n = np.tanh(gx[..., 2 * H:] + r * gh[..., 2 * H:])
        else:
            gh = _np_conv_same(h, w_hh[..., :2 * H]) + b_hh[:2 * H]
            r, z = sig(gx[..., :H] + gh[..., :H]), sig(gx[..., H:2 * H] + gh[..., H:])
            n = np.tanh(gx[..., 2 * H:] + _np_conv_same(r * h, w_hh[..., 2 * H:]) + b_hh[2 * H:])
        h = (1 - z) * n + z * h
        ys.append(h)
    return h, np.stack(ys, 1)


# ------------------------------------------------------------------ values and gradients

@pytest.mark.parametrize("kernel, spatial", [((3,), (7,)), ((3, 2), S), ((1, 3, 3), (2, 4, 3))],
                         ids=["1d", "2d", "3d"])
def test_conv_lstm_equals_flax_conv_lstm_cell_values_and_gradients(kernel, spatial):
    cell = cells.conv_lstm(H, kernel)
    params = _params_with_bias(cell)
    xs = _xs(shape=(B, T, *spatial, C))
    probe = _xs(7, shape=(B, T, *spatial, H))

    def ours(p, x):
        (h, c), ys = rnnjax.unroll(cell, p, x)
        return jnp.sum(ys * probe) + jnp.sum(c * h), ((h, c), ys)

    def theirs(p, x):
        (h, c), ys = _flax_conv_lstm(p, x, kernel)
        return jnp.sum(ys * probe) + jnp.sum(c * h), ((h, c), ys)

    (_, out), grads = jax.jit(jax.value_and_grad(ours, argnums=(0, 1), has_aux=True))(params, xs)
    (_, ref), ref_grads = jax.jit(jax.value_and_grad(theirs, argnums=(0, 1), has_aux=True))(params, xs)
    assert_trees_close(out, ref)
    assert_trees_close(grads, ref_grads)


@pytest.mark.parametrize("reset_after", [True, False], ids=["reset_after", "ballas"])
def test_conv_gru_equals_a_numpy_loop(reset_after):
    cell = cells.conv_gru(H, (3, 3), reset_after=reset_after)
    params = _params_with_bias(cell)
    xs = _xs()
    h, ys = jax.jit(lambda p, x: rnnjax.unroll(cell, p, x))(params, xs)
    h_ref, ys_ref = _np_conv_gru(params, xs, reset_after)
    np.testing.assert_allclose(ys, ys_ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(h, h_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("reset_after", [True, False], ids=["reset_after", "cho"])
def test_conv_gru_with_kernel_1_is_the_dense_gru_values_and_gradients(reset_after):
    """At kernel size 1 each position runs the dense GRU (itself equal to torch.nn.GRU), gradients included."""
    conv = cells.conv_gru(H, (1, 1), reset_after=reset_after)
    dense = cells.gru(H, reset_after=reset_after)
    params = _params_with_bias(conv)
    xs = _xs()
    probe = _xs(3, shape=(B, T, *S, H))

    def loss(cell, p, x):
        h, ys = rnnjax.unroll(cell, p, x)
        return jnp.sum(ys * probe) + jnp.sum(h ** 2)

    as_dense = lambda p: cells.Weights(p.w_ih[0, 0], p.w_hh[0, 0], p.b_ih, p.b_hh)  # noqa: E731

    def dense_loss(p, x):  # each position is a batch element of the dense cell: [B, T, X, Y, C] -> [B, X, Y, T, C]
        h, ys = rnnjax.unroll(dense, p, jnp.moveaxis(x, 1, -2))
        return jnp.sum(jnp.moveaxis(ys, -2, 1) * probe) + jnp.sum(h ** 2)

    value, (gp, gx) = jax.jit(jax.value_and_grad(lambda p, x: loss(conv, p, x), argnums=(0, 1)))(params, xs)
    ref_value, (ref_gp, ref_gx) = jax.jit(jax.value_and_grad(dense_loss, argnums=(0, 1)))(as_dense(params), xs)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    assert_trees_close(as_dense(gp), ref_gp)
    assert_trees_close(gx, ref_gx)


# ------------------------------------------------------------------ the driver's options

CONV = {"conv_lstm": lambda: cells.conv_lstm(H, (3, 3)), "conv_gru": lambda: cells.conv_gru(H, (3, 3))}


@pytest.fixture(params=sorted(CONV))
def conv(request):
    cell = CONV[request.param]()
    return cell, _params_with_bias(cell)


def _run(cell, **kw):
    return jax.jit(lambda p, x, **a: rnnjax.unroll(cell, p, x, **a, **kw))


def test_lengths_and_reverse_equal_the_unpadded_twin(conv):
    cell, params = conv
    xs, lengths = _xs(), jnp.array([4, 2])
    for reverse in (False, True):
        carry, ys = _run(cell, reverse=reverse)(params, xs, lengths=lengths)
        short_carry, short_ys = _run(cell, reverse=reverse)(params, xs[1:, :2])
        assert_trees_close(jax.tree.map(lambda a: a[1:], carry), short_carry)
        np.testing.assert_allclose(ys[1, :2], short_ys[0], atol=1e-5, rtol=1e-5)
        np.testing.assert_array_equal(ys[1, 2:], 0.0)


def test_resets_equal_two_separate_runs_and_time_major_the_batch_major(conv):
    cell, params = conv
    xs = _xs()
    resets = jnp.zeros((B, T), bool).at[:, 2].set(True)
    carry, ys = _run(cell)(params, xs, resets=resets)
    _, first = _run(cell)(params, xs[:, :2])
    second_carry, second = _run(cell)(params, xs[:, 2:])
    assert_trees_close(carry, second_carry)
    np.testing.assert_allclose(ys, jnp.concatenate([first, second], 1), atol=1e-5, rtol=1e-5)
    tm_carry, tm_ys = _run(cell, time_major=True)(params, jnp.moveaxis(xs, 1, 0), resets=resets.T)
    assert_trees_close((tm_carry, jnp.moveaxis(tm_ys, 0, 1)), (carry, ys))


def test_vmap_remat_and_a_carry_equal_the_batched_run(conv):
    cell, params = conv
    xs = _xs()
    start = jax.tree.map(lambda a: jnp.asarray(np.random.default_rng(4).normal(size=a.shape) * 0.5, a.dtype),
                         cell.initial_carry(params, (B, *S)))
    carry, ys = _run(cell)(params, xs, carry=start)
    mapped = jax.vmap(lambda x, c: rnnjax.unroll(cell, params, x, carry=c))(xs, start)
    assert_trees_close(mapped, (carry, ys))
    assert_trees_close(_run(cell, remat=2)(params, xs, carry=start), (carry, ys))


def test_step_streaming_equals_the_whole_sequence_and_layers_run_it(conv):
    cell, params = conv
    xs = _xs()
    carry, ys = _run(cell)(params, xs)
    c = cell.initial_carry(params, (B, *S))
    step = jax.jit(lambda c, x, r: rnnjax.step(cell, params, c, x, reset=r))
    outs = []
    for t in range(T):
        c, y = step(c, xs[:, t], jnp.array([False, t == 2]))
        outs.append(y)
    np.testing.assert_allclose(jnp.stack(outs, 1)[0], ys[0], atol=1e-5, rtol=1e-5)
    tail_carry, tail = _run(cell)(params, xs[1:, 2:])
    np.testing.assert_allclose(jnp.stack(outs, 1)[1, 2:], tail[0], atol=1e-5, rtol=1e-5)
    assert_trees_close(c, jax.tree.map(lambda whole, t: jnp.stack([whole[0], t[0]]), carry, tail_carry))
    stack = layers.stack([layers.rnn(cell), layers.bidirectional(cell)])
    sp = stack.init(jax.random.key(1), C)
    (_, (c_f, c_b)), out = jax.jit(stack.apply)(sp, xs)
    _, mid = rnnjax.unroll(cell, sp.layers[0], xs)
    fwd_carry, fwd = rnnjax.unroll(cell, sp.layers[1].forward, mid)
    back_carry, back = rnnjax.unroll(cell, sp.layers[1].backward, mid, reverse=True)
    np.testing.assert_allclose(out, jnp.concatenate([fwd, back], -1), atol=1e-5, rtol=1e-5)
    assert_trees_close((c_f, c_b), (fwd_carry, back_carry))


def test_bfloat16_policy_stays_close_to_float32(conv):
    cell, params = conv
    name = cell.name
    xs = _xs()
    bf16 = getattr(cells, name)(H, (3, 3), dtype=jnp.bfloat16)
    carry, ys = _run(bf16)(params, xs)
    ref_carry, ref = _run(cell)(params, xs)
    assert ys.dtype == jnp.bfloat16
    assert jax.tree.leaves(carry)[0].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(ys, np.float32), ref, atol=3e-2)
    assert float(jnp.max(jnp.abs(np.asarray(ys, np.float32) - ref))) > 0  # bfloat16 operands, not float32 ones


# ------------------------------------------------------------------ errors

def test_bad_kernel_sizes_and_ranks_are_clear_errors():
    for name, kernel in (("conv_lstm", (3, 0)), ("conv_gru", (1, 1, 1, 1))):
        with pytest.raises(ValueError) as e:
            getattr(cells, name)(H, kernel)
        assert str(e.value) == (
            f"rnnjax.cells.{name}: expected kernel_size to be a tuple of 1, 2 or 3 positive integers (one "
            f"per spatial dim), got {kernel}. Fix: pass e.g. kernel_size=(3, 3) for frames [*B, T, H, W, C].")
    cell = cells.conv_lstm(H, (3, 3))
    params = cell.init(jax.random.key(0), C)
    with pytest.raises(ValueError) as e:
        rnnjax.unroll(cell, params, jnp.zeros((T, 5, C)))
    assert str(e.value) == (
        "rnnjax.unroll: expected xs of rank >= 4, [*batch, T, *spatial (2 dims), F] (or [T, *batch, "
        "*spatial (2 dims), F] with time_major=True), got shape (4, 5, 2). Fix: a single sequence is [T, "
        "*spatial (2 dims), F]; a single step goes through rnnjax.step instead.")
    with pytest.raises(ValueError) as e:
        rnnjax.step(cell, params, cell.initial_carry(params, (B, *S)), jnp.zeros((B, *S, C)),
                    reset=jnp.zeros((B, 5), bool))
    assert str(e.value) == ("rnnjax.step: expected a boolean reset of shape (2,) (x without its spatial and feature "
                            "axes), got bool[2, 5]. Fix: one boolean per sequence.")


def test_the_flax_adapters_run_a_conv_cell_as_unroll_does(conv):
    flax_interop = pytest.importorskip("rnnjax.interop.flax")
    from flax import nnx

    cell, _ = conv
    xs, lengths = _xs(), jnp.array([4, 2])
    module = flax_interop.Recurrent(cell, input_size=C, rngs=nnx.Rngs(0))
    carry, ys = module(xs, lengths=lengths, return_carry=True)
    assert_trees_close((carry, ys), rnnjax.unroll(cell, module.rnnjax_params(), xs, lengths=lengths))
    linen_module = flax_interop.LinenRecurrent(cell)
    variables = linen_module.init(jax.random.key(0), xs)
    assert_trees_close(linen_module.apply(variables, xs, lengths=lengths),
                       rnnjax.unroll(cell, variables["params"]["rnn"], xs, lengths=lengths)[1])
