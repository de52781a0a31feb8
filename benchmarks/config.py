"""What is measured: benchmark configurations, presets, and the analytic FLOP count.

Shapes follow rnnjax's legend: ``B`` batch, ``T`` time, ``F`` input features,
``H`` hidden units. Every implementation reads the same batch-major
``[B, T, F]`` inputs; the convolutional cells (:data:`SPATIAL_CELLS`) read
frames ``[B, T, *spatial, F]`` (``F`` input channels, ``H`` state channels).
"""

from __future__ import annotations

import math
from typing import NamedTuple

MODES = ("fwd", "fwdbwd", "train")
DTYPES = ("float32", "bfloat16")

# Cells the rnnjax runner knows, by --cell name. Peers declare their own subsets (impls.py).
CELLS = ("lstm", "gru", "elman", "layer_norm_lstm", "layer_norm_gru", "jordan", "gru_cho", "mgu", "conv_lstm")
# Cells that read frames [B, T, *spatial, F] (Config.spatial, Config.kernel) and run on the spatial presets.
SPATIAL_CELLS = ("conv_lstm",)
# Cells that take --heads (block-diagonal recurrent matrices, rnnjax only).
HEADS_CELLS = ("lstm", "gru", "gru_cho", "elman")

# Classes of the dense readout in --mode train (cross-entropy on integer targets).
READOUT_CLASSES = 32


class Config(NamedTuple):
    """One benchmark point: a model shape, a cell and a mode.

    ``spatial`` (the grid, e.g. ``(8, 8)``) and ``kernel`` (the side of the convolutions' window, the
    same in every spatial dim) are set for the cells of :data:`SPATIAL_CELLS` only; dense cells keep
    ``()`` and ``1``."""

    batch: int
    time: int
    features: int
    hidden: int
    cell: str = "lstm"
    mode: str = "fwdbwd"
    layers: int = 1
    bidirectional: bool = False
    dtype: str = "float32"
    preset: str = "custom"
    heads: int = 1
    spatial: tuple[int, ...] = ()
    kernel: int = 1

    @classmethod
    def from_dict(cls, fields: dict) -> Config:
        """The config of ``cfg._asdict()`` read back from JSON (which turns ``spatial`` into a list)."""
        return cls(**{**fields, "spatial": tuple(fields.get("spatial", ()))})

    @property
    def tokens(self) -> int:
        """Tokens processed by one call: ``B * T`` (for a convolutional cell a token is a frame)."""
        return self.batch * self.time

    @property
    def positions(self) -> int:
        """Grid positions per frame: the product of ``spatial`` (1 for a dense cell)."""
        return math.prod(self.spatial)

    @property
    def kernel_volume(self) -> int:
        """Window positions of each convolution: ``kernel ** len(spatial)`` (1 for a dense cell)."""
        return self.kernel ** len(self.spatial)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """``(B, T, F)``, or ``(B, T, *spatial, F)`` for a convolutional cell."""
        return (self.batch, self.time, *self.spatial, self.features)

    def shape(self) -> str:
        """``B64 T128 F256 H256``; a convolutional cell adds its grid and window: ``... 8x8 k3``."""
        text = f"B{self.batch} T{self.time} F{self.features} H{self.hidden}"
        return f"{text} {'x'.join(map(str, self.spatial))} k{self.kernel}" if self.spatial else text

    @property
    def directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def output_size(self) -> int:
        """Features of the last layer's output (both directions concatenated)."""
        return self.hidden * self.directions

    def label(self) -> str:
        """A short name for tables: preset, cell and the non-default options."""
        parts = [self.preset, self.cell]
        if self.preset == "custom" or self.preset.startswith("quick"):
            parts.append(self.shape())
        if self.layers > 1:
            parts.append(f"L{self.layers}")
        if self.bidirectional:
            parts.append("bi")
        if self.dtype != "float32":
            parts.append(self.dtype)
        if self.heads > 1:
            parts.append(f"heads={self.heads}")
        return " ".join(parts)

    def group(self) -> Config:
        """The config without its mode: implementations are compared within one group and mode."""
        return self._replace(mode="")


PRESETS = {
    "C1": dict(batch=64, time=128, features=256, hidden=256),
    "C2": dict(batch=16, time=512, features=512, hidden=512),
    "C3": dict(batch=1, time=1024, features=128, hidden=128),
    "C4": dict(batch=256, time=64, features=1024, hidden=1024),
}

# Presets of the convolutional cells. V1 is what each layer of `rnnjax train frames` (rnnjax/recipes/frames.py)
# runs with its defaults: batch 16; 19 steps (20 frames, the last only a target); 32x32 frames cut into 4x4
# patches, i.e. an 8x8 grid of 16 channels; ConvLSTM with 32 channels and a 3x3 window. The recipe stacks two
# such layers: --preset V1 --layers 2.
SPATIAL_PRESETS = {
    "V1": dict(batch=16, time=19, features=16, hidden=32, spatial=(8, 8), kernel=3),
}

# --quick: tiny shapes that still exercise batching and the time loop.
QUICK = {"quick": dict(batch=8, time=16, features=32, hidden=32)}
QUICK_SPATIAL = {"quick": dict(batch=4, time=8, features=4, hidden=8, spatial=(4, 4), kernel=3)}


# --- analytic FLOPs --------------------------------------------------------------
#
# Only the matmuls and convolutions count (2 FLOPs per multiply-add); elementwise
# gate math, layer norms and the optimiser are left out. Per layer and direction,
# for input width F_l (F for the first layer, H * directions after it):
#
#   fwd   = 2 * T * B * P * K * [F_l * G + H_rec * G / heads + extra]
#   bwd   = 2 * fwd            (one matmul for the input gradient, one for the
#                               weight gradient, per forward matmul)
#   fwdbwd = 3 * fwd
#   train  = 3 * fwd + 3 * 2 * T * B * P * O * C   (the dense readout to C classes, at every position)
#
# P (grid positions, prod(spatial)) and K (the window's volume, kernel ** len(spatial)) are 1 for the
# dense cells. A convolutional cell's "SAME" convolutions are counted at every position with the whole
# window, the zero padding at the border included (as rnnjax's im2col matmul and XLA's convolution
# compute them): per step 2 * B * P * K * (F_l + H) * 4H for conv_lstm.
#
# where G is the gate width and H_rec the width of what is fed back:
#
#   cell                          G     H_rec   extra
#   lstm, layer_norm_lstm         4H    H       0
#   gru, gru_cho, layer_norm_gru  3H    H       0
#   elman                         H     H       0
#   jordan (output size O = H)    H     H       H * H   (the output matmul h W_hy)
#   mgu                           2H    H       0
#   conv_lstm                     4H    H       0       (times P * K)
#
# With --heads n the recurrent matrix is block-diagonal: n products of [H/n, G/n], 1/n of the dense FLOPs.
#
# fwdbwd differentiates w.r.t. the parameters only, so the first layer's
# input gradient is not actually needed; the 3x convention counts it anyway
# (it is a small share: the T*B*F*G input-gradient matmul of one layer).

GATES = {"lstm": 4, "layer_norm_lstm": 4, "gru": 3, "gru_cho": 3, "layer_norm_gru": 3, "elman": 1, "jordan": 1,
         "mgu": 2, "conv_lstm": 4}


def forward_flops_per_layer(cell: str, batch: int, time: int, input_size: int, hidden: int, heads: int = 1,
                            positions: int = 1, kernel_volume: int = 1) -> int:
    """Matmul (or convolution) FLOPs of one forward pass of one layer in one direction; ``positions`` and
    ``kernel_volume``: a convolutional cell's grid positions and window volume."""
    G = GATES[cell] * hidden
    extra = hidden * hidden if cell == "jordan" else 0
    return 2 * time * batch * positions * kernel_volume * (input_size * G + hidden * G // heads + extra)


def flops(cfg: Config, mode: str | None = None) -> int:
    """Matmul FLOPs of one call of ``cfg`` in ``mode`` (default ``cfg.mode``), as in the table above."""
    mode = cfg.mode if mode is None else mode
    fwd = 0
    for layer in range(cfg.layers):
        width = cfg.features if layer == 0 else cfg.hidden * cfg.directions
        fwd += cfg.directions * forward_flops_per_layer(cfg.cell, cfg.batch, cfg.time, width, cfg.hidden, cfg.heads,
                                                        cfg.positions, cfg.kernel_volume)
    if mode == "fwd":
        return fwd
    if mode == "fwdbwd":
        return 3 * fwd
    if mode == "train":
        return 3 * fwd + 3 * 2 * cfg.tokens * cfg.positions * cfg.output_size * READOUT_CLASSES
    raise ValueError(f"benchmarks.config.flops: unknown mode {mode!r}; expected one of {MODES}.")
