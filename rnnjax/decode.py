"""Choosing tokens from logits: greedy, temperature, top-k and nucleus (top-p) sampling."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rnnjax.types import Array, PRNGKey


def check_sampling(fn: str, temperature: float, top_k: int | None, top_p: float | None, vocab_size: int) -> None:
    """Validates sampling settings (all static Python values)."""
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or temperature < 0:
        raise ValueError(f"{fn}: temperature must be a number >= 0 (0 means greedy), got {temperature!r}.")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= vocab_size):
        raise ValueError(f"{fn}: top_k must be None or an integer in [1, {vocab_size}] (the vocabulary size), "
                         f"got {top_k!r}.")
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0):
        raise ValueError(f"{fn}: top_p must be None or a number in (0, 1], got {top_p!r}.")


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
