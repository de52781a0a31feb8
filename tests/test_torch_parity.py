"""rnnjax.interop.torch against PyTorch itself: nn.RNN / nn.LSTM / nn.GRU are the oracle.

Forward values (outputs, h_n, c_n) on ragged batches run through
pack_padded_sequence / pad_packed_sequence, gradients of every weight, of the
inputs and of the initial carry, weight round trips, unbatched inputs, jit,
and the error messages.
"""

from __future__ import annotations

import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence  # noqa: E402

from rnnjax import layers  # noqa: E402
from rnnjax.interop.torch import TorchModel, TorchSpec, from_torch, to_state_dict, to_torch  # noqa: E402

torch.set_default_dtype(torch.float32)
torch.set_num_threads(1)  # xdist runs one worker per core; tiny problems gain nothing from more threads

# torch's CPU LSTM falls back from oneDNN for proj_size > 0 and says so; the fallback is the reference we want.
pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN:UserWarning")

F, H, P, T, B = 5, 7, 3, 6, 4
TOL = dict(atol=1e-5, rtol=1e-5)

KINDS = {
    "rnn_tanh": lambda **kw: nn.RNN(F, H, nonlinearity="tanh", **kw),
    "rnn_relu": lambda **kw: nn.RNN(F, H, nonlinearity="relu", **kw),
    "lstm": lambda **kw: nn.LSTM(F, H, **kw),
    "lstm_proj": lambda **kw: nn.LSTM(F, H, proj_size=P, **kw),
    "gru": lambda **kw: nn.GRU(F, H, **kw),
}
SHAPES = {"single": dict(num_layers=1, bidirectional=False), "deep_bi": dict(num_layers=2, bidirectional=True)}

# (kind, shape, batch_first, bias): every kind in both shapes and both layouts, plus bias=False for every kind.
CASES = [
    pytest.param(kind, shape, batch_first, True, id=f"{kind}-{shape}-{'bf' if batch_first else 'tm'}")
    for kind in KINDS for shape in SHAPES for batch_first in (False, True)
] + [pytest.param(kind, "deep_bi", False, False, id=f"{kind}-deep_bi-tm-nobias") for kind in KINDS]


@pytest.fixture(autouse=True)
def _float32_torch():
    torch.set_default_dtype(torch.float32)
    assert torch.get_default_dtype() == torch.float32
    assert not jax.config.jax_enable_x64


def make_module(kind, shape="single", batch_first=False, bias=True, seed=0):
    torch.manual_seed(seed)
    return KINDS[kind](batch_first=batch_first, bias=bias, **SHAPES[shape])


def is_lstm(m):
    return isinstance(m, nn.LSTM)


def random_lengths(rng):
    """A ragged batch in no particular order, with one sequence of length 1 and one of full length."""
    lengths = np.concatenate([[1, T], rng.integers(1, T + 1, size=B - 2)])
    return rng.permutation(lengths).astype(np.int64)


def random_inputs(m, rng, batch_first=None):
    batch_first = m.batch_first if batch_first is None else batch_first
    shape = (B, T, F) if batch_first else (T, B, F)
    return rng.normal(size=shape).astype(np.float32)


def random_carry(m, rng, batch=(B,)):
    n = m.num_layers * (2 if m.bidirectional else 1)
    h_out = m.proj_size if is_lstm(m) and m.proj_size else m.hidden_size
    h0 = (0.5 * rng.normal(size=(n, *batch, h_out))).astype(np.float32)
    if is_lstm(m):
        return h0, (0.5 * rng.normal(size=(n, *batch, m.hidden_size))).astype(np.float32)
    return h0


def to_t(tree, requires_grad=False):
    if tree is None:
        return None
    if isinstance(tree, tuple):
        return tuple(to_t(a, requires_grad) for a in tree)
    return torch.tensor(tree, requires_grad=requires_grad)


def torch_forward(m, x, lengths, carry=None):
    """The oracle: pack -> module -> pad back to T."""
    packed = pack_padded_sequence(x, torch.as_tensor(lengths), batch_first=m.batch_first, enforce_sorted=False)
    out, state = m(packed, carry)
    out, _ = pad_packed_sequence(out, batch_first=m.batch_first, total_length=T)
    return out, state


def flat_state(state):
    return list(state) if isinstance(state, tuple) else [state]


def assert_close(actual, expected, **kw):
    if isinstance(actual, torch.Tensor):
        actual = actual.detach().numpy()
    if isinstance(expected, torch.Tensor):
        expected = expected.detach().numpy()
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), **{**TOL, **kw})


def run(model, params, xs, lengths=None, carry=None):
    """The model under jit: one compilation per test instead of one per scan (eager lax.scan recompiles on
    every call); test_jit_with_traced_lengths checks that jit and eager agree."""
    return jax.jit(model)(params, xs, lengths, carry)


def jax_leaf(params, name, bidirectional):
    """The JAX params leaf holding torch parameter ``name``, in torch's layout (written independently of the
    library's own mapping)."""
    kind, which, k, rev = re.fullmatch(r"(weight|bias)_(ih|hh|hr)_l(\d+)(_reverse)?", name).groups()
    p = params.layers[int(k)]
    if bidirectional:
        assert isinstance(p, layers.BidirectionalParams)
        p = p.backward if rev else p.forward
    leaf = getattr(p, ("w_" if kind == "weight" else "b_") + which)
    return np.asarray(leaf).T if kind == "weight" else np.asarray(leaf)


# ---------------------------------------------------------------- forward


@pytest.mark.parametrize("kind, shape, batch_first, bias", CASES)
def test_forward_matches_packed_torch(kind, shape, batch_first, bias):
    m = make_module(kind, shape, batch_first, bias)
    rng = np.random.default_rng(1)
    x, lengths = random_inputs(m, rng), random_lengths(rng)
    model, params = from_torch(m)
    with torch.no_grad():
        out_t, state_t = torch_forward(m, torch.tensor(x), lengths)
    out_j, state_j = run(model, params, jnp.asarray(x), jnp.asarray(lengths))
    D = 2 if m.bidirectional else 1
    h_out = P if kind == "lstm_proj" else H
    assert out_j.shape == ((B, T, D * h_out) if batch_first else (T, B, D * h_out))
    assert_close(out_j, out_t)
    assert len(flat_state(state_j)) == len(flat_state(state_t)) == (2 if is_lstm(m) else 1)
    for a, b in zip(flat_state(state_j), flat_state(state_t)):
        assert a.shape == tuple(b.shape)
        assert_close(a, b)
    # Zero past each length, exactly (as pad_packed_sequence gives).
    valid = np.arange(T)[None, :] < lengths[:, None]  # [B, T]
    out_bt = np.asarray(out_j) if batch_first else np.asarray(out_j).transpose(1, 0, 2)
    assert np.all(out_bt[~valid] == 0)


@pytest.mark.parametrize("kind", KINDS)
def test_forward_with_initial_carry(kind):
    m = make_module(kind, "deep_bi", batch_first=True, seed=3)
    rng = np.random.default_rng(4)
    x, lengths, carry = random_inputs(m, rng), random_lengths(rng), random_carry(m, rng)
    model, params = from_torch(m)
    with torch.no_grad():
        out_t, state_t = torch_forward(m, torch.tensor(x), lengths, to_t(carry))
    out_j, state_j = run(model, params, x, lengths, carry)
    assert_close(out_j, out_t)
    for a, b in zip(flat_state(state_j), flat_state(state_t)):
        assert_close(a, b)


@pytest.mark.parametrize("kind", KINDS)
def test_forward_without_lengths(kind):
    m = make_module(kind, "deep_bi", seed=5)
    x = random_inputs(m, np.random.default_rng(6))
    model, params = from_torch(m)
    with torch.no_grad():
        out_t, state_t = m(torch.tensor(x))
    out_j, state_j = run(model, params, x)
    assert_close(out_j, out_t)
    for a, b in zip(flat_state(state_j), flat_state(state_t)):
        assert_close(a, b)


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("kind, shape, batch_first, bias", CASES)
def test_gradients_match_torch(kind, shape, batch_first, bias):
    """d/d(inputs, initial carry, every weight) of sum(out*R1) + sum(h_n*R2) (+ sum(c_n*R3))."""
    m = make_module(kind, shape, batch_first, bias, seed=7)
    rng = np.random.default_rng(8)
    x, lengths, carry = random_inputs(m, rng), random_lengths(rng), random_carry(m, rng)
    model, params = from_torch(m)

    # torch
    x_t, carry_t = torch.tensor(x, requires_grad=True), to_t(carry, requires_grad=True)
    out_t, state_t = torch_forward(m, x_t, lengths, carry_t)
    rs = [rng.normal(size=tuple(a.shape)).astype(np.float32) for a in [out_t, *flat_state(state_t)]]
    loss_t = sum((a * torch.tensor(r)).sum() for a, r in zip([out_t, *flat_state(state_t)], rs))
    loss_t.backward()

    # JAX
    def loss(params, xs, carry):
        out, state = model(params, xs, lengths=jnp.asarray(lengths), carry=carry)
        return sum(jnp.sum(a * r) for a, r in zip([out, *flat_state(state)], rs))

    loss_j, (g_params, g_x, g_carry) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(
        params, jnp.asarray(x), jax.tree_util.tree_map(jnp.asarray, carry))

    assert_close(loss_j, loss_t.detach().numpy(), atol=1e-4)
    assert_close(g_x, x_t.grad)
    for g, c in zip(flat_state(g_carry), flat_state(carry_t)):
        assert_close(g, c.grad)
    named = dict(m.named_parameters())
    assert len(named) == len(jax.tree_util.tree_leaves(g_params))
    for name, p in named.items():
        assert p.grad is not None, name
        assert_close(jax_leaf(g_params, name, m.bidirectional), p.grad, err_msg=name)


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("kind, shape, batch_first, bias", CASES)
def test_round_trip_state_dict_is_exact(kind, shape, batch_first, bias):
    m = make_module(kind, shape, batch_first, bias, seed=9)
    model, params = from_torch(m)
    back = to_torch(model, params)
    assert type(back) is type(m)
    for attr in ("mode", "input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
                 "bidirectional", "proj_size", "nonlinearity"):
        assert getattr(back, attr, None) == getattr(m, attr, None), attr
    sd, sd_back = m.state_dict(), back.state_dict()
    assert list(sd_back) == list(sd)
    for name in sd:
        assert sd_back[name].dtype == torch.float32
        assert torch.equal(sd_back[name], sd[name]), name
    # The torch-free view uses the same names and values.
    arrays = to_state_dict(model, params)
    assert list(arrays) == list(sd)
    for name, a in arrays.items():
        np.testing.assert_array_equal(a, sd[name].numpy())


def test_params_leaves_are_float32_transposed():
    m = make_module("lstm_proj", "deep_bi", seed=10)
    model, params = from_torch(m)
    assert isinstance(params, layers.StackParams) and params.norms is None
    for leaf in jax.tree_util.tree_leaves(params):
        assert isinstance(leaf, jax.Array) and leaf.dtype == jnp.float32
    fwd = params.layers[1].forward
    assert fwd.w_ih.shape == (2 * P, 4 * H) and fwd.w_hh.shape == (P, 4 * H) and fwd.w_hr.shape == (H, P)
    np.testing.assert_array_equal(np.asarray(params.layers[0].backward.w_hr), m.weight_hr_l0_reverse.detach().numpy().T)
    assert fwd.w_peep is None
    assert model.layer.output_size == 2 * P


def test_model_init_matches_torch_layout():
    model = TorchModel(TorchSpec("RNN_RELU", F, H, bias=False))
    params = model.init(jax.random.key(0))
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(model.params_shapes())
    m = to_torch(model, params)
    assert m.nonlinearity == "relu" and m.bias is False
    bound = 1 / np.sqrt(H)
    for name, p in m.named_parameters():
        assert p.abs().max() <= bound and p.abs().max() > 0, name


def test_float64_module_is_converted_to_float32():
    m = make_module("gru", "deep_bi", seed=11).double()
    model, params = from_torch(m)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(params))
    for name, p in m.named_parameters():
        np.testing.assert_array_equal(jax_leaf(params, name, True), p.detach().numpy().astype(np.float32))
    x = random_inputs(m, np.random.default_rng(12))
    with torch.no_grad():
        out_t, h_t = m(torch.tensor(x, dtype=torch.float64))
    out_j, h_j = model(params, x)
    assert out_j.dtype == jnp.float32
    assert_close(out_j, out_t)
    assert_close(h_j, h_t)


@pytest.mark.parametrize("kind", KINDS)
def test_jax_params_sent_to_torch_give_the_same_outputs(kind):
    mode = {"rnn_tanh": "RNN_TANH", "rnn_relu": "RNN_RELU", "gru": "GRU"}.get(kind, "LSTM")
    spec = TorchSpec(mode, F, H, num_layers=2, bidirectional=True, batch_first=True,
                     proj_size=P if kind == "lstm_proj" else 0)
    model = TorchModel(spec)
    # JAX-side params that never came from torch (model.init works too, but jitting PRNG splits is slow on CPU).
    rng = np.random.default_rng(13)
    params = jax.tree_util.tree_map(lambda s: jnp.asarray(rng.uniform(-0.5, 0.5, s.shape), s.dtype),
                                    model.params_shapes())
    m = to_torch(model, params)
    assert isinstance(m, KINDS[kind]().__class__)
    assert to_torch(spec, params).state_dict().keys() == m.state_dict().keys()
    rng = np.random.default_rng(14)
    x, lengths = random_inputs(m, rng), random_lengths(rng)
    with torch.no_grad():
        out_t, state_t = torch_forward(m, torch.tensor(x), lengths)
    out_j, state_j = run(model, params, x, lengths)
    assert_close(out_j, out_t)
    for a, b in zip(flat_state(state_j), flat_state(state_t)):
        assert_close(a, b)
    # And back again, exactly.
    _, params_back = from_torch(m)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params_back, params)


# ---------------------------------------------------------------- unbatched and jit


@pytest.mark.parametrize("kind", ["rnn_relu", "lstm_proj", "gru"])
@pytest.mark.parametrize("with_carry", [False, True], ids=["zero_carry", "carry"])
def test_unbatched_input(kind, with_carry):
    m = make_module(kind, "deep_bi", batch_first=True, seed=15)  # batch_first does not apply to [T, F]
    rng = np.random.default_rng(16)
    x = rng.normal(size=(T, F)).astype(np.float32)
    carry = random_carry(m, rng, batch=()) if with_carry else None
    model, params = from_torch(m)
    with torch.no_grad():
        out_t, state_t = m(torch.tensor(x), to_t(carry))
    out_j, state_j = run(model, params, x, None, carry)
    assert out_j.shape == tuple(out_t.shape)
    assert_close(out_j, out_t)
    for a, b in zip(flat_state(state_j), flat_state(state_t)):
        assert a.shape == tuple(b.shape) and a.ndim == 2
        assert_close(a, b)


@pytest.mark.parametrize("kind", ["rnn_tanh", "lstm_proj", "gru"])
def test_jit_with_traced_lengths(kind):
    m = make_module(kind, "deep_bi", batch_first=False, seed=17)
    model, params = from_torch(m)
    traces = []

    def traced(*args):
        traces.append(1)
        return model(*args)

    jitted = jax.jit(traced)
    rng = np.random.default_rng(18)
    x, carry = random_inputs(m, rng), random_carry(m, rng)
    for i in range(2):  # new lengths, same compiled function
        lengths = random_lengths(rng)
        with torch.no_grad():
            out_t, state_t = torch_forward(m, torch.tensor(x), lengths, to_t(carry))
        out_j, state_j = jitted(params, jnp.asarray(x), jnp.asarray(lengths), carry)
        assert_close(out_j, out_t)
        for a, b in zip(flat_state(state_j), flat_state(state_t)):
            assert_close(a, b)
        if i == 0:  # eager agrees with jit (eager lax.scan recompiles every call, so only once)
            out_e, state_e = model(params, x, lengths=lengths, carry=carry)
            jax.tree_util.tree_map(lambda a, e: assert_close(a, e, atol=1e-6, rtol=1e-6), (out_j, state_j),
                                   (out_e, state_e))
    assert len(traces) == 1


# ---------------------------------------------------------------- errors


def test_unsupported_module_is_a_type_error():
    for module, name in ((nn.Linear(3, 4), "linear.Linear"), (nn.LSTMCell(3, 4), "rnn.LSTMCell")):
        with pytest.raises(TypeError) as info:
            from_torch(module)
        assert str(info.value) == (
            "rnnjax.interop.torch.from_torch: expected a torch.nn.RNN, torch.nn.LSTM or torch.nn.GRU module, "
            f"got torch.nn.modules.{name}. Fix: pass the recurrent module itself (e.g. model.rnn); "
            "other layers have no rnnjax counterpart here."
        )


def _gru(n_in):
    return f"Weights(w_ih=float32[{n_in}, 21], w_hh=float32[7, 21], b_ih=float32[21], b_hh=float32[21])"


def _lstm(n_in):
    return (f"LSTMParams(w_ih=float32[{n_in}, 28], w_hh=float32[7, 28], b_ih=float32[28], b_hh=float32[28], "
            "w_hr=None, w_peep=None)")


def _bi(weights):
    return f"BidirectionalParams(forward={weights}, backward={weights})"


def _mismatch(fn, num_layers, bidirectional, expected, given):
    return (f"rnnjax.interop.torch.{fn}: params do not match the model TorchSpec(mode='GRU', input_size=5, "
            f"hidden_size=7, num_layers={num_layers}, bias=True, batch_first=False, dropout=0.0, "
            f"bidirectional={bidirectional}, proj_size=0): expected StackParams(layers=({expected}), norms=None), "
            f"got StackParams(layers=({given}), norms=None). Fix: pass the params returned by from_torch(module) "
            "(or model.init(key)) for this same model.")


def test_mismatched_params_are_a_value_error():
    lstm_model, lstm_params = from_torch(make_module("lstm", "deep_bi"))
    gru_model, gru_params = from_torch(make_module("gru", "deep_bi"))
    deep_gru, deep_lstm = f"{_bi(_gru(5))}, {_bi(_gru(14))}", f"{_bi(_lstm(5))}, {_bi(_lstm(14))}"
    with pytest.raises(ValueError) as info:
        to_torch(gru_model, lstm_params)
    assert str(info.value) == _mismatch("to_torch", 2, True, deep_gru, deep_lstm)
    with pytest.raises(ValueError) as info:
        gru_model(lstm_params, np.zeros((T, B, F), np.float32))
    assert str(info.value) == _mismatch("TorchModel", 2, True, deep_gru, deep_lstm)
    single, _ = from_torch(make_module("gru", "single"))
    with pytest.raises(ValueError) as info:
        to_torch(single, gru_params)
    assert str(info.value) == _mismatch("to_torch", 1, False, f"{_gru(5)},", deep_gru)
    with pytest.raises(TypeError) as info:
        to_torch(gru_params, gru_model)
    assert str(info.value) == ("rnnjax.interop.torch.to_torch: expected a TorchModel (from from_torch) or a "
                               "TorchSpec, got StackParams. Fix: pass the model returned by from_torch(module), "
                               "or TorchModel(TorchSpec(...)).")


def test_bad_inputs_and_carry_are_value_errors():
    model, params = from_torch(make_module("lstm_proj", "deep_bi", batch_first=True))
    h0, c0 = np.zeros((4, B, P), np.float32), np.zeros((4, B, H), np.float32)
    xs = np.zeros((B, T, F), np.float32)
    fn = "rnnjax.interop.torch.TorchModel"
    cases = [
        (np.zeros((B, T, F + 1), np.float32), None,
         f"{fn}: expected xs with input_size=5 features in the last axis, got shape (4, 6, 6). "
         "Fix: pass inputs of shape [B, T, 5]."),
        (np.zeros((1, B, T, F), np.float32), None,
         f"{fn}: expected xs of shape [B, T, F] (batch_first=True) or an unbatched [T, F], got shape (1, 4, 6, 5). "
         "Fix: pass one batch of sequences."),
        (xs, h0,
         f"{fn}: expected an LSTM carry (h_0, c_0) with h_0 [4, 4, 3] and c_0 [4, 4, 7], got ndarray. "
         "Fix: pass a pair, as to torch.nn.LSTM."),
        (xs, (h0[:2], c0),
         f"{fn}: expected h_0 of shape [4, 4, 3] ([num_layers * num_directions, B, H_out]), got shape [2, 4, 3]. "
         "Fix: lay the carry out as torch does (h_0 is not batch_first)."),
        (xs, (h0, c0[..., :P]),
         f"{fn}: expected c_0 of shape [4, 4, 7] ([num_layers * num_directions, B, hidden_size]), got shape "
         "[4, 4, 3]. Fix: lay the carry out as torch does (c_0 is not batch_first)."),
    ]
    for x, carry, message in cases:
        with pytest.raises(ValueError) as info:
            model(params, x, carry=carry)
        assert str(info.value) == message


def test_missing_torch_is_an_import_error(monkeypatch):
    model, params = from_torch(make_module("gru"))
    monkeypatch.setitem(sys.modules, "torch", None)
    for fn, call in (("from_torch", lambda: from_torch(object())), ("to_torch", lambda: to_torch(model, params))):
        with pytest.raises(ImportError) as info:
            call()
        assert str(info.value) == (f"rnnjax.interop.torch.{fn}: rnnjax.interop.torch needs PyTorch, which is not "
                                   "installed. Fix: `pip install torch` (it is a test-only dependency of rnnjax, "
                                   "not a runtime one).")
