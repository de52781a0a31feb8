"""Training glue: the train state, a jitted train step, evaluation (the only module that knows optax).

::

    optimizer = default_optimizer(2e-3, total_steps=1000)
    state = init_train_state(params, optimizer, key)
    train_step = make_train_step(language_model_loss(model), optimizer)
    for batch in batches:
        state, metrics = train_step(state, batch)       # state is donated: don't reuse the old one
    val_loss = evaluate(language_model_loss(model), state.params, val_batches)

A loss function has the signature ``loss_fn(params, batch, key) -> loss``
(a scalar); ``key`` is a fresh PRNG key per step for dropout, and ``None``
in evaluation.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Iterable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from rnnjax.types import Array, PRNGKey

LossFn = Callable[[Any, Any, "PRNGKey | None"], Array]


class TrainState(NamedTuple):
    step: Array  # int32 scalar: optimiser steps taken
    params: Any
    opt_state: Any
    key: PRNGKey  # base key; step t uses jax.random.fold_in(key, t)


def init_train_state(params, optimizer: optax.GradientTransformation, key: PRNGKey) -> TrainState:
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params), key)


def default_warmup(total_steps: int) -> int:
    """Warmup steps used by :func:`default_optimizer`: 100, or a tenth of a shorter run."""
    return max(1, min(100, total_steps // 10))


def default_optimizer(learning_rate: float = 2e-3, *, total_steps: int, warmup_steps: int | None = None,
                      end_fraction: float = 0.1, weight_decay: float = 0.01, clip_norm: float = 1.0,
                      b2: float = 0.99) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW with a linear warmup and cosine decay.

    The learning rate rises from 0 to ``learning_rate`` over ``warmup_steps``
    (default :func:`default_warmup`), then decays to ``end_fraction *
    learning_rate`` at ``total_steps``. Weight decay applies to matrices
    only (``ndim >= 2``), not to biases or layer-norm gains. The warmup does
    not depend on ``total_steps``, so a run may take its first steps with one
    ``total_steps`` and continue with another (same state structure); the CLI
    does this to fit a time budget.
    """
    fn = "rnnjax.train.default_optimizer"
    if not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"{fn}: total_steps must be an integer >= 1, got {total_steps!r}.")
    warmup = default_warmup(total_steps) if warmup_steps is None else warmup_steps
    if not isinstance(warmup, int) or warmup < 1:
        raise ValueError(f"{fn}: warmup_steps must be an integer >= 1, got {warmup_steps!r}.")
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=learning_rate, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=learning_rate * end_fraction)
    return optax.chain(
        optax.clip_by_global_norm(clip_norm),
        optax.adamw(schedule, b2=b2, weight_decay=weight_decay,
                    mask=lambda params: jax.tree_util.tree_map(lambda p: jnp.ndim(p) >= 2, params)),
    )


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation):
    """A jitted ``train_step(state, batch) -> (state, metrics)``.

    The state is donated (its buffers are reused for the new one). Step
    ``t`` passes ``jax.random.fold_in(state.key, t)`` to ``loss_fn``, so
    every step gets fresh dropout masks and a run is reproducible from its
    key. ``metrics``: ``loss`` (what ``loss_fn`` returned, before the
    update) and ``grad_norm`` (before clipping).
    """

    def train_step(state: TrainState, batch):
        key = jax.random.fold_in(state.key, state.step)
        loss, grads = jax.value_and_grad(loss_fn)(state.params, batch, key)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
        return TrainState(state.step + 1, params, opt_state, state.key), metrics

    return jax.jit(train_step, donate_argnums=0)


@jax.jit
def cross_entropy(logits: Array, labels: Array) -> Array:
    """Mean cross-entropy in nats per token of ``logits [..., V]`` against integer ``labels [...]``."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    return losses.mean()


def language_model_loss(model) -> LossFn:
    """``loss_fn(params, batch, key)``: next-token cross-entropy (nats/token) of a
    :class:`rnnjax.models.LanguageModel` on ``{"x": [B, T], "y": [B, T]}``,
    each window read from a zero carry."""

    def loss_fn(params, batch, key=None):
        _, logits = model.apply(params, batch["x"], key=key)
        return cross_entropy(logits, batch["y"])

    return loss_fn


@partial(jax.jit, static_argnums=0)
def _eval_loss(loss_fn: LossFn, params, batch):
    return loss_fn(params, batch, None)


def evaluate(loss_fn: LossFn, params, batches: Iterable) -> float:
    """Mean of ``loss_fn(params, batch, None)`` over ``batches`` (no dropout), as a float.

    Batches should have equal sizes (the mean is over batches). Compiled once
    per ``loss_fn`` object and batch shape: pass the same ``loss_fn`` each time.
    """
    losses = [_eval_loss(loss_fn, params, batch) for batch in batches]
    if not losses:
        raise ValueError("rnnjax.train.evaluate: got no batches; expected at least one.")
    return float(jnp.mean(jnp.stack(losses)))
