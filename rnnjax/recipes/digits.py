"""``rnnjax train digits``: scikit-learn's 8x8 digits read one pixel per step (a small sequential MNIST),
by the classification recipe, with shifted images as augmentation."""

from __future__ import annotations

from rnnjax.recipes import Recipe, classify
from rnnjax.recipes.common import (
    MODEL_DEFAULTS,
    OPTIM_DEFAULTS,
    RUN_FILES,
    SHIFT,
    VAL_FRACTION,
    model_flags,
    training_flags,
)

DEFAULTS = {**MODEL_DEFAULTS, **OPTIM_DEFAULTS, "pooling": "mean", "cell": "gru", "hidden": 128,
            "bidirectional": True, "dropout": 0.2, "weight_decay": 0.01, "batch": 64, "val_fraction": 0.1, "shift": 1}


def prepare(plan):
    plan.settings["dataset"] = "digits"
    return classify.prepare(plan)


RECIPE = Recipe(
    name="digits", help="scikit-learn digits as 64-step pixel sequences",
    description="Train a recurrent classifier on scikit-learn's 8x8 digits read one pixel per step (a small "
                "sequential MNIST); a stratified fifth of the 1,797 digits is the test set.",
    defaults=DEFAULTS, budget={"steps": 2000}, run_files=RUN_FILES,
    flags=(VAL_FRACTION, SHIFT, *model_flags("cell", "layers", "hidden", "bidirectional", "dropout", "pooling"),
           *training_flags()),
    prepare=prepare)
