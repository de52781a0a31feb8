"""rnnjax train anomaly: the ranking metrics, the baselines, the CSV reader and a tiny run end to end."""

import json

import numpy as np
import pytest

from rnnjax import cli, data, metrics
from rnnjax.recipes import anomaly


def test_auroc_and_best_f1_match_a_hand_computation():
    rng = np.random.default_rng(0)
    labels = rng.random(60) < 0.2
    scores = np.round(rng.normal(size=60) + labels, 1)  # rounded: ties between and within the classes
    pos, neg = scores[labels], scores[~labels]
    pairs = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    assert abs(metrics.auroc(labels, scores) - pairs.mean()) < 1e-12
    best = (0.0, None)
    for threshold in np.unique(scores):  # flag every step scoring at least the threshold
        flagged = scores >= threshold
        tp = np.sum(flagged & labels)
        f1 = 2 * tp / (flagged.sum() + labels.sum())
        best = max(best, (f1, threshold), key=lambda b: b[0])
    f1, threshold = metrics.best_f1(labels, scores)
    assert abs(f1 - best[0]) < 1e-12 and threshold == best[1]
    with pytest.raises(ValueError) as e:
        metrics.auroc(np.zeros(4), np.arange(4))
    assert str(e.value) == ("rnnjax.metrics.auroc: expected 0/1 labels with both classes present, got the values "
                            "[0.0]. Fix: score a part that holds normal and anomalous steps.")


def test_rolling_zscore_smoothing_and_isolation_forest_match_numpy_and_sklearn():
    rng = np.random.default_rng(1)
    v = rng.normal(size=40)
    got = anomaly.rolling_zscore(v, 5)
    assert np.isnan(got[:5]).all()
    for t in range(5, 40):
        past = v[t - 5:t]
        assert abs(got[t] - abs(v[t] - past.mean()) / past.std()) < 1e-12
    smoothed = anomaly.smooth(got, 4)
    for t in range(40):  # the mean of the defined scores of steps t - 2 ... t + 1
        window = got[max(t - 2, 0):t + 2]
        assert np.isnan(smoothed[t]) if t < 5 else abs(smoothed[t] - np.nanmean(window)) < 1e-12
    from sklearn.ensemble import IsolationForest

    forest = anomaly.isolation_forest_scores(v, 3, 20, seed=0)
    lags = np.stack([v[t - 3:t + 1] for t in range(3, 40)])  # the window ending at each step t >= 3
    reference = IsolationForest(random_state=0).fit(lags[:17])  # the windows ending before step 20
    assert np.isnan(forest[:3]).all() and np.allclose(forest[3:], -reference.score_samples(lags))


def test_read_series_csv_finds_its_columns(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("timestamp,value,is_anomaly\n2020-01-01,1.5,0\n2020-01-02,-2,1\n")
    s = data.read_series_csv(path)
    assert s["values"].tolist() == [1.5, -2.0] and s["labels"].tolist() == [0, 1]
    path.write_text("3\n4.5\n")  # no header: column 1
    s = data.read_series_csv(path)
    assert s["values"].tolist() == [3.0, 4.5] and s["labels"] is None
    path.write_text("a,b,c\n1,2,0\n")
    s = data.read_series_csv(path, value_column="2", label_column="c")
    assert s["values"].tolist() == [2.0] and s["labels"].tolist() == [0]


@pytest.mark.parametrize("text, kwargs, message", [
    ("value,label\n1,0\n2\n", {}, "'{p}', line 3: 1 fields, expected 2 like the header (value,label). Fix: give "
                                  "every line the same fields"),
    ("value\n1\nabc\n", {}, "'{p}', line 3: the value column 'value' holds 'abc' at step 1 of 2, not a number; "
                            "expected finite values. Fix: fill or drop its missing values first"),
    ("value\n1\n2\nnan\n", {}, "'{p}', line 4: the value column 'value' holds 'nan' at step 2 of 3, not finite; "
                               "expected finite values. Fix: fill or drop its missing values first"),
    ("value,label\n1,0\n2,yes\n", {}, "'{p}', line 3: the label column 'label' holds 'yes', expected 0 (normal) or "
                                      "1 (anomalous). Fix: correct the label"),
    ("", {}, "'{p}' is empty; expected a header line (e.g. value,label) and one line per step. Fix: write the series "
             "into it."),
    ("a,b\n1,2\n", {}, "cannot tell which column of '{p}' holds the values (columns: a, b). Fix: pass --value-column "
                       "NAME (and --label-column NAME if it has labels)."),
    ("a,b\n1,2\n", {"value_column": "x"}, "'{p}' has no column 'x'; its columns: a, b. Fix: pass --value-column one "
                                          "of those (a name, or a number from 1)."),
])
def test_read_series_csv_names_the_bad_line(tmp_path, text, kwargs, message):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ValueError) as e:
        data.read_series_csv(path, **kwargs)
    assert str(e.value) == "rnnjax.data.read_series_csv: " + message.format(p=path)


def _planted(path, labels=True):
    """A noisy sine (period 16) with 6 spikes in its second half (the test part)."""
    rng = np.random.default_rng(0)
    t = np.arange(400)
    v = np.sin(2 * np.pi * t / 16) + 0.05 * rng.normal(size=400)
    spikes = np.array([230, 262, 291, 318, 350, 377])
    v[spikes] += np.array([1.5, -1.5, 1.5, -1.5, 1.5, -1.5])
    y = np.isin(t, spikes).astype(int)
    rows = [f"{x:.5f},{k}" if labels else f"{x:.5f}" for x, k in zip(v, y)]
    path.write_text(("value,label\n" if labels else "value\n") + "\n".join(rows) + "\n")
    return y


def test_cli_anomaly_ranks_planted_spikes_first_and_eval_reproduces_it(tmp_path, capsys):
    csv, out = tmp_path / "planted.csv", tmp_path / "run"
    y = _planted(csv)
    args = ["--dataset", str(csv), "--window", "16", "--hidden", "8", "--train-fraction", "0.5", "--lr", "1e-2"]
    assert cli.main(["train", "anomaly", *args, "--steps", "60", "--evals", "1", "--out", str(out)]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["test_anomalies"] == 6 and m["test_steps"] == 200
    assert m["test_auroc"] > 0.95, m  # the steps right after a spike (it is in their window) come next
    lines = (out / "scores.csv").read_text().splitlines()
    assert lines[0] == "step,part,value,label,score,rolling_zscore,isolation_forest"
    score = np.array([float(line.split(",")[4]) for line in lines[201:]])
    assert abs(metrics.auroc(y[200:], score) - m["test_auroc"]) < 1e-6
    assert (out / "anomaly.png").read_bytes()[:4] == b"\x89PNG"
    assert cli.main(["eval", "--checkpoint", str(out)]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["test_auroc"] == m["test_auroc"] and again["zscore_auroc"] == m["zscore_auroc"]
    _planted(csv, labels=False)  # the run's file, now without labels: no AUROC
    assert cli.main(["eval", "--checkpoint", str(out)]) == 0
    unlabelled = json.loads(capsys.readouterr().out)
    assert "test_auroc" not in unlabelled and "test_anomalies" not in unlabelled
    assert unlabelled["test_mse"] == m["test_mse"]


def test_scores_csv_without_labels(tmp_path):
    values = np.array([1.0, 2.5, -3.0])
    ser = anomaly.Series(values, None, values, 1.0, 1, 2, "s", "")
    anomaly.write_scores(tmp_path / "s.csv", ser, {"test": np.array([np.nan, 0.5, 2.0]), "zscore": np.zeros(3)})
    assert (tmp_path / "s.csv").read_text() == ("step,part,value,score,rolling_zscore\n0,fit,1,,0\n"
                                                "1,validation,2.5,0.5,0\n2,test,-3,2,0\n")


def test_cli_anomaly_bad_input_exits_2_with_one_line(tmp_path, capsys):
    csv = tmp_path / "short.csv"
    csv.write_text("value\n" + "\n".join(str(i % 3) for i in range(50)) + "\n")
    assert cli.main(["train", "anomaly", "--dataset", str(csv), "--out", str(tmp_path / "a")]) == 2
    assert capsys.readouterr().err == (
        "rnnjax: error: rnnjax train anomaly: the 50 steps of 'short.csv' split as --train-fraction 0.4 and "
        "--val-fraction 0.2 say leave 16 for fitting, 4 for validation and 30 for testing; expected more than "
        "--window 64 + 1 for fitting and at least one of each other. Fix: pass a shorter --window or other "
        "fractions, or a longer series.\n")
    assert cli.main(["train", "anomaly", "--dataset", "ecg", "--out", str(tmp_path / "a")]) == 2
    assert capsys.readouterr().err == (
        "rnnjax: error: rnnjax train anomaly: rnnjax.data.load_anomaly: unknown dataset 'ecg'; known: mitdb, yahoo. "
        "Fix: pass one of those, or the path of a CSV file.\n")
    assert not (tmp_path / "a").exists()
