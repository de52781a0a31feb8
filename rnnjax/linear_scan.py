"""Linear recurrences ``h_t = a_t * h_{t-1} + b_t``: the parallel forms of cells with a
:class:`~rnnjax.cells.base.Linear` form (LRU, minGRU, minLSTM, RG-LRU).

Two methods run the same recurrence: ``"associative"`` (``jax.lax.associative_scan``, depth
``O(log T)``, the choice on accelerators) and ``"loop"`` (a loop of the multiply-add alone, in
cache-sized chunks, the choice on CPU). Both share one custom VJP (:func:`linear_scan`), and both
express the driver's masking as coefficients (a held step is ``(a, b) = (1, 0)``, a reset
``(0, a * h_init + b)``), so they give the numbers of the sequential scan.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name, checkpoint_policies

from rnnjax.cells.base import Cell
from rnnjax.types import Array

# From this many steps on, the loop form beats the sequential scan on CPU (docs/performance.md, "Linear cells").
CPU_PARALLEL_MIN_T = 32


def auto_parallel(cell: Cell, batch_size: int, time_steps: int) -> str | None:
    """How ``parallel="auto"`` runs a linear cell: ``"chunkwise"`` for a
    cell that has that form (the mLSTM: on CPU, width 512 in 4 heads,
    forward and backward, 18 ms against 504 ms sequential for B64 T8, and
    0.48 s against 6.9 s with ``"loop"`` for B8 T1024); otherwise
    ``"associative"`` on accelerators, and on CPU ``"loop"`` from
    ``CPU_PARALLEL_MIN_T`` steps on (``jax.lax.associative_scan`` does ~2x
    the work of a loop, which two cores cannot hide), else None (the cell's
    step in the sequential scan).
    """
    del batch_size
    if cell.linear is not None and cell.linear.chunkwise is not None:
        return "chunkwise"
    if jax.default_backend() != "cpu":
        return "associative"
    return "loop" if time_steps >= CPU_PARALLEL_MIN_T else None



def _combine(earlier, later):
    """Two steps of ``h = a * h + b`` as one: ``h = a2 (a1 h + b1) + b2``."""
    a1, b1 = earlier
    a2, b2 = later
    return a2 * a1, a2 * b1 + b2


def _at(a, t, ndim: int):
    """Step ``t`` of the coefficients ``a``: ``a`` itself where it has no time axis (fewer dims than ``ndim``)."""
    return a if a.ndim < ndim else jax.lax.dynamic_index_in_dim(a, t, keepdims=False)


def _sum_to(x, shape):
    """``x`` summed over the axes that broadcasting ``shape`` to ``x.shape`` added or stretched."""
    lead = x.ndim - len(shape)
    x = jnp.sum(x, axis=tuple(range(lead)))
    return jnp.sum(x, axis=tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1), keepdims=True)


def _loop_states(a, b, reverse: bool):
    """``h_t = a_t * h_{t-1} + b_t`` step by step, each state written over ``b_t``.

    A ``lax.fori_loop`` that updates ``b`` in place: a ``lax.scan`` would first fill a zeroed
    ``[T, ...]`` output buffer, a whole-array pass that costs as much as the loop itself on a CPU.
    """
    T = b.shape[0]

    def body(i, carry):
        h, out = carry
        t = T - 1 - i if reverse else i
        h = _at(a, t, b.ndim) * h + jax.lax.dynamic_index_in_dim(out, t, keepdims=False)
        return h, jax.lax.dynamic_update_index_in_dim(out, h, t, 0)

    return jax.lax.fori_loop(0, T, body, (jnp.zeros_like(b[0]), b))[1]


def _scan_states(a, b, reverse: bool, method: str):
    if method == "associative":
        return jax.lax.associative_scan(_combine, (jnp.broadcast_to(a, b.shape), b), reverse=reverse, axis=0)[1]
    return _loop_states(a, b, reverse)


def _adjoint_loop(a, g, reverse: bool):
    """The adjoints ``l_t = g_t + a_{t+1} l_{t+1}`` of a forward loop (``reverse`` as the forward loop; ``t + 1``
    is the step after ``t`` in its order), written over ``g`` in place as :func:`_loop_states` does."""
    T = g.shape[0]

    def body(i, carry):
        lam, out = carry
        t = i if reverse else T - 1 - i
        after = jnp.maximum(t - 1, 0) if reverse else jnp.minimum(t + 1, T - 1)  # any step when lam is still 0
        lam = _at(a, after, g.ndim) * lam + jax.lax.dynamic_index_in_dim(out, t, keepdims=False)
        return lam, jax.lax.dynamic_update_index_in_dim(out, lam, t, 0)

    return jax.lax.fori_loop(0, T, body, (jnp.zeros_like(g[0]), g))[1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def linear_scan(a: Array, b: Array, reverse: bool = False, method: str = "associative") -> Array:
    """All states of ``h_t = a_t * h_{t-1} + b_t`` (``h_{-1} = 0``) along axis 0.

    ``a`` is shaped like ``b``, or has no time axis (fewer dims than ``b``,
    broadcastable to one step of it): the same coefficients at every step,
    which the loop reads without ever forming ``[T, ...]`` copies.

    ``method="associative"``: ``jax.lax.associative_scan`` (depth ``O(log T)``);
    ``"loop"``: a loop of the multiply-add alone (``O(T)`` depth, the least
    work). ``reverse=True`` runs from the last step to the first. The
    gradient is itself a linear recurrence run the other way
    (``l_t = g_t + a_next l_next``, ``db = l``, ``da = l h_prev``: transposes,
    JAX's convention, also for complex ``a, b``), computed by the same
    method: only ``a`` and ``h`` are stored, and autodiff's trace through
    the scan is avoided.
    """
    return _scan_states(a, b, reverse, method)


def _linear_scan_fwd(a, b, reverse, method):
    h = _scan_states(a, b, reverse, method)
    return h, (a, h)


def _shift(x, reverse: bool):
    """``x`` moved one step later in the scan's order (``x_{t-1}``, or ``x_{t+1}`` with ``reverse``), zero first."""
    zero = jnp.zeros_like(x[:1])
    return jnp.concatenate([x[1:], zero]) if reverse else jnp.concatenate([zero, x[:-1]])


def _linear_scan_bwd(reverse, method, res, g):
    a, h = res
    if method == "associative":
        lam = _scan_states(_shift(jnp.broadcast_to(a, h.shape), not reverse), g, not reverse, method)
    else:
        lam = _adjoint_loop(a, g, reverse)
    return _sum_to(lam * _shift(h, reverse), a.shape), lam


linear_scan.defvjp(_linear_scan_fwd, _linear_scan_bwd)


# The loop form's chunk: about this many bytes of projected input ([steps, *B, G]), so a chunk's coefficients,
# loop and outputs stay in cache (docs/performance.md, "Linear cells").
LOOP_CHUNK_BYTES = 2**21
# The name of a chunk's input projection in the loop form, the residual its backward pass keeps where the
# cell's ``Linear.save_projection`` says so.
PROJECTION = "rnnjax.projection"


def loop_chunk(T: int, step_bytes: int) -> int:
    """Steps per chunk of the loop form for ``T`` steps of ``step_bytes`` projected bytes each: a power of
    two near ``LOOP_CHUNK_BYTES / step_bytes`` (at least 8), or a divisor of ``T`` within a factor of two of
    it (no remainder chunk); ``T`` itself (one chunk) for sequences shorter than two chunks."""
    target = 2 ** max(3, int(math.log2(max(LOOP_CHUNK_BYTES // max(step_bytes, 1), 1))))
    if T < 2 * target:
        return T
    divisors = [d for d in range(target // 2, 2 * target + 1) if T % d == 0]
    return min(divisors, key=lambda d: abs(math.log2(d / target))) if divisors else target


def _max_plus(earlier, later):
    """Two steps of ``m = max(f + m, i)`` as one: ``m = max(f1 + f2 + m, max(i1 + f2, i2))``."""
    f1, i1 = earlier
    f2, i2 = later
    return f1 + f2, jnp.maximum(i1 + f2, i2)


@functools.partial(jax.jit, static_argnames="reverse")  # one program, not an op-by-op dispatch, when called eagerly
def _stabilisers(log_f, log_i, m, m_zero, valid, resets, reverse: bool):
    """The stabilisers of all steps of a stabilised linear form (:class:`~rnnjax.cells.base.Linear`):
    ``(m_prev, m_new)``, each ``[C, *B, K]``, the stabiliser before and after each step.

    ``m' = max(log_f + m, log_i)`` is linear in the max-plus semiring, so it runs as an associative scan
    with the driver's masking in that semiring: a held step is ``(0, -inf)``, a reset ``(-inf, max(log_f +
    m_zero, log_i))``. At a held step ``m_new`` is what the step itself would give (not the held value), so
    the coefficients the driver then replaces stay finite.
    """
    raw_f, raw_i = log_f, log_i
    if valid is not None:
        v = valid[..., None]
        log_f, log_i = jnp.where(v, log_f, 0), jnp.where(v, log_i, -jnp.inf)
    if resets is not None:
        r = resets[..., None]
        log_i = jnp.where(r, jnp.maximum(log_f + m_zero, log_i), log_i)
        log_f = jnp.where(r, -jnp.inf, log_f)
    first = -1 if reverse else 0
    log_i = log_i.at[first].set(jnp.maximum(log_f[first] + m, log_i[first]))
    ms = jax.lax.associative_scan(_max_plus, (log_f, log_i), reverse=reverse, axis=0)[1]
    m_prev = jnp.concatenate([ms[1:], m[None]]) if reverse else jnp.concatenate([m[None], ms[:-1]])
    if resets is not None:
        m_prev = jnp.where(resets[..., None], m_zero, m_prev)
    if valid is not None:
        ms = jnp.where(valid[..., None], ms, jnp.maximum(raw_f + m_prev, raw_i))
    return m_prev, ms


def _linear_chunk(cell: Cell, params, zero_state, state, xs, valid, resets, *, reverse: bool, method: str):
    """Steps ``xs [C, *B, F]`` of the linear form from ``state`` (entering at the first step read):
    ``(the state after the last step read, ys [C, *B, O])``.

    The driver's masking as coefficients: an invalid step holds the carry
    (``a = 1, b = 0``), a reset replaces the carry by the initial one before
    the step (``a' = 0``, ``b' = a h_init + b``, applied after the hold, as
    the sequential driver resets before it holds). A stabilised form's
    ``state`` is ``(h, m)``; its stabilisers come from :func:`_stabilisers`.
    """
    lin = cell.linear
    px = checkpoint_name(cell.project(params, xs), PROJECTION)
    if lin.stabiliser is None:
        a, b = lin.coefficients(params, px)
    else:
        (state, m), (zero_state, m_zero) = state, zero_state
        m_prev, ms = _stabilisers(*lin.stabiliser(params, px), m, m_zero, valid, resets, reverse)
        a, b = lin.coefficients(params, px, m_prev, ms)
    if valid is not None:
        v = valid[..., None]
        a = jnp.where(v, a, jnp.ones_like(a))
        b = jnp.where(v, b, jnp.zeros_like(b))
    if resets is not None:
        r = resets[..., None]
        b = jnp.where(r, a * zero_state + b, b)
        a = jnp.where(r, jnp.zeros_like(a), a)
    first = -1 if reverse else 0
    b = b.at[first].add((a if a.ndim < b.ndim else a[first]) * state)
    hs = linear_scan(a, b, reverse, method)
    if lin.stabiliser is not None:
        if valid is not None:  # the held steps' stabilisers (ms holds what each step would have given)
            ms = jnp.where(valid[..., None], ms, m_prev)
        hs = (hs, ms)
    ys = lin.output(params, hs, px)
    if valid is not None:
        ys = jnp.where(valid[..., None], ys, jnp.zeros_like(ys))
    return jax.tree_util.tree_map(lambda s: s[-1 - first], hs), ys


# Steps per chunk of parallel="chunkwise": its [C, C] matrices per head against the state formed once per chunk.
CHUNKWISE_STEPS = 64


def _chunkwise_chunk(cell: Cell, params, zero_state, state, xs, valid, resets, *, reverse: bool):
    """Steps ``xs [C, *B, F]`` by the cell's chunkwise form (:class:`~rnnjax.cells.base.Linear`), with
    :func:`_linear_chunk`'s contract: the stabilisers are the step form's (:func:`_stabilisers`), and
    ``reverse`` runs the chunk's steps flipped."""
    lin = cell.linear
    px = checkpoint_name(cell.project(params, xs), PROJECTION)
    (state, m), (_, m_zero) = state, zero_state
    m_prev, ms = _stabilisers(*lin.stabiliser(params, px), m, m_zero, valid, resets, reverse)
    if valid is not None:
        ms = jnp.where(valid[..., None], ms, m_prev)
    flip = (lambda u: None if u is None else jnp.flip(u, 0)) if reverse else (lambda u: u)
    state, ys = lin.chunkwise(params, flip(px), (state, m), flip(ms), flip(valid), flip(resets))
    ys = flip(ys)
    if valid is not None:
        ys = jnp.where(valid[..., None], ys, jnp.zeros_like(ys))
    return state, ys


def parallel_unroll(cell: Cell, params, xs, carry, zero_carry, valid, resets, reverse: bool, method: str):
    """Time-major ``xs [T, *B, F]`` -> ``(carry, ys [T, *B, O])`` from the cell's linear form: the
    coefficients of all steps at once, then :func:`linear_scan` (``method``), then the outputs of all steps
    (:func:`_linear_chunk`); the given carry enters through the first step read (the last with ``reverse``).

    ``"loop"`` does this :func:`loop_chunk` steps at a time in a ``lax.scan`` over the chunks that carries
    the state (any remainder after the last whole chunk is one more, shorter chunk); the backward pass
    recomputes each chunk (``jax.checkpoint``) instead of storing whole-sequence residuals, from its stored
    projection where the cell's ``Linear.save_projection`` is set (:data:`PROJECTION`). ``"chunkwise"`` runs
    the cell's chunkwise form (:func:`_chunkwise_chunk`) :data:`CHUNKWISE_STEPS` steps at a time, in chunks
    as the loop form's.
    """
    lin = cell.linear
    state = lin.state(carry)
    zero_state = lin.state(zero_carry)
    if method == "chunkwise":
        chunk = functools.partial(_chunkwise_chunk, cell, params, zero_state, reverse=reverse)
    else:
        chunk = functools.partial(_linear_chunk, cell, params, zero_state, reverse=reverse, method=method)
    T = xs.shape[0]
    C = min(T, CHUNKWISE_STEPS) if method == "chunkwise" else T
    if method == "loop":
        step = jax.eval_shape(cell.project, params, xs[0])
        C = loop_chunk(T, math.prod(step.shape) * max(step.dtype.itemsize, 4))  # coefficients: float32 or wider
    if C == T:
        state, ys = chunk(state, xs, valid, resets)
        return lin.carry(state), ys
    whole = T - T % C
    head = tuple(None if u is None else u[:whole].reshape(whole // C, C, *u.shape[1:]) for u in (xs, valid, resets))
    tail = tuple(None if u is None else u[whole:] for u in (xs, valid, resets))

    def whole_chunks(state):
        saves = checkpoint_policies.save_only_these_names(PROJECTION) if lin.save_projection else None
        state, ys = jax.lax.scan(lambda s, u: jax.checkpoint(chunk, policy=saves)(s, *u), state, head,
                                 reverse=reverse)
        return state, ys.reshape(whole, *ys.shape[2:])

    if whole == T:
        state, ys = whole_chunks(state)
        return lin.carry(state), ys
    if reverse:  # the remainder holds the last steps: read first backwards, last forwards
        state, ys_tail = chunk(state, *tail)
        state, ys = whole_chunks(state)
    else:
        state, ys = whole_chunks(state)
        state, ys_tail = chunk(state, *tail)
    return lin.carry(state), jnp.concatenate([ys, ys_tail])
