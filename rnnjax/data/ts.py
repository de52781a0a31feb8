"""A reader for the UCR/UEA time-series classification archive's ``.ts`` format.

::

    d = read_ts("JapaneseVowels_TRAIN.ts")
    d["x"]        # float32 [N, T_max, D], zero-padded after each series' end (NaN where a value is missing)
    d["lengths"]  # int32 [N]: each series' own length
    d["y"]        # int32 [N]: class ids, in the order of the header's @classLabel list
    d["classes"]  # the class labels as written in the file

The format: ``#`` comment lines, ``@key value`` header lines (``@problemName``,
``@timeStamps``, ``@missing``, ``@univariate``, ``@dimensions``, ``@equalLength``,
``@seriesLength``, ``@classLabel true a b c``), then ``@data`` and one case per
line: the dimensions separated by ``:``, the values of a dimension by ``,``,
the class label last; ``?`` is a missing value. Series may have different
lengths (ragged); within a case a shorter dimension is padded with NaN to
the case's longest one. Time-stamped files (``@timeStamps true``) are not read.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

FN = "rnnjax.data.read_ts"


def _error(path, line_no: int, what: str, fix: str) -> ValueError:
    return ValueError(f"{FN}: {str(path)!r}, line {line_no}: {what}. Fix: {fix}.")


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _parse_values(text: str, path, line_no: int, dim: int) -> list[float]:
    """The values of one dimension: ``?`` and ``NaN`` are missing (NaN, filled later); infinite values,
    or ones beyond float32's range, are refused with their position (they would train on ``inf``)."""
    values = []
    for i, v in enumerate(text.split(",")):
        v = v.strip()
        if v == "?" or v.lower() == "nan":
            values.append(np.nan)
            continue
        try:
            x = float(v)
        except ValueError:
            raise _error(path, line_no, f"dimension {dim + 1} has {v!r}, which is not a number or '?' (missing)",
                         "correct the value, or write ? for a missing one") from None
        if not abs(x) <= _FLOAT32_MAX:
            raise _error(path, line_no, f"dimension {dim + 1}, value {i + 1} is {v!r}, which is not a finite "
                                        "float32 number", "correct the value, or write ? for a missing one")
        values.append(x)
    return values


def read_ts(path: str | os.PathLike, *, classes=None) -> dict:
    """Reads a ``.ts`` file: ``{"x", "lengths", "y", "classes", "name"}`` (see the module doc).

    ``classes``: the label order to use (e.g. the training file's, for its test file); default:
    the header's ``@classLabel`` list, or the labels in order of appearance."""
    path = Path(path).expanduser()
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except FileNotFoundError:
        raise ValueError(f"{FN}: no file {str(path)!r}. Fix: pass the path of a .ts file of the UCR/UEA "
                         "archive.") from None
    except UnicodeDecodeError:
        raise ValueError(f"{FN}: {str(path)!r} is not a UTF-8 text file. Fix: pass a .ts file.") from None
    header: dict[str, str] = {}
    cases, labels = [], []
    in_data = False
    dims = None
    for line_no, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not in_data:
            if not line.startswith("@"):
                raise _error(path, line_no, f"expected a header line starting with '@' before @data, got "
                                            f"{line[:40]!r}", "add the @data line before the cases")
            key, _, value = line[1:].partition(" ")
            key = key.lower()
            if key == "data":
                in_data = True
                if header.get("timestamps", "false").lower() == "true":
                    raise _error(path, line_no, "time-stamped series (@timeStamps true) are not supported",
                                 "convert the file to plain values")
                if "classlabel" not in header or not header["classlabel"].lower().startswith("true"):
                    raise _error(path, line_no, "expected a classification file (@classLabel true ...), got "
                                                f"@classLabel {header.get('classlabel', '(missing)')!r}",
                                 "read a classification problem, or add its @classLabel line")
                if "dimensions" in header:
                    try:
                        dims = int(header["dimensions"])
                    except ValueError:
                        raise _error(path, line_no, f"@dimensions {header['dimensions']!r} is not an integer",
                                     "write e.g. @dimensions 1") from None
                continue
            header[key] = value.strip()
            continue
        parts = line.split(":")
        if len(parts) < 2:
            raise _error(path, line_no, "expected the values of each dimension separated by ':' and the class "
                                        f"label last, got no ':' in {line[:40]!r}",
                         "write each case as v,v,...:v,v,...:label")
        *series, label = parts
        if dims is None:
            dims = len(series)
        if len(series) != dims:
            raise _error(path, line_no, f"expected {dims} dimension(s) and a class label ({dims + 1} fields "
                                        f"separated by ':'), got {len(parts)} fields",
                         "give every case the same number of dimensions")
        values = [_parse_values(s, path, line_no, d) for d, s in enumerate(series)]
        if any(len(v) == 0 for v in values):
            raise _error(path, line_no, "a dimension has no values", "give every dimension at least one value")
        T = max(len(v) for v in values)
        case = np.full((T, dims), np.nan, np.float32)
        for d, v in enumerate(values):
            case[:len(v), d] = v
        cases.append(case)
        labels.append(label.strip())
    if not in_data:
        raise ValueError(f"{FN}: {str(path)!r} has no @data line. Fix: pass a .ts file of the UCR/UEA archive.")
    if not cases:
        raise ValueError(f"{FN}: {str(path)!r} has no cases after @data. Fix: pass a file with data.")
    declared = header["classlabel"].split()[1:]
    order = list(classes) if classes is not None else (declared or list(dict.fromkeys(labels)))
    index = {c: i for i, c in enumerate(order)}
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise ValueError(f"{FN}: {str(path)!r} has class label(s) {unknown} outside the classes {order}. "
                         "Fix: list every class in @classLabel (or pass classes=).")
    lengths = np.array([len(c) for c in cases], np.int32)
    x = np.zeros((len(cases), int(lengths.max()), dims), np.float32)
    for i, c in enumerate(cases):
        x[i, :len(c)] = c
    return {"x": x, "lengths": lengths, "y": np.array([index[lab] for lab in labels], np.int32),
            "classes": order, "name": header.get("problemname", path.stem)}
