"""The experiments' typed config: one frozen field per setting (one per flag).

``common.config_from_flags`` builds it from the flags and ``common.validate_config`` checks
and normalises it; a variant is ``dataclasses.replace(cfg, seed=1)``. ``as_record()`` gives
the plain dict that result.json records and that the checkpoint, result, importance-cache
and retrain keys hash: the same key names, values and order as the dict config it replaced,
so workdirs made before the change are reused.
"""

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExperimentConfig:
    """Every setting of an experiment run; defaults are the flags' generic defaults.

    Fields without a default are the entry point's table-wide choices (``DEFAULTS`` in
    ``mnist_lenet`` / ``cifar_ship``). Field names are the flag names, except ``lam``
    (``--lambda``) and ``dataset`` / ``row`` (from the entry point and ``--preset``).
    """

    # What is forgotten, from which model and data.
    dataset: str  # "mnist" or "cifar10"
    forget_class: tuple[int, ...]  # sorted label indices (--forget_class takes names too)
    model: str  # a name in tdu_jax.models.MODELS
    width: float = 1.0  # ResNet channel multiplier
    compute_dtype: str = "float32"  # "float32" or "bfloat16"
    preset: str | None = None  # --preset as given
    row: str | None = None  # reference row of this run (a preset name; reproduce sets it)
    seed: int = 0
    data_dir: str | None = None  # None: $TFDS_DATA_DIR, then TFDS's default
    max_train_examples: int = 0  # first N train images; 0: all
    max_test_examples: int = 0  # first N test images; 0: all
    validation_examples: int = 0  # last N train images held out of all training and scoring
    # Base model (and the retrained gold standard: same recipe).
    train_epochs: int
    train_batch_size: int = 128
    train_optimizer: str  # "sgd" or "adam"
    train_lr: float  # peak learning rate
    train_momentum: float = 0.9
    train_weight_decay: float
    train_schedule: str  # "constant", "cosine" or "onecycle"
    train_label_smoothing: float = 0.0
    train_nesterov: bool = False  # Nesterov momentum (sgd)
    train_decay_norm_bias: bool = True  # weight decay on BatchNorm parameters and biases too
    resnet_padding: str = "same"  # ResNet 3x3 conv padding: "same" or "symmetric"
    augment: bool  # crop+flip, in base training and fine-tuning
    # Units, importance and selection.
    granularity: str  # "weight" or "filter"
    include: str | None = None  # regex over layer paths whose units may be chosen
    exclude: str | None = None  # regex over layer paths whose units may not be chosen
    include_bn: bool = True  # a filter unit includes its BatchNorm channel
    importance_data: str = "forget"  # importance sample pool: "forget" or "all"
    importance_fraction: float = 1.0  # seeded share of the pool, in (0, 1]
    importance_score: str = "forget"  # tdu_jax.selective.IMPORTANCE_SCORES
    selective_beta: float = 1.0  # weight of the retain drop in the selective score
    retain_sample_size: int = 1000  # retain images of the retain-relative importance scores
    reestimate: bool = False  # recompute importance before every decay step
    unit_chunk: int = 256  # units per importance call (bounds memory)
    sample_batch: int = 1024  # images per importance call (bounds memory)
    selection: str = "topk"  # "topk" or "random"
    topk_budget: str = "global"  # "global" or "per_layer" (tdu_jax.decay.rank_units)
    top_k: int | float  # K: a count (int) or a fraction of the units in (0, 1] (float)
    # Decay.
    lam: float = 0.1  # decay rate lambda (>= 0), the --lambda flag
    dt: float  # time per decay step (> 0)
    decay_steps: int = 7  # T (>= 0)
    # Fine-tuning on retain data.
    finetune: str = "none"  # "none", "after_all" or "after_each"
    finetune_epochs: float = 0.0  # after_all: epochs of retain data
    finetune_batches: int = 0  # after_all: batches in all; after_each: per decay step
    finetune_optimizer: str = "sgd"  # "sgd" or "adam"
    finetune_lr: float
    finetune_momentum: float = 0.9
    finetune_weight_decay: float = 5e-4
    finetune_schedule: str = "constant"  # "constant", "cosine" or "onecycle"
    batch_size: int = 128  # fine-tune batch size
    # Calibration of K and dt on the training split (tdu_jax.calibrate).
    calibrate: bool = False
    sweep_top_k: tuple[int | float, ...] = (300, 1000, 3000)  # K values tried
    sweep_dt: tuple[float, ...] = (0.25, 0.5, 1.0)  # dt values tried
    sweep_forget_max: float = 5.0  # forget-train accuracy ceiling, percent
    sweep_search_steps: int = 0  # per K, halvings of the gentlest-silencing Δt search
    sweep_forget_sample: int = 0  # forget-train images scored per sweep point; 0: all
    sweep_retain_sample: int = 10000  # retain-train images scored per sweep point; 0: all
    calibrate_finetune: bool = True  # confirm through the row's own fine-tuning
    sweep_dt_margin: float = 1.0  # the run's dt = the calibration's chosen dt x this (>= 1)
    # Retain-train points a margin may cost (calibrate.guard_margin); None: the margin unchecked.
    sweep_dt_guard: float | None = None
    # Reporting.
    evaluate_each_step: bool = True  # evaluate on test after every decay step
    compare_retrain: bool = False  # also compare with the retrained gold standard
    # Where results and caches go, and permissions (cache_dir and the permissions are not
    # recorded: see common._public).
    workdir: str = "runs"
    # Content-keyed caches (base models, retrained models, importance); None: the workdir
    # (reproduce and compare: --workdir itself, so that every entry point shares them).
    cache_dir: str | None = None
    run_name: str | None = None  # result folder name; None: <row or custom>-seed<seed>
    overwrite: bool = False  # replace an existing result of another config
    retrain_base: bool = False  # train the base model anew, replacing a saved one
    min_base_acc: float = -1.0  # test accuracy floor (%); -1: twice chance; 0: any

    def __post_init__(self):
        for name in _SEQUENCES:  # lists (JSON, a caller's literal) become tuples: immutable
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))

    def as_record(self) -> dict[str, Any]:
        """The config as a plain dict: tuples as lists, keys in ``RECORD_ORDER``.

        What result.json records (less the permissions) and the cache keys hash; equal, key
        for key and in order, to the dict config that this class replaced.
        """
        return {name: _plain(getattr(self, name)) for name in RECORD_ORDER}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "ExperimentConfig":
        """The config of ``record`` (``as_record()``'s dict, e.g. result.json's "config");
        settings it lacks (the permissions, newer settings) take their defaults."""
        return cls(**record)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


_SEQUENCES = ("forget_class", "sweep_top_k", "sweep_dt")
# The dict config's key order, kept so that result.json reads as before: the flags sorted by
# name, then lam (the --lambda flag, renamed), dataset and row (added after the flags).
_LAST = ("lam", "dataset", "row")
_NAMES = tuple(f.name for f in dataclasses.fields(ExperimentConfig))
RECORD_ORDER = tuple(sorted(n for n in _NAMES if n not in _LAST)) + _LAST


def default(name: str) -> Any:
    """The generic default of setting ``name`` (KeyError for a table-wide choice)."""
    field = {f.name: f for f in dataclasses.fields(ExperimentConfig)}[name]
    if field.default is dataclasses.MISSING:
        raise KeyError(f"{name} has no generic default; the entry point's DEFAULTS set it")
    return field.default
