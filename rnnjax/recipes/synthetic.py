"""What the adding problem and the copy task share: fixed validation and test sets drawn from the
task's generator, and chrono initialisation."""

from __future__ import annotations

import jax
import numpy as np

from rnnjax import models

VAL_SEQUENCES, TEST_SEQUENCES = 1000, 2000


def fixed_sets(make, seed: int) -> tuple[dict, dict]:
    """The validation and test sets (:data:`VAL_SEQUENCES`, :data:`TEST_SEQUENCES`) of a generator
    ``make(rng, n)``, each from its own stream of ``seed``."""
    return make(np.random.default_rng([seed, 2]), VAL_SEQUENCES), make(np.random.default_rng([seed, 3]), TEST_SEQUENCES)


def chrono(model, s: dict, t_max: int):
    """``key -> params`` with chrono-initialised gate biases when ``s["chrono"]`` (else ``model.init``)."""
    if not s["chrono"]:
        return model.init

    def init(key):
        k_model, k_chrono = jax.random.split(key)
        return models.chrono_init(model.init(k_model), k_chrono, t_max, s["cell"])

    return init
