"""A sequence-to-sequence model: bidirectional encoder, bridge, attention decoder.

::

    model = seq2seq(src_vocab=30, tgt_vocab=42, cell="lstm", hidden=256)
    params = model.init(key)
    logits = model.apply(params, src, src_lengths, tgt_in, tgt_lengths)       # teacher forcing: [B, T, V]
    carry, context = model.start(params, src, src_lengths)                    # decoding: one step at a time
    carry, logits_t = model.step(params, carry, tokens, context)

Token conventions: target ids ``0`` = padding, ``1`` = BOS (the decoder's
first input), ``2`` = EOS (the last target); source id ``0`` = padding.
``tgt_in`` is ``[BOS, y_1, ..., y_n]`` and the targets ``[y_1, ..., y_n, EOS]``,
both of length ``n + 1`` (``tgt_lengths``).

- **Encoder**: source embedding, then ``layers`` bidirectional layers of any
  cell (``hidden`` units per direction), length-aware: memory
  ``[B, S, 2*hidden]``.
- **Bridge** (``bridge="dense"``): every leaf of the decoder cell's initial
  carry is ``tanh(W [h_fw(last); h_bw(first)] + b)`` of the encoder's
  final forward and backward outputs; ``"zeros"`` starts from zeros.
- **Decoder**: :func:`rnnjax.attention.attention_decoder` around one cell
  of ``decoder_hidden`` units (default ``2*hidden``), any attention rule,
  Luong or Bahdanau style, input feeding on by default; a dense readout of
  its attentional output.
- **Training**: :func:`seq2seq_loss` with teacher forcing, label smoothing
  and scheduled sampling (Bengio et al. 2015): with probability ``p`` (a
  per-batch value from a :func:`sampling_schedule`), a decoder input is
  the model's own previous greedy prediction instead of the true token.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rnnjax import layers as L
from rnnjax import scan
from rnnjax._checks import concrete_range, require_rate
from rnnjax.attention import DecoderCarry, attention_decoder, bind_memory
from rnnjax.attention import attention as make_attention
from rnnjax.cells.base import Cell, affine, check_size, compute_dtype
from rnnjax.models.lm import cell_factory
from rnnjax.types import Array, PRNGKey

PAD, BOS, EOS = 0, 1, 2
SUPPRESS = (PAD, BOS)  # never decoded: a target sequence holds neither after its first input
BRIDGES = ("dense", "zeros")


class Seq2SeqParams(NamedTuple):
    src_embed: Array  # [Vs, E]
    encoder: Any  # StackParams of bidirectional layers
    bridge: Any  # tuple of DenseParams, one per leaf of the decoder cell's carry (empty for "zeros")
    tgt_embed: Array  # [Vt, E]
    decoder: Any  # rnnjax.attention.DecoderParams (unbound)
    readout: L.DenseParams  # [A, Vt]


class Context(NamedTuple):
    """What the decoder attends to, per source: ``memory [*B, S, M]``, its prepared keys and ``mask [*B, S]``."""

    memory: Array
    keys: Array
    mask: Array


class Seq2Seq(NamedTuple):
    """Pure functions of an encoder-decoder (hashable: a static ``jit`` argument).

    Attributes:
      init: ``key -> Seq2SeqParams``.
      encode: ``(params, src[B, S], src_lengths[B], *, key=None) -> (memory[B, S, M], summary[B, M])``.
      start: ``(params, src, src_lengths, *, key=None) -> (carry, context)``: the decoder's initial
        carry and the :class:`Context` it attends to.
      step: ``(params, carry, tokens[*B], context) -> (carry, logits[*B, Vt])``: one decoder step.
      apply: ``(params, src, src_lengths, tgt_in[B, T], tgt_lengths[B], *, key=None) -> logits[B, T, Vt]``
        (teacher forcing; zero logits past each length).
      decoder: the attention decoder :class:`~rnnjax.cells.Cell`.
      src_vocab, tgt_vocab: vocabulary sizes.
      name: e.g. ``"lstm-1x256-general"``.
    """

    init: Callable[[PRNGKey], Seq2SeqParams]
    encode: Callable[..., tuple[Array, Array]]
    start: Callable[..., tuple[Any, Context]]
    step: Callable[..., tuple[Any, Array]]
    apply: Callable[..., Array]
    decoder: Cell
    src_vocab: int
    tgt_vocab: int
    name: str


def _check_src(fn: str, src, src_lengths):
    src, src_lengths = jnp.asarray(src), jnp.asarray(src_lengths)
    if src.ndim != 2 or not jnp.issubdtype(src.dtype, jnp.integer) or src.shape[1] == 0:
        raise ValueError(f"{fn}: expected integer source ids of shape [B, S] with S >= 1, got "
                         f"{src.dtype}{list(src.shape)}. Fix: encode each word with the source vocabulary "
                         "and pad with 0.")
    if tuple(src_lengths.shape) != src.shape[:1]:
        raise ValueError(f"{fn}: expected src_lengths of shape ({src.shape[0]},), got "
                         f"{tuple(src_lengths.shape)}. Fix: pass one length per source.")
    seen = concrete_range(src_lengths)
    if seen and seen[0] < 1:
        raise ValueError(f"{fn}: every source needs at least one token, got a length of "
                         f"{seen[0]}. Fix: drop empty sources before encoding.")
    return src, src_lengths


def seq2seq(src_vocab: int, tgt_vocab: int, *, cell: str | Callable[[int], Cell] = "lstm",
            hidden: int = 256, layers: int = 1, decoder_hidden: int | None = None, embed: int = 64,
            attention: str = "general", style: str = "luong", input_feeding: bool = True,
            bridge: str = "dense", dropout: float = 0.0, cell_options: Mapping[str, Any] | None = None,
            decoder_cell: str | Callable[[int], Cell] | None = None, dtype=None) -> Seq2Seq:
    """An attention encoder-decoder (see the module docstring).

    Args:
      src_vocab, tgt_vocab: vocabulary sizes (target ids 0, 1, 2 are PAD, BOS, EOS).
      cell: the encoder's cell (a name from ``rnnjax.models.CELLS`` or a factory
        ``hidden_size -> Cell``); ``decoder_cell`` the decoder's (default: the same).
      hidden: units per direction of each encoder layer; ``layers`` bidirectional layers.
      decoder_hidden: the decoder cell's units (default ``2 * hidden``).
      embed: width of both embeddings.
      attention: ``"additive"``, ``"dot"``, ``"general"`` or ``"concat"``.
      style: ``"luong"`` or ``"bahdanau"`` (see :func:`rnnjax.attention.attention_decoder`).
      input_feeding: feed the previous attentional vector into the decoder cell.
      bridge: ``"dense"`` or ``"zeros"``.
      dropout: on both embeddings, between encoder layers and before the readout,
        only when a ``key`` is given.
      dtype: the compute dtype of the embeddings, the encoder and the decoder's
        cell (None: float32; with ``jnp.bfloat16`` the mixed-precision policy of
        :mod:`rnnjax.cells.base`, and a factory passed as ``cell`` gets
        ``dtype=`` too). The encoder's memory is kept in float32 for the
        attention, which (with the attentional output layer) computes in
        float32; the readout accumulates in float32 and the logits are float32.
    """
    fn = "rnnjax.models.seq2seq"
    dtype = compute_dtype(fn, dtype)
    Vs = check_size(fn, "src_vocab", src_vocab)
    Vt = check_size(fn, "tgt_vocab", tgt_vocab, minimum=EOS + 2)
    H = check_size(fn, "hidden", hidden)
    n_layers = check_size(fn, "layers", layers, example=2)
    Hd = check_size(fn, "decoder_hidden", 2 * H if decoder_hidden is None else decoder_hidden)
    E = check_size(fn, "embed", embed)
    if bridge not in BRIDGES:
        raise ValueError(f"{fn}: unknown bridge {bridge!r}; expected 'dense' or 'zeros'. Fix: pass one of those.")
    require_rate(fn, "dropout", dropout)
    make_enc, cell_name = cell_factory(fn, cell, cell_options, dtype)
    make_dec, _ = (make_enc, None) if decoder_cell is None else cell_factory(fn, decoder_cell, cell_options, dtype)

    src_embedding = L.embedding(Vs, E, dtype=dtype)
    tgt_embedding = L.embedding(Vt, E, dtype=dtype)
    encoder = L.stack([L.bidirectional(make_enc(H)) for _ in range(n_layers)], dropout=dropout, dtype=dtype)
    M = encoder.output_size
    attn = make_attention(attention)
    dec_inner = make_dec(Hd)
    decoder = attention_decoder(dec_inner, attn, memory_size=M, style=style, input_feeding=input_feeding)
    readout = L.dense(Vt)

    def logits(params: Seq2SeqParams, y):
        return affine(y, params.readout.w, params.readout.b, dtype)  # float32 under the policy

    carry_leaves = jax.tree_util.tree_leaves(
        jax.eval_shape(lambda: dec_inner.initial_carry(dec_inner.init(jax.random.key(0), E + M + Hd), ())))
    carry_widths = [leaf.shape[-1] for leaf in carry_leaves]

    def init(key: PRNGKey) -> Seq2SeqParams:
        k_se, k_enc, k_br, k_te, k_dec, k_out = jax.random.split(key, 6)
        bridge_params = ()
        if bridge == "dense":
            bridge_params = tuple(L.dense(w).init(k, M) for w, k in
                                  zip(carry_widths, jax.random.split(k_br, len(carry_widths))))
        return Seq2SeqParams(src_embedding.init(k_se), encoder.init(k_enc, E), bridge_params,
                             tgt_embedding.init(k_te), decoder.init(k_dec, E), readout.init(k_out, decoder.output_size))

    def encode(params: Seq2SeqParams, src, src_lengths, *, key: PRNGKey | None = None):
        src, src_lengths = _check_src(f"{fn}.encode", src, src_lengths)
        k_e = k_s = None
        if key is not None and dropout > 0.0:
            k_e, k_s = jax.random.split(key)
        x = L.dropout(src_embedding.apply(params.src_embed, src), dropout, k_e)
        _, memory = encoder.apply(params.encoder, x, lengths=src_lengths, key=k_s)
        if dtype is not None:
            memory = memory.astype(jnp.promote_types(memory.dtype, jnp.float32))
        half = M // 2
        last = jnp.take_along_axis(memory, jnp.maximum(src_lengths - 1, 0)[:, None, None], axis=1)[:, 0]
        summary = jnp.concatenate([last[:, :half], memory[:, 0, half:]], axis=-1)
        return memory, summary

    def start(params: Seq2SeqParams, src, src_lengths, *, key: PRNGKey | None = None):
        memory, summary = encode(params, src, src_lengths, key=key)
        mask = jnp.arange(memory.shape[1]) < jnp.asarray(src_lengths)[:, None]
        bound = bind_memory(attn, params.decoder, memory, mask)
        carry = decoder.initial_carry(bound, (memory.shape[0],))
        if bridge == "dense":
            leaves, treedef = jax.tree_util.tree_flatten(carry.cell)
            leaves = [jnp.tanh(L.dense(w).apply(p, summary)).astype(leaf.dtype)
                      for w, p, leaf in zip(carry_widths, params.bridge, leaves)]
            carry = carry._replace(cell=jax.tree_util.tree_unflatten(treedef, leaves))
        return carry, Context(bound.memory, bound.keys, bound.mask)

    def bound_decoder(params: Seq2SeqParams, context: Context):
        return params.decoder._replace(memory=context.memory, keys=context.keys, mask=context.mask)

    def step(params: Seq2SeqParams, carry: DecoderCarry, tokens, context: Context):
        x = tgt_embedding.apply(params.tgt_embed, jnp.asarray(tokens))
        carry, y = decoder.step(bound_decoder(params, context), carry, x)
        return carry, logits(params, y)

    def apply(params: Seq2SeqParams, src, src_lengths, tgt_in, tgt_lengths, *, key: PRNGKey | None = None):
        k_enc = k_t = k_o = None
        if key is not None and dropout > 0.0:
            k_enc, k_t, k_o = jax.random.split(key, 3)
        carry, context = start(params, src, src_lengths, key=k_enc)
        x = L.dropout(tgt_embedding.apply(params.tgt_embed, jnp.asarray(tgt_in)), dropout, k_t)
        _, ys = scan.unroll(decoder, bound_decoder(params, context), x, carry=carry, lengths=tgt_lengths)
        return logits(params, L.dropout(ys, dropout, k_o))

    name = f"{cell_name}-{n_layers}x{H}-{attention}"
    return Seq2Seq(init, encode, start, step, apply, decoder, Vs, Vt, name)


def token_losses(logits: Array, targets: Array, label_smoothing: float = 0.0) -> Array:
    """Per-token cross-entropy ``[...]`` (nats) of ``logits [..., V]``; with
    ``label_smoothing`` ``e`` the target distribution is ``(1 - e)`` on the
    true token plus ``e / V`` on every token."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    if label_smoothing == 0.0:
        return nll
    return (1.0 - label_smoothing) * nll - label_smoothing * logp.mean(-1)


def _scheduled_logits(model: Seq2Seq, params, batch, key, prob):
    """Teacher forcing where each input after BOS is, with probability ``prob``,
    the model's own greedy prediction at the previous step."""
    src, src_lengths, tgt_in = batch["src"], batch["src_lengths"], jnp.asarray(batch["tgt_in"])
    k_enc, k_coin = jax.random.split(key)
    carry, context = model.start(params, src, src_lengths, key=k_enc)
    use_model = jax.random.bernoulli(k_coin, prob, tgt_in.shape).at[:, 0].set(False)

    def body(state, inp):
        carry, prev = state
        gold, own = inp
        tokens = jnp.where(own, prev, gold)
        carry, logits = model.step(params, carry, tokens, context)
        return (carry, jnp.argmax(logits, -1).astype(tgt_in.dtype)), logits

    _, logits = jax.lax.scan(body, (carry, tgt_in[:, 0]), (tgt_in.T, use_model.T))
    return jnp.moveaxis(logits, 0, 1)


def seq2seq_loss(model: Seq2Seq, *, label_smoothing: float = 0.0, scheduled_sampling: bool = False):
    """``loss_fn(params, batch, key) -> mean loss per target token`` for
    :func:`rnnjax.train.make_train_step`. ``batch``: ``src [B, S]``,
    ``src_lengths [B]``, ``tgt_in [B, T]``, ``tgt_out [B, T]``, ``tgt_lengths [B]``
    and, with ``scheduled_sampling``, ``sampling_prob`` (a scalar: the chance
    that a decoder input is the model's own previous prediction; only when a
    ``key`` is given, i.e. in training)."""
    fn = "rnnjax.models.seq2seq_loss"
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"{fn}: label_smoothing must be in [0, 1), got {label_smoothing!r}. "
                         "Fix: pass e.g. 0.1, or 0 for none.")

    def loss_fn(params, batch, key=None):
        if scheduled_sampling and key is not None:
            k_model, k_sched = jax.random.split(key)
            logits = _scheduled_logits(model, params, batch, k_sched, batch["sampling_prob"])
            del k_model
        else:
            logits = model.apply(params, batch["src"], batch["src_lengths"], batch["tgt_in"], batch["tgt_lengths"],
                                 key=key)
        tgt_out = jnp.asarray(batch["tgt_out"])
        valid = jnp.arange(tgt_out.shape[1]) < jnp.asarray(batch["tgt_lengths"])[:, None]
        losses = token_losses(logits, tgt_out, label_smoothing)
        return jnp.sum(jnp.where(valid, losses, 0.0)) / jnp.maximum(jnp.sum(valid), 1)

    return loss_fn


@partial(jax.jit, static_argnames=("model",))
def sequence_log_probs(model: Seq2Seq, params, src, src_lengths, tgt_out, tgt_lengths) -> Array:
    """``log p(tgt_out | src)`` per sequence ``[B]``: the sum of the log-probabilities
    of its first ``tgt_lengths`` targets (EOS included) under teacher forcing."""
    tgt_out = jnp.asarray(tgt_out)
    tgt_in = jnp.concatenate([jnp.full_like(tgt_out[:, :1], BOS), tgt_out[:, :-1]], axis=1)
    logits = model.apply(params, src, src_lengths, tgt_in, tgt_lengths)
    valid = jnp.arange(tgt_out.shape[1]) < jnp.asarray(tgt_lengths)[:, None]
    return jnp.sum(jnp.where(valid, -token_losses(logits, tgt_out), 0.0), axis=1)


SCHEDULES = ("constant", "linear", "inverse_sigmoid")


def sampling_schedule(kind: str = "linear", *, max_prob: float = 0.25, start_step: int = 0,
                      end_step: int = 1000, k: float = 10.0) -> Callable[[int], float]:
    """``step -> probability`` of feeding the model's own prediction (scheduled sampling).

    ``"constant"``: ``max_prob`` from ``start_step`` on; ``"linear"``: from 0
    at ``start_step`` to ``max_prob`` at ``end_step``; ``"inverse_sigmoid"``
    (Bengio et al. 2015): ``max_prob * (1 - k / (k + exp(i / k)))`` with
    ``i`` the step since ``start_step`` scaled so that ``end_step`` is ``i = k**2 / 2``.
    Before ``start_step`` the probability is 0 (pure teacher forcing).
    """
    fn = "rnnjax.models.sampling_schedule"
    if kind not in SCHEDULES:
        raise ValueError(f"{fn}: unknown kind {kind!r}; expected one of {', '.join(SCHEDULES)}.")
    if not 0.0 <= max_prob <= 1.0:
        raise ValueError(f"{fn}: max_prob must be in [0, 1], got {max_prob!r}.")
    if end_step <= start_step:
        raise ValueError(f"{fn}: end_step must be > start_step, got {end_step} <= {start_step}.")

    def schedule(step: int) -> float:
        if step < start_step:
            return 0.0
        frac = min(1.0, (step - start_step) / (end_step - start_step))
        if kind == "constant":
            return float(max_prob)
        if kind == "linear":
            return float(max_prob * frac)
        i = frac * k * k / 2
        return float(max_prob * (1.0 - k / (k + math.exp(i / k))))

    return schedule


@partial(jax.jit, static_argnames=("model", "beam_width", "nbest", "max_length", "length_penalty"))
def _translate(model: Seq2Seq, params, src, src_lengths, *, beam_width, nbest, max_length, length_penalty):
    from rnnjax import decode

    carry, context = model.start(params, src, src_lengths)
    start = jnp.full((src.shape[0],), BOS, jnp.int32)
    step = partial(model.step, params)
    if beam_width == 1 and nbest == 1:
        d = decode.greedy(step, carry, start, max_length=max_length, eos_id=EOS, context=context, pad_id=PAD,
                          length_penalty=length_penalty, suppress=SUPPRESS)
        return jax.tree_util.tree_map(lambda x: x[:, None], d)
    return decode.beam_search(step, carry, start, beam_width=beam_width, max_length=max_length, eos_id=EOS,
                              vocab_size=model.tgt_vocab, context=context, pad_id=PAD,
                              length_penalty=length_penalty, nbest=nbest, suppress=SUPPRESS)


def translate(model: Seq2Seq, params, src, src_lengths, *, beam_width: int = 1, nbest: int = 1,
              max_length: int = 32, length_penalty: float = 0.0):
    """Decodes a batch of sources: greedy (``beam_width=1``) or beam search, never emitting PAD or BOS.
    Returns :class:`rnnjax.decode.Decoded` with ``tokens [B, nbest, max_length]``
    (EOS included, then PAD) and ``[B, nbest]`` lengths, log-probabilities and scores."""
    from rnnjax import decode

    fn = "rnnjax.models.translate"
    src, src_lengths = jnp.asarray(src), jnp.asarray(src_lengths)
    seen = concrete_range(src_lengths)
    if src.ndim != 2 or src.shape[1] == 0 or (seen and seen[0] < 1):
        raise ValueError(f"{fn}: every source needs at least one token, got source ids of shape "
                         f"{tuple(src.shape)} and lengths {src_lengths.tolist()}. Fix: drop empty sources.")
    decode.check_decode(fn, max_length, EOS, PAD, model.tgt_vocab)
    decode.check_beam(fn, beam_width, model.tgt_vocab, SUPPRESS)
    if not isinstance(nbest, int) or not 1 <= nbest <= beam_width:
        raise ValueError(f"{fn}: nbest must be an integer in [1, beam_width={beam_width}], got {nbest!r}. "
                         "Fix: ask for at most as many sequences as the beam holds.")
    return _translate(model, params, src.astype(jnp.int32), src_lengths.astype(jnp.int32), beam_width=beam_width,
                      nbest=nbest, max_length=max_length, length_penalty=float(length_penalty))


@partial(jax.jit, static_argnames=("model",))
def attention_weights(model: Seq2Seq, params, src, src_lengths, tokens):
    """The decoder's attention weights ``[B, T, S]`` while reading ``tokens [B, T]``
    (its inputs: BOS then the output so far), one step at a time."""
    carry, context = model.start(params, src, src_lengths)

    def body(c, tok):
        c, _ = model.step(params, c, tok, context)
        return c, c.weights

    _, weights = jax.lax.scan(body, carry, jnp.asarray(tokens).T)
    return jnp.moveaxis(weights, 0, 1)
