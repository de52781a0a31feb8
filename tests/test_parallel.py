"""rnnjax.parallel: the sharded train step equals the single-device one; checkpoints move between device
counts; two jax.distributed processes agree with one. Each case runs tests/parallel_worker.py in fresh
processes, which simulate CPU devices (the device count is fixed when JAX starts)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from rnnjax import parallel

WORKER = Path(__file__).with_name("parallel_worker.py")
ROOT = Path(__file__).resolve().parents[1]


def _env():
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def _worker(*args, timeout=240) -> dict:
    out = subprocess.run([sys.executable, str(WORKER), *args], capture_output=True, text=True, env=_env(),
                         timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_sharded_train_steps_equal_the_single_device_steps():
    r = _worker("steps", "--devices", "8")
    single = np.asarray(r["single"]["params"])
    for name in ("replicated", "sharded"):
        np.testing.assert_allclose(r[name]["params"], single, rtol=0, atol=1e-5)
        np.testing.assert_allclose(r[name]["losses"], r["single"]["losses"], rtol=1e-6)
        assert r[name]["batch_shards"] == 8 and r[name]["batch_shard_rows"] == 1  # 8 rows over 8 devices
    assert r["replicated"]["largest_param_shard"] == r["replicated"]["largest_param_size"] == 64 * 256
    assert r["sharded"]["largest_param_shard"] == 64 * 256 // 8  # W_hh [64, 256] split 8 ways


def test_checkpoint_saved_on_8_devices_restores_on_1_and_on_2(tmp_path):
    saved = _worker("save", "--devices", "8", "--dir", str(tmp_path))
    assert saved["devices"] == 8
    for n in (1, 2):
        restored = _worker("restore", "--devices", str(n), "--dir", str(tmp_path))
        assert restored["devices"] == n and restored["placed_on"] == [n]
        assert restored["sharded"] == (n > 1)
        np.testing.assert_array_equal(restored["params"], saved["params"])


def test_two_distributed_processes_agree_with_one(tmp_path):
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    # Output goes to files: a full pipe would stall one process, and the other waits for it at shutdown.
    logs = [(open(tmp_path / f"out{i}", "w"), open(tmp_path / f"err{i}", "w")) for i in range(2)]
    procs = [subprocess.Popen([sys.executable, str(WORKER), "process", "--process-id", str(i), "--port", str(port)],
                              stdout=out, stderr=err, env=_env()) for i, (out, err) in enumerate(logs)]
    results = []
    for i, proc in enumerate(procs):
        proc.wait(timeout=240)
        for f in logs[i]:
            f.close()
        assert proc.returncode == 0, (tmp_path / f"err{i}").read_text()[-3000:]
        results.append(json.loads((tmp_path / f"out{i}").read_text().strip().splitlines()[-1]))
    reference = _worker("steps", "--devices", "1")["single"]
    for r in results:
        assert r["processes"] == 2 and r["devices"] == 2
        np.testing.assert_allclose(r["params"], reference["params"], rtol=0, atol=1e-5)
        np.testing.assert_allclose(r["losses"], reference["losses"], rtol=1e-6)


def test_placement_rules_and_bad_input():
    mesh = parallel.make_mesh(1)
    assert parallel.param_sharding(np.zeros((256, 1024)), mesh).is_fully_replicated  # one device
    with pytest.raises(ValueError, match=re.escape(
            f"rnnjax.parallel.make_mesh: asked for {len(jax.devices()) + 2} devices, but {len(jax.devices())} are "
            "available (cpu). "
            f"Fix: pass a number from 1 to {len(jax.devices())}, or None for all of them.")):
        parallel.make_mesh(len(jax.devices()) + 2)
    with pytest.raises(ValueError, match=re.escape(
            "rnnjax.parallel.shard_batch: each batch array's first axis must divide evenly over this process's "
            "1 devices of the mesh; got shape (). Fix: use a batch size that is a multiple of 1 per process "
            "(global: a multiple of 1).")):
        parallel.shard_batch({"x": np.float32(1.0)}, mesh)
    batch = parallel.shard_batch({"x": np.arange(6.0).reshape(3, 2)}, mesh)
    np.testing.assert_array_equal(batch["x"], np.arange(6.0).reshape(3, 2))
