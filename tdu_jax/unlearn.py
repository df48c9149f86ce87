"""The unlearning pipeline: importance -> top-K (or random-K) -> T decay steps -> fine-tune.

``unlearn`` is one pure function of (model, params, batch_stats, data, config, key);
baselines go through it too: random-K (``selection='random'``), fine-tune only
(``decay_steps=0``), and ``retrain_from_scratch`` on the retain set.

``unlearn`` is a thin loop over public step functions on an immutable ``UnlearnState``,
so a run can be driven by hand::

    setup, state = init_unlearn(model, params, batch_stats, dataset="mnist",
                                data_in=data_in, config=config, key=key)
    state = select_units(setup, state)
    for _ in range(config.decay_steps):
        state = decay_once(setup, state)
    state = evaluate_state(setup, finetune_once(setup, state))
    result = unlearn_result(setup, state)
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
    topk_budget: str = "global"  # "global" | "per_layer": K over layers (decay.rank_units)
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
    importance_score: str = "forget"  # tdu_jax.selective.IMPORTANCE_SCORES
    selective_beta: float = 1.0  # weight of the retain-sample drop in the selective score


class UnlearnData(NamedTuple):
    """What the pipeline reads: uint8 splits and the forget classes."""

    importance_sample: data.Split
    retain_train: data.Split
    test: data.Split
    forget_classes: tuple[int, ...]
    retain_sample: data.Split | None = None  # retain-class sample of the retain-relative scores


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
    decay.check_topk_budget(config.topk_budget)
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


def config_units(params: PyTree, config: UnlearnConfig) -> units.UnitSpec:
    """The units ``config`` can choose from (granularity, include/exclude, BatchNorm pairs)."""
    return units.enumerate_units(
        params,
        config.granularity,
        config.include,
        config.exclude,
        config.include_bn,
        bn_pairs=config.bn_pairs,
    )


def planned_finetune_batches(config: UnlearnConfig) -> int:
    """Fine-tune batches the config will spend (after_each: per step x steps)."""
    if config.finetune == "after_each":
        return config.finetune_batches * config.decay_steps
    return config.finetune_batches if config.finetune == "after_all" else 0


class Timings(NamedTuple):
    """Wall-clock seconds spent so far, per phase."""

    importance: float = 0.0
    decay: float = 0.0
    finetune: float = 0.0
    eval: float = 0.0


class UnlearnSetup(NamedTuple):
    """What stays fixed through one run; ``init_unlearn`` builds it after validating."""

    model: nn.Module
    config: UnlearnConfig
    data_in: UnlearnData
    spec: units.UnitSpec  # the candidate units of params
    dataset: str | None
    preprocess: Callable | None
    loss_fn: Callable | None
    prep: Callable  # stored images -> model inputs (from dataset / preprocess)
    sample_x: Any  # the importance sample as model inputs, (N, ...)
    sample_y: np.ndarray  # its labels, int32 (N,)
    select_key: jax.Array  # random-K selection
    finetune_key: jax.Array  # order of the fine-tune batch stream
    precomputed: importance.Importance | None  # importance of the input params, to reuse
    event: Event


class UnlearnState(NamedTuple):
    """A run so far. Step functions return a new state and leave their input as it was."""

    params: PyTree
    batch_stats: PyTree
    selected: np.ndarray  # int64 (K,): sorted global unit indices to decay (empty: none yet)
    importance: importance.Importance | None  # the last importance computed or reused
    step: int  # decay steps done
    finetune_batches: int  # fine-tune batches spent: the batch stream's position
    history: tuple[dict, ...]  # one record per evaluate_state
    timings: Timings


def _no_event(phase: str, info: dict) -> None:
    pass


def _add_seconds(timings: Timings, phase: str, start: float) -> Timings:
    return timings._replace(**{phase: getattr(timings, phase) + (time.perf_counter() - start)})


def init_unlearn(
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
) -> tuple[UnlearnSetup, UnlearnState]:
    """Validates a run and returns its setup and its state before any step.

    Arguments as ``unlearn``. Raises ValueError on a bad config or a missing sample, before
    any work.

    Returns:
      ``(setup, state)``: ``state`` holds the input params and batch_stats (not copied, never
      modified), step 0, no units selected, no fine-tune batches, an empty history.
    """
    spec = config_units(params, config)
    validate_unlearn_config(config, spec.num_units)
    if data_in.importance_sample.size == 0 and config.selection == "topk":
        raise ValueError("importance sample is empty")
    if selective.needs_retain_sample(config.importance_score) and config.selection == "topk":
        if data_in.retain_sample is None or data_in.retain_sample.size == 0:
            raise ValueError(
                f"importance_score={config.importance_score} needs a non-empty retain_sample"
            )
    select_key, finetune_key = jax.random.split(key)
    prep = adapters.preprocess_fn(dataset, preprocess)
    setup = UnlearnSetup(
        model=model,
        config=config,
        data_in=data_in,
        spec=spec,
        dataset=dataset,
        preprocess=preprocess,
        loss_fn=loss_fn,
        prep=prep,
        sample_x=prep(data_in.importance_sample.images),
        sample_y=np.asarray(data_in.importance_sample.labels, np.int32),
        select_key=select_key,
        finetune_key=finetune_key,
        precomputed=precomputed,
        event=event or _no_event,
    )
    state = UnlearnState(
        params=params,
        batch_stats=batch_stats,
        selected=np.zeros(0, np.int64),
        importance=None,
        step=0,
        finetune_batches=0,
        history=(),
        timings=Timings(),
    )
    return setup, state


def evaluate_state(setup: UnlearnSetup, state: UnlearnState) -> UnlearnState:
    """Appends a history record of the current model and reports it as a ``step`` event.

    The record holds ``step`` and ``finetune_batches`` and, with ``config.evaluate_each_step``,
    ``forget_acc``/``retain_acc``/``test_acc`` (% on ``data_in.test``).
    """
    record = {"step": state.step, "finetune_batches": state.finetune_batches}
    timings = state.timings
    if setup.config.evaluate_each_step:
        start = time.perf_counter()
        acc = metrics.evaluate(
            setup.model,
            state.params,
            state.batch_stats,
            setup.data_in.test,
            dataset=setup.dataset,
            forget_classes=setup.data_in.forget_classes,
            preprocess=setup.preprocess,
        )
        record.update({k: acc[k] for k in ("forget_acc", "retain_acc", "test_acc")})
        timings = _add_seconds(timings, "eval", start)
    setup.event("step", record)
    return state._replace(history=(*state.history, record), timings=timings)


def _score(
    setup: UnlearnSetup, state: UnlearnState, images_x: Any, labels_y: np.ndarray
) -> importance.Importance:
    return importance.ablation_importance(
        setup.model,
        state.params,
        state.batch_stats,
        images_x,
        labels_y,
        setup.spec,
        unit_chunk=setup.config.unit_chunk,
        sample_batch=setup.config.sample_batch,
        loss_fn=setup.loss_fn,
        progress=lambda done, total, s: setup.event(
            "importance", {"done": done, "total": total, "seconds": s}
        ),
    )


def select_units(setup: UnlearnSetup, state: UnlearnState) -> UnlearnState:
    """Chooses the units to decay: top-K by importance of the current params, or random-K.

    Top-K reuses ``setup.precomputed`` while the params are still the input ones (no decay
    step and no fine-tuning yet); otherwise it scores every unit on the importance sample
    (and, for the selective score, on the retain sample). Random-K draws with
    ``setup.select_key`` and computes no importance.

    Returns:
      state with ``selected`` (int64 (K,), sorted global unit indices) and ``importance``
      (None for random-K).
    """
    config = setup.config
    if config.selection == "random":
        selected = decay.select_random_k(setup.select_key, setup.spec.num_units, config.top_k)
        return state._replace(selected=selected, importance=None)
    if setup.precomputed is not None and state.step == 0 and state.finetune_batches == 0:
        if setup.precomputed.units.size != setup.spec.num_units:
            raise ValueError("precomputed importance does not cover every unit of params")
        selected = decay.select_top_k(
            setup.precomputed, config.top_k, config.topk_budget, setup.spec
        )
        return state._replace(selected=selected, importance=setup.precomputed)
    start = time.perf_counter()
    imp = _score(setup, state, setup.sample_x, setup.sample_y)
    if selective.needs_retain_sample(config.importance_score):

        def score(split):  # one engine pass on a retain split
            labels = np.asarray(split.labels, np.int32)
            return _score(setup, state, setup.prep(split.images), labels)

        retain = setup.data_in.retain_sample
        if config.importance_score == selective.WORST_CLASS_RATIO:  # one pass per class
            retain_imp = [score(part) for part in selective.split_by_class(retain)]
        else:
            retain_imp = score(retain)
        imp = selective.combine(config.importance_score, imp, retain_imp, config.selective_beta)
    timings = _add_seconds(state.timings, "importance", start)
    selected = decay.select_top_k(imp, config.top_k, config.topk_budget, setup.spec)
    return state._replace(selected=selected, importance=imp, timings=timings)


def decay_once(setup: UnlearnSetup, state: UnlearnState) -> UnlearnState:
    """One decay step: the selected units' entries times ``exp(-lam * dt)``, others unchanged.

    Returns:
      state with the decayed params and ``step`` + 1 (nothing selected: params unchanged).
    """
    start = time.perf_counter()
    mask = units.unit_mask(state.params, setup.spec, state.selected)
    params = decay.decay_step(state.params, mask, setup.config.lam, setup.config.dt)
    timings = _add_seconds(state.timings, "decay", start)
    return state._replace(params=params, step=state.step + 1, timings=timings)


def finetune_once(
    setup: UnlearnSetup, state: UnlearnState, num_batches: int | None = None
) -> UnlearnState:
    """Fine-tunes on the retain train set with a fresh optimizer; the batch stream continues.

    Args:
      setup: the run's setup.
      state: the run so far; its ``finetune_batches`` is the stream position to start at.
      num_batches: batches to run, >= 0 (default: ``config.finetune_batches``).

    Returns:
      state with the fine-tuned params and batch_stats and ``finetune_batches`` +
      ``num_batches`` (0 batches: ``state`` itself).
    """
    config = setup.config
    num_batches = config.finetune_batches if num_batches is None else num_batches
    if num_batches == 0:
        return state
    start = time.perf_counter()
    params, batch_stats, _ = train.fine_tune(
        setup.model,
        state.params,
        state.batch_stats,
        setup.data_in.retain_train,
        dataset=setup.dataset,
        config=config.finetune_optimizer,
        num_batches=num_batches,
        batch_size=config.batch_size,
        key=setup.finetune_key,
        augment=config.augment,
        start_batch=state.finetune_batches,
        preprocess=setup.preprocess,
        loss_fn=setup.loss_fn,
        progress=lambda done, total, m: setup.event(
            "finetune", {"done": done, "total": total, **m}
        ),
    )
    return state._replace(
        params=params,
        batch_stats=batch_stats,
        finetune_batches=state.finetune_batches + num_batches,
        timings=_add_seconds(state.timings, "finetune", start),
    )


def unlearn_result(setup: UnlearnSetup, state: UnlearnState) -> UnlearnResult:
    """The ``UnlearnResult`` of a state (history as a list, timings as a dict)."""
    return UnlearnResult(
        params=state.params,
        batch_stats=state.batch_stats,
        selected=state.selected,
        importance=state.importance,
        spec=setup.spec,
        history=list(state.history),
        finetune_batches=state.finetune_batches,
        timings=state.timings._asdict(),
    )


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

    A loop over the step functions (``init_unlearn``, ``evaluate_state``, ``select_units``,
    ``decay_once``, ``finetune_once``, ``unlearn_result``); call them to drive a run by hand.

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
    setup, state = init_unlearn(
        model, params, batch_stats, dataset=dataset, data_in=data_in, config=config, key=key,
        event=event, precomputed=precomputed, preprocess=preprocess, loss_fn=loss_fn,
    )  # fmt: skip
    state = evaluate_state(setup, state)
    if config.decay_steps > 0:
        state = select_units(setup, state)
    for step in range(1, config.decay_steps + 1):
        if config.reestimate and step > 1 and config.selection == "topk":
            state = select_units(setup, state)  # params have decayed since
        state = decay_once(setup, state)
        if config.finetune == "after_each":
            state = finetune_once(setup, state)
        if step < config.decay_steps or config.finetune != "after_all":
            state = evaluate_state(setup, state)
    if config.finetune == "after_all":
        state = evaluate_state(setup, finetune_once(setup, state))
    return unlearn_result(setup, state)


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

    The pipeline's own scoring (``init_unlearn`` then ``select_units``, no decay), so a caller
    can size the decay (``tdu_jax.calibrate``) before the real run reuses it (``precomputed``).
    """
    scoring = config._replace(
        decay_steps=1, lam=0.0, selection="topk", reestimate=False, finetune="none",
        finetune_batches=0, evaluate_each_step=False, top_k=1,
    )  # fmt: skip
    setup, state = init_unlearn(
        model, params, batch_stats, dataset=dataset, data_in=data_in, config=scoring,
        key=jax.random.key(0), preprocess=preprocess, loss_fn=loss_fn,
    )  # fmt: skip
    return select_units(setup, state).importance, setup.spec


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
