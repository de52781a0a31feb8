"""rnnjax train classify|digits|forecast|adding|copy: the shared engine end to end on tiny runs."""

import json

import jax
import numpy as np

from rnnjax import checkpoint, cli, data, models


def _tiny_ts(tmp_path, seed=0):
    rng = np.random.default_rng(seed)
    header = ("@problemName Toy\n@timeStamps false\n@missing true\n@univariate false\n@dimensions 2\n"
              "@equalLength false\n@classLabel true up down\n@data\n")
    for split, n in (("TRAIN", 24), ("TEST", 10)):
        lines = []
        for i in range(n):
            label = ("up", "down")[i % 2]
            T = int(rng.integers(3, 9))
            ramp = np.arange(T) * (1 if label == "up" else -1)
            dims = [ramp + rng.normal(size=T) * 0.1, rng.normal(size=T)]
            vals = [",".join(f"{v:.3f}" for v in d) for d in dims]
            if i == 3:
                vals[1] = "?," + vals[1].split(",", 1)[1]
            lines.append(":".join(vals) + f":{label}")
        (tmp_path / f"Toy_{split}.ts").write_text(header + "\n".join(lines) + "\n")
    return tmp_path / "Toy_TRAIN.ts"


def _best(out, model):
    """The parameters of a run's best checkpoint (the ones its test metrics are computed with) and its step."""
    ckpt, step = checkpoint.open_run(out, which="best")
    params, _ = ckpt.restore_params(step, jax.eval_shape(model.init, jax.random.key(0)))
    ckpt.close()
    return params, step


def _test_record(out):
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["split"] == "test"
    return record


def test_cli_classify_end_to_end_test_metrics_match_the_best_checkpoint(tmp_path, capsys):
    path = _tiny_ts(tmp_path)
    out = tmp_path / "run"
    rc = cli.main(["train", "classify", "--dataset", str(path), "--steps", "6", "--evals", "2", "--hidden", "4",
                   "--batch", "4", "--val-fraction", "0.25", "--out", str(out)])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records[:-1]] == [3, 6] and all("val_accuracy" in r for r in records[:-1])
    test = records[-1]
    assert test["split"] == "test" and test["test_accuracy"] == printed["test_accuracy"]
    assert (out / "confusion.png").read_bytes()[:4] == b"\x89PNG"

    # Independently: the best checkpoint's parameters on the test file, scaled with the stored
    # training statistics, give the reported accuracy.
    ckpt, step = checkpoint.open_run(out, which="best")
    meta = ckpt.read_meta(step)
    model = models.classifier(2, input_size=2, cell="lstm", hidden=4, bidirectional=True, pooling="mean")
    params, _ = ckpt.restore_params(step, jax.eval_shape(model.init, jax.random.key(0)))
    ckpt.close()
    assert step == test["step"] and meta["classes"] == ["up", "down"]
    d = data.read_ts(tmp_path / "Toy_TEST.ts", classes=meta["classes"])
    scaler = data.Scaler(np.asarray(meta["scaler"]["mean"], np.float32), np.asarray(meta["scaler"]["std"], np.float32))
    x = scaler.transform(data.fill_missing(d["x"], d["lengths"]), d["lengths"])
    pred = np.argmax(model.apply(params, x, lengths=d["lengths"]), -1)
    assert abs(np.mean(pred == d["y"]) - test["test_accuracy"]) < 1e-6

    # `rnnjax eval` reads the task from the run's config: the best checkpoint's validation and test
    # metrics again, as the training run recorded them.
    capsys.readouterr()
    assert cli.main(["eval", "--checkpoint", str(out)]) == 0
    again = json.loads(capsys.readouterr().out)
    best = next(r for r in records if r["step"] == step)
    assert again["step"] == step and abs(again["val_accuracy"] - best["val_accuracy"]) < 1e-5
    assert abs(again["val_loss"] - best["val_loss"]) < 1e-5 and again["test_accuracy"] == test["test_accuracy"]
    assert cli.main(["generate", "--checkpoint", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"rnnjax: error: rnnjax generate: {str(out)!r} is a run of `rnnjax train classify`, which generates nothing. "
        "Fix: use rnnjax eval on it, or point at a charlm, g2p or music run.\n")


def test_cli_task_bad_input_exits_2_with_one_line(tmp_path, capsys):
    assert cli.main(["train", "classify", "--dataset", "mnist", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert err == ("rnnjax: error: rnnjax train classify: rnnjax.data.load_classification: unknown dataset 'mnist'; "
                   "known: japanese_vowels, gunpoint, basic_motions, arrow_head, italy_power_demand, digits. Fix: "
                   "pass one of those, or the path of a UCR/UEA _TRAIN.ts file.\n")
    assert not (tmp_path / "a").exists()


def test_cli_forecast_baselines_match_numpy(tmp_path, capsys):
    out = tmp_path / "fc"
    assert cli.main(["train", "forecast", "--window", "48", "--hidden", "4", "--steps", "2", "--evals", "1",
                     "--no-plot", "--out", str(out)]) == 0
    m = json.loads(capsys.readouterr().out)
    y = data.load_series("taylor")["values"].astype(np.float64)
    start = int(round(len(y) * 0.8))
    origins = np.arange(start, len(y) - 48 + 1)
    target = y[origins[:, None] + np.arange(48)]
    naive = y[origins[:, None] + np.arange(48) - 48]  # the same half-hour one day earlier
    assert m["test_windows"] == len(origins)
    assert abs(m["seasonal_naive_rmse"] - np.sqrt(np.mean((naive - target) ** 2))) < 1e-2
    assert abs(m["vs_ridge"] - m["test_rmse"] / m["ridge_rmse"]) < 1e-5
    assert not (out / "forecast.png").exists()

    # Independently: the series scaled with the mean and deviation of its fitting part (the first 90% of the
    # part before the test part), the best checkpoint's forecasts of the test windows, and ridge regression on
    # the same scaled windows plus a bias (least squares on the penalty's extra rows, its penalty chosen on the
    # validation windows, refitted on training and validation), both in the series' own units.
    val_start = int(round(start * 0.9))
    mean, sd = y[:val_start].mean(), y[:val_start].std()
    z = (y - mean) / sd

    def windows(first, stop):
        o = np.arange(first, stop - 48 + 1)
        return z[o[:, None] - 48 + np.arange(48)], z[o[:, None] + np.arange(48)]

    (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = windows(48, val_start), windows(val_start, start), windows(start, len(y))
    model = models.forecaster(48, hidden=4)
    params, _ = _best(out, model)
    pred = np.asarray(jax.jit(model.forecast, static_argnums=2)(params, x_te[..., None].astype(np.float32), 48),
                      np.float64)
    assert abs(np.sqrt(np.mean((pred - y_te) ** 2)) * sd / m["test_rmse"] - 1) < 1e-5
    errors = {lam: np.mean((_ridge(x_tr, y_tr, lam, x_va) - y_va) ** 2) for lam in (1e-3, 1e-2, 1e-1, 1, 10, 100)}
    lam = min(errors, key=errors.get)
    ridge = _ridge(np.r_[x_tr, x_va], np.r_[y_tr, y_va], lam, x_te)
    assert m["ridge_lambda"] == lam
    assert abs(np.sqrt(np.mean((ridge - y_te) ** 2)) * sd / m["ridge_rmse"] - 1) < 1e-5


def _ridge(x, y, lam, x_eval):
    """Ridge regression of ``y`` on ``x`` and a bias (not penalised), as the least-squares solution of ``x``
    stacked on ``sqrt(lam) * I`` (targets 0 for those rows): no normal equations."""
    a = np.c_[x, np.ones(len(x))]
    penalty = np.c_[np.sqrt(lam) * np.eye(x.shape[1]), np.zeros(x.shape[1])]
    w = np.linalg.lstsq(np.r_[a, penalty], np.r_[y, np.zeros((x.shape[1], y.shape[1]))], rcond=None)[0]
    return np.c_[x_eval, np.ones(len(x_eval))] @ w


def test_cli_adding_and_copy_write_their_metrics_and_curves(tmp_path, capsys):
    assert cli.main(["train", "adding", "--length", "12", "--hidden", "4", "--steps", "2", "--evals", "1",
                     "--out", str(tmp_path / "add")]) == 0
    m = json.loads(capsys.readouterr().out)
    # Predicting the mean of a fixed test set of 2,000 sums of two uniforms: close to 1/6.
    assert abs(m["baseline_mse"] - 1 / 6) < 0.02
    # Independently: the fixed test set (2,000 sequences from the seed's third stream), the best checkpoint's
    # predictions, their MSE in NumPy.
    test = data.synthetic.adding(np.random.default_rng([0, 3]), 2000, length=12)
    marked = test["x"][..., 0] * test["x"][..., 1]
    assert np.allclose(marked.sum(-1), test["y"]) and (test["x"][..., 1].sum(-1) == 2).all()
    model = models.regressor(1, input_size=2, hidden=4, pooling="last")
    params, step = _best(tmp_path / "add", model)
    pred = np.asarray(jax.jit(model.apply)(params, test["x"]), np.float64)[:, 0]
    assert step == _test_record(tmp_path / "add")["step"]
    assert abs(np.mean((pred - test["y"]) ** 2) - m["test_mse"]) < 1e-5

    assert cli.main(["train", "copy", "--delay", "4", "--symbols", "3", "--hidden", "4", "--steps", "2",
                     "--evals", "2", "--out", str(tmp_path / "copy")]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["test_symbols"] == 6000 and m["baseline_accuracy"] == 0.125
    assert (tmp_path / "copy" / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    records = [json.loads(line) for line in (tmp_path / "copy" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("split") for r in records] == [None, None, "test"]
    # Independently: the recalled symbols of the fixed test set are its last 3 steps' targets, the first 3
    # inputs; the best checkpoint's argmax there, right or wrong, counted in NumPy.
    test = data.synthetic.copy(np.random.default_rng([0, 3]), 2000, 4, symbols=3, alphabet=8)
    assert np.array_equal(test["y"][:, -3:], test["x"][:, :3]) and (test["x"][:, 6] == 9).all()
    model = models.tagger(9, vocab_size=10, hidden=4)
    params, step = _best(tmp_path / "copy", model)
    pred = np.argmax(np.asarray(jax.jit(model.apply)(params, test["x"])), -1)
    assert step == records[-1]["step"]
    assert abs(np.mean(pred[:, -3:] == test["x"][:, :3]) - m["test_accuracy"]) < 1e-5


def test_shifted_images_are_translations_with_the_blank_fill():
    from rnnjax.recipes.classify import ShiftedImages

    rng = np.random.default_rng(0)
    imgs = rng.random((6, 4, 5)).astype(np.float32)
    base = data.ExampleBatches({"x": imgs.reshape(6, 20, 1), "y": np.arange(6)}, 6, seed=0)
    shifted = ShiftedImages(base, 4, 5, 1, -9.0, seed=0)
    b = next(shifted)
    seen = set()
    for x, label in zip(b["x"].reshape(6, 4, 5), b["y"]):
        padded = np.pad(imgs[label], 1, constant_values=-9.0)
        matches = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)
                   if np.array_equal(x, padded[1 + dy:5 + dy, 1 + dx:6 + dx])]
        assert matches
        seen.add(matches[0])
    assert len(seen) > 1 and shifted.position == 1
    shifted.position = 0
    assert np.array_equal(next(shifted)["x"], b["x"])  # resumable: the same batch again


def test_bench_tasks_unknown_run_exits_2(capsys):
    from benchmarks import cli as bench

    assert bench.main(["tasks", "--only", "classify,mnist"]) == 2
    assert capsys.readouterr().err == ("rnnjax-bench tasks: error: unknown run 'mnist'; known: classify, digits, "
                                       "adding, copy-gru, copy-lstm, forecast, copy, adding-sweep\n")
