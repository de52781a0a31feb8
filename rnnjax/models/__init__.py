"""Models composed from cells and layers."""

from rnnjax.models.lm import CELLS, LanguageModel, LMParams, generate, language_model
from rnnjax.models.seq2seq import (
    Seq2Seq,
    Seq2SeqParams,
    attention_weights,
    sampling_schedule,
    seq2seq,
    seq2seq_loss,
    sequence_log_probs,
    translate,
)

__all__ = ["CELLS", "LMParams", "LanguageModel", "Seq2Seq", "Seq2SeqParams", "attention_weights", "generate",
           "language_model", "sampling_schedule", "seq2seq", "seq2seq_loss", "sequence_log_probs", "translate"]
