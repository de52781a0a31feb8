"""The driver: scans any cell over time.

Semantics shared by every cell (and by the layers built on it):

- ``xs`` is ``[*B, T, F]`` (or ``[T, *B, F]`` with ``time_major=True``);
  ``B`` may be any number of batch dimensions, including none.
- ``lengths [*B]`` or ``mask [*B, T]``: at a step whose mask is False the
  carry is held and the output is zero. With lengths (a prefix mask) the
  returned carry is therefore the one at each sequence's last valid step,
  and ``reverse=True`` runs each sequence backwards *within its own
  length*: the padded tail is crossed first with the carry held at its
  initial value. This is what PyTorch needs ``pack_padded_sequence`` for.
- ``resets [*B, T]``: where True, the carry is replaced by the cell's
  initial carry before that step, so a new sequence can start mid-stream
  (Haiku's ``ResetCore``).

A cell with a :class:`~rnnjax.cells.base.Linear` form (``h = a * h + b``)
can also be run with ``jax.lax.associative_scan`` (``parallel=True``): the
same semantics expressed as coefficients, a held step being ``(a, b) = (1, 0)``
and a reset ``(0, a * h_init + b)``, so both paths give the same numbers.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Literal, Union

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name, checkpoint_policies

from rnnjax import _checks
from rnnjax._tree import where_batch
from rnnjax.cells.base import Cell
from rnnjax.fused import fused_unroll
from rnnjax.types import Array, Carry, Params

Remat = Union[bool, int, None]
Hoist = Union[bool, Literal["auto"]]
Backward = Literal["auto", "fused", "autodiff"]
Parallel = Union[bool, Literal["auto", "associative", "loop"]]
PARALLEL = (True, False, "auto", "associative", "loop")


def valid_steps(fn: str, batch_shape: tuple[int, ...], T: int, *, lengths=None, mask=None,
                time_major: bool = False) -> Array | None:
    """The validated time-major ``[T, *B]`` mask of valid steps from ``lengths`` and/or ``mask`` (None if neither)."""
    valid = None
    if lengths is not None:
        valid = _checks.lengths_to_mask(fn, lengths, batch_shape, T)
    if mask is not None:
        m = _checks.check_mask(fn, mask, batch_shape, T, time_major)
        valid = m if valid is None else valid & m
    return valid


# Strategy choices for ``"auto"``, measured with ``rnnjax-bench`` and
# benchmarks/ on a 2-core CPU (docs/performance.md). XLA's CPU backend runs
# the two independent matmuls of a step (input and recurrent) side by side
# on the two cores, and autodiff's per-step weight-gradient matmul beside the
# carry's, so at larger batches the per-step forms win there; at small
# batches per-step overhead dominates and the big-matmul forms win. On
# accelerators the big-matmul forms always pay.
CPU_HOIST_MAX_BATCH = 4
CPU_FUSE_MAX_BATCH = 16


def should_hoist(cell: Cell, batch_size: int, time_steps: int) -> bool:
    """Whether ``hoist="auto"`` computes the input projection of all steps
    as one ``[T*B, F] x [F, G]`` matmul before the time loop.

    Measured on CPU (LSTM, forward): hoisted 1.18x the in-loop speed at B=1
    (C3), 0.9x at B=16 (C2), 0.77x at B=64 (C1).
    """
    del cell, time_steps
    return jax.default_backend() != "cpu" or batch_size <= CPU_HOIST_MAX_BATCH


def should_fuse(cell: Cell, batch_size: int, time_steps: int) -> bool:
    """Whether ``backward="auto"`` uses the fused sequence VJP (:mod:`rnnjax.fused`).

    Measured on CPU, LSTM fwd+bwd against autodiff of the scan: 1.5x at B=1
    (C3), 1.2x at B=16 (C2), 0.8x at B=64 (C1), 0.85x at B=256 (C4).
    """
    del time_steps
    if cell.recurrence is None:
        return False
    return jax.default_backend() != "cpu" or batch_size <= CPU_FUSE_MAX_BATCH


# Measured with ``rnnjax-bench parallel`` on a 2-core CPU (docs/performance.md).
CPU_PARALLEL_MIN_T = 32


def auto_parallel(cell: Cell, batch_size: int, time_steps: int) -> str | None:
    """How ``parallel="auto"`` runs a linear cell: ``"associative"`` on
    accelerators; on CPU ``"loop"`` from ``CPU_PARALLEL_MIN_T`` steps on
    (``jax.lax.associative_scan`` does ~2x the work of a loop, which two
    cores cannot hide), else None (the cell's step in the sequential scan).
    """
    del cell, batch_size
    if jax.default_backend() != "cpu":
        return "associative"
    return "loop" if time_steps >= CPU_PARALLEL_MIN_T else None


def unroll(cell: Cell, params: Params, xs: Array, *, carry: Carry | None = None, lengths: Array | None = None,
           mask: Array | None = None, resets: Array | None = None, reverse: bool = False,
           time_major: bool = False, unroll: int = 1, remat: Remat = None,
           hoist: Hoist = "auto", backward: Backward = "auto", parallel: Parallel = "auto") -> tuple[Carry, Array]:
    """Runs ``cell`` over the time axis of ``xs``; returns ``(final_carry, ys)``.

    Args:
      cell, params: a :class:`~rnnjax.cells.Cell` and its parameters.
      xs: ``[*B, T, F]``, or ``[T, *B, F]`` with ``time_major=True``.
      carry: initial carry (default ``cell.initial_carry(params, B)``).
      lengths: ``[*B]`` integers in ``[0, T]``: valid steps of each sequence.
      mask: ``[*B, T]`` booleans (time-major ``[T, *B]``): valid steps.
        May be combined with ``lengths`` (both must hold).
      resets: ``[*B, T]`` booleans (time-major ``[T, *B]``): start a new
        sequence at this step from the cell's initial carry.
      reverse: scan from the last step to the first (within each length).
      time_major: layout of ``xs``, ``mask``, ``resets`` and ``ys``.
      unroll: passed to ``lax.scan`` (steps per loop iteration).
      remat: ``None``/``False`` stores every step's activations for the
        backward pass; ``True`` recomputes each step in the backward pass;
        an int ``k`` stores the carry only every ``k`` steps and recomputes
        the ``k`` steps between (memory ``O(T/k + k)`` instead of ``O(T)``).
      hoist: compute ``cell.project`` for all steps before the loop (``True``),
        inside it (``False``), or as :func:`should_hoist` decides.
      backward: how gradients are computed. ``"fused"``: a custom VJP over
        the whole sequence whose weight gradients are big matmuls after the
        backward loop (:mod:`rnnjax.fused`; needs ``cell.recurrence`` and no
        remat); ``"autodiff"``: JAX's autodiff of the scan; ``"auto"``:
        as :func:`should_fuse` decides.
      parallel: for a cell with a ``linear`` form (LRU, minGRU, minLSTM,
        RG-LRU): ``True`` (or ``"associative"``) computes the coefficients
        of all steps at once and runs the recurrence with
        ``jax.lax.associative_scan`` (depth ``O(log T)``, float32 or wider);
        ``"loop"`` does the same with a loop of the multiply-add alone (a
        ``lax.fori_loop`` writing each state over its ``b``), a long
        sequence in chunks of :func:`loop_chunk` steps whose backward pass
        recomputes each chunk from its input projection, stored or itself
        recomputed as the cell's ``Linear.save_projection`` says (memory for
        the chunk boundaries' states and, where stored, the projections, not
        for every step's coefficients); ``False`` runs
        the cell's step in the sequential scan;
        ``"auto"`` as :func:`auto_parallel` decides (sequential when
        ``remat`` is set). ``unroll``, ``hoist`` and ``backward`` apply to
        the sequential scan only.

    Returns:
      ``(carry, ys)`` with ``ys`` ``[*B, T, O]`` (time-major ``[T, *B, O]``),
      zero at invalid steps.
    """
    fn = "rnnjax.unroll"
    if not isinstance(cell, Cell):
        raise TypeError(f"{fn}: expected an rnnjax.cells.Cell, got {type(cell).__name__}. "
                        "Fix: build one with a factory such as rnnjax.cells.lstm(hidden_size).")
    xs = jnp.asarray(xs)
    if xs.ndim < 2:
        raise ValueError(
            f"{fn}: expected xs of rank >= 2, [*batch, T, F] (or [T, *batch, F] with time_major=True), "
            f"got shape {tuple(xs.shape)}. Fix: a single sequence is [T, F]; a single step goes "
            "through rnnjax.step instead."
        )
    _checks.require_float(fn, "xs", xs)
    _checks.require_features(fn, "xs", xs, cell.input_size(params))
    xs_t = xs if time_major else jnp.moveaxis(xs, -2, 0)
    T, batch_shape = xs_t.shape[0], tuple(xs_t.shape[1:-1])
    if T == 0:
        raise ValueError(f"{fn}: xs has no time steps (T = 0, shape {tuple(xs.shape)}); expected T >= 1. "
                         "Fix: drop empty sequences before calling, or pad them to length 1 with lengths=0.")

    valid = valid_steps(fn, batch_shape, T, lengths=lengths, mask=mask, time_major=time_major)
    if resets is not None:
        resets = _checks.check_mask(fn, resets, batch_shape, T, time_major, name="resets")

    zero_carry = cell.initial_carry(params, batch_shape)
    if carry is None:
        carry = zero_carry
    else:
        _checks.require_like(fn, "carry", carry, jax.eval_shape(lambda: zero_carry),
                             f"build it with cell.initial_carry(params, batch_shape={batch_shape}).")

    batch_size = math.prod(batch_shape)
    method = _parallel_method(fn, cell, parallel, remat, batch_size, T)
    if method is not None:
        carry, ys = _parallel_unroll(cell, params, xs_t, carry, zero_carry, valid, resets, reverse, method)
        return carry, ys if time_major else jnp.moveaxis(ys, 0, -2)
    if hoist == "auto":
        hoist = should_hoist(cell, batch_size, T)
    if _use_fused(fn, cell, backward, remat, batch_size, T):
        carry, ys = fused_unroll(cell, params, xs_t, carry, valid, resets, hoist=hoist, reverse=reverse,
                                 unroll=unroll)
        return carry, ys if time_major else jnp.moveaxis(ys, 0, -2)
    inputs = cell.project(params, xs_t) if hoist else xs_t

    def body(c, inp):
        x_t, valid_t, reset_t = inp
        if reset_t is not None:
            c = where_batch(reset_t, zero_carry, c)
        new_c, y = cell.step(params, c, x_t if hoist else cell.project(params, x_t))
        if valid_t is not None:
            new_c = where_batch(valid_t, new_c, c)
            y = where_batch(valid_t, y, jnp.zeros_like(y))
        return new_c, y

    carry, ys = _scan(body, carry, (inputs, valid, resets), T=T, reverse=reverse, unroll=unroll, remat=remat,
                      batch_shape=batch_shape)
    return carry, ys if time_major else jnp.moveaxis(ys, 0, -2)


def _parallel_method(fn: str, cell: Cell, parallel, remat: Remat, batch_size: int, T: int) -> str | None:
    """``"associative"``, ``"loop"`` (the linear form) or None (the cell's step in the sequential scan)."""
    if parallel not in PARALLEL:
        raise ValueError(f"{fn}: parallel must be one of True, False, 'auto', 'associative' or 'loop', got "
                         f"{parallel!r}. Fix: pass one of those.")
    no_remat = remat is None or remat is False
    if parallel not in ("auto", False) and (cell.linear is None or not no_remat):
        why = (f"the cell {cell.name!r} has no linear form (its recurrence is not linear in the carry)"
               if cell.linear is None else "remat applies to the sequential scan only")
        raise ValueError(f"{fn}: parallel={parallel!r} is not available here: {why}. "
                         "Fix: pass parallel='auto' or False.")
    if parallel == "auto":
        if cell.linear is None or not no_remat:
            return None
        return auto_parallel(cell, batch_size, T)
    if parallel is False:
        return None
    return "associative" if parallel is True else parallel


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


# The loop form runs a long sequence in chunks of about this many bytes of projected input ([steps, *B, G]):
# each chunk's coefficients, loop and outputs stay in cache, and its backward pass recomputes them
# (``jax.checkpoint``) instead of reading whole-sequence residuals. Measured with ``rnnjax-bench
# parallel`` on a 2-core CPU (docs/performance.md).
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


def _linear_chunk(cell: Cell, params, zero_state, state, xs, valid, resets, *, reverse: bool, method: str):
    """Steps ``xs [C, *B, F]`` of the linear form from ``state`` (entering at the first step read):
    ``(the state after the last step read, ys [C, *B, O])``.

    The driver's masking as coefficients: an invalid step holds the carry
    (``a = 1, b = 0``), a reset replaces the carry by the initial one before
    the step (``a' = 0``, ``b' = a h_init + b``, applied after the hold, as
    the sequential driver resets before it holds).
    """
    lin = cell.linear
    px = checkpoint_name(cell.project(params, xs), PROJECTION)
    a, b = lin.coefficients(params, px)
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
    ys = lin.output(params, hs, px)
    if valid is not None:
        ys = jnp.where(valid[..., None], ys, jnp.zeros_like(ys))
    return hs[-1 - first], ys


def _parallel_unroll(cell: Cell, params, xs, carry, zero_carry, valid, resets, reverse: bool, method: str):
    """Time-major ``xs [T, *B, F]`` -> ``(carry, ys [T, *B, O])`` from the cell's linear form: the
    coefficients of all steps at once, then :func:`linear_scan` (``method``), then the outputs of all steps
    (:func:`_linear_chunk`); the given carry enters through the first step read (the last with ``reverse``).

    ``"loop"`` does this :func:`loop_chunk` steps at a time in a ``lax.scan`` over the chunks that carries
    the state (any remainder after the last whole chunk is one more, shorter chunk); the backward pass
    recomputes each chunk (``jax.checkpoint``) instead of storing whole-sequence residuals, from its stored
    projection where the cell's ``Linear.save_projection`` is set (:data:`PROJECTION`).
    """
    lin = cell.linear
    state = lin.state(carry)
    chunk = functools.partial(_linear_chunk, cell, params, lin.state(zero_carry), reverse=reverse, method=method)
    T = xs.shape[0]
    C = T
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


def _use_fused(fn: str, cell: Cell, backward: str, remat: Remat, batch_size: int, T: int) -> bool:
    if backward not in ("auto", "fused", "autodiff"):
        raise ValueError(f"{fn}: backward must be 'auto', 'fused' or 'autodiff', got {backward!r}. "
                         "Fix: pass one of those.")
    possible = cell.recurrence is not None and (remat is None or remat is False)
    if backward == "fused" and not possible:
        why = "remat recomputes steps in the backward pass" if cell.recurrence else (
            f"the cell {cell.name!r} has no Recurrence split")
        raise ValueError(f"{fn}: backward='fused' is not available here: {why}. "
                         "Fix: pass backward='auto' or 'autodiff'.")
    if backward == "auto":
        return possible and should_fuse(cell, batch_size, T)
    return backward == "fused"


def _scan(body, carry, inputs, *, T: int, reverse: bool, unroll: int, remat: Remat, batch_shape):
    """``lax.scan`` with the remat policy of :func:`unroll`."""
    if remat is None or remat is False:
        return jax.lax.scan(body, carry, inputs, reverse=reverse, unroll=unroll)
    if remat is True:
        return jax.lax.scan(jax.checkpoint(body), carry, inputs, reverse=reverse, unroll=unroll)
    if not isinstance(remat, int) or remat < 1:
        raise ValueError(f"rnnjax.unroll: remat must be None, True or a positive int k (store the carry "
                         f"every k steps), got {remat!r}. Fix: pass e.g. remat=64 for long sequences.")
    k = min(remat, T)
    chunks = -(-T // k)
    pad = chunks * k - T
    xs, valid, resets = inputs
    if pad:
        # Padded steps are masked out: the carry passes through them unchanged.
        valid = jnp.ones((T, *batch_shape), bool) if valid is None else valid
        xs = jnp.concatenate([xs, jnp.zeros((pad, *xs.shape[1:]), xs.dtype)])
        valid = jnp.concatenate([valid, jnp.zeros((pad, *batch_shape), bool)])
        if resets is not None:
            resets = jnp.concatenate([resets, jnp.zeros((pad, *batch_shape), bool)])
    chunked = jax.tree_util.tree_map(lambda a: a.reshape(chunks, k, *a.shape[1:]), (xs, valid, resets))

    @jax.checkpoint
    def chunk_body(c, chunk):
        return jax.lax.scan(body, c, chunk, reverse=reverse, unroll=unroll)

    carry, ys = jax.lax.scan(chunk_body, carry, chunked, reverse=reverse)
    ys = ys.reshape(chunks * k, *ys.shape[2:])
    return carry, ys[:T]


def step(cell: Cell, params: Params, carry: Carry, x: Array, *, reset: Array | None = None) -> tuple[Carry, Any]:
    """Advances ``cell`` by one step on ``x [*B, F]``: the streaming counterpart of :func:`unroll`.

    ``reset [*B]`` (booleans): where True the carry is first replaced by the
    cell's initial carry, starting a new sequence in that batch slot.
    """
    fn = "rnnjax.step"
    x = jnp.asarray(x)
    _checks.require_float(fn, "x", x)
    _checks.require_features(fn, "x", x, cell.input_size(params))
    batch_shape = tuple(x.shape[:-1])
    zero_carry = cell.initial_carry(params, batch_shape)
    _checks.require_like(fn, "carry", carry, jax.eval_shape(lambda: zero_carry),
                         f"build it with cell.initial_carry(params, batch_shape={batch_shape}).")
    if reset is not None:
        reset = jnp.asarray(reset)
        if tuple(reset.shape) != batch_shape or reset.dtype != jnp.bool_:
            raise ValueError(f"{fn}: expected a boolean reset of shape {batch_shape} (x without its feature "
                             f"axis), got {reset.dtype}{list(reset.shape)}. Fix: one boolean per sequence.")
        carry = where_batch(reset, zero_carry, carry)
    return cell.step(params, carry, cell.project(params, x))
