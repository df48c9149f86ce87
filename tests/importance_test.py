"""Tests for tdu_jax.importance: the fast engine against the naive reference, on every path."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tdu_jax import data, decay, importance, models, train, units
from tdu_jax.models.layers import ConvStage, DenseStage
from tdu_jax.models.stages import Stage, call_stages


def _init(model, image_shape, seed=0):
    """Jitted init with an "rbg" key (much faster to compile than threefry on CPU)."""
    init = jax.jit(lambda key: models.init_variables(model, key, image_shape))
    return init(jax.random.key(seed, impl="rbg"))


def _assert_same(fast, naive):
    """Accuracy drops bit-equal (integer counts), losses to float tolerance."""
    np.testing.assert_array_equal(fast.units, naive.units)
    np.testing.assert_array_equal(fast.accuracy_drop, naive.accuracy_drop)
    np.testing.assert_allclose(fast.loss_increase, naive.loss_increase, rtol=0, atol=1e-5)
    assert fast.base_accuracy == naive.base_accuracy
    assert fast.base_loss == pytest.approx(naive.base_loss, abs=1e-5)
    assert fast.sample_size == naive.sample_size
    assert fast.units.dtype == np.int64
    assert fast.accuracy_drop.shape == fast.loss_increase.shape == fast.units.shape


def _fast_matches_naive(model, params, batch_stats, images, labels, spec, subset, **chunking):
    """Runs the fast engine and the naive loop on ``subset``; asserts they agree."""
    fast = importance.ablation_importance(
        model, params, batch_stats, images, labels, spec, units=subset, **chunking
    )
    naive = importance.naive_importance(model, params, batch_stats, images, labels, spec, subset)
    _assert_same(fast, naive)
    return fast


def _per_layer_subset(spec, rng, kernel_count, bias_count=0, extra=()):
    """Random kernel and bias units from every layer (plus ``extra``), shuffled."""
    chosen = list(extra)
    for layer in spec.layers:
        bias_units = layer.bias_size if spec.granularity == "weight" else 0
        kernel_units = layer.num_units - bias_units
        count = min(kernel_count, kernel_units)
        chosen += list(layer.offset + rng.choice(kernel_units, count, replace=False))
        if bias_count and bias_units:
            chosen += list(
                layer.offset + kernel_units + rng.choice(layer.bias_size, bias_count, replace=False)
            )
    chosen = np.unique(np.asarray(chosen, np.int64))
    return rng.permutation(chosen)


def _record_compiles(monkeypatch, traced):
    """Records the jitted chunk functions made and how often ``traced`` is traced."""
    made, traces = [], []
    importance._make_chunk_fn.cache_clear()  # count this test's compiles, not earlier tests'
    make, inner = importance._make_chunk_fn, getattr(importance, traced)

    def recording_make(*args):
        fn, strategy = make(*args)
        made.append(fn)
        return fn, strategy

    def counting(*args, **kwargs):
        traces.append(args)
        return inner(*args, **kwargs)

    monkeypatch.setattr(importance, "_make_chunk_fn", recording_make)
    monkeypatch.setattr(importance, traced, counting)
    return made, traces


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def mnist(tfds_dir):
    return data.load_split("mnist", "test", data_dir=tfds_dir)


@pytest.fixture(scope="module")
def trained_lenet(mnist):
    """LeNet after 96 Adam steps on 2,048 MNIST images (~90% accurate: few exact ties)."""
    model = models.get_model("lenet")
    params, batch_stats = _init(model, (28, 28, 1))
    config = train.OptimizerConfig(
        name="adam", learning_rate=2e-3, weight_decay=0.0, schedule="constant"
    )
    params, batch_stats, _ = train.train(
        model,
        params,
        batch_stats,
        data.take(mnist, 2048),
        dataset="mnist",
        config=config,
        epochs=3,
        batch_size=64,
        key=jax.random.key(1),
    )
    return model, params, batch_stats


@pytest.fixture(scope="module")
def lenet_sample(mnist):
    """100 held-out images: with sample_batch=48 the last batch is padded."""
    images = data.to_float(mnist.images[5000:5100], "mnist")
    return images, np.asarray(mnist.labels[5000:5100])


def _perturb_batchnorm(params, batch_stats, rng):
    """Moves BatchNorm statistics and affine parameters away from their init (0/1)."""
    noise = lambda a, s: jnp.asarray(np.asarray(a) + rng.normal(0, s, a.shape), jnp.float32)
    batch_stats = jax.tree_util.tree_map_with_path(
        lambda path, a: jnp.abs(noise(a, 0.3)) + 0.5 if path[-1].key == "var" else noise(a, 0.3),
        batch_stats,
    )
    params = jax.tree_util.tree_map_with_path(
        lambda path, a: noise(a, 0.3) if "bn" in path[-2].key else a, params
    )
    return params, batch_stats


def _diverse_labels(logits, rng):
    """The model's own predictions with a quarter replaced at random: accuracy ~75-80%."""
    labels = np.array(jnp.argmax(logits, -1), np.int32)
    labels[::4] = rng.integers(0, logits.shape[-1], labels[::4].size)
    return labels


@pytest.fixture(scope="module")
def resnet_tiny():
    """Random-init ResNetTiny with perturbed BatchNorm, 40 random images and labels."""
    model = models.get_model("resnet_tiny")
    params, batch_stats = _init(model, (32, 32, 3))
    rng = np.random.default_rng(0)
    params, batch_stats = _perturb_batchnorm(params, batch_stats, rng)
    images = jnp.asarray(rng.normal(size=(40, 32, 32, 3)), jnp.float32)
    logits = model.apply({"params": params, "batch_stats": batch_stats}, images)
    # Centre the logits so that predictions spread over the classes.
    params["head"]["dense"]["bias"] = params["head"]["dense"]["bias"] - logits.mean(0)
    logits = model.apply({"params": params, "batch_stats": batch_stats}, images)
    return model, params, batch_stats, images, _diverse_labels(logits, rng)


# ---------------------------------------------------------------- LeNet (chain stages)
def test_lenet_weight_units_every_layer_match_naive(trained_lenet, lenet_sample, monkeypatch):
    model, params, batch_stats = trained_lenet
    images, labels = lenet_sample
    spec = units.enumerate_units(params, "weight")
    # The largest weight of every layer (likely to matter) plus random kernel and bias units.
    largest = [
        layer.offset + int(np.argmax(np.abs(params[layer.name]["kernel"]).reshape(-1)))
        for layer in spec.layers
    ]
    subset = _per_layer_subset(spec, np.random.default_rng(0), 12, 3, largest)
    per_layer = [
        np.sum((subset >= layer.offset) & (subset < layer.offset + layer.num_units))
        for layer in spec.layers
    ]
    assert all(n % 6 for n in per_layer)  # the last chunk of every layer is padded
    assert [importance.layer_strategy(model, spec, layer) for layer in spec.layers] == ["delta"] * 5
    made, traces = _record_compiles(monkeypatch, "_chain_cache")
    fast = _fast_matches_naive(
        model, params, batch_stats, images, labels, spec, subset, unit_chunk=6, sample_batch=48
    )
    assert fast.sample_size == 100
    assert 70 < fast.base_accuracy < 100
    assert np.count_nonzero(fast.accuracy_drop) >= 3  # not a vacuous comparison
    assert np.count_nonzero(np.abs(fast.loss_increase) > 1e-4) >= 20
    # One jitted chunk function per layer, each compiled once for its 3 chunks x 3 batches,
    # and the per-layer cache traced once per layer.
    assert len(made) == 5
    assert [fn._cache_size() for fn in made] == [1] * 5
    assert len(traces) == 5


def test_lenet_filter_units_match_naive(trained_lenet, lenet_sample, monkeypatch):
    model, params, batch_stats = trained_lenet
    images, labels = lenet_sample
    spec = units.enumerate_units(params, "filter")
    assert {importance.layer_strategy(model, spec, layer) for layer in spec.layers} == {"mask"}
    made, traces = _record_compiles(monkeypatch, "_mask_logits")
    calls = []
    fast = importance.ablation_importance(
        model,
        params,
        batch_stats,
        images,
        labels,
        spec,
        unit_chunk=7,
        sample_batch=48,
        progress=lambda done, total, seconds: calls.append((done, total)),
    )
    naive = importance.naive_importance(model, params, batch_stats, images, labels, spec)
    _assert_same(fast, naive)
    np.testing.assert_array_equal(fast.units, np.arange(236))  # default: all units, in order
    # The base scores equal an independent evaluation of the model.
    logits = np.asarray(model.apply({"params": params}, images), np.float64)
    shifted = logits - logits.max(1, keepdims=True)
    log_p = shifted - np.log(np.sum(np.exp(shifted), 1, keepdims=True))
    assert fast.base_accuracy == pytest.approx(100.0 * np.mean(np.argmax(logits, 1) == labels))
    assert fast.base_loss == pytest.approx(-np.mean(log_p[np.arange(100), labels]), abs=1e-5)
    assert np.count_nonzero(fast.accuracy_drop) >= 10
    # Progress: once per chunk, increasing, ending at the total.
    assert calls[-1] == (236, 236)
    assert all(total == 236 for _, total in calls)
    assert np.all(np.diff([done for done, _ in calls]) > 0)
    assert len(calls) == sum(-(-layer.num_units // 7) for layer in spec.layers)
    # dense1 alone has 18 chunks x 3 batches: still one compile and one trace per layer.
    assert len(made) == len(traces) == 5
    assert [fn._cache_size() for fn in made] == [1] * 5


# ---------------------------------------------------------------- ResNetTiny (BatchNorm)
@pytest.mark.parametrize("include_bn", [True, False])
def test_resnet_tiny_filter_units_match_naive(resnet_tiny, include_bn):
    model, params, batch_stats, images, labels = resnet_tiny
    spec = units.enumerate_units(params, "filter", include_bn=include_bn)
    assert {importance.layer_strategy(model, spec, layer) for layer in spec.layers} == {"mask"}
    assert (spec.layers[-1].bn_path is not None) == include_bn  # stem/conv <-> stem/bn
    subset = _per_layer_subset(spec, np.random.default_rng(1), 3)
    fast = _fast_matches_naive(
        model, params, batch_stats, images, labels, spec, subset, unit_chunk=2, sample_batch=16
    )
    assert np.count_nonzero(fast.accuracy_drop) >= 5


def test_resnet_tiny_batchnorm_channel_matters(resnet_tiny):
    """With the BN shift left in, removing a filter is not the same as removing its output."""
    model, params, batch_stats, images, labels = resnet_tiny
    subset = np.array([68, 72, 76])  # stage2_block1/proj_conv and stem/conv filters
    with_bn = units.enumerate_units(params, "filter", include_bn=True)
    without = units.enumerate_units(params, "filter", include_bn=False)
    assert units.unit_name(with_bn, 76) == "stem/conv[filter 2]"
    a = importance.naive_importance(model, params, batch_stats, images, labels, with_bn, subset)
    b = importance.naive_importance(model, params, batch_stats, images, labels, without, subset)
    assert np.all(np.abs(a.loss_increase - b.loss_increase) > 1e-4)


def test_resnet_tiny_weight_units_copy_match_naive(resnet_tiny):
    model, params, batch_stats, images, labels = resnet_tiny
    spec = units.enumerate_units(params, "weight")
    assert {importance.layer_strategy(model, spec, layer) for layer in spec.layers} == {"copy"}
    # The largest weight of every layer plus random ones (head: kernel and bias).
    largest = [
        layer.offset
        + int(np.argmax(np.abs(units.get_path(params, layer.path)["kernel"]).reshape(-1)))
        for layer in spec.layers
    ]
    subset = _per_layer_subset(spec, np.random.default_rng(2), 3, 2, largest)
    fast = _fast_matches_naive(
        model, params, batch_stats, images, labels, spec, subset, unit_chunk=3, sample_batch=16
    )
    assert np.count_nonzero(np.abs(fast.loss_increase) > 1e-4) >= 5


# ---------------------------------------------------------------- generic Flax modules
class _Inner(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.relu(nn.Dense(12, name="fc")(x.reshape(x.shape[0], -1)))


class _Generic(nn.Module):
    """A plain Flax model without ``stages()``: conv1/bn1 pair, unpaired conv2, nested dense."""

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Conv(6, (3, 3), name="conv1")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn1")(x))
        x = nn.relu(nn.Conv(5, (3, 3), strides=2, use_bias=False, name="conv2")(x))
        x = _Inner(name="inner")(x)
        return nn.Dense(4, name="out")(x)


@pytest.fixture(scope="module")
def generic():
    model = _Generic()
    rng = np.random.default_rng(3)
    variables = jax.jit(model.init)(jax.random.key(0, impl="rbg"), jnp.zeros((1, 8, 8, 2)))
    params, batch_stats = _perturb_batchnorm(
        variables["params"], variables["batch_stats"], np.random.default_rng(4)
    )
    images = jnp.asarray(rng.normal(size=(45, 8, 8, 2)), jnp.float32)
    logits = model.apply({"params": params, "batch_stats": batch_stats}, images)
    params["out"]["bias"] = params["out"]["bias"] - logits.mean(0)
    logits = model.apply({"params": params, "batch_stats": batch_stats}, images)
    return model, params, batch_stats, images, _diverse_labels(logits, rng)


def test_generic_weight_units_match_naive(generic):
    model, params, batch_stats, images, labels = generic
    spec = units.enumerate_units(params, "weight")
    assert [layer.name for layer in spec.layers] == ["conv1", "conv2", "inner/fc", "out"]
    assert {importance.layer_strategy(model, spec, layer) for layer in spec.layers} == {"copy"}
    subset = _per_layer_subset(spec, np.random.default_rng(5), 6, 2)
    fast = _fast_matches_naive(
        model, params, batch_stats, images, labels, spec, subset, unit_chunk=4, sample_batch=20
    )
    assert np.count_nonzero(np.abs(fast.loss_increase) > 1e-4) >= 5


@pytest.mark.parametrize("include_bn", [True, False])
def test_generic_filter_units_match_naive(generic, include_bn):
    model, params, batch_stats, images, labels = generic
    spec = units.enumerate_units(params, "filter", include_bn=include_bn)
    assert spec.num_units == 6 + 5 + 12 + 4
    assert spec.layers[0].bn_path == (("bn1",) if include_bn else None)
    assert spec.layers[1].bn_path is None
    assert {importance.layer_strategy(model, spec, layer) for layer in spec.layers} == {"mask"}
    fast = importance.ablation_importance(
        model, params, batch_stats, images, labels, spec, unit_chunk=4, sample_batch=20
    )
    naive = importance.naive_importance(model, params, batch_stats, images, labels, spec)
    _assert_same(fast, naive)
    assert np.count_nonzero(fast.accuracy_drop) >= 3


# ---------------------------------------------------------------- other staged models
class _Staged(nn.Module):
    """Chain stages in a given order; stages may be any module (e.g. parameter-free)."""

    layout: tuple

    def stages(self):
        return tuple(Stage(name, module.clone(parent=None)) for name, module in self.layout)

    @nn.compact
    def __call__(self, x, train=False):
        return call_stages(self, self.stages(), x, train)


class _AvgPool(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        return nn.avg_pool(x, (2, 2), (2, 2))


_CHAIN = (  # conv -> conv (even kernel, SAME) -> dense -> dense: every delta variant
    ("a", ConvStage(3, 4, "SAME", pool=1, parent=None)),
    ("b", ConvStage(4, 3, "SAME", pool=2, parent=None)),
    ("c", DenseStage(6, parent=None)),
    ("d", DenseStage(5, relu=False, parent=None)),
)
_WITH_POOL = (  # a parameter-free stage between two chain stages
    ("a", ConvStage(3, 3, "SAME", pool=1, parent=None)),
    ("pool", _AvgPool(parent=None)),
    ("c", DenseStage(6, parent=None)),
    ("d", DenseStage(5, relu=False, parent=None)),
)


@pytest.mark.parametrize(
    "layout, granularity, strategies",
    [
        (_CHAIN, "weight", ["delta", "delta", "delta", "delta"]),
        (_WITH_POOL, "weight", ["copy", "delta", "delta"]),
    ],
)
def test_staged_models_match_naive(layout, granularity, strategies):
    model = _Staged(layout)
    params = jax.jit(model.init)(jax.random.key(1, impl="rbg"), jnp.zeros((1, 6, 6, 2)))["params"]
    # Non-zero biases: with zero biases, dead ReLUs give exactly tied all-zero logits, where
    # the float residue of the delta path may break the tie differently.
    rng = np.random.default_rng(8)
    params = jax.tree_util.tree_map_with_path(
        lambda path, a: a + rng.normal(0, 0.1, a.shape) if path[-1].key == "bias" else a, params
    )
    images = jax.random.normal(jax.random.key(2), (37, 6, 6, 2))
    labels = np.arange(37) % 5
    spec = units.enumerate_units(params, granularity)
    assert [importance.layer_strategy(model, spec, layer) for layer in spec.layers] == strategies
    subset = _per_layer_subset(spec, np.random.default_rng(6), min(10, spec.layers[-1].num_units))
    fast = importance.ablation_importance(
        model, params, {}, images, labels, spec, units=subset, unit_chunk=6, sample_batch=16
    )
    naive = importance.naive_importance(model, params, {}, images, labels, spec, subset)
    _assert_same(fast, naive)
    assert np.count_nonzero(np.abs(fast.loss_increase) > 1e-5) >= 5


# ---------------------------------------------------------------- a unit that carries class 0
class _TwoLayer(nn.Module):
    def stages(self):
        return (
            Stage("hidden", DenseStage(4, relu=True, parent=None)),
            Stage("logits", DenseStage(3, relu=False, parent=None)),
        )

    @nn.compact
    def __call__(self, x, train=False):
        return call_stages(self, self.stages(), x, train)


def _class0_model():
    """Hidden unit 2 is the only route to logit 0; the sample is all class 0.

    h_2 = relu(sum(x)) with x in [0.5, 1.5]^5, so logit_0 = 3 h_2 - 2 >= 5.5. Logits 1 and 2
    are -1.5 plus small non-negative contributions of hidden units 0, 1, 3, so they lie in
    [-1.5, -0.9]. Without h_2 (its filter, or the weight hidden->logit 0) logit_0 = -2 loses
    on every example; without any other unit class 0 still wins.
    """
    rng = np.random.default_rng(7)
    hidden_kernel = rng.uniform(-0.5, 0.5, (5, 4))
    hidden_kernel[:, 2] = 1.0
    logits_kernel = np.zeros((4, 3))
    logits_kernel[[0, 1, 3], 1:] = rng.uniform(0.0, 0.05, (3, 2))
    logits_kernel[2, 0] = 3.0
    params = {
        "hidden": {"kernel": hidden_kernel, "bias": np.zeros(4)},
        "logits": {"kernel": logits_kernel, "bias": np.array([-2.0, -1.5, -1.5])},
    }
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    images = jnp.asarray(rng.uniform(0.5, 1.5, (30, 5)), jnp.float32)
    return _TwoLayer(), params, images, np.zeros(30, np.int32)


@pytest.mark.parametrize(
    "granularity, carrier, name",
    [
        ("filter", 2, "hidden[filter 2]"),
        ("weight", 5 * 4 + 4 + 2 * 3 + 0, "logits/kernel[2, 0]"),
    ],
)
def test_unit_carrying_class0_ranks_first(granularity, carrier, name):
    model, params, images, labels = _class0_model()
    spec = units.enumerate_units(params, granularity)
    assert units.unit_name(spec, carrier) == name
    imp = importance.ablation_importance(
        model, params, {}, images, labels, spec, unit_chunk=4, sample_batch=8
    )
    assert imp.base_accuracy == 100.0
    expected_drop = np.zeros(spec.num_units)
    expected_drop[carrier] = 100.0
    np.testing.assert_array_equal(imp.accuracy_drop, expected_drop)
    assert decay.rank_units(imp)[0] == carrier
    np.testing.assert_array_equal(decay.select_top_k(imp, 1), [carrier])
    _assert_same(imp, importance.naive_importance(model, params, {}, images, labels, spec))


# ---------------------------------------------------------------- errors and edge cases
def test_errors():
    model, params, images, labels = _class0_model()
    spec = units.enumerate_units(params, "filter")
    for fn in (importance.ablation_importance, importance.naive_importance):
        with pytest.raises(ValueError, match="importance sample is empty"):
            fn(model, params, {}, images[:0], labels[:0], spec)
        with pytest.raises(ValueError, match="differ in length: 30 vs 29"):
            fn(model, params, {}, images, labels[:29], spec)
        with pytest.raises(ValueError, match="unit indices"):
            fn(model, params, {}, images, labels, spec, units=[7])
    for chunk, batch in ((0, 8), (4, 0)):
        with pytest.raises(ValueError, match="unit_chunk and sample_batch must be >= 1"):
            importance.ablation_importance(
                model, params, {}, images, labels, spec, unit_chunk=chunk, sample_batch=batch
            )


def test_no_units_and_duplicate_units():
    model, params, images, labels = _class0_model()
    spec = units.enumerate_units(params, "filter")
    empty = importance.ablation_importance(model, params, {}, images, labels, spec, units=[])
    assert empty.units.size == empty.accuracy_drop.size == empty.loss_increase.size == 0
    assert empty.base_accuracy == 100.0
    dup = importance.ablation_importance(
        model, params, {}, images, labels, spec, units=[2, 5, 2, 0], unit_chunk=3
    )
    full = importance.ablation_importance(model, params, {}, images, labels, spec)
    np.testing.assert_array_equal(dup.units, [2, 5, 2, 0])
    chex.assert_trees_all_close(
        (dup.accuracy_drop, dup.loss_increase),
        (full.accuracy_drop[[2, 5, 2, 0]], full.loss_increase[[2, 5, 2, 0]]),
        atol=1e-6,
    )


def _traces_during(fn) -> int:
    """Number of jaxpr traces while ``fn`` runs (public ``jax.monitoring`` events)."""
    events = []

    def listener(name, *args, **kwargs):
        if name == "/jax/core/compile/jaxpr_trace_duration":
            events.append(name)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        fn()
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    return len(events)


@pytest.mark.parametrize("granularity", ["weight", "filter"])
def test_second_identical_call_traces_nothing(granularity):
    """The issue: a second identical call compiled 10 times. Staged (LeNet) fast path."""
    model = models.get_model("lenet")
    params, batch_stats = _init(model, (28, 28, 1))
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(20, 28, 28, 1)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 10, 20), jnp.int32)
    spec = units.enumerate_units(params, granularity)
    chosen = np.concatenate([layer.offset + np.arange(3) for layer in spec.layers])

    def call():
        importance.ablation_importance(
            models.get_model("lenet"), params, batch_stats, images, labels, spec, units=chosen
        )

    assert _traces_during(call) > 0
    assert _traces_during(call) == 0
