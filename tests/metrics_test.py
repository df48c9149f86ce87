"""Tests for tdu_jax.metrics: hand-computed accuracies, batched inference, membership inference."""

import chex
import jax
import numpy as np
import pytest

from tdu_jax import data, metrics, models


def _init(model, image_shape, seed=0):
    """Jitted init with an "rbg" key: compiles in ~1 s where threefry takes ~6 s on CPU."""
    init = jax.jit(lambda key: models.init_variables(model, key, image_shape))
    return init(jax.random.key(seed, impl="rbg"))


def _random_images(n, shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def test_accuracy_by_hand():
    assert metrics.accuracy([1, 2, 3, 4], [1, 2, 0, 0]) == 50.0
    assert metrics.accuracy(np.array([7]), np.array([7])) == 100.0
    assert np.isnan(metrics.accuracy([], []))
    with pytest.raises(ValueError, match="differ"):
        metrics.accuracy([1, 2], [1])


def test_per_class_accuracy_with_absent_class():
    labels = np.array([0, 0, 0, 1, 1, 3])
    predictions = np.array([0, 1, 0, 1, 0, 3])
    got = metrics.per_class_accuracy(predictions, labels, num_classes=4)
    np.testing.assert_allclose(got, [200 / 3, 50.0, np.nan, 100.0])


def test_forget_retain_accuracy_by_hand():
    labels = np.array([0, 0, 1, 2, 2, 2, 3, 3])
    predictions = np.array([0, 1, 1, 2, 0, 2, 3, 0])
    got = metrics.forget_retain_accuracy(predictions, labels, forget_classes=[2, 3])
    assert got["forget_acc"] == pytest.approx(100 * 3 / 5)  # 2,2,2,3,3 -> hits at 2,2,3
    assert got["retain_acc"] == pytest.approx(100 * 2 / 3)  # 0,0,1 -> hits at 0,1
    assert got["test_acc"] == pytest.approx(100 * 5 / 8)
    assert np.isnan(metrics.forget_retain_accuracy([1], [1], [5])["forget_acc"])


@pytest.mark.parametrize("n, batch_size", [(7, 3), (5, 1000), (9, 9)])
def test_predict_and_logits_match_direct_apply(n, batch_size):
    model = models.get_model("resnet_tiny")
    params, batch_stats = _init(model, (32, 32, 3))
    # Non-trivial running statistics, so evaluation mode is visible.
    batch_stats = jax.tree.map(lambda a: a + 0.3, batch_stats)
    images = _random_images(n, (32, 32, 3))
    variables = {"params": params, "batch_stats": batch_stats}
    expected = jax.jit(model.apply)(variables, data.to_float(images, "cifar10"))
    got = metrics.logits(
        model, params, batch_stats, images, dataset="cifar10", batch_size=batch_size
    )
    assert got.shape == (n, 10) and got.dtype == np.float32
    chex.assert_trees_all_close(got, np.asarray(expected), rtol=1e-5, atol=1e-5)
    predictions = metrics.predict(
        model, params, batch_stats, images, dataset="cifar10", batch_size=batch_size
    )
    assert predictions.dtype == np.int32
    np.testing.assert_array_equal(predictions, np.argmax(got, axis=-1))


def test_predict_lenet_empty_batch_stats_and_empty_input():
    model = models.get_model("lenet")
    params, batch_stats = _init(model, (28, 28, 1))
    images = _random_images(5, (28, 28, 1))
    expected = jax.jit(model.apply)({"params": params}, data.to_float(images, "mnist"))
    got = metrics.predict(model, params, batch_stats, images, dataset="mnist", batch_size=2)
    np.testing.assert_array_equal(got, np.argmax(expected, -1))
    assert metrics.predict(model, params, {}, images[:0], dataset="mnist").shape == (0,)
    assert metrics.logits(model, params, {}, images[:0], dataset="mnist").shape == (0, 10)


def test_evaluate_and_example_losses():
    model = models.get_model("lenet")
    params, batch_stats = _init(model, (28, 28, 1))
    split = data.Split(_random_images(11, (28, 28, 1), seed=1), np.arange(11, dtype=np.int32) % 10)
    result = metrics.evaluate(
        model, params, batch_stats, split, dataset="mnist", forget_classes=[0], prefix="test_"
    )
    assert set(result) == {"test_forget_acc", "test_retain_acc", "test_test_acc", "test_per_class"}
    predictions = metrics.predict(model, params, batch_stats, split.images, dataset="mnist")
    assert result["test_test_acc"] == metrics.accuracy(predictions, split.labels)
    assert len(result["test_per_class"]) == 10

    losses = metrics.example_losses(model, params, batch_stats, split, dataset="mnist")
    logits = metrics.logits(model, params, batch_stats, split.images, dataset="mnist")
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    expected = -np.asarray(log_probs)[np.arange(11), split.labels]
    np.testing.assert_allclose(losses, expected, rtol=1e-5, atol=1e-6)


def test_membership_inference_by_hand():
    # Members all below non-members: perfect attack.
    got = metrics.membership_inference([0.1, 0.2], [0.5, 0.7, 0.9])
    assert got["mia_auc"] == pytest.approx(100.0) and got["mia_acc"] == pytest.approx(100.0)
    assert got["loss_gap"] == pytest.approx(0.7 - 0.15)
    # Identical distributions (ties): chance.
    got = metrics.membership_inference([0.3, 0.3], [0.3, 0.3])
    assert got["mia_auc"] == pytest.approx(50.0) and got["mia_acc"] == pytest.approx(50.0)
    # Reference AUC from the pair count: members (1, 3), non-members (2, 4) -> 3 of 4 pairs.
    got = metrics.membership_inference([1.0, 3.0], [2.0, 4.0])
    assert got["mia_auc"] == pytest.approx(75.0)
    assert got["mia_acc"] == pytest.approx(75.0)  # threshold 1 or 3: (0.5 + 1) / 2
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=40), rng.normal(0.5, size=30)
    pairs = np.mean((a[:, None] < b[None, :]) + 0.5 * (a[:, None] == b[None, :]))
    assert metrics.membership_inference(a, b)["mia_auc"] == pytest.approx(100 * pairs)
