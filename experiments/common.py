"""Shared machinery of the experiment entry points: flags, config, base model, one run.

Only ``experiments/`` defines flags. A run's config is a plain JSON-able dict built
from the flags (preset values fill in flags not given explicitly); the library
sees typed arguments only.
"""

import contextlib
import os
import pathlib
import platform
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging

import tdu_jax
from experiments import presets
from tdu_jax import checkpoint, data, decay, metrics, models, report, train, units, unlearn

FLAGS = flags.FLAGS

# Flags that shape the base model; everything else only shapes the unlearning run.
BASE_KEYS = (
    "dataset", "model", "width", "compute_dtype", "seed", "train_epochs", "train_batch_size",
    "train_optimizer", "train_lr", "train_momentum", "train_weight_decay", "train_schedule",
    "train_label_smoothing", "augment", "max_train_examples",
)  # fmt: skip
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def define_flags(**defaults) -> None:
    """Defines every flag; ``defaults`` are the entry point's table-wide choices."""
    d = defaults
    before = set(FLAGS)
    flags.DEFINE_string("preset", None, f"Reference row: {', '.join(presets.PRESETS)}.")
    flags.DEFINE_string("forget_class", d["forget_class"], "Class name or index; comma list.")
    flags.DEFINE_string("model", d["model"], f"One of {', '.join(models.MODELS)}.")
    flags.DEFINE_float("width", d.get("width", 1.0), "ResNet channel multiplier.")
    flags.DEFINE_enum("compute_dtype", "float32", list(DTYPES), "ResNet computation dtype.")
    flags.DEFINE_float("lambda", d.get("lam", 0.1), "Decay rate lambda (>= 0).")
    flags.DEFINE_float("dt", d["dt"], "Time per decay step (> 0).")
    flags.DEFINE_integer("decay_steps", d.get("decay_steps", 7), "Decay steps T (>= 0).")
    flags.DEFINE_string("top_k", d["top_k"], "K: a count (e.g. 1000) or a fraction (0.05).")
    flags.DEFINE_enum("granularity", d["granularity"], list(units.GRANULARITIES), "Unit kind.")
    flags.DEFINE_enum("selection", "topk", list(decay.SELECTIONS), "top-K or random-K.")
    flags.DEFINE_enum("importance_data", "forget", ["forget", "all"], "Importance sample pool.")
    flags.DEFINE_float("importance_fraction", 1.0, "Seeded fraction of the pool, in (0, 1].")
    flags.DEFINE_bool("reestimate", False, "Recompute importance before every decay step.")
    flags.DEFINE_string("include", d.get("include"), "Regex: layers whose units may be chosen.")
    flags.DEFINE_string("exclude", None, "Regex: layers whose units may not be chosen.")
    flags.DEFINE_bool("include_bn", True, "Filter units include the paired BatchNorm channel.")
    flags.DEFINE_enum("finetune", "none", list(unlearn.FINETUNE_MODES), "Fine-tune schedule.")
    flags.DEFINE_float("finetune_epochs", 0.0, "after_all: epochs of retain data.")
    flags.DEFINE_integer("finetune_batches", 0, "after_all: batches; after_each: per step.")
    flags.DEFINE_enum("finetune_optimizer", "sgd", ["sgd", "adam"], "Fine-tune optimizer.")
    flags.DEFINE_float("finetune_lr", d["finetune_lr"], "Fine-tune learning rate.")
    flags.DEFINE_float("finetune_momentum", 0.9, "Fine-tune SGD momentum.")
    flags.DEFINE_float("finetune_weight_decay", 5e-4, "Fine-tune weight decay.")
    flags.DEFINE_integer("batch_size", 128, "Fine-tune batch size.")
    flags.DEFINE_integer("seed", 0, "Seed of everything (base model, sample, batches).")
    flags.DEFINE_string("data_dir", None, "TFDS data dir (default: $TFDS_DATA_DIR, then TFDS's).")
    flags.DEFINE_string("workdir", "runs", "Where base models and results go.")
    flags.DEFINE_string("run_name", None, "Result folder name (default: preset-seed).")
    flags.DEFINE_bool("overwrite", False, "Replace an existing result of another config.")
    flags.DEFINE_integer("train_epochs", d["train_epochs"], "Base model epochs.")
    flags.DEFINE_integer("train_batch_size", 128, "Base model batch size.")
    flags.DEFINE_enum("train_optimizer", d["train_optimizer"], ["sgd", "adam"], "Base optimizer.")
    flags.DEFINE_float("train_lr", d["train_lr"], "Base model peak learning rate.")
    flags.DEFINE_float("train_momentum", 0.9, "Base model SGD momentum.")
    flags.DEFINE_float("train_weight_decay", d["train_weight_decay"], "Base weight decay.")
    flags.DEFINE_enum("train_schedule", d["train_schedule"], ["constant", "cosine", "onecycle"],
                      "Base learning-rate schedule.")  # fmt: skip
    flags.DEFINE_float("train_label_smoothing", 0.0, "Base model label smoothing.")
    flags.DEFINE_bool("augment", d["augment"], "Crop+flip augmentation (train and fine-tune).")
    flags.DEFINE_integer("max_train_examples", 0, "Use only the first N train images (0: all).")
    flags.DEFINE_integer("max_test_examples", 0, "Use only the first N test images (0: all).")
    flags.DEFINE_integer("unit_chunk", d.get("unit_chunk", 256), "Units per importance call.")
    flags.DEFINE_integer("sample_batch", 1024, "Images per importance call.")
    flags.DEFINE_bool("evaluate_each_step", True, "Evaluate on test after every decay step.")
    _OWN_FLAGS[:] = sorted(set(FLAGS) - before)


def _flag(name: str):
    return FLAGS[name].value


def parse_top_k(text: str) -> int | float:
    """``"1000"`` -> 1000 (count); ``"0.05"`` -> 0.05 (fraction)."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ValueError(f"--top_k must be a count or a fraction in (0, 1]; got {text!r}") from None
    if value.is_integer() and "." not in str(text):
        return int(value)
    return value


def config_from_flags(dataset: str, defaults: dict | None = None) -> dict:
    """The run's config dict: flags, with the preset filling flags not set explicitly.

    ``defaults`` (an entry point's table-wide choices) replace the flag defaults, for
    ``reproduce``, which serves several tables with one set of flags.
    """
    row = _flag("preset")
    values = {n: FLAGS[n].value for n in _OWN_FLAGS}
    for key, value in (defaults or {}).items():
        if not FLAGS["lambda" if key == "lam" else key].present:
            values["lambda" if key == "lam" else key] = value
    values["lam"] = values.pop("lambda")
    if row is not None:
        values = apply_preset(values, row)
    values["dataset"] = dataset
    values["row"] = row
    return validate_config(values)


_OWN_FLAGS: list[str] = []


def apply_preset(cfg: dict, row: str) -> dict:
    """``cfg`` with row ``row``'s settings, except those given explicitly as flags."""
    out = dict(cfg)
    for key, value in presets.preset(row).items():
        if not FLAGS["lambda" if key == "lam" else key].present:
            out[key] = value
    return out


def validate_config(cfg: dict) -> dict:
    """Checks every setting before any expensive work; returns the normalised config."""
    cfg = dict(cfg)
    data.check_dataset(cfg["dataset"])
    if cfg["model"] not in models.MODELS:
        raise ValueError(f"--model must be one of {', '.join(models.MODELS)}; got {cfg['model']!r}")
    try:
        cfg["forget_class"] = list(data.parse_classes(cfg["dataset"], cfg["forget_class"]))
    except ValueError as e:
        raise ValueError(f"--forget_class: {e}") from None
    cfg["top_k"] = parse_top_k(cfg["top_k"]) if isinstance(cfg["top_k"], str) else cfg["top_k"]
    if not 0 < cfg["importance_fraction"] <= 1:
        raise ValueError(
            f"--importance_fraction must be in (0, 1]; got {cfg['importance_fraction']}"
        )
    if cfg["finetune"] == "none" and (cfg["finetune_batches"] or cfg["finetune_epochs"]):
        raise ValueError(
            "--finetune=none conflicts with --finetune_batches/--finetune_epochs; "
            "use --finetune=after_all or after_each"
        )
    if cfg["finetune_epochs"] and cfg["finetune_batches"]:
        raise ValueError("give either --finetune_epochs or --finetune_batches, not both")
    if cfg["finetune"] == "after_each" and cfg["finetune_epochs"]:
        raise ValueError("--finetune=after_each takes --finetune_batches (per step), not epochs")
    if cfg["finetune_epochs"] < 0:
        raise ValueError(f"--finetune_epochs must be >= 0; got {cfg['finetune_epochs']}")
    for name in ("batch_size", "train_batch_size", "unit_chunk", "sample_batch"):
        if cfg[name] < 1:
            raise ValueError(f"--{name} must be >= 1; got {cfg[name]}")
    for name in ("train_epochs", "max_train_examples", "max_test_examples"):
        if cfg[name] < 0:
            raise ValueError(f"--{name} must be >= 0; got {cfg[name]}")
    unlearn.validate_unlearn_config(unlearn_config(cfg, retain_size=None))
    train.validate_optimizer_config(base_optimizer(cfg))
    check_workdir(cfg["workdir"])
    return cfg


def check_workdir(workdir: str) -> None:
    path = pathlib.Path(workdir)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--workdir {workdir} cannot be created: {e}") from None
    if not os.access(path, os.W_OK):
        raise ValueError(f"--workdir {workdir} is not writable")


def base_optimizer(cfg: dict) -> train.OptimizerConfig:
    return train.OptimizerConfig(
        name=cfg["train_optimizer"], learning_rate=cfg["train_lr"],
        momentum=cfg["train_momentum"], weight_decay=cfg["train_weight_decay"],
        schedule=cfg["train_schedule"], label_smoothing=cfg["train_label_smoothing"],
    )  # fmt: skip


def unlearn_config(cfg: dict, retain_size: int | None) -> unlearn.UnlearnConfig:
    """Typed unlearning settings; epochs become batches once the retain size is known."""
    batches = cfg["finetune_batches"]
    if cfg["finetune_epochs"] and retain_size is not None:
        batches = unlearn.epochs_to_batches(cfg["finetune_epochs"], retain_size, cfg["batch_size"])
    elif cfg["finetune_epochs"]:
        batches = 1  # placeholder for validation before the data is loaded
    return unlearn.UnlearnConfig(
        granularity=cfg["granularity"], top_k=cfg["top_k"], selection=cfg["selection"],
        lam=cfg["lam"], dt=cfg["dt"], decay_steps=cfg["decay_steps"],
        reestimate=cfg["reestimate"], include=cfg["include"], exclude=cfg["exclude"],
        include_bn=cfg["include_bn"], finetune=cfg["finetune"], finetune_batches=batches,
        finetune_optimizer=train.OptimizerConfig(
            name=cfg["finetune_optimizer"], learning_rate=cfg["finetune_lr"],
            momentum=cfg["finetune_momentum"], weight_decay=cfg["finetune_weight_decay"],
            schedule="constant",
        ),
        batch_size=cfg["batch_size"], augment=cfg["augment"],
        evaluate_each_step=cfg["evaluate_each_step"], unit_chunk=cfg["unit_chunk"],
        sample_batch=cfg["sample_batch"],
    )  # fmt: skip


# ------------------------------------------------------------------ data and model
def load_data(cfg: dict) -> tuple[data.Split, data.Split]:
    train_split = data.load_split(cfg["dataset"], "train", cfg["data_dir"])
    test_split = data.load_split(cfg["dataset"], "test", cfg["data_dir"])
    if cfg["max_train_examples"]:
        train_split = data.take(train_split, cfg["max_train_examples"])
    if cfg["max_test_examples"]:
        test_split = data.take(test_split, cfg["max_test_examples"])
    return train_split, test_split


def build_model(cfg: dict):
    return models.get_model(
        cfg["model"], data.num_classes(cfg["dataset"]), cfg["width"], DTYPES[cfg["compute_dtype"]]
    )


def base_config(cfg: dict) -> dict:
    out = {k: cfg[k] for k in BASE_KEYS}
    out["tdu_jax_base_format"] = 1
    return out


class Progress:
    """Logs a phase's progress with rate and ETA at most every ``every`` seconds."""

    def __init__(self, phase: str, every: float = 10.0):
        self.phase, self.every, self.last = phase, every, 0.0

    def __call__(self, done, total, info) -> None:
        now = time.perf_counter()
        if done < total and now - self.last < self.every:
            return
        self.last = now
        if isinstance(info, dict):
            extra = ", ".join(f"{k}={v:.4g}" for k, v in info.items() if isinstance(v, float | int))
        else:  # importance: seconds elapsed
            rate = done / info if info else float("nan")
            extra = f"{rate:.1f} units/s, eta {(total - done) / rate if rate else 0:.0f}s"
        logging.info("%s: %d/%d (%s)", self.phase, done, total, extra)


def get_base_model(cfg: dict, train_split: data.Split, test_split: data.Split):
    """Trains the base model once, or restores it from its config-keyed checkpoint."""
    base_cfg = base_config(cfg)
    directory = (
        pathlib.Path(cfg["workdir"]) / "base" / f"{cfg['model']}-{checkpoint.config_key(base_cfg)}"
    )
    model = build_model(cfg)
    if checkpoint.exists(directory):
        logging.info("Reusing base model %s", directory)
        params, batch_stats, _ = checkpoint.restore_model(directory, base_cfg)
        return model, params, batch_stats, {"checkpoint": str(directory), "trained_now": False}
    init_key, train_key = jax.random.split(jax.random.key(cfg["seed"]))
    params, batch_stats = models.init_variables(model, init_key, data.image_shape(cfg["dataset"]))
    logging.info("Training base %s on %d images for %d epochs", cfg["model"], train_split.size,
                 cfg["train_epochs"])  # fmt: skip
    start = time.perf_counter()
    params, batch_stats, history = train.train(
        model, params, batch_stats, train_split, dataset=cfg["dataset"],
        config=base_optimizer(cfg), epochs=cfg["train_epochs"],
        batch_size=min(cfg["train_batch_size"], train_split.size), key=train_key,
        augment=cfg["augment"], eval_split=test_split, progress=Progress("train base", 30.0),
    )  # fmt: skip
    seconds = time.perf_counter() - start
    for record in history:
        logging.info("epoch %d: %s", record["epoch"], record)
    checkpoint.save_model(directory, params, batch_stats, base_cfg, overwrite=False)
    report.write_json_atomic(directory / "train_history.json", {"history": history,
                             "seconds": seconds})  # fmt: skip
    return (
        model,
        params,
        batch_stats,
        {
            "checkpoint": str(directory),
            "trained_now": True,
            "train_seconds": seconds,
            "train_history": history,
        },
    )


def importance_sample(cfg: dict, train_split: data.Split) -> data.Split:
    forget, _ = data.forget_retain(train_split, cfg["forget_class"])
    pool = forget if cfg["importance_data"] == "forget" else train_split
    if cfg["importance_fraction"] < 1:
        return data.random_fraction(pool, cfg["importance_fraction"], cfg["seed"])
    return pool


def accuracies(model, params, batch_stats, cfg, train_split, test_split) -> tuple[dict, list]:
    """forget/retain/test accuracy on test, forget/retain accuracy on train (percent)."""
    ev = metrics.evaluate(model, params, batch_stats, test_split, dataset=cfg["dataset"],
                          forget_classes=cfg["forget_class"])  # fmt: skip
    tr = metrics.evaluate(model, params, batch_stats, train_split, dataset=cfg["dataset"],
                          forget_classes=cfg["forget_class"])  # fmt: skip
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


def run_dir(cfg: dict) -> pathlib.Path:
    name = cfg.get("run_name") or f"{cfg['row'] or 'custom'}-seed{cfg['seed']}"
    return pathlib.Path(cfg["workdir"]) / name


def existing_result(cfg: dict) -> dict | None:
    """A finished result of the same config (resume), or None; refuses to clobber others."""
    path = run_dir(cfg) / "result.json"
    if not path.exists():
        return None
    saved = report.read_json(path)
    if checkpoint.config_key(saved.get("config", {})) == checkpoint.config_key(_public(cfg)):
        return saved
    if not cfg["overwrite"]:
        raise FileExistsError(
            f"{path} holds a result of a different config; pass --overwrite or --run_name"
        )
    return None


def _public(cfg: dict) -> dict:
    """The config as recorded and compared: everything but the --overwrite permission."""
    return {k: v for k, v in cfg.items() if k != "overwrite"}


def run_one(cfg, model, params, batch_stats, base, train_split, test_split, *,
            precomputed=None) -> dict:  # fmt: skip
    """Runs the unlearning config from the base model and writes result.json atomically."""
    start = time.perf_counter()
    _, retain_train = data.forget_retain(train_split, cfg["forget_class"])
    sample = importance_sample(cfg, train_split)
    ucfg = unlearn_config(cfg, retain_train.size)
    progress = {"importance": Progress("importance"), "finetune": Progress("finetune", 30.0)}

    def event(phase, info):
        if phase == "step":
            logging.info("decay step %s", info)
        else:
            progress[phase](info["done"], info["total"],
                            info["seconds"] if phase == "importance" else info)  # fmt: skip

    result = unlearn.unlearn(
        model, params, batch_stats, dataset=cfg["dataset"],
        data_in=unlearn.UnlearnData(sample, retain_train, test_split, tuple(cfg["forget_class"])),
        config=ucfg, key=jax.random.fold_in(jax.random.key(cfg["seed"]), 1), event=event,
        precomputed=precomputed,
    )  # fmt: skip
    eval_start = time.perf_counter()
    final, final_per_class = accuracies(model, result.params, result.batch_stats, cfg,
                                        train_split, test_split)  # fmt: skip
    timings = dict(result.timings)
    timings["eval"] += time.perf_counter() - eval_start
    timings["total"] = time.perf_counter() - start
    imp = result.importance
    out = {
        "row": cfg["row"],
        "config": _public(cfg),
        "base": base["acc"],
        "final": final,
        "per_class_acc": {"base": base["per_class"], "final": final_per_class},
        "history": result.history,
        "finetune_batches": result.finetune_batches,
        "importance": {
            "granularity": cfg["granularity"],
            "num_units": result.spec.num_units,
            "sample_size": sample.size,
            "selected": int(result.selected.size),
            "seconds": None if imp is None else imp.seconds,
            "reused": precomputed is not None and imp is precomputed,
            "base_sample_accuracy": None if imp is None else imp.base_accuracy,
        },  # fmt: skip
        "timings": timings,
        "versions": versions(),
        "base_model": {k: v for k, v in base.items() if k not in ("acc", "per_class")},
    }
    path = run_dir(cfg) / "result.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    report.write_json_atomic(path, out)
    return out


def prepare_base(cfg: dict):
    """Data, base model and its accuracies (train once, reuse after)."""
    train_split, test_split = load_data(cfg)
    model, params, batch_stats, base = get_base_model(cfg, train_split, test_split)
    base["acc"], base["per_class"] = accuracies(model, params, batch_stats, cfg, train_split,
                                                test_split)  # fmt: skip
    logging.info("Base model: %s", base["acc"])
    return train_split, test_split, model, params, batch_stats, base


@contextlib.contextmanager
def bad_input():
    """Reports a bad setting (ValueError/FileExistsError) as absl's usage error, no traceback.

    Wrap only flag parsing and validation: errors from the work itself keep their traceback.
    """
    try:
        yield
    except (ValueError, FileExistsError) as e:
        raise app.UsageError(str(e)) from None


def main_single(dataset: str) -> None:
    """Body of mnist_lenet / cifar_ship: one run, then a one-screen summary."""
    with bad_input():
        cfg = config_from_flags(dataset)
        done = existing_result(cfg)
    if done is not None:
        logging.info("Result exists for this config: %s", run_dir(cfg) / "result.json")
        print(report.print_summary(done))
        return
    train_split, test_split, model, params, batch_stats, base = prepare_base(cfg)
    out = run_one(cfg, model, params, batch_stats, base, train_split, test_split)
    print(report.print_summary(out))
    print(f"result: {run_dir(cfg) / 'result.json'}")
