"""Tests for tdu_jax.units: unit numbering, masks, names, ablation."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tdu_jax import models, units


def _tiny_params():
    """Three layers (sorted: block/conv1, dense, nobias) and a BatchNorm paired with conv1.

    ``block/conv2`` has a BatchNorm of the wrong width, so it is never paired.
    """
    f = lambda *shape: jnp.arange(1, 1 + int(np.prod(shape)), dtype=jnp.float32).reshape(shape)
    return {
        "dense": {"kernel": f(2, 3), "bias": f(3)},
        "block": {
            "conv1": {"kernel": f(1, 1, 2, 2)},
            "bn1": {"scale": f(2), "bias": f(2)},
            "conv2": {"kernel": f(1, 1, 2, 3)},
            "bn2": {"scale": f(2), "bias": f(2)},
        },
        "nobias": {"kernel": f(2, 2)},
    }


def _zeros_like_tiny():
    return jax.tree.map(lambda p: np.zeros(p.shape, bool), _tiny_params())


def _bool_arrays(tree):
    """Nested dicts of (nested) lists -> the same dicts of bool numpy arrays."""
    if isinstance(tree, dict):
        return {k: _bool_arrays(v) for k, v in tree.items()}
    return np.asarray(tree, bool)


# ---------------------------------------------------------------- enumeration
def test_tiny_enumeration_weight():
    spec = units.enumerate_units(_tiny_params(), "weight")
    # (path, kernel shape, bias size, bn path, offset, units), in sorted-key order.
    assert [tuple(layer) for layer in spec.layers] == [
        (("block", "conv1"), (1, 1, 2, 2), 0, None, 0, 4),
        (("block", "conv2"), (1, 1, 2, 3), 0, None, 4, 6),
        (("dense",), (2, 3), 3, None, 10, 9),
        (("nobias",), (2, 2), 0, None, 19, 4),
    ]
    assert spec.num_units == 23
    assert spec.granularity == "weight"
    assert [layer.name for layer in spec.layers] == [
        "block/conv1",
        "block/conv2",
        "dense",
        "nobias",
    ]


@pytest.mark.parametrize("include_bn", [True, False])
def test_tiny_enumeration_filter(include_bn):
    spec = units.enumerate_units(_tiny_params(), "filter", include_bn=include_bn)
    bn = ("block", "bn1") if include_bn else None
    assert [tuple(layer) for layer in spec.layers] == [
        (("block", "conv1"), (1, 1, 2, 2), 0, bn, 0, 2),
        (("block", "conv2"), (1, 1, 2, 3), 0, None, 2, 3),  # bn2 has 2 channels, not 3
        (("dense",), (2, 3), 3, None, 5, 3),  # no "conv" in the name: no pairing
        (("nobias",), (2, 2), 0, None, 8, 2),
    ]
    assert spec.num_units == 10
    assert spec.include_bn is include_bn


def _lenet_params():
    model = models.get_model("lenet")
    return jax.eval_shape(
        lambda k: models.init_variables(model, k, (28, 28, 1)), jax.random.key(0)
    )[0]


def _resnet_tiny_params():
    model = models.get_model("resnet_tiny")
    return jax.eval_shape(
        lambda k: models.init_variables(model, k, (32, 32, 3)), jax.random.key(0)
    )[0]


def test_lenet_unit_counts():
    params = _lenet_params()
    weight = units.enumerate_units(params, "weight")
    assert weight.num_units == 61_706  # every LeNet parameter is a weight unit
    assert [layer.name for layer in weight.layers] == [
        "conv1",
        "conv2",
        "dense1",
        "dense2",
        "dense3",
    ]
    assert [layer.num_units for layer in weight.layers] == [
        5 * 5 * 1 * 6 + 6,
        5 * 5 * 6 * 16 + 16,
        400 * 120 + 120,
        120 * 84 + 84,
        84 * 10 + 10,
    ]
    filt = units.enumerate_units(params, "filter")
    assert filt.num_units == 6 + 16 + 120 + 84 + 10 == 236
    assert [layer.offset for layer in filt.layers] == [0, 6, 22, 142, 226]
    assert all(layer.bn_path is None for layer in filt.layers)


def test_resnet_tiny_unit_counts():
    params = _resnet_tiny_params()
    # Layers in sorted order with (kernel elements + bias, filters, paired BatchNorm).
    expected = [
        ("head/dense", 16 * 10 + 10, 10, None),
        ("stage1_block1/conv1", 3 * 3 * 8 * 8, 8, ("stage1_block1", "bn1")),
        ("stage1_block1/conv2", 3 * 3 * 8 * 8, 8, ("stage1_block1", "bn2")),
        ("stage2_block1/conv1", 3 * 3 * 8 * 16, 16, ("stage2_block1", "bn1")),
        ("stage2_block1/conv2", 3 * 3 * 16 * 16, 16, ("stage2_block1", "bn2")),
        ("stage2_block1/proj_conv", 1 * 1 * 8 * 16, 16, ("stage2_block1", "proj_bn")),
        ("stem/conv", 3 * 3 * 3 * 8, 8, ("stem", "bn")),
    ]
    weight = units.enumerate_units(params, "weight")
    filt = units.enumerate_units(params, "filter")
    no_bn = units.enumerate_units(params, "filter", include_bn=False)
    assert [layer.name for layer in weight.layers] == [e[0] for e in expected]
    assert [layer.num_units for layer in weight.layers] == [e[1] for e in expected]
    assert weight.num_units == 5122
    # BatchNorm parameters are never weight units: 5122 < the parameter count.
    assert weight.num_units < sum(np.prod(x.shape) for x in jax.tree.leaves(params))
    assert [layer.num_units for layer in filt.layers] == [e[2] for e in expected]
    assert filt.num_units == 82
    assert [layer.bn_path for layer in filt.layers] == [e[3] for e in expected]
    assert [layer.bn_path for layer in no_bn.layers] == [None] * len(expected)
    assert [layer.bn_path for layer in weight.layers] == [None] * len(expected)
    np.testing.assert_array_equal(
        [layer.offset for layer in filt.layers], np.cumsum([0] + [e[2] for e in expected])[:-1]
    )


@pytest.mark.parametrize(
    "include, exclude, names",
    [
        ("dense", None, ["dense"]),
        ("^block/", None, ["block/conv1", "block/conv2"]),
        (None, "conv", ["dense", "nobias"]),
        ("conv|dense", "conv2$", ["block/conv1", "dense"]),
        (None, None, ["block/conv1", "block/conv2", "dense", "nobias"]),
    ],
)
def test_include_exclude(include, exclude, names):
    spec = units.enumerate_units(_tiny_params(), "weight", include=include, exclude=exclude)
    assert [layer.name for layer in spec.layers] == names
    # Offsets are renumbered over the kept layers only.
    sizes = [layer.num_units for layer in spec.layers]
    assert [layer.offset for layer in spec.layers] == list(np.cumsum([0] + sizes)[:-1])
    assert spec.num_units == sum(sizes)


@pytest.mark.parametrize("include, exclude", [("nothing", None), (None, ".")])
def test_no_layer_left_is_an_error(include, exclude):
    with pytest.raises(ValueError, match="no layer with units"):
        units.enumerate_units(_tiny_params(), "weight", include=include, exclude=exclude)


@pytest.mark.parametrize("granularity", ["neuron", "Weight", ""])
def test_unknown_granularity(granularity):
    with pytest.raises(ValueError, match="granularity must be one of weight, filter"):
        units.enumerate_units(_tiny_params(), granularity)
    with pytest.raises(ValueError, match="granularity"):
        units.check_granularity(granularity)


# ---------------------------------------------------------------- locate / names
def test_locate_and_unit_name_weight():
    spec = units.enumerate_units(_tiny_params(), "weight")
    pos, local = units.locate(spec, np.array([0, 3, 4, 9, 10, 15, 16, 18, 19, 22]))
    np.testing.assert_array_equal(pos, [0, 0, 1, 1, 2, 2, 2, 2, 3, 3])
    np.testing.assert_array_equal(local, [0, 3, 0, 5, 0, 5, 6, 8, 0, 3])
    names = {u: units.unit_name(spec, u) for u in (0, 3, 9, 10, 14, 16, 18, 22)}
    assert names == {
        0: "block/conv1/kernel[0, 0, 0, 0]",
        3: "block/conv1/kernel[0, 0, 1, 1]",
        9: "block/conv2/kernel[0, 0, 1, 2]",
        10: "dense/kernel[0, 0]",
        14: "dense/kernel[1, 1]",
        16: "dense/bias[0]",
        18: "dense/bias[2]",
        22: "nobias/kernel[1, 1]",
    }


def test_locate_and_unit_name_filter():
    spec = units.enumerate_units(_tiny_params(), "filter")
    pos, local = units.locate(spec, np.array([9, 0, 5, 2, 4]))
    np.testing.assert_array_equal(pos, [3, 0, 2, 1, 1])
    np.testing.assert_array_equal(local, [1, 0, 0, 0, 2])
    assert units.unit_name(spec, 1) == "block/conv1[filter 1]"
    assert units.unit_name(spec, 7) == "dense[filter 2]"
    assert units.unit_name(spec, 9) == "nobias[filter 1]"


@pytest.mark.parametrize("bad", [[-1], [23], [0, 100]])
def test_locate_out_of_range(bad):
    spec = units.enumerate_units(_tiny_params(), "weight")
    with pytest.raises(ValueError, match=r"unit indices must be in \[0, 23\)"):
        units.locate(spec, np.array(bad))
    with pytest.raises(ValueError, match="unit indices"):
        units.unit_mask(_tiny_params(), spec, np.array(bad))


def test_locate_empty():
    spec = units.enumerate_units(_tiny_params(), "weight")
    pos, local = units.locate(spec, np.array([], np.int64))
    assert pos.size == 0 and local.size == 0


# ---------------------------------------------------------------- masks
def test_unit_mask_weight_literal():
    params = _tiny_params()
    spec = units.enumerate_units(params, "weight")
    # conv1 kernel[0,0,0,1]; conv2 kernel[0,0,1,0]; dense kernel[1,1]; dense bias[2];
    # nobias kernel[1,0]. Unsorted and with a duplicate.
    mask = units.unit_mask(params, spec, np.array([18, 1, 14, 7, 21, 14]))
    expected = _zeros_like_tiny()
    expected["block"]["conv1"]["kernel"][0, 0, 0, 1] = True
    expected["block"]["conv2"]["kernel"][0, 0, 1, 0] = True
    expected["dense"]["kernel"][1, 1] = True
    expected["dense"]["bias"][2] = True
    expected["nobias"]["kernel"][1, 0] = True
    chex.assert_trees_all_equal(mask, expected)
    chex.assert_trees_all_equal_shapes_and_dtypes(mask, jax.tree.map(jnp.asarray, expected))
    assert sum(int(np.sum(m)) for m in jax.tree.leaves(mask)) == 5


def test_unit_mask_weight_literal_values():
    """The same mask spelled out as literal arrays."""
    params = _tiny_params()
    spec = units.enumerate_units(params, "weight")
    mask = units.unit_mask(params, spec, np.array([10, 12, 17, 19]))
    t, f = True, False
    expected = {
        "block": {
            "bn1": {"bias": [f, f], "scale": [f, f]},
            "bn2": {"bias": [f, f], "scale": [f, f]},
            "conv1": {"kernel": np.zeros((1, 1, 2, 2), bool)},
            "conv2": {"kernel": np.zeros((1, 1, 2, 3), bool)},
        },
        "dense": {"bias": [f, t, f], "kernel": [[t, f, t], [f, f, f]]},
        "nobias": {"kernel": [[t, f], [f, f]]},
    }
    expected = _bool_arrays(expected)
    chex.assert_trees_all_equal(mask, expected)


@pytest.mark.parametrize("include_bn", [True, False])
def test_unit_mask_filter_literal(include_bn):
    params = _tiny_params()
    spec = units.enumerate_units(params, "filter", include_bn=include_bn)
    # conv1 filter 1, conv2 filter 2, dense filter 0, nobias filter 1.
    mask = units.unit_mask(params, spec, np.array([9, 1, 4, 5, 1]))
    t, f = True, False
    expected = {
        "block": {
            "bn1": {"bias": [f, include_bn], "scale": [f, include_bn]},
            "bn2": {"bias": [f, f], "scale": [f, f]},
            "conv1": {"kernel": [[[[f, t], [f, t]]]]},
            "conv2": {"kernel": [[[[f, f, t], [f, f, t]]]]},
        },
        "dense": {"bias": [t, f, f], "kernel": [[t, f, f], [t, f, f]]},
        "nobias": {"kernel": [[f, t], [f, t]]},
    }
    expected = _bool_arrays(expected)
    chex.assert_trees_all_equal(mask, expected)
    chex.assert_trees_all_equal_shapes(mask, params)


def test_unit_mask_empty_and_all():
    params = _tiny_params()
    for granularity in units.GRANULARITIES:
        spec = units.enumerate_units(params, granularity, include_bn=True)
        none = units.unit_mask(params, spec, np.array([], np.int64))
        chex.assert_trees_all_equal(none, _zeros_like_tiny())
        every = units.unit_mask(params, spec, np.arange(spec.num_units))
        expected = jax.tree.map(lambda p: np.ones(p.shape, bool), params)
        # Only the unpaired BatchNorm (bn2) stays out; bn1 joins only filter units.
        expected["block"]["bn2"] = jax.tree.map(np.logical_not, expected["block"]["bn2"])
        if granularity == "weight":
            expected["block"]["bn1"] = jax.tree.map(np.logical_not, expected["block"]["bn1"])
        chex.assert_trees_all_equal(every, expected)


def test_weight_units_cover_every_entry_once():
    """Each weight unit masks exactly one entry, and all units together are a bijection."""
    params = _tiny_params()
    spec = units.enumerate_units(params, "weight")
    total = jax.tree.map(lambda p: np.zeros(p.shape, int), params)
    for u in range(spec.num_units):
        mask = units.unit_mask(params, spec, np.array([u]))
        assert sum(int(np.sum(m)) for m in jax.tree.leaves(mask)) == 1
        total = jax.tree.map(lambda t, m: t + np.asarray(m), total, mask)
    for path in (("dense", "kernel"), ("dense", "bias"), ("nobias", "kernel")):
        np.testing.assert_array_equal(units.get_path(total, path), 1)


def test_ablate_zeroes_only_the_units():
    params = _tiny_params()
    spec = units.enumerate_units(params, "filter")
    ablated = units.ablate(params, spec, np.array([1, 6]))
    expected = jax.tree.map(np.array, params)
    expected["block"]["conv1"]["kernel"][..., 1] = 0
    expected["block"]["bn1"]["scale"][1] = 0
    expected["block"]["bn1"]["bias"][1] = 0
    expected["dense"]["kernel"][:, 1] = 0
    expected["dense"]["bias"][1] = 0
    chex.assert_trees_all_equal(ablated, expected)


# ---------------------------------------------------------------- structure check
def test_check_mask_structure_accepts_matching_mask():
    params = _tiny_params()
    spec = units.enumerate_units(params, "weight")
    units.check_mask_structure(params, units.unit_mask(params, spec, np.array([0])))


def test_check_mask_structure_errors():
    params = _tiny_params()
    missing = _zeros_like_tiny()
    del missing["nobias"]
    with pytest.raises(ValueError, match="mask structure"):
        units.check_mask_structure(params, missing)
    renamed = _zeros_like_tiny()
    renamed["other"] = renamed.pop("nobias")
    with pytest.raises(ValueError, match="mask structure"):
        units.check_mask_structure(params, renamed)
    wrong_shape = _zeros_like_tiny()
    wrong_shape["dense"]["bias"] = np.zeros(4, bool)
    with pytest.raises(ValueError, match=r"mask leaf shape \(4,\) != params leaf shape \(3,\)"):
        units.check_mask_structure(params, wrong_shape)


@pytest.mark.parametrize("granularity", ["weight", "filter"])
def test_unit_mask_with_traced_units_equals_concrete(granularity):
    params = _tiny_params()
    spec = units.enumerate_units(params, granularity, include_bn=True)
    chosen = np.array([0, 3, spec.num_units - 1, 3])
    traced = jax.jit(lambda u: units.unit_mask(params, spec, u))(jnp.asarray(chosen))
    chex.assert_trees_all_equal(traced, units.unit_mask(params, spec, chosen))
    # Out-of-range traced indices select nothing (they cannot raise under jit).
    empty = jax.jit(lambda u: units.unit_mask(params, spec, u))(jnp.array([-1, spec.num_units]))
    assert not any(bool(np.any(m)) for m in jax.tree.leaves(empty))
