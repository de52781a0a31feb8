"""Recurrent cells: factories that return a :class:`Cell` of pure functions."""

from rnnjax.cells.base import ACTIVATIONS, Cell, Linear, Weights
from rnnjax.cells.conv import ConvParams, conv_gru, conv_lstm
from rnnjax.cells.elman import JordanParams, elman, jordan
from rnnjax.cells.gru import LayerNormGRUParams, gru, layer_norm_gru, mgu
from rnnjax.cells.lru import LRUParams, lru
from rnnjax.cells.lstm import LayerNormLSTMParams, LSTMCarry, LSTMParams, layer_norm_lstm, lstm
from rnnjax.cells.mamba import MambaParams, mamba
from rnnjax.cells.minrnn import MinRNNParams, mingru, minlstm
from rnnjax.cells.rglru import RGLRUParams, rglru
from rnnjax.cells.xlstm import MLSTMCarry, MLSTMParams, SLSTMCarry, SLSTMParams, mlstm, slstm

__all__ = [
    "ACTIVATIONS",
    "Cell",
    "ConvParams",
    "JordanParams",
    "LRUParams",
    "LSTMCarry",
    "LSTMParams",
    "LayerNormGRUParams",
    "LayerNormLSTMParams",
    "Linear",
    "MLSTMCarry",
    "MLSTMParams",
    "MambaParams",
    "MinRNNParams",
    "RGLRUParams",
    "SLSTMCarry",
    "SLSTMParams",
    "Weights",
    "conv_gru",
    "conv_lstm",
    "elman",
    "gru",
    "jordan",
    "layer_norm_gru",
    "layer_norm_lstm",
    "lru",
    "lstm",
    "mamba",
    "mgu",
    "mingru",
    "minlstm",
    "mlstm",
    "rglru",
    "slstm",
]
