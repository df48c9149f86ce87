"""Stage decomposition: a model as a chain of named, separately applicable stages.

A *stage* is a top-level submodule whose variables live under ``params[name]``
(and ``batch_stats[name]``). Applying the stages in order equals applying the
model. The importance engine uses this to cache a stage's input and recompute
only from the stage that holds an ablated unit.
"""

from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax

PyTree = Any


class Stage(NamedTuple):
    """One link of a staged model: ``module`` is unbound; its variables are ``[name]``."""

    name: str | None  # None only for a whole model taken as one stage (importance)
    module: nn.Module


def stage_variables(stage: Stage, params: PyTree, batch_stats: PyTree) -> dict:
    """The variable dict ``{'params', 'batch_stats'?}`` of one stage (params {} if it has none)."""
    variables = {"params": params.get(stage.name, {})}
    if batch_stats and stage.name in batch_stats:
        variables["batch_stats"] = batch_stats[stage.name]
    return variables


def apply_stages(
    stages: Sequence[Stage],
    params: PyTree,
    batch_stats: PyTree,
    x: jax.Array,
    start: int = 0,
    stop: int | None = None,
) -> jax.Array:
    """Applies ``stages[start:stop]`` in inference mode (BatchNorm running stats)."""
    for stage in stages[start:stop]:
        x = stage.module.apply(stage_variables(stage, params, batch_stats), x, train=False)
    return x


def call_stages(parent: nn.Module, stages: Sequence[Stage], x: jax.Array, train: bool) -> jax.Array:
    """Calls the stages as named submodules of ``parent`` (use inside ``nn.compact``)."""
    for stage in stages:
        x = stage.module.clone(parent=parent, name=stage.name)(x, train=train)
    return x
