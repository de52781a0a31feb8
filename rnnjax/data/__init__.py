"""Data sets and batching. Loaders return NumPy arrays; nothing here needs a network."""

from rnnjax.data.text import (
    Vocabulary,
    batches,
    eval_batches,
    play_to_text,
    read_text,
    shakespeare_text,
    split_text,
)

__all__ = [
    "Vocabulary",
    "batches",
    "eval_batches",
    "play_to_text",
    "read_text",
    "shakespeare_text",
    "split_text",
]
