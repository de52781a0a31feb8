"""The benchmark CLI (benchmarks/): a quick end-to-end run, the FLOP count, bad input, interleaving, and the
ConvLSTM rows: rnnjax's runner against Flax's and Haiku's on the same weights."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import cli, config, impls, report, timing
from benchmarks.config import Config
from conftest import assert_trees_close
from rnnjax import native


def test_quick_run_writes_consistent_json_lines(tmp_path, capsys):
    path = tmp_path / "bench.jsonl"
    assert cli.main(["--quick", "--json", str(path)]) == 0
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    expected_impls = ["rnnjax"] + [p for p in impls.PEERS if impls.installed(p)]
    modes = cli.QUICK_MODES.split(",")
    assert sorted((r["impl"], r["mode"]) for r in rows) == sorted((i, m) for i in expected_impls for m in modes)

    for row in rows:
        assert row["tokens"] == row["batch"] * row["time"] == 8 * 16
        assert 0 < row["tokens_per_s_min"] <= row["tokens_per_s"] <= row["tokens_per_s_max"]
        assert row["tokens_per_s"] == pytest.approx(row["tokens"] / row["median_s"], rel=1e-12)
        assert row["flops"] == config.flops(Config(**{k: row[k] for k in (
            "batch", "time", "features", "hidden", "cell", "mode", "layers", "bidirectional")}))
        assert row["gflops"] == pytest.approx(row["flops"] / row["median_s"] / 1e9, rel=1e-12)
        assert len(row["samples_s"]) == row["rounds"] == cli.QUICK_ROUNDS
        assert row["first_call_s"] > 0
        if row["impl"] != "torch":
            assert row["memory_kind"] == "xla-planned" and row["memory_bytes"] > 0 and row["compile_s"] > 0
            # The products counted in each compiled program: a forward pass runs exactly the analytic
            # count's; rnnjax's gradients with respect to the parameters only run 5 of its 6 per step.
            if row["matmul_flops"] is None:  # the native kernels' products are not in the HLO
                assert row["impl"] == "rnnjax" and native.available() and row["matmul_gflops"] is None
                continue
            assert row["matmul_gflops"] == pytest.approx(row["matmul_flops"] / row["median_s"] / 1e9, rel=1e-12)
            if row["mode"] == "fwd":
                assert row["matmul_flops"] == row["flops"]
            if (row["impl"], row["mode"]) == ("rnnjax", "fwdbwd"):
                assert row["matmul_flops"] == row["flops"] * 5 // 6

    # Every ratio is the quotient of the two reported medians (same config and mode), against every peer.
    by_key = {(r["config"], r["mode"], r["impl"]): r for r in rows}
    for row in rows:
        peers = {i for i in expected_impls if i != "rnnjax" and i != row["impl"]}
        assert set(row["ratio_vs"]) == peers
        for other, ratio in row["ratio_vs"].items():
            other_row = by_key[(row["config"], row["mode"], other)]
            assert ratio == pytest.approx(row["tokens_per_s"] / other_row["tokens_per_s"], rel=1e-12)

    out = capsys.readouterr().out
    assert "tok/s median [min-max]" in out and "float32 matmul peak" in out


def test_lstm_flops_match_a_hand_count():
    # One layer: 2 * T * B * (F + H) * 4H = 2 * 3 * 2 * (5 + 7) * 28 = 4032 multiply-adds x 2.
    cfg = Config(batch=2, time=3, features=5, hidden=7, cell="lstm", mode="fwd")
    assert config.flops(cfg) == 4032
    assert config.flops(cfg, "fwdbwd") == 3 * 4032
    # Train adds the readout: 3 * 2 * T * B * H * C.
    assert config.flops(cfg, "train") == 3 * 4032 + 3 * 2 * 6 * 7 * config.READOUT_CLASSES
    # Two bidirectional layers: layer 1 reads F, layer 2 reads both directions (2H), each in 2 directions.
    deep = cfg._replace(layers=2, bidirectional=True)
    assert config.flops(deep) == 2 * (2 * 3 * 2 * (5 + 7) * 28) + 2 * (2 * 3 * 2 * (14 + 7) * 28)


def test_heads_divide_only_the_recurrent_flops():
    # 4 heads: 2 * T * B * (F * 4H + H * 4H / 4) = 2 * 3 * 2 * (5 * 32 + 8 * 8) = 2688.
    cfg = Config(batch=2, time=3, features=5, hidden=8, cell="lstm", mode="fwd", heads=4)
    assert config.flops(cfg) == 2688
    assert config.flops(cfg._replace(heads=1)) == 2 * 3 * 2 * (5 + 8) * 32
    assert cfg.label() == "custom lstm B2 T3 F5 H8 heads=4"
    # MGU: two gate blocks.
    assert config.flops(cfg._replace(cell="mgu", heads=1)) == 2 * 3 * 2 * (5 + 8) * 16


def test_conv_lstm_flops_count_every_window_position_at_every_grid_position():
    # B2 T3, a 4x5 grid, F=5 input and H=7 state channels, a 3x3 window: per frame and grid position,
    # 9 window positions x (5 + 7) channels x 4 gates of 7 x 2 FLOPs = 6048; x 20 positions x 6 frames.
    cfg = Config(batch=2, time=3, features=5, hidden=7, cell="conv_lstm", mode="fwd", spatial=(4, 5), kernel=3)
    assert (cfg.positions, cfg.kernel_volume, cfg.input_shape) == (20, 9, (2, 3, 4, 5, 5))
    assert config.flops(cfg) == 6048 * 20 * 6 == 725760
    assert config.flops(cfg, "fwdbwd") == 3 * 725760
    # The readout to 32 classes at every grid position of every frame: 3 x 2 x 6 frames x 20 x 7 x 32.
    assert config.flops(cfg, "train") == 3 * 725760 + 3 * 2 * 6 * 20 * 7 * 32
    # A 3-D grid 2x3x4 with a 3x3x3 window: 24 positions, 27 window positions.
    assert config.flops(cfg._replace(spatial=(2, 3, 4))) == 2 * 27 * 12 * 28 * 24 * 6
    assert cfg.label() == "custom conv_lstm B2 T3 F5 H7 4x5 k3"
    assert Config.from_dict(json.loads(json.dumps(cfg._asdict()))) == cfg


_PEER_NAMES = {"flax": (("cell", "ih"), ("cell", "hh"), "kernel", "bias"),
               "haiku": (("conv2_dlstm/input_to_hidden",), ("conv2_dlstm/hidden_to_hidden",), "w", "b")}


def _swap_f_g(a) -> np.ndarray:
    """Gates ``i, f, g, o`` (rnnjax) <-> ``i, g, f, o`` (Flax, Haiku) along the last axis: its own inverse."""
    a = np.asarray(a)
    H = a.shape[-1] // 4
    return np.concatenate([a[..., :H], a[..., 2 * H:3 * H], a[..., H:2 * H], a[..., 3 * H:]], -1)


def _to_peer(ours, impl: str) -> dict:
    """rnnjax's ConvParams as Flax's or Haiku's params; both add 1 to the forget gate themselves."""
    ih, hh, w, b = _PEER_NAMES[impl]
    shift = np.zeros(ours.b_ih.shape[-1], np.float32)
    shift[len(shift) // 4:len(shift) // 2] = 1.0
    tree: dict = {}
    for path, weight, bias in ((ih, ours.w_ih, ours.b_ih - shift), (hh, ours.w_hh, ours.b_hh)):
        node = tree
        for key in path:
            node = node.setdefault(key, {})
        node.update({w: _swap_f_g(weight), b: _swap_f_g(bias)})
    return {"params": tree} if impl == "flax" else tree


def _from_peer(tree: dict, impl: str) -> tuple[np.ndarray, ...]:
    """Flax's or Haiku's gradients in rnnjax's order: ``(w_ih, w_hh, b_ih, b_hh)``."""
    ih, hh, w, b = _PEER_NAMES[impl]
    tree = tree["params"] if impl == "flax" else tree
    nodes = []
    for path in (ih, hh):
        node = tree
        for key in path:
            node = node[key]
        nodes.append(node)
    return tuple(_swap_f_g(node[key]) for key in (w, b) for node in nodes)


def test_conv_lstm_runners_equal_flax_and_haiku_on_the_same_weights_and_count_their_flops(capsys, monkeypatch):
    """The bench's rnnjax, Flax (nn.RNN over ConvLSTMCell) and Haiku (hk.Conv2DLSTM) conv_lstm runners, given the
    same weights (random biases included), compute the same outputs and gradients on the bench's inputs; each
    compiled forward pass runs the analytic count's FLOPs (XLA's convolutions, rnnjax's im2col matmuls); torch
    and equinox, which have no ConvLSTM, are skipped with a note."""
    import jax
    import jax.numpy as jnp

    impls.clear_cache()
    monkeypatch.setattr(impls, "_NOTED", set())  # a note prints once per process; this test reads its own
    cfg = Config(batch=2, time=3, features=2, hidden=3, cell="conv_lstm", mode="fwd", spatial=(4, 5), kernel=3)
    peers = [p for p in ("flax", "haiku") if impls.installed(p)]
    if not peers:
        pytest.skip("neither flax nor haiku is installed")
    runners = {name: impls.build(name, cfg) for name in ["rnnjax", *peers, "torch", "equinox"]}
    assert runners.pop("torch") == runners.pop("equinox") == (None, None)
    out = capsys.readouterr().out
    assert "note: torch skipped: no conv_lstm module (has lstm, gru, elman)" in out
    equinox = ("no conv_lstm cell (has lstm, gru)" if impls.installed("equinox")
               else "package 'equinox' is not installed")
    assert f"note: equinox skipped: {equinox}" in out

    ours, xs = runners["rnnjax"][0]._call.args
    assert xs.shape == (2, 3, 4, 5, 2)
    rng = np.random.default_rng(5)
    ours = ours._replace(b_ih=jnp.asarray(rng.normal(size=12) * 0.3, jnp.float32),
                         b_hh=jnp.asarray(rng.normal(size=12) * 0.3, jnp.float32))
    ys = runners["rnnjax"][0]._call.jitted(ours, xs)
    assert ys.shape == (2, 3, 4, 5, 3)
    for name in peers:
        runner, error = runners[name]
        assert error is None
        own, peer_xs = runner._call.args
        theirs = _to_peer(ours, name)
        assert jax.tree.structure(theirs) == jax.tree.structure(own)
        np.testing.assert_array_equal(peer_xs, xs)
        np.testing.assert_allclose(runner._call.jitted(theirs, xs), ys, atol=1e-5, rtol=1e-5)
        runner()  # compiles the peer's own forward pass and counts its products
        assert runner.info["matmul_flops"] == config.flops(cfg) == 2 * 3 * 2 * 20 * 9 * (2 + 3) * 12

    rnnjax_runner = runners["rnnjax"][0]
    rnnjax_runner()
    assert rnnjax_runner.info["matmul_flops"] == config.flops(cfg)

    # fwdbwd: the gradients of sum(ys) w.r.t. the parameters, in rnnjax's order.
    grads = impls.build("rnnjax", cfg._replace(mode="fwdbwd"))[0]._call.jitted(ours, xs)
    for name in peers:
        theirs = impls.build(name, cfg._replace(mode="fwdbwd"))[0]._call.jitted(_to_peer(ours, name), xs)
        w_ih, w_hh, b_ih, b_hh = _from_peer(theirs, name)
        assert_trees_close((w_ih, w_hh, b_ih, b_hh), (grads.w_ih, grads.w_hh, grads.b_ih, grads.b_hh), atol=1e-4)
    impls.clear_cache()


@pytest.mark.parametrize("argv, message", [
    (["--cell", "lsmt"], "rnnjax-bench: error: unknown cell 'lsmt' in --cell; expected one of: lstm, gru, "
                         "elman, layer_norm_lstm, layer_norm_gru, jordan, gru_cho, mgu, conv_lstm."),
    (["--cell", "conv_lstm", "--preset", "C1,C2"], "rnnjax-bench: error: --cell conv_lstm runs on the "
                                                   "convolutional presets (V1), and --preset C1,C2 names none of "
                                                   "them. Fix: add one, e.g. --preset V1."),
    (["--cell", "lstm,conv_lstm", "--spatial", "8x8"], "rnnjax-bench: error: --spatial applies to the "
                                                       "convolutional cells (conv_lstm), got --cell lstm. Fix: drop "
                                                       "--spatial or run that cell separately."),
    (["--preset", "V1", "--kernel", "5"], "rnnjax-bench: error: --preset and --batch/--time/--features/--hidden/"
                                          "--spatial/--kernel are exclusive; pass a preset or a custom shape."),
    (["--compare", "torch,pytorch"], "rnnjax-bench: error: unknown implementation 'pytorch' in --compare; "
                                     "expected one of: rnnjax, rnnjax-native, rnnjax-xla, rnnjax-autodiff, "
                                     "rnnjax-fused, rnnjax-hoisted, rnnjax-inloop, rnnjax-dense, rnnjax-native-dense, "
                                     "torch, torch-amp, flax, flax-lstmcell, haiku, equinox."),
    (["--mode", "fwd,backward"], "rnnjax-bench: error: unknown mode 'backward' in --mode; "
                                 "expected one of: fwd, fwdbwd, train."),
    (["--rounds", "3"], "rnnjax-bench: error: --rounds must be >= 5 for a measurement (got 3); "
                        "use --quick for a smoke test."),
    (["--cell", "lstm,mgu", "--heads", "4"], "rnnjax-bench: error: --heads 4 applies to the cells lstm, gru, "
                                             "gru_cho, elman, got --cell mgu. Fix: drop --heads or choose one of "
                                             "those cells."),
    (["--hidden", "30", "--heads", "4"], "rnnjax-bench: error: --heads 4 must divide the hidden size, got 30 "
                                         "(custom lstm B64 T128 F256 H30 heads=4). Fix: pass a --hidden that is a "
                                         "multiple of 4."),
])
def test_bad_names_exit_2_with_a_clear_message(argv, message, capsys):
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == message
    assert captured.out == ""


def test_each_cell_runs_on_the_presets_of_its_kind(capsys):
    def groups(*argv):
        return [(g.preset, g.cell, g.shape()) for g in cli.resolve(cli.build_parser().parse_args(list(argv)))["groups"]]

    assert groups("--cell", "lstm,conv_lstm") == [("C1", "lstm", "B64 T128 F256 H256"),
                                                  ("V1", "conv_lstm", "B16 T19 F16 H32 8x8 k3")]
    assert groups("--cell", "conv_lstm", "--preset", "all") == [("V1", "conv_lstm", "B16 T19 F16 H32 8x8 k3")]
    assert [g[0] for g in groups("--preset", "all")] == ["C1", "C2", "C3", "C4"]
    assert groups("--cell", "conv_lstm", "--quick") == [("quick", "conv_lstm", "B4 T8 F4 H8 4x4 k3")]
    assert groups("--cell", "conv_lstm", "--batch", "2", "--spatial", "6x7x8", "--kernel", "1") == [
        ("custom", "conv_lstm", "B2 T19 F16 H32 6x7x8 k1")]
    assert cli.main(["--spatial", "8x0"]) == 2
    assert "argument --spatial: expected 1 to 3 positive sides joined by 'x' (e.g. 8x8), got '8x0'" \
        in capsys.readouterr().err
    assert cli.main(["--list"]) == 0
    listing = capsys.readouterr().out
    assert "cells: lstm, gru, elman, layer_norm_lstm, layer_norm_gru, jordan, gru_cho, mgu, conv_lstm\n" in listing
    assert "spatial presets: V1 (B16 T19 F16 H32 8x8 k3)\n" in listing


def test_measure_interleaves_in_rotating_order():
    calls = []
    runners = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    results = timing.measure(runners, rounds=4, warmup=1)
    # First (compile) call and one warm-up per runner, then rounds rotated left by one each time.
    assert calls[:6] == ["a", "a", "b", "b", "c", "c"]
    assert calls[6:] == list("abc" "bca" "cab" "abc")
    assert all(len(r["samples_s"]) == 4 for r in results.values())


def test_measure_statistics_and_failures():
    durations = {"fast": [1, 1, 1, 2, 3], "slow": [4, 9, 5, 6, 7]}  # first call, then 4 rounds (warmup=0)
    now = [0.0]

    def clock():
        return now[0]

    def runner(name):
        seq = iter(durations[name])

        def run():
            now[0] += next(seq)
        return run

    def broken():
        raise RuntimeError("no XLA today")

    results = timing.measure({"fast": runner("fast"), "slow": runner("slow"), "broken": broken},
                             rounds=4, warmup=0, clock=clock)
    assert results["fast"] == dict(first_call_s=1, median_s=1.5, min_s=1, max_s=3, samples_s=[1, 1, 2, 3])
    assert results["slow"]["first_call_s"] == 4 and results["slow"]["median_s"] == 6.5
    assert results["broken"] == {"error": "RuntimeError: no XLA today"}


def test_ratios_are_quotients_of_medians():
    rows = [dict(impl=i, config="c", mode="fwd", tokens_per_s=t)
            for i, t in [("rnnjax", 300.0), ("rnnjax-hoisted", 600.0), ("torch", 200.0), ("flax", 400.0)]]
    report.add_ratios(rows)
    r = {row["impl"]: row["ratio_vs"] for row in rows}
    assert r["rnnjax"] == {"torch": 1.5, "flax": 0.75}
    assert r["rnnjax-hoisted"] == {"rnnjax": 2.0, "torch": 3.0, "flax": 1.5}
    assert r["torch"] == {"flax": 0.5}


def test_long_subcommand_reports_less_planned_memory_with_remat(capsys):
    rows = {}
    for remat in ("none", "8"):
        assert cli.main(["long", "--one", f"64:{remat}", "--batch", "2", "--features", "8", "--hidden", "32"]) == 0
        rows[remat] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rows["none"]["T"] == rows["8"]["T"] == 64 and rows["8"]["remat"] == 8
    # 64 stored steps of [2, 32] (h, c and the gates) against 8 stored carries + one 8-step chunk.
    assert rows["8"]["planned_peak_mib"] < rows["none"]["planned_peak_mib"]


def test_profile_scales_each_matmul_by_torch_mm_over_xla_for_its_shape():
    """An op's time is divided by torch.mm's speed-up on its shape alone (not replaced by torch's full
    time, which would charge an asynchronous matmul whose event under-counts its work in full)."""
    from benchmarks import profile

    ops = [dict(phase="forward scan", dots=[(16, 512, 2048)], ms_per_step=10.0, flops_per_step=1e12),
           dict(phase="backward, outside loops", dots=[(512, 8192, 2048)], ms_per_step=4.0, flops_per_step=1e12),
           dict(phase="forward scan", dots=[], ms_per_step=3.0, flops_per_step=0)]
    rates = [dict(shape=(16, 512, 2048), xla_gflops=100.0, torch_gflops=200.0),
             dict(shape=(512, 8192, 2048), xla_gflops=250.0, torch_gflops=300.0)]
    s = profile.summarise(dict(wall_ms=20.0, ops=ops), None, rates)
    assert s["matmul_ms"] == 14.0 and s["other_ms"] == 3.0
    assert s["matmul_at_torch_rate_ms"] == pytest.approx(10.0 / 2 + 4.0 * 250 / 300)
    assert s["phases"] == {"forward scan": 13.0, "backward, outside loops": 4.0}


def test_profile_counts_every_matmul_of_the_train_step(tmp_path):
    """The per-op profile's matmuls, found in the compiled HLO and the trace, add up to the analytic FLOPs."""
    import os
    import subprocess
    import sys

    from benchmarks import profile

    cfg = Config(batch=8, time=16, features=32, hidden=32, cell="lstm", mode="train", preset="quick")
    env = {**os.environ, "XLA_FLAGS": profile.TRACEME_FLAG}
    out = subprocess.run([sys.executable, "-m", "benchmarks.profile", "--child", json.dumps(cfg._asdict()),
                          "--steps", "2"], capture_output=True, text=True, env=env, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    matmul_flops = sum(2 * m * k * n * op["calls_per_step"] for op in result["ops"] for m, k, n in op["dots"])
    # Gradients are taken w.r.t. the parameters only: the input gradient (2 T B G F) is never computed.
    assert matmul_flops == config.flops(cfg) - 2 * cfg.time * cfg.batch * 4 * cfg.hidden * cfg.features
    # B=8: in-loop input projection and the fused backward pass (rnnjax.scan.should_hoist / should_fuse).
    in_loop = sorted((op["phase"], tuple(map(tuple, op["dots"])), op["calls_per_step"])
                     for op in result["ops"] if op["dots"] and "scan" in op["phase"])
    assert in_loop == [("backward scan", ((8, 128, 32),), 16.0),
                       ("forward scan", ((8, 32, 128),), 16.0), ("forward scan", ((8, 32, 128),), 16.0)]
    assert result["wall_ms"] > 0 and all(op["ms_per_step"] > 0 for op in result["ops"])


def test_compiled_matmul_flops_counts_loop_trips_and_the_larger_branch():
    import jax
    import jax.numpy as jnp

    from benchmarks.hlo import compiled_matmul_flops

    def f(a, x):
        looped = jax.lax.fori_loop(0, 5, lambda i, c: jnp.tanh(c @ a), a)  # 5 x [4,4] @ [4,4]
        branch = jax.lax.cond(x > 0, lambda: jnp.sum(a @ a), lambda: jnp.sum(a[:2] @ a))  # the larger: [4,4] @ [4,4]
        return looped, branch

    text = jax.jit(f).lower(jnp.ones((4, 4)), 1.0).compile().as_text()
    assert compiled_matmul_flops(text) == 5 * 2 * 4 ** 3 + 2 * 4 ** 3


def test_compiled_matmul_flops_refuses_a_loop_of_unknown_length():
    import jax
    import jax.numpy as jnp

    from benchmarks.hlo import compiled_matmul_flops

    def f(a, n):
        return jax.lax.while_loop(lambda c: c[1] < n, lambda c: (c[0] @ a, c[1] + 1), (a, 0))[0]

    text = jax.jit(f).lower(jnp.ones((4, 4)), 3).compile().as_text()
    with pytest.raises(ValueError, match=r"^rnnjax-bench profile: a loop has no known trip count; expected only "
                                         r"loops of static length \(lax.scan, fori_loop\), got: "):
        compiled_matmul_flops(text)
