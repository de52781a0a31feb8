"""Data-parallel and sharded training on a ``jax.sharding`` mesh, on one process or many.

The train step stays the one :func:`rnnjax.train.make_train_step` builds;
this module only says where the arrays live and lets XLA (GSPMD) insert the
collectives::

    mesh = parallel.make_mesh()                        # every device, one "data" axis
    state = parallel.put_state(state, mesh)            # replicated (shard_params=True: FSDP-style)
    step = parallel.data_parallel(train_step, state, mesh)
    state, metrics = step(state, parallel.shard_batch(batch, mesh))

- The batch is split along its first axis over the mesh; the mean loss over
  the global batch, and so the gradients and the update, equal the
  single-device step's (to float32 reduction order).
- ``shard_params=True`` splits each parameter and its optimiser moments
  along their largest axis that the device count divides (replicating what
  does not divide): memory per device falls with the device count.
- Several processes (hosts, or local processes with ``jax.distributed``):
  call :func:`initialize` first; each process passes its own part of the
  batch to :func:`shard_batch`.
- Checkpoints (:mod:`rnnjax.checkpoint`) save sharded state and restore it on
  any device count: pass an abstract state whose leaves carry the new
  shardings (:func:`abstract_state`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rnnjax._checks import is_int
from rnnjax.data.sequences import BatchesView

AXIS = "data"
# Parameters smaller than this stay replicated under shard_params=True: splitting them saves
# little memory and costs a gather each step.
MIN_SHARD_SIZE = 2**14


def initialize(**kwargs) -> bool:
    """Starts JAX's multi-process runtime when there is more than one process; returns whether it did.

    With ``kwargs`` (``coordinator_address``, ``num_processes``,
    ``process_id``, ...) they go to ``jax.distributed.initialize``. Without,
    it is called with no arguments (JAX detects the cluster) on a Cloud TPU
    VM with several hosts or in a SLURM job with more than one task, and is
    skipped otherwise (a single process needs nothing).
    """
    if kwargs:
        jax.distributed.initialize(**kwargs)
        return True
    slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1
    tpu_pod = len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1
    if slurm or tpu_pod:
        jax.distributed.initialize()
        return True
    return False


def make_mesh(devices: int | Sequence[jax.Device] | None = None) -> Mesh:
    """A one-axis (``"data"``) mesh over ``devices``: all of them (every process's) by default, the first
    ``n`` for an int, or the given list."""
    fn = "rnnjax.parallel.make_mesh"
    available = jax.devices()
    if devices is None:
        chosen = available
    elif is_int(devices):
        if not 1 <= devices <= len(available):
            raise ValueError(f"{fn}: asked for {devices} devices, but {len(available)} are available "
                             f"({available[0].platform}). Fix: pass a number from 1 to {len(available)}, or None "
                             "for all of them.")
        chosen = available[:devices]
    else:
        chosen = list(devices)
        if not chosen:
            raise ValueError(f"{fn}: got an empty device list. Fix: pass None for every device.")
    return Mesh(np.asarray(chosen), (AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The first axis split over the mesh, the rest whole."""
    return NamedSharding(mesh, PartitionSpec(AXIS))


def param_sharding(x, mesh: Mesh) -> NamedSharding:
    """FSDP-style placement of one array: its largest axis that the device count divides, split over the
    mesh; replicated when it is small (< :data:`MIN_SHARD_SIZE` elements) or no axis divides."""
    n = mesh.devices.size
    shape = np.shape(x)
    if n == 1 or int(np.prod(shape, dtype=np.int64)) < MIN_SHARD_SIZE:
        return replicated(mesh)
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % n == 0:
            spec = [None] * len(shape)
            spec[axis] = AXIS
            return NamedSharding(mesh, PartitionSpec(*spec))
    return replicated(mesh)


def state_shardings(state, mesh: Mesh, *, shard_params: bool = False):
    """The sharding of every leaf of ``state`` (a :class:`~rnnjax.train.TrainState` or any pytree):
    replicated, or :func:`param_sharding` for each array (parameters and the optimiser's moments alike)."""
    if not shard_params:
        return jax.tree_util.tree_map(lambda _: replicated(mesh), state)
    return jax.tree_util.tree_map(lambda x: param_sharding(x, mesh), state)


def put_state(state, mesh: Mesh, *, shard_params: bool = False):
    """``state`` placed on the mesh (every process must pass the same values)."""
    shardings = state_shardings(state, mesh, shard_params=shard_params)
    if mesh.is_multi_process:  # device_put reaches only this process's devices; a jitted copy reaches all
        return jax.jit(lambda s: s, out_shardings=shardings)(state)
    return jax.device_put(state, shardings)


def abstract_state(state, mesh: Mesh, *, shard_params: bool = False):
    """``ShapeDtypeStruct``s of ``state`` carrying their shardings on ``mesh``: the target that makes
    :meth:`rnnjax.checkpoint.Checkpointer.restore` place a checkpoint on this mesh, whatever device count
    it was saved from."""
    shardings = state_shardings(state, mesh, shard_params=shard_params)
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
                                  state, shardings)


def shard_batch(batch, mesh: Mesh):
    """Global arrays split along the first axis over ``mesh`` from this process's part of the batch.

    On one process ``batch`` is the whole batch; with several, each passes
    its own rows (in process order) and the global batch is their
    concatenation. The rows on this process must divide evenly over its
    devices of the mesh.
    """
    fn = "rnnjax.parallel.shard_batch"
    sharding = batch_sharding(mesh)
    local = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)

    def put(x):
        x = np.asarray(x)
        if x.ndim == 0 or x.shape[0] % local:
            raise ValueError(f"{fn}: each batch array's first axis must divide evenly over this process's "
                             f"{local} devices of the mesh; got shape {x.shape}. Fix: use a batch size that "
                             f"is a multiple of {local} per process (global: a multiple of {mesh.devices.size}).")
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree_util.tree_map(put, batch)


def data_parallel(train_step: Callable, state, mesh: Mesh, *, shard_params: bool = False,
                  carry: bool = False) -> Callable:
    """``train_step`` (from :func:`rnnjax.train.make_train_step`) compiled for ``mesh``.

    ``state`` fixes the state's placement (as :func:`put_state`); batches
    (and the TBPTT carry with ``carry=True``) are split along their first
    axis. The state (and carry) are donated, as by ``make_train_step``.
    """
    state_sh = state_shardings(state, mesh, shard_params=shard_params)
    data = batch_sharding(mesh)
    if carry:
        return jax.jit(train_step, in_shardings=(state_sh, data, data), out_shardings=(state_sh, data, None),
                       donate_argnums=(0, 2))
    return jax.jit(train_step, in_shardings=(state_sh, data), out_shardings=(state_sh, None), donate_argnums=0)


class ShardedBatches(BatchesView):
    """An iterator of batches whose every batch is split over ``mesh`` (:func:`shard_batch`); the
    wrapped iterator's ``position`` (the step it yields next, if it has one) reads and sets through."""

    def __init__(self, batches, mesh: Mesh):
        super().__init__(batches)
        self.mesh = mesh

    def __next__(self):
        return shard_batch(next(self.batches), self.mesh)


def distribute(train_step: Callable, state, batches, mesh: Mesh, *, carry=None, shard_params: bool = False):
    """Everything a training loop needs to run on ``mesh``: ``(train_step, state, batches, carry)``
    with the step compiled for the mesh (:func:`data_parallel`), the state placed, the batches (and a
    TBPTT ``carry``, if given) split over the devices."""
    state = put_state(state, mesh, shard_params=shard_params)
    step = data_parallel(train_step, state, mesh, shard_params=shard_params, carry=carry is not None)
    if carry is not None:
        carry = shard_batch(jax.device_get(carry), mesh)
    return step, state, ShardedBatches(batches, mesh), carry


def local_devices_summary(mesh: Mesh) -> str:
    """One line for logs: devices, platform, processes."""
    devices = list(mesh.devices.flat)
    processes = len({d.process_index for d in devices})
    return (f"{len(devices)} {devices[0].platform} device{'s' if len(devices) > 1 else ''}"
            + (f" over {processes} processes" if processes > 1 else ""))


__all__ = ["AXIS", "ShardedBatches", "abstract_state", "batch_sharding", "data_parallel", "distribute", "initialize",
           "local_devices_summary", "make_mesh", "param_sharding", "put_state", "replicated", "shard_batch",
           "state_shardings"]
