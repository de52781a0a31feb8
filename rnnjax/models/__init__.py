"""Models composed from cells and layers."""

from rnnjax.models.lm import CELLS, LanguageModel, LMParams, generate, language_model

__all__ = ["CELLS", "LMParams", "LanguageModel", "generate", "language_model"]
