"""compare --tune: the search between grid factors, diverged runs, and resuming."""

import json

import jax
import numpy as np

from experiments import compare
from experiments.config import ExperimentConfig
from tdu_jax import data, methods, models


def _setup(tmp_path):
    cfg = ExperimentConfig(
        dataset="mnist", forget_class=(3,), model="lenet", granularity="weight",
        finetune_lr=0.01, train_epochs=1, train_optimizer="adam", train_lr=2e-3,
        train_weight_decay=0.0, train_schedule="cosine", augment=False,
        workdir=str(tmp_path), seed=0, top_k=300, dt=0.25, lam=0.1,
    )  # fmt: skip
    model = models.get_model("lenet")
    params, bs = models.init_variables(model, jax.random.key(0), (28, 28, 1))
    rng = np.random.default_rng(0)
    split = data.Split(rng.integers(0, 255, (200, 28, 28, 1), np.uint8), np.arange(200) % 10)
    configs = compare.method_configs(cfg, retain_size=180)
    return cfg, model, params, bs, split, configs


def test_tune_saves_each_point_and_resumes_without_rerunning(tmp_path, monkeypatch):
    cfg, model, params, bs, split, configs = _setup(tmp_path)
    calls = []

    def fake_run(name, model, params, bs, data_in, key, mcfg, dataset):
        calls.append((name, mcfg))
        if len(calls) == 3:
            raise KeyboardInterrupt  # stopped during the third run
        return methods.MethodResult(params, bs, {})  # the base model, unchanged

    monkeypatch.setattr(methods, "run_method", fake_run)
    grid = (0.1, 1.0)
    try:
        compare.tune(cfg, ["ft", "ssd"], configs, model, params, bs, split, 0.2, grid, tmp_path)
    except KeyboardInterrupt:
        pass
    (runs_file,) = tmp_path.glob("tuning-runs-*.json")
    saved = json.loads(runs_file.read_text())["points"]
    assert sorted(saved["ft"]["points"]) == ["0.1", "1"] and "ssd" not in saved
    calls.clear()
    chosen = compare.tune(cfg, ["ft", "ssd"], configs, model, params, bs, split, 0.2, grid,
                          tmp_path)  # fmt: skip
    assert [name for name, _ in calls] == ["ssd", "ssd"]  # ft's two points were reused
    assert [p["factor"] for p in chosen["ft"]["points"]] == [0.1, 1.0]
    # A method whose config changed is tuned again.
    calls.clear()
    changed = {**configs, "ft": configs["ft"]._replace(epochs=configs["ft"].epochs + 1)}
    compare.tune(cfg, ["ft", "ssd"], changed, model, params, bs, split, 0.2, grid, tmp_path)
    assert [name for name, _ in calls] == ["ft", "ft"]


def _point(factor, forget, retain=90.0):
    return {"factor": factor, "forget_train_acc": forget, "retain_train_acc": retain,
            "diverged": False}  # fmt: skip


def _diverged(factor):
    return {"factor": factor, "forget_train_acc": None, "retain_train_acc": None,
            "diverged": True}  # fmt: skip


def test_next_factor_bisects_where_the_outcome_turns():
    # Gradient ascent: nothing happens up to x1, x10 blows up -> try sqrt(1 * 10).
    ga = [_point(0.01, 100.0), _point(0.1, 100.0), _point(1.0, 99.0), _diverged(10.0)]
    assert compare.next_factor(ga) == 3.162
    # A point under the 5% ceiling: bisect towards its failing neighbour (a gentler setting
    # may keep more retain accuracy), whichever side it is on (lr up = stronger, SSD's alpha
    # up = gentler).
    lr_like = [_point(0.1, 50.0), _point(1.0, 2.0, 95.0), _point(10.0, 0.0, 80.0)]
    assert compare.next_factor(lr_like) == 0.3162
    alpha_like = [_point(0.1, 0.0, 90.0), _point(1.0, 3.0, 95.0), _point(10.0, 60.0, 99.0)]
    assert compare.next_factor(alpha_like) == 3.162
    # Equal retain accuracy at two "ok" factors (SSD at small alpha: everything dampened):
    # the rule picks one, and the search goes past the tie to the first failing factor.
    tied = [
        _point(0.01, 0.0, 11.8),
        _point(0.1, 0.0, 11.8),
        _point(1.0, 73.0, 52.7),
        _point(10.0, 73.0, 52.7),
    ]
    assert compare.next_factor(tied) == 0.3162
    # A chosen point between "ok" neighbours with less retain accuracy: nothing to bisect.
    interior = [
        _point(0.1, 0.0, 80.0),
        _point(1.0, 0.0, 95.0),
        _point(10.0, 1.0, 90.0),
        _point(100.0, 50.0, 99.0),
    ]
    assert compare.next_factor(interior) is None
    # Every point fails and none diverged: nothing to bisect.
    assert compare.next_factor([_point(0.1, 90.0), _point(1.0, 80.0)]) is None


def test_choose_tuned_never_picks_a_diverged_run():
    points = [_point(1.0, 99.0, 99.8), _diverged(10.0)]
    assert compare.choose_tuned(points)["factor"] == 1.0  # lowest finite forget, not the NaN
    assert compare.choose_tuned([_diverged(0.1), _diverged(10.0)])["factor"] == 0.1
    nan_params = {"w": np.array([1.0, np.nan])}
    assert compare.diverged(nan_params) and not compare.diverged({"w": np.ones(2)})


def test_tune_searches_between_grid_factors_and_skips_diverged_runs(tmp_path, monkeypatch):
    cfg, model, params, bs, split, configs = _setup(tmp_path)
    base_lr = configs["ft"].optimizer.learning_rate
    factors = []

    def fake_run(name, model, params, bs, data_in, key, mcfg, dataset):
        factor = mcfg.optimizer.learning_rate / base_lr
        factors.append(round(factor, 4))
        if factor >= 10:  # blows up
            params = jax.tree.map(lambda x: x * np.nan, params)
        return methods.MethodResult(params, bs, {})

    # The validation labels: the held-out part of the split, carved as tune() does.
    order = np.random.default_rng(cfg.seed).permutation(split.size)
    val_labels = split.labels[order[: int(round(0.2 * split.size))]]

    def fake_predict(model, params, bs, images, dataset):
        assert len(images) == len(val_labels)
        # x < 3: nothing forgotten; 3 <= x < 10: class 3 sent to class 4, the rest kept.
        return np.where((val_labels == 3) & (factors[-1] >= 3), 4, val_labels)

    monkeypatch.setattr(methods, "run_method", fake_run)
    monkeypatch.setattr(compare.metrics, "predict", fake_predict)
    chosen = compare.tune(cfg, ["ft"], configs, model, params, bs, split, 0.2, (0.1, 1.0, 10.0),
                          tmp_path, search_steps=2)  # fmt: skip
    # Grid, then sqrt(1 * 10) (fail next to diverged), then sqrt(1 * 3.162) (ok next to fail).
    assert factors == [0.1, 1.0, 10.0, 3.162, 1.778]
    points = {p["factor"]: p for p in chosen["ft"]["points"]}
    assert points[10.0]["diverged"] and points[10.0]["forget_train_acc"] is None
    assert points[3.162]["forget_train_acc"] == 0.0 and points[1.778]["forget_train_acc"] == 100.0
    assert chosen["ft"]["factor"] == 3.162


def test_a_diverged_cell_is_recorded_without_metrics_and_counted(tmp_path, monkeypatch):
    from experiments import gold

    cfg, model, params, bs, split, configs = _setup(tmp_path)
    nan_params = jax.tree.map(lambda x: x * np.nan, params)
    monkeypatch.setattr(methods, "run_method",
                        lambda *a, **k: methods.MethodResult(nan_params, bs, {}))  # fmt: skip
    retrained = {"forget_acc": 0.0, "retain_acc": 99.0, "train_seconds": 50.0,
                 "forget_predictions": [0.0] * 10}  # fmt: skip
    refs = {"retrained": retrained, "base": {"forget_acc": 99.0}, "control": {},
            "separates": {}}  # fmt: skip
    monkeypatch.setattr(gold, "reference_metrics", lambda *a, **k: refs)

    def no_metrics(*args, **kwargs):
        raise AssertionError("the attacks must not be fitted on a diverged model")

    monkeypatch.setattr(gold, "model_metrics", no_metrics)
    cell = compare.run_cell(cfg, "ga", configs["ga"], model, params, bs, split, split)
    assert cell["info"]["diverged"] and cell["final"] == {} and cell["gap"] == {}
    assert cell["cost_ratio"] == cell["info"]["seconds"] / 50.0
    table = compare.table_markdown([cell], partial=False)
    assert "| ga | 1 | 1 | — |" in table  # one request, diverged, no forget accuracy


def _cell(method, forget, retain, seconds, request=(0,), seed=0):
    cfg = {"forget_class": list(request), "seed": seed}
    return {"row": method, "method": method, "config": cfg,
            "final": {"forget_acc": forget, "retain_acc": retain},
            "info": {"seconds": seconds}}  # fmt: skip


def test_pareto_counts_follow_hand_checked_dominance():
    assert compare.dominates((0.0, -99.0, 10.0), (0.0, -98.0, 10.0))
    assert not compare.dominates((0.0, -99.0, 10.0), (0.0, -99.0, 10.0))  # equal: no
    assert not compare.dominates((0.0, -99.0, 20.0), (1.0, -98.0, 10.0))  # slower: no
    cells = [
        _cell("retrain", 0.0, 99.2, 400.0),  # best accuracy, slowest: on the front
        _cell("decay", 0.0, 99.0, 100.0),  # on the front
        _cell("ft", 0.0, 98.9, 120.0),  # dominated by decay
        _cell("ga", 50.0, 99.5, 5.0),  # fastest, best retain: on the front
        _cell("ft", 0.0, 99.1, 90.0, seed=1),  # the other request: ft dominates decay
        _cell("decay", 0.0, 99.0, 100.0, seed=1),
        {**_cell("ga", 0.0, 0.0, 1.0, seed=1), "final": {}, "info": {"seconds": 1.0,
                                                                     "diverged": True}},
    ]  # fmt: skip
    assert compare.pareto_counts(cells) == {"retrain": (1, 1), "decay": (1, 2), "ft": (1, 2),
                                            "ga": (1, 2)}  # fmt: skip
    table = compare.table_markdown(cells, partial=False)
    assert "| ga | 2 | 1 | 50.00 |" in table and table.splitlines()[4].endswith("| 1/1 |")


def test_methods_table_counts_reversed_entropy_fits_and_shows_the_median_entropy():
    cells = [_cell("rl", 1.0, 99.0, 10.0), _cell("rl", 2.0, 99.0, 10.0, seed=1),
             _cell("rl", 3.0, 99.0, 10.0, seed=2), _cell("ft", 0.0, 99.0, 10.0)]  # fmt: skip
    for cell, slope, median in zip(cells, (0.5, -1.0, 0.0, -2.0), (2.0, 1.0, 3.0, 0.25),
                                   strict=True):  # fmt: skip
        cell["final"].update(mia_entropy_slope=slope, forget_entropy_median=median)
    lines = compare.table_markdown(cells, partial=False).splitlines()
    head = [c.strip() for c in lines[2].strip("|").split("|")]
    rl = [c.strip() for c in lines[4].strip("|").split("|")]
    ft = [c.strip() for c in lines[5].strip("|").split("|")]
    reversed_col = head.index("entropy fit reversed")
    assert rl[reversed_col] == "2/3"  # slopes 0.5 and 0.0 are >= 0, -1.0 is not
    assert ft[reversed_col] == "0/1"
    assert rl[head.index("forget_entropy_median")] == "2.00 ± 1.00"  # median 1, 2, 3 nats
    no_slopes = compare.table_markdown([_cell("ga", 1.0, 99.0, 1.0)], partial=False)
    ga = [c.strip() for c in no_slopes.splitlines()[4].strip("|").split("|")]
    assert ga[reversed_col] == "—"


def test_requests_table_has_one_line_per_request_and_marks_diverged_runs():
    cells = [
        _cell("decay", 0.0, 99.0, 100.0),
        _cell("ft", 0.5, 98.9, 120.0),
        _cell("decay", 1.25, 97.5, 100.0, request=(7,)),
        {**_cell("ft", 0.0, 0.0, 1.0, request=(7,)), "final": {}},
    ]
    lines = compare.requests_markdown(cells, "mnist").splitlines()
    assert lines[2] == "| forget | seed | decay | ft |"
    assert lines[4:] == ["| 0 | 0 | 0.00 / 99.00 | 0.50 / 98.90 |",
                         "| 7 | 0 | 1.25 / 97.50 | diverged |"]  # fmt: skip


def test_a_finished_cell_is_reused_only_with_the_same_settings(tmp_path):
    import dataclasses

    import pytest

    from experiments import common
    from tdu_jax import result_files

    cfg, _, _, _, _, configs = _setup(tmp_path)
    saved = json.loads(json.dumps({
        "config": common._public(cfg),
        "method_config": result_files.to_jsonable(configs["ft"]._asdict()),
    }))  # fmt: skip
    compare.check_cell_settings(saved, cfg, configs["ft"], tmp_path)  # the same: reused
    moved = dataclasses.replace(cfg, workdir=str(tmp_path / "elsewhere"))
    compare.check_cell_settings(saved, moved, configs["ft"], tmp_path)  # a location only
    with pytest.raises(ValueError, match=r"other settings \(importance_fraction\)"):
        compare.check_cell_settings(saved, dataclasses.replace(cfg, importance_fraction=0.1),
                                    configs["ft"], tmp_path)  # fmt: skip
    with pytest.raises(ValueError, match=r"other settings \(epochs\).*another --workdir"):
        compare.check_cell_settings(saved, cfg, configs["ft"]._replace(epochs=3), tmp_path)
    # A decay cell saved before its config had dt_margin ran at the default (1): reused at 1,
    # refused at another margin.
    old = result_files.to_jsonable(configs["decay"]._asdict())
    assert old.pop("dt_margin") == 1.0
    saved_decay = {"config": common._public(cfg), "method_config": old}
    compare.check_cell_settings(saved_decay, cfg, configs["decay"], tmp_path)
    with pytest.raises(ValueError, match=r"other settings \(dt_margin\)"):
        compare.check_cell_settings(saved_decay, cfg, configs["decay"]._replace(dt_margin=4.0),
                                    tmp_path)  # fmt: skip
