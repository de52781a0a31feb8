"""Flax adapters: any rnnjax cell or layer as a Flax NNX module or a Linen module.

The adapters hold rnnjax's own parameter pytree (a NamedTuple) and call the
pure functions, so an rnnjax LSTM trains inside a Flax model with
``nnx.Optimizer`` or ``TrainState.apply_gradients`` and gives the numbers of
:func:`rnnjax.unroll`::

    from flax import nnx
    from rnnjax.interop.flax import Recurrent

    class Tagger(nnx.Module):
        def __init__(self, rngs):
            self.rnn = Recurrent(rnnjax.cells.lstm(128), input_size=64, rngs=rngs)
            self.out = nnx.Linear(128, 10, rngs=rngs)

        def __call__(self, xs, lengths):
            return self.out(self.rnn(xs, lengths=lengths))

Linen: ``LinenRecurrent(model=rnnjax.cells.gru(64))`` creates its parameters
from the input's feature size on ``init``, under the name ``"rnn"``.

Flax is imported by this module only; its API moves faster than rnnjax's, so
nothing else in rnnjax depends on it.
"""

from __future__ import annotations

from typing import Any

import jax

try:
    from flax import linen, nnx
except ImportError as error:  # pragma: no cover - exercised with flax hidden
    raise ImportError("rnnjax.interop.flax needs Flax, which is not installed. "
                      "Fix: pip install 'flax>=0.10' (or pip install 'rnnjax[flax]').") from error

from rnnjax import scan
from rnnjax.cells.base import Cell
from rnnjax.layers import Layer

__all__ = ["LinenRecurrent", "Recurrent"]


def _check_model(fn: str, model) -> None:
    if not isinstance(model, (Cell, Layer)):
        raise TypeError(f"{fn}: expected an rnnjax Cell (e.g. rnnjax.cells.lstm(128)) or Layer (e.g. "
                        f"rnnjax.layers.stack([...])), got {type(model).__name__}. Fix: pass one of those.")


def _apply(model, params, xs, *, carry, lengths, mask, resets, key, time_major, options):
    if isinstance(model, Cell):
        return scan.unroll(model, params, xs, carry=carry, lengths=lengths, mask=mask, resets=resets,
                           time_major=time_major, **options)
    return model.apply(params, xs, carry=carry, lengths=lengths, mask=mask, resets=resets, key=key,
                       time_major=time_major)


def _unroll_options(fn: str, model, options: dict) -> dict:
    if options and isinstance(model, Layer):
        raise ValueError(f"{fn}: unroll options {sorted(options)} apply to a Cell only; a Layer takes them "
                         "when it is built. Fix: pass them to rnnjax.layers.rnn/bidirectional instead.")
    return options


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


class Recurrent(nnx.Module):
    """An rnnjax :class:`~rnnjax.cells.Cell` or :class:`~rnnjax.layers.Layer` as a Flax NNX module.

    Args:
      model: the cell or layer.
      input_size: features of the inputs.
      rngs: ``nnx.Rngs``; the parameters are initialised from its ``params`` stream.
      **options: for a cell, options of :func:`rnnjax.unroll` (``reverse``,
        ``unroll``, ``remat``, ``hoist``, ``backward``).

    ``self.params`` is the model's parameter pytree with each array an
    ``nnx.Param``; :meth:`rnnjax_params` returns it as plain arrays (what the
    pure functions and :mod:`rnnjax.checkpoint` take).
    """

    def __init__(self, model: Cell | Layer, input_size: int, *, rngs: nnx.Rngs, **options):
        fn = "rnnjax.interop.flax.Recurrent"
        _check_model(fn, model)
        self.model = model
        self.options = _unroll_options(fn, model, options)
        self.params = nnx.data(jax.tree_util.tree_map(nnx.Param, model.init(rngs.params(), input_size)))

    def rnnjax_params(self):
        """The parameters as rnnjax's own pytree of arrays."""
        return jax.tree_util.tree_map(lambda v: v[...], self.params, is_leaf=_is_variable)

    def initial_carry(self, batch_shape=()):
        return self.model.initial_carry(self.rnnjax_params(), tuple(batch_shape))

    def __call__(self, xs, *, carry=None, lengths=None, mask=None, resets=None, key=None, time_major=False,
                 return_carry: bool = False):
        """``ys`` (or ``(carry, ys)`` with ``return_carry=True``), as :func:`rnnjax.unroll` / ``Layer.apply``.
        ``key`` turns on a layer's dropout."""
        carry, ys = _apply(self.model, self.rnnjax_params(), xs, carry=carry, lengths=lengths, mask=mask,
                           resets=resets, key=key, time_major=time_major, options=self.options)
        return (carry, ys) if return_carry else ys

    def step(self, carry, x, *, reset=None):
        """One streaming step ``(carry, x [*B, F]) -> (carry, y)``."""
        params = self.rnnjax_params()
        if isinstance(self.model, Cell):
            return scan.step(self.model, params, carry, x, reset=reset)
        return self.model.step(params, carry, x, reset=reset)


class LinenRecurrent(linen.Module):
    """An rnnjax cell or layer as a Flax Linen module.

    ``model`` is the cell or layer; ``options`` (a dict) holds a cell's
    :func:`rnnjax.unroll` options. The parameters (rnnjax's pytree) are
    created on ``init`` from the input's last axis, under the name ``"rnn"``.
    """

    model: Any
    options: Any = None

    @linen.compact
    def __call__(self, xs, *, carry=None, lengths=None, mask=None, resets=None, key=None, time_major=False,
                 return_carry: bool = False):
        fn = "rnnjax.interop.flax.LinenRecurrent"
        _check_model(fn, self.model)
        options = _unroll_options(fn, self.model, dict(self.options or {}))
        params = self.param("rnn", lambda rng: self.model.init(rng, xs.shape[-1]))
        carry, ys = _apply(self.model, params, xs, carry=carry, lengths=lengths, mask=mask, resets=resets,
                           key=key, time_major=time_major, options=options)
        return (carry, ys) if return_carry else ys
