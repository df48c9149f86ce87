"""Shared machinery of the experiment entry points: flags, config, base model, one run.

Only ``experiments/`` defines flags. A run's config is a frozen ``ExperimentConfig``
(experiments/config.py) built from the flags (preset values fill in flags not given
explicitly); the library sees typed arguments only.
"""

import contextlib
import dataclasses
import functools
import hashlib
import logging as std_logging
import os
import pathlib
import platform
import re
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging

import tdu_jax
from experiments import config, importance_cache, presets
from experiments.config import ExperimentConfig
from tdu_jax import (
    calibrate,
    calibrated,
    checkpoint,
    data,
    decay,
    importance,
    metrics,
    models,
    result_files,
    selective,
    summary,
    train,
    units,
    unlearn,
)

FLAGS = flags.FLAGS

# Settings that shape the base model; everything else only shapes the unlearning run.
BASE_KEYS = (
    "dataset", "model", "width", "compute_dtype", "seed", "train_epochs", "train_batch_size",
    "train_optimizer", "train_lr", "train_momentum", "train_weight_decay", "train_schedule",
    "train_label_smoothing", "augment", "max_train_examples",
)  # fmt: skip
# Base-model settings added later: keyed only when not at their default, so that checkpoints
# saved before they existed (which behaved as the default) keep their names.
LATER_BASE_KEYS = ("train_nesterov", "train_decay_norm_bias", "resnet_padding",
                   "validation_examples")  # fmt: skip
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def define_flags(**defaults) -> None:
    """Defines every flag; ``defaults`` are the entry point's table-wide choices.

    A flag's default is ``defaults[setting]``, else the setting's default in
    ``ExperimentConfig`` (settings without one must be in ``defaults``).
    """

    def d(name: str):
        value = defaults[name] if name in defaults else config.default(name)
        return ",".join(map(str, value)) if isinstance(value, tuple) else value  # a text flag

    before = set(FLAGS)
    # fmt: off
    flags.DEFINE_string("preset", d("preset"), f"Reference row: {', '.join(presets.PRESETS)}.")
    flags.DEFINE_string("forget_class", d("forget_class"), "Class name or index; comma list.")
    flags.DEFINE_string("model", d("model"), f"One of {', '.join(models.MODELS)}.")
    flags.DEFINE_float("width", d("width"), "ResNet channel multiplier.")
    flags.DEFINE_enum("compute_dtype", d("compute_dtype"), list(DTYPES),
                      "ResNet computation dtype.")
    flags.DEFINE_float("lambda", d("lam"), "Decay rate lambda (>= 0).")
    flags.DEFINE_float("dt", d("dt"), "Time per decay step (> 0).")
    flags.DEFINE_integer("decay_steps", d("decay_steps"), "Decay steps T (>= 0).")
    flags.DEFINE_string("top_k", d("top_k"), "K: a count (e.g. 1000) or a fraction (0.05).")
    flags.DEFINE_enum("granularity", d("granularity"), list(units.GRANULARITIES), "Unit kind.")
    flags.DEFINE_enum("selection", d("selection"), list(decay.SELECTIONS), "top-K or random-K.")
    flags.DEFINE_enum("topk_budget", d("topk_budget"), list(decay.TOPK_BUDGETS),
                      "global: K over all units; per_layer: each layer's share of K in "
                      "proportion to its unit count, its most important units first; "
                      "per_layer_equal: the same count from every layer.")  # fmt: skip
    flags.DEFINE_enum("importance_data", d("importance_data"), ["forget", "all"],
                      "Importance sample pool.")
    flags.DEFINE_float("importance_fraction", d("importance_fraction"),
                       "Seeded fraction of the pool, in (0, 1].")
    flags.DEFINE_bool("reestimate", d("reestimate"),
                      "Recompute importance before every decay step.")
    flags.DEFINE_string("include", d("include"), "Regex: layers whose units may be chosen.")
    flags.DEFINE_string("exclude", d("exclude"), "Regex: layers whose units may not be chosen.")
    flags.DEFINE_bool("include_bn", d("include_bn"),
                      "Filter units include the paired BatchNorm channel.")
    flags.DEFINE_enum("finetune", d("finetune"), list(unlearn.FINETUNE_MODES),
                      "Fine-tune schedule.")
    flags.DEFINE_float("finetune_epochs", d("finetune_epochs"), "after_all: epochs of retain data.")
    flags.DEFINE_integer("finetune_batches", d("finetune_batches"),
                         "after_all: batches; after_each: per step.")
    flags.DEFINE_enum("finetune_optimizer", d("finetune_optimizer"), ["sgd", "adam"],
                      "Fine-tune optimizer.")
    flags.DEFINE_float("finetune_lr", d("finetune_lr"), "Fine-tune learning rate.")
    flags.DEFINE_float("finetune_momentum", d("finetune_momentum"), "Fine-tune SGD momentum.")
    flags.DEFINE_float("finetune_weight_decay", d("finetune_weight_decay"),
                       "Fine-tune weight decay.")
    flags.DEFINE_enum("finetune_schedule", d("finetune_schedule"), list(train.SCHEDULES),
                      "Fine-tune learning-rate schedule over each fine-tuning call (cosine: "
                      "down to 0 by its last batch).")
    flags.DEFINE_integer("batch_size", d("batch_size"), "Fine-tune batch size.")
    flags.DEFINE_integer("seed", d("seed"), "Seed of everything (base model, sample, batches).")
    flags.DEFINE_string("data_dir", d("data_dir"),
                        "TFDS data dir (default: $TFDS_DATA_DIR, then TFDS's).")
    flags.DEFINE_string("workdir", d("workdir"), "Where base models and results go.")
    flags.DEFINE_string("cache_dir", d("cache_dir"),
                        "Where base models, retrained models and importance scores are kept "
                        "(default: --workdir); one folder shared by several workdirs trains "
                        "each model once.")  # fmt: skip
    flags.DEFINE_string("run_name", d("run_name"), "Result folder name (default: preset-seed).")
    flags.DEFINE_bool("overwrite", d("overwrite"),
                      "Replace an existing result of another config.")
    flags.DEFINE_bool("retrain_base", d("retrain_base"),
                      "Train the base model anew, replacing a saved one.")
    flags.DEFINE_float("min_base_acc", d("min_base_acc"), "Refuse a base model below this test "
                       "accuracy (%); -1: twice chance (20% for 10 classes); 0: accept any.")
    flags.DEFINE_integer("train_epochs", d("train_epochs"), "Base model epochs.")
    flags.DEFINE_integer("train_batch_size", d("train_batch_size"), "Base model batch size.")
    flags.DEFINE_enum("train_optimizer", d("train_optimizer"), ["sgd", "adam"], "Base optimizer.")
    flags.DEFINE_float("train_lr", d("train_lr"), "Base model peak learning rate.")
    flags.DEFINE_float("train_momentum", d("train_momentum"), "Base model SGD momentum.")
    flags.DEFINE_float("train_weight_decay", d("train_weight_decay"), "Base weight decay.")
    flags.DEFINE_enum("train_schedule", d("train_schedule"), ["constant", "cosine", "onecycle"],
                      "Base learning-rate schedule.")
    flags.DEFINE_float("train_label_smoothing", d("train_label_smoothing"),
                       "Base model label smoothing.")
    flags.DEFINE_bool("train_nesterov", d("train_nesterov"), "Base model Nesterov momentum (sgd).")
    flags.DEFINE_bool("train_decay_norm_bias", d("train_decay_norm_bias"),
                      "Base weight decay also on BatchNorm parameters and biases (false: kernels "
                      "only).")
    flags.DEFINE_enum("resnet_padding", d("resnet_padding"), list(models.PADDINGS),
                      "ResNet 3x3 conv padding: same (Flax/TF: stride-2 pads after only) or "
                      "symmetric (one pixel each side, as PyTorch).")
    flags.DEFINE_bool("augment", d("augment"), "Crop+flip augmentation (train and fine-tune).")
    flags.DEFINE_integer("max_train_examples", d("max_train_examples"),
                         "Use only the first N train images (0: all).")
    flags.DEFINE_integer("validation_examples", d("validation_examples"),
                         "Hold the last N train images (after --max_train_examples) out of "
                         "base training, importance and fine-tuning, as a validation split.")
    flags.DEFINE_integer("max_test_examples", d("max_test_examples"),
                         "Use only the first N test images (0: all).")
    flags.DEFINE_integer("unit_chunk", d("unit_chunk"), "Units per importance call.")
    flags.DEFINE_integer("sample_batch", d("sample_batch"),
                         "Images per importance call (with --unit_chunk, bounds memory).")
    flags.DEFINE_bool("evaluate_each_step", d("evaluate_each_step"),
                      "Evaluate on test after every decay step.")
    flags.DEFINE_enum("importance_score", d("importance_score"),
                      list(selective.IMPORTANCE_SCORES),
                      "forget: drop on the forget sample; selective: minus beta x retain drop; "
                      "ratio: forget loss increase per retain loss increase; "
                      "worst_class_ratio: per the worst-hit retained class's.")
    flags.DEFINE_float("selective_beta", d("selective_beta"),
                       "Weight of the retain drop in the selective score.")
    flags.DEFINE_integer("retain_sample_size", d("retain_sample_size"),
                         "Retain-class images scored by the retain-relative scores "
                         "(worst_class_ratio: this // classes of each).")
    flags.DEFINE_bool("calibrate", d("calibrate"),
                      "Size K and dt per request by the train-split sweep (tdu_jax.calibrate).")
    flags.DEFINE_string("sweep_top_k", d("sweep_top_k"),
                        "Comma list of K values the calibration sweep tries.")
    flags.DEFINE_string("sweep_dt", d("sweep_dt"),
                        "Comma list of dt values the calibration sweep tries.")
    flags.DEFINE_float("sweep_forget_max", d("sweep_forget_max"),
                       "Calibration rule: forget-train accuracy ceiling in percent.")
    flags.DEFINE_integer("sweep_search_steps", d("sweep_search_steps"),
                         "Per K, halvings of the search for the gentlest dt that still brings "
                         "forget-train accuracy under --sweep_forget_max (0: the grid only).")
    flags.DEFINE_integer("sweep_forget_sample", d("sweep_forget_sample"),
                         "Forget-train images the calibration scores per point (0: all).")
    flags.DEFINE_integer("sweep_retain_sample", d("sweep_retain_sample"),
                         "Retain-train images the calibration scores per point (0: all).")
    flags.DEFINE_bool("calibrate_finetune", d("calibrate_finetune"),
                      "With --calibrate on a row that fine-tunes: keep the least damaging "
                      "sweep point whose forget-train accuracy stays under --sweep_forget_max "
                      "after the row's own fine-tuning (bisection; a few runs of the row).")
    flags.DEFINE_float("sweep_dt_margin", d("sweep_dt_margin"),
                       "With --calibrate: the run decays with the chosen dt times this (>= 1; "
                       "tdu_jax.SweepConfig.dt_margin), checks included at the chosen dt.")
    flags.DEFINE_float("sweep_dt_guard", d("sweep_dt_guard"),
                       "With --sweep_dt_margin > 1: try the margins m, m/2, ... (> 1) through the "
                       "row's run and keep the first that costs at most this many retain-train "
                       "points against margin 1, else 1 (tdu_jax.SweepConfig.margin_guard).")
    flags.DEFINE_bool("compare_retrain", d("compare_retrain"),
                      "Also train/reuse the model retrained without the forget classes and "
                      "report MIAs, probe recovery, relearn steps and the gap to it.")
    # fmt: on
    _OWN_FLAGS[:] = sorted(set(FLAGS) - before)
    setup_logging()
    sys.excepthook = _excepthook


def _explicit(setting: str) -> bool:
    """Was ``setting``'s flag given on the command line (``lam`` is ``--lambda``)?"""
    return FLAGS["lambda" if setting == "lam" else setting].present


def parse_top_k(text: str) -> int | float:
    """``"1000"`` -> 1000 (count); ``"0.05"`` -> 0.05 (fraction)."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ValueError(f"--top_k must be a count or a fraction in (0, 1]; got {text!r}") from None
    if value.is_integer() and "." not in str(text):
        return int(value)
    return value


def config_from_flags(dataset: str, defaults: dict | None = None) -> ExperimentConfig:
    """The run's config: flags, with the preset filling flags not set explicitly.

    ``defaults`` (an entry point's table-wide choices) replace the flag defaults, for
    ``reproduce`` and ``compare``, which serve several tables with one set of flags: a flag
    not given takes ``defaults``, else the setting's generic default, never the choice of
    the table the flags were defined with (LeNet's ``--topk_budget=per_layer`` must not
    reach a CIFAR run).
    """
    values = {n: FLAGS[n].value for n in _OWN_FLAGS}
    values["lam"] = values.pop("lambda")
    if defaults is not None:  # the flags may carry another table's choices: reset them all
        values.update({k: defaults[k] if k in defaults else config.default(k)
                       for k in values if not _explicit(k)})  # fmt: skip
    if values["preset"] is not None:
        values.update(_preset_settings(values["preset"]))
    if (_explicit("top_k") or _explicit("dt")) and not _explicit("calibrate"):
        values["calibrate"] = False  # explicit K or dt: the user sized the decay
    values.update(dataset=dataset, row=values["preset"])
    return validate_config(ExperimentConfig(**_parse_text(values)))


_OWN_FLAGS: list[str] = []


def _parse_text(values: dict) -> dict:
    """``values`` with the text flags parsed: class names or indices, K and the sweep grids."""
    out = dict(values)
    data.check_dataset(values["dataset"])
    try:
        out["forget_class"] = data.parse_classes(values["dataset"], values["forget_class"])
    except ValueError as e:
        raise ValueError(f"--forget_class: {e}") from None
    if isinstance(values["top_k"], str):
        out["top_k"] = parse_top_k(values["top_k"])
    for name, parse in (("sweep_top_k", parse_top_k), ("sweep_dt", float)):
        if isinstance(values[name], str):
            out[name] = parse_number_list(name, values[name], parse)
    return out


def parse_number_list(flag: str, text: str, parse=float) -> tuple:
    """``--flag``'s comma list parsed value by value; a clear error naming the flag."""
    try:
        return tuple(parse(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--{flag} must be a comma list of numbers; got {text!r}") from None


def _preset_settings(row: str) -> dict:
    """Row ``row``'s settings, except those given explicitly as flags."""
    return {k: v for k, v in presets.preset(row).items() if not _explicit(k)}


def apply_preset(cfg: ExperimentConfig, row: str) -> ExperimentConfig:
    """``cfg`` with row ``row``'s settings, except those given explicitly as flags."""
    return dataclasses.replace(cfg, **_preset_settings(row))


def validate_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """Checks every setting before any expensive work; returns the normalised config
    (forget classes sorted and unique, as ``data.parse_classes`` gives them)."""
    data.check_dataset(cfg.dataset)
    if cfg.model not in models.MODELS:
        raise ValueError(f"--model must be one of {', '.join(models.MODELS)}; got {cfg.model!r}")
    try:
        cfg = dataclasses.replace(
            cfg, forget_class=data.parse_classes(cfg.dataset, cfg.forget_class)
        )
    except ValueError as e:
        raise ValueError(f"--forget_class: {e}") from None
    if not 0 < cfg.importance_fraction <= 1:
        raise ValueError(f"--importance_fraction must be in (0, 1]; got {cfg.importance_fraction}")
    if cfg.finetune == "none" and (cfg.finetune_batches or cfg.finetune_epochs):
        raise ValueError(
            "--finetune=none conflicts with --finetune_batches/--finetune_epochs; "
            "use --finetune=after_all or after_each"
        )
    if cfg.finetune_epochs and cfg.finetune_batches:
        raise ValueError("give either --finetune_epochs or --finetune_batches, not both")
    if cfg.finetune == "after_each" and cfg.finetune_epochs:
        raise ValueError("--finetune=after_each takes --finetune_batches (per step), not epochs")
    if cfg.finetune_epochs < 0:
        raise ValueError(f"--finetune_epochs must be >= 0; got {cfg.finetune_epochs}")
    for dt in cfg.sweep_dt:
        if not dt > 0:
            raise ValueError(f"--sweep_dt values must be > 0; got {dt}")
    if cfg.sweep_search_steps < 0:
        raise ValueError(f"--sweep_search_steps must be >= 0; got {cfg.sweep_search_steps}")
    if not cfg.sweep_dt_margin >= 1:
        raise ValueError(f"--sweep_dt_margin must be >= 1; got {cfg.sweep_dt_margin}")
    if cfg.sweep_dt_margin != 1 and not cfg.calibrate:
        raise ValueError(
            "--sweep_dt_margin applies to the calibrated dt: pass --calibrate, "
            "or scale --dt yourself"
        )
    if cfg.sweep_dt_guard is not None:
        if not cfg.sweep_dt_guard >= 0:
            raise ValueError(f"--sweep_dt_guard must be >= 0 (retain-train points); "
                             f"got {cfg.sweep_dt_guard}")  # fmt: skip
        if not cfg.sweep_dt_margin > 1:
            raise ValueError("--sweep_dt_guard checks the margins of --sweep_dt_margin: pass "
                             "--sweep_dt_margin > 1 (e.g. 4) with it")  # fmt: skip
    for name in ("sweep_forget_sample", "sweep_retain_sample"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"--{name} must be >= 0 (0: all images); got {getattr(cfg, name)}")
    for name in ("batch_size", "train_batch_size", "unit_chunk", "sample_batch",
                 "retain_sample_size"):  # fmt: skip
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name} must be >= 1; got {getattr(cfg, name)}")
    for name in ("train_epochs", "max_train_examples", "max_test_examples",
                 "validation_examples"):  # fmt: skip
        if getattr(cfg, name) < 0:
            raise ValueError(f"--{name} must be >= 0; got {getattr(cfg, name)}")
    with _as_flags(_UNLEARN_FLAGS):
        unlearn.validate_unlearn_config(unlearn_config(cfg, retain_size=None))
    with _as_flags(_OPTIMIZER_FLAGS, prefix="train_"):
        train.validate_optimizer_config(base_optimizer(cfg))
    check_units(cfg)
    check_workdir(cfg.workdir)
    if cfg.cache_dir:
        check_workdir(cfg.cache_dir, "cache_dir")
    return cfg


# Library setting name -> flag, for errors raised by the library's own validation.
_UNLEARN_FLAGS = {"lambda": "lambda", "lam": "lambda", "dt": "dt", "decay_steps": "decay_steps",
                  "top_k": "top_k", "selection": "selection", "finetune": "finetune",
                  "finetune_batches": "finetune_batches", "batch_size": "batch_size",
                  "selective_beta": "selective_beta", "granularity": "granularity",
                  "topk_budget": "topk_budget",
                  "importance_score": "importance_score"}  # fmt: skip
_OPTIMIZER_FLAGS = {"OptimizerConfig.name": "optimizer", "OptimizerConfig.learning_rate": "lr",
                    "OptimizerConfig.momentum": "momentum", "OptimizerConfig.schedule": "schedule",
                    "OptimizerConfig.weight_decay": "weight_decay",
                    "OptimizerConfig.label_smoothing": "label_smoothing",
                    "OptimizerConfig.nesterov": "nesterov"}  # fmt: skip


@contextlib.contextmanager
def _as_flags(names: dict, prefix: str = ""):
    """Re-raises a library ValueError that starts with a setting name as one naming its flag."""
    try:
        yield
    except ValueError as e:
        text = str(e)
        for name in sorted(names, key=len, reverse=True):
            if text.startswith(name) and not text[len(name) : len(name) + 1].isalnum():
                text = f"--{prefix}{names[name]}{text[len(name) :]}"
                break
        raise ValueError(text) from None


@functools.lru_cache(maxsize=16)
def _num_units(dataset, model, width, dtype, granularity, include, exclude, include_bn) -> int:
    module = models.get_model(model, data.num_classes(dataset), width, DTYPES[dtype])
    shapes = jax.eval_shape(
        lambda k: models.init_variables(module, k, data.image_shape(dataset)), jax.random.key(0)
    )
    return units.enumerate_units(shapes[0], granularity, include, exclude, include_bn).num_units


def forget_class_list(dataset: str, text: str | None, default: Sequence[int]) -> list[list[int]]:
    """``--forget_classes``: None -> the table's request; "all" -> each class alone; else a
    comma list of classes, each forgotten alone."""
    if text is None:
        return [list(default)]
    if text == "all":
        return [[c] for c in range(data.num_classes(dataset))]
    try:
        return [[c] for c in data.parse_classes(dataset, text)]
    except ValueError as e:
        raise ValueError(f"--forget_classes: {e} (or 'all')") from None


def parse_seeds(text: str) -> list[int]:
    """``--seeds``: a comma list of integers."""
    try:
        return [int(s) for s in text.split(",")]
    except ValueError:
        raise ValueError(f"--seeds must be a comma list of integers; got {text!r}") from None


def check_units(cfg: ExperimentConfig) -> None:
    """Checks --top_k and --include/--exclude against the model's unit count, before training."""
    for name in ("include", "exclude"):
        try:
            re.compile(getattr(cfg, name) or "")
        except re.error as e:
            raise ValueError(
                f"--{name} is not a valid regex ({e}); got {getattr(cfg, name)!r}"
            ) from None
    try:
        keys = ("dataset", "model", "width", "compute_dtype", "granularity", "include",
                "exclude", "include_bn")  # fmt: skip
        n = _num_units(*(getattr(cfg, k) for k in keys))
    except ValueError as e:  # no layer left after --include/--exclude
        raise ValueError(f"--include/--exclude: {e}") from None
    top_k = cfg.top_k
    if isinstance(top_k, int) and not 1 <= top_k <= n:
        what = f"{cfg.model} has {n} {cfg.granularity} units"
        raise ValueError(f"--top_k must be a count in 1..{n} ({what}) or a fraction in "
                         f"(0, 1]; got {top_k}")  # fmt: skip


def check_workdir(workdir: str, flag: str = "workdir") -> None:
    """Checks that folder ``workdir`` (given by ``--flag``) exists writable or can be created;
    creates nothing."""
    path = pathlib.Path(workdir).expanduser().absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"--{flag} {workdir} cannot be created: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--{flag} {workdir} is not writable ({existing})")


def base_optimizer(cfg: ExperimentConfig) -> train.OptimizerConfig:
    return train.OptimizerConfig(
        name=cfg.train_optimizer, learning_rate=cfg.train_lr,
        momentum=cfg.train_momentum, weight_decay=cfg.train_weight_decay,
        schedule=cfg.train_schedule, label_smoothing=cfg.train_label_smoothing,
        nesterov=cfg.train_nesterov, decay_norm_and_bias=cfg.train_decay_norm_bias,
    )  # fmt: skip


def unlearn_config(cfg: ExperimentConfig, retain_size: int | None) -> unlearn.UnlearnConfig:
    """Typed unlearning settings; epochs become batches once the retain size is known."""
    batches = cfg.finetune_batches
    if cfg.finetune_epochs and retain_size is not None:
        batches = unlearn.epochs_to_batches(cfg.finetune_epochs, retain_size, cfg.batch_size)
    elif cfg.finetune_epochs:
        batches = 1  # placeholder for validation before the data is loaded
    return unlearn.UnlearnConfig(
        granularity=cfg.granularity, top_k=cfg.top_k, selection=cfg.selection,
        topk_budget=cfg.topk_budget,
        lam=cfg.lam, dt=cfg.dt, decay_steps=cfg.decay_steps,
        reestimate=cfg.reestimate, include=cfg.include, exclude=cfg.exclude,
        include_bn=cfg.include_bn, finetune=cfg.finetune, finetune_batches=batches,
        finetune_optimizer=train.OptimizerConfig(
            name=cfg.finetune_optimizer, learning_rate=cfg.finetune_lr,
            momentum=cfg.finetune_momentum, weight_decay=cfg.finetune_weight_decay,
            schedule=cfg.finetune_schedule,
        ),
        batch_size=cfg.batch_size, augment=cfg.augment,
        evaluate_each_step=cfg.evaluate_each_step, unit_chunk=cfg.unit_chunk,
        sample_batch=cfg.sample_batch, importance_score=cfg.importance_score,
        selective_beta=cfg.selective_beta,
    )  # fmt: skip


# ------------------------------------------------------------------ data and model
def check_data(cfg: ExperimentConfig) -> None:
    """Stops before any work, in one line, when the dataset can be neither found nor downloaded."""
    try:
        where = data.check_available(cfg.dataset, cfg.data_dir)
    except data.DataNotFoundError as e:
        raise UserError(str(e)) from None
    logging.info("Data %s: %s", cfg.dataset, where)


def load_data(cfg: ExperimentConfig, with_validation: bool = False) -> tuple[data.Split, ...]:
    """(train, test), or (train, test, validation) with ``with_validation``: the first
    ``--max_train_examples`` train images, less the last ``--validation_examples`` of them,
    which form the validation split (empty when 0)."""
    check_data(cfg)
    with Progress(f"loading {cfg.dataset}"):
        train_split = data.load_split(cfg.dataset, "train", cfg.data_dir)
        test_split = data.load_split(cfg.dataset, "test", cfg.data_dir)
    if cfg.max_train_examples:
        train_split = data.take(train_split, cfg.max_train_examples)
    if cfg.max_test_examples:
        test_split = data.take(test_split, cfg.max_test_examples)
    held = cfg.validation_examples
    if held >= train_split.size:
        raise UserError(f"--validation_examples={held} leaves no training images (the train "
                        f"split has {train_split.size}); hold out fewer")  # fmt: skip
    kept = train_split.size - held
    validation = data.Split(train_split.images[kept:], train_split.labels[kept:])
    train_split = data.take(train_split, kept)
    return (train_split, test_split, validation) if with_validation else (train_split, test_split)


def build_model(cfg: ExperimentConfig):
    return models.get_model(
        cfg.model, data.num_classes(cfg.dataset), cfg.width, DTYPES[cfg.compute_dtype],
        conv_padding=cfg.resnet_padding,
    )  # fmt: skip


def base_config(cfg: ExperimentConfig) -> dict:
    """Everything that determines the base model (its checkpoint's key)."""
    record = cfg.as_record()
    out = {k: record[k] for k in BASE_KEYS}
    out.update({k: record[k] for k in LATER_BASE_KEYS if not _at_default(k, record[k])})
    out["tdu_jax_base_format"] = 1
    return out


class Progress:
    """Logs a phase's progress, with rate and ETA, at least every ``every`` seconds.

    Call ``progress(done, total, info)`` after each piece of work; ``info`` is a dict of
    metrics to show (training) or the seconds elapsed (importance; unused). The rate, and so
    the ETA, is measured from the first call on, since the first piece includes compilation.
    Between calls a daemon thread logs a heartbeat every ``every`` seconds, so a long chunk
    or a compilation never leaves the log silent; it stops when ``done == total``, on
    ``close()`` or at the end of a ``with`` block (which also starts it before any call).
    """

    def __init__(self, phase: str, every: float = 10.0, *, log=None, clock=time.monotonic):
        self.phase, self.every, self._clock = phase, every, clock
        self._log = log or (lambda msg: logging.info("%s", msg))
        self._first = self._last = None  # (time, done) at the first / latest call
        self._total, self._info = 0, None
        self._started = self._logged = clock()
        self._lock, self._stop, self._thread = threading.Lock(), threading.Event(), None

    def __enter__(self) -> "Progress":
        self._start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()

    def rate(self) -> float | None:
        """Work per second since the first call (None before a second call)."""
        if self._first is None or self._last[0] <= self._first[0]:
            return None
        return (self._last[1] - self._first[1]) / (self._last[0] - self._first[0])

    def eta(self, now: float) -> float | None:
        """Seconds left at ``now`` by the measured rate (None while unknown)."""
        rate = self.rate()
        if not rate:
            return None
        return max(0.0, (self._total - self._last[1]) / rate - (now - self._last[0]))

    def __call__(self, done: int, total: int, info=None) -> None:
        now = self._clock()
        with self._lock:
            if self._first is None:
                self._first = (now, done)
            self._last, self._total, self._info = (now, done), total, info
            finished = done >= total
            if not finished and now - self._logged < self.every:
                message = None
            else:
                self._logged, message = now, self.message(now)
        if not finished:
            self._start()
        if message is not None:
            self._log(message)
        if finished:
            self.close()

    def message(self, now: float, heartbeat: bool = False) -> str:
        """The progress line at ``now``."""
        if self._last is None:
            return f"{self.phase}: still working ({now - self._started:.0f}s)"
        done, parts = self._last[1], []
        if isinstance(self._info, dict):
            parts += [f"{k}={v:.4g}" for k, v in self._info.items()
                      if isinstance(v, float | int) and k not in ("eta_s", "seconds")]  # fmt: skip
        if heartbeat and now - self._last[0] >= 1:
            parts.append(f"last update {now - self._last[0]:.0f}s ago")
        eta, rate = self.eta(now), self.rate()
        if done >= self._total:
            parts.append(f"{now - self._started:.0f}s")
        elif eta is None:
            parts.append("eta after the next update (the first includes compilation)")
        else:
            parts.append(f"{rate:.4g}/s, eta {eta:.0f}s")
        return f"{self.phase}: {done}/{self._total} ({', '.join(parts)})"

    def _start(self) -> None:
        if self._thread is None and not self._stop.is_set():
            self._thread = threading.Thread(target=self._beat, daemon=True)
            self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(min(1.0, self.every / 4)):
            now = self._clock()
            with self._lock:
                if now - self._logged < self.every:
                    continue
                self._logged, message = now, self.message(now, heartbeat=True)
            self._log(message)


TRAIN_HISTORY = "train_history.json"  # beside a trained model: {"history", "seconds"}


def training_record(directory: str | os.PathLike) -> dict:
    """The ``{"history", "seconds"}`` saved beside a trained model ({} if there is none)."""
    path = pathlib.Path(directory) / TRAIN_HISTORY
    return result_files.read_json(path) if path.is_file() else {}


def train_or_restore(
    directory: str | os.PathLike,
    key_config: dict,
    train_fn: Callable[[], tuple[Any, Any, list]],
    *,
    retrain: bool = False,
    what: str = "base model",
    anew: str | None = None,
) -> tuple[Any, Any, dict]:
    """Trains a model once into its config-keyed checkpoint directory, or restores it.

    Args:
      directory: the model's checkpoint directory (its name carries ``key_config``'s hash).
      key_config: JSON-able dict of everything that determines the model; saved with it and
        checked on restore (another config under the same hash is a ``UserError``).
      train_fn: ``() -> (params, batch_stats, history)``, called only when nothing is saved
        or ``retrain``; its wall time is the model's training seconds.
      retrain: train anew even when a model is saved, and replace it.
      what: the model's name in the log ("Reusing base model <directory>").
      anew: how the user trains it anew, for the error on another config (default: delete
        the directory).

    Returns:
      (params, batch_stats, info): info is {"checkpoint", "trained_now", "train_seconds",
      "train_history"}; when restored, the last two come from the saved train_history.json
      (None if it is missing). The model and its history are written atomically. When
      another process sharing the directory saves the same model while this one trains it,
      the saved model is returned (with this training's seconds and history), not an error.
    """
    directory = pathlib.Path(directory)
    if checkpoint.exists(directory) and not retrain:
        logging.info("Reusing %s %s", what, directory)
        try:
            params, batch_stats, _ = checkpoint.restore_model(directory, key_config)
        except ValueError as e:  # config.json of another config under this config's hash
            first = str(e).splitlines()[0]
            anew = anew or f"Delete {directory} to train it anew"
            raise UserError(f"{first} {anew}, or use another --workdir") from None
        saved = training_record(directory)
        return params, batch_stats, {"checkpoint": str(directory), "trained_now": False,
                                     "train_seconds": saved.get("seconds"),
                                     "train_history": saved.get("history")}  # fmt: skip
    start = time.perf_counter()
    params, batch_stats, history = train_fn()
    info = {"checkpoint": str(directory), "trained_now": True,
            "train_seconds": time.perf_counter() - start, "train_history": history}  # fmt: skip
    try:
        checkpoint.save_model(directory, params, batch_stats, key_config, overwrite=retrain)
    except FileExistsError:  # another process sharing the cache saved this model meanwhile
        logging.info("Another process saved the %s %s while this one trained it; using the "
                     "saved one", what, directory)  # fmt: skip
        params, batch_stats, _ = checkpoint.restore_model(directory, key_config)
        return params, batch_stats, info
    record = {"history": history, "seconds": info["train_seconds"]}
    result_files.write_json_atomic(directory / TRAIN_HISTORY, record)
    return params, batch_stats, info


def get_base_model(cfg: ExperimentConfig, train_split: data.Split, test_split: data.Split):
    """Trains the base model once, or restores it from its config-keyed checkpoint.

    Returns:
      (model, params, batch_stats, info): info is {"checkpoint", "trained_now"}, plus
      "train_seconds" and "train_history" when trained now.
    """
    key_config = base_config(cfg)
    name = f"{cfg.model}-{checkpoint.config_key(key_config)}"
    model = build_model(cfg)

    def train_base():
        init_key, train_key = jax.random.split(jax.random.key(cfg.seed))
        params, batch_stats = models.init_variables(model, init_key, data.image_shape(cfg.dataset))
        logging.info("Training base %s on %d images for %d epochs", cfg.model, train_split.size,
                     cfg.train_epochs)  # fmt: skip
        params, batch_stats, history = train.train(
            model, params, batch_stats, train_split, dataset=cfg.dataset,
            config=base_optimizer(cfg), epochs=cfg.train_epochs,
            batch_size=min(cfg.train_batch_size, train_split.size), key=train_key,
            augment=cfg.augment, eval_split=test_split, progress=Progress("train base"),
        )  # fmt: skip
        for record in history:
            logging.info("epoch %d: %s", record["epoch"], record)
        return params, batch_stats, history

    params, batch_stats, info = train_or_restore(
        cached_at(cfg, "base", name), key_config, train_base,
        retrain=cfg.retrain_base, what="base model",
        anew="Pass --retrain_base to train and save it anew",
    )  # fmt: skip
    if not info["trained_now"]:  # a reused base model's info names only its checkpoint
        info = {k: info[k] for k in ("checkpoint", "trained_now")}
    return model, params, batch_stats, info


def importance_sample(cfg: ExperimentConfig, train_split: data.Split) -> data.Split:
    forget, _ = data.forget_retain(train_split, cfg.forget_class)
    pool = forget if cfg.importance_data == "forget" else train_split
    if cfg.importance_fraction < 1:
        return data.random_fraction(pool, cfg.importance_fraction, cfg.seed)
    return pool


def retain_sample(cfg: ExperimentConfig, train_split: data.Split) -> data.Split:
    """Seeded retain-class images scored by the retain-relative importance scores."""
    _, retain = data.forget_retain(train_split, cfg.forget_class)
    return selective.retain_sample(retain, cfg.retain_sample_size, cfg.seed,
                                   cfg.importance_score)  # fmt: skip


def scored_retain_sample(cfg: ExperimentConfig, train_split: data.Split) -> data.Split | None:
    """The retain sample when cfg's importance score uses one (selective, ratio), else None."""
    if selective.needs_retain_sample(cfg.importance_score):
        return retain_sample(cfg, train_split)
    return None


def compute_importance(cfg, model, params, batch_stats, train_split, spec):
    """Importance of ``spec``'s units for cfg's sample and score (tdu_jax.selective).

    The forget-sample pass (``importance_key``) and, for the selective and ratio scores, the
    retain-sample pass (the same key naming the retain sample) are cached apart, so every
    score and beta reuses the same passes.
    """

    def cached_score(key, split):
        def compute():
            logging.info("Importance of %d units on %d images", spec.num_units, split.size)
            return importance.ablation_importance(
                model, params, batch_stats, data.to_float(split.images, cfg.dataset),
                split.labels, spec, unit_chunk=cfg.unit_chunk, sample_batch=cfg.sample_batch,
                progress=Progress("importance"),
            )  # fmt: skip

        name = importance_cache.cache_path("", key).name
        folder = cached_at(cfg, "importance", name).parent.parent
        return importance_cache.cached(folder, key, compute)

    forget_key = importance_key(cfg, params, batch_stats)
    forget = cached_score(forget_key, importance_sample(cfg, train_split))
    if not selective.needs_retain_sample(cfg.importance_score):
        return forget
    retain_key = {**forget_key, "sample": "retain", "retain_size": cfg.retain_sample_size}
    sample = retain_sample(cfg, train_split)
    if cfg.importance_score == selective.WORST_CLASS_RATIO:  # one pass per retained class
        retain = [cached_score({**retain_key, "sample": "retain_class",
                                "retain_class": int(part.labels[0])}, part)
                  for part in selective.split_by_class(sample)]  # fmt: skip
    else:
        retain = cached_score(retain_key, sample)
    return selective.combine(cfg.importance_score, forget, retain, cfg.selective_beta)


def importance_key(cfg: ExperimentConfig, params, batch_stats) -> dict:
    """Everything that determines the forget-sample pass's scores: the model's variables, the
    sample, the units and the estimator (not chunk sizes, which only bound memory)."""
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(jax.device_get((params, batch_stats))):
        digest.update(np.ascontiguousarray(leaf).tobytes())
    keys = ("dataset", "model", "width", "compute_dtype", "forget_class", "importance_data",
            "importance_fraction", "seed", "max_train_examples", "granularity", "include",
            "exclude", "include_bn")  # fmt: skip
    record = cfg.as_record()
    out = {k: record[k] for k in keys}
    # "importance_score": "forget" keeps the key of the caches written before the passes
    # were cached apart, when the forget pass was the whole forget score's.
    out.update(importance_score="forget")
    out.update(variables_sha256=digest.hexdigest(), estimator="exact ablation",
               data_version=data._VERSIONS[cfg.dataset])  # fmt: skip
    return out


def unit_spec(cfg: ExperimentConfig, params) -> units.UnitSpec:
    return units.enumerate_units(params, cfg.granularity, cfg.include, cfg.exclude,
                                 cfg.include_bn)  # fmt: skip


def calibrate_decay(cfg, model, params, batch_stats, train_split, imp, spec,
                    retain_all_points: bool = False) -> dict:  # fmt: skip
    """The train-split sweep of (K, dt) for cfg's request (``tdu_jax.calibrate``); retain
    accuracy only where the rule needs it unless ``retain_all_points``."""
    forget, retain = sweep_samples(cfg, train_split)
    start = time.perf_counter()
    sweep = calibrate.sweep_decay(
        model, params, batch_stats, dataset=cfg.dataset, forget_train=forget,
        retain_train=retain, imp=imp,
        spec=spec, top_ks=cfg.sweep_top_k, dts=cfg.sweep_dt, lam=cfg.lam,
        decay_steps=cfg.decay_steps, forget_max=cfg.sweep_forget_max,
        search_steps=cfg.sweep_search_steps, retain_all_points=retain_all_points,
        budget=cfg.topk_budget,
    )  # fmt: skip
    sweep["seconds"] = time.perf_counter() - start  # part of the unlearning cost
    logging.info("Calibration chose %s (%s)", sweep["chosen"], sweep["chosen_point"])
    return sweep


def confirm_calibration(cfg, model, params, batch_stats, train_split, sweep, precomputed,
                        after):  # fmt: skip
    """``sweep``'s points checked through cfg's own decay and fine-tuning
    (``calibrate.choose_after_finetune``; ``after`` from ``scores_after_row``); a sweep made
    with another lambda or T (e.g. the table's no-fine-tune row) is first redone with cfg's."""
    if (sweep["lambda"], sweep["decay_steps"]) != (cfg.lam, cfg.decay_steps):
        spec = unit_spec(cfg, params)
        sweep = calibrate_decay(cfg, model, params, batch_stats, train_split, precomputed, spec)
    start = time.perf_counter()
    confirmed = calibrate.choose_after_finetune(sweep, after)
    confirmed["confirm_seconds"] = time.perf_counter() - start  # part of the unlearning cost
    logging.info("Calibration after fine-tuning chose %s (%s)", confirmed["chosen"],
                 confirmed["chosen_point"])  # fmt: skip
    return confirmed


def guard_calibration(cfg, calibration, after):
    """``calibration`` with the margin of --sweep_dt_margin (``dt_margin``), checked by
    --sweep_dt_guard through cfg's own run where given (``calibrate.guard_margin``; ``after``
    from ``scores_after_row``); the guard's seconds join ``confirm_seconds``."""
    if cfg.sweep_dt_guard is None:
        return {**calibration, "dt_margin": cfg.sweep_dt_margin}
    start = time.perf_counter()
    guarded = calibrate.guard_margin(calibration, after, cfg.sweep_dt_margin, cfg.sweep_dt_guard)
    guarded["confirm_seconds"] = (calibration.get("confirm_seconds", 0.0)
                                  + time.perf_counter() - start)  # fmt: skip
    logging.info("Calibration's margin guard kept dt x %s (%s)", guarded["dt_margin"],
                 guarded["margin_checks"])  # fmt: skip
    return guarded


def scores_after_row(cfg, model, params, batch_stats, train_split, precomputed):
    """point {"top_k", "dt"} -> forget- and retain-train accuracy (%) on the sweep's samples
    after cfg's own decay and fine-tuning with that point (``calibrate.scores_after_run``)."""
    forget, retain = data.forget_retain(train_split, cfg.forget_class)
    sample = importance_sample(cfg, train_split)
    extra = scored_retain_sample(cfg, train_split)

    check = calibrated.finetune_check_run(
        model, params, batch_stats, dataset=cfg.dataset,
        data_in=unlearn.UnlearnData(sample, retain, data.take(retain, 0), cfg.forget_class, extra),
        config=unlearn_config(cfg, retain.size), key=run_key(cfg), precomputed=precomputed,
    )  # fmt: skip

    def run(top_k, dt):
        logging.info("Calibration: checking K=%s dt=%s through the row's run", top_k, dt)
        return check(top_k, dt)

    scored_forget, scored_retain = sweep_samples(cfg, train_split)
    return calibrate.scores_after_run(
        model, run, dataset=cfg.dataset, forget_train=scored_forget, retain_train=scored_retain
    )


def run_key(cfg: ExperimentConfig) -> jax.Array:
    """The unlearning run's key (random-K selection and fine-tune batch order)."""
    return jax.random.fold_in(jax.random.key(cfg.seed), 1)


def sweep_samples(cfg: ExperimentConfig, train_split: data.Split) -> tuple[data.Split, ...]:
    """The forget- and retain-train images the calibration scores at every point: seeded
    subsets of --sweep_forget_sample and --sweep_retain_sample images (0: all)."""
    forget, retain = data.forget_retain(train_split, cfg.forget_class)
    return (calibrate.subsample(forget, cfg.sweep_forget_sample, 0),
            calibrate.subsample(retain, cfg.sweep_retain_sample, 0))  # fmt: skip


def accuracies(model, params, batch_stats, cfg, train_split, test_split) -> tuple[dict, list]:
    """forget/retain/test accuracy on test, forget/retain accuracy on train (percent)."""
    ev = metrics.evaluate(model, params, batch_stats, test_split, dataset=cfg.dataset,
                          forget_classes=cfg.forget_class)  # fmt: skip
    tr = metrics.evaluate(model, params, batch_stats, train_split, dataset=cfg.dataset,
                          forget_classes=cfg.forget_class)  # fmt: skip
    out = {k: ev[k] for k in ("forget_acc", "retain_acc", "test_acc")}
    out.update(forget_train_acc=tr["forget_acc"], retain_train_acc=tr["retain_acc"])
    return out, ev["per_class"]


def versions() -> dict:
    return {
        "tdu_jax": tdu_jax.__version__, "jax": jax.__version__, "flax": flax.__version__,
        "optax": optax.__version__, "numpy": np.__version__, "python": platform.python_version(),
        "device": str(jax.devices()[0].device_kind), "platform": jax.default_backend(),
        "data": {"mnist": "3.0.1", "cifar10": "3.0.2"},
    }  # fmt: skip


def cached_at(cfg: ExperimentConfig, kind: str, name: str) -> pathlib.Path:
    """Where the cached ``<kind>/<name>`` (kind: base, retrain, importance) lives: under the
    shared cache folder (``cfg.cache_dir``, else the workdir), or under the run's own workdir
    where an earlier version of reproduce or compare left it (so it is reused, not redone)."""
    shared = pathlib.Path(cfg.cache_dir or cfg.workdir) / kind / name
    own = pathlib.Path(cfg.workdir) / kind / name
    return own if own.exists() and not shared.exists() else shared


def run_dir(cfg: ExperimentConfig) -> pathlib.Path:
    name = cfg.run_name or f"{cfg.row or 'custom'}-seed{cfg.seed}"
    return pathlib.Path(cfg.workdir) / name


def existing_result(cfg: ExperimentConfig) -> dict | None:
    """A finished result of the same config (resume), or None; refuses to clobber others."""
    path = run_dir(cfg) / "result.json"
    if not path.exists():
        return None
    saved = result_files.read_json(path)
    if resume_key(saved.get("config", {})) == resume_key(_public(cfg)):
        return saved
    if not cfg.overwrite:
        raise FileExistsError(
            f"{path} holds a result of a different config; pass --overwrite or --run_name"
        )
    return None


# Where a run's inputs and outputs live, not what it computes: a results folder that was
# moved or merged into another, or data read from another copy, still resumes.
LOCATION_SETTINGS = ("workdir", "data_dir")


def resume_key(config: dict) -> str:
    """What makes two recorded configs the same run: every setting but the locations. With
    ``calibrate`` on, K and dt are the calibration's output (a row that fine-tunes may move
    them), so they are left out too. A setting at its generic default counts as absent, so a
    result recorded before that setting existed (it behaved as the default) still resumes."""
    drop = LOCATION_SETTINGS + (("top_k", "dt") if config.get("calibrate") else ())
    return checkpoint.config_key({k: v for k, v in config.items()
                                  if k not in drop and not _at_default(k, v)})  # fmt: skip


def _at_default(name: str, value) -> bool:
    """Whether ``value`` (as recorded: tuples as lists) is setting ``name``'s generic default."""
    try:
        default = config.default(name)
    except KeyError:  # a table-wide choice, or a setting this version does not have
        return False
    return (list(default) if isinstance(default, tuple) else default) == value


def _public(cfg: ExperimentConfig) -> dict:
    """The config as recorded and compared: everything but permissions, safety checks and
    where the shared caches live (the checkpoints' own paths are recorded in the result)."""
    return {k: v for k, v in cfg.as_record().items()
            if k not in ("overwrite", "retrain_base", "min_base_acc", "cache_dir")}  # fmt: skip


def run_one(cfg, model, params, batch_stats, base, train_split, test_split, *,
            precomputed=None, calibration=None) -> dict:  # fmt: skip
    """Runs the unlearning config from the base model and writes result.json atomically.

    With ``--calibrate``, K and dt come from ``calibration`` (a sweep already made for this
    request, e.g. by ``reproduce``) or from a sweep run here with this row's lambda and T.
    """
    start = time.perf_counter()
    _, retain_train = data.forget_retain(train_split, cfg.forget_class)
    sample = importance_sample(cfg, train_split)
    importance_seconds = 0.0  # spent here computing (or loading) importance, before unlearn
    sweep_here = cfg.calibrate and calibration is None and cfg.decay_steps > 0
    if precomputed is None and (sweep_here or (cfg.selection == "topk" and not cfg.reestimate)):
        # Through the workdir's importance cache: a rerun or resumed run reuses the scores.
        importance_start = time.perf_counter()
        precomputed = compute_importance(cfg, model, params, batch_stats, train_split,
                                         unit_spec(cfg, params))  # fmt: skip
        importance_seconds = time.perf_counter() - importance_start
    if not cfg.calibrate:
        calibration = None
    elif sweep_here:
        calibration = calibrate_decay(cfg, model, params, batch_stats, train_split,
                                      precomputed, unit_spec(cfg, params))  # fmt: skip
    if calibration is not None:  # checks through the row's own run, then the margin
        confirm = cfg.calibrate_finetune and cfg.finetune != "none"
        after = None
        if confirm or cfg.sweep_dt_guard is not None:
            after = scores_after_row(cfg, model, params, batch_stats, train_split, precomputed)
        if confirm:
            calibration = confirm_calibration(cfg, model, params, batch_stats, train_split,
                                              calibration, precomputed, after)  # fmt: skip
        calibration = guard_calibration(cfg, calibration, after)
        cfg = dataclasses.replace(cfg, **calibrate.run_point(calibration, calibration["dt_margin"]))
    ucfg = unlearn_config(cfg, retain_train.size)
    progress = {"importance": Progress("importance"), "finetune": Progress("finetune")}

    def event(phase, info):
        if phase == "step":
            logging.info("decay step %s", info)
        else:
            progress[phase](info["done"], info["total"],
                            info["seconds"] if phase == "importance" else info)  # fmt: skip

    result = unlearn.unlearn(
        model, params, batch_stats, dataset=cfg.dataset,
        data_in=unlearn.UnlearnData(
            sample, retain_train, test_split, cfg.forget_class,
            scored_retain_sample(cfg, train_split),
        ),
        config=ucfg, key=run_key(cfg), event=event,
        precomputed=precomputed,
    )  # fmt: skip
    eval_start = time.perf_counter()
    final, final_per_class = accuracies(model, result.params, result.batch_stats, cfg,
                                        train_split, test_split)  # fmt: skip
    timings = dict(result.timings)
    timings["importance"] += importance_seconds
    timings["calibration"] = calibration_seconds(calibration)
    timings["eval"] += time.perf_counter() - eval_start
    timings["total"] = time.perf_counter() - start
    imp = result.importance
    out = {
        "row": cfg.row,
        "config": _public(cfg),
        "calibration": calibration,
        "base": base["acc"],
        "final": final,
        "per_class_acc": {"base": base["per_class"], "final": final_per_class},
        "history": result.history,
        "finetune_batches": result.finetune_batches,
        "importance": {
            "granularity": cfg.granularity,
            "num_units": result.spec.num_units,
            "sample_size": sample.size,
            "selected": int(result.selected.size),
            "seconds": None if imp is None else imp.seconds,
            "reused": precomputed is not None and imp is precomputed,
            "base_sample_accuracy": None if imp is None else imp.base_accuracy,
        },  # fmt: skip
        "selected_norm_ratio": selected_norm_ratio(
            params, result.params, result.spec, result.selected
        ),
        "timings": timings,
        "versions": versions(),
        "base_model": {k: v for k, v in base.items() if k not in ("acc", "per_class")},
    }
    if cfg.compare_retrain:
        from experiments import gold  # local: gold builds on this module

        seconds = gold.unlearning_seconds(timings, None if imp is None else imp.seconds)
        report_ = gold.compare(cfg, model, params, batch_stats, result.params,
                               result.batch_stats, train_split, test_split, seconds)  # fmt: skip
        out["final"].update({k: v for k, v in report_.pop("final_metrics").items()
                             if k not in out["final"]})  # fmt: skip
        out.update(report_)
    path = run_dir(cfg) / "result.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    result_files.write_json_atomic(path, out)
    return out


def calibration_seconds(calibration: dict | None) -> float:
    """Seconds the request's calibration took: its sweep, plus the checks through the row's
    fine-tuning (0 without calibration, or for a record from before these were timed)."""
    if not calibration:
        return 0.0
    return float(calibration.get("seconds", 0.0) + calibration.get("confirm_seconds", 0.0))


def selected_norm_ratio(before, after, spec, selected) -> float | None:
    """L2 norm of the selected units' parameters after the run over before it.

    Without fine-tuning this is exactly exp(-lambda * dt * T): a run whose decay did
    nothing shows 1.0. None when nothing was selected.
    """
    if np.size(selected) == 0:
        return None
    mask = units.unit_mask(before, spec, selected)
    norm = lambda tree: float(np.sqrt(sum(float(jnp.sum(jnp.where(m, p, 0.0) ** 2))
                                          for p, m in zip(jax.tree.leaves(tree),
                                                          jax.tree.leaves(mask),
                                                          strict=True))))  # fmt: skip
    base = norm(before)
    return norm(after) / base if base > 0 else None


def prepare_base(cfg: ExperimentConfig):
    """Data, base model and its accuracies (train once, reuse after)."""
    train_split, test_split = load_data(cfg)
    model, params, batch_stats, base = get_base_model(cfg, train_split, test_split)
    base["acc"], base["per_class"] = accuracies(model, params, batch_stats, cfg, train_split,
                                                test_split)  # fmt: skip
    logging.info("Base model: %s", base["acc"])
    check_base_usable(cfg, base["acc"]["test_acc"])
    return train_split, test_split, model, params, batch_stats, base


def check_base_usable(cfg: ExperimentConfig, test_acc: float) -> None:
    """Refuses a base model near chance accuracy (nothing to unlearn), naming the fixes."""
    chance = 100.0 / data.num_classes(cfg.dataset)
    floor = 2 * chance if cfg.min_base_acc < 0 else cfg.min_base_acc
    if test_acc < floor:
        raise UserError(
            f"the base model is unusable: test accuracy {test_acc:.2f}% is below "
            f"--min_base_acc={floor:g}% (chance: {chance:g}%), so unlearning results would mean "
            f"nothing. Train it longer or on more data (--train_epochs="
            f"{max(2 * cfg.train_epochs, 1)}, --max_train_examples=0; a new setting trains a "
            "new base model), or pass --min_base_acc=0 to run anyway"
        )


class UserError(Exception):
    """A mistake in the user's flags, data or files: reported in one line, no traceback."""


# What an interrupted run leaves behind; the entry point fills it in as work finishes.
RESUME_NOTE = {"text": "nothing was finished."}


@contextlib.contextmanager
def bad_input():
    """Reports a bad setting (ValueError/FileExistsError) as a ``UserError``, no traceback.

    Wrap only flag parsing and validation: errors from the work itself keep their traceback.
    """
    try:
        yield
    except (ValueError, FileExistsError) as e:
        raise UserError(str(e)) from None


def _excepthook(kind, value, tb) -> None:
    """One line for a user's mistake or Ctrl-C; the full traceback for anything else (bugs)."""
    prog = pathlib.Path(sys.argv[0]).stem if sys.argv and sys.argv[0] else "tdu_jax"
    if issubclass(kind, KeyboardInterrupt):
        print(f"\n{prog}: interrupted; {RESUME_NOTE['text']}", file=sys.stderr)
    elif issubclass(kind, UserError | app.UsageError):
        print(f"{prog}: error: {value}", file=sys.stderr)
    else:
        sys.__excepthook__(kind, value, tb)


# Third-party INFO lines (orbax, TFDS, JAX backends, optax) and known-harmless warnings are
# hidden unless --verbosity >= 1; our own INFO lines and everyone's real warnings stay.
_OWN_CODE = tuple(
    str(pathlib.Path(__file__).resolve().parents[1] / d) + os.sep
    for d in ("experiments", "tdu_jax", "benchmarks", "scripts")
)
_HARMLESS = ("OpenCV is not installed",)


class _QuietThirdParty(std_logging.Filter):
    def filter(self, record: std_logging.LogRecord) -> bool:
        if logging.get_verbosity() >= logging.DEBUG or record.pathname.startswith(_OWN_CODE):
            return True
        if record.levelno < std_logging.WARNING:
            return False
        return not any(text in str(record.msg) for text in _HARMLESS)


def setup_logging() -> None:
    """Quiet third-party logs (``--verbosity=1`` shows everything); idempotent."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # C++ INFO/WARNING of TF and XLA
    handler = logging.get_absl_handler()
    if not any(isinstance(f, _QuietThirdParty) for f in handler.filters):
        handler.addFilter(_QuietThirdParty())


def main_single(dataset: str, defaults: dict) -> None:
    """The whole of ``mnist_lenet`` / ``cifar_ship``: every flag, with the entry point's
    table-wide ``defaults``, then one run on ``dataset`` and a one-screen summary."""
    define_flags(**defaults)
    app.run(lambda argv: _single_run(dataset))


def _single_run(dataset: str) -> None:
    with bad_input():
        cfg = config_from_flags(dataset)
        done = None if cfg.retrain_base else existing_result(cfg)
    RESUME_NOTE["text"] = (
        f"rerun the same command to resume: the base model and importance, once saved under "
        f"{cfg.workdir}, are reused."
    )
    if done is not None:
        logging.info("Result exists for this config: %s", run_dir(cfg) / "result.json")
        print(summary.print_summary(done))
        return
    train_split, test_split, model, params, batch_stats, base = prepare_base(cfg)
    out = run_one(cfg, model, params, batch_stats, base, train_split, test_split)
    print(summary.print_summary(out))
    print(f"result: {run_dir(cfg) / 'result.json'}")
