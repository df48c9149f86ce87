"""The typed experiment config: the dict it records and hashes is the dict config's, exactly.

Workdirs made before the config became a dataclass must be reused: base models, importance
scores, retrained models and finished results are found by hashes of ``as_record()`` /
``_public(cfg)``. The expected dicts below were written by the code before the change (result.json
of ``mnist_lenet --max_train_examples=512 --max_test_examples=200 --train_epochs=1
--workdir=/tmp/tc_ref --nocompare_retrain``, and ``_public(config_from_flags("cifar10"))`` of
``cifar_ship --workdir=/tmp/tc_ref``), so they pin key names, values, order and hashes.
Later settings (``sweep_search_steps``, the wider LeNet K grid of the fourth session, the
sweep sample sizes and fine-tune schedule of the sixth, the top-K budget of the eighth, the
base recipe's Nesterov, weight-decay mask, ResNet padding and validation hold-out of the
twelfth, the dt margin of the twenty-second) were
added to them by hand: they change the record's hash, but not the base-model or
retrained-model keys, which are pinned unchanged; a new setting at its default does not
change the resume key (``common.resume_key``), so results recorded before it existed still
resume.
"""

import dataclasses
import json
import pathlib
import subprocess
import sys

import pytest

from experiments import common, config, gold
from experiments.config import RECORD_ORDER, ExperimentConfig
from tdu_jax import checkpoint

REPO = pathlib.Path(__file__).resolve().parents[1]

# result.json "config" of the mnist_lenet run above; K=300 is what its calibration chose.
LENET_RECORD = {
    "augment": False, "batch_size": 128, "calibrate": True, "calibrate_finetune": True,
    "compare_retrain": False, "compute_dtype": "float32", "data_dir": None, "decay_steps": 7,
    "dt": 0.25, "evaluate_each_step": True, "exclude": None, "finetune": "none",
    "finetune_batches": 0, "finetune_epochs": 0.0, "finetune_lr": 0.01,
    "finetune_momentum": 0.9, "finetune_optimizer": "sgd", "finetune_schedule": "constant",
    "finetune_weight_decay": 0.0005,
    "forget_class": [0], "granularity": "weight", "importance_data": "forget",
    "importance_fraction": 1.0, "importance_score": "forget", "include": None,
    "include_bn": True, "max_test_examples": 200, "max_train_examples": 512, "model": "lenet",
    "preset": None, "reestimate": False, "resnet_padding": "same", "retain_sample_size": 1000,
    "run_name": None,
    "sample_batch": 128, "seed": 0, "selection": "topk", "selective_beta": 1.0,
    "sweep_dt": [0.25, 0.5, 1.0, 2.0], "sweep_dt_guard": None, "sweep_dt_margin": 1.0,
    "sweep_forget_max": 1.0,
    "sweep_forget_sample": 0,
    "sweep_retain_sample": 10000, "sweep_search_steps": 6,
    "sweep_top_k": [300, 1000, 3000, 10000, 30000], "top_k": 300, "topk_budget": "per_layer",
    "train_batch_size": 128, "train_decay_norm_bias": True,
    "train_epochs": 1, "train_label_smoothing": 0.0, "train_lr": 0.002, "train_momentum": 0.9,
    "train_nesterov": False, "train_optimizer": "adam", "train_schedule": "cosine",
    "train_weight_decay": 0.0,
    "unit_chunk": 256, "validation_examples": 0, "width": 1.0, "workdir": "/tmp/tc_ref",
    "lam": 0.1, "dataset": "mnist",
    "row": None,
}  # fmt: skip
LENET_ARGS = ["--max_train_examples=512", "--max_test_examples=200", "--train_epochs=1",
              "--workdir=/tmp/tc_ref", "--nocompare_retrain"]  # fmt: skip
# _public(config_from_flags("cifar10")) of cifar_ship --workdir=/tmp/tc_ref.
CIFAR_RECORD = {
    "augment": True, "batch_size": 128, "calibrate": True, "calibrate_finetune": True,
    "compare_retrain": False, "compute_dtype": "float32", "data_dir": None, "decay_steps": 16,
    "dt": 1.0, "evaluate_each_step": True, "exclude": None, "finetune": "none",
    "finetune_batches": 0, "finetune_epochs": 0.0, "finetune_lr": 0.01,
    "finetune_momentum": 0.9, "finetune_optimizer": "sgd", "finetune_schedule": "constant",
    "finetune_weight_decay": 0.0005,
    "forget_class": [8], "granularity": "filter", "importance_data": "forget",
    "importance_fraction": 1.0, "importance_score": "forget", "include": None,
    "include_bn": True, "max_test_examples": 0, "max_train_examples": 0, "model": "resnet18",
    "preset": None, "reestimate": False, "resnet_padding": "same", "retain_sample_size": 1000,
    "run_name": None,
    "sample_batch": 1024, "seed": 0, "selection": "topk", "selective_beta": 1.0,
    "sweep_dt": [1.0, 2.0, 5.0, 10.0], "sweep_dt_guard": None, "sweep_dt_margin": 1.0,
    "sweep_forget_max": 5.0,
    "sweep_forget_sample": 0,
    "sweep_retain_sample": 10000, "sweep_search_steps": 6,
    "sweep_top_k": [0.01, 0.02, 0.05, 0.1], "top_k": 0.1, "topk_budget": "global",
    "train_batch_size": 128, "train_decay_norm_bias": True,
    "train_epochs": 20, "train_label_smoothing": 0.0, "train_lr": 0.1, "train_momentum": 0.9,
    "train_nesterov": False, "train_optimizer": "sgd", "train_schedule": "onecycle",
    "train_weight_decay": 0.0005,
    "unit_chunk": 32, "validation_examples": 0, "width": 1.0, "workdir": "/tmp/tc_ref", "lam": 0.1,
    "dataset": "cifar10", "row": None,
}  # fmt: skip
# Settings added after results were recorded, here at their defaults (sixth, eighth,
# twelfth, twenty-second and twenty-third sessions).
NEW_AT_DEFAULT = ("sweep_forget_sample", "sweep_retain_sample", "finetune_schedule",
                  "topk_budget", "train_nesterov", "train_decay_norm_bias",
                  "resnet_padding", "validation_examples", "sweep_dt_margin",
                  "sweep_dt_guard")  # fmt: skip
# Settings that are not recorded: permissions, the safety floor and the cache location.
PERMISSIONS = {"overwrite": False, "retrain_base": False, "min_base_acc": -1.0, "cache_dir": None}

# Builds the config from an entry point's flags (defined with its DEFAULTS), applies the
# calibration's choice the way run_one does, and prints what is recorded and hashed.
_SNIPPET = """
import dataclasses, importlib, json, sys
from absl import flags
from experiments import common, gold
from tdu_jax import checkpoint
entry, dataset, argv, chosen = json.loads(sys.argv[1])
common.define_flags(**importlib.import_module(f"experiments.{entry}").DEFAULTS)
flags.FLAGS(["prog", *argv])
cfg = dataclasses.replace(common.config_from_flags(dataset), **chosen)
print(json.dumps({
    "public": common._public(cfg), "flags": common._OWN_FLAGS,
    "result_key": checkpoint.config_key(common._public(cfg)),
    "base_key": checkpoint.config_key(common.base_config(cfg)),
    "retrain_dir": str(gold.retrain_dir(cfg)),
}))
"""


def _from_flags(entry: str, dataset: str, argv: list[str], chosen: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", _SNIPPET, json.dumps([entry, dataset, argv, chosen])],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "entry, dataset, argv, chosen, record, keys",
    [
        ("mnist_lenet", "mnist", LENET_ARGS, {"top_k": 300}, LENET_RECORD,
         ("3e58f97fcff9e50b", "371f110670a766d5", "/tmp/tc_ref/retrain/lenet-87fc13b8fed612f8")),
        ("cifar_ship", "cifar10", ["--workdir=/tmp/tc_ref"], {}, CIFAR_RECORD,
         ("a96518ec178e42f2", "67a34703f4e413dd",
          "/tmp/tc_ref/retrain/resnet18-1c4602563f655d78")),
    ],
    ids=["mnist_lenet", "cifar_ship"],
)  # fmt: skip
def test_default_flags_record_and_hash_as_before(entry, dataset, argv, chosen, record, keys):
    got = _from_flags(entry, dataset, argv, chosen)
    # The same JSON, key for key and in order (result.json reads as before) ...
    assert json.dumps(got["public"]) == json.dumps(record)
    # ... so the same result, base-checkpoint and retrained-model keys (workdirs are reused).
    assert (got["result_key"], got["base_key"], got["retrain_dir"]) == keys
    # A result recorded before a setting existed ran at that setting's generic default: it
    # resumes as today's run where the table keeps that default, and not where the table's
    # default moved (LeNet's top-K budget is per_layer since the ninth session), unless the
    # old value is asked for.
    older = {k: v for k, v in record.items() if k not in NEW_AT_DEFAULT}
    moved = {k: config.default(k) for k in NEW_AT_DEFAULT if record[k] != config.default(k)}
    assert moved == ({"topk_budget": "global"} if dataset == "mnist" else {})
    assert (common.resume_key(older) == common.resume_key(got["public"])) == (not moved)
    assert common.resume_key(older) == common.resume_key({**got["public"], **moved})
    # One field per flag (--lambda is lam), plus dataset and row from the entry point.
    settings = {"lam" if f == "lambda" else f for f in got["flags"]} | {"dataset", "row"}
    assert settings == {f.name for f in dataclasses.fields(ExperimentConfig)}


def test_record_round_trip_keeps_keys_values_and_order():
    cfg = ExperimentConfig.from_record({**LENET_RECORD, **PERMISSIONS})
    assert cfg.forget_class == (0,) and cfg.sweep_top_k == (300, 1000, 3000, 10000, 30000)
    assert cfg.as_record() == {**LENET_RECORD, **PERMISSIONS}
    assert list(cfg.as_record()) == list(RECORD_ORDER)
    assert json.dumps(common._public(cfg)) == json.dumps(LENET_RECORD)
    # Settings a record lacks (permissions; older results) take their defaults.
    assert ExperimentConfig.from_record(LENET_RECORD) == cfg


def test_frozen_and_changed_by_replace():
    cfg = ExperimentConfig.from_record(LENET_RECORD)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 1
    other = dataclasses.replace(cfg, seed=1, forget_class=[3, 5])
    assert (cfg.seed, other.seed, other.forget_class) == (0, 1, (3, 5))
    assert hash(cfg) != hash(other)
    assert cfg == dataclasses.replace(other, seed=0, forget_class=(0,))
    rec = other.as_record()
    assert rec["forget_class"] == [3, 5] and rec["seed"] == 1
    assert checkpoint.config_key(common._public(other)) != checkpoint.config_key(
        common._public(cfg)
    )


def test_seed_and_forget_classes_key_the_saved_work(tmp_path):
    cfg = ExperimentConfig.from_record({**LENET_RECORD, "workdir": str(tmp_path)})
    seed1 = dataclasses.replace(cfg, seed=1)
    assert common.base_config(seed1) == {**common.base_config(cfg), "seed": 1}
    assert gold.retrain_dir(seed1) != gold.retrain_dir(cfg)
    two = dataclasses.replace(cfg, forget_class=(7, 2))
    assert gold.retrain_config(two)["forget_class"] == [2, 7]
    assert common.run_dir(cfg) == tmp_path / "custom-seed0"
    assert common.run_dir(dataclasses.replace(cfg, row="L4", seed=2)) == tmp_path / "L4-seed2"


def test_validate_config_normalises_and_names_the_flag(tmp_path):
    cfg = ExperimentConfig.from_record({**LENET_RECORD, "workdir": str(tmp_path / "runs")})
    unsorted = dataclasses.replace(cfg, forget_class=(7, 3, 7))
    assert common.validate_config(unsorted).forget_class == (3, 7)
    for change, needle in [
        ({"forget_class": (10,)}, "--forget_class"),
        ({"importance_fraction": 0.0}, "--importance_fraction"),
        ({"finetune_batches": 5}, "--finetune=none conflicts"),
        ({"top_k": 10**7}, "--top_k must be a count in 1..61706"),
        ({"sweep_dt": (0.5, 0.0)}, "--sweep_dt"),
        ({"sweep_search_steps": -1}, "--sweep_search_steps"),
        ({"sweep_dt_margin": 0.5}, "--sweep_dt_margin must be >= 1"),
        ({"sweep_dt_margin": 4.0, "calibrate": False}, "--sweep_dt_margin applies to the"),
        ({"sweep_dt_guard": -0.1, "sweep_dt_margin": 4.0}, "--sweep_dt_guard must be >= 0"),
        ({"sweep_dt_guard": 0.1}, "pass --sweep_dt_margin > 1"),
        ({"lam": -1.0}, "--lambda"),
        ({"train_lr": 0.0}, "--train_lr"),
        ({"model": "vgg"}, "--model"),
    ]:
        with pytest.raises(ValueError, match=needle):
            common.validate_config(dataclasses.replace(cfg, **change))
    assert not (tmp_path / "runs").exists()


def test_parse_number_list_names_the_flag():
    assert common.parse_number_list("sweep_dt", "0.25,2") == (0.25, 2.0)
    assert common.parse_number_list("sweep_top_k", "300,0.1", common.parse_top_k) == (300, 0.1)
    with pytest.raises(ValueError, match="--sweep_dt must be a comma list of numbers; got 'a,1'"):
        common.parse_number_list("sweep_dt", "a,1")


def test_finetune_schedule_reaches_the_finetune_optimizer():
    cfg = ExperimentConfig.from_record(LENET_RECORD)
    assert common.unlearn_config(cfg, 1000).finetune_optimizer.schedule == "constant"
    cosine = dataclasses.replace(cfg, finetune_schedule="cosine")
    assert common.unlearn_config(cosine, 1000).finetune_optimizer.schedule == "cosine"


_SHARED_FLAGS_SNIPPET = """
import json, sys
from absl import flags
from experiments import cifar_ship, common, mnist_lenet, reproduce
common.define_flags(**{**mnist_lenet.DEFAULTS, **reproduce.ENTRY_DEFAULTS})  # as reproduce does
flags.FLAGS(["prog", *json.loads(sys.argv[1])])
cfg = common.config_from_flags("cifar10", {**cifar_ship.DEFAULTS, **reproduce.ENTRY_DEFAULTS})
print(json.dumps(common._public(cfg)))
"""


@pytest.mark.parametrize(
    "argv, explicit", [([], {}), (["--topk_budget=per_layer"], {"topk_budget": "per_layer"})]
)
def test_a_table_run_through_shared_flags_takes_none_of_the_other_tables_choices(argv, explicit):
    """reproduce/compare define their flags with LeNet's DEFAULTS; a CIFAR run through them
    gets CIFAR's choices and the generic defaults (not LeNet's top-K budget, 1% ceiling or
    importance batch), exactly as cifar_ship records them; explicit flags still win."""
    proc = subprocess.run(
        [sys.executable, "-c", _SHARED_FLAGS_SNIPPET, json.dumps(["--workdir=/tmp/tc_ref", *argv])],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = {**CIFAR_RECORD, "compare_retrain": True, **explicit}  # reproduce's own choice
    assert {k: (got.get(k), v) for k, v in expected.items() if got.get(k) != v} == {}


def test_later_base_settings_key_the_base_model_only_when_set():
    cfg = ExperimentConfig.from_record(CIFAR_RECORD)
    base = common.base_config(cfg)
    assert not set(common.LATER_BASE_KEYS) & set(base)  # saved checkpoints keep their names
    changes = {"resnet_padding": "symmetric", "train_nesterov": True,
               "train_decay_norm_bias": False, "validation_examples": 500}  # fmt: skip
    for name, value in changes.items():
        assert common.base_config(dataclasses.replace(cfg, **{name: value})) == {
            **base, name: value}  # fmt: skip
    changed = dataclasses.replace(cfg, **changes)
    assert common.build_model(changed).conv_padding == "symmetric"
    optimizer = common.base_optimizer(changed)
    assert optimizer.nesterov and not optimizer.decay_norm_and_bias
