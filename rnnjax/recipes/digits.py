"""``rnnjax train digits``: scikit-learn's 8x8 digits read one pixel per step (a small sequential MNIST),
by the classification recipe, with shifted images as augmentation."""

from __future__ import annotations

from rnnjax.recipes import classify, common

DEFAULTS = {**common.TASK_DEFAULTS, "pooling": "mean", "cell": "gru", "hidden": 128,
            "bidirectional": True, "dropout": 0.2, "weight_decay": 0.01, "batch": 64, "val_fraction": 0.1, "shift": 1}


def prepare(plan):
    plan.settings["dataset"] = "digits"
    return classify.prepare(plan)


RECIPE = common.task_recipe(
    "digits", "scikit-learn digits as 64-step pixel sequences",
    "Train a recurrent classifier on scikit-learn's 8x8 digits read one pixel per step (a small sequential MNIST); "
    "a stratified fifth of the 1,797 digits is the test set.",
    defaults=DEFAULTS, steps=2000, prepare=prepare, task_flags=(common.VAL_FRACTION, common.SHIFT),
    model=("cell", "layers", "hidden", "bidirectional", "dropout", "pooling"))
