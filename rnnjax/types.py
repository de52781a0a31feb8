"""Shape legend and type aliases used across rnnjax.

Shape letters in docstrings and comments:

- ``B``: batch dimensions, any number of them (``*B``), possibly none;
- ``T``: time steps;
- ``F``: input features;
- ``H``: hidden units of a cell; ``G``: gate width (``k * H`` for ``k`` gates);
- ``P``: projected hidden size (LSTM ``proj_size``); ``O``: output size.

Sequences are batch-major ``[*B, T, F]`` unless ``time_major=True``, in which
case they are ``[T, *B, F]``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

Array = jax.Array
PRNGKey = jax.Array
Params = Any  # a pytree of arrays (NamedTuples throughout rnnjax)
Carry = Any  # a pytree of arrays with leading batch dimensions
Shape = tuple[int, ...]
Initializer = Callable[[PRNGKey, Shape, Any], Array]
InitSpec = str | Initializer
