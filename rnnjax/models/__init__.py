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
from rnnjax.models.sequence import (
    FORECAST_MODES,
    POOLINGS,
    SequenceModel,
    SequenceParams,
    chrono_init,
    classifier,
    forecaster,
    pool,
    regressor,
    tagger,
)

__all__ = ["CELLS", "FORECAST_MODES", "LMParams", "LanguageModel", "POOLINGS", "Seq2Seq", "Seq2SeqParams",
           "SequenceModel", "SequenceParams", "attention_weights", "chrono_init", "classifier", "forecaster",
           "generate",
           "language_model", "pool", "regressor", "sampling_schedule", "seq2seq", "seq2seq_loss", "sequence_log_probs",
           "tagger", "translate"]
