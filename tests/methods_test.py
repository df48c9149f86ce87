"""Tests for tdu_jax.methods: every method on one toy task, and each method's own mechanics
checked against hand-computed references (SSD's dampening, SalUn's mask, l1 schedule, KL)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tdu_jax import calibrate, data, metrics, models, train, unlearn
from tdu_jax import methods as M
from tdu_jax.methods import base, finetune, salun, scrub, ssd

NUM_CLASSES = 4
FORGET = (0,)


class TinyMLP(nn.Module):
    """784 -> 16 -> C; small enough that every method compiles in about a second."""

    num_classes: int = NUM_CLASSES

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(16, name="dense1")(x))
        return nn.Dense(self.num_classes, name="dense2")(x)


class Linear(nn.Module):
    """Softmax regression: logits = flatten(x) @ W + b (gradients have a closed form)."""

    num_classes: int = NUM_CLASSES

    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dense(self.num_classes, name="dense")(x.reshape((x.shape[0], -1)))


def _toy_split(n_per_class: int, seed: int) -> data.Split:
    """28x28x1 uint8 images: a fixed random prototype per class plus pixel noise."""
    rng = np.random.default_rng(seed)
    protos = np.random.default_rng(123).integers(0, 256, (NUM_CLASSES, 28, 28, 1))
    labels = np.repeat(np.arange(NUM_CLASSES), n_per_class)
    noise = rng.normal(0, 60, (labels.size, 28, 28, 1))
    images = np.clip(protos[labels] + noise, 0, 255).astype(np.uint8)
    order = rng.permutation(labels.size)
    return data.Split(images[order], labels[order].astype(np.int32))


def _accuracy(model, params, batch_stats, split) -> float:
    predictions = metrics.predict(model, params, batch_stats, split.images, dataset="mnist")
    return metrics.accuracy(predictions, split.labels)


@pytest.fixture(scope="module")
def toy():
    """A TinyMLP trained on 4 synthetic classes (48 each); forget class 0."""
    split = _toy_split(48, seed=0)
    forget, retain = data.forget_retain(split, FORGET)
    model = TinyMLP()
    params, batch_stats = models.init_variables(model, jax.random.key(0), (28, 28, 1))
    config = train.OptimizerConfig(name="adam", learning_rate=3e-3, weight_decay=0.0)
    params, batch_stats, _ = train.train(
        model,
        params,
        batch_stats,
        split,
        dataset="mnist",
        config=config,
        epochs=4,
        batch_size=32,
        key=jax.random.key(1),
    )
    data_in = M.MethodData(forget, retain, FORGET, NUM_CLASSES)
    return model, params, batch_stats, data_in


def _sgd(lr, wd=5e-4):
    return base.sgd(lr, wd)


# Test-sized configs: a few steps each at batch 32 (official defaults are in the config types).
TEST_CONFIGS = {
    "retrain": M.RetrainConfig(epochs=3, batch_size=32),
    "decay": M.DecayConfig(
        unlearn=unlearn.UnlearnConfig(
            granularity="filter",
            include="dense1",
            top_k=6,
            lam=3.0,
            decay_steps=3,
            evaluate_each_step=False,
            batch_size=32,
            finetune="after_all",
            finetune_batches=2,
            unit_chunk=8,
            sample_batch=64,
        ),
        importance_fraction=0.5,
    ),
    "ft": M.FTConfig(optimizer=_sgd(0.1), epochs=4, batch_size=32),
    "ga": M.GAConfig(optimizer=_sgd(0.05), epochs=4, batch_size=32),
    "neggrad_plus": M.NegGradPlusConfig(optimizer=_sgd(0.05), alpha=0.8, epochs=2, batch_size=32),
    "rl": M.RLConfig(optimizer=_sgd(0.01), epochs=2, batch_size=32),
    "l1_sparse": M.L1SparseConfig(optimizer=_sgd(0.1), alpha=1e-3, epochs=4, batch_size=32),
    "ssd": M.SSDConfig(alpha=1.0, lam=0.1, batch_size=32),
    # Large weight decay: a decay outside the mask would move every frozen weight.
    "salun": M.SalUnConfig(
        optimizer=_sgd(0.05, wd=0.05), epochs=2, batch_size=32, mask_batch_size=32
    ),
    "scrub": M.ScrubConfig(
        optimizer=_sgd(0.05),
        epochs=2,
        msteps=2,
        forget_batch_size=16,
        retain_batch_size=32,
        gamma=0.99,
        alpha=0.001,
    ),
}


# (gradient_steps, retain_batches) of TEST_CONFIGS on 48 forget / 144 retain examples at batch
# 32: 48 // 32 = 1 forget and 144 // 32 = 4 retain batches per epoch.
EXPECTED_STEPS = {
    "retrain": (3 * 4, 3 * 4),
    "decay": (2, 2),  # after_all fine-tuning batches; importance and decay take no steps
    "ft": (4 * 4, 4 * 4),
    "ga": (4 * 1, 0),
    "neggrad_plus": (2 * 4, 2 * 4),  # an epoch = retain batches, each with a forget batch
    "rl": (2 * (1 + 4), 2 * 4),
    "l1_sparse": (4 * 4, 4 * 4),
    "ssd": (0, 0),
    "salun": (2 * (1 + 4), 2 * 4),
    "scrub": (2 * 3 + 2 * 4, 2 * 4),  # forget batch 16: 3 per max epoch, epochs 0 and 1
}


_RESULTS = {}


def _run(toy, name):
    """Each method's result on the toy task with its test config, computed once per session."""
    if name not in _RESULTS:
        model, params, batch_stats, data_in = toy
        _RESULTS[name] = M.run_method(
            name, model, params, batch_stats, data_in, jax.random.key(3), TEST_CONFIGS[name],
            dataset="mnist",
        )  # fmt: skip
    return _RESULTS[name]


def test_registry_lists_every_method_with_its_config():
    assert list(M.METHODS) == [
        "retrain",
        "decay",
        "ft",
        "ga",
        "neggrad_plus",
        "rl",
        "l1_sparse",
        "ssd",
        "salun",
        "scrub",
    ]
    for name, (fn, config_type) in M.METHODS.items():
        assert callable(fn)
        assert isinstance(TEST_CONFIGS[name], config_type)
        defaults = config_type()  # every field has a documented default
        for field in ("optimizer",):
            if hasattr(defaults, field):
                train.validate_optimizer_config(getattr(defaults, field))


def test_run_method_rejects_bad_name_and_config(toy):
    model, params, batch_stats, data_in = toy
    with pytest.raises(ValueError, match="method must be one of"):
        M.run_method(
            "nope", model, params, batch_stats, data_in, jax.random.key(0), dataset="mnist"
        )
    with pytest.raises(TypeError, match="FTConfig"):
        M.run_method(
            "ft", model, params, batch_stats, data_in, jax.random.key(0), M.GAConfig(),
            dataset="mnist",
        )  # fmt: skip


@pytest.mark.parametrize("name", list(TEST_CONFIGS))
def test_method_lowers_forget_accuracy(toy, name):
    model, params, batch_stats, data_in = toy
    before = jax.tree.map(np.array, params)
    base_forget = _accuracy(model, params, batch_stats, data_in.forget_train)
    assert base_forget == 100.0  # the toy base model knows the forget class

    result = _run(toy, name)

    forget_acc = _accuracy(model, result.params, result.batch_stats, data_in.forget_train)
    assert forget_acc < base_forget - 50.0, (name, forget_acc)
    # Pure: the caller's params are untouched; result has the input's structure.
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.array, params))
    assert jax.tree.structure(result.params) == jax.tree.structure(params)
    info = result.info
    assert (data_in.forget_train.size, data_in.retain_train.size) == (48, 144)
    assert (info["gradient_steps"], info["retain_batches"]) == EXPECTED_STEPS[name]
    assert all(isinstance(info[k], int) for k in ("gradient_steps", "retain_batches"))
    assert info["seconds"] > 0


# ---------------------------------------------------------------------------------------------
# Closed-form gradients of softmax regression, the independent reference for SSD and SalUn.


def _linear_grads(params, split, batch_size):
    """numpy: per consecutive batch, (dW, db) of the batch-mean CE of logits = X W + b."""
    w = np.asarray(params["dense"]["kernel"], np.float64)
    b = np.asarray(params["dense"]["bias"], np.float64)
    x_all = (split.images.astype(np.float64) / 255.0 - 0.1307) / 0.3081
    x_all = x_all.reshape(split.size, -1)
    out = []
    for start in range(0, split.size, batch_size):
        x = x_all[start : start + batch_size]
        y = np.eye(NUM_CLASSES)[split.labels[start : start + batch_size]]
        z = x @ w + b
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        out.append(((x.T @ (p - y)) / len(x), (p - y).mean(0)))
    return out


@pytest.fixture(scope="module")
def linear():
    model = Linear()
    params, _ = models.init_variables(model, jax.random.key(5), (28, 28, 1))
    params = jax.tree.map(lambda p: p + 0.01, params)  # non-zero bias
    return model, params, _toy_split(4, seed=7)  # 16 examples


def test_ssd_dampening_two_parameter_case():
    params = {"w": jnp.array([2.0, 4.0]), "v": jnp.array([-3.0, 0.5])}
    imp_full = {"w": jnp.array([1.0, 1.0]), "v": jnp.array([0.5, 0.0])}
    imp_forget = {"w": jnp.array([20.0, 5.0]), "v": jnp.array([10.0, 0.0])}
    new, selected = ssd.dampen(params, imp_full, imp_forget, alpha=10.0, lam=1.0)
    # w0: 20 > 10 * 1 -> 2 * min(1 * 1 / 20, 1) = 0.1; w1: 5 <= 10 -> unchanged.
    # v0: 10 > 10 * 0.5 -> -3 * (0.5 / 10) = -0.15; v1: 0 > 0 is false -> unchanged.
    np.testing.assert_allclose(new["w"], [0.1, 4.0], rtol=1e-6)
    np.testing.assert_allclose(new["v"], [-0.15, 0.5], rtol=1e-6)
    np.testing.assert_array_equal(selected["w"], [True, False])
    # lambda large enough that lam * imp_D / imp_f > 1: the factor is capped at 1 (no growth).
    capped, _ = ssd.dampen(params, imp_full, imp_forget, alpha=10.0, lam=30.0)
    np.testing.assert_array_equal(capped["w"], params["w"])


def test_ssd_importance_is_mean_squared_batch_gradient(linear):
    model, params, split = linear
    imp = ssd.importance(model, params, {}, split, dataset="mnist", batch_size=6)
    grads = _linear_grads(params, split, 6)  # batches of 6, 6, 4
    assert len(grads) == 3
    np.testing.assert_allclose(
        imp["dense"]["kernel"], np.mean([g[0] ** 2 for g in grads], 0), rtol=2e-4, atol=1e-12
    )
    np.testing.assert_allclose(
        imp["dense"]["bias"], np.mean([g[1] ** 2 for g in grads], 0), rtol=2e-4, atol=1e-12
    )


@pytest.mark.parametrize("batch_size", [16, 5])
def test_salun_mask_is_median_threshold_of_forget_gradient(linear, batch_size):
    model, params, split = linear
    grads = _linear_grads(params, split, batch_size)
    g_w = np.abs(sum(-g[0] for g in grads))  # |sum over batches of grad(-CE)|
    g_b = np.abs(sum(-g[1] for g in grads))
    median = np.median(np.concatenate([g_w.ravel(), g_b.ravel()]))  # 3140 entries: even

    scores = salun.saliency(model, params, {}, split, dataset="mnist", batch_size=batch_size)
    mask = salun.saliency_mask(scores, 0.5)

    np.testing.assert_allclose(scores["dense"]["kernel"], g_w, rtol=1e-3, atol=1e-6)
    np.testing.assert_array_equal(mask["dense"]["kernel"], g_w > median)
    np.testing.assert_array_equal(mask["dense"]["bias"], g_b > median)
    assert mask["dense"]["kernel"].sum() + mask["dense"]["bias"].sum() == 3140 // 2


def test_saliency_mask_counts_and_ties():
    scores = {"a": np.array([3.0, 1.0, 2.0]), "b": np.array([[2.0], [0.0]])}
    mask = salun.saliency_mask(scores, 0.4)  # int(5 * 0.4) = 2: the 3.0 and the first 2.0
    np.testing.assert_array_equal(mask["a"], [True, False, True])
    np.testing.assert_array_equal(mask["b"], [[False], [False]])
    assert not any(m.any() for m in jax.tree.leaves(salun.saliency_mask(scores, 0.0)))
    assert all(m.all() for m in jax.tree.leaves(salun.saliency_mask(scores, 1.0)))


def test_salun_frozen_weights_are_bit_identical(toy):
    model, params, batch_stats, data_in = toy
    config = TEST_CONFIGS["salun"]
    assert config.optimizer.weight_decay > 0 and config.optimizer.momentum > 0
    result = _run(toy, "salun")
    scores = salun.saliency(
        model, params, batch_stats, data_in.forget_train, dataset="mnist", batch_size=32
    )
    mask = salun.saliency_mask(scores, config.mask_fraction)
    changed = 0
    for old, new, m in zip(
        jax.tree.leaves(params), jax.tree.leaves(result.params), jax.tree.leaves(mask), strict=True
    ):
        old, new = np.asarray(old), np.asarray(new)
        np.testing.assert_array_equal(old[~m].view(np.uint32), new[~m].view(np.uint32))
        changed += int(np.sum(old[m] != new[m]))
    assert changed > 0.9 * sum(int(m.sum()) for m in jax.tree.leaves(mask))
    assert result.info["mask_fraction_trainable"] == pytest.approx(0.5, abs=1e-4)


def test_element_masked_zeroes_decay_and_momentum_of_frozen_entries():
    params = {"w": jnp.array([1.0, -2.0, 3.0, 0.5])}
    mask = {"w": np.array([True, False, True, False])}
    inner = optax.chain(optax.add_decayed_weights(0.1), optax.sgd(0.5, momentum=0.9))
    tx = base.element_masked(inner)
    state = base.set_element_mask(tx.init(params), mask)
    ref_state = inner.init(params)
    p = params
    for step in range(3):
        g = {"w": jnp.array([0.3, -0.7, 0.2, 1.1]) * (step + 1)}
        updates, state = tx.update(g, state, p)
        ref_updates, ref_state = inner.update(g, ref_state, p)
        np.testing.assert_array_equal(updates["w"][~mask["w"]], 0.0)
        np.testing.assert_allclose(updates["w"][mask["w"]], ref_updates["w"][mask["w"]])
        p = optax.apply_updates(p, updates)
    np.testing.assert_array_equal(p["w"][~mask["w"]], params["w"][~mask["w"]])
    # Momentum of the frozen entries stayed zero (the inner chain saw zero gradient and decay).
    assert np.all(np.asarray(state.inner[1][0].trace["w"])[~mask["w"]] == 0.0)


def test_l1_schedule_decays_linearly():
    config = M.L1SparseConfig(alpha=1e-4, epochs=10, no_l1_epochs=2)
    got = [finetune.l1_alpha(config, e) for e in range(10)]
    expected = [1e-4 * (1 - e / 8) for e in range(8)] + [0.0, 0.0]
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_distill_kl_matches_hand_computation():
    s = jnp.array([[1.0, 2.0, 0.0], [0.5, 0.5, 0.5]])
    t = jnp.array([[2.0, 0.0, 1.0], [3.0, 0.0, 0.0]])
    temperature = 4.0

    def softmax(z):
        e = np.exp(np.asarray(z, np.float64) / temperature)
        return e / e.sum(1, keepdims=True)

    ps, pt = softmax(s), softmax(t)
    expected = np.sum(pt * np.log(pt / ps)) / 2 * temperature**2
    np.testing.assert_allclose(scrub.distill_kl(s, t, temperature), expected, rtol=1e-5)
    assert float(scrub.distill_kl(s, s, temperature)) == pytest.approx(0.0, abs=1e-7)


def test_retrain_trains_on_retain_only(toy, monkeypatch):
    model, params, batch_stats, data_in = toy
    seen = []
    real_train = train.train

    def spy(model, params, batch_stats, train_split, **kwargs):
        seen.append(np.asarray(train_split.labels).copy())
        return real_train(model, params, batch_stats, train_split, **kwargs)

    monkeypatch.setattr(train, "train", spy)
    config = M.RetrainConfig(epochs=1, batch_size=32)
    M.run_method("retrain", model, params, batch_stats, data_in, jax.random.key(0), config,
                 dataset="mnist")  # fmt: skip
    assert len(seen) == 1
    assert seen[0].size == data_in.retain_train.size
    assert not np.isin(seen[0], FORGET).any()

    leaky = data_in._replace(retain_train=data.Split(
        np.concatenate([data_in.retain_train.images, data_in.forget_train.images[:1]]),
        np.concatenate([data_in.retain_train.labels, data_in.forget_train.labels[:1]]),
    ))  # fmt: skip
    with pytest.raises(ValueError, match="never see"):
        M.run_method("retrain", model, params, batch_stats, leaky, jax.random.key(0), config,
                     dataset="mnist")  # fmt: skip
    assert len(seen) == 1


def test_steps_trace_once_across_calls(toy):
    model, params, batch_stats, data_in = toy
    config = TEST_CONFIGS["rl"]
    steps = [base.make_step("mnist", kind, NUM_CLASSES, False) for kind in ("random_labels", "ce")]
    sizes = []
    for seed in (10, 11):
        M.run_method("rl", model, params, batch_stats, data_in, jax.random.key(seed), config,
                     dataset="mnist")  # fmt: skip
        sizes.append([step._cache_size() for step in steps])
    assert sizes[0] == sizes[1]  # the second call compiled nothing new


@pytest.mark.slow
def test_every_method_runs_on_a_batchnorm_resnet():
    """ResNetTiny on a 3-class 32x32x3 toy: BatchNorm statistics flow through every method."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 16).astype(np.int32)
    protos = rng.integers(0, 256, (3, 32, 32, 3))
    images = np.clip(protos[labels] + rng.normal(0, 40, (48, 32, 32, 3)), 0, 255)
    forget, retain = data.forget_retain(data.Split(images.astype(np.uint8), labels), [0])
    model = models.get_model("resnet_tiny", num_classes=3)
    params, batch_stats = models.init_variables(model, jax.random.key(0), (32, 32, 3))
    data_in = M.MethodData(forget, retain, (0,), 3)
    one = dict(epochs=1, batch_size=16)
    configs = {
        "retrain": M.RetrainConfig(**one),
        "decay": M.DecayConfig(
            unlearn=unlearn.UnlearnConfig(
                granularity="filter",
                include="head",
                top_k=1,
                decay_steps=1,
                evaluate_each_step=False,
                batch_size=16,
                finetune="after_all",
                finetune_batches=1,
                unit_chunk=8,
                sample_batch=16,
            )
        ),  # fmt: skip
        "ft": M.FTConfig(**one),
        "ga": M.GAConfig(**one),
        "neggrad_plus": M.NegGradPlusConfig(**one),
        "rl": M.RLConfig(**one),
        "l1_sparse": M.L1SparseConfig(**one),
        "ssd": M.SSDConfig(batch_size=16),
        "salun": M.SalUnConfig(mask_batch_size=16, **one),
        "scrub": M.ScrubConfig(
            epochs=1, msteps=1, forget_batch_size=16, retain_batch_size=16, augment=True
        ),
    }
    assert list(configs) == list(M.METHODS)
    for name, config in configs.items():
        result = M.run_method(
            name, model, params, batch_stats, data_in, jax.random.key(1), config,
            dataset="cifar10",
        )  # fmt: skip
        leaves = jax.tree.leaves(result.params) + jax.tree.leaves(result.batch_stats)
        assert all(np.isfinite(np.asarray(x)).all() for x in leaves), name
        stats_moved = any(
            not np.array_equal(a, b)
            for a, b in zip(
                jax.tree.leaves(batch_stats), jax.tree.leaves(result.batch_stats), strict=True
            )
        )
        # Every method that trains updates the running statistics; SSD only rescales params.
        assert stats_moved == (result.info["gradient_steps"] > 0), name


@pytest.mark.parametrize("name", ["ga", "neggrad_plus", "l1_sparse"])
def test_one_full_batch_sgd_step_matches_closed_form(linear, name):
    """Plain SGD, one batch holding the whole set: the update is -lr * the closed-form gradient."""
    model, params, split = linear
    forget, retain = data.forget_retain(split, FORGET)  # 4 and 12 examples
    data_in = M.MethodData(forget, retain, FORGET, NUM_CLASSES)
    lr = 0.1
    plain = train.OptimizerConfig(
        name="sgd", learning_rate=lr, momentum=0.0, weight_decay=0.0, schedule="constant"
    )
    (gf_w, gf_b), = _linear_grads(params, forget, 4)  # fmt: skip
    (gr_w, gr_b), = _linear_grads(params, retain, 12)  # fmt: skip
    w = np.asarray(params["dense"]["kernel"], np.float64)
    b = np.asarray(params["dense"]["bias"], np.float64)
    if name == "ga":  # ascent on the forget CE
        config = M.GAConfig(optimizer=plain, epochs=1, batch_size=4)
        step_w, step_b = -gf_w, -gf_b
    elif name == "neggrad_plus":  # alpha * CE_r - (1 - alpha) * CE_f
        config = M.NegGradPlusConfig(optimizer=plain, alpha=0.7, epochs=1, batch_size=12)
        step_w, step_b = 0.7 * gr_w - 0.3 * gf_w, 0.7 * gr_b - 0.3 * gf_b
    else:  # CE_r + alpha * sum |theta|, alpha in epoch 0 = config.alpha
        config = M.L1SparseConfig(optimizer=plain, alpha=0.05, epochs=1, batch_size=12)
        step_w, step_b = gr_w + 0.05 * np.sign(w), gr_b + 0.05 * np.sign(b)
    result = M.run_method(
        name, model, params, {}, data_in, jax.random.key(0), config, dataset="mnist"
    )
    assert result.info["gradient_steps"] == 1
    np.testing.assert_allclose(result.params["dense"]["kernel"], w - lr * step_w, atol=2e-6)
    np.testing.assert_allclose(result.params["dense"]["bias"], b - lr * step_b, atol=2e-6)


def test_decay_calibration_is_confirmed_through_its_own_fine_tuning(toy):
    model, params, batch_stats, data_in = toy
    ucfg = unlearn.UnlearnConfig(
        top_k=1, lam=0.5, dt=1.0, decay_steps=2, finetune="after_all", finetune_batches=2,
        batch_size=16, evaluate_each_step=False,
    )  # fmt: skip
    config = M.DecayConfig(unlearn=ucfg, calibrate=True, sweep_top_k=(5, 50, 500),
                           sweep_dt=(0.5, 4.0), sweep_forget_max=50.0)  # fmt: skip
    out = M.run_method(
        "decay", model, params, batch_stats, data_in, jax.random.key(3), config, dataset="mnist"
    )
    calib = out.info["calibration"]
    assert 1 <= len(calib["tried"]) <= 1 + 3  # bisection over at most 6 candidates
    chosen = calib["chosen_point"]
    # The returned model is the run of the chosen point, the one the calibration scored.
    acc = _accuracy(model, out.params, out.batch_stats, data_in.forget_train)
    assert acc == pytest.approx(chosen["forget_train_acc_after"])
    assert out.info["decayed_units"] == chosen["units"]
    # Every phase's seconds are recorded, the importance and calibration included, and they
    # fit within the method's wall time.
    timings = out.info["timings"]
    assert timings["importance"] > 0 and timings["calibration"] > 0
    assert sum(timings.values()) <= out.info["seconds"]
    plain = M.run_method("decay", model, params, batch_stats, data_in, jax.random.key(3),
                         config._replace(calibrate_finetune=False), dataset="mnist")  # fmt: skip
    assert "tried" not in plain.info["calibration"]
    rule = calibrate.choose(plain.info["calibration"]["points"], 50.0)
    assert plain.info["calibration"]["chosen"] == {"top_k": rule["top_k"], "dt": rule["dt"]}


def test_decay_dt_margin_runs_the_chosen_point_with_a_longer_dt(toy):
    # Decay-only: the calibration chooses the same point at any margin, and the run decays
    # each selected weight by exp(-lam dt m T) = exp(-lam dt T)^m (hand-computed), so with
    # m = 2 every decayed weight's factor is the square of its factor at m = 1.
    model, params, batch_stats, data_in = toy
    ucfg = unlearn.UnlearnConfig(top_k=1, lam=0.5, dt=1.0, decay_steps=2,
                                 evaluate_each_step=False)  # fmt: skip
    config = M.DecayConfig(unlearn=ucfg, calibrate=True, sweep_top_k=(5, 50, 500),
                           sweep_dt=(0.5, 4.0), sweep_forget_max=50.0)  # fmt: skip
    runs = {m: M.run_method("decay", model, params, batch_stats, data_in, jax.random.key(3),
                            config._replace(dt_margin=m), dataset="mnist")
            for m in (1.0, 2.0)}  # fmt: skip
    calib = {m: r.info["calibration"] for m, r in runs.items()}
    assert calib[1.0]["chosen"] == calib[2.0]["chosen"]
    assert (calib[1.0]["dt_margin"], calib[2.0]["dt_margin"]) == (1.0, 2.0)
    chosen = calib[1.0]["chosen"]
    factor = np.exp(-0.5 * chosen["dt"] * 2)  # lam dt T at m = 1
    before = np.concatenate([np.ravel(x) for x in jax.tree.leaves(params)])
    after = {m: np.concatenate([np.ravel(x) for x in jax.tree.leaves(r.params)])
             for m, r in runs.items()}  # fmt: skip
    decayed = after[1.0] != before
    assert decayed.sum() == runs[1.0].info["decayed_units"] > 0  # weight units, none zero
    np.testing.assert_allclose(after[1.0][decayed], before[decayed] * factor, rtol=1e-5)
    np.testing.assert_allclose(after[2.0][decayed], before[decayed] * factor**2, rtol=1e-5)
    np.testing.assert_array_equal(after[2.0][~decayed], before[~decayed])
    # The guard (dt_guard, retain-train points): margin 1 is run and scored first (decay-only:
    # no fine-tune check scored it), then 2; the run is the margin it kept, exactly.
    for guard in (0.0, 100.0):
        out = M.run_method(
            "decay",
            model,
            params,
            batch_stats,
            data_in,
            jax.random.key(3),
            config._replace(dt_margin=2.0, dt_guard=guard),
            dataset="mnist",
        )
        checks = out.info["calibration"]["margin_checks"]
        assert [c["dt_margin"] for c in checks] == [1.0, 2.0]
        one, two = checks
        retain_holds = two["retain_train_acc"] >= one["retain_train_acc"] - guard
        forget_holds = two["forget_train_acc"] <= max(50.0, one["forget_train_acc"])
        holds = retain_holds and forget_holds
        kept = out.info["calibration"]["dt_margin"]
        assert kept == (2.0 if holds else 1.0) and (guard == 0.0 or kept == 2.0)
        flat = np.concatenate([np.ravel(x) for x in jax.tree.leaves(out.params)])
        np.testing.assert_array_equal(flat, after[kept])
    with pytest.raises(ValueError, match="dt_guard must be None or >= 0"):
        M.run_method("decay", model, params, batch_stats, data_in, jax.random.key(3),
                     config._replace(dt_guard=-1.0), dataset="mnist")  # fmt: skip
