"""One call that forgets classes from any model and sizes the decay itself.

``forget`` is the method as the experiments run it with ``--calibrate``, for a model of the
user's own (``from_linen``, ``from_nnx``, ``from_function``): importance of every unit on the
forget-class training images, the train-split sweep that picks K (how many units) and Δt (how
hard they decay) per request (``tdu_jax.calibrate``), then the decay, and the fine-tuning the
config asks for, with the chosen pair::

    out = tdu.forget(model, params, state, train=train_split, forget_classes=(3,),
                     key=jax.random.key(0), preprocess=preprocess)
    out.calibration["chosen"]              # {"top_k": ..., "dt": ...}
    out.unlearned.params, out.unlearned.batch_stats

Test data is never looked at. Nothing is cached or written: the experiments add their caches
and records around the same steps (``experiments/common.run_one``).

Defaults (``DECAY_ONLY``, ``SweepConfig``) are LeNet/MNIST's measured choices (BUILD_NOTES):
without fine-tuning the ratio score (forget loss increase per retain loss increase, on
``retain_sample_size`` retain images) on a per-layer top-K budget, under a 0.5% forget-train
ceiling; with fine-tuning a 1% ceiling, checked through the run's own fine-tuning. The run
decays with the chosen point itself: a harder decay (``SweepConfig.dt_margin``, the chosen Δt
× m) brings relearning nearer a retrained model's but can cost retain accuracy fine-tuning does
not give back (held out: up to 8 points on a request, 2 on a model's mean), so it is opt-in,
best with ``margin_guard`` (the margins checked through the run on the training split). K is a
grid of fractions of the units, so it fits any model's size.

The sweep's rule sees accuracies only. Where the forget classes' own output units are
candidates (their row of the head; the tables keep them), a decay-only sweep over few, coarse
units (filters of a small CNN) may settle for those alone: the class's logit silenced, its
features intact (the silenced control). ``calibration["only_class_outputs"]`` says so;
``spare_class_outputs=True`` ranks those units last, and fine-tuning rows are the better
choice for such models (BUILD_NOTES: the examples' models).
"""

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import numpy as np

from tdu_jax import adapters, calibrate, data, decay, importance, selective, units, unlearn

PyTree = Any

# The decay-only row's defaults (LeNet L1, sixteenth session): ratio score, per-layer budget.
DECAY_ONLY = unlearn.UnlearnConfig(topk_budget="per_layer", importance_score="ratio")
FORGET_MAX_DECAY_ONLY = 0.5  # % forget-train accuracy; a margin under a 1% goal on test
FORGET_MAX_FINETUNE = 1.0
# The run's Δt over the chosen Δt. With fine-tuning, 4 was the default from the twenty-first
# session (the examples, held-out seeds 2-3: relearning nearer the retrained model's for
# 0.12-0.26 mean retain points) to the twenty-third, when it failed the same rule on a new
# held-out seed (Linen CNN seed 4: -2.05 mean retain points, -8.3 on one request; LeNet's
# L3/L4 rows, seeds 8-9: -0.31/-0.43); decay-only, 2 and 4 cost 0.7-1.0 points on two of the
# three models. BUILD_NOTES, twenty-first to twenty-third sessions.
DT_MARGIN_FINETUNE = 1.0
DT_MARGIN_DECAY_ONLY = 1.0
PROBES = 8  # units per candidate head layer removed to tell whether it is the head


class SweepConfig(NamedTuple):
    """The calibration's grid and rule (``tdu_jax.calibrate.sweep_decay``).

    K fractions of the units (LeNet's 300 ... 30,000 of 61,706 weights); Δt in time units of
    ``exp(-λΔt)`` per step; ``forget_max`` in % forget-train accuracy (None: 0.5 without
    fine-tuning, 1.0 with); sample sizes in images (0: every image). ``dt_margin`` >= 1
    multiplies the chosen Δt for the run (None: ``DT_MARGIN_FINETUNE`` with fine-tuning,
    ``DT_MARGIN_DECAY_ONLY`` without, both 1: the rule's gentlest silencing point itself).
    ``margin_guard`` (points, >= 0) checks the margins ``dt_margin``, halved while > 1, through
    the run on the sweep's samples and keeps the first that costs at most that much
    retain-train accuracy against margin 1 (``calibrate.guard_margin``; one run per margin
    tried); None decays with ``dt_margin`` unchecked. For relearning nearer a retrained
    model's, ``dt_margin=4.0, margin_guard=0.1`` (BUILD_NOTES, twenty-third session).
    """

    top_ks: tuple[int | float, ...] = (0.005, 0.015, 0.05, 0.15, 0.5)
    dts: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0)
    forget_max: float | None = None
    search_steps: int = 6  # halvings of each K's gentlest-Δt bracket
    forget_sample: int = 0  # forget-train images scored per point
    retain_sample: int = 10_000  # retain-train images scored where the rule needs them
    confirm_finetune: bool = True  # with fine-tuning: check the points through it
    dt_margin: float | None = None  # the run's Δt = the chosen Δt x this
    margin_guard: float | None = None  # retain-train points a margin may cost; None: no guard


DEFAULT_SWEEP = SweepConfig()


class ForgetResult(NamedTuple):
    unlearned: unlearn.UnlearnResult  # the run with the chosen K and Δt
    calibration: dict  # the sweep (``calibrate.sweep_decay``; ``choose_after_finetune``)
    config: unlearn.UnlearnConfig  # the run's config: ``top_k``/``dt`` as chosen


def _by_finetuning(given, config: unlearn.UnlearnConfig, decay_only: float, finetune: float):
    """``given`` if set, else the default for a run without or with fine-tuning."""
    if given is not None:
        return given
    return decay_only if config.finetune == "none" else finetune


def forget_max(sweep: SweepConfig, config: unlearn.UnlearnConfig) -> float:
    """The sweep's forget-train ceiling in % (``sweep.forget_max``, else by fine-tuning)."""
    return _by_finetuning(sweep.forget_max, config, FORGET_MAX_DECAY_ONLY, FORGET_MAX_FINETUNE)


def dt_margin(sweep: SweepConfig, config: unlearn.UnlearnConfig) -> float:
    """The run's Δt over the chosen Δt (``sweep.dt_margin``, else by fine-tuning)."""
    return _by_finetuning(sweep.dt_margin, config, DT_MARGIN_DECAY_ONLY, DT_MARGIN_FINETUNE)


def check_sweep_config(sweep: SweepConfig) -> None:
    """Raises ValueError naming the bad setting and its allowed values."""
    if not sweep.top_ks or not sweep.dts:
        raise ValueError("sweep.top_ks and sweep.dts need at least one value each")
    if not all(dt > 0 for dt in sweep.dts):
        raise ValueError(f"sweep.dts must all be > 0; got {sweep.dts}")
    if sweep.forget_max is not None and not 0 <= sweep.forget_max <= 100:
        raise ValueError(f"sweep.forget_max must be in [0, 100] (%); got {sweep.forget_max}")
    if sweep.dt_margin is not None and not sweep.dt_margin >= 1:
        raise ValueError(f"sweep.dt_margin must be None or >= 1; got {sweep.dt_margin}")
    if sweep.margin_guard is not None and not sweep.margin_guard >= 0:
        raise ValueError(f"sweep.margin_guard must be None or >= 0 (retain-train points); "
                         f"got {sweep.margin_guard}")  # fmt: skip
    for name in ("search_steps", "forget_sample", "retain_sample"):
        if getattr(sweep, name) < 0:
            raise ValueError(f"sweep.{name} must be >= 0; got {getattr(sweep, name)}")


def class_output_units(
    model: nn.Module,
    params: PyTree,
    batch_stats: PyTree,
    spec: units.UnitSpec,
    images: np.ndarray,
    classes: Sequence[int],
    *,
    dataset: str | None = None,
    preprocess: Callable | None = None,
) -> np.ndarray:
    """The forget classes' own output units: the head's units that feed only their logits.

    The head is found by removing units, not by name: a layer with as many output channels
    as the model has logits, where each of up to ``PROBES`` units spread over the layer
    changes exactly the logit of its own channel on ``images`` (compared exactly), and at
    least one changes it. Its units of ``classes``' channels are returned: the class's
    filter, or its kernel column and bias entry (weights). Decaying only these silences the
    class's logit and leaves every feature that recognises the class (the silenced control
    of ``tdu_jax.forgetting``).

    Returns:
      int64 global unit indices, sorted.
    """
    adapted = adapters.as_model(model)
    inputs = adapters.preprocess_fn(dataset, preprocess)(images)
    forward = jax.jit(lambda p: adapted.apply(p, batch_stats, inputs))
    base = np.asarray(forward(params))
    num_logits = base.shape[-1]
    found = []
    for layer in spec.layers:
        if layer.out_channels != num_logits:
            continue
        local = np.arange(layer.num_units)
        channel = local  # filter units: one per output channel
        if spec.granularity == "weight":  # kernel entries (channel last), then bias entries
            kernel_size = int(np.prod(layer.kernel_shape))
            channel = np.where(local < kernel_size, local % num_logits, local - kernel_size)
        probes = np.unique(np.linspace(0, layer.num_units - 1, PROBES).astype(np.int64))
        feeds = []
        for unit in probes:
            ablated = units.ablate(params, spec, np.array([layer.offset + unit]))
            feeds.append(np.flatnonzero((np.asarray(forward(ablated)) != base).any(0)).tolist())
        own = [f in ([], [int(channel[u])]) for u, f in zip(probes, feeds, strict=True)]
        if any(feeds) and all(own):
            found.extend(layer.offset + local[np.isin(channel, list(classes))])
    return np.sort(np.asarray(found, dtype=np.int64))


def ranked_last(imp: importance.Importance, spared: np.ndarray) -> importance.Importance:
    """``imp`` with the ``spared`` units' scores at -inf: every ranking puts them last (a
    per-layer budget takes them only once their layer's other units are all taken)."""
    low = np.isin(imp.units, spared)
    return imp._replace(accuracy_drop=np.where(low, -np.inf, imp.accuracy_drop),
                        loss_increase=np.where(low, -np.inf, imp.loss_increase))  # fmt: skip


def finetune_check_run(
    model: nn.Module,
    params: PyTree,
    batch_stats: PyTree,
    *,
    data_in: unlearn.UnlearnData,
    config: unlearn.UnlearnConfig,
    key: jax.Array,
    precomputed: importance.Importance | None,
    dataset: str | None = None,
    preprocess: Callable | None = None,
    loss_fn: Callable | None = None,
) -> calibrate.RunFn:
    """``(top_k, dt) -> (params, batch_stats)`` after ``config``'s decay and fine-tuning with
    that point, no evaluation: the run the calibration's checks score
    (``calibrate.scores_after_run``)."""
    data_in = data_in._replace(test=data.take(data_in.retain_train, 0))

    def run(top_k, dt):
        result = unlearn.unlearn(
            model,
            params,
            batch_stats,
            dataset=dataset,
            data_in=data_in,
            config=config._replace(top_k=top_k, dt=dt, evaluate_each_step=False),
            key=key,
            precomputed=precomputed,
            preprocess=preprocess,
            loss_fn=loss_fn,
        )
        return result.params, result.batch_stats

    return run


def forget(
    model: nn.Module,
    params: PyTree,
    batch_stats: PyTree,
    *,
    train: data.Split,
    forget_classes: Sequence[int],
    key: jax.Array,
    config: unlearn.UnlearnConfig = DECAY_ONLY,
    sweep: SweepConfig = DEFAULT_SWEEP,
    test: data.Split | None = None,
    dataset: str | None = None,
    preprocess: Callable | None = None,
    loss_fn: Callable | None = None,
    importance_fraction: float = 1.0,
    retain_sample_size: int = 1000,
    seed: int = 0,
    spare_class_outputs: bool = False,
    precomputed: importance.Importance | None = None,
    event: unlearn.Event | None = None,
) -> ForgetResult:
    """Forgets ``forget_classes``, with K and Δt chosen on ``train`` by the sweep's rule.

    Args:
      model, params, batch_stats: the trained model (any adapter's; batch_stats {} if none).
      train: the training split (images as ``dataset``/``preprocess`` expect; labels (N,)).
      forget_classes: labels to forget; the other labels of ``train`` are retained.
      key: PRNG key of the run (random-K selection, fine-tune batch order).
      config: the run's settings; its ``top_k`` and ``dt`` are replaced by the sweep's.
      sweep: the calibration's grid and rule.
      test: evaluated at every step when given (``config.evaluate_each_step``).
      dataset, preprocess, loss_fn: as in ``unlearn.unlearn``.
      importance_fraction: share of the forget-class images that importance scores (seeded).
      retain_sample_size: retain images the ratio, selective and worst-class scores score.
      seed: seed of the importance and retain samples.
      spare_class_outputs: rank the forget classes' own output units (``class_output_units``,
        found on up to 64 forget images) last, so the decay must reach the features. Off by
        default, as in the experiments' tables; ``calibration["only_class_outputs"]`` says when
        the run decayed those units alone, which is the silenced control, not forgetting.
      precomputed: importance of every unit on this request (skips the importance pass).
      event: progress hook, as in ``unlearn.unlearn``.

    Returns:
      ``ForgetResult``: the run, the calibration record (``chosen``, ``chosen_point``,
      ``points``, ``class_output_units``, ``spared``, ``only_class_outputs``, ``dt_margin``;
      with fine-tuning also ``tried`` and ``confirmed``; with ``sweep.margin_guard`` also
      ``margin_guard`` and ``margin_checks``) and the config used (its ``dt`` is the chosen Δt
      × the margin, ``calibration["dt_margin"]``).

    Raises:
      ValueError naming the argument, before any work, on a bad config or sweep, a forget
      class with no images in ``train``, or no retained images.
    """
    check_sweep_config(sweep)
    if not 0 < importance_fraction <= 1:
        raise ValueError(f"importance_fraction must be in (0, 1]; got {importance_fraction}")
    classes = tuple(sorted({int(c) for c in forget_classes}))
    forget_split, retain_split = data.forget_retain(train, classes)
    missing = [c for c in classes if not (np.asarray(train.labels) == c).any()]
    if not classes or missing:
        raise ValueError(
            f"forget_classes must name labels present in train; "
            f"{missing or 'none'} given without images"
        )
    if retain_split.size == 0:
        raise ValueError("train holds no image of a retained class")
    spec = unlearn.config_units(params, config)
    unlearn.validate_unlearn_config(config._replace(dt=min(sweep.dts)))
    for k in sweep.top_ks:
        try:
            decay.resolve_k(k, spec.num_units)
        except ValueError as e:
            raise ValueError(f"sweep.top_ks: {e}") from None
    sample = forget_split
    if importance_fraction < 1:
        sample = data.random_fraction(forget_split, importance_fraction, seed)
    scored_retain = None
    if selective.needs_retain_sample(config.importance_score):
        scored_retain = selective.retain_sample(
            retain_split, retain_sample_size, seed, config.importance_score
        )
    data_in = unlearn.UnlearnData(
        sample, retain_split, data.take(train, 0) if test is None else test, classes, scored_retain
    )
    kw = {"dataset": dataset, "preprocess": preprocess}
    if precomputed is None:
        precomputed, _ = unlearn.request_importance(
            model, params, batch_stats, data_in=data_in, config=config, loss_fn=loss_fn, **kw
        )
    outputs = class_output_units(model, params, batch_stats, spec, forget_split.images[:64],
                                 classes, **kw)  # fmt: skip
    if spare_class_outputs:
        precomputed = ranked_last(precomputed, outputs)
    forget_scored = calibrate.subsample(forget_split, sweep.forget_sample, 0)
    retain_scored = calibrate.subsample(retain_split, sweep.retain_sample, 0)
    calibration = calibrate.sweep_decay(
        model,
        params,
        batch_stats,
        forget_train=forget_scored,
        retain_train=retain_scored,
        imp=precomputed,
        spec=spec,
        top_ks=sweep.top_ks,
        dts=sweep.dts,
        lam=config.lam,
        decay_steps=config.decay_steps,
        forget_max=forget_max(sweep, config),
        search_steps=sweep.search_steps,
        budget=config.topk_budget,
        **kw,
    )
    run = finetune_check_run(model, params, batch_stats, data_in=data_in, config=config,
                             key=key, precomputed=precomputed, loss_fn=loss_fn, **kw)  # fmt: skip
    after = calibrate.scores_after_run(model, run, forget_train=forget_scored,
                                       retain_train=retain_scored, **kw)  # fmt: skip
    if config.finetune != "none" and sweep.confirm_finetune:
        calibration = calibrate.choose_after_finetune(calibration, after)
    margin = dt_margin(sweep, config)
    if sweep.margin_guard is not None:
        calibration = calibrate.guard_margin(calibration, after, margin, sweep.margin_guard)
        margin = calibration["dt_margin"]
    calibration.update(class_output_units=outputs.tolist(), spared=spare_class_outputs,
                       dt_margin=margin)  # fmt: skip
    chosen = config._replace(**calibrate.run_point(calibration, margin))
    if test is None:
        chosen = chosen._replace(evaluate_each_step=False)
    result = unlearn.unlearn(
        model,
        params,
        batch_stats,
        data_in=data_in,
        config=chosen,
        key=key,
        event=event,
        precomputed=precomputed,
        loss_fn=loss_fn,
        **kw,
    )
    only = result.selected.size > 0 and bool(np.isin(result.selected, outputs).all())
    calibration["only_class_outputs"] = only
    return ForgetResult(result, calibration, chosen)
