"""Shared fixtures: a zoo of every cell configuration, small shapes, seeded data."""

from __future__ import annotations

import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rnnjax
from rnnjax import cells

# The tests compile thousands of tiny programs and run each once or twice: compile time, not run time, is
# what they spend (30% less with this). Every comparison runs both sides under the same setting; the
# benchmarks run fully optimised code (the documentation's examples do not: the conftest.py beside README.md).
# The variable carries the setting into the `rnnjax train` subprocesses of the fault tests, whose runs must
# equal in-process ones bit for bit.
os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
jax.config.update("jax_disable_most_optimizations", True)
# A compilation cache on disk for one run of the suite, shared by the xdist workers (they inherit the variable
# from the process that starts them) and those subprocesses: the many identical programs (the same tiny models in
# different tests and processes) compile once. It lives only as long as the run: JAX's key for an entry names
# the platform ("cpu") but not the CPU's features, so a cache kept across runs could be read on another CPU.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="rnnjax-tests-jax-cache-")
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def pytest_sessionfinish(session, exitstatus):
    if _OWN_CACHE:
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


F, H, T, B = 5, 6, 7, 4

CELLS = {
    "elman_tanh": lambda: cells.elman(H),
    "elman_relu": lambda: cells.elman(H, activation="relu"),
    "jordan": lambda: cells.jordan(H, 3),
    "lstm": lambda: cells.lstm(H),
    "lstm_proj": lambda: cells.lstm(H, proj_size=3),
    "lstm_peephole": lambda: cells.lstm(H, peepholes=True, forget_bias=1.0),
    "lstm_nobias": lambda: cells.lstm(H, bias=False),
    "gru": lambda: cells.gru(H),
    "gru_cho": lambda: cells.gru(H, reset_after=False),
    "layer_norm_lstm": lambda: cells.layer_norm_lstm(H),
    "layer_norm_gru": lambda: cells.layer_norm_gru(H),
    "lru": lambda: cells.lru(H, state_size=4, r_min=0.5, r_max=0.95),
    "mingru": lambda: cells.mingru(H),
    "minlstm": lambda: cells.minlstm(H),
    "rglru": lambda: cells.rglru(H),
    "slstm": lambda: cells.slstm(H, heads=2),
    "mlstm": lambda: cells.mlstm(H, heads=2),
    "mamba": lambda: cells.mamba(H, state_size=3),
}
# Cells with a Linear form (parallel scan) whose parallel path tests/test_linear_cells.py runs with every masking
# option. mlstm and mamba have one too; their parallel forms are checked against float64 references in
# tests/test_xlstm_mamba.py (the full battery here, op by op, took minutes per cell on 2 cores).
LINEAR = ("lru", "mingru", "minlstm", "rglru")


@pytest.fixture(params=sorted(CELLS))
def cell_name(request):
    return request.param


# rnnjax.unroll and rnnjax.step compiled whole: a test's many small calls run in half the time they take op by op
# (each eager op compiles on its own). tests/test_scan.py checks jit against eager once per cell.
jit_unroll = jax.jit(rnnjax.unroll, static_argnums=0, static_argnames=(
    "reverse", "time_major", "hoist", "backward", "parallel", "remat", "unroll", "backend"))
jit_step = jax.jit(rnnjax.step, static_argnums=0)


def slow_unless(keep: bool, *values):
    """The parameters ``values``, marked slow (left out of the default run, which keeps one of each code path)
    unless ``keep``."""
    return pytest.param(*values, marks=() if keep else pytest.mark.slow)


@pytest.fixture
def cell(cell_name):
    return CELLS[cell_name]()


@pytest.fixture
def params(cell):
    return cell.init(jax.random.key(0), F)


def random_inputs(seed: int = 1, shape=(B, T, F)):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def random_carry(cell, params, batch_shape, seed: int = 2):
    zero = cell.initial_carry(params, batch_shape)
    leaves, treedef = jax.tree_util.tree_flatten(zero)
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_unflatten(
        treedef, [jnp.asarray(rng.normal(size=leaf.shape) * 0.5, leaf.dtype) for leaf in leaves]
    )


def assert_trees_close(a, b, atol=1e-5, rtol=1e-5):
    def close(x, y):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=rtol)

    jax.tree_util.tree_map(close, a, b)


def dense_from_heads(w_heads, gates: int) -> np.ndarray:
    """The dense ``[H, gates*H]`` recurrent matrix of a multi-head ``w_hh [n, H/n, gates*H/n]``: head ``k``'s
    block of gate ``g`` at rows ``k*d:(k+1)*d`` and columns ``g*H + k*d:g*H + (k+1)*d``, zeros elsewhere."""
    w_heads = np.asarray(w_heads)
    n, d, _ = w_heads.shape
    dense = np.zeros((n * d, gates * n * d), w_heads.dtype)
    for k in range(n):
        for g in range(gates):
            dense[k * d:(k + 1) * d, g * n * d + k * d:g * n * d + (k + 1) * d] = w_heads[k, :, g * d:(g + 1) * d]
    return dense
