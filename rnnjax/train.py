"""Training glue: the train state, a jitted train step, evaluation, early stopping and the
training loop (the only module that knows optax).

::

    optimizer = default_optimizer(2e-3, total_steps=1000)
    state = init_train_state(params, optimizer, key)
    train_step = make_train_step(language_model_loss(model), optimizer)
    for batch in batches:
        state, metrics = train_step(state, batch)       # state is donated: don't reuse the old one
    val_loss = evaluate(language_model_loss(model), state.params, val_batches)

Truncated backpropagation through time (stateful training over a long
stream, :class:`rnnjax.data.TokenStream`) threads the model's carry from
one window to the next::

    train_step = make_train_step(language_model_loss(model, carry=True), optimizer, carry=True)
    carry = model.initial_carry(state.params, (batch_size,))
    for batch in stream:                               # {"x", "y", "resets"}
        state, carry, metrics = train_step(state, batch, carry)

A loss function has the signature ``loss_fn(params, batch, key) -> loss``
(a scalar), or with ``carry=True`` ``loss_fn(params, batch, key, carry) ->
(loss, carry)``; ``key`` is a fresh PRNG key per step for dropout, and
``None`` in evaluation.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rnnjax._checks import is_int, is_number, require_choice, require_int
from rnnjax.types import Array, PRNGKey

LossFn = Callable[..., Any]


class TrainState(NamedTuple):
    step: Array  # int32 scalar: train steps taken (skipped ones included): the data position
    params: Any
    opt_state: Any
    key: PRNGKey  # base key; step t uses jax.random.fold_in(key, t)


def init_train_state(params, optimizer: optax.GradientTransformation, key: PRNGKey) -> TrainState:
    # The optimiser state gets buffers of its own: inject_hyperparams puts the very arrays it was built
    # with into every state it initialises, and a donating train step would delete them for all.
    opt_state = jax.tree_util.tree_map(jnp.copy, optimizer.init(params))
    return TrainState(jnp.zeros((), jnp.int32), params, opt_state, key)


# ----------------------------------------------------------------------------
# The optimiser


def default_warmup(total_steps: int) -> int:
    """Warmup steps used by :func:`default_optimizer`: 100, or a tenth of a shorter run."""
    return max(1, min(100, total_steps // 10))


def warmup_cosine(count, peak: float, warmup_steps, total_steps, end_fraction: float = 0.1):
    """Learning rate at optimiser step ``count``: linear from 0 to ``peak`` over
    ``warmup_steps``, then a cosine to ``end_fraction * peak`` at ``total_steps``
    (and constant after). Works on traced values, so the horizon can live in
    the optimiser state and change without recompiling."""
    count = jnp.asarray(count, jnp.float32)
    warmup = jnp.maximum(jnp.asarray(warmup_steps, jnp.float32), 1.0)
    total = jnp.maximum(jnp.asarray(total_steps, jnp.float32), warmup + 1.0)
    frac = jnp.clip((count - warmup) / (total - warmup), 0.0, 1.0)
    end = peak * end_fraction
    cosine = end + (peak - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
    return jnp.where(count < warmup, peak * count / warmup, cosine)


def _matrices(params):
    return jax.tree_util.tree_map(lambda p: jnp.ndim(p) >= 2, params)


def _chain(learning_rate, warmup_steps, total_steps, end_fraction, weight_decay, clip_norm, b1, b2, eps):
    schedule = partial(warmup_cosine, peak=learning_rate, warmup_steps=warmup_steps, total_steps=total_steps,
                       end_fraction=end_fraction)
    return optax.chain(
        optax.clip_by_global_norm(clip_norm),
        optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=_matrices),
    )


def default_optimizer(learning_rate: float = 2e-3, *, total_steps: int, warmup_steps: int | None = None,
                      end_fraction: float = 0.1, weight_decay: float = 0.01, clip_norm: float = 1.0,
                      b1: float = 0.9, b2: float = 0.99, eps: float = 1e-8) -> optax.GradientTransformation:
    """``optax.chain(clip_by_global_norm(clip_norm), adamw(warmup-cosine schedule))``.

    The learning rate rises from 0 to ``learning_rate`` over ``warmup_steps``
    (default :func:`default_warmup`), then decays along a cosine to
    ``end_fraction * learning_rate`` at ``total_steps``
    (:func:`warmup_cosine`). Weight decay applies to matrices only
    (``ndim >= 2``), not to biases or layer-norm gains.

    Every number is a hyperparameter stored in the optimiser state
    (``optax.inject_hyperparams``), so it is saved in checkpoints and can be
    changed between steps without recompiling: :func:`set_hyperparams`
    (e.g. the time-budgeted CLI re-fits ``total_steps`` as it measures its
    speed). Any other ``optax.GradientTransformation`` works with
    :func:`make_train_step` too.
    """
    fn = "rnnjax.train.default_optimizer"
    require_int(fn, "total_steps", total_steps, fix="pass the number of optimiser steps the run will take.")
    warmup = default_warmup(total_steps) if warmup_steps is None else warmup_steps
    require_int(fn, "warmup_steps", warmup, fix="pass e.g. warmup_steps=100, or None for the default.")
    for name, value in (("learning_rate", learning_rate), ("clip_norm", clip_norm)):
        if not is_number(value) or not value > 0 or not math.isfinite(value):
            raise ValueError(f"{fn}: {name} must be a positive number, got {value!r}. Fix: pass a finite "
                             f"number > 0, e.g. {name}=1e-3.")
    f32, i32 = partial(jnp.asarray, dtype=jnp.float32), partial(jnp.asarray, dtype=jnp.int32)
    # Strongly typed arrays, so set_hyperparams's replacements have the very same types.
    return optax.inject_hyperparams(_chain)(
        learning_rate=f32(learning_rate), warmup_steps=i32(warmup), total_steps=i32(total_steps),
        end_fraction=f32(end_fraction), weight_decay=f32(weight_decay), clip_norm=f32(clip_norm),
        b1=f32(b1), b2=f32(b2), eps=f32(eps))


def set_hyperparams(opt_state, **values):
    """``opt_state`` of :func:`default_optimizer` (or any ``optax.inject_hyperparams``
    optimiser) with some hyperparameters replaced, e.g. ``total_steps=5000``.
    Same structure, dtypes and shapes: a jitted train step does not recompile."""
    hp = getattr(opt_state, "hyperparams", None)
    if not isinstance(hp, dict) or not set(values) <= set(hp):
        have = sorted(hp) if isinstance(hp, dict) else "none"
        raise ValueError(f"rnnjax.train.set_hyperparams: the optimiser state has no hyperparameter(s) "
                         f"{sorted(set(values) - set(hp or {}))} (it has {have}). Fix: build the optimiser with "
                         "rnnjax.train.default_optimizer or optax.inject_hyperparams.")
    new = dict(hp)
    for k, v in values.items():
        old = jnp.asarray(hp[k])
        # A population's state (stack_states) holds one value per member: a scalar goes to every member,
        # an array of the member count sets each its own.
        new[k] = jnp.broadcast_to(jnp.asarray(v, dtype=old.dtype), old.shape)
    return opt_state._replace(hyperparams=new)


def current_learning_rate(opt_state) -> float | list[float] | None:
    """The learning rate :func:`default_optimizer` will use at its next update (None for other optimisers;
    a list, one per member, for a population's state)."""
    hp = getattr(opt_state, "hyperparams", None)
    if not isinstance(hp, dict) or "total_steps" not in hp:
        return None
    lr = np.asarray(_scheduled_lr(opt_state.count, hp["learning_rate"], hp["warmup_steps"], hp["total_steps"],
                                  hp["end_fraction"]))
    return float(lr) if lr.ndim == 0 else [float(v) for v in lr]


@jax.jit
def _scheduled_lr(count, peak, warmup_steps, total_steps, end_fraction):
    return warmup_cosine(count, peak, warmup_steps, total_steps, end_fraction)


# ----------------------------------------------------------------------------
# The train step


def _select(pred, new, old):
    return jax.tree_util.tree_map(lambda n, o: jnp.where(pred, n, o), new, old)


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, *, carry: bool = False,
                    accumulate: int = 1, donate: bool = True):
    """A jitted train step.

    Without ``carry``: ``train_step(state, batch) -> (state, metrics)`` with
    ``loss_fn(params, batch, key) -> loss``. With ``carry=True`` (truncated
    BPTT): ``train_step(state, batch, carry) -> (state, carry, metrics)``
    with ``loss_fn(params, batch, key, carry) -> (loss, carry)``; the carry
    that comes out is passed through ``stop_gradient`` (gradients stop at
    the window's start) and is the input of the next step.

    - The state (and the carry) are donated: their buffers are reused.
    - Step ``t`` passes ``jax.random.fold_in(state.key, t)`` to ``loss_fn``:
      fresh dropout masks every step, reproducible from the key.
    - ``accumulate=k`` splits the batch (every array's first axis, and the
      carry's) into ``k`` micro-batches, runs them one after the other and
      applies the mean of their gradients once: the update of a ``k`` times
      larger batch in the memory of one micro-batch.
    - A step whose loss or gradients are not all finite (or whose gradients'
      global norm overflows float32) is *skipped*: params and optimiser
      state stay as they were (bit for bit) and ``metrics["skipped"]`` is 1.
      ``state.step`` still advances (it counts batches read), and so does
      the carry.

    ``metrics``: ``loss`` (before the update), ``grad_norm`` (before
    clipping) and ``skipped`` (0 or 1).
    """
    fn = "rnnjax.train.make_train_step"
    require_int(fn, "accumulate", accumulate, fix="pass the number of micro-batches per update, e.g. accumulate=2.")

    def grads_of(params, batch, key, c):
        if carry:
            (loss, c), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, key, c)
            return loss, grads, jax.lax.stop_gradient(c)
        loss, grads = jax.value_and_grad(loss_fn)(params, batch, key)
        return loss, grads, None

    def accumulated(params, batch, key, c):
        if accumulate == 1:
            return grads_of(params, batch, key, c)

        def split(x):
            if x.shape[0] % accumulate:
                raise ValueError(f"{fn}: accumulate={accumulate} must divide the batch size, got a leading axis "
                                 f"of {x.shape[0]}. Fix: use a batch size that is a multiple of accumulate.")
            return x.reshape(accumulate, x.shape[0] // accumulate, *x.shape[1:])

        micro = jax.tree_util.tree_map(split, (batch, c))
        zeros = jax.tree_util.tree_map(jnp.zeros_like, params)

        def body(acc, inp):
            i, (b, c_i) = inp
            loss, grads, c_i = grads_of(params, b, jax.random.fold_in(key, i), c_i)
            return jax.tree_util.tree_map(jnp.add, acc, (loss, grads)), c_i

        (loss, grads), cs = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros),
                                         (jnp.arange(accumulate), micro))
        loss, grads = jax.tree_util.tree_map(lambda g: g / accumulate, (loss, grads))
        c = jax.tree_util.tree_map(lambda x: x.reshape(-1, *x.shape[2:]), cs)
        return loss, grads, c

    def step(state: TrainState, batch, c=None):
        key = jax.random.fold_in(state.key, state.step)
        loss, grads, c = accumulated(state.params, batch, key, c)
        # A NaN or an infinity in any gradient makes their global norm NaN or infinite too: one reduction (which
        # clipping needs as well), not an isfinite pass over every gradient (0.5 ms of a 17 ms step of `rnnjax
        # train charlm`).
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        params = _select(finite, params, state.params)
        opt_state = _select(finite, opt_state, state.opt_state)
        metrics = {"loss": loss, "grad_norm": grad_norm, "skipped": (~finite).astype(jnp.int32)}
        return TrainState(state.step + 1, params, opt_state, state.key), c, metrics

    if carry:
        def train_step(state, batch, c):
            return step(state, batch, c)

        return jax.jit(train_step, donate_argnums=(0, 2) if donate else ())

    def train_step(state, batch):
        state, _, metrics = step(state, batch)
        return state, metrics

    return jax.jit(train_step, donate_argnums=0 if donate else ())


# ----------------------------------------------------------------------------
# Populations: N models trained at once by one compiled step


def stack_states(states) -> TrainState:
    """One population state from a sequence of train states of the same structure (or of any pytrees:
    the members' TBPTT carries): every leaf gets a leading member axis. Members may differ in initial
    parameters, keys and the optimiser's injected hyperparameters (:func:`set_hyperparams`: learning
    rate, weight decay, ...)."""
    fn = "rnnjax.train.stack_states"
    states = list(states)
    if not states:
        raise ValueError(f"{fn}: got no states. Fix: pass one TrainState per population member.")
    first = jax.tree_util.tree_structure(states[0])
    for i, s in enumerate(states[1:], 1):
        if jax.tree_util.tree_structure(s) != first:
            raise ValueError(f"{fn}: member {i}'s state has a different structure from member 0's. Fix: build "
                             "every member with the same model and optimiser (hyperparameters may differ).")
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *states)


def population_size(states: TrainState) -> int:
    return int(states.step.shape[0])


def step_of(state: TrainState) -> int:
    """The step of a train state, or of a population's (its members step together)."""
    return int(np.asarray(state.step).reshape(-1)[0])


def member(states: TrainState, i: int) -> TrainState:
    """Member ``i`` of a population state, as an ordinary train state (or of any stacked pytree: a
    population's parameters or carries)."""
    return jax.tree_util.tree_map(lambda x: x[i], states)


def make_population_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, *, carry: bool = False,
                         accumulate: int = 1, shared_batch: bool = True,
                         summarise: Callable[[dict], dict] | None = None, strategy: str = "auto"):
    """The step of :func:`make_train_step` over a population (:func:`stack_states`): one compiled step.

    ``population_step(states, batch[, carries]) -> (states, [carries,] metrics)``,
    every metric with a leading member axis. ``shared_batch=True``: every
    member reads the same batch (a sweep over seeds and hyperparameters on
    the same data); ``False``: the batch has a leading member axis too. One
    compile serves the whole population, and each member's numbers equal
    its individually trained twin's. ``summarise`` maps the per-member
    metrics to the ones returned, inside the compiled step (e.g.
    :func:`population_summary`).

    ``strategy``: ``"vmap"`` batches the members' computations (their
    matmuls become batched matmuls: what pays on GPUs and TPUs);
    ``"map"`` runs the members one after another inside the one compiled
    step (``lax.map``); ``"auto"``: ``"map"`` on CPU, where XLA's batched
    matmuls run slower than the members' own (docs/performance.md,
    "Populations"), else ``"vmap"``.
    """
    fn = "rnnjax.train.make_population_step"
    require_choice(fn, "strategy", strategy, ("auto", "vmap", "map"),
                   fix="pass one of those ('auto' picks 'map' on CPU and 'vmap' elsewhere).")
    if strategy == "auto":
        strategy = "map" if jax.default_backend() == "cpu" else "vmap"
    single = make_train_step(loss_fn, optimizer, carry=carry, accumulate=accumulate, donate=False)
    if strategy == "vmap":
        step = jax.vmap(single, in_axes=(0, None if shared_batch else 0) + ((0,) if carry else ()))
    elif shared_batch:
        def step(states, batch, *c):
            return jax.lax.map(lambda member: single(member[0], batch, *member[1:]), (states, *c))
    else:
        def step(states, batch, *c):
            return jax.lax.map(lambda member: single(*member), (states, batch, *c))
    summarise = summarise or (lambda metrics: metrics)

    def population_step(states, batch, *c):
        *out, metrics = step(states, batch, *c)
        return (*out, summarise(metrics))

    return jax.jit(population_step, donate_argnums=(0, 2) if carry else 0)


def population_summary(metrics: dict) -> dict:
    """A population step's metrics as one run's: ``loss`` is the mean over the members whose step was
    not skipped, ``skipped`` is 1 only when every member's was; ``member_loss`` and ``member_skipped``
    keep each member's."""
    ok = metrics["skipped"] == 0
    n_ok = jnp.sum(ok)
    loss = jnp.sum(jnp.where(ok, metrics["loss"], 0.0)) / jnp.maximum(n_ok, 1)
    return {"loss": jnp.where(n_ok > 0, loss, jnp.nan), "grad_norm": jnp.max(metrics["grad_norm"]),
            "skipped": (n_ok == 0).astype(jnp.int32), "member_loss": metrics["loss"],
            "member_skipped": metrics["skipped"]}


# ----------------------------------------------------------------------------
# Losses and evaluation


@jax.jit
def cross_entropy(logits: Array, labels: Array) -> Array:
    """Mean cross-entropy in nats per token of ``logits [..., V]`` against integer ``labels [...]``."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    return losses.mean()


def language_model_loss(model, *, carry: bool = False) -> LossFn:
    """Next-token cross-entropy (nats/token) of a :class:`rnnjax.models.LanguageModel`.

    ``carry=False``: ``loss_fn(params, batch, key)`` on ``{"x": [B, T], "y":
    [B, T]}``, each window read from a zero carry. ``carry=True`` (truncated
    BPTT): ``loss_fn(params, batch, key, carry) -> (loss, carry)`` reads the
    window from ``carry``, starting afresh where ``batch["resets"]`` (if
    present) is True.
    """

    if carry:
        def loss_fn(params, batch, key, c):
            c, logits = model.apply(params, batch["x"], carry=c, resets=batch.get("resets"), key=key)
            return cross_entropy(logits, batch["y"]), c
    else:
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


def stream_evaluator(model, lanes: dict, *, chunk: int = 256) -> Callable[[Any], float]:
    """``evaluate(params) -> float``: the mean next-token loss (nats/token) of
    ``model`` over *every* target of ``lanes`` (:func:`rnnjax.data.lanes`),
    each lane read from start to end with the state carried across chunks of
    ``chunk`` steps (reset where ``lanes["resets"]`` is True).

    Each token is predicted from all the text before it in its lane, as the
    model would read a long text. Compiled once (one chunk shape).
    """
    x, y, mask, resets = (np.asarray(lanes[k]) for k in ("x", "y", "mask", "resets"))
    L, N = x.shape
    chunk = max(1, min(int(chunk), N))
    pad = -N % chunk
    if pad:
        x, y, resets = (np.pad(a, ((0, 0), (0, pad))) for a in (x, y, resets))
        mask = np.pad(mask, ((0, 0), (0, pad)))
    count = float(mask.sum())
    chunks = [tuple(jnp.asarray(a[:, i:i + chunk]) for a in (x, y, mask, resets))
              for i in range(0, N + pad, chunk)]

    @jax.jit
    def run(params, c, xc, yc, mc, rc):
        c, logits = model.apply(params, xc, carry=c, resets=rc)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), yc)
        return c, jnp.sum(jnp.where(mc, nll, 0.0))

    def evaluate_params(params) -> float:
        c = model.initial_carry(params, (L,))
        total = jnp.zeros((), jnp.float32)
        for xc, yc, mc, rc in chunks:
            c, s = run(params, c, xc, yc, mc, rc)
            total = total + s
        return float(total) / count

    return evaluate_params


# ----------------------------------------------------------------------------
# Early stopping


@dataclass
class EarlyStopping:
    """Stops when a metric to minimise has not improved by more than
    ``min_delta`` for ``patience`` evaluations in a row.

    ``update(value, step) -> bool`` (True: stop now). ``best``/``best_step``
    hold the best value seen. ``to_dict``/``from_dict`` carry the state
    through a checkpoint, so a resumed run stops where an uninterrupted one would.
    """

    patience: int
    min_delta: float = 0.0
    best: float = math.inf
    best_step: int | None = None
    bad_evals: int = 0

    def __post_init__(self):
        require_int("rnnjax.train.EarlyStopping", "patience", self.patience,
                    why="evaluations without improvement before stopping")
        if not self.min_delta >= 0:
            raise ValueError(f"rnnjax.train.EarlyStopping: min_delta must be >= 0, got {self.min_delta!r}.")

    def update(self, value: float, step: int) -> bool:
        if value < self.best - self.min_delta:
            self.best, self.best_step, self.bad_evals = float(value), int(step), 0
        else:
            self.bad_evals += 1
        return self.bad_evals >= self.patience

    @property
    def should_stop(self) -> bool:
        return self.bad_evals >= self.patience

    def to_dict(self) -> dict:
        return {"patience": self.patience, "min_delta": self.min_delta,
                "best": None if math.isinf(self.best) else self.best, "best_step": self.best_step,
                "bad_evals": self.bad_evals}

    @classmethod
    def from_dict(cls, d: dict) -> EarlyStopping:
        return cls(d["patience"], d["min_delta"], math.inf if d["best"] is None else d["best"], d["best_step"],
                   d["bad_evals"])


# ----------------------------------------------------------------------------
# The training loop


def _spread(start: int, stop: int, count: int) -> list[int]:
    """``count`` steps evenly spaced in ``(start, stop]``, ``stop`` included."""
    return sorted({start + round(k * (stop - start) / count) for k in range(1, count + 1)} - {start})


def _rounded(value):
    """A validation metric for the JSON record: floats to 5 decimals, integers (a member's index) as
    they are, lists (one value per population member) element by element."""
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    if is_int(value):
        return int(value)
    return round(float(value), 5)


@dataclass
class FitResult:
    """What :func:`fit` ends with."""

    state: TrainState
    carry: Any
    stop_reason: str  # "steps", "time", "early_stopping", "interrupted" or "not_finite"
    history: list = field(default_factory=list)  # one record per evaluation
    skipped_steps: int = 0
    elapsed_s: float = 0.0  # wall-clock seconds of the run (all sessions of a resumed run)
    tokens_per_s: float = float("nan")  # training throughput after compilation, this session


CALIBRATION_STEPS = 20  # steps timed (after the compiling one) before a time budget fixes the schedule


class _Clock:
    """The time budget of :func:`fit`: a deadline ``seconds`` after ``start_time`` (covering training,
    evaluations and the final save), the measured time per step, and, for a timed run without
    ``total_steps``, the schedule's horizon fitted to the time left."""

    def __init__(self, seconds: float | None, start_time: float | None, total_steps: int | None, progress: dict):
        self.seconds = seconds
        self.start = time.perf_counter() if start_time is None else start_time
        self.prior_elapsed = float(progress.get("elapsed_s", 0.0))
        self.deadline = self.start + seconds if seconds is not None else math.inf
        self.fit_horizon = seconds is not None and total_steps is None
        self.horizon = total_steps if total_steps is not None else int(progress.get("total_steps", 10 ** 9))
        self.calibrated = not self.fit_horizon
        self.next_refit = None
        self.iter_times: list[float] = []  # wall seconds per loop iteration, evaluations and saves excluded
        self.eval_cost, self.save_cost = 0.0, 0.0

    @staticmethod
    def now() -> float:
        return time.perf_counter()

    def elapsed(self) -> float:
        """Seconds of the whole run (all sessions of a resumed one)."""
        return self.prior_elapsed + self.now() - self.start

    def rate(self) -> float:
        # The mean, not the median: with batches of several shapes (length buckets) the step times
        # are skewed, and the median (the common small shape) underestimates the time per step.
        recent = self.iter_times[-200:]
        return float(np.mean(recent)) if recent else math.inf

    def throughput(self, tokens_per_step: int, last: int) -> float | None:
        recent = self.iter_times[-last:]
        return tokens_per_step * len(recent) / sum(recent) if recent else None

    def time_is_up(self) -> bool:
        """Whether one more step, an evaluation and a save would run past the deadline."""
        return self.seconds is not None and self.calibrated and (
            self.now() + self.rate() + self.eval_cost + self.save_cost + 0.5 > self.deadline)

    def refit(self, step: int, evals_left: int) -> int:
        """The horizon at which the time runs out, at the measured speed (evaluations and saves reserved)."""
        reserve = self.eval_cost + self.save_cost + 1.0 + 0.01 * self.seconds
        left = self.deadline - self.now() - evals_left * (self.eval_cost + self.save_cost) - reserve
        self.horizon = step + max(1, int(left / self.rate()))
        self.next_refit = step + max(10, (self.horizon - step) // 25)
        return self.horizon


class _EvalPlan:
    """When :func:`fit` evaluates: ``evals`` times, evenly spaced over a step budget (over the whole run,
    so a resumed run evaluates where it would have), or at fractions of a timed run's fitted horizon,
    spread over what is left of it from the step it started at."""

    def __init__(self, evaluate, evals: int, total_steps: int | None, step: int):
        self.evals, self.total_steps, self.base = evals, total_steps, step
        self.steps = None  # fractions of the fitted horizon: decided as it goes
        if total_steps is not None:
            self.steps = [t for t in _spread(0, total_steps, evals) if t > step] if evaluate and evals > 0 else []
        self.fractions_left = list(range(1, evals + 1)) if evaluate else []

    def left(self) -> int:
        """Evaluations still to come before the final one."""
        return max(len(self.fractions_left) - 1, 0)

    def due(self, step: int, horizon: int, calibrated: bool) -> bool:
        if self.steps is not None:
            return step in self.steps and step != self.total_steps
        due = (calibrated and len(self.fractions_left) > 1
               and step >= self.base + self.fractions_left[0] / self.evals * (horizon - self.base))
        if due:
            self.fractions_left.pop(0)
        return due


class _Loop:
    """The state of one :func:`fit` call: the train state, the records, and the pieces of the loop."""

    def __init__(self, train_step, state, carry, clock: _Clock, progress: dict, *, total_steps, evaluate, evals,
                 early_stopping, save, tokens_per_step, on_step, on_eval):
        self.train_step, self.state, self.carry, self.clock = train_step, state, carry, clock
        self.total_steps, self.evaluate_fn, self.early_stopping = total_steps, evaluate, early_stopping
        self.save_fn, self.tokens_per_step, self.on_step, self.on_eval = save, tokens_per_step, on_step, on_eval
        self.history = list(progress.get("history", []))
        self.skipped = int(progress.get("skipped_steps", 0))
        self.step = self.first_step = step_of(state)
        if clock.fit_horizon:
            try:
                self.state = state._replace(opt_state=set_hyperparams(state.opt_state, total_steps=clock.horizon))
            except ValueError:
                clock.fit_horizon, clock.calibrated = False, True  # another optimiser: time only stops the run
        self.plan = _EvalPlan(evaluate, evals, total_steps, self.step)
        self.losses: list[float] = []
        self.consecutive_skipped = 0
        self.last_save_time, self.last_save_step = clock.now(), self.step
        self.evaluated_at = self.history[-1]["step"] if self.history else None
        self.pending = None  # a step's metrics, read after the next step is queued (the device never waits)

    def progress(self) -> dict:
        es = self.early_stopping.to_dict() if self.early_stopping is not None else None
        return {"history": self.history, "skipped_steps": self.skipped, "elapsed_s": round(self.clock.elapsed(), 3),
                "total_steps": self.clock.horizon, "early_stopping": es}

    def save(self, metrics=None) -> None:
        if self.save_fn is None or (self.last_save_step == self.step and metrics is None
                                    and self.step != self.first_step):
            return
        t0 = self.clock.now()
        self.save_fn(self.state, self.carry, metrics, self.progress())
        self.clock.save_cost = max(self.clock.save_cost * 0.5, self.clock.now() - t0)
        self.last_save_time, self.last_save_step = self.clock.now(), self.step

    def evaluate(self) -> bool:
        """Evaluates, records, reports and saves; True when early stopping says stop."""
        t0 = self.clock.now()
        evaluated = self.evaluate_fn(self.state.params)
        extra = {}
        if isinstance(evaluated, dict):  # more validation metrics than the loss
            extra = {k: _rounded(v) for k, v in evaluated.items() if k != "val_loss"}
            evaluated = evaluated["val_loss"]
        val = float(evaluated)
        train_loss = float(np.mean(self.losses)) if self.losses else None
        tps = self.clock.throughput(self.tokens_per_step, 100)
        record = {"step": self.step, "elapsed_s": round(self.clock.elapsed(), 3),
                  "train_loss": None if train_loss is None else round(train_loss, 5), "val_loss": round(val, 5),
                  **extra, "lr": current_learning_rate(self.state.opt_state),
                  "tokens_per_s": None if tps is None else round(tps)}
        self.history.append(record)
        self.losses, self.evaluated_at = [], self.step
        if self.on_eval is not None:
            self.on_eval(record, self.state)
        stop = self.early_stopping is not None and self.early_stopping.update(val, self.step)
        self.clock.eval_cost = self.clock.now() - t0
        self.save({"val_loss": val})
        return stop

    def refit(self) -> None:
        horizon = self.clock.refit(self.step, self.plan.left())
        self.state = self.state._replace(opt_state=set_hyperparams(self.state.opt_state, total_steps=horizon))

    def settle(self) -> None:
        """Reads the pending step's metrics: counts skipped steps, keeps the loss, calls ``on_step``."""
        if self.pending is None:
            return
        at, m = self.pending
        self.pending = None
        m = jax.device_get(m)
        loss, was_skipped = float(m["loss"]), int(m["skipped"])
        if was_skipped:
            self.skipped += 1
            self.consecutive_skipped += 1
        else:
            self.consecutive_skipped = 0
            self.losses.append(loss)
        if self.on_step is not None:
            self.on_step(at, {"loss": loss, "skipped": was_skipped}, self.clock.throughput(self.tokens_per_step, 20),
                         self.clock.horizon)

    def budget_spent(self) -> str | None:
        if self.total_steps is not None and self.step >= self.total_steps:
            return "steps"
        if self.clock.fit_horizon and self.clock.calibrated and self.step >= self.clock.horizon:
            return "time"
        return "time" if self.clock.time_is_up() else None

    def train_one(self, batch, timed: bool) -> None:
        t0 = self.clock.now()
        if self.carry is None:
            self.state, metrics = self.train_step(self.state, batch)
        else:
            self.state, self.carry, metrics = self.train_step(self.state, batch, self.carry)
        self.step += 1
        self.settle()  # the previous step's
        self.pending = (self.step, metrics)
        if self.consecutive_skipped:
            self.settle()  # after a skipped step, read each step's at once: stop exactly at the limit
        if timed:  # the first step compiled: no measure of speed
            self.clock.iter_times.append(self.clock.now() - t0)

    def evaluations(self) -> bool:
        """Calibration of a timed run (with its first evaluation), refits of the horizon and the planned
        evaluations; True when early stopping says stop."""
        clock, stop = self.clock, False
        if not clock.calibrated and len(clock.iter_times) >= CALIBRATION_STEPS:
            if self.evaluate_fn is not None:
                self.settle()
                stop = self.evaluate()
            self.refit()
            clock.calibrated = True
        elif clock.fit_horizon and clock.calibrated and self.step >= clock.next_refit:
            self.refit()
        if self.evaluate_fn is not None and self.evaluated_at != self.step and self.plan.due(
                self.step, clock.horizon, clock.calibrated):
            self.settle()
            stop = self.evaluate() or stop
        return stop

    def run(self, batches, *, save_every_steps, save_every_seconds, should_stop,
            max_consecutive_skipped) -> FitResult:
        stop_reason = "time" if self.clock.seconds is not None and self.clock.now() >= self.clock.deadline else None
        first = True
        while stop_reason is None:
            stop_reason = self.budget_spent()
            if stop_reason:
                break
            self.train_one(next(batches), timed=not first)
            first = False
            if self.consecutive_skipped >= max_consecutive_skipped:
                stop_reason = "not_finite"
                break
            if self.evaluations():
                stop_reason = "early_stopping"
                break
            if self.save_fn is not None and (
                    (save_every_steps and self.step - self.last_save_step >= save_every_steps)
                    or (save_every_seconds and self.clock.now() - self.last_save_time >= save_every_seconds)):
                stop_reason = self.budget_spent()  # at the end, the final save (with its evaluation) comes instead
                if stop_reason:
                    break
                self.settle()
                self.save()
            if should_stop is not None and should_stop():
                stop_reason = "interrupted"
        return self.finish(stop_reason, max_consecutive_skipped)

    def finish(self, stop_reason: str, max_consecutive_skipped: int) -> FitResult:
        """The last step's metrics, the final evaluation (or save), and the result."""
        self.settle()
        if self.consecutive_skipped >= max_consecutive_skipped:
            stop_reason = "not_finite"
        if stop_reason in ("steps", "time") and self.evaluate_fn is not None and self.evaluated_at != self.step:
            self.evaluate()
        elif stop_reason != "early_stopping" or self.evaluated_at != self.step:
            self.save()
        tps = self.clock.throughput(self.tokens_per_step, len(self.clock.iter_times))
        return FitResult(self.state, self.carry, stop_reason, self.history, self.skipped, self.clock.elapsed(),
                         float("nan") if tps is None else tps)


def fit(train_step, state: TrainState, batches: Iterator, *, carry=None, total_steps: int | None = None,
        seconds: float | None = None, start_time: float | None = None,
        evaluate: Callable[[Any], float] | None = None, evals: int = 5,
        early_stopping: EarlyStopping | None = None,
        save: Callable[..., None] | None = None, save_every_steps: int | None = None,
        save_every_seconds: float | None = None, tokens_per_step: int = 1,
        on_step: Callable[..., None] | None = None, on_eval: Callable[..., None] | None = None,
        should_stop: Callable[[], bool] | None = None, max_consecutive_skipped: int = 25,
        progress: dict | None = None) -> FitResult:
    """Runs ``train_step`` (from :func:`make_train_step`) until a step or time budget is spent.

    Args:
      train_step, state, carry: the step, its state, and (for TBPTT, when
        ``carry`` is not None) the carry threaded through it.
      batches: an iterator of batches (positioned at ``state.step``).
      total_steps: stop when ``state.step`` reaches this.
      seconds: a wall-clock budget from ``start_time`` (default: now) that
        covers training, the evaluations and the final save. With
        :func:`default_optimizer` and no ``total_steps``, the schedule's
        horizon is fitted to it: after :data:`CALIBRATION_STEPS` timed steps
        and one evaluation, and again every few percent of the run, the
        measured speed sets ``total_steps`` so the cosine ends as time runs out.
      evaluate: ``params -> validation loss``, or a dict with ``val_loss`` and
        other validation metrics (added to the record, e.g. ``val_accuracy``);
        run ``evals`` times, evenly spaced, the last at the end (plus once
        after calibration in a timed run). Early stopping watches ``val_loss``.
      early_stopping: stop when it says so after an evaluation.
      save: ``save(state, carry, metrics, progress)``: called after each
        evaluation (``metrics={"val_loss": ...}``), every ``save_every_steps``
        steps or ``save_every_seconds`` seconds, and at the end (also after
        an interruption or a non-finite stop). ``progress`` is a JSON-able
        dict to pass back as ``progress=`` when resuming.
      on_step: ``on_step(step, metrics, tokens_per_s, total_steps)`` after every step.
      on_eval: ``on_eval(record, state)`` after every evaluation (records have
        ``step``, ``elapsed_s``, ``train_loss``, ``val_loss``, ``lr``, ``tokens_per_s``).
      should_stop: polled after every step (e.g. a Ctrl-C flag): stop and save.
      max_consecutive_skipped: stop ("not_finite") after this many skipped
        steps in a row (the learning rate is probably too high).
      progress: what ``save`` got last time, to resume a run.
    """
    fn = "rnnjax.train.fit"
    if total_steps is None and seconds is None:
        raise ValueError(f"{fn}: expected a budget: total_steps, seconds or both, got neither. "
                         "Fix: pass e.g. total_steps=1000 or seconds=300.")
    clock = _Clock(seconds, start_time, total_steps, dict(progress or {}))
    loop = _Loop(train_step, state, carry, clock, dict(progress or {}), total_steps=total_steps, evaluate=evaluate,
                 evals=evals, early_stopping=early_stopping, save=save, tokens_per_step=tokens_per_step,
                 on_step=on_step, on_eval=on_eval)
    return loop.run(batches, save_every_steps=save_every_steps, save_every_seconds=save_every_seconds,
                    should_stop=should_stop, max_consecutive_skipped=max_consecutive_skipped)
