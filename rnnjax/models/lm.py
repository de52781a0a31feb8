"""A recurrent language model: embedding -> stack of cells -> dense readout.

::

    model = language_model(vocab_size=80, cell="lstm", layers=2, hidden=512)
    params = model.init(key)
    carry, logits = model.apply(params, ids)                  # ids [*B, T] -> logits [*B, T, V]
    carry, logits = model.apply(params, ids, key=dropout_key)  # training (dropout on)
    carry, logits_t = model.step(params, carry, ids[..., t])   # one token at a time
    text_ids = generate(model, params, key, prompt_ids, length=500, temperature=0.8)

``step`` uses the stack's own ``step``, so generation costs one recurrent
step per token; feeding ``ids`` one at a time through ``step`` gives the
same logits as ``apply`` on the whole sequence.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rnnjax import cells
from rnnjax import layers as L
from rnnjax._checks import as_array, concrete_range, require_choice, require_int, require_rate
from rnnjax.cells.base import Cell, affine, check_size, compute_dtype
from rnnjax.decode import check_sampling, sample_logits
from rnnjax.types import Array, PRNGKey

# Cell factories by name, with the options used unless ``cell_options`` overrides them.
# forget_bias=1.0 is the usual choice for LSTMs trained from scratch (Jozefowicz et al. 2015).
CELLS: dict[str, tuple[Callable[..., Cell], dict]] = {
    "lstm": (cells.lstm, {"forget_bias": 1.0}),
    "gru": (cells.gru, {}),
    "elman": (cells.elman, {}),
    "layer_norm_lstm": (cells.layer_norm_lstm, {"forget_bias": 1.0}),
    "layer_norm_gru": (cells.layer_norm_gru, {}),
    "lru": (cells.lru, {}),
    "mingru": (cells.mingru, {}),
    "minlstm": (cells.minlstm, {}),
    "rglru": (cells.rglru, {}),
    "mgu": (cells.mgu, {}),
    "slstm": (cells.slstm, {}),
    "mlstm": (cells.mlstm, {}),
    "mamba": (cells.mamba, {}),
}
# Cells whose language-model layer is their own block, of inner width expansion * hidden, rather than
# layers.rnn or layers.residual_block: Mamba's (layers.mamba_block; expand = 2, as in Mamba). As with
# block=True, the embedding is then hidden wide and a final RMS norm precedes the readout.
OWN_BLOCKS: dict[str, tuple[Callable[..., L.Layer], int]] = {"mamba": (L.mamba_block, 2)}


def cell_factory(fn: str, cell, cell_options: Mapping[str, Any] | None = None,
                 dtype=None) -> tuple[Callable[[int], Cell], str]:
    """``(hidden_size -> Cell, name)`` for a model's ``cell`` argument: a name in :data:`CELLS` (its default
    options, then ``cell_options``) or a factory (given ``cell_options``); either also gets ``dtype=`` where
    ``dtype`` is not None. ``fn`` names the model in error messages."""
    policy = {} if dtype is None else {"dtype": dtype}
    if isinstance(cell, str):
        if cell not in CELLS:
            require_choice(fn, "cell", cell, CELLS, fix="pass one of those names or a factory hidden_size -> Cell.")
        factory, defaults = CELLS[cell]
        return partial(factory, **{**defaults, **(cell_options or {}), **policy}), cell
    if callable(cell):
        return partial(cell, **{**(cell_options or {}), **policy}), getattr(cell, "__name__", "cell")
    raise TypeError(f"{fn}: cell must be a name ({', '.join(CELLS)}) or a factory hidden_size -> Cell, "
                    f"got {type(cell).__name__}.")


class LMParams(NamedTuple):
    embed: Array  # [V, E]
    rnn: Any  # rnnjax.layers.StackParams
    readout: L.DenseParams  # w [H, V], b [V]
    norm: Array | None = None  # [H]: the final RMS-norm gain of a stack of residual blocks


class LanguageModel(NamedTuple):
    """Pure functions of a language model (hashable, so it can be a static ``jit`` argument).

    Attributes:
      init: ``key -> LMParams``.
      apply: ``(params, ids[*B, T], *, carry=None, resets=None, key=None) -> (carry, logits[*B, T, V])``;
        dropout is on exactly when ``key`` is given; ``resets [*B, T]`` (booleans)
        start a new text (from the initial carry) before reading those tokens.
      initial_carry: ``(params, batch_shape=()) -> carry`` (zeros; a tuple, one per layer).
      step: ``(params, carry, ids_t[*B]) -> (carry, logits_t[*B, V])`` (no dropout).
      vocab_size: ``V``.
      name: e.g. ``"lstm-2x512"``.
    """

    init: Callable[[PRNGKey], LMParams]
    apply: Callable[..., tuple[Any, Array]]
    initial_carry: Callable[..., Any]
    step: Callable[..., tuple[Any, Array]]
    vocab_size: int
    name: str


def language_model(vocab_size: int, *, cell: str | Callable[[int], Cell] = "lstm", layers: int = 2,
                   hidden: int = 512, embed: int | None = None, dropout: float = 0.0, variational: bool = False,
                   residual: bool = False, layer_norm: bool = False,
                   cell_options: Mapping[str, Any] | None = None, unroll: int = 1, remat=None,
                   hoist="auto", backward="auto", block: bool = False, mlp_expansion: int = 3,
                   parallel="auto", dtype=None) -> LanguageModel:
    """A character/token language model.

    Args:
      vocab_size: number of token ids ``V``.
      cell: ``"lstm"``, ``"gru"``, ``"elman"``, ``"layer_norm_lstm"``,
        ``"layer_norm_gru"``, ``"lru"``, ``"mingru"``, ``"minlstm"``, ``"rglru"``, ``"mgu"``,
        ``"slstm"``, ``"mlstm"``, ``"mamba"`` (each layer a
        :func:`rnnjax.layers.mamba_block` around a cell of ``2 * hidden``
        channels, as ``block=True`` otherwise), or a factory ``hidden_size -> Cell``.
      layers, hidden: depth and width of the recurrent stack.
      embed: embedding width (default ``min(hidden, 256)``; any width ``>= V``
        is as expressive as one-hot input, and a narrow one keeps the first
        layer's input matmul cheap).
      dropout: rate on the embeddings, between layers and before the readout
        (Zaremba et al. 2014: non-recurrent connections only); on only when
        ``apply`` gets a ``key``.
      variational: one dropout mask per sequence, shared over time.
      residual: add each layer's input to its output from the second layer on.
      layer_norm: layer-normalise each recurrent layer's output.
      cell_options: keyword arguments for the cell factory, overriding the
        defaults in ``CELLS`` (e.g. ``{"forget_bias": 0.0}``).
      unroll, remat, hoist, backward, parallel: passed to :func:`rnnjax.unroll` for every layer.
      block: build each layer as :func:`rnnjax.layers.residual_block` (RMS norm,
        the cell, a gated MLP of width ``mlp_expansion * hidden``, residuals)
        with a final RMS norm before the readout, as LRU/Griffin/minGRU
        models are; ``embed`` then defaults to (and must equal) ``hidden``.
        ``residual`` and ``layer_norm`` apply to plain stacks only.
      dtype: the compute dtype (None: float32, the parameters'). With
        ``jnp.bfloat16`` every cell and layer follows the mixed-precision
        policy (:mod:`rnnjax.cells.base`): bfloat16 matmul operands, float32
        accumulation, carries and parameters; a factory passed as ``cell``
        then gets ``dtype=`` too. The logits stay float32 (the readout's
        product accumulates in float32), so the softmax and the loss see no
        bfloat16 rounding.
    """
    fn = "rnnjax.models.language_model"
    dtype = compute_dtype(fn, dtype)
    V = check_size(fn, "vocab_size", vocab_size)
    n_layers = check_size(fn, "layers", layers, example=2)
    H = check_size(fn, "hidden", hidden)
    own_block = OWN_BLOCKS.get(cell) if isinstance(cell, str) else None
    block = block or own_block is not None
    E = check_size(fn, "embed", (H if block else min(H, 256)) if embed is None else embed)
    if block and E != H:
        raise ValueError(f"{fn}: block=True adds each block's input to its output, so embed must equal hidden "
                         f"({H}), got embed={E}. Fix: leave embed unset or pass embed={H}.")
    require_rate(fn, "dropout", dropout)
    make_cell, cell_name = cell_factory(fn, cell, cell_options, dtype)
    embedding = L.embedding(V, E, dtype=dtype)
    if own_block is not None:
        make_block, expansion = own_block
        rnn_layers = [make_block(make_cell(expansion * H), features=H, remat=remat, parallel=parallel, dtype=dtype)
                      for _ in range(n_layers)]
    elif block:
        rnn_layers = [L.residual_block(make_cell(H), mlp_expansion=mlp_expansion, remat=remat, parallel=parallel,
                                       dtype=dtype) for _ in range(n_layers)]
    else:
        rnn_layers = [L.rnn(make_cell(H), unroll=unroll, remat=remat, hoist=hoist, backward=backward,
                            parallel=parallel) for _ in range(n_layers)]
    stack = L.stack(rnn_layers, dropout=dropout, variational=variational, residual=residual, layer_norm=layer_norm,
                    dtype=dtype)
    readout = L.dense(V)

    def init(key: PRNGKey) -> LMParams:
        k_e, k_r, k_o = jax.random.split(key, 3)
        norm = jnp.ones(stack.output_size) if block else None
        return LMParams(embedding.init(k_e), stack.init(k_r, E), readout.init(k_o, stack.output_size), norm)

    def head(params: LMParams, h):
        h = h if params.norm is None else L.rms_norm(h, params.norm)
        return affine(h, params.readout.w, params.readout.b, dtype)  # float32 logits under the policy

    def initial_carry(params: LMParams, batch_shape=()):
        return stack.initial_carry(params.rnn, batch_shape)

    def check_ids(name: str, ids, min_ndim: int) -> Array:
        ids = jnp.asarray(ids)
        if ids.ndim < min_ndim or not jnp.issubdtype(ids.dtype, jnp.integer):
            want = "[*batch, T]" if min_ndim else "[*batch]"
            raise ValueError(f"{fn}.{name}: expected integer token ids of shape {want}, got "
                             f"{ids.dtype}{list(ids.shape)}. Fix: encode text with a Vocabulary "
                             "(ids.astype(jnp.int32)).")
        return ids

    def apply(params: LMParams, ids, *, carry=None, resets=None, key: PRNGKey | None = None):
        ids = check_ids("apply", ids, 1)
        k_e = k_s = k_o = None
        if key is not None and dropout > 0.0:
            k_e, k_s, k_o = jax.random.split(key, 3)
        x = embedding.apply(params.embed, ids)
        x = L.dropout(x, dropout, k_e, variational=variational)
        carry, h = stack.apply(params.rnn, x, carry=carry, resets=resets, key=k_s)
        h = L.dropout(h, dropout, k_o, variational=variational)
        return carry, head(params, h)

    def step(params: LMParams, carry, ids_t):
        ids_t = check_ids("step", ids_t, 0)
        carry, h = stack.step(params.rnn, carry, embedding.apply(params.embed, ids_t))
        return carry, head(params, h)

    extras = "".join(f"+{flag}" for flag, on in (("res", residual), ("ln", layer_norm), ("block", block)) if on)
    return LanguageModel(init, apply, initial_carry, step, V, f"{cell_name}-{n_layers}x{H}{extras}")


@partial(jax.jit, static_argnames=("model", "length", "temperature", "top_k", "top_p"))
def _generate(model: LanguageModel, params, key, prompt, *, length, temperature, top_k, top_p):
    carry, logits = model.apply(params, prompt)
    sample = partial(sample_logits, temperature=temperature, top_k=top_k, top_p=top_p)
    keys = jax.random.split(key, length)
    first = sample(keys[0], logits[..., -1, :])
    if length == 1:  # no scan of zero steps: jax.disable_jit() refuses one
        return first[..., None]

    def body(state, k):
        carry, tok = state
        carry, logits_t = model.step(params, carry, tok)
        nxt = sample(k, logits_t)
        return (carry, nxt), nxt

    _, rest = jax.lax.scan(body, (carry, first), keys[1:])
    return jnp.concatenate([first[..., None], jnp.moveaxis(rest, 0, -1)], axis=-1)


def generate(model: LanguageModel, params: LMParams, key: PRNGKey, prompt_ids, length: int,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None) -> Array:
    """Continues ``prompt_ids [*B, P]`` by ``length`` tokens; returns int32 ``[*B, length]``
    (the new tokens only).

    The prompt is read with one ``apply``; then each new token costs one
    ``model.step`` inside a jitted ``lax.scan``. ``temperature=0`` is greedy
    decoding; ``top_k``/``top_p`` restrict sampling as in
    :func:`rnnjax.decode.sample_logits`. Compiles once per distinct
    (model, prompt shape, length, temperature, top_k, top_p).
    """
    fn = "rnnjax.models.generate"
    fix = "pass at least one integer token id per row, e.g. vocab.encode(text)."
    prompt = as_array(fn, "prompt_ids", prompt_ids, "integer ids [*batch, P]", fix)
    if prompt.ndim < 1 or not jnp.issubdtype(prompt.dtype, jnp.integer) or prompt.shape[-1] == 0:
        raise ValueError(f"{fn}: expected prompt_ids, a non-empty prompt of integer ids [*batch, P] with P >= 1, "
                         f"got {prompt.dtype}{list(prompt.shape)}. Fix: {fix}")
    seen = concrete_range(prompt)
    if seen and not 0 <= seen[0] <= seen[1] < model.vocab_size:
        raise ValueError(f"{fn}: prompt_ids must be in [0, {model.vocab_size}) (the vocabulary), got values in "
                         f"[{seen[0]}, {seen[1]}]. Fix: encode the prompt with the model's vocabulary.")
    typed = isinstance(key, jax.Array) and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) and key.ndim == 0
    if not (typed or (np.shape(key) == (2,) and getattr(key, "dtype", None) == jnp.uint32)):
        raise TypeError(f"{fn}: expected key, one PRNG key (jax.random.key(seed)), got "
                        f"{getattr(key, 'dtype', type(key).__name__)}{list(np.shape(key))}. Fix: pass "
                        "jax.random.key(0).")
    require_int(fn, "length", length, low=0, fix="pass the number of tokens to generate, e.g. length=200.")
    check_sampling(fn, temperature, top_k, top_p, model.vocab_size)
    if length == 0:
        return jnp.zeros(prompt.shape[:-1] + (0,), jnp.int32)
    return _generate(model, params, key, prompt.astype(jnp.int32), length=length,
                     temperature=float(temperature), top_k=top_k,
                     top_p=None if top_p is None else float(top_p))
