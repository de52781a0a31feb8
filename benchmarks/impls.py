"""Implementations under test: rnnjax and its peers, each as a zero-argument
callable that runs one forward (``fwd``) or forward+backward (``fwdbwd``)
pass and blocks until the result is ready.

Peers are optional: a missing package yields ``None`` with a note.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Config(NamedTuple):
    batch: int
    time: int
    features: int
    hidden: int
    cell: str = "lstm"
    mode: str = "fwdbwd"

    @property
    def tokens(self) -> int:
        return self.batch * self.time


PRESETS = {
    "C1": dict(batch=64, time=128, features=256, hidden=256),
    "C2": dict(batch=16, time=512, features=512, hidden=512),
    "C3": dict(batch=1, time=1024, features=128, hidden=128),
    "C4": dict(batch=256, time=64, features=1024, hidden=1024),
}


def _inputs(cfg: Config) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(cfg.batch, cfg.time, cfg.features)).astype(np.float32)


def _jax_runner(loss_and_out, params, xs, mode: str) -> Callable[[], object]:
    """Jits ``loss_and_out(params, xs) -> (loss, ys)``; fwd returns ys, fwdbwd the parameter gradients."""
    if mode == "fwd":
        fn = jax.jit(lambda p, x: loss_and_out(p, x)[1])
    else:
        fn = jax.jit(jax.grad(lambda p, x: loss_and_out(p, x)[0]))
    return lambda: jax.block_until_ready(fn(params, xs))


def rnnjax_impl(cfg: Config, *, hoist="auto") -> Callable[[], object]:
    import rnnjax

    cell = getattr(rnnjax.cells, cfg.cell)(cfg.hidden)
    params = cell.init(jax.random.key(0), cfg.features)

    def loss_and_out(p, x):
        _, ys = rnnjax.unroll(cell, p, x, hoist=hoist)
        return jnp.sum(ys), ys

    return _jax_runner(loss_and_out, params, jnp.asarray(_inputs(cfg)), cfg.mode)


def flax_impl(cfg: Config) -> Callable[[], object] | None:
    if importlib.util.find_spec("flax") is None:
        return None
    import flax.linen as nn

    cell = {"lstm": nn.OptimizedLSTMCell, "gru": nn.GRUCell, "elman": nn.SimpleCell}[cfg.cell](cfg.hidden)
    model = nn.RNN(cell)
    xs = jnp.asarray(_inputs(cfg))
    params = model.init(jax.random.key(0), xs)

    def loss_and_out(p, x):
        ys = model.apply(p, x)
        return jnp.sum(ys), ys

    return _jax_runner(loss_and_out, params, xs, cfg.mode)


def torch_impl(cfg: Config) -> Callable[[], object] | None:
    if importlib.util.find_spec("torch") is None:
        return None
    import torch

    module = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "elman": torch.nn.RNN}[cfg.cell](
        cfg.features, cfg.hidden, batch_first=True)
    xs = torch.from_numpy(_inputs(cfg))

    if cfg.mode == "fwd":
        @torch.no_grad()
        def run():
            return module(xs)[0]
    else:
        def run():
            module.zero_grad(set_to_none=True)
            module(xs)[0].sum().backward()
            return module.weight_hh_l0.grad

    return run


IMPLS = {
    "rnnjax": rnnjax_impl,
    "rnnjax-hoisted": functools.partial(rnnjax_impl, hoist=True),
    "rnnjax-inloop": functools.partial(rnnjax_impl, hoist=False),
    "flax": flax_impl,
    "torch": torch_impl,
}
