"""Data sets and batching. Loaders return NumPy arrays; nothing here needs a network."""

from rnnjax.data import synthetic
from rnnjax.data.anomaly import ANOMALY, load_anomaly, read_series_csv
from rnnjax.data.datasets import CLASSIFICATION, SERIES, load_classification, load_digits, load_series
from rnnjax.data.sequences import (
    BatchesView,
    ExampleBatches,
    GeneratedBatches,
    Scaler,
    fill_missing,
    first_non_finite,
    pad_sequences,
    sliding_windows,
    split,
    valid_mask,
)
from rnnjax.data.text import (
    TokenStream,
    Vocabulary,
    batches,
    eval_batches,
    lanes,
    play_to_text,
    read_text,
    shakespeare_documents,
    shakespeare_text,
    split_text,
)
from rnnjax.data.ts import read_ts

__all__ = [
    "ANOMALY",
    "CLASSIFICATION",
    "SERIES",
    "BatchesView",
    "ExampleBatches",
    "GeneratedBatches",
    "Scaler",
    "fill_missing",
    "first_non_finite",
    "load_anomaly",
    "load_classification",
    "load_digits",
    "load_series",
    "pad_sequences",
    "read_series_csv",
    "read_ts",
    "sliding_windows",
    "split",
    "synthetic",
    "valid_mask",
    "TokenStream",
    "Vocabulary",
    "batches",
    "eval_batches",
    "lanes",
    "play_to_text",
    "read_text",
    "shakespeare_documents",
    "shakespeare_text",
    "split_text",
]
