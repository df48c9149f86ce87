"""The unlearning pipeline: importance -> top-K (or random-K) -> T decay steps -> fine-tune.

``unlearn`` is one pure function of (model, params, batch_stats, data, config, key);
baselines go through it too: random-K (``selection='random'``), fine-tune only
(``decay_steps=0``), and ``retrain_from_scratch`` on the retain set.
"""

import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import numpy as np

from tdu_jax import adapters, data, decay, importance, metrics, selective, train, units

PyTree = Any
FINETUNE_MODES = ("none", "after_all", "after_each")
Event = Callable[[str, dict], None]  # event(phase, info): progress hook for the caller

DEFAULT_FINETUNE_OPTIMIZER = train.OptimizerConfig(
    name="sgd", learning_rate=0.01, momentum=0.9, weight_decay=5e-4, schedule="constant"
)


class UnlearnConfig(NamedTuple):
    """Every setting of one unlearning run (defaults: the LeNet/MNIST choice)."""

    granularity: str = "weight"
    top_k: int | float = 1000  # count, or fraction of units as a float in (0, 1]
    selection: str = "topk"  # "topk" | "random"
    lam: float = 0.1  # decay rate lambda
    dt: float = 1.0  # time per decay step
    decay_steps: int = 7
    reestimate: bool = False  # recompute importance (and the top-K) before every step
    include: str | None = None  # regex over layer names whose units may be chosen
    exclude: str | None = None
    include_bn: bool = True  # filter units take the paired BatchNorm channel too
    bn_pairs: tuple[tuple[str, str | None], ...] | None = None  # explicit (layer, BN) pairs
    finetune: str = "none"  # "none" | "after_all" | "after_each"
    finetune_batches: int = 0  # after_all: in total; after_each: after every step
    finetune_optimizer: train.OptimizerConfig = DEFAULT_FINETUNE_OPTIMIZER
    batch_size: int = 128
    augment: bool = False
    evaluate_each_step: bool = True
    unit_chunk: int = 256
    sample_batch: int = 1024
    importance_score: str = "forget"  # "forget" | "selective" (see tdu_jax.selective)
    selective_beta: float = 1.0  # weight of the retain-sample drop in the selective score


class UnlearnData(NamedTuple):
    """What the pipeline reads: uint8 splits and the forget classes."""

    importance_sample: data.Split
    retain_train: data.Split
    test: data.Split
    forget_classes: tuple[int, ...]
    retain_sample: data.Split | None = None  # importance_score="selective": retain-class sample


class UnlearnResult(NamedTuple):
    params: PyTree
    batch_stats: PyTree
    selected: np.ndarray  # global unit indices decayed at the last step
    importance: importance.Importance | None  # the last importance computed
    spec: units.UnitSpec
    history: list[dict]  # per decay step (step 0 = before any decay)
    finetune_batches: int
    timings: dict  # seconds per phase: importance, decay, finetune, eval


def validate_unlearn_config(config: UnlearnConfig, num_units: int | None = None) -> None:
    """Raises ValueError naming the bad setting and its allowed values."""
    units.check_granularity(config.granularity)
    selective.check_importance_score(config.importance_score)
    if not config.selective_beta >= 0:
        raise ValueError(f"selective_beta must be >= 0; got {config.selective_beta}")
    if config.selection not in decay.SELECTIONS:
        raise ValueError(
            f"selection must be one of {', '.join(decay.SELECTIONS)}; got {config.selection!r}"
        )
    decay.check_decay_args(config.lam, config.dt, config.decay_steps)
    if num_units is not None:
        decay.resolve_k(config.top_k, num_units)
    elif isinstance(config.top_k, float) and not 0 < config.top_k <= 1:
        raise ValueError(f"top_k as a fraction must be in (0, 1]; got {config.top_k}")
    elif isinstance(config.top_k, int) and config.top_k < 1:
        raise ValueError(f"top_k must be >= 1; got {config.top_k}")
    if config.finetune not in FINETUNE_MODES:
        raise ValueError(
            f"finetune must be one of {', '.join(FINETUNE_MODES)}; got {config.finetune!r}"
        )
    if config.finetune_batches < 0:
        raise ValueError(f"finetune_batches must be >= 0; got {config.finetune_batches}")
    if config.finetune == "none" and config.finetune_batches:
        raise ValueError(
            f"finetune=none conflicts with finetune_batches={config.finetune_batches}; "
            "set finetune to after_all or after_each, or finetune_batches to 0"
        )
    if config.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {config.batch_size}")
    train.validate_optimizer_config(config.finetune_optimizer)


def planned_finetune_batches(config: UnlearnConfig) -> int:
    """Fine-tune batches the config will spend (after_each: per step x steps)."""
    if config.finetune == "after_each":
        return config.finetune_batches * config.decay_steps
    return config.finetune_batches if config.finetune == "after_all" else 0


def unlearn(
    model: nn.Module,
    params: PyTree,
    batch_stats: PyTree,
    *,
    dataset: str | None = None,
    data_in: UnlearnData,
    config: UnlearnConfig,
    key: jax.Array,
    event: Event | None = None,
    precomputed: importance.Importance | None = None,
    preprocess: Callable | None = None,
    loss_fn: Callable | None = None,
) -> UnlearnResult:
    """Runs one unlearning configuration from a trained model.

    Args:
      model: the Flax model (``stages()`` gives the fast importance path).
      params: trained params (not modified).
      batch_stats: BatchNorm statistics ({} if none); fine-tuning updates them.
      dataset: dataset name (normalisation of uint8 images), or None with ``preprocess``
        (or neither: the splits hold model inputs, e.g. float images).
      data_in: importance sample, retain train set, test split, forget classes.
      config: the run's settings.
      key: PRNG key (random-K selection and fine-tune batch order).
      event: optional ``event(phase, info)`` hook for progress reporting.
      precomputed: importance of all units of ``params`` on this sample, to reuse
        across runs (ignored by random selection; re-estimation still recomputes).
      preprocess: images -> model inputs, instead of ``dataset``.
      loss_fn: per-example ``loss_fn(logits, labels)`` for importance and fine-tuning
        (default: cross-entropy).

    Returns:
      ``UnlearnResult``; history entries hold ``step``, ``finetune_batches`` and, when
      ``evaluate_each_step``, ``forget_acc``/``retain_acc``/``test_acc`` (% on test).
    """
    spec = units.enumerate_units(
        params,
        config.granularity,
        config.include,
        config.exclude,
        config.include_bn,
        bn_pairs=config.bn_pairs,
    )
    validate_unlearn_config(config, spec.num_units)
    if data_in.importance_sample.size == 0 and config.selection == "topk":
        raise ValueError("importance sample is empty")
    if config.importance_score == "selective" and config.selection == "topk":
        if data_in.retain_sample is None or data_in.retain_sample.size == 0:
            raise ValueError("importance_score=selective needs a non-empty retain_sample")
    emit = event or (lambda phase, info: None)
    select_key, finetune_key = jax.random.split(key)
    timings = dict.fromkeys(("importance", "decay", "finetune", "eval"), 0.0)
    prep = adapters.preprocess_fn(dataset, preprocess)
    sample_x = prep(data_in.importance_sample.images)
    sample_y = np.asarray(data_in.importance_sample.labels, np.int32)
    history: list[dict] = []
    spent = 0

    def evaluate(step: int) -> None:
        record = {"step": step, "finetune_batches": spent}
        if config.evaluate_each_step:
            start = time.perf_counter()
            acc = metrics.evaluate(
                model,
                params,
                batch_stats,
                data_in.test,
                dataset=dataset,
                forget_classes=data_in.forget_classes,
                preprocess=preprocess,
            )
            record.update({k: acc[k] for k in ("forget_acc", "retain_acc", "test_acc")})
            timings["eval"] += time.perf_counter() - start
        history.append(record)
        emit("step", record)

    def score(images_x, labels_y) -> importance.Importance:
        return importance.ablation_importance(
            model,
            params,
            batch_stats,
            images_x,
            labels_y,
            spec,
            unit_chunk=config.unit_chunk,
            sample_batch=config.sample_batch,
            loss_fn=loss_fn,
            progress=lambda done, total, s: emit(
                "importance", {"done": done, "total": total, "seconds": s}
            ),
        )

    def select(reuse: bool) -> tuple[np.ndarray, importance.Importance | None]:
        if config.selection == "random":
            return decay.select_random_k(select_key, spec.num_units, config.top_k), None
        if reuse and precomputed is not None:
            if precomputed.units.size != spec.num_units:
                raise ValueError("precomputed importance does not cover every unit of params")
            return decay.select_top_k(precomputed, config.top_k), precomputed
        start = time.perf_counter()
        imp = score(sample_x, sample_y)
        if config.importance_score == "selective":
            retain_x = prep(data_in.retain_sample.images)
            retain_y = np.asarray(data_in.retain_sample.labels, np.int32)
            imp = selective.selective_importance(
                imp, score(retain_x, retain_y), config.selective_beta
            )
        timings["importance"] += time.perf_counter() - start
        return decay.select_top_k(imp, config.top_k), imp

    def finetune(num_batches: int) -> None:
        nonlocal params, batch_stats, spent
        if num_batches == 0:
            return
        start = time.perf_counter()
        params, batch_stats, _ = train.fine_tune(
            model,
            params,
            batch_stats,
            data_in.retain_train,
            dataset=dataset,
            config=config.finetune_optimizer,
            num_batches=num_batches,
            batch_size=config.batch_size,
            key=finetune_key,
            augment=config.augment,
            start_batch=spent,
            preprocess=preprocess,
            loss_fn=loss_fn,
            progress=lambda done, total, m: emit("finetune", {"done": done, "total": total, **m}),
        )
        spent += num_batches
        timings["finetune"] += time.perf_counter() - start

    evaluate(0)
    selected, imp = np.zeros(0, np.int64), None
    if config.decay_steps > 0:
        selected, imp = select(reuse=True)
    for step in range(1, config.decay_steps + 1):
        if config.reestimate and step > 1 and config.selection == "topk":
            selected, imp = select(reuse=False)  # params have decayed since
        start = time.perf_counter()
        mask = units.unit_mask(params, spec, selected)
        params = decay.decay_step(params, mask, config.lam, config.dt)
        timings["decay"] += time.perf_counter() - start
        if config.finetune == "after_each":
            finetune(config.finetune_batches)
        if step < config.decay_steps or config.finetune != "after_all":
            evaluate(step)
    if config.finetune == "after_all":
        finetune(config.finetune_batches)
        evaluate(config.decay_steps)
    return UnlearnResult(params, batch_stats, selected, imp, spec, history, spent, timings)


def request_importance(
    model: nn.Module,
    params: PyTree,
    batch_stats: PyTree,
    *,
    dataset: str | None,
    data_in: UnlearnData,
    config: UnlearnConfig,
    preprocess: Callable | None = None,
    loss_fn: Callable | None = None,
) -> tuple[importance.Importance, units.UnitSpec]:
    """Importance of every unit for the request (``config.importance_score``) and the unit spec.

    The pipeline's own scoring, run once with one no-op decay step (lambda = 0), so a caller
    can size the decay (``tdu_jax.calibrate``) before the real run reuses it (``precomputed``).
    """
    scoring = config._replace(
        decay_steps=1, lam=0.0, selection="topk", reestimate=False, finetune="none",
        finetune_batches=0, evaluate_each_step=False, top_k=1,
    )  # fmt: skip
    result = unlearn(
        model, params, batch_stats, dataset=dataset, data_in=data_in, config=scoring,
        key=jax.random.key(0), preprocess=preprocess, loss_fn=loss_fn,
    )  # fmt: skip
    return result.importance, result.spec


def retrain_from_scratch(
    model: nn.Module,
    retain_train: data.Split,
    *,
    dataset: str,
    config: train.OptimizerConfig,
    epochs: int,
    batch_size: int,
    key: jax.Array,
    augment: bool = False,
    progress: train.ProgressFn | None = None,
) -> tuple[PyTree, PyTree, list[dict]]:
    """The gold standard: a fresh model trained on the retain set only.

    ``key`` splits as the base model's does (init, then training), so with the base model's
    seed the retrained model starts from the same initialisation. Returns (params,
    batch_stats, per-epoch history); ``progress`` as in ``train.train``.
    """
    from tdu_jax import models  # local: models is a package of its own

    init_key, train_key = jax.random.split(key)
    params, batch_stats = models.init_variables(model, init_key, data.image_shape(dataset))
    return train.train(
        model,
        params,
        batch_stats,
        retain_train,
        dataset=dataset,
        config=config,
        epochs=epochs,
        batch_size=batch_size,
        key=train_key,
        augment=augment,
        progress=progress,
    )


def epochs_to_batches(epochs: float, retain_size: int, batch_size: int) -> int:
    """Fine-tune batches in ``epochs`` epochs of the retain set (352 for CIFAR, B=128).

    An epoch counts its last, partial batch: ``ceil(retain_size / batch_size)`` batches.
    """
    return int(math.ceil(epochs * -(-retain_size // batch_size)))
