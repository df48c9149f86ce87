"""Tests of the train-split (K, dt) sweep and the selective importance score."""

import jax
import numpy as np
import pytest

from tdu_jax import calibrate, data, decay, importance, metrics, models, selective, units


def _points(*triples):
    return [
        {"top_k": k, "dt": 1.0, "forget_train_acc": f, "retain_train_acc": r} for k, f, r in triples
    ]


def test_choose_takes_best_retain_among_points_under_the_ceiling():
    points = _points((10, 6.0, 99.0), (20, 4.0, 90.0), (30, 1.0, 95.0), (40, 5.0, 95.0))
    # 30 and 40 tie on retain (95) and are <= 5; the lower forget accuracy wins.
    assert calibrate.choose(points, 5.0)["top_k"] == 30
    assert calibrate.choose(points, 1.0)["top_k"] == 30


def test_choose_falls_back_to_lowest_forget_accuracy():
    points = _points((10, 9.0, 99.0), (20, 7.0, 80.0), (30, 7.0, 85.0))
    assert calibrate.choose(points, 5.0)["top_k"] == 30
    with pytest.raises(ValueError, match="no points"):
        calibrate.choose([], 5.0)


def _imp(acc, loss, units_=None):
    acc = np.asarray(acc, np.float64)
    return importance.Importance(
        units=np.arange(acc.size) if units_ is None else np.asarray(units_),
        accuracy_drop=acc,
        loss_increase=np.asarray(loss, np.float64),
        base_accuracy=100.0,
        base_loss=0.1,
        sample_size=10,
        seconds=2.0,
    )


def test_selective_importance_is_forget_minus_beta_retain():
    forget = _imp([10.0, 5.0, 0.0], [1.0, 0.5, 0.0])
    retain = _imp([10.0, 0.0, 2.0], [0.8, 0.0, 0.2])
    out = selective.selective_importance(forget, retain, beta=0.5)
    np.testing.assert_allclose(out.accuracy_drop, [5.0, 5.0, -1.0])
    np.testing.assert_allclose(out.loss_increase, [0.6, 0.5, -0.1])
    assert out.seconds == 4.0 and out.sample_size == 10
    # Unit 1 (forget-only) now ties unit 0 on accuracy and loses on loss: rank 0, 1, 2.
    np.testing.assert_array_equal(decay.rank_units(out), [0, 1, 2])
    # With beta = 1 the shared unit 0 drops to 0 and the forget-only unit 1 ranks first.
    np.testing.assert_array_equal(decay.rank_units(selective.selective_importance(
        forget, retain, 1.0)), [1, 0, 2])  # fmt: skip
    np.testing.assert_array_equal(
        selective.selective_importance(forget, retain, 0.0).accuracy_drop, forget.accuracy_drop
    )


def test_selective_importance_rejects_mismatch_and_negative_beta():
    with pytest.raises(ValueError, match="same units"):
        selective.selective_importance(_imp([1, 2], [0, 0]), _imp([1, 2], [0, 0], [1, 0]))
    with pytest.raises(ValueError, match="beta"):
        selective.selective_importance(_imp([1], [0]), _imp([1], [0]), -1.0)
    with pytest.raises(ValueError, match="importance_score"):
        selective.check_importance_score("fisher")


def test_ratio_importance_by_hand():
    # forget loss increases 0.5, 0.2, -0.1, 0.3; retain 0.099, -0.05, 0.0, 0.299 (nats).
    forget = _imp([1.0, 0.0, 0.0, 2.0], [0.5, 0.2, -0.1, 0.3])
    retain = _imp([0.0, 0.0, 0.0, 1.0], [0.099, -0.05, 0.0, 0.299])
    out = selective.ratio_importance(forget, retain)
    # 0.5 / 0.1 = 5; 0.2 / 0.001 = 200 (retain helped: floor); 0 / 0.001 = 0; 0.3 / 0.3 = 1.
    np.testing.assert_allclose(out.loss_increase, [5.0, 200.0, 0.0, 1.0])
    np.testing.assert_array_equal(out.accuracy_drop, [0.0, 0.0, 0.0, 0.0])
    np.testing.assert_array_equal(decay.rank_units(out), [1, 0, 3, 2])
    assert out.seconds == 4.0 and out.sample_size == 10
    assert selective.combine("ratio", forget, retain).loss_increase[1] == out.loss_increase[1]
    assert selective.combine("forget", forget, None) is forget
    assert selective.needs_retain_sample("ratio") and not selective.needs_retain_sample("forget")
    with pytest.raises(ValueError, match="retain sample"):
        selective.combine("selective", forget, None)


def test_worst_class_ratio_by_hand():
    # forget loss increases 0.5, 0.2, 0.3; class A's retain 0.099, 0.0, 0.05; class B's
    # 0.0, 0.3, -0.2 (nats). Worst class: 0.099, 0.3, 0.05 (B's -0.2 floors at 0).
    forget = _imp([0.0, 0.0, 0.0], [0.5, 0.2, 0.3])
    class_a = _imp([0.0, 0.0, 0.0], [0.099, 0.0, 0.05])
    class_b = _imp([0.0, 0.0, 0.0], [0.0, 0.3, -0.2])
    out = selective.worst_class_ratio_importance(forget, [class_a, class_b])
    # 0.5 / 0.1 = 5; 0.2 / 0.301; 0.3 / 0.051.
    np.testing.assert_allclose(out.loss_increase, [5.0, 0.2 / 0.301, 0.3 / 0.051])
    np.testing.assert_array_equal(decay.rank_units(out), [2, 0, 1])
    assert out.seconds == 6.0 and out.sample_size == 10
    # Two units equal on the forget class: unit 0 costs both classes 0.1, unit 1 costs only
    # class B, 0.18. The plain ratio over the classes' mean (0.1, 0.09) ranks unit 1 first;
    # the worst class (0.1, 0.18) ranks unit 0 first: class A's silence does not dilute B's.
    equal = _imp([0.0, 0.0], [0.3, 0.3])
    a, b = _imp([0.0, 0.0], [0.1, 0.0]), _imp([0.0, 0.0], [0.1, 0.18])
    mean = _imp([0.0, 0.0], [0.1, 0.09])
    np.testing.assert_array_equal(decay.rank_units(selective.ratio_importance(equal, mean)),
                                  [1, 0])  # fmt: skip
    np.testing.assert_array_equal(
        decay.rank_units(selective.worst_class_ratio_importance(equal, [a, b])), [0, 1]
    )
    combined = selective.combine("worst_class_ratio", forget, [class_a, class_b])
    np.testing.assert_array_equal(combined.loss_increase, out.loss_increase)
    assert selective.needs_retain_sample("worst_class_ratio")
    with pytest.raises(ValueError, match="one retain importance per retained class"):
        selective.combine("worst_class_ratio", forget, class_a)
    with pytest.raises(ValueError, match="same units"):
        selective.worst_class_ratio_importance(forget, [_imp([0, 0, 0], [0, 0, 0], [2, 1, 0])])


def test_retain_sample_is_stratified_for_the_worst_class_ratio():
    labels = np.repeat([1, 2, 5], [30, 4, 20]).astype(np.int32)
    split = data.Split(np.arange(labels.size, dtype=np.uint8).reshape(-1, 1, 1, 1), labels)
    sample = selective.retain_sample(split, 30, 3, "worst_class_ratio")
    # 30 // 3 classes = 10 each; class 2 has only 4: all of them. Grouped by class.
    np.testing.assert_array_equal(sample.labels, np.repeat([1, 2, 5], [10, 4, 10]))
    assert len(set(sample.images.ravel())) == sample.size  # distinct images of the split
    np.testing.assert_array_equal(split.labels[sample.images.ravel()], sample.labels)
    again = selective.retain_sample(split, 30, 3, "worst_class_ratio")
    np.testing.assert_array_equal(again.images, sample.images)  # seeded
    other = selective.retain_sample(split, 30, 4, "worst_class_ratio")
    assert not np.array_equal(other.images, sample.images)
    assert selective.retain_sample(split, 0, 3, "worst_class_ratio").size == split.size
    # The other scores draw size images at random (calibrate.subsample).
    plain = selective.retain_sample(split, 30, 3, "ratio")
    np.testing.assert_array_equal(plain.images, calibrate.subsample(split, 30, 3).images)


def _tiny_request():
    """A random-init LeNet and 20 forget / 20 retain random images."""
    model = models.get_model("lenet")
    params, bs = models.init_variables(model, jax.random.key(0), (28, 28, 1))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 28, 28, 1), dtype=np.uint8)
    labels = rng.integers(0, 10, 40).astype(np.int32)
    forget, retain = data.Split(images[:20], labels[:20]), data.Split(images[20:], labels[20:])
    return model, params, bs, forget, retain


def test_sweep_decay_scores_every_point_with_the_decayed_model():
    model, params, bs, forget, retain = _tiny_request()
    spec = units.enumerate_units(params, "weight", include="dense3")
    imp = _imp(np.linspace(1, 0, spec.num_units), np.zeros(spec.num_units))
    sweep = calibrate.sweep_decay(
        model, params, bs, dataset="mnist", forget_train=forget, retain_train=retain, imp=imp,
        spec=spec, top_ks=[5, 0.5], dts=[1.0, 30.0], lam=0.1, decay_steps=3,
    )  # fmt: skip
    assert [(p["top_k"], p["dt"]) for p in sweep["points"]] == [
        (5, 1.0), (5, 30.0), (0.5, 1.0), (0.5, 30.0)
    ]  # fmt: skip
    assert sweep["points"][2]["units"] == round(0.5 * spec.num_units)
    # Independent check of one point: decay by hand and predict.
    selected = decay.select_top_k(imp, 0.5)
    mask = units.unit_mask(params, spec, selected)
    factor = np.exp(-0.1 * 30.0 * 3)
    by_hand = jax.tree.map(lambda p, m: np.where(m, p * factor, p), params, mask)
    pred = metrics.predict(model, by_hand, bs, forget.images, dataset="mnist")
    assert sweep["points"][3]["forget_train_acc"] == pytest.approx(
        metrics.accuracy(pred, forget.labels), abs=1e-9
    )
    best = calibrate.choose(sweep["points"], 5.0)
    assert sweep["chosen"] == {"top_k": best["top_k"], "dt": best["dt"]}


def _sweep(pre: list[tuple[int, float, float]], forget_max: float = 1.0) -> dict:
    """Sweep points (top_k, forget_train_acc, retain_train_acc) before fine-tuning."""
    return {"points": _points(*pre), "forget_max": forget_max, "chosen": None}


def _linear_reference(sweep: dict, after_forget: dict) -> int | None:
    """Naive rule: scan silenced points from least damage on, return the first K that holds."""
    ok = [p for p in sweep["points"] if p["forget_train_acc"] <= sweep["forget_max"]]
    for p in sorted(ok, key=lambda p: -p["retain_train_acc"]):
        if after_forget[p["top_k"]] <= sweep["forget_max"]:
            return p["top_k"]
    return None


@pytest.mark.parametrize("first_holding", [0, 1, 2, 3, 4, 5])
def test_choose_after_finetune_finds_the_least_damaging_point_that_holds(first_holding):
    # Silenced points, least damage first: K = 10..60 (retain 99 -> 94); K = 70 is not silenced.
    pre = [(10 * (i + 1), 0.5, 99.0 - i) for i in range(6)] + [(70, 30.0, 99.5)]
    sweep = _sweep(pre)
    # Forget after fine-tuning falls as damage grows: points from `first_holding` on hold.
    after_forget = {10 * (i + 1): (0.2 if i >= first_holding else 50.0 - i) for i in range(6)}
    after_forget[70] = 0.0
    calls = []

    def after(point):
        calls.append(point["top_k"])
        return {"forget_train_acc": after_forget[point["top_k"]], "retain_train_acc": 99.9}

    out = calibrate.choose_after_finetune(sweep, after)
    expected = 10 * (first_holding + 1)
    assert out["chosen"]["top_k"] == _linear_reference(sweep, after_forget) == expected
    assert out["confirmed"]
    assert 70 not in calls  # never silenced before fine-tuning: not a candidate
    # Bisection over 6: at most 1 + ceil(log2 6) runs; the most damaging candidate (60) is
    # run only when nothing gentler holds.
    assert len(calls) == len(set(calls)) <= 1 + 3
    assert (60 in calls) == (first_holding == 5)
    assert len(calls) <= 3 or first_holding == 5
    assert [p["top_k"] for p in out["tried"]] == sorted(calls)


def test_choose_after_finetune_without_a_holding_point_takes_the_lowest_forget_after():
    sweep = _sweep([(10, 0.5, 99.0), (20, 0.8, 98.0), (30, 0.0, 90.0)])
    after_forget = {10: 40.0, 20: 30.0, 30: 12.0}
    out = calibrate.choose_after_finetune(
        sweep, lambda p: {"forget_train_acc": after_forget[p["top_k"]], "retain_train_acc": 99.0}
    )
    assert not out["confirmed"]
    assert out["chosen"]["top_k"] == 30  # every tried point failed; 30 is the least bad after
    assert out["chosen_point"]["forget_train_acc_after"] == 12.0


def test_choose_after_finetune_with_nothing_silenced_tries_the_strongest_point():
    sweep = _sweep([(10, 60.0, 99.0), (20, 20.0, 97.0)])
    out = calibrate.choose_after_finetune(
        sweep, lambda p: {"forget_train_acc": 0.5, "retain_train_acc": 98.0}
    )
    assert out["chosen"]["top_k"] == 20 and out["confirmed"]
    assert len(out["tried"]) == 1


def _exp_score(calls: list):
    """forget-train accuracy 100 * exp(-dt) (falls with dt), retain 100 - dt."""

    def score(dt):
        calls.append(dt)
        return {"forget_train_acc": 100 * np.exp(-dt), "retain_train_acc": 100 - dt}

    return score


def _naive_gentlest(score, lo, hi, forget_max, n=20001):
    """Independent reference: the smallest dt of a fine geometric scan that silences."""
    for dt in np.geomspace(lo, hi, n):
        if score(dt)["forget_train_acc"] <= forget_max:
            return dt
    return None


@pytest.mark.parametrize(
    "grid_dts, forget_max, bracket",
    [
        ((1.0, 2.0, 4.0), 10.0, (2.0, 4.0)),  # boundary ln 10 = 2.30 inside the grid
        ((1.0, 2.0), 60.0, (1.0 / 16, 1.0)),  # grid all silences: look below it (ln 1/0.6)
        ((1.0, 2.0), 0.5, (2.0, 8.0)),  # none silences: look up to 4 x the largest dt
    ],
)
def test_search_dt_finds_the_gentlest_silencing_dt(grid_dts, forget_max, bracket):
    calls = []
    score = _exp_score(calls)
    grid = {dt: score(dt) for dt in grid_dts}
    calls.clear()
    steps = 6
    found = calibrate.search_dt(score, grid, forget_max, steps)
    assert set(found) == set(calls) and not set(found) & set(grid)  # only new Δt, each once
    silencing = [dt for dt, a in {**grid, **found}.items() if a["forget_train_acc"] <= forget_max]
    best = min(silencing)
    reference = _naive_gentlest(_exp_score([]), *bracket, forget_max)
    assert reference == pytest.approx(np.log(100 / forget_max), rel=1e-3)
    # Within one final bracket of the reference: ratio (hi / lo) ** (1 / 2**steps), 4 digits.
    tolerance = (bracket[1] / bracket[0]) ** (1 / 2**steps) * (1 + 1e-3)
    assert reference * (1 - 1e-3) <= best <= reference * tolerance
    assert len(found) <= steps + 1


def test_search_dt_stops_when_nothing_silences_or_the_gentlest_already_does():
    calls = []
    score = _exp_score(calls)
    grid = {dt: score(dt) for dt in (1.0, 2.0)}
    calls.clear()
    # Never under 1e-6 %: one look above the grid (8) and no bisection.
    assert list(calibrate.search_dt(score, grid, 1e-6, 6)) == [8.0] == calls
    calls.clear()
    # Everything silences at a 99.9 % ceiling, down to 1/16: one look below the grid.
    assert list(calibrate.search_dt(score, grid, 99.9, 6)) == [1 / 16] == calls
    assert calibrate.search_dt(score, grid, 10.0, 0) == {8.0: score(8.0)}  # no halvings


def test_sweep_decay_with_search_adds_gentler_points_and_the_rule_sees_them():
    model, params, bs, forget, retain = _tiny_request()
    spec = units.enumerate_units(params, "weight")
    imp = _imp(np.linspace(1, 0, spec.num_units), np.zeros(spec.num_units))
    kwargs = dict(model=model, params=params, batch_stats=bs, dataset="mnist",
                  forget_train=forget, retain_train=retain, imp=imp, spec=spec, top_ks=[0.5],
                  dts=[2.0, 20.0], lam=0.1, decay_steps=3, forget_max=5.0)  # fmt: skip
    plain = calibrate.sweep_decay(**kwargs)
    searched = calibrate.sweep_decay(**kwargs, search_steps=4)
    grid = [p for p in searched["points"] if not p["search"]]
    extra = [p for p in searched["points"] if p["search"]]
    assert [(p["dt"], p["forget_train_acc"]) for p in grid] == [
        (p["dt"], p["forget_train_acc"]) for p in plain["points"]
    ]
    assert extra and all(p["top_k"] == 0.5 for p in extra)
    assert searched["chosen_point"] == calibrate.choose(searched["points"], 5.0)
    with pytest.raises(ValueError, match="search_steps"):
        calibrate.sweep_decay(**kwargs, search_steps=-1)


@pytest.mark.parametrize("forget_max", [0.0, 5.0, 100.0])
def test_sweep_scores_retain_only_where_the_rule_needs_it_and_chooses_the_same(forget_max):
    model, params, bs, forget, retain = _tiny_request()
    spec = units.enumerate_units(params, "weight")
    imp = _imp(np.linspace(1, 0, spec.num_units), np.zeros(spec.num_units))
    kwargs = dict(model=model, params=params, batch_stats=bs, dataset="mnist",
                  forget_train=forget, retain_train=retain, imp=imp, spec=spec,
                  top_ks=[0.1, 0.5], dts=[0.5, 5.0, 50.0], lam=0.1, decay_steps=3,
                  forget_max=forget_max, search_steps=2)  # fmt: skip
    full = calibrate.sweep_decay(**kwargs, retain_all_points=True)
    lazy = calibrate.sweep_decay(**kwargs)
    assert all(p["retain_train_acc"] is not None for p in full["points"])
    assert len(lazy["points"]) == len(full["points"])
    silenced = 0
    for f, z in zip(full["points"], lazy["points"], strict=True):
        assert (z["top_k"], z["dt"], z["forget_train_acc"]) == (
            f["top_k"], f["dt"], f["forget_train_acc"])  # fmt: skip
        if f["forget_train_acc"] <= forget_max:
            silenced += 1
            assert z["retain_train_acc"] == f["retain_train_acc"]
    if silenced == 0:  # the fallback: the lowest forget accuracy's ties are scored in full
        lowest = min(p["forget_train_acc"] for p in full["points"])
        ties = [p for p in lazy["points"] if p["forget_train_acc"] == lowest]
        assert all(p["retain_train_acc"] is not None for p in ties)
    else:
        assert sum(p["retain_train_acc"] is not None for p in lazy["points"]) == silenced
    assert lazy["chosen_point"] == full["chosen_point"]
    assert lazy["chosen"] == full["chosen"]


def test_choose_fallback_ignores_unscored_retain_of_worse_points():
    points = _points((10, 9.0, None), (20, 7.0, 80.0), (30, 7.0, 85.0), (40, 8.0, None))
    assert calibrate.choose(points, 5.0)["top_k"] == 30


def test_subsample_is_seeded_and_zero_means_all():
    split = data.Split(np.zeros((50, 2, 2, 1), np.uint8), np.arange(50, dtype=np.int32))
    assert calibrate.subsample(split, 0, 0) is split and calibrate.subsample(split, 80, 0) is split
    a, b = calibrate.subsample(split, 20, 3), calibrate.subsample(split, 20, 3)
    assert a.size == 20 and len(set(a.labels.tolist())) == 20
    np.testing.assert_array_equal(a.labels, b.labels)


def test_sweep_decay_spreads_k_over_layers_with_the_per_layer_budget():
    model, params, bs, forget, retain = _tiny_request()
    spec = units.enumerate_units(params, "weight", include="dense")
    imp = _imp(np.linspace(1, 0, spec.num_units), np.zeros(spec.num_units))
    kwargs = dict(dataset="mnist", forget_train=forget, retain_train=retain, imp=imp,
                  spec=spec, top_ks=[0.1], dts=[30.0], lam=0.1, decay_steps=3,
                  retain_all_points=True)  # fmt: skip
    point = calibrate.sweep_decay(model, params, bs, budget="per_layer", **kwargs)["points"][0]
    selected = decay.select_top_k(imp, 0.1, "per_layer", spec)
    assert set(units.locate(spec, selected)[0]) == set(range(len(spec.layers)))
    by_hand = decay.decay(params, units.unit_mask(params, spec, selected), 0.1, 30.0, 3)
    pred = metrics.predict(model, by_hand, bs, retain.images, dataset="mnist")
    assert point["retain_train_acc"] == pytest.approx(metrics.accuracy(pred, retain.labels))
    # The global budget takes the first 10% of units (all in the first dense layer here).
    glob = calibrate.sweep_decay(model, params, bs, **kwargs)["points"][0]
    assert set(units.locate(spec, decay.select_top_k(imp, 0.1))[0]) == {0}
    assert glob["units"] == point["units"]


def _guarded(after_by_dt: dict, *, at_one=(0.5, 99.0), margin=4.0, tolerance=0.1):
    """``guard_margin`` over a chosen point K=10, dt=0.5 whose margin-1 run scored ``at_one``
    (forget, retain after fine-tuning); ``after_by_dt``: dt -> (forget, retain). Returns the
    output and the dts run."""
    point = {"top_k": 10, "dt": 0.5, "forget_train_acc": 0.0, "retain_train_acc": 99.5}
    if at_one is not None:
        point.update(forget_train_acc_after=at_one[0], retain_train_acc_after=at_one[1])
    calibration = {"chosen": {"top_k": 10, "dt": 0.5}, "chosen_point": point, "forget_max": 1.0}
    calls = []

    def after(p):
        assert p["top_k"] == 10
        calls.append(p["dt"])
        forget, retain = after_by_dt[p["dt"]]
        return {"forget_train_acc": forget, "retain_train_acc": retain}

    return calibrate.guard_margin(calibration, after, margin, tolerance), calls


def test_guard_margins_halve_while_above_one():
    assert calibrate.guard_margins(4.0) == [4.0, 2.0]
    assert calibrate.guard_margins(3.0) == [3.0, 1.5]
    assert calibrate.guard_margins(1.0) == []
    with pytest.raises(ValueError, match="dt_margin must be >= 1"):
        calibrate.guard_margins(0.5)


@pytest.mark.parametrize(
    ("after_by_dt", "kept", "run"),
    [
        # x4 costs 0.09 retain points (<= 0.1): kept, x2 never run.
        ({2.0: (0.0, 98.91)}, 4.0, [2.0]),
        # x4 costs 0.15: refused; x2 costs 0.05: kept.
        ({2.0: (0.0, 98.85), 1.0: (0.0, 98.95)}, 2.0, [2.0, 1.0]),
        # both cost too much: margin 1.
        ({2.0: (0.0, 97.0), 1.0: (0.0, 98.5)}, 1.0, [2.0, 1.0]),
        # x4 keeps retain but lets the class back over the 1% ceiling: refused.
        ({2.0: (1.5, 99.2), 1.0: (0.2, 99.0)}, 2.0, [2.0, 1.0]),
    ],
)
def test_guard_margin_keeps_the_largest_margin_within_the_tolerance(after_by_dt, kept, run):
    out, calls = _guarded(after_by_dt)
    assert out["dt_margin"] == kept and calls == run  # dt = 0.5 x the margin
    assert out["margin_guard"] == 0.1
    checks = out["margin_checks"]
    assert [c["dt_margin"] for c in checks] == [1.0, *(dt / 0.5 for dt in run)]
    assert checks[0]["retain_train_acc"] == 99.0  # margin 1's, from the check already made
    assert [c["dt_margin"] for c in checks if c["kept"]] == [kept]
    assert calibrate.run_point(out, out["dt_margin"]) == {"top_k": 10, "dt": 0.5 * kept}


def test_guard_margin_runs_margin_one_itself_when_no_check_scored_it():
    out, calls = _guarded({0.5: (0.8, 99.0), 2.0: (0.0, 98.0), 1.0: (0.0, 98.95)}, at_one=None)
    assert calls == [0.5, 2.0, 1.0] and out["dt_margin"] == 2.0
    # Margin 1 let 0.8% through (under the ceiling): the ceiling bounds the others.
    out, _ = _guarded({0.5: (3.0, 99.0), 2.0: (2.0, 99.0)}, at_one=None)
    assert out["dt_margin"] == 4.0  # over the ceiling, but no worse than margin 1's 3%


def test_guard_margin_with_margin_one_runs_nothing_and_refuses_a_negative_tolerance():
    out, calls = _guarded({}, at_one=None, margin=1.0)
    assert calls == [] and out["dt_margin"] == 1.0
    with pytest.raises(ValueError, match="tolerance must be >= 0"):
        _guarded({}, tolerance=-0.1)
