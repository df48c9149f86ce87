"""Tests for tdu_jax.train: optimizer configs, jitted step, batch stream, determinism."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tdu_jax import data, models, train

_ADAM = train.OptimizerConfig(
    name="adam", learning_rate=1e-3, weight_decay=0.0, schedule="constant"
)
_SGD = train.OptimizerConfig(learning_rate=0.05, schedule="cosine")


def _init(model, image_shape, seed=0):
    """Jitted init with an "rbg" key: compiles in ~1 s where threefry takes ~6 s on CPU."""
    init = jax.jit(lambda key: models.init_variables(model, key, image_shape))
    return init(jax.random.key(seed, impl="rbg"))


@pytest.fixture(scope="module")
def mnist(tfds_dir):
    """The first 1,024 MNIST test images."""
    return data.take(data.load_split("mnist", "test", data_dir=tfds_dir), 1024)


@pytest.fixture(scope="module")
def lenet():
    model = models.get_model("lenet")
    params, batch_stats = _init(model, (28, 28, 1), 0)
    return model, params, batch_stats


def _state(model, params, batch_stats, config=_ADAM, total_steps=100):
    tx = train.make_optimizer(config, total_steps)
    params, batch_stats = jax.tree.map(jnp.copy, (params, batch_stats))
    return train.create_train_state(model, params, batch_stats, tx)


def _random_cifar(n, key=0):
    rng = np.random.default_rng(key)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    return data.Split(images, rng.integers(0, 10, n).astype(np.int32))


@pytest.mark.parametrize(
    "field, value",
    [
        ("name", "rmsprop"),
        ("schedule", "step"),
        ("learning_rate", 0.0),
        ("learning_rate", float("nan")),
        ("momentum", 1.0),
        ("momentum", -0.1),
        ("weight_decay", -1e-4),
        ("warmup_steps", -1),
        ("warmup_steps", 1.5),
        ("label_smoothing", 1.0),
    ],
)
def test_bad_config_names_field(field, value):
    config = train.OptimizerConfig()._replace(**{field: value})
    with pytest.raises(ValueError, match=f"OptimizerConfig.{field}"):
        train.validate_optimizer_config(config)
    with pytest.raises(ValueError, match=field):
        train.make_optimizer(config, 10)


def test_default_config_first_step_by_hand():
    # Defaults: SGD, lr 0.1 (cosine from the peak, no warm-up), momentum 0.9, L2 5e-4.
    config = train.OptimizerConfig()
    train.validate_optimizer_config(config)
    tx = train.make_optimizer(config, 10)
    params = {"w": jnp.array([1.0, -2.0])}
    grads = {"w": jnp.array([0.5, 0.25])}
    updates, _ = tx.update(grads, tx.init(params), params)
    # First step: momentum trace = gradient + 5e-4 * param; update = -lr(0) * trace.
    expected = -0.1 * (np.array([0.5, 0.25]) + 5e-4 * np.array([1.0, -2.0]))
    np.testing.assert_allclose(updates["w"], expected, rtol=1e-6)


def test_warmup_longer_than_schedule_is_an_error():
    with pytest.raises(ValueError, match="warmup_steps"):
        train.make_optimizer(train.OptimizerConfig(warmup_steps=10), total_steps=10)


@pytest.mark.parametrize("schedule", ["constant", "cosine", "onecycle"])
def test_schedules(schedule):
    config = train.OptimizerConfig(learning_rate=0.2, schedule=schedule, warmup_steps=0)
    lr = train.learning_rate_schedule(config, 100)
    values = np.array([float(lr(s)) for s in range(101)])
    assert values.max() == pytest.approx(0.2, rel=1e-5)
    if schedule == "constant":
        np.testing.assert_allclose(values, 0.2)
    elif schedule == "cosine":
        assert values[0] == pytest.approx(0.2) and values[100] == pytest.approx(0.0, abs=1e-9)
        assert np.all(np.diff(values) <= 1e-9)
    else:  # warmup over 15% of the steps, from peak/25 to the peak, then down to peak/1e4
        assert values[0] == pytest.approx(0.2 / 25) and int(np.argmax(values)) == 15
        assert values[100] == pytest.approx(0.2 / 1e4, rel=1e-3)


def test_sgd_weight_decay_is_l2_on_gradient():
    config = train.OptimizerConfig(
        learning_rate=0.1, momentum=0.0, weight_decay=0.5, schedule="constant"
    )
    tx = train.make_optimizer(config, 10)
    params = {"w": jnp.array([2.0, -4.0])}
    grads = {"w": jnp.array([1.0, 1.0])}
    updates, _ = tx.update(grads, tx.init(params), params)
    # -lr * (g + wd * w)
    np.testing.assert_allclose(updates["w"], [-0.1 * (1 + 1.0), -0.1 * (1 - 2.0)], rtol=1e-6)


def test_few_steps_lower_the_loss(mnist, lenet):
    model, params, batch_stats = lenet
    state = _state(model, params, batch_stats)
    step = train.make_train_step("mnist", False)
    images, labels = mnist.images[:256], mnist.labels[:256]
    losses = []
    for i in range(15):
        state, m = step(state, images, labels, jax.random.key(i))
        losses.append(float(m["loss"]))
    assert losses[-1] < 0.7 * losses[0]
    assert int(state.step) == 15
    chex.assert_tree_all_finite(state.params)


def test_train_step_matches_reference_sgd(mnist, lenet):
    """One jitted step equals a hand-written SGD step on the same loss."""
    model, params, batch_stats = lenet
    config = train.OptimizerConfig(
        learning_rate=0.1, momentum=0.0, weight_decay=0.0, schedule="constant"
    )
    state = _state(model, params, batch_stats, config)
    images, labels = mnist.images[:32], mnist.labels[:32]
    new_state, m = train.make_train_step("mnist", False)(state, images, labels, jax.random.key(0))

    def loss_fn(p):
        logits = model.apply({"params": p}, data.to_float(images, "mnist"), train=False)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
    expected = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
    assert float(m["loss"]) == pytest.approx(float(loss), rel=1e-5)
    chex.assert_trees_all_close(new_state.params, expected, rtol=1e-5, atol=1e-6)


def test_train_batches_is_deterministic(mnist, lenet):
    model, params, batch_stats = lenet
    kwargs = dict(batch_size=64, dataset="mnist", augment=False)
    key = jax.random.key(7)
    s1, m1 = train.train_batches(_state(model, params, batch_stats), mnist, key, 5, **kwargs)
    s2, m2 = train.train_batches(_state(model, params, batch_stats), mnist, key, 5, **kwargs)
    chex.assert_trees_all_equal(s1.params, s2.params)
    assert m1["loss"] == m2["loss"]
    s3, _ = train.train_batches(
        _state(model, params, batch_stats), mnist, jax.random.key(8), 5, **kwargs
    )
    assert not np.array_equal(s1.params["dense3"]["kernel"], s3.params["dense3"]["kernel"])


def test_train_batches_counts_and_continues_the_stream(mnist, lenet):
    model, params, batch_stats = lenet
    kwargs = dict(batch_size=100, dataset="mnist", augment=False)
    key = jax.random.key(3)
    calls = []
    # 12 batches cross an epoch boundary (10 batches of 100 per epoch of 1,024).
    whole, m = train.train_batches(
        _state(model, params, batch_stats),
        mnist,
        key,
        12,
        progress=lambda done, total, metrics: calls.append((done, total, metrics)),
        **kwargs,
    )
    assert m["batches"] == 12 and int(whole.step) == 12
    assert calls[-1][:2] == (12, 12) and {"loss", "images_per_s", "eta_s"} <= set(calls[-1][2])
    part, m1 = train.train_batches(_state(model, params, batch_stats), mnist, key, 7, **kwargs)
    part, m2 = train.train_batches(part, mnist, key, 5, start_batch=7, **kwargs)
    assert (m1["batches"], m2["batches"], int(part.step)) == (7, 5, 12)
    chex.assert_trees_all_equal(part.params, whole.params)
    chex.assert_trees_all_equal(part.opt_state, whole.opt_state)


def test_train_batches_zero_batches(mnist, lenet):
    model, params, batch_stats = lenet
    state, m = train.train_batches(
        _state(model, params, batch_stats),
        mnist,
        jax.random.key(0),
        0,
        batch_size=64,
        dataset="mnist",
        augment=False,
    )
    assert m["batches"] == 0 and np.isnan(m["loss"]) and int(state.step) == 0


def test_jitted_steps_trace_once(mnist, lenet, monkeypatch):
    model, params, batch_stats = lenet
    traces = []
    original = train.train_step

    def counting_step(*args, **kwargs):
        traces.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(train, "train_step", counting_step)
    # A label smoothing no other test uses: fresh cache entries that see the counting step.
    config = _ADAM._replace(label_smoothing=0.0123)
    assert train.make_train_step("mnist", False, 0.0123) is train.make_train_step(
        "mnist", False, 0.0123
    )
    state = _state(model, params, batch_stats, config)
    step = train.make_train_step("mnist", False, 0.0123)
    for i in range(3):
        state, _ = step(state, mnist.images[:32], mnist.labels[:32], jax.random.key(i))
    assert len(traces) == 1
    traces.clear()
    kwargs = dict(batch_size=32, dataset="mnist", augment=False, label_smoothing=0.0123)
    for start, n in [(0, 3), (3, 4), (7, 2)]:  # different lengths and offsets: no retrace
        state, _ = train.train_batches(
            state, mnist, jax.random.key(0), n, start_batch=start, **kwargs
        )
    # A fresh state from an equal config (the optimizer is cached) reuses the compiled step.
    assert train.make_optimizer(config, 100) is train.make_optimizer(config._replace(), 100)
    fresh = _state(model, params, batch_stats, config)
    train.train_batches(fresh, mnist, jax.random.key(1), 2, **kwargs)
    assert len(traces) == 1


def test_resnet_tiny_step_updates_batch_stats():
    model = models.get_model("resnet_tiny")
    params, batch_stats = _init(model, (32, 32, 3))
    split = _random_cifar(16)
    state = _state(model, params, batch_stats, _SGD)
    state, m = train.make_train_step("cifar10", True)(
        state, split.images, split.labels, jax.random.key(1)
    )
    chex.assert_trees_all_equal_structs(state.batch_stats, batch_stats)
    before = batch_stats["stem"]["bn"]["mean"]
    after = state.batch_stats["stem"]["bn"]["mean"]
    assert not np.allclose(before, after)
    assert np.isfinite(float(m["loss"])) and 0.0 <= float(m["accuracy"]) <= 100.0
    chex.assert_trees_all_equal_shapes(state.params, params)


def test_train_and_fine_tune_leave_inputs_intact(mnist, lenet):
    model, params, batch_stats = lenet
    saved = jax.tree.map(np.array, params)
    small = data.take(mnist, 256)
    p1, bs1, history = train.train(
        model,
        params,
        batch_stats,
        small,
        dataset="mnist",
        config=_ADAM,
        epochs=2,
        batch_size=64,
        key=jax.random.key(0),
        eval_split=small,
    )
    assert [h["epoch"] for h in history] == [1, 2]
    assert {"loss", "train_acc", "test_acc", "seconds", "images_per_s"} <= set(history[0])
    assert bs1 == {}
    # The caller's params are neither donated nor changed.
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, params), saved)
    # train == train_batches on a fresh state with a schedule over all steps.
    state = _state(model, params, batch_stats, _ADAM, total_steps=8)
    state, _ = train.train_batches(
        state, small, jax.random.key(0), 8, batch_size=64, dataset="mnist", augment=False
    )
    chex.assert_trees_all_equal(p1, state.params)

    p2, _, m = train.fine_tune(
        model,
        p1,
        bs1,
        small,
        dataset="mnist",
        config=_ADAM,
        num_batches=3,
        batch_size=64,
        key=jax.random.key(1),
        start_batch=2,
        total_batches=10,
    )
    assert m["batches"] == 3
    assert not np.array_equal(p2["dense3"]["kernel"], p1["dense3"]["kernel"])
    with pytest.raises(ValueError, match="total_batches"):
        train.fine_tune(
            model,
            p1,
            bs1,
            small,
            dataset="mnist",
            config=_ADAM,
            num_batches=3,
            batch_size=64,
            key=jax.random.key(1),
            start_batch=8,
            total_batches=10,
        )


def test_fine_tune_continues_schedule_and_stream(mnist, lenet):
    """Without momentum the optimizer is stateless, so chunks of fine-tuning equal one run."""
    model, params, batch_stats = lenet
    config = train.OptimizerConfig(learning_rate=0.05, momentum=0.0, schedule="cosine")
    kwargs = dict(dataset="mnist", config=config, batch_size=64, key=jax.random.key(5))
    p, bs = params, batch_stats
    for start in (0, 2, 4):
        p, bs, m = train.fine_tune(
            model, p, bs, mnist, num_batches=2, start_batch=start, total_batches=6, **kwargs
        )
        assert m["batches"] == 2
    whole, _, _ = train.fine_tune(model, params, batch_stats, mnist, num_batches=6, **kwargs)
    chex.assert_trees_all_close(p, whole, rtol=1e-6, atol=1e-7)
    # The schedule really moved on: restarting it each time gives other parameters.
    restarted = params
    for start in (0, 2, 4):
        restarted, _, _ = train.fine_tune(
            model, restarted, {}, mnist, num_batches=2, start_batch=start, **kwargs
        )
    assert not np.allclose(restarted["dense3"]["kernel"], p["dense3"]["kernel"])


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_weight_decay_on_kernels_only(name):
    # Zero gradients: the update is the decay alone (first step, constant lr 0.1, wd 0.5).
    config = train.OptimizerConfig(name=name, learning_rate=0.1, momentum=0.0, weight_decay=0.5,
                                   schedule="constant", decay_norm_and_bias=False)  # fmt: skip
    params = {"kernel": jnp.full((2, 2), 2.0), "bias": jnp.array([4.0]),
              "bn": {"scale": jnp.array([3.0])}}  # fmt: skip
    tx = train.make_optimizer(config, 10)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    np.testing.assert_allclose(updates["kernel"], -0.1 * 0.5 * 2.0, rtol=1e-6)  # both: lr*wd*w
    np.testing.assert_array_equal(updates["bias"], 0.0)
    np.testing.assert_array_equal(updates["bn"]["scale"], 0.0)
    everything = train.make_optimizer(config._replace(decay_norm_and_bias=True), 10)
    updates, _ = everything.update(zeros, everything.init(params), params)
    np.testing.assert_allclose(updates["bias"], -0.1 * 0.5 * 4.0, rtol=1e-6)


def test_nesterov_two_steps_by_hand():
    config = train.OptimizerConfig(learning_rate=0.1, momentum=0.9, weight_decay=0.0,
                                   schedule="constant", nesterov=True)  # fmt: skip
    tx = train.make_optimizer(config, 10)
    params = {"w": jnp.array([0.0])}
    state = tx.init(params)
    got = []
    for g in (1.0, 2.0):
        updates, state = tx.update({"w": jnp.array([g])}, state, params)
        got.append(float(updates["w"][0]))
    # trace t = g + 0.9 t_prev; Nesterov step -lr (g + 0.9 t): t1 = 1, t2 = 2.9.
    np.testing.assert_allclose(got, [-0.1 * (1 + 0.9), -0.1 * (2 + 0.9 * 2.9)], rtol=1e-6)
    with pytest.raises(ValueError, match="OptimizerConfig.nesterov needs name 'sgd'"):
        train.make_optimizer(_ADAM._replace(nesterov=True), 10)
    with pytest.raises(ValueError, match="OptimizerConfig.nesterov needs"):
        train.make_optimizer(config._replace(momentum=0.0), 10)
