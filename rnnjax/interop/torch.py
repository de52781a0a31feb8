"""PyTorch interop: ``torch.nn.RNN`` / ``LSTM`` / ``GRU`` to rnnjax and back.

::

    model, params = from_torch(torch_lstm)                 # weights -> a JAX pytree
    out, (h_n, c_n) = model(params, xs, lengths=lengths)   # PyTorch's layout and numbers
    torch_lstm2 = to_torch(model, params)                  # and back, weights loaded

``model`` is a :class:`TorchModel`: a callable with the static configuration
(:class:`TorchSpec`) and the rnnjax :class:`~rnnjax.layers.Layer` it runs
(``model.layer``, a :func:`rnnjax.layers.stack`). It reproduces the module's
``forward`` in evaluation mode: inter-layer dropout is recorded (so
:func:`to_torch` rebuilds the same module) but never applied.

With ``lengths`` the outputs are those of ``pack_padded_sequence`` ->
module -> ``pad_packed_sequence(total_length=T)``: zero past each sequence's
length, and ``h_n``/``c_n`` taken at each sequence's last valid step (for the
backward direction: after reading its first step).

PyTorch is only needed by :func:`from_torch` and :func:`to_torch`, and is
imported inside them. :func:`from_state_dict` and :func:`to_state_dict`
convert between params and a PyTorch-named dict of NumPy arrays without it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rnnjax import _checks, cells, layers
from rnnjax.cells.lstm import LSTMCarry, LSTMParams

__all__ = ["TorchModel", "TorchSpec", "from_state_dict", "from_torch", "to_state_dict", "to_torch", "torch_shapes"]

_MODULE = "rnnjax.interop.torch"

MODES = ("RNN_TANH", "RNN_RELU", "LSTM", "GRU")
_GATES = {"RNN_TANH": 1, "RNN_RELU": 1, "LSTM": 4, "GRU": 3}
_CLASS = {"RNN_TANH": "RNN", "RNN_RELU": "RNN", "LSTM": "LSTM", "GRU": "GRU"}


def _import_torch(fn: str):
    try:
        import torch
    except ImportError as err:  # pragma: no cover - exercised only without torch
        raise ImportError(
            f"{fn}: rnnjax.interop.torch needs PyTorch, which is not installed. Fix: `pip install torch` "
            "(it is a test-only dependency of rnnjax, not a runtime one)."
        ) from err
    return torch


class TorchSpec(NamedTuple):
    """The static configuration of a PyTorch recurrent module (its constructor arguments).

    ``mode`` is PyTorch's ``module.mode``: ``"RNN_TANH"``, ``"RNN_RELU"``,
    ``"LSTM"`` or ``"GRU"``.
    """

    mode: str
    input_size: int
    hidden_size: int
    num_layers: int = 1
    bias: bool = True
    batch_first: bool = False
    dropout: float = 0.0
    bidirectional: bool = False
    proj_size: int = 0

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def output_hidden_size(self) -> int:
        """Features of ``h_n`` (and of each direction's outputs): ``proj_size or hidden_size``."""
        return self.proj_size or self.hidden_size


def _check_int(fn: str, name: str, value, minimum: int) -> None:
    if not _checks.is_int(value) or value < minimum:
        raise ValueError(f"{fn}: expected {name} to be an integer >= {minimum}, got {value!r}. "
                         f"Fix: pass {name} as in the torch.nn module's constructor.")


def _check_spec(fn: str, spec) -> TorchSpec:
    if not isinstance(spec, TorchSpec):
        raise TypeError(f"{fn}: expected a rnnjax.interop.torch.TorchSpec, got {type(spec).__name__}. "
                        "Fix: build one with TorchSpec(mode, input_size, hidden_size, ...) or take "
                        "model.spec from from_torch(module).")
    if spec.mode not in MODES:
        raise ValueError(f"{fn}: unknown mode {spec.mode!r}; expected one of {MODES} (torch's module.mode).")
    _check_int(fn, "input_size", spec.input_size, 1)
    _check_int(fn, "hidden_size", spec.hidden_size, 1)
    _check_int(fn, "num_layers", spec.num_layers, 1)
    _check_int(fn, "proj_size", spec.proj_size, 0)
    if spec.proj_size and spec.mode != "LSTM":
        raise ValueError(f"{fn}: proj_size={spec.proj_size} is only supported by LSTM, got mode {spec.mode!r}. "
                         "Fix: pass proj_size=0.")
    if spec.proj_size >= spec.hidden_size and spec.proj_size:
        raise ValueError(f"{fn}: proj_size must be smaller than hidden_size={spec.hidden_size}, got "
                         f"{spec.proj_size} (as in torch.nn.LSTM). Fix: pass a smaller proj_size or 0.")
    if not 0.0 <= float(spec.dropout) <= 1.0:
        raise ValueError(f"{fn}: dropout must be in [0, 1], got {spec.dropout} (as in torch.nn modules).")
    return TorchSpec(spec.mode, int(spec.input_size), int(spec.hidden_size), int(spec.num_layers), bool(spec.bias),
                     bool(spec.batch_first), float(spec.dropout), bool(spec.bidirectional), int(spec.proj_size))


def _cell(spec: TorchSpec) -> cells.Cell:
    if spec.mode == "LSTM":
        return cells.lstm(spec.hidden_size, proj_size=spec.proj_size, bias=spec.bias)
    if spec.mode == "GRU":
        return cells.gru(spec.hidden_size, bias=spec.bias)
    return cells.elman(spec.hidden_size, activation="tanh" if spec.mode == "RNN_TANH" else "relu", bias=spec.bias)


def _layer(spec: TorchSpec) -> layers.Layer:
    cell = _cell(spec)
    wrap = layers.bidirectional if spec.bidirectional else layers.rnn
    return layers.stack([wrap(cell) for _ in range(spec.num_layers)])


class TorchModel:
    """PyTorch's ``forward`` of a recurrent module, in JAX.

    ``model(params, xs, lengths=None, carry=None) -> (output, h_n)`` for RNN and
    GRU, ``(output, (h_n, c_n))`` for LSTM, laid out as PyTorch lays them out:

    - ``xs``: ``[T, B, F]``, or ``[B, T, F]`` when ``spec.batch_first``, or an
      unbatched ``[T, F]``;
    - ``lengths``: optional ``[B]`` integers, valid steps of each sequence (what
      ``pack_padded_sequence`` takes; any order, no sorting needed);
    - ``carry``: optional ``h_0`` (``(h_0, c_0)`` for LSTM), ``h_0`` of shape
      ``[num_layers * num_directions, B, proj_size or hidden_size]`` and ``c_0``
      ``[num_layers * num_directions, B, hidden_size]`` (no ``B`` when unbatched);
    - ``output``: ``[T, B, D * H_out]`` (``[B, T, D * H_out]`` when batch_first),
      zero past each sequence's length; ``h_n``/``c_n`` shaped as ``h_0``/``c_0``.

    Pure and jittable (``lengths`` may be traced). Attributes: ``spec`` (a
    :class:`TorchSpec`), ``layer`` (the :func:`rnnjax.layers.stack` it runs, whose
    params are the ``params`` here) and ``init(key)`` for fresh PyTorch-style params.
    """

    def __init__(self, spec: TorchSpec):
        self.spec = _check_spec("rnnjax.interop.torch.TorchModel", spec)
        self.layer = _layer(self.spec)
        self._expected = None
        self.__name__ = f"TorchModel[{_CLASS[self.spec.mode]}]"

    def __repr__(self) -> str:
        return f"TorchModel({self.spec!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, TorchModel) and other.spec == self.spec

    def __hash__(self) -> int:
        return hash((TorchModel, self.spec))

    @property
    def is_lstm(self) -> bool:
        return self.spec.mode == "LSTM"

    def init(self, key) -> layers.StackParams:
        """Fresh params with PyTorch's initialisation, U(±1/√hidden_size) for every tensor."""
        return self.layer.init(key, self.spec.input_size)

    def params_shapes(self):
        """The params' structure as ``jax.ShapeDtypeStruct`` leaves."""
        if self._expected is None:
            self._expected = jax.eval_shape(lambda: self.init(jax.random.key(0)))
        return self._expected

    def check_params(self, fn: str, params) -> None:
        """Raises ValueError naming ``fn`` when ``params`` do not have this model's structure and shapes."""
        _refuse_heads(fn, params)
        expected = self.params_shapes()
        e_leaves, e_def = jax.tree_util.tree_flatten(expected)
        try:
            g_leaves, g_def = jax.tree_util.tree_flatten(params)
            ok = g_def == e_def and all(tuple(np.shape(g)) == tuple(e.shape) for g, e in zip(g_leaves, e_leaves))
        except Exception:  # noqa: BLE001 - anything unflattenable is a mismatch
            ok = False
        if ok:
            return
        try:
            given = _checks.tree_shapes(jax.tree_util.tree_map(jnp.asarray, params))
        except Exception:  # noqa: BLE001
            given = f"a {type(params).__name__}"
        raise ValueError(
            f"{fn}: params do not match the model {self.spec}: expected {_checks.tree_shapes(expected)}, "
            f"got {given}. Fix: pass the params returned by from_torch(module) (or model.init(key)) "
            "for this same model."
        )

    def __call__(self, params, xs, lengths=None, carry=None):
        fn = "rnnjax.interop.torch.TorchModel"
        spec = self.spec
        self.check_params(fn, params)
        dtype = jax.tree_util.tree_leaves(params)[0].dtype
        xs = jnp.asarray(xs)
        layout = "[B, T, F]" if spec.batch_first else "[T, B, F]"
        if xs.ndim not in (2, 3):
            raise ValueError(f"{fn}: expected xs of shape {layout} (batch_first={spec.batch_first}) or an "
                             f"unbatched [T, F], got shape {tuple(xs.shape)}. Fix: pass one batch of sequences.")
        if xs.shape[-1] != spec.input_size:
            raise ValueError(f"{fn}: expected xs with input_size={spec.input_size} features in the last axis, got "
                             f"shape {tuple(xs.shape)}. Fix: pass inputs of shape {layout[:-2]}{spec.input_size}].")
        _checks.require_float(fn, "xs", xs)
        xs = xs.astype(dtype)
        unbatched = xs.ndim == 2
        time_major = unbatched or not spec.batch_first
        batch_shape = () if unbatched else (xs.shape[0] if spec.batch_first else xs.shape[1],)
        if unbatched and lengths is not None and jnp.ndim(lengths) != 0:
            raise ValueError(f"{fn}: an unbatched xs [T, F] takes no lengths (or a scalar), got lengths of shape "
                             f"{tuple(jnp.shape(lengths))}. Fix: add the batch axis to xs, or drop lengths.")
        stack_carry = None if carry is None else self._carry_in(fn, carry, batch_shape, dtype)
        final, ys = self.layer.apply(params, xs, carry=stack_carry, lengths=lengths, time_major=time_major)
        return ys, self._carry_out(final)

    # PyTorch's h_0 [L*D, *B, H_out] (and c_0) <-> the stack's carry: one per layer, (fwd, bwd) when bidirectional.

    def _carry_in(self, fn: str, carry, batch_shape, dtype):
        spec = self.spec
        n = spec.num_layers * spec.num_directions
        h_shape = (n, *batch_shape, spec.output_hidden_size)
        c_shape = (n, *batch_shape, spec.hidden_size)
        if self.is_lstm:
            if not isinstance(carry, (tuple, list)) or len(carry) != 2:
                raise ValueError(f"{fn}: expected an LSTM carry (h_0, c_0) with h_0 {list(h_shape)} and c_0 "
                                 f"{list(c_shape)}, got {type(carry).__name__}. Fix: pass a pair, as to "
                                 "torch.nn.LSTM.")
            h0, c0 = (jnp.asarray(a) for a in carry)
        else:
            h0, c0 = jnp.asarray(carry), None
        for name, value, shape in (("h_0", h0, h_shape), ("c_0", c0, c_shape)):
            if value is not None and tuple(value.shape) != shape:
                raise ValueError(
                    f"{fn}: expected {name} of shape {list(shape)} ([num_layers * num_directions"
                    f"{', B' if batch_shape else ''}, {'hidden_size' if name == 'c_0' else 'H_out'}]), got shape "
                    f"{list(value.shape)}. Fix: lay the carry out as torch does ({name} is not batch_first).")
        h0 = h0.astype(dtype)
        c0 = None if c0 is None else c0.astype(dtype)

        def one(i):
            return LSTMCarry(h0[i], c0[i]) if self.is_lstm else h0[i]

        D = spec.num_directions
        return tuple((one(D * k), one(D * k + 1)) if D == 2 else one(k) for k in range(spec.num_layers))

    def _carry_out(self, final):
        flat = []
        for c in final:
            flat.extend(c if self.spec.bidirectional else (c,))
        if self.is_lstm:
            return jnp.stack([c.h for c in flat]), jnp.stack([c.c for c in flat])
        return jnp.stack(flat)


def _refuse_heads(fn: str, params) -> None:
    """A cell built with ``heads=n > 1`` stores ``w_hh`` as ``[n, H/n, G/n]``: PyTorch has no such module."""
    try:
        leaves = jax.tree_util.tree_leaves_with_path(params)
    except Exception:  # noqa: BLE001 - left to check_params' own message
        return
    for path, leaf in leaves:
        if path and getattr(path[-1], "name", None) == "w_hh" and np.ndim(leaf) == 3:
            shape = list(np.shape(leaf))
            raise ValueError(f"{fn}: params hold a multi-head recurrent weight w_hh of shape {shape} (a cell built "
                             f"with heads={shape[0]}); torch.nn.RNN/LSTM/GRU have one dense recurrent matrix. Fix: "
                             "build the cells with heads=1 for models exchanged with PyTorch.")


def _spec_of(fn: str, model_or_spec) -> TorchSpec:
    if isinstance(model_or_spec, TorchModel):
        return model_or_spec.spec
    if isinstance(model_or_spec, TorchSpec):
        return _check_spec(fn, model_or_spec)
    raise TypeError(f"{fn}: expected a TorchModel (from from_torch) or a TorchSpec, got "
                    f"{type(model_or_spec).__name__}. Fix: pass the model returned by from_torch(module), "
                    "or TorchModel(TorchSpec(...)).")


def _names(spec: TorchSpec):
    """``(layer, direction, suffix)`` for every layer and direction, in PyTorch's order."""
    for k in range(spec.num_layers):
        for d in range(spec.num_directions):
            yield k, d, f"l{k}{'_reverse' if d else ''}"


def torch_shapes(spec: TorchSpec) -> dict[str, tuple[int, ...]]:
    """PyTorch's parameter names and shapes for ``spec``, in ``named_parameters()`` order."""
    G = _GATES[spec.mode] * spec.hidden_size
    H_out = spec.output_hidden_size
    shapes = {}
    for k, _, s in _names(spec):
        F = spec.input_size if k == 0 else H_out * spec.num_directions
        shapes[f"weight_ih_{s}"] = (G, F)
        shapes[f"weight_hh_{s}"] = (G, H_out)
        if spec.bias:
            shapes[f"bias_ih_{s}"] = (G,)
            shapes[f"bias_hh_{s}"] = (G,)
        if spec.proj_size:
            shapes[f"weight_hr_{s}"] = (spec.proj_size, spec.hidden_size)
    return shapes


def from_state_dict(spec: TorchSpec, state_dict: Mapping[str, Any]) -> tuple[TorchModel, layers.StackParams]:
    """``(model, params)`` from PyTorch-named weights (tensors or arrays), without importing torch.

    Weights are copied as float32, transposed to rnnjax's ``[in, out]`` layout.
    """
    fn = "rnnjax.interop.torch.from_state_dict"
    spec = _check_spec(fn, spec)
    model = TorchModel(spec)
    expected = torch_shapes(spec)
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"{fn}: expected a mapping of parameter names to arrays (module.state_dict()), got "
                        f"{type(state_dict).__name__}.")
    missing = [k for k in expected if k not in state_dict]
    extra = [k for k in state_dict if k not in expected]
    if missing or extra:
        raise ValueError(f"{fn}: the weights do not match {spec}: missing {missing}, unexpected {extra}. "
                         "Fix: pass the state_dict of a module built with the same configuration.")
    arrays = {}
    for name, shape in expected.items():
        a = _to_numpy(state_dict[name])
        if a.shape != shape:
            raise ValueError(f"{fn}: expected {name} of shape {list(shape)} for {spec}, got {list(a.shape)}. "
                             "Fix: pass the state_dict of a module built with the same configuration.")
        arrays[name] = a

    def get(name, transpose=True):
        if name not in arrays:
            return None
        a = arrays[name]
        return jnp.asarray(np.ascontiguousarray(a.T) if transpose else a)

    per_layer = []
    for k in range(spec.num_layers):
        dirs = []
        for d in range(spec.num_directions):
            s = f"l{k}{'_reverse' if d else ''}"
            w = (get(f"weight_ih_{s}"), get(f"weight_hh_{s}"), get(f"bias_ih_{s}", False), get(f"bias_hh_{s}", False))
            dirs.append(LSTMParams(*w, get(f"weight_hr_{s}"), None) if spec.mode == "LSTM" else cells.Weights(*w))
        per_layer.append(layers.BidirectionalParams(*dirs) if spec.bidirectional else dirs[0])
    params = layers.StackParams(layers=tuple(per_layer), norms=None)
    model.check_params(fn, params)
    return model, params


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, on any device, in any float dtype
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.float()
        value = value.numpy()
    return np.asarray(value, dtype=np.float32)


def to_state_dict(model_or_spec, params) -> dict[str, np.ndarray]:
    """PyTorch-named float32 NumPy arrays (PyTorch's ``[out, in]`` layout) from ``params``, without torch.

    Also maps any pytree shaped like ``params`` (gradients, optimiser moments)
    onto PyTorch's parameter names.
    """
    fn = "rnnjax.interop.torch.to_state_dict"
    spec = _spec_of(fn, model_or_spec)
    model = model_or_spec if isinstance(model_or_spec, TorchModel) else TorchModel(spec)
    model.check_params(fn, params)
    return _state_dict(spec, params)


def _state_dict(spec: TorchSpec, params) -> dict[str, np.ndarray]:
    out = {}
    for k, d, s in _names(spec):
        p = params.layers[k]
        if spec.bidirectional:
            p = p[d]
        out[f"weight_ih_{s}"] = np.ascontiguousarray(np.asarray(p.w_ih, np.float32).T)
        out[f"weight_hh_{s}"] = np.ascontiguousarray(np.asarray(p.w_hh, np.float32).T)
        if spec.bias:
            out[f"bias_ih_{s}"] = np.asarray(p.b_ih, np.float32).copy()
            out[f"bias_hh_{s}"] = np.asarray(p.b_hh, np.float32).copy()
        if spec.proj_size:
            out[f"weight_hr_{s}"] = np.ascontiguousarray(np.asarray(p.w_hr, np.float32).T)
    return {name: out[name] for name in torch_shapes(spec)}


def from_torch(module) -> tuple[TorchModel, layers.StackParams]:
    """``(model, params)`` from a ``torch.nn.RNN`` (tanh or relu), ``torch.nn.LSTM`` or ``torch.nn.GRU``.

    Any ``num_layers``, ``bidirectional``, ``proj_size``, ``batch_first`` and
    ``bias``. ``params`` is a :class:`rnnjax.layers.StackParams` of float32
    arrays (float64 and half-precision weights are converted); ``model`` is a
    :class:`TorchModel` that computes the module's ``forward``.
    """
    fn = "rnnjax.interop.torch.from_torch"
    torch = _import_torch(fn)
    nn = torch.nn
    if not isinstance(module, (nn.RNN, nn.LSTM, nn.GRU)) or getattr(module, "mode", None) not in MODES:
        raise TypeError(
            f"{fn}: expected a torch.nn.RNN, torch.nn.LSTM or torch.nn.GRU module, got "
            f"{type(module).__module__}.{type(module).__qualname__}. Fix: pass the recurrent module itself "
            "(e.g. model.rnn); other layers have no rnnjax counterpart here."
        )
    spec = TorchSpec(
        mode=module.mode, input_size=module.input_size, hidden_size=module.hidden_size,
        num_layers=module.num_layers, bias=module.bias, batch_first=module.batch_first,
        dropout=float(module.dropout), bidirectional=module.bidirectional,
        proj_size=getattr(module, "proj_size", 0) or 0,
    )
    # getattr, not state_dict(): it also sees through torch.nn.utils.parametrize.
    weights = {name: getattr(module, name) for name in torch_shapes(spec)}
    return from_state_dict(spec, weights)


def to_torch(model_or_spec, params):
    """A new ``torch.nn.RNN``/``LSTM``/``GRU`` (float32, CPU) configured as ``model`` with ``params`` loaded.

    ``to_torch(*from_torch(m)).state_dict()`` equals ``m.state_dict()``
    exactly for a float32 ``m``.
    """
    fn = "rnnjax.interop.torch.to_torch"
    spec = _spec_of(fn, model_or_spec)
    model = model_or_spec if isinstance(model_or_spec, TorchModel) else TorchModel(spec)
    model.check_params(fn, params)
    torch = _import_torch(fn)
    kwargs = dict(input_size=spec.input_size, hidden_size=spec.hidden_size, num_layers=spec.num_layers,
                  bias=spec.bias, batch_first=spec.batch_first, dropout=spec.dropout,
                  bidirectional=spec.bidirectional, dtype=torch.float32)
    if spec.mode == "LSTM":
        module = torch.nn.LSTM(proj_size=spec.proj_size, **kwargs)
    elif spec.mode == "GRU":
        module = torch.nn.GRU(**kwargs)
    else:
        module = torch.nn.RNN(nonlinearity="tanh" if spec.mode == "RNN_TANH" else "relu", **kwargs)
    state = {name: torch.from_numpy(a) for name, a in _state_dict(spec, params).items()}
    module.load_state_dict(state, strict=True)
    return module
