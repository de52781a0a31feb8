"""Small pytree helpers shared by the driver and the fused backward pass."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def where_batch(mask, new, old):
    """``where(mask, new, old)`` leaf by leaf, for leaves whose leading dims are ``mask``'s (batch) dims."""

    def pick(n, o):
        return jnp.where(mask.reshape(mask.shape + (1,) * (n.ndim - mask.ndim)), n, o)

    return jax.tree_util.tree_map(pick, new, old)


def tree_add(a, b):
    return jax.tree_util.tree_map(jnp.add, a, b)
