"""Tests for tdu_jax.adapters and the generic (any-model) paths of the engine.

References are independent: the model's own ``apply`` / NNX call, ``naive_importance``
(copy, zero the unit by ``unit_mask``, run the whole model) and hand-built masks.
"""

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tdu_jax as tdu
from tdu_jax import data, importance, units
from tdu_jax import train as train_lib

_TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"


class NoTrainCNN(nn.Module):
    """__call__(x) only; auto-named layers; BatchNorm follows the *second* conv."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(3, (3, 3))(x))  # Conv_0: no BatchNorm
        x = nn.Conv(4, (3, 3))(x)  # Conv_1 -> BatchNorm_0
        x = nn.relu(nn.BatchNorm(use_running_average=True)(x))
        return nn.Dense(3)(x.mean((1, 2)))


class TrainingCNN(nn.Module):
    """__call__(x, training=...) with BatchNorm and dropout."""

    @nn.compact
    def __call__(self, x, training: bool = False):
        x = nn.Conv(4, (3, 3))(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not training)(x))
        x = nn.Dropout(0.5, deterministic=not training)(x.mean((1, 2)))
        return nn.Dense(3)(x)


class DeterministicMLP(nn.Module):
    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        x = nn.Dropout(0.5, deterministic=deterministic)(
            nn.relu(nn.Dense(5)(x.reshape(len(x), -1)))
        )
        return nn.Dense(3)(x)


class NNXNet(nnx.Module):
    def __init__(self, rngs, dropout=0.0):
        self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
        self.norm = nnx.BatchNorm(4, rngs=rngs)
        self.drop = nnx.Dropout(dropout, rngs=rngs)
        self.head = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.norm(self.conv(x)))
        return self.head(self.drop(x.mean((1, 2))))


def mlp_apply(variables, x):
    p = variables["params"]
    h = jax.nn.relu(x.reshape(x.shape[0], -1) @ p["hidden"]["kernel"] + p["hidden"]["bias"])
    return h @ p["out"]["kernel"] + p["out"]["bias"]


def _mlp_variables():
    k1, k2 = jax.random.split(jax.random.key(3))
    return {
        "params": {
            "hidden": {"kernel": jax.random.normal(k1, (16, 6)) * 0.5, "bias": jnp.full(6, 0.1)},
            "out": {"kernel": jax.random.normal(k2, (6, 3)), "bias": jnp.zeros(3)},
        }
    }


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(24, 4, 4, 1)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, 24), jnp.int32)
    return x, y


def _assert_same(fast, naive):
    np.testing.assert_array_equal(fast.units, naive.units)
    np.testing.assert_allclose(fast.accuracy_drop, naive.accuracy_drop, atol=1e-9)
    np.testing.assert_allclose(fast.loss_increase, naive.loss_increase, atol=2e-5)
    assert fast.base_accuracy == pytest.approx(naive.base_accuracy)


# ---------------------------------------------------------------- Linen, any signature
@pytest.mark.parametrize(
    "module, eval_kwargs, train_kwargs",
    [
        (NoTrainCNN(), {}, {}),
        (TrainingCNN(), {"training": False}, {"training": True}),
        (DeterministicMLP(), {"deterministic": True}, {"deterministic": False}),
    ],
)
def test_from_linen_detects_call_keywords(module, eval_kwargs, train_kwargs, batch):
    x, _ = batch
    variables = module.init(jax.random.key(0), x)
    model, params, state = tdu.from_linen(module, variables)
    assert dict(model.eval_kwargs) == eval_kwargs
    assert dict(model.train_kwargs) == train_kwargs
    expected = module.apply(variables, x, **eval_kwargs)
    chex.assert_trees_all_close(model.apply(params, state, x), expected, atol=0)


def test_linen_train_apply_updates_batch_stats_and_uses_dropout_rng(batch):
    x, _ = batch
    module = TrainingCNN()
    variables = module.init(jax.random.key(0), x)
    model, params, state = tdu.from_linen(module, variables)
    rng = jax.random.key(5)
    logits, new_state = model.train_apply(params, state, x, rng)
    ref_logits, ref_updates = module.apply(
        variables,
        x,
        training=True,
        mutable=["batch_stats"],
        rngs={"dropout": jax.random.fold_in(rng, 0)},
    )
    chex.assert_trees_all_close(logits, ref_logits, atol=0)
    chex.assert_trees_all_close(new_state, tdu.adapters.to_dict(ref_updates), atol=0)
    other, _ = model.train_apply(params, state, x, jax.random.key(6))
    assert not np.allclose(other, logits)  # dropout draws from the given rng


def test_bare_linen_module_without_train_argument_works_everywhere(batch):
    """The issue's TypeError: a bare module whose __call__ takes no ``train``."""
    x, y = batch
    module = NoTrainCNN()
    variables = module.init(jax.random.key(0), x)
    params, batch_stats = variables["params"], variables["batch_stats"]
    spec = units.enumerate_units(params, "weight")
    subset = np.arange(0, spec.num_units, 9)
    fast = importance.ablation_importance(module, params, batch_stats, x, y, spec, units=subset)
    naive = importance.naive_importance(module, params, batch_stats, x, y, spec, units=subset)
    _assert_same(fast, naive)
    predictions = tdu.predict(module, params, batch_stats, np.asarray(x))
    np.testing.assert_array_equal(predictions, np.argmax(module.apply(variables, x), -1))


# ---------------------------------------------------------------- BatchNorm pairing
def test_linen_bn_pairs_are_discovered_from_the_computation(batch):
    x, _ = batch
    model, params, state = tdu.from_linen(NoTrainCNN(), NoTrainCNN().init(jax.random.key(0), x))
    # Conv_1 (not Conv_0) feeds BatchNorm_0: names alone would pair them wrongly.
    assert tdu.find_bn_pairs(model, params, state, x) == {"Conv_1": "BatchNorm_0"}
    bare = tdu.linen_bn_pairs(NoTrainCNN(), params, state["batch_stats"], x)
    assert bare == {"Conv_1": "BatchNorm_0"}


def test_unpaired_filter_with_a_norm_beside_it_is_an_error(batch):
    x, _ = batch
    params = NoTrainCNN().init(jax.random.key(0), x)["params"]
    with pytest.raises(ValueError, match=r"bn_pairs=\{'Conv_1': 'BatchNorm_0'\}"):
        units.enumerate_units(params, "filter")
    spec = units.enumerate_units(params, "filter", bn_pairs={"Conv_1": "BatchNorm_0"})
    assert [(layer.name, layer.bn_path) for layer in spec.layers] == [
        ("Conv_0", None),
        ("Conv_1", ("BatchNorm_0",)),
        ("Dense_0", None),
    ]
    # Conv_0 also has 3 != 4 channels, so only Conv_1 was a candidate; include_bn=False and
    # an explicit "no BatchNorm" are both accepted.
    assert units.enumerate_units(params, "filter", include_bn=False).layers[1].bn_path is None
    spec = units.enumerate_units(params, "filter", bn_pairs={"Conv_1": None})
    assert spec.layers[1].bn_path is None
    with pytest.raises(ValueError, match="not in params"):
        units.enumerate_units(params, "filter", bn_pairs={"Conv_1": "BatchNorm_9"})
    with pytest.raises(ValueError, match="has no scale of shape"):
        units.enumerate_units(params, "filter", bn_pairs={"Conv_0": "BatchNorm_0"})
    with pytest.raises(ValueError, match="layers not in params"):
        units.enumerate_units(params, "filter", bn_pairs={"Conv_7": "BatchNorm_0"})


def test_filter_unit_with_paired_bn_removes_the_channel(batch):
    """Hand check: zeroing filter c of Conv_1 and its BN channel makes that channel 0."""
    x, _ = batch
    module = NoTrainCNN()
    variables = module.init(jax.random.key(0), x)
    params = variables["params"]
    spec = units.enumerate_units(params, "filter", bn_pairs={"Conv_1": "BatchNorm_0"})
    c = 2
    ablated = units.ablate(params, spec, np.array([spec.layers[1].offset + c]))
    _, inter = module.apply(
        {**variables, "params": ablated}, x, capture_intermediates=True, mutable=["intermediates"]
    )
    bn_out = inter["intermediates"]["BatchNorm_0"]["__call__"][0]
    np.testing.assert_array_equal(bn_out[..., c], 0.0)
    assert np.all(np.any(bn_out[..., [0, 1, 3]] != 0, axis=(0, 1, 2)))


@pytest.mark.parametrize("granularity", ["weight", "filter"])
def test_linen_adapter_importance_matches_naive(granularity, batch):
    x, y = batch
    module = NoTrainCNN()
    model, params, state = tdu.from_linen(module, module.init(jax.random.key(0), x))
    pairs = tdu.find_bn_pairs(model, params, state, x)
    spec = units.enumerate_units(params, granularity, bn_pairs=pairs)
    subset = None if granularity == "filter" else np.arange(0, spec.num_units, 5)
    fast = tdu.ablation_importance(model, params, state, x, y, spec, units=subset, unit_chunk=4)
    naive = tdu.naive_importance(model, params, state, x, y, spec, units=subset)
    _assert_same(fast, naive)
    assert np.count_nonzero(np.abs(fast.loss_increase) > 1e-4) >= 3


# ---------------------------------------------------------------- NNX
def test_from_nnx_apply_and_train_apply_match_the_module(batch):
    x, _ = batch
    net = NNXNet(nnx.Rngs(0))
    model, params, state = tdu.from_nnx(net)
    assert set(params) == {"conv", "norm", "head"} and set(state) == {"norm"}
    reference = nnx.clone(net)
    reference.eval()
    chex.assert_trees_all_close(model.apply(params, state, x), reference(x), atol=1e-6)
    logits, new_state = model.train_apply(params, state, x, jax.random.key(0))
    reference.train()
    chex.assert_trees_all_close(logits, reference(x), atol=1e-6)
    chex.assert_trees_all_close(
        new_state["norm"]["mean"],
        nnx.to_pure_dict(nnx.state(reference, nnx.BatchStat))["norm"]["mean"],
        atol=1e-6,
    )
    assert not np.allclose(new_state["norm"]["mean"], state["norm"]["mean"])


def test_nnx_dropout_draws_from_the_given_rng(batch):
    x, _ = batch
    model, params, state = tdu.from_nnx(NNXNet(nnx.Rngs(0), dropout=0.5))
    a, _ = model.train_apply(params, state, x, jax.random.key(1))
    b, _ = model.train_apply(params, state, x, jax.random.key(1))
    c, _ = model.train_apply(params, state, x, jax.random.key(2))
    chex.assert_trees_all_close(a, b, atol=0)
    assert not np.allclose(a, c)
    # Evaluation mode: no dropout, so equal to the dropout-free evaluation of the same params.
    chex.assert_trees_all_close(model.apply(params, state, x), model.apply(params, state, x))


class NNXChain(nnx.Module):
    """Layers in an nnx.List (integer keys); a ReLU between c2 and its norm: no pair."""

    def __init__(self, rngs):
        self.blocks = nnx.List([nnx.Conv(1, 4, (3, 3), rngs=rngs), nnx.BatchNorm(4, rngs=rngs)])
        self.c2 = nnx.Conv(4, 4, (3, 3), rngs=rngs)
        self.after_relu = nnx.BatchNorm(4, rngs=rngs)
        self.head = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        for block in self.blocks:
            x = block(x)
        x = self.after_relu(nnx.relu(self.c2(x)))
        return self.head(x.mean((1, 2)))


def test_nnx_bn_pairs_are_discovered_from_the_computation(batch):
    x, y = batch
    model, params, state = tdu.from_nnx(NNXNet(nnx.Rngs(0)))
    assert tdu.find_bn_pairs(model, params, state, x) == {"conv": "norm"}
    call = nnx.Conv.__call__
    model, params, state = tdu.from_nnx(NNXChain(nnx.Rngs(0)))
    pairs = tdu.find_bn_pairs(model, params, state, x)
    assert pairs == {"blocks/0": "blocks/1"}
    assert nnx.Conv.__call__ is call  # the recording wrapper is gone
    spec = units.enumerate_units(params, "filter", bn_pairs={**pairs, "c2": None})
    assert [(layer.name, layer.bn_path) for layer in spec.layers] == [
        ("blocks/0", ("blocks", 1)),
        ("c2", None),
        ("head", None),
    ]
    fast = tdu.ablation_importance(model, params, state, x, y, spec)
    _assert_same(fast, tdu.naive_importance(model, params, state, x, y, spec))
    fmodel, fparams, fstate = tdu.from_function(mlp_apply, _mlp_variables())
    with pytest.raises(TypeError, match="bn_pairs"):
        tdu.find_bn_pairs(fmodel, fparams, fstate, x)


def test_nnx_filter_importance_matches_naive(batch):
    x, y = batch
    model, params, state = tdu.from_nnx(NNXNet(nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"bn_pairs=\{'conv': 'norm'\}"):
        units.enumerate_units(params, "filter")
    spec = units.enumerate_units(params, "filter", bn_pairs={"conv": "norm"})
    assert importance.layer_strategy(model, spec, spec.layers[0]) == "copy"
    fast = tdu.ablation_importance(model, params, state, x, y, spec)
    naive = tdu.naive_importance(model, params, state, x, y, spec)
    _assert_same(fast, naive)


# ---------------------------------------------------------------- plain functions
def test_function_model_weight_importance_matches_naive_and_custom_loss(batch):
    x, y = batch
    model, params, state = tdu.from_function(mlp_apply, _mlp_variables())
    spec = units.enumerate_units(params, "weight")
    fast = tdu.ablation_importance(model, params, state, x, y, spec, unit_chunk=32)
    naive = tdu.naive_importance(model, params, state, x, y, spec)
    _assert_same(fast, naive)

    def margin_loss(logits, labels):  # a custom per-example loss
        return jnp.max(logits, -1) - jnp.take_along_axis(logits, labels[:, None], -1)[:, 0]

    fast = tdu.ablation_importance(model, params, state, x, y, spec, loss_fn=margin_loss)
    logits = np.asarray(mlp_apply({"params": params}, x))
    base = np.mean(logits.max(-1) - logits[np.arange(len(y)), np.asarray(y)])
    assert fast.base_loss == pytest.approx(base, abs=1e-5)
    naive = tdu.naive_importance(model, params, state, x, y, spec, loss_fn=margin_loss)
    _assert_same(fast, naive)


def test_frozendict_params_work(batch):
    """The issue's "FrozenDict is immutable": importance, masks and decay take FrozenDicts."""
    x, y = batch
    variables = _mlp_variables()
    frozen = flax.core.freeze(variables["params"])
    model, _, state = tdu.from_function(mlp_apply, variables)
    spec = units.enumerate_units(frozen, "filter")
    fast = tdu.ablation_importance(model, frozen, state, x, y, spec)
    plain = tdu.ablation_importance(model, variables["params"], state, x, y, spec)
    np.testing.assert_array_equal(fast.loss_increase, plain.loss_increase)
    mask = tdu.unit_mask(frozen, spec, np.array([1, 7]))
    decayed = tdu.apply_decay(frozen, mask, lam=0.5, dt=1.0, steps=2)
    expected = np.asarray(frozen["hidden"]["kernel"]).copy()
    expected[:, 1] *= np.exp(-1.0)
    np.testing.assert_allclose(decayed["hidden"]["kernel"], expected, rtol=1e-6)
    np.testing.assert_allclose(
        decayed["out"]["kernel"][:, 1], frozen["out"]["kernel"][:, 1] / np.e, rtol=1e-6
    )


# ---------------------------------------------------------------- float images, training
def test_fine_tune_and_evaluate_on_float_images_with_dropout(batch):
    """The issue's InvalidRngError and uint8-only restriction: float split, dropout model."""
    x, y = batch
    module = TrainingCNN()
    model, params, state = tdu.from_linen(module, module.init(jax.random.key(0), x))
    split = data.Split(np.asarray(x), np.asarray(y))
    config = train_lib.OptimizerConfig(name="sgd", learning_rate=0.1, schedule="constant")
    p1, s1, m = tdu.fine_tune(
        model,
        params,
        state,
        split,
        config=config,
        num_batches=4,
        batch_size=8,
        key=jax.random.key(0),
    )
    assert np.isfinite(m["loss"]) and m["batches"] == 4
    assert not np.allclose(s1["batch_stats"]["BatchNorm_0"]["mean"], 0.0)
    acc = tdu.evaluate(model, p1, s1, split, forget_classes=(0,))
    predictions = np.argmax(model.apply(p1, s1, x), -1)
    assert acc["test_acc"] == pytest.approx(100 * np.mean(predictions == np.asarray(y)))
    assert len(acc["per_class"]) == 3  # from the model's output width
    # preprocess: uint8-like images scaled by the user's own function give the same result.
    scaled = data.Split(np.asarray(x) * 2.0, np.asarray(y))
    half = _half
    acc2 = tdu.evaluate(model, p1, s1, scaled, forget_classes=(0,), preprocess=half)
    assert acc2 == acc


def _half(images):
    return images / 2.0


def test_run_unlearning_on_float_images(batch):
    x, y = batch
    model, params, state = tdu.from_function(mlp_apply, _mlp_variables())
    split = data.Split(np.asarray(x), np.asarray(y))
    config = tdu.UnlearnConfig(
        granularity="filter", top_k=2, lam=1.0, dt=1.0, decay_steps=3, finetune="none"
    )
    result = tdu.run_unlearning(
        model,
        params,
        state,
        data_in=tdu.UnlearnData(split, split, split, (0,)),
        config=config,
        key=jax.random.key(0),
    )
    spec = units.enumerate_units(params, "filter")
    imp = tdu.naive_importance(model, params, state, x, y, spec)
    np.testing.assert_array_equal(result.selected, tdu.select_top_k(imp, 2))
    expected = tdu.apply_decay(params, tdu.unit_mask(params, spec, result.selected), 1.0, 1.0, 3)
    chex.assert_trees_all_close(result.params, expected, atol=0)
    assert [h["step"] for h in result.history] == [0, 1, 2, 3]


def test_as_model_rejects_unknown_objects():
    with pytest.raises(TypeError, match="from_nnx"):
        tdu.as_model(object())


# ---------------------------------------------------------------- compile once
def _count_traces(fn):
    events = []

    def listener(name, *args, **kwargs):
        if name == _TRACE_EVENT:
            events.append(name)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        fn()
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    return len(events)


def test_second_identical_call_traces_nothing(batch):
    x, y = batch
    module = NoTrainCNN()
    variables = module.init(jax.random.key(0), x)

    def run_all():
        # Adapters are rebuilt on every call: equal adapters must hit the same caches.
        model, params, state = tdu.from_linen(module, variables)
        spec = units.enumerate_units(params, "filter", bn_pairs={"Conv_1": "BatchNorm_0"})
        tdu.ablation_importance(model, params, state, x, y, spec, unit_chunk=3)
        fmodel, fparams, fstate = tdu.from_function(mlp_apply, _mlp_variables())
        fspec = units.enumerate_units(fparams, "weight")
        tdu.ablation_importance(fmodel, fparams, fstate, x, y, fspec, unit_chunk=16)
        tdu.predict(fmodel, fparams, fstate, np.asarray(x))
        tdu.evaluate(
            fmodel, fparams, fstate, data.Split(np.asarray(x), np.asarray(y)), forget_classes=(0,)
        )
        tdu.fine_tune(
            model,
            params,
            state,
            data.Split(np.asarray(x), np.asarray(y)),
            config=train_lib.OptimizerConfig(name="sgd", learning_rate=0.01),
            num_batches=2,
            batch_size=8,
            key=jax.random.key(0),
        )

    first = _count_traces(run_all)
    assert first > 0  # the listener sees traces at all
    assert _count_traces(run_all) == 0
