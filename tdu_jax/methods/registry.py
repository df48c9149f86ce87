"""The method table: name -> (function, config type), and `run_method`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax

from tdu_jax.methods import finetune, ours, salun, scrub, ssd
from tdu_jax.methods.base import MethodData, MethodResult, PyTree

# Every function: fn(model, params, batch_stats, data_in, key, config, *, dataset) -> MethodResult.
METHODS: dict[str, tuple[Callable[..., MethodResult], type]] = {
    "retrain": (ours.retrain, ours.RetrainConfig),
    "decay": (ours.decay, ours.DecayConfig),
    "ft": (finetune.ft, finetune.FTConfig),
    "ga": (finetune.ga, finetune.GAConfig),
    "neggrad_plus": (finetune.neggrad_plus, finetune.NegGradPlusConfig),
    "rl": (finetune.rl, finetune.RLConfig),
    "l1_sparse": (finetune.l1_sparse, finetune.L1SparseConfig),
    "ssd": (ssd.ssd, ssd.SSDConfig),
    "salun": (salun.salun, salun.SalUnConfig),
    "scrub": (scrub.scrub, scrub.ScrubConfig),
}


def run_method(
    name: str,
    model: nn.Module,
    params: PyTree,
    batch_stats: PyTree,
    data_in: MethodData,
    key: jax.Array,
    config: Any = None,
    *,
    dataset: str,
) -> MethodResult:
    """Runs method `name` with `config` (None: its config type's defaults).

    Args:
      name: a key of `METHODS`.
      model, params, batch_stats: the trained model (inputs are not modified).
      data_in: forget and retain train sets, forget classes, number of classes.
      key: PRNG key of the run.
      config: an instance of the method's config type, or None.
      dataset: dataset name (normalisation).

    Returns:
      The method's MethodResult.
    """
    if name not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {name!r}.")
    fn, config_type = METHODS[name]
    if config is None:
        config = config_type()
    elif not isinstance(config, config_type):
        raise TypeError(
            f"method {name!r} takes a {config_type.__name__}; got {type(config).__name__}."
        )
    return fn(model, params, batch_stats, data_in, key, config, dataset=dataset)
