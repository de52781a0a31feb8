"""``rnnjax-bench parallel``: a tiny end-to-end run, the crossover rule, bad input (and `population`'s)."""

from __future__ import annotations

import json

import pytest

from benchmarks import cli, parallel, population


def test_tiny_run_writes_rows_whose_speedup_is_the_ratio_of_medians(tmp_path, capsys):
    path = tmp_path / "par.jsonl"
    assert cli.main(["parallel", "--cell", "mingru", "--time", "4,8", "--batch", "2", "--features", "3",
                     "--hidden", "4", "--rounds", "2", "--json", str(path)]) == 0
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["cell"], r["T"]) for r in rows] == [("mingru", 4), ("mingru", 8)]
    for row in rows:
        assert row["speedup"] == pytest.approx(row["sequential_s"] / row["associative_s"], rel=1e-12)
        assert row["loop_speedup"] == pytest.approx(row["sequential_s"] / row["loop_s"], rel=1e-12)
        assert len(row["associative_samples_s"]) == len(row["loop_samples_s"]) == len(row["sequential_samples_s"]) == 2
        assert row["associative_peak_mib"] > 0 and row["sequential_compile_s"] > 0
        # minGRU's only matmul is the projection x [T*B, F] @ W [F, 2H]: forward, dx and dW
        assert row["matmul_flops"] == 3 * 2 * row["T"] * 2 * 3 * (2 * 4)
        rate = max(row["peak_flops"], row["projection_flops"])
        assert row["max_speedup"] == pytest.approx(row["sequential_s"] * rate / row["matmul_flops"], rel=1e-12)
        assert row["projection_flops"] > 0 and "projection_s" not in row
    assert "mingru crossover: associative faster than sequential from T = " in capsys.readouterr().out


def test_matmul_flops_counts_products_in_scans_conds_and_gradients():
    import jax
    import jax.numpy as jnp

    x, w = jnp.ones((5, 3)), jnp.ones((3, 7))
    assert parallel.matmul_flops(lambda x, w: x @ w, x, w) == 2 * 5 * 3 * 7
    # the gradient adds dx = g W^T and dW = x^T g
    assert parallel.matmul_flops(jax.grad(lambda x, w: jnp.sum(x @ w), argnums=(0, 1)), x, w) == 3 * 2 * 5 * 3 * 7
    xs = jnp.ones((11, 5, 3))
    looped = jax.grad(lambda xs, w: jnp.sum(jax.lax.scan(lambda c, x: (c, x @ w), 0.0, xs)[1]), argnums=(0, 1))
    assert parallel.matmul_flops(looped, xs, w) == 11 * 3 * 2 * 5 * 3 * 7
    assert parallel.matmul_flops(lambda x, w: (x + 1j) @ w.astype(jnp.complex64), x, w) == 4 * 2 * 5 * 3 * 7
    branches = jax.jit(lambda p, x, w: jax.lax.cond(p, lambda: jnp.sum(x @ w), lambda: jnp.sum(x)))
    assert parallel.matmul_flops(branches, True, x, w) == 2 * 5 * 3 * 7


def test_matmul_flops_refuses_a_while_loop():
    import re

    import jax

    def counted(x):
        return jax.lax.while_loop(lambda c: c < 3, lambda c: c + 1, x)

    with pytest.raises(ValueError, match=re.escape(
            "benchmarks.parallel.matmul_flops: a while loop's trip count is unknown; expected only scans "
            "(lax.scan), conds and calls.")):
        parallel.matmul_flops(counted, 0)


def test_crossover_is_where_parallel_stays_faster():
    rows = [dict(T=t, speedup=s) for t, s in [(16, 1.2), (32, 0.9), (64, 1.1), (128, 2.0)]]
    assert parallel.crossover(rows) == 64
    assert parallel.crossover([dict(T=16, speedup=0.5)]) is None


def test_bad_cell_is_one_line_and_status_2(capsys):
    assert cli.main(["parallel", "--cell", "lstm"]) == 2
    assert capsys.readouterr().err == ("rnnjax-bench parallel: error: unknown --cell lstm; expected a comma list of "
                                       "lru, mingru, minlstm, rglru.\n")


def test_adding_problem_batch_marks_one_step_in_each_half_and_sums_them():
    import numpy as np

    from benchmarks import long_memory

    x, y = long_memory.adding_batch(np.random.default_rng(0), 50, 20)
    marks = x[..., 1]
    assert x.shape == (50, 20, 2) and set(np.unique(marks)) == {0.0, 1.0}
    assert (marks[:, :10].sum(1) == 1).all() and (marks[:, 10:].sum(1) == 1).all()
    np.testing.assert_allclose(y, [x[b, marks[b] == 1, 0].sum() for b in range(50)], rtol=1e-6)


def test_memory_tiny_run_reports_the_held_out_mse(tmp_path, capsys):
    path = tmp_path / "mem.jsonl"
    assert cli.main(["memory", "--cell", "mingru", "--time", "6", "--steps", "4", "--batch", "4", "--hidden", "4",
                     "--evals", "2", "--json", str(path)]) == 0
    (row,) = [json.loads(line) for line in path.read_text().splitlines()]
    assert [i for i, _ in row["curve"]] == [2, 4] and row["test_mse"] == row["curve"][-1][1] > 0
    assert "mingru  final " in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["population", "--members", "1"], "rnnjax-bench population: error: expected --members >= 2, --rounds >= 1 and "
                                       "positive --hidden; got --members 1 --rounds 7 --hidden 16,32,64,128,256"),
    (["population", "--sweep", "100,x"], "rnnjax-bench population: error: --sweep expects comma-separated positive "
                                         "step counts, e.g. 100,1000; got '100,x'"),
])
def test_bench_population_bad_input_exits_2(argv, message, capsys):
    assert cli.main(argv) == 2
    assert capsys.readouterr().err.strip() == message


def test_bench_population_ratios_are_quotients_of_the_medians(capsys):
    row = population.measure(2, 4, 2, 3, rounds=3)
    assert row["vmap_speedup"] == row["sequential_s"] / row["vmap_s"]
    assert row["map_speedup"] == row["sequential_s"] / row["map_s"]
    assert row["bound"] == row["sequential_s"] / row["batched_s"]
    assert cli.main(["population", "--members", "2", "--hidden", "4", "--batch", "2", "--time", "3",
                     "--rounds", "3"]) == 0
    header, line = capsys.readouterr().out.strip().splitlines()[-2:]
    assert header.split()[-1] == "bound" and line.split()[:4] == ["2", "4", "2", "3"] and len(line.split()) == 15
