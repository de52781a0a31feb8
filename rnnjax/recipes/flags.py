"""The flags of ``rnnjax train TASK`` as data: each recipe lists its :class:`Flag` s and ``rnnjax/cli.py``
turns them into argparse arguments (this module parses values, never argv).

The value types (:func:`positive`, :func:`in_range`, ...) raise ``argparse.ArgumentTypeError``, which argparse
prints as ``rnnjax train TASK: error: argument --flag: expected ..., got ...`` with exit status 2.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any, NamedTuple

from rnnjax import engine


class Flag(NamedTuple):
    """One flag of a recipe.

    Attributes:
      dest: the setting it sets (``--hidden-size`` for ``hidden_size``, unless ``flag`` says otherwise).
      kind: a value type (``int``, :func:`positive` ``(int)``, ...), ``"bool"`` (``--dest`` switches it on,
        and ``--no-dest`` off when it is on by default) or ``"off"`` (only ``--no-dest``: switches it off).
      help: the help text; ``(default: ...)`` is added from the recipe's defaults unless the text has one.
      group: the help section (``"model"``, ``"optimisation"``, ...; None: the command's own).
      choices, metavar: as argparse's.
      option: a run option (stored in ``config.json``'s ``options``, changeable on ``--resume``) rather
        than a fixed setting of the run.
    """

    dest: str
    kind: Any
    help: str
    group: str | None = "model"
    choices: tuple | None = None
    metavar: str | None = None
    option: bool = False


def positive(kind: Callable) -> Callable[[str], Any]:
    """A number > 0 of ``kind`` (``int`` or ``float``, finite)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if not value > 0 or (kind is float and not math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


def in_range(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = True) -> Callable[[str], float]:
    """A number in ``[lo, hi)`` (the brackets as ``lo_open``/``hi_open`` say)."""
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        ok = (lo < value if lo_open else lo <= value) and (value < hi if hi_open else value <= hi)
        if not ok:
            brackets = ("(" if lo_open else "[") + f"{lo:g}, {hi:g}" + (")" if hi_open else "]")
            raise argparse.ArgumentTypeError(f"expected a number in {brackets}, got {text!r}")
        return value

    parse.__name__ = "number"
    return parse


def _at_least_zero(kind: Callable, what: str) -> Callable[[str], Any]:
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what} >= 0, got {text!r}") from None
        if not value >= 0 or not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected {what} >= 0, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


non_negative_float = _at_least_zero(float, "a number")
non_negative_int = _at_least_zero(int, "an integer")


def one_or_list(kind: Callable) -> Callable[[str], Any]:
    """A value, or comma-separated values (one per population member)."""
    def parse(text):
        values = [kind(part) for part in text.split(",")]
        return values[0] if len(values) == 1 else values

    parse.__name__ = kind.__name__
    return parse


def cell(what: str = "recurrent cell") -> Flag:
    """``--cell``, its help listing the cells of :data:`rnnjax.models.CELLS`."""
    from rnnjax.models import CELLS  # imports JAX (about a second)

    return Flag("cell", str, f"{what}: {', '.join(CELLS)}")


# Flags every recipe that trains with AdamW has (its defaults differ).
LR = Flag("lr", one_or_list(positive(float)), "peak learning rate of AdamW; a comma-separated list trains a population",
          "optimisation")
WARMUP = Flag("warmup", positive(int), f"linear warmup steps (default: {engine.WARMUP}, or a tenth of a shorter "
              "--steps run)", "optimisation")
END_LR = Flag("end_lr", in_range(0, 1, hi_open=False), "final learning rate of the cosine decay, as a fraction of --lr",
              "optimisation")
WEIGHT_DECAY = Flag("weight_decay", one_or_list(non_negative_float),
                    "AdamW weight decay, or one per population member", "optimisation")
CLIP = Flag("clip", positive(float), "gradient clipping by global norm", "optimisation")
ACCUMULATE = Flag("accumulate", positive(int),
                  "gradient accumulation: micro-batches per update (must divide --batch)", "optimisation")
OPTIMISATION = (LR, WARMUP, END_LR, WEIGHT_DECAY, CLIP, ACCUMULATE)

DTYPES = ("auto", "float32", "bfloat16")
DTYPE = Flag("dtype", str, "compute dtype: bfloat16 runs the matrix products on bfloat16 operands with float32 "
             "accumulation, keeping gates, carries and the master weights float32 (the mixed-precision policy); "
             "auto (the default): bfloat16 where the native CPU kernels run the cell on this CPU's bfloat16 "
             "instructions (python -m rnnjax info), else float32", "optimisation", choices=DTYPES)


def resolve_dtype(name: str, cell: str) -> str:
    """``--dtype``, with ``auto`` resolved for the named cell of :data:`rnnjax.models.CELLS` on this machine:
    bfloat16 where ``unroll``'s ``"auto"`` backend runs it natively in bfloat16 (where it trained faster to a
    loss at least as good: docs/guides/tasks.md), else float32."""
    if name != "auto":
        return name
    import jax.numpy as jnp

    from rnnjax import backend
    from rnnjax.models import CELLS

    if cell not in CELLS:
        return "float32"
    factory, options = CELLS[cell]
    return "bfloat16" if backend.describe(factory(8, **options), jnp.bfloat16).startswith("native") else "float32"


def jax_dtype(name: str):
    """The JAX compute dtype of a ``--dtype`` value: None (the parameters' own, float32) or ``jnp.bfloat16``."""
    import jax.numpy as jnp

    return None if name == "float32" else jnp.dtype(name)
