"""rnnjax.data: the .ts reader, padding, missing values, scaling without leakage, splits, windows,
batch iterators, the synthetic generators and the dataset registry's errors."""

import importlib
import re

import numpy as np
import pytest

from rnnjax import data
from rnnjax.data import datasets, synthetic

TS = """# a comment
@problemName Tiny
@timeStamps false
@missing true
@univariate false
@dimensions 2
@equalLength false
@classLabel true a b c
@data
1,2,3:4,5,6:b
7,?:8,9:a
1,2,3,4:5,6:c
"""


def _write(tmp_path, text, name="Tiny_TRAIN.ts"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_read_ts_ragged_series_missing_values_and_labels(tmp_path):
    d = data.read_ts(_write(tmp_path, TS))
    assert d["name"] == "Tiny" and d["classes"] == ["a", "b", "c"]
    np.testing.assert_array_equal(d["lengths"], [3, 2, 4])
    np.testing.assert_array_equal(d["y"], [1, 0, 2])
    nan = np.nan
    expected = np.array([
        [[1, 4], [2, 5], [3, 6], [0, 0]],
        [[7, 8], [nan, 9], [0, 0], [0, 0]],  # '?' is missing; padding after the length is 0
        [[1, 5], [2, 6], [3, nan], [4, nan]],  # a shorter dimension is padded with NaN to the case's length
    ], np.float32)
    np.testing.assert_array_equal(d["x"], expected)
    filled = data.fill_missing(d["x"], d["lengths"])
    np.testing.assert_array_equal(filled[1], [[7, 8], [7, 9], [0, 0], [0, 0]])
    np.testing.assert_array_equal(filled[2], [[1, 5], [2, 6], [3, 6], [4, 6]])
    # The test file uses the training file's class order, whatever its own header says.
    test = data.read_ts(_write(tmp_path, TS.replace("true a b c", "true c b a"), "Tiny_TEST.ts"),
                        classes=d["classes"])
    np.testing.assert_array_equal(test["y"], [1, 0, 2])


def test_read_ts_sktime_japanese_vowels_is_ragged_and_complete():
    d = data.load_classification("japanese_vowels")
    assert d["train"]["x"].shape == (270, 26, 12) and d["test"]["x"].shape == (370, 29, 12)
    assert d["train"]["lengths"].min() == 7 and np.bincount(d["train"]["y"]).tolist() == [30] * 9
    # Every value of a series up to its length is read, the padding after it is zero.
    x, n = d["test"]["x"], d["test"]["lengths"]
    valid = data.valid_mask(n, x.shape[1])
    assert not np.isnan(x).any() and np.all(x[~valid] == 0) and np.all(np.any(x[valid] != 0, axis=-1))


@pytest.mark.parametrize("line, message", [
    ("1,2:3,4:5,6:a", "expected 2 dimension(s) and a class label (3 fields separated by ':'), got 4 fields. "
                      "Fix: give every case the same number of dimensions."),
    ("1,x:3,4:a", "dimension 1 has 'x', which is not a number or '?' (missing). Fix: correct the value, or write ? "
                  "for a missing one."),
    ("1,2,3", "expected the values of each dimension separated by ':' and the class label last, got no ':' in "
              "'1,2,3'. Fix: write each case as v,v,...:v,v,...:label."),
])
def test_read_ts_malformed_line_is_named(tmp_path, line, message):
    path = _write(tmp_path, TS + line + "\n")
    with pytest.raises(ValueError, match=re.escape(f"rnnjax.data.read_ts: {str(path)!r}, line 13: {message}") + "$"):
        data.read_ts(path)
    bad_label = _write(tmp_path, TS + "1:2:z\n", "Bad_TRAIN.ts")
    with pytest.raises(ValueError, match=re.escape(
            f"rnnjax.data.read_ts: {str(bad_label)!r} has class label(s) ['z'] outside the classes ['a', 'b', 'c']. "
            "Fix: list every class in @classLabel (or pass classes=).") + "$"):
        data.read_ts(bad_label)


def test_scaler_is_fitted_on_the_training_part_only():
    rng = np.random.default_rng(0)
    x, lengths = data.pad_sequences([rng.normal(3, 2, (t, 2)) for t in (5, 3, 7)], value=99.0)
    test = rng.normal(-50, 10, (2, 4, 2)).astype(np.float32)
    scaler = data.Scaler.fit(x, lengths)
    valid = np.concatenate([x[i, :n] for i, n in enumerate(lengths)]).astype(np.float64)
    np.testing.assert_allclose(scaler.mean, valid.mean(0), rtol=1e-6)  # the padding (99) is not counted
    np.testing.assert_allclose(scaler.std, valid.std(0), rtol=1e-6)
    # The test data is transformed with the training statistics, never its own.
    np.testing.assert_allclose(scaler.transform(test), (test - valid.mean(0)) / valid.std(0), rtol=1e-5, atol=1e-5)
    scaled = scaler.transform(x, lengths)
    assert np.all(scaled[~data.valid_mask(lengths, x.shape[1])] == 0)
    np.testing.assert_allclose(scaler.inverse(scaler.transform(test)), test, rtol=1e-5, atol=1e-4)


def test_stratified_split_and_sliding_windows():
    labels = np.repeat([0, 1, 2], [10, 20, 30])
    kept, held = data.split(len(labels), 0.1, seed=3, labels=labels)
    assert np.bincount(labels[held]).tolist() == [1, 2, 3]
    assert sorted(np.r_[kept, held].tolist()) == list(range(60))
    series = np.arange(20, dtype=np.float32)
    x, y = data.sliding_windows(series, 4, 3, start=2, stop=15)
    assert x[0, :, 0].tolist() == [2, 3, 4, 5] and y[0].tolist() == [6, 7, 8]
    assert x[-1, :, 0].tolist() == [8, 9, 10, 11] and y[-1].tolist() == [12, 13, 14]
    with pytest.raises(ValueError, match=re.escape(
            "rnnjax.data.sliding_windows: no window of 30 inputs and 3 targets fits in steps [0, 20) of a series of "
            "20. Fix: use a shorter window or horizon.") + "$"):
        data.sliding_windows(series, 30, 3)


def test_example_batches_cover_each_epoch_and_resume_exactly():
    arrays = {"x": np.arange(10), "y": np.arange(10) * 2}
    it = data.ExampleBatches(arrays, 4, seed=1)
    first = [next(it) for _ in range(5)]  # 20 examples: two full epochs
    seen = np.concatenate([b["x"] for b in first])
    assert sorted(seen[:10].tolist()) == list(range(10)) and sorted(seen[10:].tolist()) == list(range(10))
    assert all(np.array_equal(b["y"], b["x"] * 2) for b in first)
    again = data.ExampleBatches(arrays, 4, seed=1, position=3)
    assert np.array_equal(next(again)["x"], first[3]["x"])


def test_adding_problem_target_is_the_sum_of_the_two_marked_values():
    b = synthetic.adding(np.random.default_rng(0), 64, 50)
    values, markers = b["x"][..., 0], b["x"][..., 1]
    assert np.all(markers.sum(1) == 2) and np.all(markers[:, :25].sum(1) == 1)
    np.testing.assert_allclose(b["y"], (values * markers).sum(1), rtol=1e-6)
    # Predicting the mean gives the variance of a sum of two uniforms, 1/6.
    big = synthetic.adding(np.random.default_rng(1), 20000, 10)
    assert abs(np.mean((big["y"] - 1.0) ** 2) - 1 / 6) < 0.01


def test_copy_task_recalls_the_first_symbols_after_the_marker():
    b = synthetic.copy(np.random.default_rng(0), 8, 20, symbols=5, alphabet=4)
    x, y, mask = b["x"], b["y"], b["mask"]
    assert x.shape == (8, 30) and np.all(x[:, 24] == 5) and np.all(x[:, 5:24] == 0) and np.all(x[:, 25:] == 0)
    assert np.array_equal(y[mask].reshape(8, 5), x[:, :5]) and not y[~mask].any()
    assert x[:, :5].min() >= 1 and x[:, :5].max() <= 4


def test_unknown_dataset_lists_the_known_ones():
    with pytest.raises(ValueError, match=re.escape(
            "rnnjax.data.load_classification: unknown dataset 'mnist'; known: japanese_vowels, gunpoint, "
            "basic_motions, arrow_head, italy_power_demand, digits. Fix: pass one of those, or the path of a "
            "UCR/UEA _TRAIN.ts file.") + "$"):
        data.load_classification("mnist")
    with pytest.raises(ValueError, match=re.escape(
            "rnnjax.data.load_series: unknown dataset 'airline'; known: taylor, sunspots, nile, co2, seattle_temps. "
            "Fix: pass one of those.") + "$"):
        data.load_series("airline")


def test_missing_optional_package_names_the_extra(monkeypatch):
    real = importlib.import_module

    def fake(name, *args):
        if name.split(".")[0] == "pmdarima":
            raise ImportError("No module named 'pmdarima'")
        return real(name, *args)

    monkeypatch.setattr(datasets.importlib, "import_module", fake)
    with pytest.raises(ImportError, match=re.escape(
            "rnnjax.data.load_series: the dataset 'taylor' needs the package 'pmdarima', which is not installed. "
            "Fix: pip install 'rnnjax[tasks]' (or pip install pmdarima).") + "$"):
        data.load_series("taylor")


def test_series_loaders_read_installed_packages():
    taylor = data.load_series("taylor")
    assert taylor["values"].shape == (4032,) and taylor["values"][:3].tolist() == [22262, 21756, 22247]
    assert taylor["period"] == 48
    digits = data.load_digits()
    assert digits["train"]["x"].shape == (1438, 64, 1) and digits["test"]["x"].shape == (359, 64, 1)
    assert 0 <= digits["train"]["x"].min() and digits["train"]["x"].max() == 1.0
