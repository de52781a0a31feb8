"""Recurrent cells: factories that return a :class:`Cell` of pure functions."""

from rnnjax.cells.base import ACTIVATIONS, Cell, Weights
from rnnjax.cells.elman import JordanParams, elman, jordan
from rnnjax.cells.gru import LayerNormGRUParams, gru, layer_norm_gru
from rnnjax.cells.lstm import LayerNormLSTMParams, LSTMCarry, LSTMParams, layer_norm_lstm, lstm

__all__ = [
    "ACTIVATIONS",
    "Cell",
    "JordanParams",
    "LSTMCarry",
    "LSTMParams",
    "LayerNormGRUParams",
    "LayerNormLSTMParams",
    "Weights",
    "elman",
    "gru",
    "jordan",
    "layer_norm_gru",
    "layer_norm_lstm",
    "lstm",
]
