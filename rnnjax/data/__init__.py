"""Data sets and batching. Loaders return NumPy arrays; nothing here needs a network."""

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

__all__ = [
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
