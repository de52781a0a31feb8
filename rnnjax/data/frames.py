"""Moving digits: a spatiotemporal data set built, without a network, from scikit-learn's handwritten
digits (1,797 images of 8x8 pixels, 16 grey levels), in the manner of Moving MNIST (Srivastava et al.,
2015): each sequence shows ``digits`` of them in a ``size x size`` frame, each moving with its own
velocity and bouncing off the edges; where digits overlap the brighter pixel shows."""

from __future__ import annotations

import numpy as np

from rnnjax.data.datasets import require

DIGIT = 8  # the images' side in pixels
SPEEDS = np.array([-2, -1, 1, 2])  # pixels per frame along each axis: never still, at most 2 (integer moves)
FRACTIONS = (0.7, 0.1, 0.2)  # the images of the training, validation and test sequences (no image in two)


def digit_images(part: str, seed: int = 0) -> np.ndarray:
    """The 8x8 images (float32 in [0, 1]) of one part, ``"train"``, ``"val"`` or ``"test"``, of a seeded
    split of scikit-learn's digits: a test sequence shows only handwriting that training never saw."""
    datasets = require("sklearn.datasets", "rnnjax.data.frames.digit_images", "the moving digits")
    images = datasets.load_digits().images.astype(np.float32) / 16.0
    order = np.random.default_rng(seed).permutation(len(images))
    cut = np.cumsum([round(f * len(images)) for f in FRACTIONS[:2]])
    parts = dict(zip(("train", "val", "test"), np.split(order, cut)))
    if part not in parts:
        raise ValueError(f"rnnjax.data.frames.digit_images: expected part 'train', 'val' or 'test', got {part!r}. "
                         "Fix: pass one of those.")
    return images[np.sort(parts[part])]


def moving_digits(images: np.ndarray, n: int, *, frames: int = 20, size: int = 32, digits: int = 2,
                  seed: int = 0) -> np.ndarray:
    """``n`` sequences ``[n, frames, size, size]`` (float32 in [0, 1]) of ``digits`` images drawn from
    ``images`` (``[N, 8, 8]``), each starting at a random place with a random velocity (each axis one of
    :data:`SPEEDS` pixels per frame) and bouncing off the edges. The same arguments give the same
    sequences."""
    if size < DIGIT + 2 * int(SPEEDS.max()):
        raise ValueError(f"rnnjax.data.frames.moving_digits: expected size >= {DIGIT + 2 * int(SPEEDS.max())} (room "
                         f"for an {DIGIT}x{DIGIT} digit to move), got {size}. Fix: pass a larger size, e.g. 32.")
    rng = np.random.default_rng(seed)
    out = np.zeros((n, frames, size, size), np.float32)
    span = size - DIGIT  # the top-left corner stays in [0, span]
    rows = np.arange(n)[:, None, None]
    offsets = np.arange(DIGIT)
    for _ in range(digits):
        img = images[rng.integers(0, len(images), n)]
        pos = rng.integers(0, span + 1, (n, 2))
        vel = rng.choice(SPEEDS, (n, 2))
        for t in range(frames):
            ys, xs = (pos[:, 0:1] + offsets)[:, :, None], (pos[:, 1:2] + offsets)[:, None, :]
            out[rows, t, ys, xs] = np.maximum(out[rows, t, ys, xs], img)
            step = pos + vel
            bounce = (step < 0) | (step > span)
            vel = np.where(bounce, -vel, vel)
            pos = pos + vel
    return out


def to_patches(frames: np.ndarray, patch: int) -> np.ndarray:
    """``[..., S, S]`` frames as ``[..., S/p, S/p, p*p]``: each ``p x p`` patch becomes the features of one
    position (space to depth), so a convolutional cell works on a coarser grid with more channels."""
    *lead, h, w = frames.shape
    x = frames.reshape(*lead, h // patch, patch, w // patch, patch)
    return x.swapaxes(-3, -2).reshape(*lead, h // patch, w // patch, patch * patch)


def from_patches(x, patch: int):
    """:func:`to_patches` undone: ``[..., S/p, S/p, p*p]`` back to ``[..., S, S]`` (NumPy or JAX arrays)."""
    *lead, h, w, _ = x.shape
    x = x.reshape(*lead, h, w, patch, patch).swapaxes(-3, -2)
    return x.reshape(*lead, h * patch, w * patch)
