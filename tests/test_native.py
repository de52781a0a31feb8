"""The native CPU kernels (rnnjax.native) against the XLA path: values, final carries and every gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rnnjax
from rnnjax import backend, cells, layers, native

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.status().reason}")

CELLS = {
    "lstm": lambda: cells.lstm(12),
    "gru": lambda: cells.gru(12),
    "gru_cho": lambda: cells.gru(12, reset_after=False),
    "elman_tanh": lambda: cells.elman(12),
    "elman_relu": lambda: cells.elman(12, activation="relu"),
}
# Multi-head cells (block-diagonal W_hh): each kernel with heads of 3 to 6 units.
HEADS = {
    "lstm_heads3": lambda: cells.lstm(12, heads=3),
    "gru_heads2": lambda: cells.gru(12, heads=2),
    "gru_cho_heads4": lambda: cells.gru(12, reset_after=False, heads=4),
    "elman_relu_heads4": lambda: cells.elman(12, activation="relu", heads=4),
}
F, T = 5, 9


def _close(a, b, tol=1e-5):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


def _loss_and_grads(cell, params, xs, carry, name, **kw):
    """Outputs, final carry, and gradients w.r.t. params, inputs and initial carry of a loss that weighs every
    output and the final carry differently (so a wrong cotangent anywhere shows)."""

    def loss(p, x, c):
        c_out, ys = rnnjax.unroll(cell, p, x, carry=c, backend=name, **kw)
        w = jnp.sin(jnp.arange(ys.size, dtype=ys.dtype).reshape(ys.shape))
        return jnp.sum(ys * w) + sum(jnp.sum(leaf ** 2) for leaf in jax.tree_util.tree_leaves(c_out)), (c_out, ys)

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(params, xs, carry)
    return out, grads


def _setup(kind, batch_shape, seed=0):
    cell = {**CELLS, **HEADS}[kind]()
    params = cell.init(jax.random.key(seed), F)
    xs = jax.random.normal(jax.random.key(seed + 1), (*batch_shape, T, F))
    carry = jax.tree_util.tree_map(lambda z: jax.random.normal(jax.random.key(seed + 2), z.shape) * 0.5,
                                   cell.initial_carry(params, batch_shape))
    return cell, params, xs, carry


OPTIONS = {
    "plain": lambda bs: {},
    "lengths": lambda bs: dict(lengths=jnp.arange(int(np.prod(bs))).reshape(bs) % (T + 1)),
    "reverse_lengths": lambda bs: dict(lengths=(jnp.arange(int(np.prod(bs))).reshape(bs) * 3) % (T + 1), reverse=True),
    "resets": lambda bs: dict(resets=jax.random.bernoulli(jax.random.key(7), 0.25, (*bs, T))),
    "mask_holes": lambda bs: dict(mask=jax.random.bernoulli(jax.random.key(8), 0.7, (*bs, T))),
    "reverse_resets_lengths": lambda bs: dict(resets=jax.random.bernoulli(jax.random.key(9), 0.25, (*bs, T)),
                                              lengths=jnp.full(bs, 6), reverse=True),
}


@pytest.mark.parametrize("kind", CELLS)
@pytest.mark.parametrize("option", OPTIONS)
def test_native_equals_xla_values_carries_and_gradients(kind, option):
    cell, params, xs, carry = _setup(kind, (9,))  # 9 rows: two threads' shards of unequal size
    kw = OPTIONS[option]((9,))
    want = _loss_and_grads(cell, params, xs, carry, "xla", **kw)
    got = _loss_and_grads(cell, params, xs, carry, "native", **kw)
    _close(got, want)


@pytest.mark.parametrize("kind", HEADS)
@pytest.mark.parametrize("option", ["plain", "reverse_resets_lengths",
                                    *(pytest.param(o, marks=pytest.mark.slow) for o in OPTIONS
                                      if o not in ("plain", "reverse_resets_lengths"))])
def test_native_heads_equal_xla_values_carries_and_gradients(kind, option):
    """heads > 1: the per-step products run one batched product per gate over the heads, and dW_hh only the
    diagonal blocks; everything equals the XLA path's block-diagonal cell."""
    cell, params, xs, carry = _setup(kind, (9,))
    kw = OPTIONS[option]((9,))
    _close(_loss_and_grads(cell, params, xs, carry, "native", **kw),
           _loss_and_grads(cell, params, xs, carry, "xla", **kw))


@pytest.mark.parametrize("batch_shape", [(), (1,), (2, 3)])
@pytest.mark.parametrize("kind", ["lstm", "gru_cho"])
def test_native_any_batch_shape_and_time_major(kind, batch_shape):
    cell, params, xs, carry = _setup(kind, batch_shape, seed=3)
    want = _loss_and_grads(cell, params, xs, carry, "xla")
    _close(_loss_and_grads(cell, params, xs, carry, "native"), want)
    xs_t = jnp.moveaxis(xs, -2, 0)
    c_t, ys_t = rnnjax.unroll(cell, params, xs_t, carry=carry, time_major=True, backend="native")
    _close((c_t, jnp.moveaxis(ys_t, 0, -2)), want[0])


@pytest.mark.parametrize("rows", [6, 9])
@pytest.mark.parametrize("kind", ["lstm", "gru", "gru_cho", "elman_tanh"])
def test_native_long_sequence_crosses_chunks(kind, rows):
    """The forward call projects the inputs a chunk of steps at a time (about 1 MiB of a thread's gates: 2^20 /
    (4 rows G) steps), in training and in inference, where it keeps only a chunk of gates. With G = 256 to 576
    gate columns that is 75 steps (GRU, 6 rows on one thread) to 256 (Elman, 4 of 9 rows on each of two threads),
    so 301 steps cross one to four chunk edges, the last chunk shorter; outputs, carries and gradients equal the
    XLA path's."""
    cell = {"lstm": cells.lstm(128), "gru": cells.gru(192), "gru_cho": cells.gru(192, reset_after=False),
            "elman_tanh": cells.elman(256)}[kind]
    params = cell.init(jax.random.key(4), F)
    xs = jax.random.normal(jax.random.key(5), (rows, 301, F))
    carry = jax.tree_util.tree_map(lambda z: jax.random.normal(jax.random.key(6), z.shape) * 0.5,
                                   cell.initial_carry(params, (rows,)))
    lengths = jnp.array([301, 1, 0, 150, 300, 64, 200, 85, 86][:rows])
    # Elman's gradients sum 301 steps of products in another order than XLA's: up to 5.2e-5 apart here, the same
    # with the kernels of before the per-step projection
    tol = 1e-4 if kind == "elman_tanh" else 2e-5
    for kw in ({}, dict(lengths=lengths, reverse=True)):
        want = _loss_and_grads(cell, params, xs, carry, "xla", **kw)
        _close(_loss_and_grads(cell, params, xs, carry, "native", **kw), want, tol=tol)
        _close(jax.jit(lambda p, x, c: rnnjax.unroll(cell, p, x, carry=c, backend="native", **kw))(params, xs, carry),
               want[0], tol=tol)


def test_native_input_gradient_is_left_out_when_unused():
    """dx is a kernel call of its own: a gradient of the parameters alone (a first layer over data) compiles
    without it, and one that takes dx has it, equal to the XLA path's."""
    cell, params, xs, carry = _setup("lstm", (4,), seed=13)

    def loss(p, x):
        return jnp.sum(rnnjax.unroll(cell, p, x, backend="native")[1] ** 2)

    def compiled_calls(argnums):
        hlo = jax.jit(jax.grad(loss, argnums)).lower(params, xs).compile().as_text()
        return hlo.count('custom_call_target="rnnjax_input_grad"'), hlo.count('custom_call_target="rnnjax_rnn_bwd"')

    assert compiled_calls(0) == (0, 1)
    assert compiled_calls((0, 1)) == (1, 1)
    _close(_loss_and_grads(cell, params, xs, carry, "native"), _loss_and_grads(cell, params, xs, carry, "xla"))


@pytest.mark.parametrize("kind", ["lstm", "gru", "gru_cho", "elman", "lstm_heads4"])
def test_native_small_batch_of_wide_products(kind):
    """16 rows whose per-step products have at least 2^22 multiply-adds: on CPUs without oneDNN's blocked matmul
    (AVX2) the kernels run such a batch as one team whose products and gate math use every core (elsewhere, and
    for the four-head cell's smaller products, as row shards); either way it equals the XLA path."""
    cell = {"lstm": cells.lstm(256), "gru": cells.gru(320), "gru_cho": cells.gru(320, reset_after=False),
            "elman": cells.elman(512), "lstm_heads4": cells.lstm(256, heads=4)}[kind]
    params = cell.init(jax.random.key(10), F)
    xs = jax.random.normal(jax.random.key(11), (16, 6, F))
    carry = cell.initial_carry(params, (16,))
    kw = dict(lengths=jnp.arange(16) % 7, resets=jax.random.bernoulli(jax.random.key(12), 0.2, (16, 6)))
    _close(_loss_and_grads(cell, params, xs, carry, "native", **kw), _loss_and_grads(cell, params, xs, carry, "xla",
                                                                                      **kw), tol=2e-5)


@pytest.mark.parametrize("kind", ["lstm", "gru", "gru_heads2"])
def test_native_under_vmap(kind):
    """vmap over inputs folds into the kernel's batch; per-example gradients and vmapped params (a population)
    run one call per slice; input gradients under both; all equal the XLA path."""
    cell, params, xs, _ = _setup(kind, (3, 4), seed=6)

    def run(name):
        ys = jax.vmap(lambda x: rnnjax.unroll(cell, params, x, backend=name)[1])(xs)
        per_example = jax.vmap(jax.grad(lambda p, x: rnnjax.unroll(cell, p, x, backend=name)[1].sum()),
                               (None, 0))(params, xs)
        stacked = jax.tree_util.tree_map(lambda a: jnp.stack([a, 2 * a, -a]), params)
        population = jax.vmap(lambda p, x: rnnjax.unroll(cell, p, x, backend=name)[1])(stacked, xs)
        # the input gradient's own call, folded into the batch (shared weights) or one per member (a population)
        dx = jax.vmap(jax.grad(lambda x: jnp.sum(rnnjax.unroll(cell, params, x, backend=name)[1] ** 2)))(xs)
        dx_population = jax.vmap(jax.grad(lambda p, x: jnp.sum(rnnjax.unroll(cell, p, x, backend=name)[1] ** 2),
                                          argnums=1))(stacked, xs)
        return ys, per_example, population, dx, dx_population

    run = jax.jit(run, static_argnums=0)  # one compile, not op by op (3x faster)
    _close(run("native"), run("xla"))


def test_native_layers_stack_and_bidirectional():
    model = layers.stack([layers.bidirectional(cells.lstm(8), backend="native"),
                          layers.rnn(cells.gru(8), backend="native")])
    reference = layers.stack([layers.bidirectional(cells.lstm(8), backend="xla"),
                              layers.rnn(cells.gru(8), backend="xla")])
    params = model.init(jax.random.key(0), F)
    xs = jax.random.normal(jax.random.key(1), (4, T, F))
    lengths = jnp.array([9, 4, 1, 7])

    def outputs_and_grads(m):
        return jax.jit(lambda p: (m.apply(p, xs, lengths=lengths),
                                  jax.grad(lambda q: jnp.sum(m.apply(q, xs, lengths=lengths)[1] ** 2))(p)))(params)

    _close(outputs_and_grads(model), outputs_and_grads(reference))


def _refusal(why):
    """The whole message of ``rnnjax.unroll(..., backend="native")`` refusing a call for reason ``why``."""
    return (f"rnnjax.unroll: backend='native' cannot run this call: {why}. "
            "Fix: pass backend='auto' (which falls back to XLA) or 'xla'.")


SETTINGS = ("has no native kernel with these settings (the kernels run lstm without peepholes or proj_size, gru, "
            "and elman with tanh or relu)")
NO_KERNEL = "has no native kernel (the kernels run lstm, gru and elman)"


@pytest.mark.parametrize("make, name, why", [
    (lambda: cells.lstm(8, peepholes=True), "lstm", SETTINGS),
    (lambda: cells.lstm(8, proj_size=4), "lstm", SETTINGS),
    (lambda: cells.layer_norm_gru(8), "layer_norm_gru", NO_KERNEL),
    (lambda: cells.mingru(8), "mingru", NO_KERNEL),
    (lambda: cells.elman(8, activation="sigmoid"), "elman", SETTINGS),
])
def test_native_refuses_what_it_cannot_run_and_auto_falls_back(make, name, why):
    cell = make()
    params = cell.init(jax.random.key(0), F)
    xs = jax.random.normal(jax.random.key(1), (2, T, F))
    with pytest.raises(ValueError) as e:
        rnnjax.unroll(cell, params, xs, backend="native")
    assert str(e.value) == _refusal(f"the cell {name!r} {why}")
    _close(rnnjax.unroll(cell, params, xs), rnnjax.unroll(cell, params, xs, backend="xla"))


def test_native_refuses_remat_with_the_reason():
    cell = cells.lstm(8)
    params = cell.init(jax.random.key(0), F)
    xs = jnp.ones((2, T, F))
    with pytest.raises(ValueError) as e:
        rnnjax.unroll(cell, params, xs, remat=4, backend="native")
    assert str(e.value) == _refusal("remat recomputes steps in the backward pass, which the native kernels do not")
    _close(rnnjax.unroll(cell, params, xs, remat=4), rnnjax.unroll(cell, params, xs, backend="xla"))


def test_unknown_backend_is_named():
    cell = cells.gru(4)
    params = cell.init(jax.random.key(0), F)
    with pytest.raises(ValueError) as e:
        rnnjax.unroll(cell, params, jnp.ones((T, F)), backend="cudnn")
    assert str(e.value) == ("rnnjax.unroll: backend must be one of 'auto', 'xla', 'native', got 'cudnn'. "
                            "Fix: pass one of those.")


def test_kernel_unavailable_falls_back_to_xla(monkeypatch):
    """Where the kernels cannot load, "auto" runs XLA (same numbers), "native" says why, and so does describe()."""
    monkeypatch.setattr(native, "status", lambda: native.Status(False, "this CPU lacks avx2 (the kernels need "
                                                                       "x86-64-v3)"))
    cell = cells.lstm(8)
    params = cell.init(jax.random.key(0), F)
    xs = jax.random.normal(jax.random.key(1), (3, T, F))
    assert backend.choose("f", "auto", backend.Request(cell, jnp.float32, None, "cpu")) is None
    _close(rnnjax.unroll(cell, params, xs), rnnjax.unroll(cell, params, xs, backend="xla"))
    with pytest.raises(ValueError) as e:
        rnnjax.unroll(cell, params, xs, backend="native")
    assert str(e.value) == _refusal("this CPU lacks avx2 (the kernels need x86-64-v3)")
    assert backend.describe(cell) == "xla (native cannot run it: this CPU lacks avx2 (the kernels need x86-64-v3))"


@pytest.mark.parametrize("make", [lambda: cells.lstm(50), lambda: cells.gru(100, heads=2)], ids=["lstm50", "gru_2x50"])
def test_native_weight_copies_past_one_tile(make):
    """The kernels copy W_hh (per head) and W_ih transposed in tiles of 16 rows by 128 columns: 50 hidden units (or
    heads of 50), 37 input features and 150-200 gate columns span full tiles and a partial one in both directions,
    values and every gradient."""
    cell = make()
    params = cell.init(jax.random.key(3), 37)
    xs = jax.random.normal(jax.random.key(4), (9, T, 37))
    carry = jax.tree_util.tree_map(lambda z: jax.random.normal(jax.random.key(5), z.shape) * 0.5,
                                   cell.initial_carry(params, (9,)))
    _close(_loss_and_grads(cell, params, xs, carry, "native"), _loss_and_grads(cell, params, xs, carry, "xla"))


@pytest.mark.parametrize("kind", ["lstm", "gru", "lstm_heads3",
                                  *(pytest.param(k, marks=pytest.mark.slow) for k in ("gru_cho", "elman_tanh"))])
def test_second_order_gradients_go_through_the_xla_reference(kind):
    """The kernels' derivatives are differentiated through the XLA path: grad of grad equals XLA's."""
    cell, params, xs, _ = _setup(kind, (3,), seed=11)
    lengths = jnp.array([9, 4, 0])

    def gradient_norm(p, x, name):
        inner = jax.grad(lambda q, y: jnp.sum(jnp.sin(rnnjax.unroll(cell, q, y, lengths=lengths, backend=name)[1])),
                         argnums=(0, 1))(p, x)
        return sum(jnp.sum(g ** 2) for g in jax.tree_util.tree_leaves(inner))

    second = jax.jit(jax.grad(gradient_norm, argnums=(0, 1)), static_argnums=2)
    _close(second(params, xs, "native"), second(params, xs, "xla"), tol=2e-5)


def test_native_bfloat16_needs_avx512(monkeypatch):
    """Without AVX-512 oneDNN has no bfloat16 matmul: "native" says so, "auto" runs the XLA policy."""
    monkeypatch.setattr(native, "cpu_flags", lambda: frozenset({"avx2", "fma", "f16c", "bmi2"}))
    cell = cells.lstm(8, dtype=jnp.bfloat16)
    params = cell.init(jax.random.key(0), F)
    xs = jax.random.normal(jax.random.key(1), (3, T, F))
    with pytest.raises(ValueError) as e:
        rnnjax.unroll(cell, params, xs, backend="native")
    assert str(e.value) == _refusal("bfloat16 products need AVX-512 (oneDNN has no bfloat16 matmul for this CPU, "
                                    "which lacks avx512f, avx512bw)")
    assert backend.choose("f", "auto", backend.Request(cell, jnp.bfloat16, None, "cpu")) is None
    _close(rnnjax.unroll(cell, params, xs), rnnjax.unroll(cell, params, xs, backend="xla"))
    assert backend.choose("f", "auto", backend.Request(cells.lstm(8), jnp.float32, None, "cpu")) is not None


@pytest.mark.skipif(not {"avx512f", "avx512bw"} <= native.cpu_flags(),
                    reason="oneDNN's bfloat16 matmul needs AVX-512 (test_native_bfloat16_needs_avx512)")
@pytest.mark.parametrize("option", ["lengths", "reverse_resets"])
@pytest.mark.parametrize("rows", [6, 9])
@pytest.mark.parametrize("kind", [*CELLS, *HEADS])
def test_native_bfloat16_policy_equals_the_xla_policy(kind, rows, option):
    """dtype=bfloat16 (float32 params): bf16 products with float32 accumulation and state in both backends, so
    they agree to bfloat16 tolerance; outputs come back in bfloat16, carries in float32. 6 rows run on one thread,
    9 on two; the gradients of the params and of the inputs (the input gradient's own call) are compared."""
    make = {"lstm": lambda: cells.lstm(12, dtype=jnp.bfloat16), "gru": lambda: cells.gru(12, dtype=jnp.bfloat16),
            "gru_cho": lambda: cells.gru(12, reset_after=False, dtype=jnp.bfloat16),
            "elman_tanh": lambda: cells.elman(12, dtype=jnp.bfloat16),
            "elman_relu": lambda: cells.elman(12, activation="relu", dtype=jnp.bfloat16),
            "lstm_heads3": lambda: cells.lstm(12, heads=3, dtype=jnp.bfloat16),
            "gru_heads2": lambda: cells.gru(12, heads=2, dtype=jnp.bfloat16),
            "gru_cho_heads4": lambda: cells.gru(12, reset_after=False, heads=4, dtype=jnp.bfloat16),
            "elman_relu_heads4": lambda: cells.elman(12, activation="relu", heads=4, dtype=jnp.bfloat16)}
    cell = make[kind]()
    params = cell.init(jax.random.key(0), F)
    xs = jax.random.normal(jax.random.key(1), (rows, T, F)).astype(jnp.bfloat16)
    kw = dict(lengths=jnp.array([9, 4, 0, 7, 9, 1, 3, 8, 5][:rows]))
    if option == "reverse_resets":
        kw.update(reverse=True, resets=jax.random.bernoulli(jax.random.key(2), 0.25, (rows, T)))

    def run(name):
        def loss(p, x):
            c, ys = rnnjax.unroll(cell, p, x, backend=name, **kw)
            return jnp.sum(ys.astype(jnp.float32) ** 2), (c, ys)

        return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, xs)

    (_, (c_n, y_n)), g_n = run("native")
    (_, (c_x, y_x)), g_x = run("xla")
    assert y_n.dtype == jnp.bfloat16 and all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(c_n))
    _close(y_n.astype(jnp.float32), y_x.astype(jnp.float32), tol=2e-2)
    _close(c_n, c_x, tol=1e-2)
    for a, b in zip(jax.tree_util.tree_leaves(g_n), jax.tree_util.tree_leaves(g_x), strict=True):
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
        assert float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) < 1e-2


def test_loading_the_kernels_keeps_subnormal_floats():
    """The kernels are compiled with -ffast-math but linked without it: gcc would otherwise link crtfastmath.o,
    whose constructor sets flush-to-zero for the whole process when the library loads, and every float
    computation of the user's program would lose its subnormal numbers."""
    assert native.available()
    tiny = np.finfo(np.float32).smallest_subnormal  # 2^-149; flush-to-zero would make the product 0
    assert float(np.float32(tiny) * np.float32(3.0)) == 3 * 2.0**-149
