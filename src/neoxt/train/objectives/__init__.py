"""Training objectives behind one interface (``base.py`` documents it), chosen by ``train_impl``.

Adding an objective is a new file here plus one line in ``OBJECTIVES`` (or, from outside the package,
a call to ``register_objective``). Code outside ``src/`` (a user's module, a test) registers its
objectives in a module named by the ``NEOXT_PLUGINS`` environment variable (comma-separated module
names, imported by ``neoxt train`` before the config is resolved)::

    # my_objectives.py, on PYTHONPATH
    from neoxt.train.objectives import register_objective
    register_objective("my_loss", MyObjective)    # MyObjective(ctx: ObjectiveContext) -> Objective

    NEOXT_PLUGINS=my_objectives neoxt train cfg.yml    # with train_impl: my_loss in cfg.yml

An objective that *composes* with ``train_impl``'s instead of replacing it (gradient ascent /
difference on top of the LM objective, switched on by its own keys) is one line in ``COMPOSED``:
a predicate on the config and the factory built when it holds.

Only modules the user names are imported (nothing is discovered), so a config file cannot cause
code to run.
"""

from __future__ import annotations

import difflib
import importlib
import os
from collections.abc import Callable

from neoxt.config.schema import RunConfig
from neoxt.errors import ConfigError
from neoxt.train.objectives.base import (
    Objective,
    ObjectiveContext,
    ObjectiveFactory,
    Stateless,
    StepOutcome,
    accumulate,
    forward_logits,
)
from neoxt.train.objectives.dpo import DPOObjective
from neoxt.train.objectives.kto import KTOObjective
from neoxt.train.objectives.lm import LMObjective
from neoxt.train.objectives.pipeline import PipelineObjective
from neoxt.train.objectives.reinforce import ReinforceObjective
from neoxt.train.objectives.rm import RewardModelObjective
from neoxt.train.objectives.unlearning import UnlearningObjective, unlearning_enabled

__all__ = [
    "COMPOSED", "OBJECTIVES", "PIPELINED", "Objective", "ObjectiveContext", "ObjectiveFactory", "StepOutcome", "Stateless",
    "accumulate", "forward_logits", "build_objective", "factory_for", "load_plugins", "register_objective",
]

# train_impl -> factory (one line per objective).
OBJECTIVES: dict[str, ObjectiveFactory] = {
    "normal": LMObjective,  # pretraining and SFT (label files)
    "dpo": DPOObjective,
    "kto": KTOObjective,
    "rm": RewardModelObjective,
    "reinforce": ReinforceObjective,
}
# train_impl -> factory when pipe_parallel_size > 1 (the objectives that run under a pipeline schedule).
PIPELINED: dict[str, ObjectiveFactory] = {
    "normal": PipelineObjective,
}
# Objectives built instead of train_impl's when their keys ask for them: (predicate on the config, factory).
COMPOSED: list[tuple[Callable[[RunConfig], bool], ObjectiveFactory]] = [
    (unlearning_enabled, UnlearningObjective),  # ga_dataset / gd_mode: gradient ascent / difference
]

PLUGINS_ENV = "NEOXT_PLUGINS"


def register_objective(name: str, factory: ObjectiveFactory, pipelined: ObjectiveFactory | None = None) -> None:
    """Make ``train_impl: <name>`` build ``factory(ctx)`` (and ``pipelined(ctx)`` under a pipeline)."""
    OBJECTIVES[name] = factory
    if pipelined is not None:
        PIPELINED[name] = pipelined


def load_plugins(env: dict[str, str] | None = None) -> list[str]:
    """Import the modules ``NEOXT_PLUGINS`` names (they register objectives); returns their names."""
    names = [n.strip() for n in (env if env is not None else os.environ).get(PLUGINS_ENV, "").split(",") if n.strip()]
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise ConfigError(f"{PLUGINS_ENV}: cannot import plugin module '{name}': {err}") from err
    return names


def factory_for(cfg: RunConfig) -> ObjectiveFactory:
    """The factory ``train_impl`` names, or a ConfigError naming the key and the choices."""
    name = cfg.training.train_impl
    if name not in OBJECTIVES:
        close = difflib.get_close_matches(name, OBJECTIVES, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"train_impl: '{name}' is not a registered objective{hint}; "
                          f"registered: {', '.join(sorted(OBJECTIVES))} (more via {PLUGINS_ENV})")
    for enabled, factory in COMPOSED:
        if enabled(cfg):
            return factory  # its check_config refuses the train_impl / parallelism it cannot compose with
    if cfg.parallelism.pipe_parallel_size > 1:
        if name not in PIPELINED:
            raise ConfigError(f"pipe_parallel_size > 1 supports train_impl: {', '.join(sorted(PIPELINED))}, "
                              f"not '{name}'")
        return PIPELINED[name]
    return OBJECTIVES[name]


def build_objective(ctx: ObjectiveContext) -> Objective:
    return factory_for(ctx.cfg)(ctx)
