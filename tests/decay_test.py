"""Tests for tdu_jax.decay: K resolution, ranking, selection and the exponential decay."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tdu_jax import decay, units
from tdu_jax.importance import Importance


def _params(seed=0):
    """A small params tree with a conv/BatchNorm pair, a dense layer and a bias-free layer."""
    rng = np.random.default_rng(seed)
    r = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
    return {
        "block": {
            "conv1": {"kernel": r(3, 3, 2, 4)},
            "bn1": {"scale": r(4), "bias": r(4)},
        },
        "dense": {"kernel": r(5, 3), "bias": r(3)},
        "out": {"kernel": r(3, 2)},
    }


def _mask(params, granularity, selected):
    return units.unit_mask(params, units.enumerate_units(params, granularity), np.asarray(selected))


def _importance(acc, loss, unit_ids=None):
    acc = np.asarray(acc, np.float64)
    unit_ids = np.arange(acc.size) if unit_ids is None else np.asarray(unit_ids, np.int64)
    return Importance(
        units=unit_ids,
        accuracy_drop=acc,
        loss_increase=np.asarray(loss, np.float64),
        base_accuracy=90.0,
        base_loss=0.3,
        sample_size=100,
        seconds=0.0,
    )


# ---------------------------------------------------------------- resolve_k
@pytest.mark.parametrize(
    "k, num_units, expected",
    [
        (1, 10, 1),
        (10, 10, 10),
        (7, 236, 7),
        (np.int64(3), 5, 3),
        (1.0, 10, 10),
        (0.5, 10, 5),
        (0.25, 10, 2),  # round(2.5) -> 2
        (0.35, 10, 4),  # round(3.5) -> 4
        (1e-6, 10, 1),  # at least one unit
        (np.float32(0.5), 4, 2),
        (0.1, 61_706, 6171),
    ],
)
def test_resolve_k(k, num_units, expected):
    assert decay.resolve_k(k, num_units) == expected
    assert isinstance(decay.resolve_k(k, num_units), int)


@pytest.mark.parametrize(
    "k, match",
    [
        (0, r"top_k must be in \[1, 10\]"),
        (-3, r"top_k must be in \[1, 10\]"),
        (11, r"top_k must be in \[1, 10\]"),
        (0.0, r"fraction must be in \(0, 1\]"),
        (-0.5, r"fraction must be in \(0, 1\]"),
        (1.5, r"fraction must be in \(0, 1\]"),
        (float("nan"), r"fraction must be in \(0, 1\]"),
        (True, "count or a fraction"),
        (False, "count or a fraction"),
        ("5", "count or a fraction"),
        (None, "count or a fraction"),
    ],
)
def test_resolve_k_errors(k, match):
    with pytest.raises(ValueError, match=match):
        decay.resolve_k(k, 10)


# ---------------------------------------------------------------- ranking and selection
def test_rank_units_breaks_ties_by_loss_then_index():
    #          unit:  0     1     2     3     4     5     6     7
    acc = np.array([1.0, 3.0, 3.0, 0.0, 3.0, 1.0, 1.0, 0.0])
    loss = np.array([0.2, 0.1, 0.5, 0.9, 0.1, 0.2, 0.3, 0.9])
    imp = _importance(acc, loss)
    # acc 3: unit 2 (loss 0.5), then 1 and 4 tie on loss -> index order;
    # acc 1: unit 6 (0.3), then 0 and 5 tie -> index; acc 0: 3 and 7 tie -> index.
    np.testing.assert_array_equal(decay.rank_units(imp), [2, 1, 4, 6, 0, 5, 3, 7])
    np.testing.assert_array_equal(decay.select_top_k(imp, 3), [1, 2, 4])
    np.testing.assert_array_equal(decay.select_top_k(imp, 2), [1, 2])
    np.testing.assert_array_equal(decay.select_top_k(imp, 5), [0, 1, 2, 4, 6])
    np.testing.assert_array_equal(decay.select_top_k(imp, 0.5), [1, 2, 4, 6])
    np.testing.assert_array_equal(decay.select_top_k(imp, 1.0), np.arange(8))


def test_rank_units_uses_global_unit_ids_and_ignores_input_order():
    # Scores for units given out of order and not starting at 0.
    unit_ids = np.array([40, 12, 7, 99, 3])
    acc = np.array([2.0, 2.0, 2.0, 5.0, 0.0])
    loss = np.array([0.1, 0.1, 0.1, 0.0, 1.0])
    imp = _importance(acc, loss, unit_ids)
    np.testing.assert_array_equal(decay.rank_units(imp), [99, 7, 12, 40, 3])
    np.testing.assert_array_equal(decay.select_top_k(imp, 2), [7, 99])
    # Reordering the inputs leaves the ranking unchanged.
    perm = np.array([3, 0, 4, 2, 1])
    shuffled = _importance(acc[perm], loss[perm], unit_ids[perm])
    np.testing.assert_array_equal(decay.rank_units(shuffled), decay.rank_units(imp))


def test_rank_units_matches_sorted_reference():
    rng = np.random.default_rng(1)
    n = 200
    acc = rng.integers(0, 4, n).astype(np.float64)  # many ties
    loss = np.round(rng.normal(size=n), 1)  # ties on loss too
    imp = _importance(acc, loss)
    reference = sorted(range(n), key=lambda u: (-acc[u], -loss[u], u))
    np.testing.assert_array_equal(decay.rank_units(imp), reference)


def _two_layer_spec():
    """Layer "a" holds units 0-1, layer "b" units 2-5."""
    return units.enumerate_units({"a": {"kernel": jnp.zeros((1, 2))},
                                  "b": {"kernel": jnp.zeros((2, 2))}}, "weight")  # fmt: skip


def test_per_layer_budget_by_hand():
    spec = _two_layer_spec()
    assert [(layer.offset, layer.num_units) for layer in spec.layers] == [(0, 2), (2, 4)]
    imp = _importance([5.0, 4.0, 10.0, 9.0, 8.0, 7.0], np.zeros(6))
    np.testing.assert_array_equal(decay.rank_units(imp), [2, 3, 4, 5, 0, 1])
    # Rank within layer / layer size: a: 0 -> 0, 1 -> 1/2; b: 2 -> 0, 3 -> 1/4, 4 -> 2/4,
    # 5 -> 3/4; equal shares keep the global order (2 before 0, 4 before 1).
    np.testing.assert_array_equal(decay.rank_units(imp, "per_layer", spec), [2, 0, 3, 4, 1, 5])
    # K = 1, below the number of layers: the more important of the two layers' top units.
    np.testing.assert_array_equal(decay.select_top_k(imp, 1, "per_layer", spec), [2])
    # K = 3 of 6 units: one of a's two, two of b's four.
    np.testing.assert_array_equal(decay.select_top_k(imp, 3, "per_layer", spec), [0, 2, 3])
    np.testing.assert_array_equal(decay.select_top_k(imp, 3), [2, 3, 4])
    # per_layer_equal: rank within the layer alone: 2, 0 (rank 0), 3, 1 (rank 1), 4, 5.
    np.testing.assert_array_equal(decay.rank_units(imp, "per_layer_equal", spec),
                                  [2, 0, 3, 1, 4, 5])  # fmt: skip
    # K = 4: layer a is taken whole, b gives the same two.
    np.testing.assert_array_equal(decay.select_top_k(imp, 4, "per_layer_equal", spec),
                                  [0, 1, 2, 3])  # fmt: skip


def test_per_layer_budget_keeps_each_layers_order_and_its_share():
    params = _params(2)
    spec = units.enumerate_units(params, "weight")
    rng = np.random.default_rng(4)
    acc = rng.integers(0, 5, spec.num_units).astype(np.float64)
    loss = np.round(rng.normal(size=spec.num_units), 1)
    imp = _importance(acc, loss)
    global_order = list(decay.rank_units(imp))
    for k in range(1, spec.num_units + 1):
        chosen = set(decay.select_top_k(imp, k, "per_layer", spec).tolist())
        assert len(chosen) == k
        for layer in spec.layers:
            mine = [u for u in global_order if layer.offset <= u < layer.offset + layer.num_units]
            taken = [u for u in mine if u in chosen]
            assert taken == mine[: len(taken)]  # the layer's most important units first
            share = k * layer.num_units / spec.num_units
            assert abs(len(taken) - share) <= len(spec.layers)
        # per_layer_equal: the same order within a layer, and no layer gives more than one
        # unit beyond what the least-served layer with units left gives.
        chosen = set(decay.select_top_k(imp, k, "per_layer_equal", spec).tolist())
        counts = []
        for layer in spec.layers:
            mine = [u for u in global_order if layer.offset <= u < layer.offset + layer.num_units]
            taken = [u for u in mine if u in chosen]
            assert taken == mine[: len(taken)]
            counts.append((len(taken), layer.num_units))
        open_counts = [c for c, n in counts if c < n]
        assert len(chosen) == k
        assert not open_counts or all(c <= min(open_counts) + 1 for c, _ in counts)


def test_topk_budget_errors():
    imp = _importance([1.0, 2.0], [0.0, 0.0])
    with pytest.raises(ValueError, match="topk_budget must be one of global, per_layer, "
                                         "per_layer_equal"):  # fmt: skip
        decay.select_top_k(imp, 1, "layerwise")
    with pytest.raises(ValueError, match="needs the unit spec"):
        decay.rank_units(imp, "per_layer")


def test_select_top_k_errors():
    imp = _importance([1.0, 2.0], [0.0, 0.0])
    with pytest.raises(ValueError, match=r"\[1, 2\]"):
        decay.select_top_k(imp, 3)


@pytest.mark.parametrize("num_units, k, count", [(50, 10, 10), (7, 7, 7), (1000, 0.01, 10)])
def test_select_random_k(num_units, k, count):
    a = decay.select_random_k(jax.random.key(3), num_units, k)
    b = decay.select_random_k(jax.random.key(3), num_units, k)
    np.testing.assert_array_equal(a, b)  # deterministic per key
    assert a.shape == (count,)
    assert np.unique(a).size == count  # distinct
    assert np.all(np.diff(a) > 0)  # sorted
    assert a.min() >= 0 and a.max() < num_units
    if count < num_units:
        others = [decay.select_random_k(jax.random.key(s), num_units, k) for s in range(4, 8)]
        assert any(not np.array_equal(a, o) for o in others)


def test_select_random_k_is_roughly_uniform():
    counts = np.zeros(10)
    for seed in range(200):
        counts[decay.select_random_k(jax.random.key(seed), 10, 3)] += 1
    # 600 draws over 10 units: 60 expected per unit.
    assert counts.sum() == 600
    assert counts.min() > 30 and counts.max() < 90


def test_select_random_k_errors():
    with pytest.raises(ValueError, match="top_k"):
        decay.select_random_k(jax.random.key(0), 5, 6)
    with pytest.raises(ValueError, match="count or a fraction"):
        decay.select_random_k(jax.random.key(0), 5, True)


# ---------------------------------------------------------------- decay
@pytest.mark.parametrize(
    "granularity, selected, lam, dt, steps",
    [
        ("weight", [0, 5, 71, 72, 80, 83, 90], 0.1, 1.0, 7),
        ("weight", [3], 0.5, 0.3, 5),
        ("filter", [1, 3, 5], 0.05, 1.0, 5),
        ("filter", [0, 1, 2, 3, 4, 5, 6, 7, 8], 2.0, 0.25, 3),
        ("filter", [2], 0.1, 1.0, 1),
    ],
)
def test_decay_closed_form(granularity, selected, lam, dt, steps):
    params = _params()
    mask = _mask(params, granularity, selected)
    out = decay.decay(params, mask, lam, dt, steps)
    factor = math.exp(-lam * dt * steps)
    # Selected entries: theta0 * exp(-lambda * dt * T), computed in float64.
    for p, m, o in zip(
        jax.tree.leaves(params), jax.tree.leaves(mask), jax.tree.leaves(out), strict=True
    ):
        p, m, o = np.asarray(p), np.asarray(m), np.asarray(o)
        assert o.dtype == np.float32
        np.testing.assert_allclose(o[m], p[m].astype(np.float64) * factor, rtol=1e-6, atol=0)
        # Unselected entries: bit-identical.
        np.testing.assert_array_equal(o[~m].view(np.uint32), p[~m].view(np.uint32))
    unselected = lambda tree: jax.tree.map(lambda a, m: jnp.where(m, 0.0, a), tree, mask)
    chex.assert_trees_all_equal(unselected(out), unselected(params))
    assert sum(int(np.sum(m)) for m in jax.tree.leaves(mask)) > 0


def test_decay_step_is_one_float32_multiply():
    params = _params(1)
    mask = _mask(params, "filter", [0, 4, 7])
    out = decay.decay_step(params, mask, 0.3, 0.5)
    f = np.float32(math.exp(-0.15))
    assert decay.decay_factor(0.3, 0.5) == pytest.approx(math.exp(-0.15), rel=1e-15)
    expected = jax.tree.map(
        lambda p, m: np.where(np.asarray(m), np.asarray(p) * f, np.asarray(p)), params, mask
    )
    chex.assert_trees_all_equal(out, expected)


def test_decay_steps_compose():
    params = _params(2)
    mask = _mask(params, "weight", np.arange(0, 90, 3))
    three = decay.decay(params, mask, 0.2, 1.0, 3)
    one_by_one = params
    for _ in range(3):
        one_by_one = decay.decay_step(one_by_one, mask, 0.2, 1.0)
    chex.assert_trees_all_equal(three, one_by_one)


def test_lambda_zero_and_zero_steps_change_nothing():
    params = _params()
    mask = _mask(params, "filter", np.arange(9))  # every unit
    chex.assert_trees_all_equal(decay.decay(params, mask, 0.0, 1.0, 5), params)
    chex.assert_trees_all_equal(decay.decay(params, mask, 0.7, 1.0, 0), params)
    no_units = _mask(params, "weight", [])
    chex.assert_trees_all_equal(decay.decay(params, no_units, 0.7, 1.0, 4), params)


def test_decay_does_not_modify_inputs():
    params = _params()
    before = jax.tree.map(np.array, params)
    decay.decay(params, _mask(params, "filter", [0, 1]), 1.0, 1.0, 2)
    chex.assert_trees_all_equal(params, before)


@pytest.mark.parametrize(
    "lam, dt, steps, match",
    [
        (-0.1, 1.0, 1, "lambda"),
        (float("inf"), 1.0, 1, "lambda"),
        (float("nan"), 1.0, 1, "lambda"),
        (0.1, 0.0, 1, "dt"),
        (0.1, -1.0, 1, "dt"),
        (0.1, float("inf"), 1, "dt"),
        (0.1, float("nan"), 1, "dt"),
        (0.1, 1.0, -1, "decay_steps"),
        (0.1, 1.0, 1.5, "decay_steps"),
        (0.1, 1.0, True, "decay_steps"),
    ],
)
def test_decay_argument_errors(lam, dt, steps, match):
    params = _params()
    mask = _mask(params, "filter", [0])
    with pytest.raises(ValueError, match=match):
        decay.check_decay_args(lam, dt, steps)
    with pytest.raises(ValueError, match=match):
        decay.decay(params, mask, lam, dt, steps)
    if match != "decay_steps":
        with pytest.raises(ValueError, match=match):
            decay.decay_step(params, mask, lam, dt)
        with pytest.raises(ValueError, match=match):
            decay.decay_factor(lam, dt)


def test_mask_structure_mismatch():
    params = _params()
    mask = _mask(params, "filter", [0])
    missing = {k: v for k, v in mask.items() if k != "out"}
    with pytest.raises(ValueError, match="mask structure"):
        decay.decay_step(params, missing, 0.1, 1.0)
    with pytest.raises(ValueError, match="mask structure"):
        decay.decay(params, missing, 0.1, 1.0, 2)
    wrong_shape = jax.tree.map(lambda m: m, mask)
    wrong_shape["dense"]["bias"] = jnp.zeros(4, bool)
    with pytest.raises(ValueError, match="mask leaf shape"):
        decay.decay_step(params, wrong_shape, 0.1, 1.0)


# ---------------------------------------------------------------- tracing
def test_decay_step_traces_once_per_shape():
    # A tree with shapes no other test uses, so the first call compiles exactly once.
    params = {"odd": {"kernel": jnp.ones((3, 7, 11)), "bias": jnp.ones(13)}}
    mask = jax.tree.map(lambda p: jnp.asarray(np.arange(p.size).reshape(p.shape) % 2 == 0), params)
    before = decay._decay_step._cache_size()
    out = decay.decay_step(params, mask, 0.1, 1.0)
    assert decay._decay_step._cache_size() == before + 1
    # New lambdas, dts and inputs of the same shapes reuse the compiled step.
    for lam, dt in [(0.2, 1.0), (0.0, 0.5), (3.0, 2.0)]:
        out = decay.decay_step(out, mask, lam, dt)
    out = decay.decay(out, mask, 0.1, 1.0, 4)
    assert decay._decay_step._cache_size() == before + 1
    expected = np.exp(-(0.1 + 0.2 + 0.0 + 6.0 + 0.4))
    np.testing.assert_allclose(out["odd"]["bias"][::2], expected, rtol=1e-5)
    np.testing.assert_array_equal(out["odd"]["bias"][1::2], 1.0)
    # A new shape compiles once more.
    params2 = {"odd": {"kernel": jnp.ones((3, 7, 12)), "bias": jnp.ones(13)}}
    mask2 = jax.tree.map(lambda p: jnp.ones(p.shape, bool), params2)
    decay.decay(params2, mask2, 0.1, 1.0, 3)
    assert decay._decay_step._cache_size() == before + 2


def test_decay_under_jit_with_traced_lambda_dt_steps_and_units():
    """The issue's "decay fails under jit with a traced lambda": jit equals the eager loop."""
    params = {"d": {"kernel": jnp.arange(1.0, 7.0).reshape(2, 3), "bias": jnp.ones(3)}}
    spec = units.enumerate_units(params, "weight")

    @jax.jit
    def jitted(p, unit_ids, lam, dt, steps):
        return decay.decay(p, units.unit_mask(p, spec, unit_ids), lam, dt, steps)

    out = jitted(params, jnp.array([0, 7]), 0.5, 2.0, 3)
    expected = {
        "d": {
            "kernel": np.array([[np.exp(-3.0), 2, 3], [4, 5, 6]], np.float32),
            "bias": np.array([1, np.exp(-3.0), 1], np.float32),
        }
    }
    chex.assert_trees_all_close(out, expected, rtol=1e-6)
    eager = decay.decay(params, units.unit_mask(params, spec, np.array([0, 7])), 0.5, 2.0, 3)
    chex.assert_trees_all_close(out, eager, rtol=1e-6)
    assert out["d"]["kernel"][0, 1] == 2.0  # unselected entries untouched
    step = jax.jit(decay.decay_step)(params, units.unit_mask(params, spec, np.array([1])), 0.5, 2.0)
    assert float(step["d"]["kernel"][0, 1]) == pytest.approx(2.0 * np.exp(-1.0), rel=1e-6)
