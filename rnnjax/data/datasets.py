"""Real data sets read from installed packages (no network): UCR/UEA classification problems
shipped with ``sktime``, scikit-learn's digits as 64-step pixel sequences, and time series from
``pmdarima``, ``statsmodels`` and ``vega_datasets``.

::

    d = load_classification("japanese_vowels")   # {"train": {...}, "test": {...}, "classes": [...], "name"}
    d["train"]["x"], d["train"]["lengths"], d["train"]["y"]     # [N, T, F] zero-padded, [N], [N]
    s = load_series("taylor")                    # {"values": float32 [T], "period": 48, "name", "description"}

A missing package raises an ``ImportError`` naming it and the extra to
install (``pip install 'rnnjax[tasks]'``); an unknown name lists the known ones.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path

import numpy as np

from rnnjax.data.ts import read_ts

EXTRA = "tasks"

# name -> (sktime folder, description)
UCR = {
    "japanese_vowels": ("JapaneseVowels", "12 LPC channels, variable lengths 7-29, 9 speakers"),
    "gunpoint": ("GunPoint", "hand position, 150 steps, 2 classes"),
    "basic_motions": ("BasicMotions", "6 motion channels x 100 steps, 4 classes"),
    "arrow_head": ("ArrowHead", "outlines as 251-step series, 3 classes"),
    "italy_power_demand": ("ItalyPowerDemand", "24 hourly values, 2 classes"),
}
CLASSIFICATION = (*UCR, "digits")

# name -> (package, loader, season length, description)
SERIES = {
    "taylor": ("pmdarima", "taylor", 48, "half-hourly electricity demand of England and Wales, June-August 2000 "
                                         "(MW), 4032 points"),
    "sunspots": ("statsmodels", "sunspots", 11, "yearly sunspot numbers 1700-2008, 309 points"),
    "nile": ("statsmodels", "nile", 1, "yearly flow of the Nile 1871-1970, 100 points"),
    "co2": ("statsmodels", "co2", 52, "weekly CO2 at Mauna Loa 1958-2001, gaps interpolated, 2284 points"),
    "seattle_temps": ("vega_datasets", "seattle_temps", 24, "hourly temperatures in Seattle, 2010, 8759 points"),
}


PIP_NAMES = {"sklearn": "scikit-learn"}


def require(module: str, fn: str, what: str, *, extra: str = EXTRA):
    """``importlib.import_module(module)``, or an ImportError naming the package and the extra."""
    try:
        return importlib.import_module(module)
    except ImportError:
        top = module.split(".")[0]
        package = PIP_NAMES.get(top, top)
        raise ImportError(f"{fn}: {what} needs the package {package!r}, which is not installed. Fix: pip install "
                          f"'rnnjax[{extra}]' (or pip install {package}).") from None


def _unknown(fn: str, name: str, known) -> ValueError:
    path = {"classification": ", or the path of a UCR/UEA _TRAIN.ts file", "anomaly": ", or the path of a CSV file"}
    return ValueError(f"{fn}: unknown dataset {name!r}; known: {', '.join(known)}. Fix: pass one of those"
                      + path.get(fn.rsplit("_", 1)[-1], "") + ".")


def _sktime_data(fn: str, folder: str, name: str) -> Path:
    spec = importlib.util.find_spec("sktime")  # the files only: importing sktime takes seconds
    if spec is None or not spec.submodule_search_locations:
        require("sktime", fn, f"the dataset {name!r}")
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data" / folder


def load_classification(name: str | os.PathLike) -> dict:
    """A classification data set with its own train/test split: ``{"train": {"x", "lengths", "y"},
    "test": {...}, "classes", "name"}``. ``name``: one of :data:`CLASSIFICATION`, or the path of a
    ``*_TRAIN.ts`` file whose ``*_TEST.ts`` lies beside it."""
    fn = "rnnjax.data.load_classification"
    key = str(name)
    if key == "digits":
        return load_digits()
    if key in UCR:
        folder = UCR[key][0]
        base = _sktime_data(fn, folder, key) / folder
        train_path, test_path = Path(f"{base}_TRAIN.ts"), Path(f"{base}_TEST.ts")
    elif key.endswith(".ts") or os.sep in key:
        train_path = Path(key).expanduser()
        if "_TRAIN" not in train_path.name:
            raise ValueError(f"{fn}: expected the path of a *_TRAIN.ts file (its *_TEST.ts beside it), got "
                             f"{key!r}. Fix: pass e.g. data/GunPoint/GunPoint_TRAIN.ts.")
        test_path = train_path.with_name(train_path.name.replace("_TRAIN", "_TEST"))
    else:
        raise _unknown(fn, key, CLASSIFICATION)
    train = read_ts(train_path)
    test = read_ts(test_path, classes=train["classes"])
    strip = ("x", "lengths", "y")
    return {"train": {k: train[k] for k in strip}, "test": {k: test[k] for k in strip},
            "classes": train["classes"], "name": train["name"]}


def load_digits(*, test_fraction: float = 0.2, seed: int = 0) -> dict:
    """scikit-learn's 1,797 handwritten 8x8 digits as sequences of 64 pixels (row by row, one
    pixel per step, values scaled to [0, 1]); a stratified, seeded ``test_fraction`` is the test set."""
    from rnnjax.data.sequences import split

    datasets = require("sklearn.datasets", "rnnjax.data.load_digits", "the dataset 'digits'")
    d = datasets.load_digits()
    x = (d.images.reshape(-1, 64, 1) / 16.0).astype(np.float32)
    y = d.target.astype(np.int32)
    tr, te = split(len(y), test_fraction, seed=seed, labels=y)
    lengths = np.full(len(y), 64, np.int32)
    part = lambda idx: {"x": x[idx], "lengths": lengths[idx], "y": y[idx]}  # noqa: E731
    return {"train": part(tr), "test": part(te), "classes": [str(c) for c in range(10)], "name": "digits"}


def load_series(name: str) -> dict:
    """A univariate series: ``{"values": float32 [T], "period": season length, "name", "description"}``."""
    fn = "rnnjax.data.load_series"
    if name not in SERIES:
        raise _unknown(fn, name, SERIES)
    package, loader, period, description = SERIES[name]
    what = f"the dataset {name!r}"
    if loader == "taylor":
        values = require("pmdarima.datasets", fn, what).load_taylor()
    elif package == "statsmodels":
        datasets = require("statsmodels.api", fn, what).datasets
        if loader == "sunspots":
            values = datasets.sunspots.load_pandas().data["SUNACTIVITY"].to_numpy()
        elif loader == "nile":
            values = datasets.nile.load_pandas().data["volume"].to_numpy()
        else:
            values = datasets.co2.load_pandas().data["co2"].interpolate().bfill().to_numpy()
    else:
        values = require("vega_datasets", fn, what).local_data.seattle_temps()["temp"].to_numpy()
    return {"values": np.asarray(values, np.float32), "period": period, "name": name, "description": description}
