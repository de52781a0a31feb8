"""The recipes of ``rnnjax train TASK``: one module per task, each a :class:`Recipe` that says its
defaults, its flags, how it prepares data and model (an :class:`rnnjax.engine.Job`) and how it
evaluates; :func:`rnnjax.engine.train` runs every one of them the same way.

From Python, the same runs as the command line::

    from rnnjax import recipes
    outcome = recipes.train("adding", {"length": 200, "cell": "lstm"}, out="runs/adding", steps=2000)
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, NamedTuple

from rnnjax._checks import require_choice
from rnnjax.recipes.flags import Flag

NAMES = ("charlm", "g2p", "classify", "digits", "forecast", "anomaly", "adding", "copy", "textclass", "tag", "music",
         "frames")
RUN_FILES = ("config.json", "metrics.jsonl", "loss.png")


def _unchanged(settings: dict, given: dict, saved: dict | None) -> dict:
    return settings


class Recipe(NamedTuple):
    """One task of ``rnnjax train``.

    Attributes:
      name: the task (``rnnjax train NAME``).
      help, description: its one-line help and its ``--help`` description.
      defaults: its fixed settings and their defaults (``lr``, ``seed``, ``batch``, ... and its own).
      flags: the :class:`~rnnjax.recipes.flags.Flag` s that set them (and its own run options).
      prepare: ``plan -> Job`` (:class:`rnnjax.engine.Plan`, :class:`rnnjax.engine.Job`): loads the data
        and builds the model, raising :class:`rnnjax.engine.UsageError` on bad input.
      budget: the default budget: ``{"steps": N}`` or ``{"minutes": M}``.
      options: its run options and their defaults (besides :data:`rnnjax.engine.OPTIONS`, whose
        defaults it may change).
      run_files: what a run writes besides ``checkpoints/`` (``--overwrite`` deletes only those).
      adjust: ``(settings, given, saved) -> settings``: settings that depend on others.
      same: ``(key, given, saved) -> bool``: when a flag agrees with a resumed run's setting (default ==).
      evaluate: ``(args, config) -> status``: ``rnnjax eval`` on one of its runs (default:
        :func:`rnnjax.recipes.common.evaluate_run`).
      generate: ``(args, config) -> status``: ``rnnjax generate`` (None: not a generative task).
    """

    name: str
    help: str
    description: str
    defaults: dict
    flags: tuple[Flag, ...]
    prepare: Callable[..., Any]
    budget: dict
    options: dict = {}
    run_files: tuple[str, ...] = RUN_FILES
    adjust: Callable = _unchanged
    same: Callable | None = None
    evaluate: Callable | None = None
    generate: Callable | None = None


def get(name: str) -> Recipe:
    """The recipe of ``rnnjax train NAME``."""
    require_choice("rnnjax.recipes.get", "task", name, NAMES)
    return importlib.import_module(f"rnnjax.recipes.{name}").RECIPE


def train(name: str, settings: dict, *, out: str, **request):
    """Runs ``rnnjax train NAME``: ``settings`` are the fixed settings and run options that differ from
    the recipe's defaults (on ``resume``, those given, checked against the run's); ``request``: ``steps``,
    ``minutes``, ``resume``, ``overwrite``, ``devices``, ``no_plot``, ``start_time``. Returns the
    :class:`rnnjax.engine.Outcome`."""
    from rnnjax import engine

    return engine.train(get(name), settings, {"out": out, **request})
