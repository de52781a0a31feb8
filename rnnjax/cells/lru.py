"""The Linear Recurrent Unit (Orvieto et al. 2023, "Resurrecting Recurrent
Neural Networks for Long Sequences")."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from rnnjax.cells.base import Cell, Linear, carry_dtype, check_size, compute_dtype, linear_cell, matmul, state_dtype
from rnnjax.types import Array


class LRUParams(NamedTuple):
    nu_log: Array  # [N]: |lambda| = exp(-exp(nu_log))
    theta_log: Array  # [N]: arg(lambda) = exp(theta_log)
    gamma_log: Array  # [N]: the normalisation gamma = exp(gamma_log), init sqrt(1 - |lambda|^2)
    b_re: Array  # [F, N]
    b_im: Array  # [F, N]
    c_re: Array  # [N, H]
    c_im: Array  # [N, H]
    d: Array  # [F, H]: the feed-through (Orvieto's diagonal D when F == H, a matrix otherwise)


def lru(hidden_size: int, *, state_size: int | None = None, r_min: float = 0.0, r_max: float = 1.0,
        max_phase: float = 2 * math.pi, param_dtype=jnp.float32, dtype=None) -> Cell:
    """LRU: a complex diagonal linear recurrence with a real readout::

        lambda = exp(-exp(nu_log) + i exp(theta_log))          # exponential parametrisation, |lambda| < 1
        h_t = lambda * h_{t-1} + gamma * (x_t B)              # complex [N]; gamma = exp(gamma_log)
        y_t = Re(h_t C) + x_t D                                # real [H]

    Ring initialisation: ``|lambda|`` uniform on the ring ``r_min <= |lambda| <= r_max``
    (by area), phase uniform in ``[0, max_phase]``; ``gamma`` starts at
    ``sqrt(1 - |lambda|^2)`` and is trained; ``B ~ N(0, 1/(2F))``,
    ``C ~ N(0, 1/N)`` (real and imaginary parts), ``D ~ N(0, 1/F)``. For long
    memory the paper uses ``r_min=0.9, r_max=0.999, max_phase=pi/10``.

    ``state_size`` ``N`` defaults to ``hidden_size``. The carry is real,
    ``[..., 2N]`` (real parts then imaginary parts), so it checkpoints and
    masks like any other; the recurrence runs in complex64 (complex128 for
    float64 parameters), also for bfloat16 inputs. The cell has a
    :class:`~rnnjax.cells.base.Linear` form, so :func:`rnnjax.unroll` can
    run it with ``jax.lax.associative_scan``.

    ``dtype``: the compute dtype (None: the parameters'). With
    ``jnp.bfloat16`` the input and readout products take bfloat16 operands
    and accumulate in float32, the recurrence stays complex64 and ``y`` is
    bfloat16 (:mod:`rnnjax.cells.base`, "Mixed precision").
    """
    fn = "rnnjax.cells.lru"
    compute = compute_dtype(fn, dtype)
    H = check_size(fn, "hidden_size", hidden_size)
    N = check_size(fn, "state_size", H if state_size is None else state_size)
    if not 0.0 <= r_min < r_max <= 1.0:
        raise ValueError(f"{fn}: expected 0 <= r_min < r_max <= 1, got r_min={r_min}, r_max={r_max}. "
                         "Fix: pass a ring inside the unit circle, e.g. r_min=0.9, r_max=0.999.")
    if not max_phase > 0:
        raise ValueError(f"{fn}: expected max_phase > 0, got {max_phase}. Fix: pass e.g. max_phase=6.28.")
    dtype = jnp.dtype(param_dtype)

    def init(key, input_size: int) -> LRUParams:
        F = check_size(fn, "input_size", input_size)
        k_u1, k_u2, k_br, k_bi, k_cr, k_ci, k_d = jax.random.split(key, 7)
        u1 = jax.random.uniform(k_u1, (N,), jnp.float32)
        u2 = jax.random.uniform(k_u2, (N,), jnp.float32)
        nu_log = jnp.log(-0.5 * jnp.log(u1 * (r_max**2 - r_min**2) + r_min**2))
        theta_log = jnp.log(max_phase * u2)
        gamma_log = 0.5 * jnp.log1p(-jnp.exp(-2 * jnp.exp(nu_log)))  # log sqrt(1 - |lambda|^2)

        def normal(k, shape, scale):
            return (jax.random.normal(k, shape, jnp.float32) * scale).astype(dtype)

        return LRUParams(nu_log.astype(dtype), theta_log.astype(dtype), gamma_log.astype(dtype),
                         normal(k_br, (F, N), 1 / math.sqrt(2 * F)), normal(k_bi, (F, N), 1 / math.sqrt(2 * F)),
                         normal(k_cr, (N, H), 1 / math.sqrt(N)), normal(k_ci, (N, H), 1 / math.sqrt(N)),
                         normal(k_d, (F, H), 1 / math.sqrt(F)))

    def initial_carry(params: LRUParams, batch_shape=()) -> Array:
        return jnp.zeros((*tuple(batch_shape), 2 * N), state_dtype(carry_dtype(params.b_re.dtype, compute)))

    def project(params: LRUParams, xs: Array) -> Array:
        """``[..., 2N + H]``: ``gamma * (x B)`` (real, imaginary) and ``x D``."""
        gamma = jnp.exp(params.gamma_log)
        return matmul(xs, jnp.concatenate([params.b_re * gamma, params.b_im * gamma, params.d], axis=1), compute)

    def coefficients(params: LRUParams, px: Array):
        real = state_dtype(px.dtype)
        px = px.astype(real)
        b_re, b_im, _ = jnp.split(px, [N, 2 * N], axis=-1)
        b = jax.lax.complex(b_re, b_im)
        nu, theta = jnp.exp(params.nu_log.astype(real)), jnp.exp(params.theta_log.astype(real))
        return jnp.exp(jax.lax.complex(-nu, theta)), b  # the same lambda [N] at every step

    def state(carry: Array) -> Array:
        return jax.lax.complex(carry[..., :N], carry[..., N:])

    def to_carry(h: Array) -> Array:
        return jnp.concatenate([h.real, h.imag], axis=-1)

    def output(params: LRUParams, h: Array, px: Array) -> Array:
        real = h.real.dtype
        c = jnp.concatenate([params.c_re, -params.c_im]).astype(real)
        y = matmul(to_carry(h), c, compute) + jnp.split(px, [2 * N], axis=-1)[1].astype(real)
        return y.astype(px.dtype)

    lin = Linear(coefficients, state, to_carry, output)
    return linear_cell(lin, init, initial_carry, project, lambda p: p.b_re.shape[0], H, "lru", dtype=compute)
