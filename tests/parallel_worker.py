"""A worker for tests/test_parallel.py: runs in its own process, with its own device count.

    python tests/parallel_worker.py SCENARIO --devices N [--dir D] [--process-id I --port P]

Prints one JSON line. Scenarios:
  steps      two train steps on 1 device, on an N-device mesh (replicated), and sharded (FSDP):
             the params and losses of each, and how the arrays were placed
  save       two sharded train steps on N devices, then a checkpoint in --dir
  restore    that checkpoint restored onto an N-device mesh (sharded when N > 1)
  process    one of two jax.distributed processes (1 CPU device each), two steps on half the batch each
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("scenario")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--dir")
    p.add_argument("--process-id", type=int)
    p.add_argument("--port", type=int)
    args = p.parse_args()
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    import jax

    if args.scenario == "process":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        from rnnjax import parallel

        parallel.initialize(coordinator_address=f"localhost:{args.port}", num_processes=2,
                            process_id=args.process_id)
    import jax.numpy as jnp
    import numpy as np
    import optax

    import rnnjax
    from rnnjax import checkpoint, parallel, train

    B, T, F, H, C = 8, 6, 5, 64, 7
    cell = rnnjax.cells.lstm(H)
    rng = np.random.default_rng(0)
    batches = [dict(x=rng.normal(size=(B, T, F)).astype(np.float32),
                    y=rng.integers(0, C, size=(B, T)).astype(np.int32)) for _ in range(2)]

    def init(key):
        k1, k2 = jax.random.split(key)
        return (cell.init(k1, F), jax.random.normal(k2, (H, C)) / 8)

    def loss_fn(params, batch, key):
        del key
        rnn, w = params
        ys = rnnjax.unroll(cell, rnn, batch["x"])[1]
        return optax.softmax_cross_entropy_with_integer_labels(ys @ w, batch["y"]).mean()

    optimizer = optax.adam(1e-2)

    def fresh_state():
        return train.init_train_state(init(jax.random.key(0)), optimizer, jax.random.key(1))

    step = train.make_train_step(loss_fn, optimizer)

    def flat(state):
        return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree_util.tree_leaves(state.params)]).tolist()

    def run(mesh, shard_params):
        state = parallel.put_state(fresh_state(), mesh, shard_params=shard_params)
        sharded_step = parallel.data_parallel(step, state, mesh, shard_params=shard_params)
        losses = []
        for batch in batches:
            if jax.process_count() > 1:  # this process's half of the rows
                half = B // 2
                batch = {k: v[args.process_id * half:(args.process_id + 1) * half] for k, v in batch.items()}
            global_batch = parallel.shard_batch(batch, mesh)
            state, metrics = sharded_step(state, global_batch)
            losses.append(float(metrics["loss"]))
        return state, losses, global_batch

    if args.scenario == "steps":
        plain = fresh_state()
        plain_losses = []
        for batch in batches:
            plain, metrics = step(plain, {k: jnp.asarray(v) for k, v in batch.items()})
            plain_losses.append(float(metrics["loss"]))
        out = dict(single=dict(params=flat(plain), losses=plain_losses))
        mesh = parallel.make_mesh()
        for name, shard in (("replicated", False), ("sharded", True)):
            state, losses, global_batch = run(mesh, shard)
            w_hh = state.params[0].w_hh if hasattr(state.params[0], "w_hh") else jax.tree_util.tree_leaves(
                state.params[0])[0]
            out[name] = dict(params=flat(state), losses=losses,
                             batch_shards=len(global_batch["x"].addressable_shards),
                             batch_shard_rows=global_batch["x"].addressable_shards[0].data.shape[0],
                             largest_param_shard=max(s.data.size for s in w_hh.addressable_shards),
                             largest_param_size=int(w_hh.size))
        print(json.dumps(out))
    elif args.scenario == "save":
        state, losses, _ = run(parallel.make_mesh(), True)
        with checkpoint.Checkpointer(args.dir, async_save=False) as ckpt:
            ckpt.save(2, state)
        print(json.dumps(dict(params=flat(state), devices=len(jax.devices()))))
    elif args.scenario == "restore":
        mesh = parallel.make_mesh()
        target = parallel.abstract_state(jax.eval_shape(fresh_state), mesh, shard_params=args.devices > 1)
        with checkpoint.Checkpointer(args.dir, read_only=True) as ckpt:
            state, _, _ = ckpt.restore(2, target)
        leaves = jax.tree_util.tree_leaves(state.params)
        print(json.dumps(dict(params=flat(state), devices=len(jax.devices()),
                              placed_on=sorted({len(x.sharding.device_set) for x in leaves}),
                              sharded=any(not x.sharding.is_fully_replicated for x in leaves))))
    elif args.scenario == "process":
        state, losses, _ = run(parallel.make_mesh(), False)
        print(json.dumps(dict(params=flat(state), losses=losses, processes=jax.process_count(),
                              devices=len(jax.devices()))))
    else:
        raise SystemExit(f"unknown scenario {args.scenario!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
