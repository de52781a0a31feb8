"""Choosing tokens from logits (greedy, temperature, top-k and nucleus (top-p)
sampling), and decoding whole sequences from any cell-based decoder: greedy,
sampling and batched beam search."""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rnnjax._checks import as_array, is_int, is_number, require_int, tree_shapes
from rnnjax.types import Array, PRNGKey


def check_sampling(fn: str, temperature: float, top_k: int | None, top_p: float | None, vocab_size: int) -> None:
    """Validates sampling settings (all static Python values)."""
    if not is_number(temperature) or temperature < 0:
        raise ValueError(f"{fn}: temperature must be a number >= 0 (0 means greedy), got {temperature!r}. "
                         "Fix: pass e.g. temperature=0.8.")
    require_int(fn, "top_k", top_k, high=vocab_size, why="the vocabulary size", optional=True,
                fix="pass e.g. top_k=40, or None.")
    if top_p is not None and (not is_number(top_p) or not 0.0 < top_p <= 1.0):
        raise ValueError(f"{fn}: top_p must be None or a number in (0, 1], got {top_p!r}. "
                         "Fix: pass e.g. top_p=0.9, or None.")


def sample_logits(key: PRNGKey, logits: Array, *, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> Array:
    """One token id per row of ``logits [..., V]`` (int32 ``[...]``).

    ``temperature == 0`` is greedy (argmax; ``key`` unused). Otherwise the
    logits are divided by ``temperature``, cut to the ``top_k`` largest
    and/or to the smallest set whose probability reaches ``top_p`` (the most
    likely token is always kept), and sampled. The settings are static
    Python values.
    """
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None and top_p < 1.0:
        desc = -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(desc, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # probability mass of the strictly more likely tokens
        keep = before < top_p  # always true for the first (most likely) token
        cutoff = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


# ----------------------------------------------------------------------------
# Decoding a whole sequence from any cell-based decoder
#
# A decoder is described by ``step_fn(carry, tokens[B], context) -> (carry, logits[B, V])``:
# a language model's ``lambda c, t, _: model.step(params, c, t)``, or a
# seq2seq model's ``partial(model.step, params)`` with the source's
# ``context``. ``carry`` holds batch dimension ``[B]`` in every leaf (the
# state *before* reading ``start``); ``context`` is a pytree of per-source
# arrays (``[B, ...]``) that the decoder reads but never changes (None for a
# language model). Every function below is jittable with the settings static.


class Decoded(NamedTuple):
    """Decoded sequences. ``tokens [B, (N,) L]`` are padded with ``pad_id`` after
    EOS; ``lengths`` count the tokens up to and including EOS (``L`` for a
    sequence that reached ``max_length`` without EOS, see ``finished``);
    ``log_probs`` are the sums of the model's log-probabilities of those tokens;
    ``scores`` are ``log_probs / lengths ** length_penalty`` (beam search ranks by them)."""

    tokens: Array
    lengths: Array
    log_probs: Array
    scores: Array
    finished: Array


def check_decode(fn: str, max_length, eos_id, pad_id, vocab_size: int | None = None,
                 length_penalty: float = 0.0) -> None:
    require_int(fn, "max_length", max_length, why="the most tokens to generate, EOS included",
                fix="pass e.g. max_length=32.")
    if vocab_size is not None:
        require_int(fn, "vocab_size", vocab_size, why="the number of logits step_fn returns",
                    fix="pass the model's vocabulary size.")
    if not is_number(length_penalty) or not np.isfinite(length_penalty):
        raise ValueError(f"{fn}: length_penalty must be a finite number (0: raw log-probability, 1: per-token "
                         f"mean), got {length_penalty!r}. Fix: pass e.g. length_penalty=0.0.")
    for name, value in (("eos_id", eos_id), ("pad_id", pad_id)):
        if not is_int(value) or value < 0 or (vocab_size is not None and value >= vocab_size):
            raise ValueError(f"{fn}: {name} must be a token id in [0, {vocab_size}), got {value!r}. "
                             "Fix: pass the id the vocabulary gives that token.")


def check_suppress(fn: str, suppress, vocab_size: int | None = None) -> tuple[int, ...]:
    """``suppress`` as a sorted tuple of distinct token ids, each in ``[0, vocab_size)``, leaving at least
    one token that can be emitted."""
    ids = tuple(suppress) if isinstance(suppress, (tuple, list, set, frozenset)) else None
    V = "V" if vocab_size is None else vocab_size
    if ids is None or not all(is_int(i) and 0 <= i and (vocab_size is None or i < vocab_size) for i in ids):
        raise ValueError(f"{fn}: suppress must be a tuple of token ids in [0, {V}), got {suppress!r}. "
                         "Fix: pass e.g. suppress=(pad_id, bos_id).")
    ids = tuple(sorted(set(ids)))
    if vocab_size is not None and len(ids) >= vocab_size:
        raise ValueError(f"{fn}: suppress leaves no token to emit: it holds all {vocab_size} ids of the "
                         "vocabulary. Fix: suppress fewer tokens.")
    return ids


def check_beam(fn: str, beam_width, vocab_size: int, suppress: tuple[int, ...]) -> None:
    """``beam_width`` must be an int no wider than the tokens that can be emitted."""
    most = vocab_size - len(suppress)
    what = (f"the vocabulary size, {vocab_size}, less the {len(suppress)} suppressed ids" if suppress
            else "the vocabulary size")
    require_int(fn, "beam_width", beam_width, high=most, why=what,
                fix="use a beam no wider than the tokens it can emit.")


def _suppressed(fn: str, logp: Array, suppress: tuple[int, ...]) -> Array:
    """``logp [..., V]`` with the ``suppress`` ids at ``-inf``, so they are never chosen."""
    if not suppress:
        return logp
    check_suppress(fn, suppress, logp.shape[-1])
    return logp.at[..., jnp.asarray(suppress)].set(-jnp.inf)


def _check_start(fn: str, start, carry, context) -> Array:
    """``start [B]`` integer tokens, with ``B`` first in every leaf of ``carry`` and ``context``."""
    fix = "pass jnp.full((B,), bos_id)."
    start = as_array(fn, "start", start, "tokens of shape [B] (integers)", fix)
    if start.ndim != 1 or not jnp.issubdtype(start.dtype, jnp.integer):
        raise ValueError(f"{fn}: expected start tokens of shape [B] (integers), got {start.dtype}"
                         f"{list(start.shape)}. Fix: {fix}")
    for name, tree in (("carry", carry), ("context", context)):
        B, leaves = start.shape[0], jax.tree_util.tree_leaves(tree)
        if not all(np.ndim(leaf) >= 1 and np.shape(leaf)[0] == B for leaf in leaves):
            raise ValueError(f"{fn}: expected a {name} whose every leaf has the batch dimension B = {B} of start "
                             f"first, got {tree_shapes(tree)}. Fix: build the {name} for the same batch as start.")
    return start


def _call(fn: str, step_fn, carry, tokens, context, vocab_size: int | None = None):
    carry, logits = step_fn(carry, tokens, context)
    if vocab_size is not None and logits.shape[-1] != vocab_size:
        raise ValueError(f"{fn}: expected step_fn's logits to hold vocab_size = {vocab_size} entries in the last "
                         f"axis, got shape {tuple(logits.shape)}. Fix: pass the model's vocabulary size as vocab_size.")
    return carry, jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


def _normalise(log_probs, lengths, length_penalty: float):
    if length_penalty == 0.0:
        return log_probs
    return log_probs / jnp.maximum(lengths, 1).astype(jnp.float32) ** length_penalty


def _sequential(fn: str, choose, step_fn, carry, start, context, max_length, eos_id, pad_id, length_penalty,
                suppress):
    start = _check_start(fn, start, carry, context)
    B = start.shape[0]

    def cond(s):
        return (s["t"] < max_length) & ~jnp.all(s["done"])

    def body(s):
        carry, logp = _call(fn, step_fn, s["carry"], s["last"], context)
        logp = _suppressed(fn, logp, suppress)
        tok = choose(s["t"], logp).astype(jnp.int32)
        done = s["done"]
        tok = jnp.where(done, pad_id, tok)
        gained = jnp.take_along_axis(logp, tok[:, None], axis=-1)[:, 0]
        return {"t": s["t"] + 1, "carry": carry, "last": tok,
                "tokens": s["tokens"].at[:, s["t"]].set(tok),
                "log_probs": jnp.where(done, s["log_probs"], s["log_probs"] + gained),
                "lengths": jnp.where(done, s["lengths"], s["t"] + 1),
                "done": done | (tok == eos_id)}

    init = {"t": jnp.zeros((), jnp.int32), "carry": carry, "last": start.astype(jnp.int32),
            "tokens": jnp.full((B, max_length), pad_id, jnp.int32), "log_probs": jnp.zeros((B,), jnp.float32),
            "lengths": jnp.zeros((B,), jnp.int32), "done": jnp.zeros((B,), bool)}
    s = jax.lax.while_loop(cond, body, init)
    return Decoded(s["tokens"], s["lengths"], s["log_probs"],
                   _normalise(s["log_probs"], s["lengths"], length_penalty), s["done"])


def greedy(step_fn, carry, start, *, max_length: int, eos_id: int, context=None, pad_id: int = 0,
           length_penalty: float = 0.0, suppress: tuple[int, ...] = ()) -> Decoded:
    """Greedy decoding: at each step the most likely token (``argmax``; the
    lowest id among ties), until EOS or ``max_length`` tokens. ``start [B]`` is
    the first input (e.g. BOS). ``suppress``: token ids never emitted (e.g.
    PAD and BOS); the choice is among the others, whose log-probabilities
    are the model's own. Returns :class:`Decoded` with ``tokens [B, max_length]``."""
    fn = "rnnjax.decode.greedy"
    check_decode(fn, max_length, eos_id, pad_id, length_penalty=length_penalty)
    suppress = check_suppress(fn, suppress)
    return _sequential(fn, lambda t, logp: jnp.argmax(logp, axis=-1), step_fn, carry, start, context,
                       max_length, eos_id, pad_id, length_penalty, suppress)


def sample(step_fn, carry, start, key: PRNGKey, *, max_length: int, eos_id: int, context=None, pad_id: int = 0,
           temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           suppress: tuple[int, ...] = ()) -> Decoded:
    """Ancestral sampling with :func:`sample_logits` (temperature, top-k, top-p)
    at every step, until EOS or ``max_length``; step ``t`` uses
    ``fold_in(key, t)``. ``log_probs`` are under the model's (untempered)
    distribution. ``suppress``: token ids never emitted (the others are
    sampled in proportion to their probabilities)."""
    fn = "rnnjax.decode.sample"
    check_decode(fn, max_length, eos_id, pad_id)
    suppress = check_suppress(fn, suppress)

    def choose(t, logp):
        check_sampling(fn, temperature, top_k, top_p, logp.shape[-1])
        return sample_logits(jax.random.fold_in(key, t), logp, temperature=temperature, top_k=top_k, top_p=top_p)

    return _sequential(fn, choose, step_fn, carry, start, context, max_length, eos_id, pad_id, 0.0, suppress)


def beam_search(step_fn, carry, start, *, beam_width: int, max_length: int, eos_id: int, vocab_size: int,
                context=None, pad_id: int = 0, length_penalty: float = 0.0, nbest: int = 1,
                suppress: tuple[int, ...] = ()) -> Decoded:
    """Batched beam search. Returns :class:`Decoded` with ``tokens [B, nbest, max_length]``
    and ``[B, nbest]`` lengths, log-probabilities and scores, best first.

    Every step extends each of the ``beam_width`` beams by every token and
    keeps the ``beam_width`` best candidates by score
    ``log p / length ** length_penalty`` (``length`` counts EOS;
    ``length_penalty=0``: raw log-probability, ``1``: per-token mean). A beam
    that emitted EOS is finished: it stays in the beam with its score fixed,
    competing with the live ones. The search stops when every beam of every
    batch row is finished, or after ``max_length`` steps. ``beam_width=1`` is
    exactly :func:`greedy`. ``suppress``: token ids never emitted; the beam
    can then be at most ``vocab_size - len(suppress)`` wide.

    ``carry`` and ``context`` have batch ``[B]``; the step function is called
    with both expanded to ``[B, beam_width]`` (so it must accept any batch
    shape, as every rnnjax cell does). Jittable with the settings static.
    """
    fn = "rnnjax.decode.beam_search"
    check_decode(fn, max_length, eos_id, pad_id, vocab_size, length_penalty)
    V = vocab_size
    suppress = check_suppress(fn, suppress, V)
    check_beam(fn, beam_width, V, suppress)
    require_int(fn, "nbest", nbest, high=beam_width, high_label=f"beam_width={beam_width}",
                fix="ask for at most as many sequences as the beam holds.")
    start = _check_start(fn, start, carry, context)
    B, K = start.shape[0], beam_width

    def expand(x):
        return jnp.broadcast_to(x[:, None], (x.shape[0], K, *x.shape[1:]))

    carry = jax.tree_util.tree_map(expand, carry)
    context = jax.tree_util.tree_map(expand, context)

    def gather(x, beam):  # x [B, K, ...], beam [B, K] -> x[b, beam[b, k]]
        return jnp.take_along_axis(x, beam.reshape(B, K, *(1,) * (x.ndim - 2)), axis=1)

    def cond(s):
        return (s["t"] < max_length) & ~jnp.all(s["done"])

    def body(s):
        t, done = s["t"], s["done"]
        new_carry, logp = _call(fn, step_fn, s["carry"], s["last"], context, V)  # [B, K, V]
        logp = _suppressed(fn, logp, suppress)
        stay = jnp.full((V,), -jnp.inf, jnp.float32).at[pad_id].set(0.0)
        logp = jnp.where(done[..., None], stay, logp)
        total = s["log_probs"][..., None] + logp  # [B, K, V]
        lengths = jnp.where(done, s["lengths"], t + 1)
        score = _normalise(total, lengths[..., None], length_penalty)
        _, idx = jax.lax.top_k(score.reshape(B, K * V), K)
        beam, tok = idx // V, (idx % V).astype(jnp.int32)
        was_done = jnp.take_along_axis(done, beam, axis=1)
        tokens = jax.tree_util.tree_map(lambda x: gather(x, beam), s["tokens"])
        return {"t": t + 1, "carry": jax.tree_util.tree_map(lambda x: gather(x, beam), new_carry), "last": tok,
                "tokens": tokens.at[:, :, t].set(tok),
                "log_probs": jnp.take_along_axis(total.reshape(B, K * V), idx, axis=1),
                "lengths": jnp.take_along_axis(lengths, beam, axis=1),
                "done": was_done | (tok == eos_id)}

    log_probs = jnp.full((B, K), -jnp.inf, jnp.float32).at[:, 0].set(0.0)
    init = {"t": jnp.zeros((), jnp.int32), "carry": carry, "last": expand(start.astype(jnp.int32)),
            "tokens": jnp.full((B, K, max_length), pad_id, jnp.int32), "log_probs": log_probs,
            "lengths": jnp.zeros((B, K), jnp.int32), "done": jnp.zeros((B, K), bool)}
    s = jax.lax.while_loop(cond, body, init)
    scores = _normalise(s["log_probs"], s["lengths"], length_penalty)
    order = jnp.argsort(-scores, axis=1, stable=True)[:, :nbest]
    pick = partial(jnp.take_along_axis, indices=order, axis=1)
    return Decoded(jnp.take_along_axis(s["tokens"], order[..., None], axis=1), pick(s["lengths"]),
                   pick(s["log_probs"]), pick(scores), pick(s["done"]))
