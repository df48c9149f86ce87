"""Tests for tdu_jax.checkpoint: exact round trips, config guard, overwrite protection."""

import json

import chex
import jax
import numpy as np
import pytest

from tdu_jax import checkpoint, models


def _init(model, image_shape, seed=0):
    """Jitted init with an "rbg" key: compiles in ~1 s where threefry takes ~6 s on CPU."""
    init = jax.jit(lambda key: models.init_variables(model, key, image_shape))
    return init(jax.random.key(seed, impl="rbg"))


@pytest.mark.parametrize(
    "name, image_shape", [("lenet", (28, 28, 1)), ("resnet_tiny", (32, 32, 3))]
)
def test_round_trip_is_exact(tmp_path, name, image_shape):
    params, batch_stats = _init(models.get_model(name), image_shape)
    if batch_stats:  # distinguishable statistics
        batch_stats = jax.tree.map(lambda a: a + np.float32(0.123), batch_stats)
    config = {"model": name, "seed": 0, "widths": (1, 2)}
    root = checkpoint.save_model(tmp_path / "m", params, batch_stats, config)
    assert checkpoint.exists(root) and checkpoint.exists(tmp_path / "m")
    params2, batch_stats2, config2 = checkpoint.restore_model(tmp_path / "m", config)
    chex.assert_trees_all_equal(params2, params)
    chex.assert_trees_all_equal(batch_stats2, batch_stats)
    assert (batch_stats2 == {}) == (name == "lenet")
    assert config2 == {"model": name, "seed": 0, "widths": [1, 2]}
    assert all(isinstance(a, jax.Array) for a in jax.tree.leaves((params2, batch_stats2)))


def test_numpy_input_round_trips(tmp_path):
    params = {"dense": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}}
    checkpoint.save_model(tmp_path, params, {}, {"a": 1})
    restored, batch_stats, _ = checkpoint.restore_model(tmp_path)
    chex.assert_trees_all_equal(restored, params)
    assert batch_stats == {}


def test_config_mismatch_lists_keys(tmp_path):
    params = {"w": np.ones(3, np.float32)}
    checkpoint.save_model(tmp_path, params, {}, {"model": "lenet", "epochs": 5, "lr": 0.1})
    with pytest.raises(ValueError) as err:
        checkpoint.restore_model(tmp_path, {"model": "lenet", "epochs": 6, "seed": 1, "lr": 0.1})
    message = str(err.value)
    assert "epochs: saved=5 expected=6" in message
    assert "seed: saved='<missing>' expected=1" in message
    assert "lr" not in message.split("config:")[1].split("Use")[0]
    assert "--workdir" in message


def test_overwrite_protection(tmp_path):
    checkpoint.save_model(tmp_path, {"w": np.zeros(2, np.float32)}, {}, {"v": 1})
    with pytest.raises(FileExistsError, match="overwrite"):
        checkpoint.save_model(tmp_path, {"w": np.ones(2, np.float32)}, {}, {"v": 2})
    params, _, config = checkpoint.restore_model(tmp_path)
    np.testing.assert_array_equal(params["w"], np.zeros(2))
    checkpoint.save_model(tmp_path, {"w": np.ones(2, np.float32)}, {}, {"v": 2}, overwrite=True)
    params, _, config = checkpoint.restore_model(tmp_path, {"v": 2})
    np.testing.assert_array_equal(params["w"], np.ones(2))
    assert json.loads((tmp_path / "config.json").read_text()) == {"v": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "config.json"]


def test_exists_and_missing(tmp_path):
    assert not checkpoint.exists(tmp_path)
    assert not checkpoint.exists(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError):
        checkpoint.restore_model(tmp_path)


def test_config_key_stable_and_sensitive():
    a = {"model": "resnet18", "epochs": 20, "lr": 0.1, "classes": (8,)}
    b = {"classes": [8], "lr": 0.1, "epochs": 20, "model": "resnet18"}
    assert checkpoint.config_key(a) == checkpoint.config_key(b)
    assert len(checkpoint.config_key(a)) == 16
    assert checkpoint.config_key(a) != checkpoint.config_key({**a, "epochs": 21})
    assert checkpoint.config_key(a) != checkpoint.config_key({**a, "lr": 0.1000001})
    # Pinned: the hash must not change between versions (it names on-disk models).
    assert checkpoint.config_key({"a": 1}) == "015abd7f5cc57a2d"
