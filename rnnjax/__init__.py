"""rnnjax: recurrent sequence models for JAX.

Cells are NamedTuples of pure functions (:mod:`rnnjax.cells`); one driver,
:func:`unroll`, scans any of them over time; :mod:`rnnjax.layers` composes
them into deep, bidirectional, residual models.
"""

from rnnjax import cells, layers
from rnnjax.cells import Cell
from rnnjax.layers import Layer, Module
from rnnjax.scan import step, unroll

__version__ = "0.1.0"

__all__ = ["Cell", "Layer", "Module", "cells", "layers", "step", "unroll", "__version__"]
