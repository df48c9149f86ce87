"""Resuming a finished row (which recorded configs count as the same run) and where the
cached models are found."""

import pytest

from experiments import common, gold
from experiments.config import ExperimentConfig
from tdu_jax import result_files


def _config(tmp_path, **changes) -> ExperimentConfig:
    cfg = dict(dataset="mnist", forget_class=(0,), model="lenet", granularity="weight",
               finetune_lr=0.01, train_epochs=8, train_optimizer="adam", train_lr=2e-3,
               train_weight_decay=0.0, train_schedule="cosine", augment=False,
               workdir=str(tmp_path), run_name="L3-0-seed0", row="L3", seed=0, calibrate=True,
               top_k=3000, dt=0.25, lam=0.1)  # fmt: skip
    return ExperimentConfig(**{**cfg, **changes})


def _save(tmp_path, cfg: ExperimentConfig) -> None:
    path = common.run_dir(cfg) / "result.json"
    path.parent.mkdir(parents=True)
    result_files.write_json_atomic(path, {"config": common._public(cfg), "final": {"x": 1}})


def test_calibrated_row_resumes_although_its_fine_tuning_moved_k_and_dt(tmp_path):
    # The row recorded the point its own fine-tuning confirmed (K=1000, dt=1), while the
    # rerun asks with the no-fine-tune sweep's choice (K=3000, dt=0.25).
    _save(tmp_path, _config(tmp_path, top_k=1000, dt=1.0))
    found = common.existing_result(_config(tmp_path))
    assert found is not None and found["final"] == {"x": 1}


def test_other_settings_still_refuse_to_clobber(tmp_path):
    _save(tmp_path, _config(tmp_path, top_k=1000, dt=1.0))
    with pytest.raises(FileExistsError, match="different config"):
        common.existing_result(_config(tmp_path, lam=0.2))
    assert common.existing_result(_config(tmp_path, lam=0.2, overwrite=True)) is None


def test_explicit_k_and_dt_are_part_of_the_run(tmp_path):
    _save(tmp_path, _config(tmp_path, calibrate=False, top_k=1000))
    with pytest.raises(FileExistsError, match="different config"):
        common.existing_result(_config(tmp_path, calibrate=False, top_k=20))


def test_a_moved_results_folder_still_resumes(tmp_path):
    # Saved under one workdir and data folder, the row is copied into another workdir (e.g.
    # to merge two processes' results) and asked for with another --data_dir.
    old, new = tmp_path / "old", tmp_path / "new"
    _save(old, _config(old, data_dir="/data/a"))
    (new / "L3-0-seed0").mkdir(parents=True)
    (new / "L3-0-seed0" / "result.json").write_bytes(
        (old / "L3-0-seed0" / "result.json").read_bytes()
    )
    found = common.existing_result(_config(new, data_dir="/data/b"))
    assert found is not None and found["config"]["workdir"] == str(old)


def test_caches_are_shared_through_cache_dir_and_found_where_older_runs_left_them(tmp_path):
    # reproduce's table folder (workdir <root>/lenet, cache_dir <root>) and a single run
    # (workdir <root>) keep the base model, retrained model and importance in one place.
    table = _config(tmp_path / "lenet", cache_dir=str(tmp_path))
    single = _config(tmp_path)
    for kind in ("base", "retrain", "importance"):
        assert common.cached_at(table, kind, "m-1") == tmp_path / kind / "m-1"
        assert common.cached_at(single, kind, "m-1") == tmp_path / kind / "m-1"
    assert gold.retrain_dir(table) == gold.retrain_dir(single)
    # A model an earlier version saved under the table's own folder is reused, not redone.
    (tmp_path / "lenet" / "base" / "m-2").mkdir(parents=True)
    assert common.cached_at(table, "base", "m-2") == tmp_path / "lenet" / "base" / "m-2"
    # ... unless the shared folder holds it too.
    (tmp_path / "base" / "m-2").mkdir(parents=True)
    assert common.cached_at(table, "base", "m-2") == tmp_path / "base" / "m-2"


def test_unwritable_cache_dir_is_refused_by_its_flag_name(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="--cache_dir .* is not a directory"):
        common.validate_config(_config(tmp_path, cache_dir=str(blocker / "cache")))


def test_a_setting_at_its_default_is_the_same_run_as_one_recorded_before_it_existed():
    record = {"dataset": "mnist", "seed": 0, "lam": 0.1, "train_epochs": 8,
              "sweep_retain_sample": 10000, "sweep_forget_sample": 0}  # fmt: skip
    older = {k: v for k, v in record.items() if not k.startswith("sweep_")}
    assert common.resume_key(older) == common.resume_key(record)
    # A non-default value is another run; so is another value of a table-wide choice.
    assert common.resume_key(older) != common.resume_key({**record, "sweep_forget_sample": 500})
    assert common.resume_key(record) != common.resume_key({**record, "train_epochs": 9})
    # A generic default given explicitly is the same run as the default left implicit,
    # tuples and lists alike; a setting this version does not know is kept in the key.
    assert common.resume_key({**older, "sweep_dt": [0.25, 0.5, 1.0]}) == common.resume_key(older)
    assert common.resume_key({**older, "gone_setting": 1}) != common.resume_key(older)
