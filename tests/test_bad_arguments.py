"""Bad arguments to the library, property-based (issue 19, point 7).

Hypothesis draws shapes, ranks, dtypes (floats, ints, bools, complex, strings, objects, ragged lists),
lengths, masks, carries and settings for every entry point. An independent oracle in this file says
whether the call is valid. A valid call must return what its twin returns: the unbatched, unpadded
sequence stepped one step at a time by a jitted ``cell.step`` (or the layer's own ``step``), NumPy for
the pointwise modules, greedy decoding step by step for ``generate``, one batch row at a time for
``beam_search``. An invalid call must raise ValueError or TypeError whose message starts with the
function's name, names the faulty argument, says what it got and how to fix it.

A valid call runs as a user's would (with the suite's compilation cache and XLA's optimisations off, the
file took 69 s in one process, against 93 s under ``jax.disable_jit()``, which compiles each primitive on
its own), and is also traced once per distinct signature with ``jax.eval_shape``, whose output must match
its shapes and dtypes. Profiles: "ci" (the default, 100 examples per entry point) and "long"
(``RNNJAX_HYPOTHESIS=long``, 2,000).
"""

from __future__ import annotations

import os
import re
from functools import cache, partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rnnjax
from rnnjax import cells, decode, layers
from rnnjax.models import generate, language_model

_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
settings.register_profile("ci", max_examples=100, deadline=None, derandomize=True, database=None,
                          suppress_health_check=_QUIET)
settings.register_profile("long", max_examples=2000, deadline=None, database=None, suppress_health_check=_QUIET)
PROFILE = settings.get_profile(os.environ.get("RNNJAX_HYPOTHESIS", "ci"))

F, H, V = 2, 3, 5
FLOATS = ("float32", "float16", "bfloat16", "float64")
BAD = ("int32", "uint8", "bool", "complex64", "str", "object")
JUNK = ("hello", b"ab", None, {"a": 1}, [[1.0], [1.0, 2.0]], 3 + 1j)
BATCHES = ((), (2,), (1,), (2, 2), (0,))


# ----------------------------------------------------------------------------
# Drawing values


def make(kind: str, shape, seed: int, low: int = -1, high: int = 5):
    rng = np.random.default_rng(seed)
    if kind in FLOATS:
        return np.asarray(rng.normal(size=shape), np.float32).astype(jnp.dtype(kind))
    if kind in ("int32", "uint8", "int64"):
        return rng.integers(max(low, 0) if kind == "uint8" else low, high + 1, size=shape).astype(kind)
    if kind == "bool":
        return rng.random(shape) < 0.6
    if kind == "complex64":
        return (rng.normal(size=shape) + 1j).astype(np.complex64)
    if kind == "str":
        return np.full(shape, "a")
    return np.full(shape, object())


def mutated(draw, shape: tuple) -> tuple:
    """``shape``, or one dimension dropped, added or changed."""
    choices = [shape, (*shape, 1), (3, *shape)]
    if shape:
        choices += [shape[:-1], (*shape[:-1], shape[-1] + 1)]
    return draw(st.sampled_from(choices))


@st.composite
def arrays(draw, shape: tuple, good: tuple, p_good: float = 0.8, low: int = -1, high: int = 5):
    """Mostly a ``good``-kind array of ``shape``; else a bad kind, a mutated shape or junk."""
    seed = draw(st.integers(0, 2**16))
    if draw(st.floats(0, 1)) < p_good:
        return make(draw(st.sampled_from(good)), shape, seed, low, high)
    fault = draw(st.sampled_from(("kind", "shape", "junk")))
    if fault == "junk":
        return draw(st.sampled_from(JUNK))
    kind = draw(st.sampled_from(BAD + FLOATS)) if fault == "kind" else draw(st.sampled_from(good))
    return make(kind, mutated(draw, shape) if fault == "shape" else shape, seed, low, high)


# ----------------------------------------------------------------------------
# The oracle: what a valid argument is


def held(x):
    """``x`` as JAX holds it (a NumPy array of the canonical dtype), or None if JAX cannot hold it."""
    try:
        return np.asarray(jnp.asarray(x))
    except (TypeError, ValueError):
        return None


def is_kind(a, kind: str) -> bool:
    if a is None:
        return False
    if kind == "float":
        return jnp.issubdtype(a.dtype, jnp.floating)
    if kind == "int":
        return jnp.issubdtype(a.dtype, jnp.integer)
    return a.dtype == np.bool_


def carry_ok(carry, expected) -> bool:
    if isinstance(carry, list) and type(expected) is tuple:  # a stack's or bidirectional layer's carries: either
        carry = tuple(carry)
    leaves, tree = jax.tree_util.tree_flatten(carry)
    want, want_tree = jax.tree_util.tree_flatten(expected)
    return tree == want_tree and all(
        (a := held(g)) is not None and a.shape == w.shape and a.dtype == w.dtype for g, w in zip(leaves, want))


def sequence_faults(xs, lengths, mask, time_major, input_size) -> tuple[list[str], tuple, int]:
    """The names of the invalid arguments among xs, lengths and mask, the batch shape and T."""
    a = held(xs)
    if not is_kind(a, "float") or a.ndim < 2 or a.shape[-1] != input_size or a.shape[0 if time_major else -2] < 1:
        return ["xs"], (), 0
    T = a.shape[0 if time_major else -2]
    batch = a.shape[1:-1] if time_major else a.shape[:-2]
    faults = []
    if lengths is not None:
        n = held(lengths)
        if not is_kind(n, "int") or n.shape != batch or (n.size and (n.min() < 0 or n.max() > T)):
            faults.append("lengths")
    if mask is not None:
        m = held(mask)
        if not is_kind(m, "bool") or m.shape != ((T, *batch) if time_major else (*batch, T)):
            faults.append("mask")
    return faults, batch, T


def valid_steps(batch, T, lengths, mask, time_major) -> np.ndarray:
    """``[*B, T]`` booleans: the steps the twin runs."""
    valid = np.ones((*batch, T), bool)
    if lengths is not None:
        valid &= np.arange(T) < held(lengths)[..., None]
    if mask is not None:
        valid &= np.moveaxis(held(mask), 0, -1) if time_major else held(mask)
    return valid


# ----------------------------------------------------------------------------
# Calling: a valid call (values and one trace per signature), an invalid one (its message)

_traced: set = set()


def call_valid(key: str, fn, arrays: dict, **statics):
    """``fn(**arrays, **statics)``; traced with ``eval_shape`` once per signature (``key``, the arrays'
    shapes and dtypes, the statics), whose output must have the same shapes and dtypes."""
    out = fn(**arrays, **statics)
    given_ = {k: jax.tree_util.tree_map(jnp.asarray, v) for k, v in arrays.items() if v is not None}
    none = {k: None for k, v in arrays.items() if v is None}
    signature = (key, str(jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), given_)), sorted(none), repr(statics))
    if repr(signature) not in _traced:
        _traced.add(repr(signature))
        shapes = jax.eval_shape(lambda a: fn(**a, **none, **statics), given_)
        assert jax.tree_util.tree_map(lambda s: (s.shape, s.dtype), shapes) == \
            jax.tree_util.tree_map(lambda o: (o.shape, o.dtype), out)
    return out


def assert_refused(name: str, faults: list[str], fn, *args, **kwargs) -> None:
    with pytest.raises((ValueError, TypeError)) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert message.startswith(f"{name}: "), message
    # the faulty argument named as a word before the fix ("x" would otherwise match the "x" of "Fix")
    said, _, _ = message.partition("Fix: ")
    assert any(re.search(rf"\b{re.escape(f)}\b", said) for f in faults), (faults, message)
    assert "got" in said and "Fix: " in message, message


def assert_refused_by(names: tuple[str, ...], faults: list[str], fn, *args, **kwargs) -> None:
    """As :func:`assert_refused`, where the refusal may come from any of ``names`` (a layer, or the
    ``rnnjax.unroll`` it runs)."""
    with pytest.raises((ValueError, TypeError)) as info:
        fn(*args, **kwargs)
    assert str(info.value).startswith(tuple(f"{n}: " for n in names)), str(info.value)
    assert_refused(str(info.value).split(":")[0], faults, fn, *args, **kwargs)


def close(a, b, atol=2e-5):
    """Leaf by leaf (a list of per-layer carries given and held comes back as the layer's tuple)."""
    a, b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(a) == len(b), (len(a), len(b))
    for x, y in zip(a, b):
        np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), atol=atol, rtol=2e-5)


# ----------------------------------------------------------------------------
# Twins: the unbatched, unpadded sequence one step at a time

CELLS = {"lstm": cells.lstm(H), "gru": cells.gru(H), "mingru": cells.mingru(H)}
PARAMS = {name: cell.init(jax.random.key(1), F) for name, cell in CELLS.items()}


def projected_step(cell, params):
    """``cell``'s whole step (projection included) on one unbatched input, jitted."""
    return jax.jit(lambda c, x: cell.step(params, c, cell.project(params, x)))


@cache
def cell_step(name):
    return projected_step(CELLS[name], PARAMS[name])


def stepped(step, carry0, xs, valid, reverse=False):
    """``(carry, ys)`` of ``step`` run row by row over the valid steps of ``xs [*B, T, F]`` (batch-major)."""
    batch, T = xs.shape[:-2], xs.shape[-2]
    carries, ys = [], {}
    for idx in np.ndindex(*batch):
        c = jax.tree_util.tree_map(lambda a: a[idx], carry0)
        order = [t for t in range(T) if valid[idx][t]]
        for t in reversed(order) if reverse else order:
            c, ys[idx + (t,)] = step(c, xs[idx + (t,)])
        carries.append(c)
    return carries, ys


def assert_twin(carry, ys, carries, twin_ys, batch, T, time_major):
    ys = np.asarray(ys if not time_major else np.moveaxis(np.asarray(ys), 0, -2))
    expected = np.zeros_like(ys)
    for idx, y in twin_ys.items():
        expected[idx] = y
    close(ys, expected)
    for i, idx in enumerate(np.ndindex(*batch)):
        close(jax.tree_util.tree_map(lambda a: a[idx], carry), carries[i])
    assert ys.shape[:-1] == (*batch, T)


# ----------------------------------------------------------------------------
# rnnjax.unroll and layers.rnn / bidirectional


@st.composite
def sequences(draw, input_size=F, carry_of=None):
    """``(xs, lengths, mask, carry, time_major)``; ``carry_of(batch)``: the expected carry."""
    time_major = draw(st.booleans())
    batch, T = draw(st.sampled_from(BATCHES)), draw(st.integers(0, 3))
    xs = draw(arrays((T, *batch, input_size) if time_major else (*batch, T, input_size), FLOATS, p_good=0.85))
    lengths = draw(st.none() | arrays(batch, ("int32", "int64", "uint8"), low=0 if draw(st.booleans()) else -1,
                                      high=T if draw(st.booleans()) else T + 1))
    mask = draw(st.none() | arrays((T, *batch) if time_major else (*batch, T), ("bool",)))
    carry = None
    if carry_of is not None and draw(st.booleans()):
        good = carry_of(draw(st.sampled_from([batch, batch, (3,), (2, 1)])))
        seed = draw(st.integers(0, 100))
        carry = jax.tree_util.tree_map(lambda s: make(draw(st.sampled_from(
            ("float32",) * 6 + ("float16", "int32", "str"))), s.shape, seed), good)
        carry = draw(st.sampled_from([carry] * 6 + [list(carry) if isinstance(carry, tuple) else [carry], "abc",
                                                    (carry, carry)]))
    return xs, lengths, mask, carry, time_major


def sequence_case(cell_names, input_size, data, carry_of):
    xs, lengths, mask, carry, time_major = data
    faults, batch, T = sequence_faults(xs, lengths, mask, time_major, input_size)
    if carry is not None and not faults and not carry_ok(carry, carry_of(batch)):
        faults.append("carry")
    return faults, batch, T


def carry_of(name):
    cell, params = CELLS[name], PARAMS[name]
    return lambda batch: jax.eval_shape(lambda: cell.initial_carry(params, batch))


def batch_major(xs, time_major):
    a = held(xs)
    return np.moveaxis(a, 0, -2) if time_major else a


@PROFILE
@given(name=st.sampled_from(sorted(CELLS)), reverse=st.booleans(), data=st.data(),
       as_layer=st.booleans())
def test_unroll_and_the_rnn_layer(name, reverse, data, as_layer):
    cell, params = CELLS[name], PARAMS[name]
    case = data.draw(sequences(carry_of=carry_of(name)))
    xs, lengths, mask, carry, time_major = case
    faults, batch, T = sequence_case(name, F, case, carry_of(name))
    arrays_in = dict(xs=xs, carry=carry, lengths=lengths, mask=mask)
    if as_layer:
        fn, statics = partial(layers.rnn(cell, reverse=reverse).apply, params), {}
    else:
        fn, statics = partial(rnnjax.unroll, cell, params), dict(reverse=reverse)
    if faults:
        return assert_refused("rnnjax.unroll", faults, fn, **arrays_in, time_major=time_major, **statics)
    out_carry, ys = call_valid(f"unroll {name} {as_layer}", fn, arrays_in, time_major=time_major, **statics)
    carry0 = cell.initial_carry(params, batch) if carry is None else carry
    twin = stepped(cell_step(name), carry0, batch_major(xs, time_major), valid_steps(batch, T, lengths, mask,
                                                                                      time_major), reverse)
    assert_twin(out_carry, ys, *twin, batch, T, time_major)


BIDI = layers.bidirectional(CELLS["gru"], CELLS["lstm"])
BIDI_PARAMS = BIDI.init(jax.random.key(2), F)
BIDI_STEPS = (projected_step(CELLS["gru"], BIDI_PARAMS.forward), projected_step(CELLS["lstm"], BIDI_PARAMS.backward))


@PROFILE
@given(data=st.data())
def test_bidirectional_layer(data):
    expected = lambda batch: jax.eval_shape(lambda: BIDI.initial_carry(BIDI_PARAMS, batch))  # noqa: E731
    case = data.draw(sequences(carry_of=expected))
    xs, lengths, mask, carry, time_major = case
    faults, batch, T = sequence_case(None, F, case, expected)
    arrays_in = dict(xs=xs, carry=carry, lengths=lengths, mask=mask)
    fn = partial(BIDI.apply, BIDI_PARAMS)
    if carry is not None and not (isinstance(carry, (tuple, list)) and len(carry) == 2):
        return assert_refused("rnnjax.layers.bidirectional", ["carry"], fn, **arrays_in, time_major=time_major)
    if faults:
        return assert_refused("rnnjax.unroll", faults, fn, **arrays_in, time_major=time_major)
    (c_f, c_b), ys = call_valid("bidirectional", fn, arrays_in, time_major=time_major)
    carry0 = BIDI.initial_carry(BIDI_PARAMS, batch) if carry is None else carry
    valid, x = valid_steps(batch, T, lengths, mask, time_major), batch_major(xs, time_major)
    fwd = stepped(BIDI_STEPS[0], carry0[0], x, valid)
    bwd = stepped(BIDI_STEPS[1], carry0[1], x, valid, reverse=True)
    ys = ys if not time_major else np.moveaxis(np.asarray(ys), 0, -2)
    assert_twin(c_f, ys[..., :H], *fwd, batch, T, False)
    assert_twin(c_b, ys[..., H:], *bwd, batch, T, False)


# ----------------------------------------------------------------------------
# layers.stack and layers.residual_block: the twin is the layer's own step, one step at a time

STACK = layers.stack([CELLS["lstm"], CELLS["gru"]], residual=True, layer_norm=True)
BLOCK = layers.residual_block(cells.mingru(F))
STREAMED = {"rnnjax.layers.stack": (STACK, STACK.init(jax.random.key(3), F)),
            "rnnjax.layers.residual_block": (BLOCK, BLOCK.init(jax.random.key(4), F))}
STREAM_STEPS = {name: jax.jit(partial(layer.step, params)) for name, (layer, params) in STREAMED.items()}


@PROFILE
@given(name=st.sampled_from(sorted(STREAMED)), data=st.data())
def test_stack_and_residual_block(name, data):
    layer, params = STREAMED[name]
    expected = lambda batch: jax.eval_shape(lambda: layer.initial_carry(params, batch))  # noqa: E731
    case = data.draw(sequences(carry_of=expected))
    xs, lengths, mask, carry, time_major = case
    arrays_in = dict(xs=xs, carry=carry, lengths=lengths, mask=mask)
    fn = partial(layer.apply, params)
    a = held(xs)
    if not is_kind(a, "float") or (a.ndim >= 1 and a.shape[-1] != F) or a.ndim == 0:
        return assert_refused_by((name, "rnnjax.unroll"), ["xs"], fn, **arrays_in, time_major=time_major)
    stack_carry = isinstance(carry, (tuple, list)) and len(carry) == 2
    if name == "rnnjax.layers.stack" and carry is not None and not stack_carry:
        return assert_refused(name, ["carry"], fn, **arrays_in, time_major=time_major)
    faults, batch, T = sequence_case(None, F, case, expected)
    if faults == ["xs"]:  # T = 0: the stack's and block's own lengths and mask checks may come first
        faults += ["lengths", "mask"]
    if faults:
        return assert_refused_by((name, "rnnjax.unroll"), faults, fn, **arrays_in, time_major=time_major)
    out_carry, ys = call_valid(name, fn, arrays_in, time_major=time_major)
    carry0 = layer.initial_carry(params, batch) if carry is None else carry
    twin = stepped(STREAM_STEPS[name], carry0, batch_major(xs, time_major), valid_steps(batch, T, lengths, mask,
                                                                                        time_major))
    assert_twin(out_carry, ys, *twin, batch, T, time_major)


# ----------------------------------------------------------------------------
# rnnjax.step


@PROFILE
@given(name=st.sampled_from(sorted(CELLS)), data=st.data())
def test_step(name, data):
    cell, params = CELLS[name], PARAMS[name]
    batch = data.draw(st.sampled_from(BATCHES))
    x = data.draw(arrays((*batch, F), FLOATS))
    a = held(x)
    x_ok = is_kind(a, "float") and a.ndim >= 1 and a.shape[-1] == F
    b = a.shape[:-1] if x_ok else batch
    carry = data.draw(st.sampled_from(["zeros", "random", "random", "other batch", "abc", "list"]))
    good = cell.initial_carry(params, b)
    carry = {"zeros": good, "random": jax.tree_util.tree_map(lambda z: z + 0.5, good), "abc": "abc",
             "other batch": cell.initial_carry(params, (3, *b)),
             "list": list(good) if isinstance(good, tuple) else [good]}[carry]
    reset = data.draw(st.none() | arrays(b, ("bool",)))
    faults = [] if x_ok else ["x"]
    if not faults and not carry_ok(carry, jax.eval_shape(lambda: good)):
        faults.append("carry")
    r = held(reset)
    if not faults and reset is not None and not (is_kind(r, "bool") and r.shape == b):
        faults.append("reset")
    fn = partial(rnnjax.step, cell, params)
    if faults:
        return assert_refused("rnnjax.step", faults, fn, carry, x, reset=reset)
    out = call_valid(f"step {name}", lambda **k: fn(k["carry"], k["x"], reset=k["reset"]),
                     dict(carry=carry, x=x, reset=reset))
    for idx in np.ndindex(*b):
        c = jax.tree_util.tree_map(lambda v: v[idx], good if reset is not None and r[idx] else carry)
        close(jax.tree_util.tree_map(lambda v: v[idx], out), cell_step(name)(c, a[idx]))


# ----------------------------------------------------------------------------
# The pointwise modules: dense, embedding, layer_norm, against NumPy

DENSE = layers.dense(H)
DENSE_PARAMS = DENSE.init(jax.random.key(5), F)
EMBED = layers.embedding(V, H)
TABLE = EMBED.init(jax.random.key(6))
NORM = layers.layer_norm()
NORM_PARAMS = (jnp.asarray([1.5, 0.5]), jnp.asarray([0.1, -0.2]))


def dense_reference(x):
    return x.astype(np.float64) @ np.asarray(DENSE_PARAMS.w, np.float64) + np.asarray(DENSE_PARAMS.b)


def norm_reference(x):
    x = x.astype(np.float64)
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-5) * np.asarray(NORM_PARAMS[0]) + np.asarray(NORM_PARAMS[1])


MODULES = {"rnnjax.layers.dense": (partial(DENSE.apply, DENSE_PARAMS), "x", "float", dense_reference),
           "rnnjax.layers.layer_norm": (partial(NORM.apply, NORM_PARAMS), "x", "float", norm_reference),
           "rnnjax.layers.embedding": (partial(EMBED.apply, TABLE), "ids", "int", lambda ids: np.asarray(TABLE)[ids])}


@PROFILE
@given(name=st.sampled_from(sorted(MODULES)), data=st.data())
def test_pointwise_modules(name, data):
    fn, arg, kind, reference = MODULES[name]
    shape = data.draw(st.sampled_from(BATCHES)) + ((F,) if kind == "float" else (data.draw(st.integers(0, 3)),))
    x = data.draw(arrays(shape, FLOATS if kind == "float" else ("int32", "uint8", "int64"), low=0, high=V - 1))
    if kind == "int" and data.draw(st.booleans()):
        x = data.draw(arrays(shape, ("int32",), low=-1, high=V))
    a = held(x)
    if kind == "float":
        ok = is_kind(a, "float") and a.ndim >= 1 and a.shape[-1] == F
    else:
        ok = is_kind(a, "int") and (a.size == 0 or 0 <= a.min() <= a.max() < V)
    if not ok:
        return assert_refused(name, [arg], fn, x)
    low = a.dtype in (jnp.float16, jnp.bfloat16)  # rounded to 8 or 11 bits
    out = call_valid(name, lambda **k: fn(k[arg]), {arg: x})
    np.testing.assert_allclose(np.asarray(out, np.float64), reference(a), atol=2e-2 if low else 1e-4,
                               rtol=2e-2 if low else 1e-5)


# ----------------------------------------------------------------------------
# models.generate (greedy, or top_k=1: the twin is greedy decoding one row and one step at a time)
# and decode.beam_search (the twin: one batch row at a time)

LM = language_model(V, cell="gru", layers=1, hidden=4, embed=3)
LM_PARAMS = LM.init(jax.random.key(7))
LM_STEP = jax.jit(partial(LM.step, LM_PARAMS))


def greedy_twin(prompt, length):
    carry = LM.initial_carry(LM_PARAMS)
    for token in prompt:
        carry, logits = LM_STEP(carry, token)
    out = []
    for _ in range(length):
        out.append(int(np.argmax(logits)))
        carry, logits = LM_STEP(carry, out[-1])
    return out


@PROFILE
@given(data=st.data())
def test_generate(data):
    shape = data.draw(st.sampled_from(BATCHES)) + (data.draw(st.integers(0, 3)),)
    prompt = data.draw(arrays(shape, ("int32", "uint8", "int64"), low=0, high=V - 1, p_good=0.7))
    if data.draw(st.booleans()):
        prompt = data.draw(arrays(shape, ("int32",), low=-1, high=V))
    length = data.draw(st.sampled_from([0, 1, 3, 3, -1, 2.0, "3"]))
    temperature = data.draw(st.sampled_from([0, 0.0, 0.7, 0.7, -1.0, "1"]))
    top_k = data.draw(st.sampled_from([1, 1, 0, V + 1, 1.5] + ([None] if temperature == 0 else [])))
    key = data.draw(st.sampled_from([jax.random.key(0)] * 4 + [3, "key", jax.random.split(jax.random.key(0), 2)]))
    a = held(prompt)
    faults = []
    if not (is_kind(a, "int") and a.ndim >= 1 and a.shape[-1] >= 1):
        faults.append("prompt_ids")
    elif a.size and not 0 <= a.min() <= a.max() < V:
        faults.append("prompt_ids")
    for name, _value, ok in (("length", length, isinstance(length, int) and length >= 0),
                            ("temperature", temperature, isinstance(temperature, (int, float)) and temperature >= 0),
                            ("top_k", top_k, top_k is None or (isinstance(top_k, int) and 1 <= top_k <= V))):
        if not ok:
            faults.append(name)
    if not (isinstance(key, jax.Array) and key.shape == ()):
        faults.append("key")
    fn = partial(generate, LM, LM_PARAMS)
    kwargs = dict(temperature=temperature, top_k=top_k)
    if faults:
        return assert_refused("rnnjax.models.generate", faults, fn, key, prompt, length, **kwargs)
    out = fn(key, prompt, length, **kwargs)
    assert out.shape == (*a.shape[:-1], length) and out.dtype == jnp.int32
    for idx in np.ndindex(*a.shape[:-1]):
        assert list(np.asarray(out[idx])) == greedy_twin(list(a[idx]), length)


BEAM_STEP = lambda carry, tokens, context: LM.step(LM_PARAMS, carry, tokens)  # noqa: E731


@PROFILE
@given(data=st.data())
def test_beam_search(data):
    B = data.draw(st.sampled_from([1, 2, 3]))
    start = data.draw(arrays((B,), ("int32", "uint8"), low=0, high=V - 1, p_good=0.8))
    carry = data.draw(st.sampled_from(["zeros"] * 5 + ["other batch", "abc"]))
    carry = {"zeros": LM.initial_carry(LM_PARAMS, (B,)), "abc": "abc",
             "other batch": LM.initial_carry(LM_PARAMS, (B + 1,))}[carry]
    beam_width = data.draw(st.sampled_from([1, 2, 2, 3, 0, V + 1, True, 2.0]))
    settings_ = dict(beam_width=beam_width,
                     nbest=data.draw(st.sampled_from([1, 1, 2, 0])),
                     vocab_size=data.draw(st.sampled_from([V] * 6 + [V + 2, V - 1, "5", 5.0])),
                     length_penalty=data.draw(st.sampled_from([0.0, 0.0, 1.0, "a", float("nan")])),
                     eos_id=data.draw(st.sampled_from([2, 2, 2, V, -1])), max_length=data.draw(st.sampled_from(
                         [3, 3, 0, 1.5])))
    a = held(start)
    checks = {
        "max_length": isinstance(settings_["max_length"], int) and settings_["max_length"] >= 1,
        "vocab_size": type(settings_["vocab_size"]) is int and settings_["vocab_size"] == V,
        "length_penalty": isinstance(settings_["length_penalty"], float) and np.isfinite(settings_["length_penalty"]),
        "eos_id": 0 <= settings_["eos_id"] < V,
        "beam_width": type(beam_width) is int and 1 <= beam_width <= V,
        "nbest": type(beam_width) is int and 1 <= settings_["nbest"] <= beam_width,
        "start": is_kind(a, "int") and a.ndim == 1,
        "carry": carry_ok(carry, jax.eval_shape(lambda: LM.initial_carry(
            LM_PARAMS, a.shape[:1] if is_kind(a, "int") and a.ndim == 1 else (B,)))),
    }
    faults = [name for name, ok in checks.items() if not ok]  # vocab_size V +- 1: refused when the step is traced
    fn = partial(decode.beam_search, BEAM_STEP)
    if faults:
        return assert_refused("rnnjax.decode.beam_search", faults, fn, carry, start, **settings_)
    out = fn(carry, start, **settings_)
    for b in range(B):
        row = fn(jax.tree_util.tree_map(lambda c: c[b:b + 1], carry), start[b:b + 1], **settings_)
        np.testing.assert_array_equal(np.asarray(out.tokens[b]), np.asarray(row.tokens[0]))
        close((out.log_probs[b], out.scores[b]), (row.log_probs[0], row.scores[0]))
