"""Tests for tdu_jax.unlearn: the pipeline against a hand-composed reference, and its settings."""

import inspect

import chex
import jax
import numpy as np
import pytest

import tdu_jax as tdu
from tdu_jax import data, decay, importance, metrics, models, selective, train, units, unlearn

# Filter units of the dense layers only (120 + 84 + 10 = 214): three jitted chunk functions.
_BASE = unlearn.UnlearnConfig(
    granularity="filter",
    top_k=12,
    lam=0.5,
    dt=1.0,
    decay_steps=2,
    include="dense",
    batch_size=32,
    evaluate_each_step=False,
    unit_chunk=50,
    sample_batch=64,
)
_NUM_UNITS = 214


@pytest.fixture(scope="module")
def setup(tfds_dir):
    """Random-init LeNet; MNIST slices: ~540 retain images (no 0s), 64 zeros, 500 test."""
    split = data.load_split("mnist", "test", data_dir=tfds_dir)
    _, retain = data.forget_retain(data.take(split, 600), [0])
    zeros = data.select_classes(data.Split(split.images[1000:3000], split.labels[1000:3000]), [0])
    data_in = unlearn.UnlearnData(
        importance_sample=data.take(zeros, 64),
        retain_train=retain,
        test=data.Split(split.images[9500:], split.labels[9500:]),
        forget_classes=(0,),
    )
    model = models.get_model("lenet")
    init = jax.jit(lambda key: models.init_variables(model, key, (28, 28, 1)))
    params, batch_stats = init(jax.random.key(0, impl="rbg"))
    return model, params, batch_stats, data_in


def _call(fn, setup, config, key=0, events=None):
    """``fn`` (``unlearn`` or ``init_unlearn``) on the fixture; ``events`` collects events."""
    model, params, batch_stats, data_in = setup
    return fn(
        model,
        params,
        batch_stats,
        dataset="mnist",
        data_in=data_in,
        config=config,
        key=jax.random.key(key),
        event=None if events is None else lambda phase, info: events.append((phase, info)),
    )


def _run(setup, key=0, **overrides):
    return _call(unlearn.unlearn, setup, _BASE._replace(**overrides), key)


def _spec(params, config=_BASE):
    return units.enumerate_units(
        params, config.granularity, config.include, config.exclude, config.include_bn
    )


def _importance(setup, params, config=_BASE):
    model, _, batch_stats, data_in = setup
    sample = data_in.importance_sample
    return importance.ablation_importance(
        model,
        params,
        batch_stats,
        data.to_float(sample.images, "mnist"),
        sample.labels,
        _spec(params, config),
        unit_chunk=config.unit_chunk,
        sample_batch=config.sample_batch,
    )


def _fine_tune(setup, params, batch_stats, config, key, num_batches, start_batch):
    model, _, _, data_in = setup
    return train.fine_tune(
        model,
        params,
        batch_stats,
        data_in.retain_train,
        dataset="mnist",
        config=config.finetune_optimizer,
        num_batches=num_batches,
        batch_size=config.batch_size,
        key=key,
        start_batch=start_batch,
    )[:2]


@pytest.fixture
def no_importance(monkeypatch):
    """Makes any importance computation fail the test."""

    def fail(*args, **kwargs):
        raise AssertionError("importance must not be computed")

    monkeypatch.setattr(importance, "ablation_importance", fail)


@pytest.fixture
def finetune_calls(monkeypatch):
    """Records (num_batches, start_batch, batches run) of every fine-tuning call."""
    calls = []
    inner = train.train_batches

    def recording(state, split, key, num_batches, **kwargs):
        state, m = inner(state, split, key, num_batches, **kwargs)
        calls.append((num_batches, kwargs["start_batch"], m["batches"], int(state.step)))
        return state, m

    monkeypatch.setattr(train, "train_batches", recording)
    return calls


# ---------------------------------------------------------------- fine-tune budgets
@pytest.mark.parametrize(
    "mode, batches, steps, total, history_steps, history_batches",
    [
        ("none", 0, 2, 0, [0, 1, 2], [0, 0, 0]),
        ("after_all", 3, 2, 3, [0, 1, 2], [0, 0, 3]),
        ("after_all", 0, 2, 0, [0, 1, 2], [0, 0, 0]),
        ("after_each", 2, 3, 6, [0, 1, 2, 3], [0, 2, 4, 6]),
        ("after_all", 4, 0, 4, [0, 0], [0, 4]),  # fine-tune-only baseline
        ("after_each", 5, 0, 0, [0], [0]),
    ],
)
def test_finetune_batch_counts(
    setup,
    no_importance,
    finetune_calls,
    mode,
    batches,
    steps,
    total,
    history_steps,
    history_batches,
):
    config = dict(selection="random", finetune=mode, finetune_batches=batches, decay_steps=steps)
    result = _run(setup, **config)
    assert result.finetune_batches == total
    assert unlearn.planned_finetune_batches(_BASE._replace(**config)) == total
    assert [h["step"] for h in result.history] == history_steps
    assert [h["finetune_batches"] for h in result.history] == history_batches
    # The optimizer really ran that many batches, continuing one batch stream.
    per_call = batches if mode == "after_each" else total
    n_calls = steps if mode == "after_each" else int(total > 0)
    assert [c[0] for c in finetune_calls] == [per_call] * n_calls
    assert [c[1] for c in finetune_calls] == [i * per_call for i in range(n_calls)]
    assert [c[2] for c in finetune_calls] == [c[3] for c in finetune_calls] == [per_call] * n_calls
    assert sum(c[2] for c in finetune_calls) == total
    assert set(result.timings) == {"importance", "decay", "finetune", "eval"}
    assert result.timings["importance"] == 0.0
    assert (result.timings["finetune"] > 0) == (total > 0)


# ---------------------------------------------------------------- the pipeline, by hand
@pytest.mark.parametrize("mode, batches", [("none", 0), ("after_all", 3), ("after_each", 2)])
def test_random_selection_matches_hand_composition(setup, no_importance, mode, batches):
    _, params, batch_stats, _ = setup
    config = _BASE._replace(selection="random", finetune=mode, finetune_batches=batches)
    result = _run(setup, key=5, **config._asdict())
    # Reference: the documented recipe, composed from the building blocks.
    select_key, finetune_key = jax.random.split(jax.random.key(5))
    spec = _spec(params)
    selected = decay.select_random_k(select_key, spec.num_units, config.top_k)
    p, bs, spent = params, batch_stats, 0
    for _ in range(config.decay_steps):
        p = decay.decay_step(p, units.unit_mask(p, spec, selected), config.lam, config.dt)
        if mode == "after_each":
            p, bs = _fine_tune(setup, p, bs, config, finetune_key, batches, spent)
            spent += batches
    if mode == "after_all":
        p, bs = _fine_tune(setup, p, bs, config, finetune_key, batches, 0)
    np.testing.assert_array_equal(result.selected, selected)
    assert result.selected.size == 12 and np.unique(result.selected).size == 12
    assert result.importance is None
    chex.assert_trees_all_equal(result.params, p)
    chex.assert_trees_all_equal(result.batch_stats, bs)
    assert result.spec == spec
    if mode == "none":
        # Pure decay: selected filters scaled by exp(-lambda * dt * T), the rest untouched.
        mask = units.unit_mask(params, spec, selected)
        factor = np.exp(-config.lam * config.dt * config.decay_steps)
        for p0, m, p1 in zip(*map(jax.tree.leaves, (params, mask, result.params)), strict=True):
            p0, m, p1 = np.asarray(p0), np.asarray(m), np.asarray(p1)
            np.testing.assert_allclose(p1[m], p0[m] * factor, rtol=1e-6)
            np.testing.assert_array_equal(p1[~m], p0[~m])


def test_topk_selects_from_importance_of_the_input_model(setup):
    _, params, _, _ = setup
    result = _run(setup)
    imp = _importance(setup, params)
    np.testing.assert_array_equal(result.selected, decay.select_top_k(imp, 12))
    np.testing.assert_array_equal(result.importance.units, np.arange(_NUM_UNITS))
    chex.assert_trees_all_close(
        (result.importance.accuracy_drop, result.importance.loss_increase),
        (imp.accuracy_drop, imp.loss_increase),
        atol=1e-9,
    )
    assert result.importance.sample_size == 64
    spec = _spec(params)
    expected = decay.decay(params, units.unit_mask(params, spec, result.selected), 0.5, 1.0, 2)
    chex.assert_trees_all_equal(result.params, expected)
    assert result.timings["importance"] > 0
    # Only the dense layers were eligible.
    assert all(units.unit_name(spec, u).startswith("dense") for u in result.selected)


def test_per_layer_budget_selects_from_every_layer(setup):
    _, params, _, _ = setup
    result = _run(setup, top_k=40, topk_budget="per_layer")
    spec = _spec(params)
    np.testing.assert_array_equal(
        result.selected, decay.select_top_k(_importance(setup, params), 40, "per_layer", spec)
    )
    layers, _ = units.locate(spec, result.selected)
    assert set(layers) == set(range(len(spec.layers)))  # every layer gets its share
    with pytest.raises(ValueError, match="topk_budget must be one of"):
        _run(setup, topk_budget="layers")


@pytest.mark.parametrize("score", ["selective", "ratio", "worst_class_ratio"])
def test_retain_relative_scores_combine_both_samples(setup, score):
    model, params, batch_stats, data_in = setup
    retain = data.take(data_in.retain_train, 48)
    with pytest.raises(ValueError, match=f"importance_score={score} needs a non-empty"):
        _run(setup, importance_score=score)  # no retain sample given
    with_retain = (model, params, batch_stats, data_in._replace(retain_sample=retain))
    config = _BASE._replace(importance_score=score, selective_beta=0.5)
    result = _call(unlearn.unlearn, with_retain, config)

    def engine(where):  # the naive composition: one engine call on retain[where]
        return importance.ablation_importance(
            model, params, batch_stats, data.to_float(retain.images[where], "mnist"),
            retain.labels[where], _spec(params), unit_chunk=50, sample_batch=64,
        )  # fmt: skip

    forget_imp = _importance(setup, params)
    labels = np.asarray(retain.labels)
    if score == "worst_class_ratio":  # each retained class on its own
        classes = [engine(labels == c) for c in np.unique(labels)]
        assert len(classes) > 1
        expected = selective.worst_class_ratio_importance(forget_imp, classes)
    elif score == "ratio":
        expected = selective.ratio_importance(forget_imp, engine(slice(None)))
    else:
        expected = selective.selective_importance(forget_imp, engine(slice(None)), 0.5)
    np.testing.assert_allclose(result.importance.loss_increase, expected.loss_increase, atol=1e-6)
    np.testing.assert_array_equal(result.selected, decay.select_top_k(expected, 12))


def test_lambda_zero_changes_nothing(setup):
    _, params, batch_stats, _ = setup
    result = _run(setup, lam=0.0)
    assert result.selected.size == 12
    chex.assert_trees_all_equal(result.params, params)
    chex.assert_trees_all_equal(result.batch_stats, batch_stats)


def test_input_params_are_not_modified(setup):
    _, params, batch_stats, _ = setup
    before = jax.tree.map(np.array, (params, batch_stats))
    _run(setup, selection="random", finetune="after_each", finetune_batches=1)
    chex.assert_trees_all_equal((params, batch_stats), before)


# ---------------------------------------------------------------- determinism
def test_same_seed_same_result(setup):
    config = dict(finetune="after_each", finetune_batches=2, evaluate_each_step=True)
    a = _run(setup, key=3, **config)
    b = _run(setup, key=3, **config)
    chex.assert_trees_all_equal(a.params, b.params)
    chex.assert_trees_all_equal(a.batch_stats, b.batch_stats)
    np.testing.assert_array_equal(a.selected, b.selected)
    np.testing.assert_array_equal(a.importance.accuracy_drop, b.importance.accuracy_drop)
    np.testing.assert_array_equal(a.importance.loss_increase, b.importance.loss_increase)
    assert a.history == b.history
    assert a.finetune_batches == b.finetune_batches == 4
    # The history's accuracies are those of the final model.
    _, _, _, data_in = setup
    final = metrics.evaluate(
        setup[0], a.params, a.batch_stats, data_in.test, dataset="mnist", forget_classes=(0,)
    )
    last = a.history[-1]
    assert {k: last[k] for k in ("forget_acc", "retain_acc", "test_acc")} == pytest.approx(
        {k: final[k] for k in ("forget_acc", "retain_acc", "test_acc")}
    )
    keys = {"step", "finetune_batches", "forget_acc", "retain_acc", "test_acc"}
    assert all(set(h) == keys for h in a.history)


def test_other_seed_other_random_units(setup, no_importance):
    a = _run(setup, key=1, selection="random")
    b = _run(setup, key=2, selection="random")
    assert not np.array_equal(a.selected, b.selected)
    assert a.selected.size == b.selected.size == 12


def test_fraction_top_k(setup, no_importance):
    result = _run(setup, selection="random", top_k=0.1)
    assert result.selected.size == round(0.1 * _NUM_UNITS)


# ---------------------------------------------------------------- baselines and re-estimation
def test_decay_steps_zero_is_finetune_only(setup, no_importance):
    _, params, batch_stats, _ = setup
    result = _run(setup, decay_steps=0, finetune="after_all", finetune_batches=3)
    assert result.importance is None
    assert result.selected.size == 0
    assert result.finetune_batches == 3
    _, finetune_key = jax.random.split(jax.random.key(0))
    expected = _fine_tune(setup, params, batch_stats, _BASE, finetune_key, 3, 0)
    chex.assert_trees_all_equal((result.params, result.batch_stats), expected)


@pytest.mark.parametrize("reestimate, calls", [(False, 1), (True, 3)])
def test_importance_calls(setup, monkeypatch, reestimate, calls):
    seen = []
    inner = importance.ablation_importance

    def counting(model, params, *args, **kwargs):
        seen.append(params)
        return inner(model, params, *args, **kwargs)

    monkeypatch.setattr(importance, "ablation_importance", counting)
    result = _run(setup, decay_steps=3, reestimate=reestimate)
    assert len(seen) == calls
    assert len(result.history) == 4
    # Random selection never computes importance, with or without re-estimation.
    _run(setup, decay_steps=3, reestimate=reestimate, selection="random")
    assert len(seen) == calls


def test_reestimate_follows_the_decayed_model(setup):
    _, params, _, _ = setup
    config = _BASE._replace(lam=3.0, decay_steps=2, reestimate=True)
    result = _run(setup, **config._asdict())
    # Reference: importance -> top-K -> one step, twice, each on the current params.
    spec = _spec(params)
    imp1 = _importance(setup, params)
    sel1 = decay.select_top_k(imp1, 12)
    p1 = decay.decay_step(params, units.unit_mask(params, spec, sel1), 3.0, 1.0)
    imp2 = _importance(setup, p1)
    sel2 = decay.select_top_k(imp2, 12)
    p2 = decay.decay_step(p1, units.unit_mask(p1, spec, sel2), 3.0, 1.0)
    np.testing.assert_array_equal(result.selected, sel2)
    np.testing.assert_array_equal(result.importance.accuracy_drop, imp2.accuracy_drop)
    np.testing.assert_allclose(result.importance.loss_increase, imp2.loss_increase, atol=1e-9)
    chex.assert_trees_all_equal(result.params, p2)
    # The second estimate saw the decayed model.
    assert not np.allclose(imp1.loss_increase, imp2.loss_increase)


@pytest.mark.skipif(
    "precomputed" not in inspect.signature(unlearn.unlearn).parameters,
    reason="unlearn has no precomputed importance",
)
def test_precomputed_importance_is_reused(setup, monkeypatch):
    model, params, batch_stats, data_in = setup
    imp = _importance(setup, params)
    expected = _run(setup)
    monkeypatch.setattr(importance, "ablation_importance", None)  # calling it would fail
    result = unlearn.unlearn(
        model,
        params,
        batch_stats,
        dataset="mnist",
        data_in=data_in,
        config=_BASE,
        key=jax.random.key(0),
        precomputed=imp,
    )
    np.testing.assert_array_equal(result.selected, expected.selected)
    chex.assert_trees_all_equal(result.params, expected.params)


def test_events(setup):
    model, params, batch_stats, data_in = setup
    events = []
    unlearn.unlearn(
        model,
        params,
        batch_stats,
        dataset="mnist",
        data_in=data_in,
        config=_BASE._replace(finetune="after_all", finetune_batches=2),
        key=jax.random.key(0),
        event=lambda phase, info: events.append((phase, info)),
    )
    steps = [info for phase, info in events if phase == "step"]
    assert [s["step"] for s in steps] == [0, 1, 2]
    progress = [info for phase, info in events if phase == "importance"]
    assert progress[-1]["done"] == progress[-1]["total"] == _NUM_UNITS
    finetune = [info for phase, info in events if phase == "finetune"]
    assert finetune[-1]["done"] == finetune[-1]["total"] == 2


# ---------------------------------------------------------------- step functions
def _assert_results_equal(a, b):
    chex.assert_trees_all_equal((a.params, a.batch_stats), (b.params, b.batch_stats))
    np.testing.assert_array_equal(a.selected, b.selected)
    if a.importance is None:
        assert b.importance is None
    else:
        chex.assert_trees_all_equal(
            a.importance._replace(seconds=0.0), b.importance._replace(seconds=0.0)
        )
    assert a.spec == b.spec
    assert a.history == b.history and isinstance(b.history, list)
    assert a.finetune_batches == b.finetune_batches
    assert list(a.timings) == list(b.timings) == ["importance", "decay", "finetune", "eval"]


def test_step_functions_are_exported():
    assert tdu.init_unlearn is unlearn.init_unlearn and tdu.UnlearnState is unlearn.UnlearnState
    for name in ("select_units", "decay_once", "finetune_once", "evaluate_state", "unlearn_result"):
        assert getattr(tdu, name) is getattr(unlearn, name) and name in tdu.__all__


@pytest.mark.parametrize(
    "overrides",
    [
        # Top-K re-estimated before step 2, one fine-tune batch after each step, evaluated.
        dict(reestimate=True, finetune="after_each", finetune_batches=1, evaluate_each_step=True),
        # Random-K, fine-tuned after all steps.
        dict(selection="random", finetune="after_all", finetune_batches=2),
    ],
)
def test_driving_the_steps_by_hand_equals_unlearn(setup, overrides):
    config = _BASE._replace(**overrides)  # decay_steps=2
    expected_events, events = [], []
    expected = _call(unlearn.unlearn, setup, config, key=7, events=expected_events)
    ctx, state = _call(unlearn.init_unlearn, setup, config, key=7, events=events)
    assert (state.step, state.finetune_batches, state.history, state.selected.size) == (0, 0, (), 0)
    state = unlearn.evaluate_state(ctx, state)  # history: step 0
    state = unlearn.select_units(ctx, state)
    state = unlearn.decay_once(ctx, state)
    if config.finetune == "after_each":
        state = unlearn.finetune_once(ctx, state)
        state = unlearn.evaluate_state(ctx, state)
        state = unlearn.select_units(ctx, state)  # re-estimated on the decayed, fine-tuned model
        state = unlearn.decay_once(ctx, state)
        state = unlearn.finetune_once(ctx, state)
    else:
        state = unlearn.evaluate_state(ctx, state)
        state = unlearn.decay_once(ctx, state)
        state = unlearn.finetune_once(ctx, state)
    state = unlearn.evaluate_state(ctx, state)
    assert state.step == 2
    _assert_results_equal(expected, unlearn.unlearn_result(ctx, state))
    steps = [info for phase, info in events if phase == "step"]
    assert steps == [info for phase, info in expected_events if phase == "step"]
    assert [p for p, _ in events] == [p for p, _ in expected_events]


def test_step_functions_do_not_mutate_their_input_state(setup, no_importance):
    config = _BASE._replace(
        selection="random", finetune="after_each", finetune_batches=1, evaluate_each_step=True
    )
    ctx, state = _call(unlearn.init_unlearn, setup, config)
    state = unlearn.select_units(ctx, unlearn.evaluate_state(ctx, state))
    steps = [
        unlearn.select_units,
        unlearn.decay_once,
        unlearn.finetune_once,
        unlearn.evaluate_state,
        unlearn.unlearn_result,
    ]
    for step in steps:
        leaves, treedef = jax.tree.flatten(state)
        before = [np.array(leaf, copy=True) for leaf in leaves]
        out = step(ctx, state)
        assert out is not state
        after, after_treedef = jax.tree.flatten(state)
        assert after_treedef == treedef, step.__name__
        for b, a in zip(before, after, strict=True):
            np.testing.assert_array_equal(np.asarray(a), b, err_msg=step.__name__)
        if step is not unlearn.unlearn_result:
            state = out
    # Each step did its one thing.
    assert (state.step, state.finetune_batches, len(state.history)) == (1, 1, 2)


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(granularity="neuron"), "granularity must be one of weight, filter"),
        (dict(selection="best"), "selection must be one of topk, random"),
        (dict(top_k=_NUM_UNITS + 1), rf"top_k must be in \[1, {_NUM_UNITS}\]"),
        (dict(top_k=0), "top_k"),
        (dict(top_k=1.5), r"fraction must be in \(0, 1\]"),
        (dict(top_k=True), "count or a fraction"),
        (dict(lam=-0.1), "lambda"),
        (dict(lam=float("nan")), "lambda"),
        (dict(dt=0.0), "dt"),
        (dict(dt=-1.0), "dt"),
        (dict(decay_steps=-1), "decay_steps"),
        (dict(finetune="sometimes"), "finetune must be one of none, after_all, after_each"),
        (dict(finetune="none", finetune_batches=3), "finetune=none conflicts"),
        (dict(finetune="after_all", finetune_batches=-1), "finetune_batches must be >= 0"),
        (dict(batch_size=0), "batch_size"),
        (dict(include="conv9"), "no layer with units"),
        (
            dict(finetune_optimizer=train.OptimizerConfig(learning_rate=0.0)),
            "learning_rate",
        ),
    ],
)
def test_invalid_config(setup, no_importance, finetune_calls, overrides, match):
    with pytest.raises(ValueError, match=match):
        _run(setup, **overrides)
    assert not finetune_calls


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(top_k=0), "top_k must be >= 1"),
        (dict(top_k=-0.5), r"fraction must be in \(0, 1\]"),
        (dict(lam=-1.0), "lambda"),
        (dict(finetune="none", finetune_batches=1), "conflicts"),
    ],
)
def test_validate_without_unit_count(overrides, match):
    with pytest.raises(ValueError, match=match):
        unlearn.validate_unlearn_config(_BASE._replace(**overrides))
    unlearn.validate_unlearn_config(_BASE._replace(top_k=10**9))  # checked once units are known


def test_empty_importance_sample(setup, finetune_calls):
    model, params, batch_stats, data_in = setup
    empty = data_in._replace(importance_sample=data.take(data_in.importance_sample, 0))
    kwargs = dict(dataset="mnist", data_in=empty, key=jax.random.key(0))
    with pytest.raises(ValueError, match="importance sample is empty"):
        unlearn.unlearn(model, params, batch_stats, config=_BASE, **kwargs)
    assert not finetune_calls
    # Random selection needs no sample.
    result = unlearn.unlearn(
        model, params, batch_stats, config=_BASE._replace(selection="random"), **kwargs
    )
    assert result.selected.size == 12


@pytest.mark.parametrize(
    "epochs, retain, batch, expected",
    [
        (1, 45_000, 128, 352),  # CIFAR-10 without one class: the last batch is partial
        (2, 45_000, 128, 704),
        (6, 45_000, 128, 2112),
        (0.5, 45_000, 128, 176),
        (1, 256, 128, 2),
        (1.5, 256, 128, 3),
        (0, 256, 128, 0),
    ],
)
def test_epochs_to_batches(epochs, retain, batch, expected):
    assert unlearn.epochs_to_batches(epochs, retain, batch) == expected
