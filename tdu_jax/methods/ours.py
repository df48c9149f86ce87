"""Our method and the gold standard on the shared signature: `decay` and `retrain`.

`decay` wraps `unlearn.unlearn` (importance -> top-K -> decay steps -> optional retain
fine-tuning, in any of its fine-tune modes); `retrain` wraps `unlearn.retrain_from_scratch`.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import numpy as np

from tdu_jax import calibrate, calibrated, data, selective, train, unlearn
from tdu_jax.methods import base
from tdu_jax.methods.base import MethodData, MethodResult, PyTree

# LeNet/MNIST base training (BUILD_NOTES): AdamW lr 2e-3, cosine, no weight decay.
LENET_TRAIN_OPTIMIZER = train.OptimizerConfig(
    name="adam", learning_rate=2e-3, weight_decay=0.0, schedule="cosine"
)


class DecayConfig(NamedTuple):
    """decay settings.

    Attributes:
      unlearn: the pipeline's settings (granularity, K, lambda, dt, steps, fine-tune mode and
        batches...); per-step evaluation is off, since the method reports no test metrics.
      importance_fraction: share of the forget train set used as the importance sample, in
        (0, 1] (a seeded random subset drawn from the method's key when < 1).
    """

    unlearn: unlearn.UnlearnConfig = unlearn.UnlearnConfig(evaluate_each_step=False)
    importance_fraction: float = 1.0
    retain_sample_size: int = 1000  # retain images of the retain-relative importance scores
    calibrate: bool = False  # size K and dt by the train-split sweep (tdu_jax.calibrate)
    sweep_top_k: tuple = (300, 1000, 3000)
    sweep_dt: tuple = (0.25, 0.5, 1.0)
    sweep_forget_max: float = 5.0
    sweep_search_steps: int = 0  # per K, the gentlest silencing dt (calibrate.search_dt)
    sweep_retain_size: int = 10000  # retain-train images scored per sweep point (0: all)
    sweep_forget_size: int = 0  # forget-train images scored per sweep point (0: all)
    # With calibrate and fine-tuning: confirm the point through the run's own fine-tuning
    # (calibrate.choose_after_finetune), so the class does not come back.
    calibrate_finetune: bool = True
    dt_margin: float = 1.0  # with calibrate: the run's dt = the chosen dt x this (>= 1)
    # With calibrate: retain-train points a margin may cost (calibrate.guard_margin); None: off.
    dt_guard: float | None = None


class RetrainConfig(NamedTuple):
    """retrain settings: training from a fresh initialisation on the retain set only.

    Defaults are the project's LeNet/MNIST base training (8 epochs, batch 128).
    """

    optimizer: train.OptimizerConfig = LENET_TRAIN_OPTIMIZER
    epochs: int = 8
    batch_size: int = 128
    augment: bool = False


def decay(
    model: nn.Module,
    params: PyTree,
    batch_stats: PyTree,
    data_in: MethodData,
    key: jax.Array,
    config: DecayConfig,
    *,
    dataset: str,
) -> MethodResult:
    """Time-inspired decay of the units most important to the forget classes (ours).

    Returns:
      MethodResult; info adds `decayed_units` (K), `num_units`, `importance_sample` (size),
      `finetune` (mode) and `timings` (seconds per phase: importance, calibration — the
      sweep and its checks through fine-tuning —, decay, finetune, eval).
    """
    base.check_data(data_in)
    if not 0.0 < config.importance_fraction <= 1.0:
        raise ValueError(
            f"importance_fraction must be in (0, 1]; got {config.importance_fraction}."
        )
    if not config.dt_margin >= 1:
        raise ValueError(f"dt_margin must be >= 1; got {config.dt_margin}")
    if config.dt_guard is not None and not config.dt_guard >= 0:
        raise ValueError(f"dt_guard must be None or >= 0 (retain-train points); "
                         f"got {config.dt_guard}")  # fmt: skip
    timer = base.Timer()
    sample_key, run_key = jax.random.split(key)
    sample = data_in.forget_train
    if config.importance_fraction < 1.0:
        sample = data.random_fraction(
            sample,
            config.importance_fraction,
            int(jax.random.randint(sample_key, (), 0, np.iinfo(np.int32).max)),
        )
    seed = int(jax.random.randint(sample_key, (), 0, np.iinfo(np.int32).max))
    scores_retain = selective.needs_retain_sample(config.unlearn.importance_score)
    unlearn_data = unlearn.UnlearnData(
        importance_sample=sample,
        retain_train=data_in.retain_train,
        test=base.empty_split(data_in.retain_train),
        forget_classes=tuple(data_in.forget_classes),
        retain_sample=selective.retain_sample(
            data_in.retain_train, config.retain_sample_size, seed, config.unlearn.importance_score
        )
        if scores_retain
        else None,
    )
    ucfg, precomputed, sweep, phases = config.unlearn, None, None, {}
    if config.calibrate and ucfg.decay_steps > 0:
        # Importance first (no decay steps), then the sweep picks K and dt for this request.
        phase = base.Timer()
        precomputed, spec = unlearn.request_importance(
            model, params, batch_stats, dataset=dataset, data_in=unlearn_data, config=ucfg
        )
        jax.block_until_ready(precomputed)
        phases["importance"] = phase.seconds()
        phase = base.Timer()
        scored = calibrate.subsample(data_in.retain_train, config.sweep_retain_size, seed)
        scored_forget = calibrate.subsample(data_in.forget_train, config.sweep_forget_size, seed)
        sweep = calibrate.sweep_decay(
            model, params, batch_stats, dataset=dataset, forget_train=scored_forget,
            retain_train=scored, imp=precomputed, spec=spec, top_ks=config.sweep_top_k,
            dts=config.sweep_dt, lam=ucfg.lam, decay_steps=ucfg.decay_steps,
            forget_max=config.sweep_forget_max, search_steps=config.sweep_search_steps,
            budget=ucfg.topk_budget,
        )  # fmt: skip
        run = calibrated.finetune_check_run(model, params, batch_stats, data_in=unlearn_data,
                                            config=ucfg, key=run_key, precomputed=precomputed,
                                            dataset=dataset)  # fmt: skip
        after = calibrate.scores_after_run(
            model, run, dataset=dataset, forget_train=scored_forget, retain_train=scored
        )
        if config.calibrate_finetune and ucfg.finetune != "none":
            sweep = calibrate.choose_after_finetune(sweep, after)
        if config.dt_guard is None:
            sweep = {**sweep, "dt_margin": config.dt_margin}
        else:
            sweep = calibrate.guard_margin(sweep, after, config.dt_margin, config.dt_guard)
        ucfg = ucfg._replace(**calibrate.run_point(sweep, sweep["dt_margin"]))
        phases["calibration"] = phase.seconds()
    result = unlearn.unlearn(
        model,
        params,
        batch_stats,
        dataset=dataset,
        data_in=unlearn_data,
        config=ucfg,
        key=run_key,
        precomputed=precomputed,
    )
    info = {
        "gradient_steps": result.finetune_batches,
        "retain_batches": result.finetune_batches,
        "decayed_units": int(np.size(result.selected)),
        "num_units": result.spec.num_units,
        "importance_sample": sample.size,
        "finetune": config.unlearn.finetune,
        "timings": {**result.timings, **phases},  # the importance computed here counts
        "calibration": sweep,
        "seconds": timer.seconds(),
    }
    return MethodResult(result.params, result.batch_stats, info)


def retrain(
    model: nn.Module,
    params: PyTree,
    batch_stats: PyTree,
    data_in: MethodData,
    key: jax.Array,
    config: RetrainConfig,
    *,
    dataset: str,
) -> MethodResult:
    """The gold standard: a fresh model trained on the retain set only.

    `params` and `batch_stats` are ignored (a new initialisation comes from `key`); the forget
    set is never read. Raises ValueError if the retain set holds a forget-class example.

    Returns:
      MethodResult; info adds `epochs` and `loss` (mean CE of the last epoch, nats).
    """
    del params, batch_stats  # the gold standard starts from scratch
    base.check_data(data_in)
    retain = data_in.retain_train
    leaked = np.isin(retain.labels, np.asarray(data_in.forget_classes))
    if leaked.any():
        raise ValueError(
            f"retain_train holds {int(leaked.sum())} examples of the forget classes "
            f"{data_in.forget_classes}; retrain must never see them."
        )
    timer = base.Timer()
    batch_size = base.effective_batch(config.batch_size, retain.size)
    new_params, new_stats, history = unlearn.retrain_from_scratch(
        model,
        retain,
        dataset=dataset,
        config=config.optimizer,
        epochs=config.epochs,
        batch_size=batch_size,
        key=key,
        augment=config.augment,
    )
    steps = config.epochs * (retain.size // batch_size)
    info = {
        "gradient_steps": steps,
        "retain_batches": steps,
        "epochs": config.epochs,
        "loss": history[-1]["loss"] if history else float("nan"),
        "seconds": timer.seconds(),
    }
    return MethodResult(new_params, new_stats, info)
