"""Flax adapters (rnnjax.interop.flax): NNX and Linen modules equal the pure functions, in training too."""

from __future__ import annotations

import importlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rnnjax
from rnnjax import layers

flax = pytest.importorskip("flax")
from flax import linen, nnx  # noqa: E402

from rnnjax.interop.flax import LinenRecurrent, Recurrent  # noqa: E402

B, T, F, H, C = 3, 7, 4, 8, 5


def _data():
    rng = np.random.default_rng(0)
    xs = jnp.asarray(rng.normal(size=(B, T, F)), jnp.float32)
    lengths = jnp.asarray([7, 4, 1])
    ys = jnp.asarray(rng.integers(0, C, size=(B,)))
    return xs, lengths, ys


class Classifier(nnx.Module):
    def __init__(self, rngs):
        self.rnn = Recurrent(rnnjax.cells.lstm(H), input_size=F, rngs=rngs)
        self.out = nnx.Linear(H, C, rngs=rngs)

    def __call__(self, xs, lengths):
        (h, _), _ = self.rnn(xs, lengths=lengths, return_carry=True)
        return self.out(h)


def _pure_loss(params, xs, lengths, labels):
    rnn, (w, b) = params
    (h, _), _ = rnnjax.unroll(rnnjax.cells.lstm(H), rnn, xs, lengths=lengths)
    return optax.softmax_cross_entropy_with_integer_labels(h @ w + b, labels).mean()


def test_nnx_model_trains_with_nnx_optimizer_like_the_pure_functions():
    xs, lengths, labels = _data()
    model = Classifier(nnx.Rngs(0))
    start = (model.rnn.rnnjax_params(), (model.out.kernel[...], model.out.bias[...]))
    # SGD, not Adam: its updates are the gradients scaled, so a gradient of the wrong size shows in the params
    optimizer = nnx.Optimizer(model, optax.sgd(0.5), wrt=nnx.Param)

    @nnx.jit
    def nnx_step(model, optimizer):
        def loss_fn(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(xs, lengths), labels).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    tx = optax.sgd(0.5)
    params, opt_state = start, tx.init(start)

    @jax.jit
    def pure_step(params, opt_state):
        loss, grads = jax.value_and_grad(_pure_loss)(params, xs, lengths, labels)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    for _ in range(4):
        loss_nnx = nnx_step(model, optimizer)
        params, opt_state, loss_pure = pure_step(params, opt_state)
        np.testing.assert_allclose(loss_nnx, loss_pure, rtol=1e-6, atol=1e-7)
    assert float(loss_pure) < float(_pure_loss(start, xs, lengths, labels))  # it did train
    trained = (model.rnn.rnnjax_params(), (model.out.kernel[...], model.out.bias[...]))
    for a, b in zip(jax.tree_util.tree_leaves(trained), jax.tree_util.tree_leaves(params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_nnx_layer_with_lengths_and_streaming_equal_the_layer():
    xs, lengths, _ = _data()
    stack = layers.stack([layers.bidirectional(rnnjax.cells.gru(H))] * 2)
    module = Recurrent(stack, input_size=F, rngs=nnx.Rngs(1))
    params = module.rnnjax_params()
    np.testing.assert_allclose(module(xs, lengths=lengths), stack.apply(params, xs, lengths=lengths)[1],
                               rtol=1e-6, atol=1e-6)
    # Streaming a cell one step at a time equals the whole-sequence call.
    cell_module = Recurrent(rnnjax.cells.elman(H), input_size=F, rngs=nnx.Rngs(2))
    carry = cell_module.initial_carry((B,))
    steps = []
    for t in range(T):
        carry, y = cell_module.step(carry, xs[:, t])
        steps.append(y)
    np.testing.assert_allclose(jnp.stack(steps, 1), cell_module(xs), rtol=1e-6, atol=1e-6)


def test_nnx_cell_options_reach_the_driver():
    xs, lengths, _ = _data()
    module = Recurrent(rnnjax.cells.lstm(H), input_size=F, rngs=nnx.Rngs(3), reverse=True, remat=True)
    expected = rnnjax.unroll(rnnjax.cells.lstm(H), module.rnnjax_params(), xs, lengths=lengths, reverse=True)[1]
    np.testing.assert_allclose(module(xs, lengths=lengths), expected, rtol=1e-6, atol=1e-6)
    # remat changes no value; that it reaches the driver shows where the native kernels refuse it
    native = Recurrent(rnnjax.cells.lstm(H), input_size=F, rngs=nnx.Rngs(3), remat=True, backend="native")
    with pytest.raises(ValueError) as e:
        native(xs)
    assert str(e.value) == ("rnnjax.unroll: backend='native' cannot run this call: remat recomputes steps in the "
                            "backward pass, which the native kernels do not. Fix: pass backend='auto' (which falls "
                            "back to XLA) or 'xla'.")


class LinenTagger(linen.Module):
    @linen.compact
    def __call__(self, xs, lengths):
        return linen.Dense(C)(LinenRecurrent(model=rnnjax.cells.lstm(H))(xs, lengths=lengths))


def test_linen_module_values_and_gradients_equal_the_pure_functions():
    xs, lengths, _ = _data()
    model = LinenTagger()
    variables = model.init(jax.random.key(0), xs, lengths)
    rnn = variables["params"]["LinenRecurrent_0"]["rnn"]
    dense = variables["params"]["Dense_0"]
    assert isinstance(rnn, type(rnnjax.cells.lstm(H).init(jax.random.key(0), F)))  # rnnjax's NamedTuple

    def pure(rnn, dense):
        ys = rnnjax.unroll(rnnjax.cells.lstm(H), rnn, xs, lengths=lengths)[1]
        return ys @ dense["kernel"] + dense["bias"]

    np.testing.assert_allclose(model.apply(variables, xs, lengths), pure(rnn, dense), rtol=1e-6, atol=1e-6)
    g_linen = jax.grad(lambda v: jnp.sum(model.apply(v, xs, lengths) ** 2))(variables)["params"]
    g_pure = jax.grad(lambda r, d: jnp.sum(pure(r, d) ** 2), argnums=(0, 1))(rnn, dense)
    for a, b in zip(jax.tree_util.tree_leaves((g_linen["LinenRecurrent_0"]["rnn"], g_linen["Dense_0"])),
                    jax.tree_util.tree_leaves(g_pure)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bad_models_and_options_are_named():
    with pytest.raises(TypeError) as e:
        Recurrent(rnnjax.cells.lstm, input_size=F, rngs=nnx.Rngs(0))
    assert str(e.value) == (
        "rnnjax.interop.flax.Recurrent: expected an rnnjax Cell (e.g. rnnjax.cells.lstm(128)) or Layer (e.g. "
        "rnnjax.layers.stack([...])), got function. Fix: pass one of those.")
    with pytest.raises(ValueError) as e:
        Recurrent(layers.rnn(rnnjax.cells.gru(H)), input_size=F, rngs=nnx.Rngs(0), reverse=True)
    assert str(e.value) == (
        "rnnjax.interop.flax.Recurrent: unroll options ['reverse'] apply to a Cell only; a Layer takes them "
        "when it is built. Fix: pass them to rnnjax.layers.rnn/bidirectional instead.")


def test_missing_flax_names_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "flax", None)
    monkeypatch.delitem(sys.modules, "rnnjax.interop.flax")
    with pytest.raises(ImportError) as e:
        importlib.import_module("rnnjax.interop.flax")
    assert str(e.value) == ("rnnjax.interop.flax needs Flax, which is not installed. "
                            "Fix: pip install 'flax>=0.10' (or pip install 'rnnjax[flax]').")
