"""Unlearning methods, ours and peers', on one signature.

`fn(model, params, batch_stats, data_in, key, config, *, dataset) -> MethodResult`; the table
`METHODS` maps each name to (fn, config type) and `run_method` runs one by name. The functions
live in their modules (`finetune.ft`, `ssd.ssd`, `salun.salun`, `scrub.scrub`, `ours.decay`,
...), which stay reachable as `tdu_jax.methods.<module>`.
"""

from tdu_jax.methods.base import MethodData, MethodResult
from tdu_jax.methods.finetune import (
    FTConfig,
    GAConfig,
    L1SparseConfig,
    NegGradPlusConfig,
    RLConfig,
)
from tdu_jax.methods.ours import DecayConfig, RetrainConfig
from tdu_jax.methods.registry import METHODS, run_method
from tdu_jax.methods.salun import SalUnConfig
from tdu_jax.methods.scrub import ScrubConfig
from tdu_jax.methods.ssd import SSDConfig

__all__ = [
    "METHODS",
    "DecayConfig",
    "FTConfig",
    "GAConfig",
    "L1SparseConfig",
    "MethodData",
    "MethodResult",
    "NegGradPlusConfig",
    "RLConfig",
    "RetrainConfig",
    "SSDConfig",
    "SalUnConfig",
    "ScrubConfig",
    "run_method",
]
