"""Implementations under test: rnnjax (and its variants) and its peers.

Each implementation is a factory ``(Config) -> Runner | None``. A
:class:`Runner` is a zero-argument callable that runs one call of the
configured mode and blocks until the result is ready; a factory returns
``None`` (after printing a one-line note) when its package is missing or it
has no equivalent of the requested cell or option.

Modes, the same for every implementation:

- ``fwd``: the outputs ``ys [B, T, O]`` of the whole (stacked,
  bidirectional) network (``[B, T, *spatial, O]`` for a convolutional cell).
- ``fwdbwd``: the gradients of ``sum(ys)`` with respect to the parameters
  only (not the inputs).
- ``train``: one Adam step (learning rate 1e-3) on the mean cross-entropy
  of a dense readout ``ys W + b`` to ``READOUT_CLASSES`` classes, integer
  targets per token (per grid position of each frame for a convolutional
  cell). JAX: ``optax.adam``, the jitted step donates the parameters and
  optimiser state; torch: ``torch.optim.Adam``.

All JAX runners are compiled ahead of time on their first call
(``jax.jit(f).lower(*args).compile()``): the compile time is measured
separately and the compiled executable gives XLA's memory plan.

Bidirectional layers: torch uses its native ``bidirectional=True``; flax
uses ``nn.Bidirectional`` (a forward and a ``reverse=True`` ``nn.RNN``,
concatenated); haiku and equinox run a forward scan and a reversed scan
(``dynamic_unroll(reverse=True)`` / ``lax.scan(reverse=True)``) and
concatenate the outputs. Stacks feed each layer's (concatenated) outputs to
the next, as ``torch.nn.LSTM(num_layers=...)`` does, without dropout.

Convolutional cells (``conv_lstm``): rnnjax's ``cells.conv_lstm`` against
Flax's ``nn.RNN`` over ``nn.ConvLSTMCell`` and Haiku's ``hk.dynamic_unroll``
over ``hk.Conv2DLSTM`` (``Conv1DLSTM``/``Conv3DLSTM`` for other grids); PyTorch and Equinox
have no ConvLSTM and are skipped.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks.config import READOUT_CLASSES, Config, flops

_NOTED: set[str] = set()


def note(message: str) -> None:
    """Prints a one-line note once per run (skipped implementations, caveats)."""
    if message not in _NOTED:
        _NOTED.add(message)
        print(f"note: {message}", flush=True)


def _skip(impl: str, reason: str) -> None:
    note(f"{impl} skipped: {reason}")
    return None


def _missing(impl: str, package: str) -> bool:
    if importlib.util.find_spec(package) is None:
        _skip(impl, f"package {package!r} is not installed (pip install 'rnnjax[bench]')")
        return True
    return False


class Runner:
    """One implementation at one config and mode.

    Calling it runs one timed call. After the first call, ``info`` holds
    ``compile_s`` (JAX: lowering + XLA compilation; None for torch),
    ``memory_bytes`` and ``memory_kind``.
    """

    def __init__(self, call: Callable[[], Any], *, note: str = "", info: dict | None = None):
        self._call = call
        self.note = note
        self.info = dict(compile_s=None, memory_bytes=None, memory_kind="n/a") if info is None else info

    def __call__(self):
        return self._call()


# Models (params, apply) are built once per config group and shared by its modes;
# the train runner copies the params it donates. The CLI clears this per group.
_MODELS: dict[tuple, tuple[Any, Callable]] = {}


def _model(key: str, cfg: Config, make: Callable[[], tuple[Any, Callable]]) -> tuple[Any, Callable]:
    cache_key = (key, cfg.group())
    if cache_key not in _MODELS:
        _MODELS[cache_key] = make()
    return _MODELS[cache_key]


def clear_cache() -> None:
    _MODELS.clear()


# --- data shared by every implementation --------------------------------------------


def inputs(cfg: Config) -> np.ndarray:
    """``[B, T, F]`` (``[B, T, *spatial, F]``) float32 standard normals, the same for every implementation."""
    return np.random.default_rng(0).normal(size=cfg.input_shape).astype(np.float32)


def targets(cfg: Config) -> np.ndarray:
    """``[B, T]`` (``[B, T, *spatial]``) integer class targets for ``train``."""
    return np.random.default_rng(1).integers(0, READOUT_CLASSES, size=cfg.input_shape[:-1]).astype(np.int32)


def readout_init(cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    """The readout ``W [O, C]`` (torch.nn.Linear's U(±1/√O)) and ``b [C]`` (zeros)."""
    width = cfg.output_size
    bound = 1.0 / np.sqrt(width)
    w = np.random.default_rng(2).uniform(-bound, bound, size=(width, READOUT_CLASSES)).astype(np.float32)
    return w, np.zeros(READOUT_CLASSES, np.float32)


# --- JAX: a model is (params, apply(params, xs) -> ys); the modes are shared ---------


def _jnp_dtype(cfg: Config):
    import jax.numpy as jnp

    return jnp.dtype(cfg.dtype)


class _AotCall:
    """Compiles on the first call, then runs the compiled executable.

    ``feedback(args, out) -> args`` threads state (the train step's donated
    params and optimiser state) from one call to the next.
    """

    def __init__(self, fn, args, *, donate_argnums=(), feedback=None):
        import jax

        self.jitted = jax.jit(fn, donate_argnums=donate_argnums)
        self.args = args
        self.feedback = feedback
        self.compiled = None
        self.info = dict(compile_s=None, memory_bytes=None, memory_kind="n/a", xla_peak_bytes=None,
                         matmul_flops=None)

    def _compile(self):
        start = time.perf_counter()
        self.compiled = self.jitted.lower(*self.args).compile()
        self.info["compile_s"] = time.perf_counter() - start
        try:
            mem = self.compiled.memory_analysis()
        except Exception:  # some backends do not implement it
            mem = None
        if mem is not None:
            # XLA's planned peak for one call: arguments + outputs + temporaries,
            # less the outputs that alias donated arguments (counted once).
            self.info["memory_bytes"] = int(mem.temp_size_in_bytes + mem.argument_size_in_bytes
                                            + mem.output_size_in_bytes - mem.alias_size_in_bytes)
            self.info["memory_kind"] = "xla-planned"
            self.info["xla_peak_bytes"] = getattr(mem, "peak_memory_in_bytes", None) or None
        # The matrix products the compiled program runs, beside the analytic count; a program with a loop of
        # unknown length is still timed, its count left out (None).
        from benchmarks.hlo import compiled_matmul_flops

        try:
            self.info["matmul_flops"] = compiled_matmul_flops(self.compiled.as_text())
        except ValueError:
            self.info["matmul_flops"] = None

    def __call__(self):
        import jax

        if self.compiled is None:
            self._compile()
        out = jax.block_until_ready(self.compiled(*self.args))
        if self.feedback is not None:
            self.args = self.feedback(self.args, out)
        return out


def jax_runner(cfg: Config, params, apply: Callable, *, note: str = "") -> Runner:
    """The runner of ``cfg.mode`` for a JAX model ``apply(params, xs [B, T, F]) -> ys [B, T, O]``
    (``[B, T, *spatial, ...]`` for a convolutional cell)."""
    import jax
    import jax.numpy as jnp

    xs = jnp.asarray(inputs(cfg), _jnp_dtype(cfg))
    if cfg.mode == "fwd":
        call = _AotCall(apply, (params, xs))
    elif cfg.mode == "fwdbwd":
        def grads(p, x):
            return jax.grad(lambda q: jnp.sum(apply(q, x).astype(jnp.float32)))(p)

        call = _AotCall(grads, (params, xs))
    elif cfg.mode == "train":
        import optax

        optimizer = optax.adam(1e-3)
        w, b = readout_init(cfg)
        labels = jnp.asarray(targets(cfg))

        @jax.jit
        def init_state(p, w, b):  # one compile instead of one per leaf
            # A copy of the params: the step donates them, the cached originals stay valid.
            state = {"rnn": jax.tree_util.tree_map(jnp.copy, p), "readout": (w.astype(xs.dtype), b.astype(xs.dtype))}
            return state, optimizer.init(state)

        state, opt_state = init_state(params, w, b)

        def loss_fn(p, x, y):
            w, b = p["readout"]
            logits = (apply(p["rnn"], x) @ w + b).astype(jnp.float32)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        def train_step(p, opt_state, x, y):
            loss, g = jax.value_and_grad(loss_fn)(p, x, y)
            updates, opt_state = optimizer.update(g, opt_state, p)
            return optax.apply_updates(p, updates), opt_state, loss

        call = _AotCall(train_step, (state, opt_state, xs, labels), donate_argnums=(0, 1),
                        feedback=lambda args, out: (out[0], out[1], *args[2:]))
    else:
        raise ValueError(f"unknown mode {cfg.mode!r}")
    return Runner(call, note=note, info=call.info)


# --- rnnjax ------------------------------------------------------------------------------


def rnnjax_cell(cfg: Config):
    """The rnnjax cell named by ``cfg.cell`` (``gru_cho`` is ``gru(reset_after=False)``; Jordan's O = H;
    ``conv_lstm`` with a ``cfg.kernel`` window in each of ``cfg.spatial``'s dims), with
    ``cfg.heads`` heads for the cells of :data:`~benchmarks.config.HEADS_CELLS`.

    ``--dtype bfloat16`` is rnnjax's mixed-precision policy, as PyTorch's autocast and Flax's ``dtype``:
    float32 parameters, bfloat16 products with float32 accumulation and state, bfloat16 outputs."""
    from rnnjax import cells

    dt = None if cfg.dtype == "float32" else _jnp_dtype(cfg)
    H, n = cfg.hidden, cfg.heads
    return {
        "lstm": lambda: cells.lstm(H, heads=n, dtype=dt),
        "gru": lambda: cells.gru(H, heads=n, dtype=dt),
        "gru_cho": lambda: cells.gru(H, reset_after=False, heads=n, dtype=dt),
        "elman": lambda: cells.elman(H, heads=n, dtype=dt),
        "mgu": lambda: cells.mgu(H, dtype=dt),
        "layer_norm_lstm": lambda: cells.layer_norm_lstm(H, dtype=dt),
        "layer_norm_gru": lambda: cells.layer_norm_gru(H, dtype=dt),
        "jordan": lambda: cells.jordan(H, H, dtype=dt),
        "conv_lstm": lambda: cells.conv_lstm(H, (cfg.kernel,) * len(cfg.spatial), dtype=dt),
    }[cfg.cell]()


def _accepts(fn: Callable, name: str) -> bool:
    """Whether ``fn`` takes the keyword-only option ``name`` (rnnjax's options are all keyword-only;
    this keeps e.g. ``layers.bidirectional(forward, backward=None)``'s backward *cell* from matching)."""
    try:
        param = inspect.signature(fn).parameters.get(name)
    except (TypeError, ValueError):
        return False
    return param is not None and param.kind is inspect.Parameter.KEYWORD_ONLY


def rnnjax_impl(cfg: Config, *, hoist="auto", backward: str | None = None, backend: str = "auto",
                name: str = "rnnjax", dense: bool = False) -> Runner | None:
    """rnnjax: ``rnnjax.unroll`` for one layer, ``layers.stack`` of ``layers.rnn``/``layers.bidirectional`` otherwise.

    ``dense``: the cell with one head (a dense recurrent matrix) whatever ``cfg.heads``, its FLOPs in
    ``info["flops"]``: the reference the multi-head cell is compared with in the same rounds.

    ``hoist`` and ``backward`` are passed only when they differ from the
    library's defaults, and only where the installed rnnjax accepts them as
    keyword-only options (``inspect.signature``), so this works before and
    after ``backward=`` exists; a variant whose option is not accepted is
    skipped with a note rather than silently measuring the default.
    """
    import jax

    import rnnjax
    from rnnjax import layers

    if dense:
        cfg = cfg._replace(heads=1)
    cell = rnnjax_cell(cfg)
    deep = cfg.layers > 1 or cfg.bidirectional
    target = (layers.bidirectional if cfg.bidirectional else layers.rnn) if deep else rnnjax.unroll
    where = f"rnnjax.{'layers.' if deep else ''}{target.__name__}"
    opts: dict[str, Any] = {}
    options = (("hoist", hoist, "auto"), ("backward", backward, None), ("backend", backend, "auto"))
    for option, value, default in options:
        if value == default:
            continue  # the library's own default: nothing to pass
        if not _accepts(target, option):
            return _skip(name, f"{where} has no {option}= option in this version (its default is what "
                               "'rnnjax' measures)")
        opts[option] = value

    def make():
        if not deep:
            params = jax.jit(cell.init, static_argnums=1)(jax.random.key(0), cfg.features)
            return params, lambda p, x: rnnjax.unroll(cell, p, x, **opts)[1]
        model = layers.stack([target(cell, **opts)] * cfg.layers)
        params = jax.jit(model.init, static_argnums=1)(jax.random.key(0), cfg.features)
        return params, lambda p, x: model.apply(p, x)[1]

    params, apply = _model(f"{name}/{sorted(opts.items())}", cfg, make)
    runner = jax_runner(cfg, params, apply)
    if dense:
        runner.info["flops"] = flops(cfg)
    return runner


# --- flax.linen -----------------------------------------------------------------------------


def flax_impl(cfg: Config, *, lstm_cell: str = "OptimizedLSTMCell", name: str = "flax") -> Runner | None:
    """``flax.linen.RNN`` over ``OptimizedLSTMCell`` (or ``LSTMCell``), ``GRUCell``, ``SimpleCell``, ``MGUCell``
    or ``ConvLSTMCell``; ``nn.Bidirectional`` and ``nn.Sequential`` for the options."""
    if _missing(name, "flax"):
        return None
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    classes = {"lstm": getattr(nn, lstm_cell)}
    if name == "flax":
        classes.update(gru=nn.GRUCell, elman=nn.SimpleCell, mgu=nn.MGUCell, conv_lstm=nn.ConvLSTMCell)
    if cfg.cell not in classes:
        return _skip(name, f"no {cfg.cell} cell (has {', '.join(classes)})")
    dt = _jnp_dtype(cfg)
    # ConvLSTMCell's "SAME", stride-1 window; nn.RNN finds the time axis before its spatial ones.
    window = dict(kernel_size=(cfg.kernel,) * len(cfg.spatial)) if cfg.spatial else {}

    # Parameters are initialised in float32 and cast: flax's default orthogonal recurrent
    # initialiser (a QR decomposition) rejects bfloat16. ``dtype`` sets the compute dtype.
    def rnn():
        return nn.RNN(classes[cfg.cell](cfg.hidden, **window, dtype=dt, param_dtype=jnp.float32))

    def layer():
        return nn.Bidirectional(rnn(), rnn()) if cfg.bidirectional else rnn()

    def make():
        model = nn.Sequential([layer() for _ in range(cfg.layers)]) if cfg.layers > 1 else layer()
        params = jax.jit(model.init)(jax.random.key(0), jnp.zeros(cfg.input_shape, dt))
        return jax.tree_util.tree_map(lambda a: a.astype(dt), params), model.apply

    params, apply = _model(name, cfg, make)
    return jax_runner(cfg, params, apply)


# --- haiku ------------------------------------------------------------------------------------


def haiku_impl(cfg: Config) -> Runner | None:
    """``hk.dynamic_unroll`` over ``hk.LSTM``/``hk.GRU``/``hk.VanillaRNN``/``hk.Conv2DLSTM``; ``hk.DeepRNN``
    for stacks.

    Bidirectional: per layer, a forward and a ``reverse=True`` unroll, concatenated.
    ``hk.GRU`` applies the reset gate before its recurrent matmul (Cho et al.),
    i.e. it is ``gru_cho``; for ``--cell gru`` it runs with a note.
    """
    name = "haiku"
    if _missing(name, "haiku"):
        return None
    import haiku as hk
    import jax
    import jax.numpy as jnp

    classes = {"lstm": hk.LSTM, "gru": hk.GRU, "gru_cho": hk.GRU, "elman": hk.VanillaRNN,
               # hk.Conv{1,2,3}DLSTM: "SAME", stride-1 convolutions over the grid, whose shape is given up front.
               "conv_lstm": lambda hidden, name=None: getattr(hk, f"Conv{len(cfg.spatial)}DLSTM")(
                   cfg.spatial, hidden, cfg.kernel, name=name)}
    if cfg.cell not in classes:
        return _skip(name, f"no {cfg.cell} core (has lstm, gru (reset-before, = gru_cho), elman, conv_lstm)")
    message = ""
    if cfg.cell == "gru":
        message = "hk.GRU resets before the recurrent matmul (Cho et al., = gru_cho), unlike torch/flax/rnnjax gru"
        note(f"haiku: {message}")
    dt = _jnp_dtype(cfg)
    core_cls = classes[cfg.cell]

    def unroll(core, xs, reverse=False):
        state = jax.tree_util.tree_map(lambda s: s.astype(dt), core.initial_state(cfg.batch))
        ys, _ = hk.dynamic_unroll(core, xs, state, time_major=False, reverse=reverse)
        return ys

    def forward(xs):
        if not cfg.bidirectional:
            core = hk.DeepRNN([core_cls(cfg.hidden) for _ in range(cfg.layers)]) if cfg.layers > 1 \
                else core_cls(cfg.hidden)
            return unroll(core, xs)
        h = xs
        for layer in range(cfg.layers):
            fw = unroll(core_cls(cfg.hidden, name=f"fw_{layer}"), h)
            bw = unroll(core_cls(cfg.hidden, name=f"bw_{layer}"), h, reverse=True)
            h = jnp.concatenate([fw, bw], axis=-1)
        return h

    def make():
        model = hk.without_apply_rng(hk.transform(forward))
        params = jax.jit(model.init)(jax.random.key(0), jnp.zeros(cfg.input_shape, dt))
        return params, model.apply

    params, apply = _model(name, cfg, make)
    return jax_runner(cfg, params, apply, note=message)


# --- equinox -----------------------------------------------------------------------------------


def equinox_impl(cfg: Config) -> Runner | None:
    """``eqx.nn.LSTMCell``/``GRUCell`` (unbatched, as equinox expects) under ``jax.lax.scan``
    over time, ``jax.vmap``-ped over the batch; reversed scans for bidirectional."""
    name = "equinox"
    if _missing(name, "equinox"):
        return None
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    classes = {"lstm": eqx.nn.LSTMCell, "gru": eqx.nn.GRUCell}
    if cfg.cell not in classes:
        return _skip(name, f"no {cfg.cell} cell (has lstm, gru)")
    dt = _jnp_dtype(cfg)
    is_lstm = cfg.cell == "lstm"

    @eqx.filter_jit
    def construct(key):
        keys = iter(jax.random.split(key, cfg.layers * cfg.directions))
        return [[classes[cfg.cell](cfg.features if layer == 0 else cfg.output_size, cfg.hidden, dtype=dt,
                                   key=next(keys))
                 for _ in range(cfg.directions)] for layer in range(cfg.layers)]

    params, static = _model(name, cfg, lambda: eqx.partition(construct(jax.random.key(0)), eqx.is_inexact_array))

    def scan(cell, seq, reverse):  # seq [T, F] -> [T, H]
        zero = jnp.zeros(cfg.hidden, dt)
        init = (zero, zero) if is_lstm else zero

        def body(carry, x):
            carry = cell(x, carry)
            return carry, carry[0] if is_lstm else carry

        return jax.lax.scan(body, init, seq, reverse=reverse)[1]

    def apply(p, xs):
        net = eqx.combine(p, static)

        def one(seq):
            for layer in net:
                seq = jnp.concatenate([scan(cell, seq, d == 1) for d, cell in enumerate(layer)], axis=-1)
            return seq

        return jax.vmap(one)(xs)

    return jax_runner(cfg, params, apply)


# --- torch ---------------------------------------------------------------------------------------


def set_torch_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


TORCH_THREADS = int(os.environ.get("RNNJAX_BENCH_TORCH_THREADS", "2"))


def torch_device():
    """CUDA when torch has it and JAX runs on a GPU too (so both run on the same device), else CPU."""
    import torch

    if torch.cuda.is_available():
        import jax

        if jax.default_backend() == "gpu":
            return torch.device("cuda")
    return torch.device("cpu")


def _torch_blocking(run: Callable[[], Any], device) -> Callable[[], Any]:
    """Makes ``run`` wait for the device, as the JAX runners do (``block_until_ready``)."""
    if device.type != "cuda":
        return run
    import torch

    def blocking():
        out = run()
        torch.cuda.synchronize(device)
        return out

    return blocking


def torch_impl(cfg: Config, *, amp: bool = False) -> Runner | None:
    """``torch.nn.LSTM``/``GRU``/``RNN`` with ``num_layers`` and ``bidirectional``, batch-first,
    ``torch.set_num_threads(TORCH_THREADS)`` (2 by default: the shared 2-core machine); on CUDA
    when JAX runs on a GPU (:func:`torch_device`). ``amp`` (``torch-amp``): float32 module and inputs run
    under ``torch.autocast(dtype=torch.bfloat16)``, PyTorch's mixed precision, whatever ``--dtype`` says."""
    name = "torch-amp" if amp else "torch"
    if _missing(name, "torch"):
        return None
    import torch

    classes = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "elman": torch.nn.RNN}
    if cfg.cell not in classes:
        return _skip(name, f"no {cfg.cell} module (has lstm, gru, elman)")
    set_torch_threads(TORCH_THREADS)
    torch.manual_seed(0)
    dt = torch.float32 if amp else getattr(torch, cfg.dtype)
    device = torch_device()
    module = classes[cfg.cell](cfg.features, cfg.hidden, num_layers=cfg.layers, bidirectional=cfg.bidirectional,
                               batch_first=True).to(device, dt)
    xs = torch.from_numpy(inputs(cfg)).to(device, dt)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if amp else contextlib.nullcontext

    if cfg.mode == "fwd":
        def run():
            with torch.no_grad(), autocast():
                return module(xs)[0]
    elif cfg.mode == "fwdbwd":
        def run():
            module.zero_grad(set_to_none=True)
            with autocast():
                out = module(xs)[0]
            out.float().sum().backward()
            return module.weight_hh_l0.grad
    elif cfg.mode == "train":
        w, b = readout_init(cfg)
        readout = torch.nn.Linear(cfg.output_size, READOUT_CLASSES).to(device, dt)
        with torch.no_grad():
            readout.weight.copy_(torch.from_numpy(w.T.copy()))
            readout.bias.copy_(torch.from_numpy(b))
        labels = torch.from_numpy(targets(cfg)).long().reshape(-1).to(device)
        optimizer = torch.optim.Adam([*module.parameters(), *readout.parameters()], lr=1e-3)
        loss_fn = torch.nn.CrossEntropyLoss()

        def run():
            optimizer.zero_grad(set_to_none=True)
            with autocast():
                logits = readout(module(xs)[0]).float()
            loss = loss_fn(logits.reshape(-1, READOUT_CLASSES), labels)
            loss.backward()
            optimizer.step()
            return loss
    else:
        raise ValueError(f"unknown mode {cfg.mode!r}")
    return Runner(_torch_blocking(run, device))


# --- float32 matmul peak -----------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def peak_runners(size: int) -> dict[str, tuple[Callable[[], Any], int]]:
    """``{name: (runner, flops)}``: a ``[size, size] x [size, size]`` float32 matmul in JAX
    (``jnp.dot``, jitted) and, if installed, ``torch.mm``; timed with the implementations."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(3)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    flops = 2 * size ** 3
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    dot = jax.jit(jnp.dot)
    out = {"jax.dot": (lambda: jax.block_until_ready(dot(ja, jb)), flops)}
    if importlib.util.find_spec("torch") is not None:
        import torch

        set_torch_threads(TORCH_THREADS)
        device = torch_device()
        ta, tb = torch.from_numpy(a).to(device), torch.from_numpy(b).to(device)
        out["torch.mm"] = (_torch_blocking(lambda: torch.mm(ta, tb), device), flops)
    return out


# --- registry -----------------------------------------------------------------------------------

IMPLS: dict[str, Callable[[Config], Runner | None]] = {
    "rnnjax": rnnjax_impl,
    "rnnjax-native": functools.partial(rnnjax_impl, backend="native", name="rnnjax-native"),
    "rnnjax-xla": functools.partial(rnnjax_impl, backend="xla", name="rnnjax-xla"),
    "rnnjax-autodiff": functools.partial(rnnjax_impl, backward="autodiff", backend="xla", name="rnnjax-autodiff"),
    "rnnjax-fused": functools.partial(rnnjax_impl, backward="fused", backend="xla", name="rnnjax-fused"),
    "rnnjax-hoisted": functools.partial(rnnjax_impl, hoist=True, backend="xla", name="rnnjax-hoisted"),
    "rnnjax-inloop": functools.partial(rnnjax_impl, hoist=False, backend="xla", name="rnnjax-inloop"),
    "rnnjax-dense": functools.partial(rnnjax_impl, dense=True, backend="xla", name="rnnjax-dense"),
    "rnnjax-native-dense": functools.partial(rnnjax_impl, dense=True, backend="native", name="rnnjax-native-dense"),
    "torch": torch_impl,
    "torch-amp": functools.partial(torch_impl, amp=True),
    "flax": flax_impl,
    "flax-lstmcell": functools.partial(flax_impl, lstm_cell="LSTMCell", name="flax-lstmcell"),
    "haiku": haiku_impl,
    "equinox": equinox_impl,
}

PEERS = ("torch", "flax", "haiku", "equinox")  # the default comparison
PACKAGES = {"torch": "torch", "torch-amp": "torch", "flax": "flax", "flax-lstmcell": "flax", "haiku": "haiku",
            "equinox": "equinox"}


def is_rnnjax(name: str) -> bool:
    return name == "rnnjax" or name.startswith("rnnjax-")


def installed(name: str) -> bool:
    package = PACKAGES.get(name)
    return package is None or importlib.util.find_spec(package) is not None


def build(name: str, cfg: Config) -> tuple[Runner | None, str | None]:
    """``(runner, None)``, ``(None, None)`` when skipped (a note was printed), or ``(None, error)``
    when the factory raised: a broken implementation is reported, not fatal to the comparison."""
    if cfg.heads > 1 and not is_rnnjax(name):
        return _skip(name, "no multi-head (block-diagonal) recurrence; --compare rnnjax-dense runs the one-head "
                           "cell in the same rounds"), None
    try:
        return IMPLS[name](cfg), None
    except Exception as error:
        return None, f"{type(error).__name__}: {error}"
