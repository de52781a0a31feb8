"""Input validation shared by the public functions.

Every error names the public function, what was expected, what was given and
how to fix it. Value checks (lengths in range, no NaNs) only run on concrete
arrays: under ``jit`` the values are not known, and the checks are skipped.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def concrete_range(x) -> tuple | None:
    """``(min, max)`` of a non-empty array whose values are known now, read with NumPy; None for a tracer or an
    empty array. (Not ``x.min()``: under a jit trace that is traced even for a constant the function closes over.)"""
    if not is_concrete(x) or not np.size(x):
        return None
    values = np.asarray(x)
    return values.min().item(), values.max().item()


def is_int(value) -> bool:
    """A whole number: a Python or NumPy integer, and not a bool (``True`` is an ``int`` in Python)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def is_number(value) -> bool:
    """A real number: a Python or NumPy integer or float, and not a bool."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _bounds(low, high, high_label) -> str:
    if high is None:
        return f">= {low}"
    return f"in [{low}, {high_label or high}]"


def require_int(fn: str, name: str, value, *, low: int = 1, high: int | None = None, why: str = "",
                fix: str | None = None, high_label: str | None = None, optional: bool = False):
    """Checks that ``value`` is an integer in ``[low, high]`` (``high`` None: no upper bound) and returns it.

    The ValueError reads ``"{fn}: {name} must be an integer >= {low} ({why}), got {value!r}. Fix: {fix}"``
    (``in [low, high]`` with an upper bound, shown as ``high_label`` when given). ``optional``: None passes
    too (and the message says ``None or an integer``).
    """
    if optional and value is None:
        return value
    if not is_int(value) or value < low or (high is not None and value > high):
        what = f"{'None or ' if optional else ''}an integer {_bounds(low, high, high_label)}"
        raise ValueError(f"{fn}: {name} must be {what}{f' ({why})' if why else ''}, got {value!r}."
                         f"{f' Fix: {fix}' if fix else ''}")
    return value


def require_choice(fn: str, name: str, value, choices, *, fix: str | None = "pass one of those."):
    """Checks that ``value`` is one of ``choices`` and returns it; else a ValueError
    ``"{fn}: unknown {name} {value!r}; expected one of a, b, c. Fix: {fix}"``."""
    if value not in choices:
        raise ValueError(f"{fn}: unknown {name} {value!r}; expected one of {', '.join(map(str, choices))}."
                         f"{f' Fix: {fix}' if fix else ''}")
    return value


def require_rate(fn: str, name: str, value) -> float:
    """Checks that ``value`` is a rate in ``[0, 1)`` (a dropout probability) and returns it; else a ValueError
    ``"{fn}: {name} must be in [0, 1), got {value}. Fix: pass a rate such as 0.2."``."""
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{fn}: {name} must be in [0, 1), got {value}. Fix: pass a rate such as 0.2.")
    return value


def _given(x) -> str:
    """What a value is, for an error message: its type, and its dtype or a short repr."""
    dtype = getattr(x, "dtype", None)
    if dtype is not None:
        return f"{type(x).__name__} of dtype {dtype}"
    text = repr(x)
    return f"{type(x).__name__} {text[:40] + '...' if len(text) > 40 else text}"


def as_array(fn: str, name: str, x, expected: str, fix: str):
    """``jnp.asarray(x)``; a TypeError ``"{fn}: expected {name}, {expected}, got <what x is>. Fix: {fix}"``
    for what JAX cannot hold (strings, objects, ragged lists) instead of JAX's own error."""
    try:
        return jnp.asarray(x)
    except (TypeError, ValueError):
        raise TypeError(f"{fn}: expected {name}, {expected}, got {_given(x)}. Fix: {fix}") from None


def as_float_array(fn: str, name: str, x, shape: str):
    """``x`` as a JAX array of a floating-point dtype; a TypeError naming ``fn``, the expected ``shape``
    and what was given for anything else (strings, objects, complex, bool or integer values)."""
    x = as_array(fn, name, x, f"a floating-point array {shape}",
                 f"pass numbers as a float array, e.g. jnp.asarray({name}, jnp.float32) (text goes through a "
                 "vocabulary and rnnjax.layers.embedding first).")
    require_float(fn, name, x)
    return x


def as_int_array(fn: str, name: str, x, shape: str):
    """``x`` as a JAX array of an integer dtype (not bool); a TypeError naming ``fn`` for anything else."""
    fix = f"pass {name}.astype(jnp.int32) holding whole numbers."
    x = as_array(fn, name, x, f"an integer array {shape}", fix)
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"{fn}: expected {name}, an integer array {shape}, got dtype {x.dtype}. Fix: {fix}")
    return x


def require_float(fn: str, name: str, x) -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        hint = " (token ids go through rnnjax.layers.embedding first)" if jnp.issubdtype(x.dtype, jnp.integer) else ""
        raise TypeError(
            f"{fn}: expected a floating-point {name}, got dtype {x.dtype}{hint}. "
            f"Fix: pass {name}.astype(jnp.float32)."
        )


def require_features(fn: str, name: str, x, expected: int) -> None:
    if x.ndim < 1 or x.shape[-1] != expected:
        raise ValueError(
            f"{fn}: expected {name} with {expected} features in the last axis "
            f"(the parameters were initialised with input_size={expected}), got shape {tuple(x.shape)}. "
            f"Fix: pass inputs of shape [..., {expected}] or re-initialise with "
            f"input_size={x.shape[-1] if x.ndim else 0}."
        )


def _leaf_type(leaf) -> str | None:
    """``dtype[shape]`` of an array-like leaf (canonical, as JAX would hold it), None for what is not one."""
    try:
        shape, dtype = np.shape(leaf), jax.dtypes.canonicalize_dtype(jnp.result_type(leaf))
    except (TypeError, ValueError):
        return None
    return f"{jnp.dtype(dtype).name}{list(shape)}"


def tree_shapes(tree) -> str:
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    shapes = [_leaf_type(leaf) or _given(leaf) for leaf in leaves]
    return str(jax.tree_util.tree_unflatten(treedef, shapes)).replace("'", "")


def require_like(fn: str, name: str, given, expected, fix: str) -> None:
    """Checks that ``given`` has the structure, shapes and dtypes of ``expected`` (ShapeDtypeStructs);
    leaves that are not arrays (strings, objects) are reported, not converted."""
    g_leaves, g_def = jax.tree_util.tree_flatten(given)
    e_leaves, e_def = jax.tree_util.tree_flatten(expected)
    ok = g_def == e_def and all(_leaf_type(g) == _leaf_type(e) for g, e in zip(g_leaves, e_leaves))
    if not ok:
        raise ValueError(f"{fn}: {name} does not match: expected {tree_shapes(expected)}, "
                         f"got {tree_shapes(given)}. Fix: {fix}")


def lengths_to_mask(fn: str, lengths, batch_shape: tuple[int, ...], T: int):
    """Validates ``lengths`` and returns a time-major boolean mask ``[T, *B]``."""
    lengths = as_array(fn, "lengths", lengths, f"integers of shape {tuple(batch_shape)}",
                       "pass lengths.astype(jnp.int32) holding whole numbers of valid steps.")
    if not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise TypeError(
            f"{fn}: expected integer lengths, got dtype {lengths.dtype}. "
            "Fix: pass lengths.astype(jnp.int32) holding whole numbers of valid steps."
        )
    if tuple(lengths.shape) != tuple(batch_shape):
        raise ValueError(
            f"{fn}: expected lengths of shape {tuple(batch_shape)} (the batch dimensions of xs), "
            f"got shape {tuple(lengths.shape)}. Fix: pass one length per sequence."
        )
    if is_concrete(lengths):
        values = np.asarray(lengths)
        if values.size and values.min() < 0:
            raise ValueError(
                f"{fn}: lengths must be >= 0, got a minimum of {values.min()}. "
                "Fix: pass the number of valid steps of each sequence."
            )
        if values.size and values.max() > T:
            raise ValueError(
                f"{fn}: lengths must be <= T = {T} (the time axis of xs), got a maximum of {values.max()}. "
                "Fix: pad xs to the longest sequence or clip the lengths."
            )
    return jnp.arange(T).reshape((T,) + (1,) * len(batch_shape)) < lengths[None]


def check_mask(fn: str, mask, batch_shape: tuple[int, ...], T: int, time_major: bool, name: str = "mask"):
    """Validates a boolean ``mask`` and returns it time-major ``[T, *B]``."""
    expected = (T, *batch_shape) if time_major else (*batch_shape, T)
    mask = as_array(fn, name, mask, f"booleans of shape {expected}", f"pass {name}.astype(bool).")
    if tuple(mask.shape) != expected:
        raise ValueError(
            f"{fn}: expected {name} of shape {expected} (xs without its feature axis), "
            f"got shape {tuple(mask.shape)}. Fix: pass one boolean per step of each sequence."
        )
    if mask.dtype != jnp.bool_:
        raise TypeError(f"{fn}: expected a boolean {name}, got dtype {mask.dtype}. Fix: pass {name}.astype(bool).")
    return mask if time_major else jnp.moveaxis(mask, -1, 0)
