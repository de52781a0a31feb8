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

import math
from typing import Any, Literal

import jax
import jax.numpy as jnp

from rnnjax import _checks
from rnnjax import backend as backends
from rnnjax._tree import where_batch
from rnnjax.cells.base import Cell
from rnnjax.fused import fused_unroll
from rnnjax.linear_scan import auto_parallel, parallel_unroll
from rnnjax.types import Array, Carry, Params

Remat = bool | int | None
Hoist = bool | Literal["auto"]
Backward = Literal["auto", "fused", "autodiff"]
Parallel = bool | Literal["auto", "associative", "loop"]
PARALLEL = (True, False, "auto", "associative", "loop", "chunkwise")


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


# The XLA path's "auto" rules on CPU (each measured: docs/performance.md, "The auto rules"); on accelerators the
# big-matmul forms always pay.
# Hoist the input projection out of the loop up to this batch: XLA runs a step's two products side by side above it.
CPU_HOIST_MAX_BATCH = 4
# Fuse the backward pass up to this batch: autodiff's per-step weight-gradient product overlaps the carry's above it.
CPU_FUSE_MAX_BATCH = 16


def should_hoist(cell: Cell, batch_size: int, time_steps: int) -> bool:
    """Whether ``hoist="auto"`` computes the input projection of all steps as one ``[T*B, F] x [F, G]``
    matmul before the time loop: on accelerators, and on CPU up to :data:`CPU_HOIST_MAX_BATCH`."""
    del cell, time_steps
    return jax.default_backend() != "cpu" or batch_size <= CPU_HOIST_MAX_BATCH


def should_fuse(cell: Cell, batch_size: int, time_steps: int) -> bool:
    """Whether ``backward="auto"`` uses the fused sequence VJP (:mod:`rnnjax.fused`): for a cell with a
    ``Recurrence``, on accelerators, and on CPU up to :data:`CPU_FUSE_MAX_BATCH`."""
    del time_steps
    if cell.recurrence is None:
        return False
    return jax.default_backend() != "cpu" or batch_size <= CPU_FUSE_MAX_BATCH


def unroll(cell: Cell, params: Params, xs: Array, *, carry: Carry | None = None, lengths: Array | None = None,
           mask: Array | None = None, resets: Array | None = None, reverse: bool = False,
           time_major: bool = False, unroll: int = 1, remat: Remat = None,
           hoist: Hoist = "auto", backward: Backward = "auto", parallel: Parallel = "auto",
           backend: str = "auto") -> tuple[Carry, Array]:
    """Runs ``cell`` over the time axis of ``xs``; returns ``(final_carry, ys)``.

    Args:
      cell, params: a :class:`~rnnjax.cells.Cell` and its parameters.
      xs: ``[*B, T, F]``, or ``[T, *B, F]`` with ``time_major=True``. A
        convolutional cell (``cell.spatial_dims > 0``) takes
        ``[*B, T, *spatial, F]`` (``[T, *B, *spatial, F]``) and returns
        ``ys`` and carries with the spatial dims after the batch dims.
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
        for every step's coefficients); ``"chunkwise"`` (the mLSTM) runs
        :data:`~rnnjax.linear_scan.CHUNKWISE_STEPS` steps at a time through
        ``[C, C]`` matrices per head, forming the state once per chunk
        (``Linear.chunkwise``); ``False`` runs
        the cell's step in the sequential scan;
        ``"auto"`` as :func:`auto_parallel` decides (sequential when
        ``remat`` is set). ``unroll``, ``hoist`` and ``backward`` apply to
        the sequential scan only.
      backend: ``"xla"`` runs the cell's step in ``lax.scan`` (the reference,
        and the path on GPU/TPU); ``"native"`` runs the whole sequence, and
        its backward pass, in one call of the native CPU kernels
        (:mod:`rnnjax.native`: LSTM, both GRUs, Elman tanh/relu, with
        lengths, masks, reverse, resets and an initial carry; ``unroll``,
        ``hoist`` and ``backward`` tune the XLA path and are ignored there),
        and raises a ``ValueError`` naming what it cannot run; ``"auto"``
        runs natively where :mod:`rnnjax.backend`'s rule prefers it and
        falls back to XLA otherwise, never raising.

    Returns:
      ``(carry, ys)`` with ``ys`` ``[*B, T, O]`` (time-major ``[T, *B, O]``),
      zero at invalid steps.
    """
    fn = "rnnjax.unroll"
    if not isinstance(cell, Cell):
        raise TypeError(f"{fn}: expected an rnnjax.cells.Cell, got {type(cell).__name__}. "
                        "Fix: build one with a factory such as rnnjax.cells.lstm(hidden_size).")
    sd = cell.spatial_dims
    inner = "F]" if not sd else f"*spatial ({sd} dims), F]"  # the axes after time
    layout = f"[*batch, T, {inner}"
    xs = _checks.as_float_array(fn, "xs", xs, layout)
    if xs.ndim < 2 + sd:
        raise ValueError(
            f"{fn}: expected xs of rank >= {2 + sd}, {layout} (or [T, *batch, {inner} with time_major=True), "
            f"got shape {tuple(xs.shape)}. Fix: a single sequence is [T, {inner}; a single "
            "step goes through rnnjax.step instead."
        )
    _checks.require_features(fn, "xs", xs, cell.input_size(params))
    xs_t = xs if time_major else jnp.moveaxis(xs, -2 - sd, 0)
    T, batch_shape = xs_t.shape[0], tuple(xs_t.shape[1:xs_t.ndim - 1 - sd])
    carry_shape = tuple(xs_t.shape[1:-1])  # a convolutional cell's carry has the spatial dims too
    if T == 0:
        raise ValueError(f"{fn}: expected xs with T >= 1 time steps, got shape {tuple(xs.shape)} (T = 0). "
                         "Fix: drop empty sequences before calling, or pad them to length 1 with lengths=0.")

    valid = valid_steps(fn, batch_shape, T, lengths=lengths, mask=mask, time_major=time_major)
    if resets is not None:
        resets = _checks.check_mask(fn, resets, batch_shape, T, time_major, name="resets")

    zero_carry = cell.initial_carry(params, carry_shape)
    if carry is None:
        carry = zero_carry
    else:
        _checks.require_like(fn, "carry", carry, jax.eval_shape(lambda: zero_carry),
                             f"build it with cell.initial_carry(params, batch_shape={carry_shape}).")

    _require_stable_carry(fn, cell, params, carry, xs_t)
    batch_size = math.prod(batch_shape)
    method = _parallel_method(fn, cell, parallel, remat, batch_size, T)  # validates parallel= first
    dtype = _compute_dtype(cell, params, xs)
    chosen = backends.choose(fn, backend, backends.Request(cell, dtype, remat, jax.default_backend()))
    if chosen is not None:
        carry, ys = chosen.run(cell, params, xs_t, carry, valid, resets, reverse=reverse, bf16=dtype == jnp.bfloat16)
        return carry, ys if time_major else jnp.moveaxis(ys, 0, -2 - sd)
    if method is not None:
        carry, ys = parallel_unroll(cell, params, xs_t, carry, zero_carry, valid, resets, reverse, method)
        return carry, ys if time_major else jnp.moveaxis(ys, 0, -2 - sd)
    if hoist == "auto":
        hoist = should_hoist(cell, batch_size, T)
    if _use_fused(fn, cell, backward, remat, batch_size, T):
        carry, ys = fused_unroll(cell, params, xs_t, carry, valid, resets, hoist=hoist, reverse=reverse,
                                 unroll=unroll)
        return carry, ys if time_major else jnp.moveaxis(ys, 0, -2 - sd)
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
    return carry, ys if time_major else jnp.moveaxis(ys, 0, -2 - sd)


def _require_stable_carry(fn: str, cell: Cell, params, carry, xs_t) -> None:
    """Raises where one step changes the carry's dtypes (float64 ``xs`` with float32 parameters under
    ``jax_enable_x64``, float32 ``xs`` with bfloat16 ones): a scan's carry must keep its type. A carry of the
    inputs' dtype throughout (the parameters' too: the initial carry has theirs) needs no trace of the step."""
    if all(leaf.dtype == xs_t.dtype for leaf in jax.tree_util.tree_leaves(carry)):
        return
    x = jax.ShapeDtypeStruct(xs_t.shape[1:], xs_t.dtype)
    new, _ = jax.eval_shape(lambda p, c, x_t: cell.step(p, c, cell.project(p, x_t)), params, carry, x)
    changed = [(str(a.dtype), str(b.dtype)) for a, b in zip(jax.tree_util.tree_leaves(carry),
                                                             jax.tree_util.tree_leaves(new)) if a.dtype != b.dtype]
    if changed:
        was, now = ("/".join(sorted(set(names))) for names in zip(*changed))
        raise TypeError(f"{fn}: xs of dtype {xs_t.dtype} turn the cell's {was} carry into {now} after one step, "
                        f"and a scan's carry must keep its dtype. Fix: cast xs to the carry's dtype "
                        f"(xs.astype(jnp.{changed[0][0]})), or build the cell with param_dtype=jnp.{xs_t.dtype}.")


def _compute_dtype(cell: Cell, params, xs):
    """The dtype products are computed in: the cell's ``dtype`` (its mixed-precision policy) where set, else the
    promotion of the inputs' and the recurrent weight's dtypes."""
    if cell.recurrence is not None and cell.recurrence.dtype is not None:
        return cell.recurrence.dtype
    if cell.native is None:
        return xs.dtype
    return jnp.result_type(xs.dtype, cell.native.weights(params)[1].dtype)


def _parallel_method(fn: str, cell: Cell, parallel, remat: Remat, batch_size: int, T: int) -> str | None:
    """``"associative"``, ``"loop"`` (the linear form) or None (the cell's step in the sequential scan)."""
    if parallel not in PARALLEL:
        raise ValueError(f"{fn}: parallel must be one of True, False, 'auto', 'associative', 'loop' or "
                         f"'chunkwise', got {parallel!r}. Fix: pass one of those.")
    no_remat = remat is None or remat is False
    no_chunkwise = parallel == "chunkwise" and cell.linear is not None and cell.linear.chunkwise is None
    if parallel not in ("auto", False) and (cell.linear is None or not no_remat or no_chunkwise):
        why = (f"the cell {cell.name!r} has no linear form (its recurrence is not linear in the carry)"
               if cell.linear is None else "remat applies to the sequential scan only" if not no_remat else
               f"the cell {cell.name!r} has no chunkwise form (the mLSTM has one; 'associative' and 'loop' run "
               "every linear cell)")
        raise ValueError(f"{fn}: parallel={parallel!r} is not available here: {why}. "
                         "Fix: pass parallel='auto' or False.")
    if parallel == "auto":
        if cell.linear is None or not no_remat:
            return None
        return auto_parallel(cell, batch_size, T)
    if parallel is False:
        return None
    return "associative" if parallel is True else parallel



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
    """Advances ``cell`` by one step on ``x [*B, F]`` (``[*B, *spatial, F]`` for a convolutional cell): the
    streaming counterpart of :func:`unroll`.

    ``reset [*B]`` (booleans): where True the carry is first replaced by the
    cell's initial carry, starting a new sequence in that batch slot.
    """
    fn = "rnnjax.step"
    sd = cell.spatial_dims
    layout = "[*batch, F]" if not sd else f"[*batch, *spatial ({sd} dims), F]"
    x = _checks.as_float_array(fn, "x", x, layout)
    if x.ndim < 1 + sd:
        raise ValueError(f"{fn}: expected x of rank >= {1 + sd}, {layout}, got shape {tuple(x.shape)}. "
                         f"Fix: pass one step of the sequence, {layout}.")
    _checks.require_features(fn, "x", x, cell.input_size(params))
    carry_shape = tuple(x.shape[:-1])
    batch_shape = carry_shape[:len(carry_shape) - sd]
    zero_carry = cell.initial_carry(params, carry_shape)
    _checks.require_like(fn, "carry", carry, jax.eval_shape(lambda: zero_carry),
                         f"build it with cell.initial_carry(params, batch_shape={carry_shape}).")
    if reset is not None:
        reset = _checks.as_array(fn, "reset", reset, f"booleans of shape {batch_shape}", "one boolean per sequence.")
        if tuple(reset.shape) != batch_shape or reset.dtype != jnp.bool_:
            raise ValueError(f"{fn}: expected a boolean reset of shape {batch_shape} (x without its "
                             f"{'spatial and feature axes' if sd else 'feature axis'}), got "
                             f"{reset.dtype}{list(reset.shape)}. Fix: one boolean per sequence.")
        carry = where_batch(reset, zero_carry, carry)
    return cell.step(params, carry, cell.project(params, x))
