"""Tests for tdu_jax.models: parameter counts, shapes, stage decomposition, named layers."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tdu_jax import models


def _init(model, image_shape, seed=0):
    """Jitted init with an "rbg" key: compiles in ~1 s where threefry takes ~6 s on CPU."""
    init = jax.jit(lambda key: models.init_variables(model, key, image_shape))
    return init(jax.random.key(seed, impl="rbg"))


def _count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def test_lenet_parameter_count_and_shapes():
    model = models.get_model("lenet")
    params, batch_stats = models.init_variables(model, jax.random.key(0), (28, 28, 1))
    assert _count(params) == 61_706
    assert batch_stats == {}
    assert params["conv1"]["kernel"].shape == (5, 5, 1, 6)
    assert params["dense1"]["kernel"].shape == (400, 120)
    out = jax.jit(model.apply)({"params": params}, jnp.zeros((3, 28, 28, 1)))
    chex.assert_shape(out, (3, 10))


def test_resnet18_parameter_count_and_named_layers():
    model = models.get_model("resnet18")
    params, batch_stats = jax.eval_shape(
        lambda k: models.init_variables(model, k, (32, 32, 3)), jax.random.key(0)
    )
    assert _count(params) == 11_173_962
    assert params["stage1_block1"]["conv1"]["kernel"].shape == (3, 3, 64, 64)
    assert params["stage2_block1"]["proj_conv"]["kernel"].shape == (1, 1, 64, 128)
    assert params["head"]["dense"]["kernel"].shape == (512, 10)
    assert batch_stats["stage4_block2"]["bn2"]["mean"].shape == (512,)
    assert set(params) == {"stem", "head"} | {
        f"stage{i}_block{j}" for i in range(1, 5) for j in (1, 2)
    }


def test_resnet_tiny_output_shape_and_dtype():
    model = models.get_model("resnet_tiny", num_classes=7)
    params, batch_stats = _init(model, (32, 32, 3), 0)
    assert batch_stats  # BatchNorm statistics exist
    out = jax.jit(model.apply)(
        {"params": params, "batch_stats": batch_stats}, jnp.ones((2, 32, 32, 3))
    )
    chex.assert_shape(out, (2, 7))
    assert out.dtype == jnp.float32


def test_resnet_bfloat16_compute_gives_float32_logits():
    model = models.get_model("resnet_tiny", dtype=jnp.bfloat16)
    params, batch_stats = _init(model, (32, 32, 3), 0)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
    out = jax.jit(model.apply)(
        {"params": params, "batch_stats": batch_stats}, jnp.ones((2, 32, 32, 3))
    )
    assert out.dtype == jnp.float32


@pytest.mark.parametrize(
    "name, image_shape", [("lenet", (28, 28, 1)), ("resnet_tiny", (32, 32, 3))]
)
def test_apply_stages_equals_apply(name, image_shape):
    model = models.get_model(name)
    params, batch_stats = _init(model, image_shape, 1)
    if batch_stats:  # non-trivial running statistics, so train=False matters
        batch_stats = jax.tree.map(
            lambda a: a + 0.1 * jax.random.uniform(jax.random.key(2), a.shape), batch_stats
        )
    x = jax.random.normal(jax.random.key(3), (4, *image_shape))
    expected = jax.jit(model.apply)({"params": params, "batch_stats": batch_stats}, x)
    apply_stages = jax.jit(models.apply_stages, static_argnums=(0, 4, 5))
    staged = apply_stages(model.stages(), params, batch_stats, x)
    chex.assert_trees_all_close(staged, expected, rtol=1e-5, atol=1e-5)
    # A prefix then the rest equals the whole.
    mid = apply_stages(model.stages(), params, batch_stats, x, 0, 2)
    rest = apply_stages(model.stages(), params, batch_stats, mid, 2, None)
    chex.assert_trees_all_close(rest, expected, rtol=1e-5, atol=1e-5)


def test_stage_names_match_params():
    for name, shape in [("lenet", (28, 28, 1)), ("resnet_tiny", (32, 32, 3))]:
        model = models.get_model(name)
        params, _ = _init(model, shape, 0)
        assert sorted(s.name for s in model.stages()) == sorted(params)


def test_get_model_errors():
    with pytest.raises(ValueError, match="lenet"):
        models.get_model("vgg")
    with pytest.raises(ValueError, match="width"):
        models.get_model("resnet18", width=0.0)


@pytest.mark.parametrize("padding, offset", [("same", 1), ("symmetric", 0)])
def test_stride2_conv_padding_centres(padding, offset):
    # A 3x3 stride-2 conv whose kernel is 1 at the centre tap copies input pixel (2i + offset):
    # Flax's SAME pads only after, so it reads 2i+1 while the 1x1 shortcut reads 2i.
    from tdu_jax.models import resnet

    conv = resnet._conv(1, (3, 3), (2, 2), padding=resnet._pad3x3(padding))
    kernel = jnp.zeros((3, 3, 1, 1)).at[1, 1, 0, 0].set(1.0)
    x = jnp.arange(64.0).reshape(1, 8, 8, 1)
    y = conv.apply({"params": {"kernel": kernel}}, x)
    np.testing.assert_array_equal(y[0, :, :, 0], x[0, offset::2, offset::2, 0])


def test_symmetric_padding_same_parameters_other_function():
    same = models.get_model("resnet_tiny")
    symmetric = models.get_model("resnet_tiny", conv_padding="symmetric")
    params, batch_stats = _init(same, (32, 32, 3))
    chex.assert_trees_all_equal_shapes(params, _init(symmetric, (32, 32, 3))[0])
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    variables = {"params": params, "batch_stats": batch_stats}
    a, b = same.apply(variables, x), symmetric.apply(variables, x)
    assert not np.allclose(a, b)  # the stride-2 convs read other pixels
    with pytest.raises(ValueError, match="conv_padding must be one of same, symmetric"):
        models.get_model("resnet18", conv_padding="valid")
