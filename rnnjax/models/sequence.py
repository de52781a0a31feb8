"""Sequence models beyond text: many-to-one classifiers and regressors with masked pooling,
many-to-many taggers, and forecasters (a direct multi-horizon head, or autoregressive).

::

    model = classifier(9, input_size=12, cell="lstm", hidden=64, bidirectional=True, pooling="mean")
    params = model.init(key)
    logits = model.apply(params, xs, lengths=lengths)          # xs [*B, T, F] -> [*B, C]

    model = tagger(10, vocab_size=10, cell="gru", hidden=128)  # token ids [*B, T] -> [*B, T, 10]
    model = forecaster(48, mode="direct", hidden=64)           # window [*B, T, F] -> [*B, 48]
    model = forecaster(48, mode="autoregressive")               # trained one step ahead; forecast() rolls out

Pooling (many-to-one) sees the valid steps only: ``"last"`` is the output at
each sequence's last valid step (for bidirectional layers, the backward
half is taken at step 0, where the backward pass ends);
``"mean"`` averages the valid steps; ``"attention"`` is a learned softmax over
the valid steps (``score_t = v . tanh(W y_t + b)``). Padding never changes the
result: a padded batch gives the numbers of each sequence on its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rnnjax import layers as L
from rnnjax._checks import require_choice, require_rate
from rnnjax.cells.base import affine, check_size, compute_dtype
from rnnjax.models.lm import cell_factory
from rnnjax.types import Array, PRNGKey

POOLINGS = ("last", "mean", "attention")
FORECAST_MODES = ("direct", "autoregressive")


class AttentionPoolParams(NamedTuple):
    w: Array  # [H, A]
    b: Array  # [A]
    v: Array  # [A]


class SequenceParams(NamedTuple):
    embed: Any  # [V, E] or None (real-valued inputs)
    rnn: Any  # rnnjax.layers.StackParams
    pool: Any  # AttentionPoolParams or None
    readout: L.DenseParams


class SequenceModel(NamedTuple):
    """Pure functions of a sequence model (hashable: a static ``jit`` argument).

    Attributes:
      init: ``key -> SequenceParams``.
      apply: ``(params, xs, *, lengths=None, key=None) -> outputs``: ``[*B, O]`` for many-to-one
        models, ``[*B, T, O]`` for many-to-many ones; dropout is on exactly when ``key`` is given.
      output_size: ``O``.
      name: e.g. ``"bilstm-1x64-mean"``.
      many_to_one: whether outputs are pooled over time.
      forecast: ``(params, window [*B, T, F], horizon) -> [*B, horizon]`` for forecasters, else None.
    """

    init: Callable[[PRNGKey], SequenceParams]
    apply: Callable[..., Array]
    output_size: int
    name: str
    many_to_one: bool
    forecast: Callable[..., Array] | None = None


def valid_mask(lengths, T: int, batch_shape) -> Array:
    """Booleans ``[*B, T]``: True where ``t < lengths`` (everywhere when ``lengths`` is None)."""
    if lengths is None:
        return jnp.ones((*batch_shape, T), bool)
    return jnp.arange(T) < jnp.asarray(lengths)[..., None]


def attention_pool_init(key, features: int, size: int | None = None) -> AttentionPoolParams:
    A = size or features
    k_w, k_v = jax.random.split(key)
    bound = 1.0 / jnp.sqrt(features)
    return AttentionPoolParams(jax.random.uniform(k_w, (features, A), jnp.float32, -bound, bound),
                               jnp.zeros((A,), jnp.float32),
                               jax.random.uniform(k_v, (A,), jnp.float32, -1.0 / jnp.sqrt(A), 1.0 / jnp.sqrt(A)))


def pool(ys: Array, lengths=None, how: str = "last", *, attention: AttentionPoolParams | None = None,
         backward_features: int = 0) -> Array:
    """Pools ``ys [*B, T, H]`` over the valid steps of each sequence to ``[*B, H]``.

    ``how``: ``"last"`` (the output at step ``lengths - 1``), ``"mean"``, or ``"attention"``
    (needs ``attention`` params). ``backward_features``: the last this many features come from a
    backward pass, whose final output is at step 0; ``"last"`` takes them from there.
    """
    fn = "rnnjax.models.pool"
    require_choice(fn, "pooling", how, POOLINGS)
    T = ys.shape[-2]
    mask = valid_mask(lengths, T, ys.shape[:-2])
    if how == "last":
        last = (jnp.full(ys.shape[:-2], T) if lengths is None else jnp.asarray(lengths)) - 1
        y = jnp.take_along_axis(ys, jnp.maximum(last, 0)[..., None, None], axis=-2)[..., 0, :]
        if backward_features:
            y = jnp.concatenate([y[..., :-backward_features], ys[..., 0, -backward_features:]], axis=-1)
        return y
    if how == "mean":
        total = jnp.sum(jnp.where(mask[..., None], ys, 0.0), axis=-2)
        return total / jnp.maximum(jnp.sum(mask, axis=-1), 1)[..., None].astype(ys.dtype)
    if attention is None:
        raise ValueError(f"{fn}: pooling 'attention' needs its parameters. Fix: pass attention=params.pool.")
    scores = jnp.tanh(ys @ attention.w + attention.b) @ attention.v  # [*B, T]
    scores = jnp.where(mask, scores, -jnp.inf)
    weights = jax.nn.softmax(scores, axis=-1)
    weights = jnp.where(mask, weights, 0.0)  # an empty sequence pools to zeros, not NaN
    return jnp.einsum("...t,...th->...h", weights, ys)


CHRONO_GATES = {"lstm": ((1, 1.0), (0, -1.0)), "gru": ((1, 1.0),)}  # (gate block, sign) per cell family


def chrono_init(params: SequenceParams, key: PRNGKey, t_max: float, cell: str) -> SequenceParams:
    """Chrono initialisation (Tallec & Ollivier 2018) of every recurrent layer's gate biases:
    ``b ~ log(U(1, t_max - 1))`` for the gate that keeps the state (the LSTM's forget gate, with
    the input gate at ``-b``; the GRU's update gate ``z``), so the initial memory spans time scales
    up to ``t_max`` steps. The recurrent biases of those gates are set to 0. Other cells (Elman)
    are returned unchanged: they have no gate to set."""
    fn = "rnnjax.models.chrono_init"
    if not t_max > 2:
        raise ValueError(f"{fn}: t_max must be > 2 (the longest dependency, in steps), got {t_max!r}.")
    gates = CHRONO_GATES.get(cell)
    if gates is None:
        return params
    leaves = []

    def visit(p):
        if hasattr(p, "b_ih") and hasattr(p, "b_hh") and p.b_ih is not None:
            leaves.append(p)
        elif isinstance(p, tuple):
            for q in p:
                visit(q)

    visit(params.rnn.layers)
    keys = iter(jax.random.split(key, max(1, len(leaves))))

    def fix(p):
        if hasattr(p, "b_ih") and hasattr(p, "b_hh") and p.b_ih is not None:
            H = p.b_hh.shape[-1] // (4 if cell == "lstm" else 3)
            b = jnp.log(jax.random.uniform(next(keys), (H,), p.b_ih.dtype, 1.0, t_max - 1.0))
            b_ih, b_hh = p.b_ih, p.b_hh
            for gate, sign in gates:
                b_ih = b_ih.at[gate * H:(gate + 1) * H].set(sign * b)
                b_hh = b_hh.at[gate * H:(gate + 1) * H].set(0.0)
            return p._replace(b_ih=b_ih, b_hh=b_hh)
        if isinstance(p, tuple):
            return type(p)(*[fix(q) for q in p]) if hasattr(p, "_fields") else tuple(fix(q) for q in p)
        return p

    return params._replace(rnn=params.rnn._replace(layers=fix(params.rnn.layers)))


def _build(fn: str, outputs: int, *, input_size: int | None, vocab_size: int | None, embed: int | None,
           cell, layers: int, hidden: int, bidirectional: bool, dropout: float, pooling: str | None,
           cell_options, unroll, remat, hoist, backward, dtype=None, suffix: str = ""):
    dtype = compute_dtype(fn, dtype)
    O = check_size(fn, "outputs", outputs)
    n_layers = check_size(fn, "layers", layers, example=2)
    H = check_size(fn, "hidden", hidden)
    if (input_size is None) == (vocab_size is None):
        raise ValueError(f"{fn}: expected exactly one of input_size (real-valued inputs [*B, T, F]) and "
                         f"vocab_size (token ids [*B, T]), got input_size={input_size!r}, vocab_size={vocab_size!r}.")
    require_rate(fn, "dropout", dropout)
    if pooling is not None:
        require_choice(fn, "pooling", pooling, POOLINGS, fix="pass one of those, or None.")
    make_cell, cell_name = cell_factory(fn, cell, cell_options, dtype)
    opts = dict(unroll=unroll, remat=remat, hoist=hoist, backward=backward)
    if bidirectional:
        rnn_layers = [L.bidirectional(make_cell(H), **opts) for _ in range(n_layers)]
    else:
        rnn_layers = [L.rnn(make_cell(H), **opts) for _ in range(n_layers)]
    stack = L.stack(rnn_layers, dropout=dropout, dtype=dtype)
    embedding = None
    if vocab_size is not None:
        embedding = L.embedding(check_size(fn, "vocab_size", vocab_size), check_size(fn, "embed", embed or min(H, 64)),
                                dtype=dtype)
        F = embedding.output_size
    else:
        F = check_size(fn, "input_size", input_size)
    dense = L.dense(O)
    readout = L.Module(dense.init, lambda p, h: affine(h, p.w, p.b, dtype), O)  # float32 outputs under the policy
    Hs = stack.output_size
    backward_features = Hs // 2 if bidirectional else 0

    def init(key: PRNGKey) -> SequenceParams:
        k_e, k_r, k_p, k_o = jax.random.split(key, 4)
        return SequenceParams(None if embedding is None else embedding.init(k_e), stack.init(k_r, F),
                              attention_pool_init(k_p, Hs) if pooling == "attention" else None,
                              readout.init(k_o, Hs))

    def features(params: SequenceParams, xs, lengths, key):
        k_in = k_s = k_out = None
        if key is not None and dropout > 0.0:
            k_in, k_s, k_out = jax.random.split(key, 3)
        x = jnp.asarray(xs)
        if embedding is not None:
            x = embedding.apply(params.embed, x)
            x = L.dropout(x, dropout, k_in)
        _, ys = stack.apply(params.rnn, x, lengths=lengths, key=k_s)
        return ys, k_out

    def apply(params: SequenceParams, xs, *, lengths=None, key: PRNGKey | None = None) -> Array:
        ys, k_out = features(params, xs, lengths, key)
        if pooling is not None:
            ys = pool(ys, lengths, pooling, attention=params.pool, backward_features=backward_features)
        ys = L.dropout(ys, dropout, k_out)
        return readout.apply(params.readout, ys)

    name = f"{'bi' if bidirectional else ''}{cell_name}-{n_layers}x{H}{suffix}"
    return init, apply, stack, readout, embedding, name


def classifier(num_classes: int, *, input_size: int | None = None, vocab_size: int | None = None,
               embed: int | None = None, cell="lstm", layers: int = 1, hidden: int = 128,
               bidirectional: bool = False, pooling: str = "last", dropout: float = 0.0, cell_options=None,
               unroll: int = 1, remat=None, hoist="auto", backward="auto", dtype=None) -> SequenceModel:
    """Many-to-one: ``apply(params, xs, lengths=...) -> logits [*B, num_classes]``.

    Inputs are real-valued ``[*B, T, input_size]`` or token ids ``[*B, T]``
    (``vocab_size``, embedded to ``embed`` features). A stack of ``layers``
    recurrent layers (``bidirectional``: both directions, concatenated) is
    pooled over each sequence's valid steps (``pooling``: last, mean,
    attention; see :func:`pool`), then a dense readout. ``dropout`` applies to
    the embedded input, between layers and before the readout (with a ``key``).
    ``dtype``: the compute dtype of the cells and layers (None: float32; with
    ``jnp.bfloat16`` the mixed-precision policy of :mod:`rnnjax.cells.base`,
    a factory passed as ``cell`` then gets ``dtype=`` too); the outputs stay
    float32 (the readout accumulates in float32).
    """
    init, apply, *_, name = _build("rnnjax.models.classifier", num_classes, input_size=input_size,
                                   vocab_size=vocab_size, embed=embed, cell=cell, layers=layers, hidden=hidden,
                                   bidirectional=bidirectional, dropout=dropout, pooling=pooling,
                                   cell_options=cell_options, unroll=unroll, remat=remat, hoist=hoist,
                                   backward=backward, dtype=dtype, suffix=f"-{pooling}")
    return SequenceModel(init, apply, num_classes, name, True)


def regressor(outputs: int = 1, **kwargs) -> SequenceModel:
    """Many-to-one regression: :func:`classifier`'s model with ``outputs`` real outputs ``[*B, outputs]``."""
    return classifier(outputs, **kwargs)


def tagger(outputs: int, *, input_size: int | None = None, vocab_size: int | None = None,
           embed: int | None = None, cell="lstm", layers: int = 1, hidden: int = 128, bidirectional: bool = False,
           dropout: float = 0.0, cell_options=None, unroll: int = 1, remat=None, hoist="auto",
           backward="auto", dtype=None) -> SequenceModel:
    """Many-to-many: one output per step, ``apply(params, xs, lengths=...) -> [*B, T, outputs]``
    (logits for per-step classes, e.g. the copy task; zeros past each sequence's end).
    ``dtype`` as for :func:`classifier`."""
    init, apply, *_, name = _build("rnnjax.models.tagger", outputs, input_size=input_size, vocab_size=vocab_size,
                                   embed=embed, cell=cell, layers=layers, hidden=hidden,
                                   bidirectional=bidirectional, dropout=dropout, pooling=None,
                                   cell_options=cell_options, unroll=unroll, remat=remat, hoist=hoist,
                                   backward=backward, dtype=dtype)
    return SequenceModel(init, apply, outputs, name, False)


def forecaster(horizon: int, *, input_size: int = 1, mode: str = "direct", cell="lstm", layers: int = 1,
               hidden: int = 64, dropout: float = 0.0, cell_options=None, unroll: int = 1, remat=None,
               hoist="auto", backward="auto", dtype=None) -> SequenceModel:
    """Multi-step forecasting from a window of past values ``[*B, T, input_size]`` (feature 0 is
    the series forecast; others are covariates).

    - ``mode="direct"``: the recurrent stack reads the window and a dense head on its last output
      predicts all ``horizon`` values at once. ``apply`` and ``forecast`` both give ``[*B, horizon]``.
    - ``mode="autoregressive"`` (needs ``input_size=1``): many-to-many, ``apply`` predicts the next
      value at every step ``[*B, T, 1]`` and is trained with teacher forcing (the inputs are the
      true values); ``forecast`` reads the window, then feeds each prediction back in as the next
      input for ``horizon`` steps (one recurrent step each).

    ``dtype`` as for :func:`classifier` (forecasts stay float32).
    """
    fn = "rnnjax.models.forecaster"
    if mode not in FORECAST_MODES:
        raise ValueError(f"{fn}: unknown mode {mode!r}; expected one of {', '.join(FORECAST_MODES)}.")
    hz = check_size(fn, "horizon", horizon)
    if mode == "autoregressive" and input_size != 1:
        raise ValueError(f"{fn}: mode='autoregressive' feeds its predictions back as inputs, so it needs "
                         f"input_size=1 (the series alone), got {input_size}. Fix: use mode='direct' with "
                         "covariates.")
    direct = mode == "direct"
    init, apply, stack, readout, _, name = _build(
        fn, hz if direct else 1, input_size=input_size, vocab_size=None, embed=None, cell=cell, layers=layers,
        hidden=hidden, bidirectional=False, dropout=dropout, pooling="last" if direct else None,
        cell_options=cell_options, unroll=unroll, remat=remat, hoist=hoist, backward=backward, dtype=dtype,
        suffix=f"-{mode}")

    if direct:
        def forecast(params, window, horizon_=hz):
            if horizon_ != hz:
                raise ValueError(f"{fn}.forecast: this direct model predicts {hz} steps, got horizon={horizon_}. "
                                 "Fix: train a model for that horizon.")
            return apply(params, window)
    else:
        def forecast(params, window, horizon_=hz):
            window = jnp.asarray(window)
            carry = stack.initial_carry(params.rnn, window.shape[:-2])
            carry, ys = stack.apply(params.rnn, window, carry=carry)
            first = readout.apply(params.readout, ys[..., -1, :])  # [*B, 1]

            def body(state, _):
                c, x = state
                c, h = stack.step(params.rnn, c, x)
                y = readout.apply(params.readout, h)
                return (c, y), y

            _, rest = jax.lax.scan(body, (carry, first), None, length=horizon_ - 1)
            return jnp.concatenate([first, jnp.moveaxis(rest[..., 0], 0, -1)], axis=-1)

    return SequenceModel(init, apply, hz, name, direct, forecast)
