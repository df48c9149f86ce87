"""Tests of the retrained gold standard (experiments/gold.py) and the forgetting report."""

import dataclasses

import numpy as np
import pytest

from experiments import common, gold
from experiments.config import ExperimentConfig
from tdu_jax import data, forgetting_report, models, train


def _cfg(tmp_path, forget=(3,)):
    return ExperimentConfig(
        dataset="mnist", model="lenet", seed=0, train_epochs=1, train_batch_size=32,
        train_optimizer="adam", train_lr=2e-3, train_weight_decay=0.0, train_schedule="cosine",
        augment=False, workdir=str(tmp_path), forget_class=forget, granularity="weight",
        top_k=20, dt=0.25, finetune_lr=0.01,
    )  # fmt: skip


def _split(n=96, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)
    return data.Split(images, (np.arange(n) % 10).astype(np.int32))


def test_retrained_model_never_sees_the_forget_class_and_is_reused(tmp_path, monkeypatch):
    seen = []
    real_train = train.train

    def spy(model, params, batch_stats, split, **kw):
        seen.append(np.asarray(split.labels))
        return real_train(model, params, batch_stats, split, **kw)

    monkeypatch.setattr(train, "train", spy)
    cfg, split = _cfg(tmp_path), _split()
    model = models.get_model("lenet")
    params, _, info = gold.get_retrained_model(cfg, model, split)
    assert info["trained_now"] and info["train_seconds"] > 0
    assert len(seen) == 1 and 3 not in seen[0] and seen[0].size == 96 - 10
    # Reused from its checkpoint, with the same parameters; keyed by the forget classes.
    again, _, info2 = gold.get_retrained_model(cfg, model, split)
    assert not info2["trained_now"] and len(seen) == 1
    np.testing.assert_array_equal(params["dense3"]["kernel"], again["dense3"]["kernel"])
    assert gold.retrain_dir(cfg) != gold.retrain_dir(_cfg(tmp_path, (4,)))
    assert gold.retrain_dir(cfg) != gold.retrain_dir(dataclasses.replace(cfg, seed=1))
    assert common.base_config(cfg).items() <= gold.retrain_config(cfg).items()


def test_separates_and_gap():
    retrained = {"mia_svc": 50.0, "probe_recovery": 40.0, "relearn_steps": 20, "forget_acc": 0.0}
    control = {"mia_svc": 51.0, "probe_recovery": 90.0, "relearn_steps": 2, "forget_acc": 0.0}
    sep = gold.separates(control, retrained, "mnist")
    assert sep == {"mia_svc": False, "probe_recovery": True, "relearn_steps": True,
                   "forget_acc": False}  # fmt: skip
    assert gold.gap({"mia_svc": 55.0, "probe_recovery": 41.0}, retrained) == {
        "mia_svc": 5.0, "probe_recovery": 1.0
    }  # fmt: skip


def _result(row, cls, seed, forget, retrained_forget, mia, cost):
    return {
        "row": row, "config": {"forget_class": [cls], "seed": seed},
        "final": {"forget_acc": forget, "retain_acc": 98.0, "mia_svc": mia},
        "retrained": {"forget_acc": retrained_forget, "retain_acc": 98.4, "mia_svc": 60.0},
        "control": {"forget_acc": 0.0, "retain_acc": 99.0, "mia_svc": 61.0},
        "gap": {"forget_acc": forget - retrained_forget, "mia_svc": mia - 60.0},
        "separates": {"mia_svc": False}, "cost_ratio": cost,
    }  # fmt: skip


def test_forgetting_markdown_means_and_goal_counts():
    results = [_result("L1", 0, 0, 0.5, 0.0, 59.0, 0.2), _result("L1", 7, 0, 1.5, 0.0, 65.0, 0.4)]
    goals = [
        forgetting_report.Goal("forget_acc", "max", 1.0),
        forgetting_report.Goal("retain_acc", "above_retrained", 0.5),
        forgetting_report.Goal("mia_svc", "near_retrained", 2.0),
        forgetting_report.Goal("", "cost", 0.3),
    ]
    text = forgetting_report.forgetting_markdown(results, "t", goals)
    assert "### L1: 2 requests (2 forget classes x 1 seeds)" in text
    # forget_acc: mean 1.00 ± std 0.71 (of 0.5 and 1.5); retrained 0.00 ± 0.00.
    assert "| forget_acc | 1.00 ± 0.71 | 0.00 ± 0.00 |" in text
    assert "| mia_svc | 62.00 ± 4.24 | 60.00 ± 0.00 | 61.00 ± 0.00 |" in text
    assert "| forget_acc <= 1 | 1/2 |" in text
    assert "| retain_acc >= retrained - 0.5 | 2/2 |" in text
    assert "| abs(mia_svc - retrained) <= 2 | 1/2 |" in text
    assert "| cost_ratio <= 0.3 | 1/2 |" in text
    assert "0/2" in text  # mia_svc: the control is never separated
    assert "PARTIAL" in forgetting_report.forgetting_markdown(results, "t", partial=True)
    assert "in %: 30.00 ± 14.14\n" in text  # 20 and 40
    assert "slope >= 0" not in text  # no result recorded the entropy attack's slope


def test_forgetting_markdown_counts_reversed_entropy_attacks():
    results = [_result("L1", c, 0, 0.5, 0.0, 60.0, 0.2) for c in range(3)]
    for r, unlearned, retrained in zip(results, (-0.8, 0.08, 0.0), (-0.9, -0.7, -0.1), strict=True):
        r["final"]["mia_entropy_slope"], r["retrained"]["mia_entropy_slope"] = unlearned, retrained
    text = forgetting_report.forgetting_markdown(results, "t")
    # 0.08 and 0.0 are >= 0 (2 of 3) for the unlearned model; none for the retrained one; the
    # control and base recorded no slope, so they are not counted.
    assert "on: unlearned 2/3, retrained 0/3\n" in text


def test_cost_counts_only_results_that_timed_their_calibration():
    timed = _result("L1", 0, 0, 0.5, 0.0, 59.0, 0.9)
    timed["config"]["calibrate"], timed["timings"] = True, {"calibration": 100.0}
    older = _result("L1", 7, 0, 0.5, 0.0, 59.0, 0.1)  # calibrated, seconds not recorded
    older["config"]["calibrate"], older["timings"] = True, {"importance": 5.0}
    fixed = _result("L1", 3, 0, 0.5, 0.0, 59.0, 0.2)  # K and dt given: nothing to time
    assert [forgetting_report.counts_calibration(r) for r in (timed, older, fixed)] == [
        True, False, True]  # fmt: skip
    assert forgetting_report.cost_text([timed, older, fixed]) == (
        "55.00 ± 49.50 (over 2 requests; 1 recorded without calibration seconds)"
    )
    assert forgetting_report.cost_text([timed]) == "90.00"
    goal = forgetting_report.Goal("", "cost", 0.5)
    assert [goal.met(r) for r in (timed, older, fixed)] == [False, None, True]


@pytest.mark.parametrize("kind,value,ref,expected", [
    ("max", 1.0, None, True), ("max", 1.1, None, False),
    ("above_retrained", 97.5, 98.0, True), ("above_retrained", 97.4, 98.0, False),
    ("below_retrained", 45.0, 40.0, True), ("below_retrained", 45.1, 40.0, False),
])  # fmt: skip
def test_goal_kinds(kind, value, ref, expected):
    goal = forgetting_report.Goal("m", kind, 1.0 if kind == "max" else 0.5 if "above" in kind
                                  else 5.0)  # fmt: skip
    result = {"final": {"m": value}, "retrained": {} if ref is None else {"m": ref}}
    assert goal.met(result) is expected


def test_unlearning_seconds_count_calibration_and_the_larger_importance():
    timings = {"importance": 2.0, "calibration": 30.0, "decay": 0.5, "finetune": 7.0, "eval": 99.0}
    assert gold.unlearning_seconds(timings, 5.0) == 5.0 + 30.0 + 0.5 + 7.0  # eval excluded
    assert gold.unlearning_seconds({**timings, "importance": 9.0}, 5.0) == 46.5
    assert gold.unlearning_seconds({"decay": 1.0}, None) == 1.0  # older records: no calibration
    assert common.calibration_seconds({"seconds": 12.5, "confirm_seconds": 40.0}) == 52.5
    assert common.calibration_seconds({"seconds": 12.5}) == 12.5
    assert common.calibration_seconds(None) == 0.0
