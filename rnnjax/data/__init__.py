"""Data sets and batching. Loaders return NumPy arrays; nothing here needs a network."""

from rnnjax.data import synthetic
from rnnjax.data.anomaly import ANOMALY, load_anomaly, read_series_csv
from rnnjax.data.datasets import CLASSIFICATION, SERIES, load_classification, load_digits, load_series
from rnnjax.data.labelled import read_conll, read_labelled, token_vocabulary, tokenize
from rnnjax.data.sequences import (
    BatchesView,
    ExampleBatches,
    GeneratedBatches,
    LengthBatches,
    Scaler,
    fill_missing,
    first_non_finite,
    length_buckets,
    pad_groups,
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
    "LengthBatches",
    "Scaler",
    "fill_missing",
    "first_non_finite",
    "length_buckets",
    "load_anomaly",
    "load_classification",
    "load_digits",
    "load_series",
    "pad_groups",
    "pad_sequences",
    "read_conll",
    "read_labelled",
    "read_series_csv",
    "read_ts",
    "sliding_windows",
    "split",
    "synthetic",
    "token_vocabulary",
    "tokenize",
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
