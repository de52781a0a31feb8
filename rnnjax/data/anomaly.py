"""Labelled series for anomaly detection: the two that sktime ships, and a user's CSV file.

::

    s = load_anomaly("mitdb")            # {"values": float32 [T], "labels": int32 [T] or None, "name", "description"}
    s = read_series_csv("my.csv", value_column="value", label_column="label")

A CSV file has a header line and one line per step. The value column is
``value_column`` (a header name, or a 1-based column number), else found: the
only column that is neither the label column nor a time stamp (``timestamp``,
``time``, ``date``, ``datetime``, ``index``), or the one called ``value`` or
``data``. The label column is ``label_column``, else a column called
``label``, ``labels``, ``anomaly``, ``is_anomaly`` or ``outlier`` if there
is one; labels are 0 (normal) or 1 (anomalous). A file whose first line holds
numbers only has no header: its columns are 1, 2, ... A malformed line, a
value that is not a finite number or a label that is not 0 or 1 raises a
``ValueError`` naming the line.
"""

from __future__ import annotations

import csv
import os

import numpy as np

from rnnjax.data.datasets import _sktime_data, _unknown

FN = "rnnjax.data.read_series_csv"
# name -> (sktime folder, description)
ANOMALY = {
    "mitdb": ("mitdb", "ECG of the MIT-BIH arrhythmia database, 7,500 samples, one labelled anomalous beat "
                       "(352 samples)"),
    "yahoo": ("yahoo", "a synthetic series of Yahoo's S5 benchmark: trend and season, 1,000 points, 7 anomalies"),
}
LABEL_NAMES = ("label", "labels", "anomaly", "is_anomaly", "outlier")
VALUE_NAMES = ("value", "data")
TIME_NAMES = ("timestamp", "time", "date", "datetime", "index")


def _error(path, line_no: int, what: str, fix: str) -> ValueError:
    return ValueError(f"{FN}: {str(path)!r}, line {line_no}: {what}. Fix: {fix}")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _column(path, header: list[str], spec: str, flag: str) -> int:
    """The index of column ``spec`` (a header name, or a 1-based number)."""
    if spec in header:
        return header.index(spec)
    if spec.isdigit() and 1 <= int(spec) <= len(header):
        return int(spec) - 1
    raise ValueError(f"{FN}: {str(path)!r} has no column {spec!r}; its columns: {', '.join(header)}. Fix: pass "
                     f"{flag} one of those (a name, or a number from 1).")


def _columns(path, header: list[str], value_column, label_column) -> tuple[int, int | None]:
    lower = [h.strip().lower() for h in header]
    if label_column is not None:
        label = _column(path, header, str(label_column), "--label-column")
    else:
        label = next((i for i, h in enumerate(lower) if h in LABEL_NAMES), None)
    if value_column is not None:
        return _column(path, header, str(value_column), "--value-column"), label
    candidates = [i for i, h in enumerate(lower) if i != label and h not in TIME_NAMES]
    named = [i for i in candidates if lower[i] in VALUE_NAMES]
    if len(candidates) == 1 or len(named) == 1:
        return (named or candidates)[0], label
    raise ValueError(f"{FN}: cannot tell which column of {str(path)!r} holds the values (columns: "
                     f"{', '.join(header)}). Fix: pass --value-column NAME (and --label-column NAME if it has "
                     "labels).")


def _label(text: str, path, line_no: int, name: str) -> int:
    if _is_number(text) and float(text) in (0.0, 1.0):
        return int(float(text))
    raise _error(path, line_no, f"the label column {name!r} holds {text!r}, expected 0 (normal) or 1 (anomalous)",
                 "correct the label")


def _rows(path) -> list[list[str]]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except OSError as e:
        raise ValueError(f"{FN}: cannot read {str(path)!r}: {e.strerror}. Fix: check the path.") from None
    except (UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"{FN}: {str(path)!r} is not a UTF-8 CSV file ({e}). Fix: save it as CSV, UTF-8.") from None
    if not rows or not any(rows[0]):
        raise ValueError(f"{FN}: {str(path)!r} is empty; expected a header line (e.g. value,label) and one line per "
                         "step. Fix: write the series into it.")
    return rows


def read_series_csv(path: str | os.PathLike, *, value_column=None, label_column=None) -> dict:
    """A series (and its labels) from a CSV file: ``{"values": float32 [T], "labels": int32 [T] or None,
    "name", "description"}`` (see the module doc for the columns)."""
    rows = _rows(path)
    has_header = not all(_is_number(x) for x in rows[0])
    header = [h.strip() for h in rows[0]] if has_header else [str(i + 1) for i in range(len(rows[0]))]
    v, lab = _columns(path, header, value_column, label_column)
    first = 2 if has_header else 1
    if len(rows) < first:
        raise ValueError(f"{FN}: {str(path)!r} has a header and no values. Fix: add one line per step.")
    values, labels = [], []
    for line_no, row in enumerate(rows[first - 1:], first):
        if len(row) != len(header):
            raise _error(path, line_no, f"{len(row)} fields, expected {len(header)} like "
                         f"{'the header' if has_header else 'line 1'} ({','.join(header)})",
                         "give every line the same fields")
        text = row[v].strip()
        x = float(text) if _is_number(text) else None
        if x is None or not np.isfinite(np.float32(x)):
            what = "not a number" if x is None else "not finite"
            raise _error(path, line_no, f"the value column {header[v]!r} holds {text!r} at step {line_no - first} "
                         f"of {len(rows) - first + 1}, {what}; expected finite values",
                         "fill or drop its missing values first")
        values.append(x)
        if lab is not None:
            labels.append(_label(row[lab].strip(), path, line_no, header[lab]))
    name = os.path.basename(str(path))
    return {"values": np.asarray(values, np.float32), "labels": None if lab is None else np.asarray(labels, np.int32),
            "name": name, "description": f"column {header[v]!r}"
            + (f", labels in {header[lab]!r}" if lab is not None else ", no labels")}


def load_anomaly(name: str | os.PathLike, *, value_column=None, label_column=None) -> dict:
    """A labelled series of :data:`ANOMALY` (from the installed sktime), or a CSV file's (a path ending in
    ``.csv``): ``{"values", "labels", "name", "description"}``."""
    fn = "rnnjax.data.load_anomaly"
    key = str(name)
    if key in ANOMALY:
        folder, description = ANOMALY[key]
        s = read_series_csv(_sktime_data(fn, folder, key) / f"{folder}.csv")
        return {**s, "name": key, "description": description}
    if key.endswith(".csv") or os.sep in key:
        return read_series_csv(key, value_column=value_column, label_column=label_column)
    raise _unknown(fn, key, ANOMALY)
