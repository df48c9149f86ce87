"""tdu.forget (tdu_jax.calibrated): the one-call, self-sizing path against the experiments'
calibrated run, a decay checked by hand on a user's own model, and its input checks."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tdu_jax as tdu
from experiments import common
from experiments.config import ExperimentConfig
from tdu_jax import calibrate, calibrated, data, decay, models, train, units


@pytest.fixture(scope="module")
def lenet(tfds_dir):
    """LeNet trained for one epoch on 2,000 MNIST test images; 500 others held out."""
    split = data.load_split("mnist", "test", data_dir=tfds_dir)
    train_split = data.Split(split.images[:2000], split.labels[:2000])
    test_split = data.Split(split.images[-500:], split.labels[-500:])
    model = models.get_model("lenet")
    params, bs = models.init_variables(model, jax.random.key(0), (28, 28, 1))
    adam = train.OptimizerConfig(name="adam", learning_rate=2e-3, weight_decay=0.0)
    params, bs, _ = train.train(model, params, bs, train_split, dataset="mnist", config=adam,
                                epochs=1, batch_size=64, key=jax.random.key(1))  # fmt: skip
    return model, params, bs, train_split, test_split


def _no_seconds(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in ("seconds", "confirm_seconds")}


@pytest.mark.parametrize(("margin", "guard"), [(1.0, None), (4.0, None), (4.0, 0.0)])
def test_forget_matches_the_experiments_calibrated_run(lenet, tmp_path, margin, guard):
    # The experiments' path (importance through its cache, its sweep, the check through
    # fine-tuning, the run) and the library's one call must choose and end the same, with
    # the run's dt the chosen one times the margin (--sweep_dt_margin, SweepConfig.dt_margin),
    # or the margin the guard kept (--sweep_dt_guard, SweepConfig.margin_guard).
    model, params, bs, train_split, test_split = lenet
    cfg = ExperimentConfig(
        dataset="mnist", model="lenet", seed=1, train_epochs=1, train_optimizer="adam",
        train_lr=2e-3, train_weight_decay=0.0, train_schedule="cosine", augment=False,
        workdir=str(tmp_path), forget_class=(3,), granularity="filter", include="dense",
        top_k=5, dt=0.25, lam=0.3, decay_steps=3, finetune="after_all", finetune_batches=3,
        finetune_lr=0.01, batch_size=32, importance_score="ratio", retain_sample_size=50,
        importance_fraction=0.5, calibrate=True, sweep_top_k=(5, 20, 0.25),
        sweep_dt=(0.5, 2.0), sweep_forget_max=5.0, sweep_search_steps=2,
        sweep_retain_sample=300, unit_chunk=64, sample_batch=64, sweep_dt_margin=margin,
        sweep_dt_guard=guard,
    )  # fmt: skip
    base = {}
    base["acc"], base["per_class"] = common.accuracies(model, params, bs, cfg, train_split,
                                                       test_split)  # fmt: skip
    record = common.run_one(cfg, model, params, bs, base, train_split, test_split)

    _, retain = data.forget_retain(train_split, cfg.forget_class)
    sweep = tdu.SweepConfig(
        top_ks=cfg.sweep_top_k, dts=cfg.sweep_dt, forget_max=cfg.sweep_forget_max,
        search_steps=cfg.sweep_search_steps, forget_sample=cfg.sweep_forget_sample,
        retain_sample=cfg.sweep_retain_sample, dt_margin=margin, margin_guard=guard,
    )  # fmt: skip
    out = tdu.forget(
        model, params, bs, train=train_split, forget_classes=[3], key=common.run_key(cfg),
        config=common.unlearn_config(cfg, retain.size), sweep=sweep, test=test_split,
        dataset="mnist", importance_fraction=0.5, retain_sample_size=50, seed=1,
    )  # fmt: skip
    assert record["calibration"]["tried"], "the check through fine-tuning ran"
    for key in ("class_output_units", "spared", "only_class_outputs"):  # its own
        out.calibration.pop(key)
    assert _no_seconds(out.calibration) == _no_seconds(record["calibration"])
    kept = record["calibration"]["dt_margin"]
    assert kept == margin if guard is None else kept in (1.0, 2.0, 4.0)
    chosen = record["calibration"]["chosen"]
    assert (record["config"]["top_k"], record["config"]["dt"]) == (
        chosen["top_k"],
        chosen["dt"] * kept,
    )
    assert (out.config.top_k, out.config.dt) == (record["config"]["top_k"], record["config"]["dt"])
    final, _ = common.accuracies(model, out.unlearned.params, out.unlearned.batch_stats, cfg,
                                 train_split, test_split)  # fmt: skip
    assert final == pytest.approx(record["final"], abs=1e-9)
    assert out.unlearned.history[-1]["finetune_batches"] == 3
    if guard is not None:  # the guard's check of the kept margin was this very run
        checks = {c["dt_margin"]: c for c in record["calibration"]["margin_checks"]}
        assert (
            checks[1.0]["retain_train_acc"]
            == record["calibration"]["chosen_point"]["retain_train_acc_after"]
        )
        scored = calibrate.subsample(retain, cfg.sweep_retain_sample, 0)
        assert checks[kept]["kept"] and calibrate.accuracy(
            model, out.unlearned.params, out.unlearned.batch_stats, scored, dataset="mnist"
        ) == pytest.approx(checks[kept]["retain_train_acc"], abs=1e-9)
        assert all(
            c["retain_train_acc"] < checks[1.0]["retain_train_acc"] - guard
            or c["forget_train_acc"] > max(5.0, checks[1.0]["forget_train_acc"])
            for m, c in checks.items()
            if m > kept
        )


class _MLP:
    """A user's plain-function model on float inputs: 784 -> 32 -> 10."""

    @staticmethod
    def apply(variables, images):
        p = variables["params"]
        x = images.reshape(images.shape[0], -1)
        return jax.nn.relu(x @ p["hidden"]["kernel"]) @ p["out"]["kernel"]


def _float_images(images):
    return images.astype(jnp.float32) / 255.0


@pytest.fixture(scope="module")
def mlp(lenet):
    """The plain-function MLP trained for two epochs on the LeNet fixture's images."""
    _, _, _, train_split, _ = lenet
    k1, k2 = jax.random.split(jax.random.key(2))
    variables = {"params": {"hidden": {"kernel": jax.random.normal(k1, (784, 32)) * 0.05},
                            "out": {"kernel": jax.random.normal(k2, (32, 10)) * 0.2}}}  # fmt: skip
    model, params, state = tdu.from_function(_MLP.apply, variables)
    adam = train.OptimizerConfig(name="adam", learning_rate=3e-3, weight_decay=0.0)
    params, state, _ = train.train(model, params, state, train_split, config=adam, epochs=2,
                                   batch_size=64, key=jax.random.key(3),
                                   preprocess=_float_images)  # fmt: skip
    return model, params, state, train_split


def _head_offset(spec: units.UnitSpec) -> int:
    (head,) = [layer for layer in spec.layers if layer.name.startswith("out")]
    return head.offset


def test_class_output_units_are_the_class_row_of_the_head(mlp):
    model, params, state, train_split = mlp
    images = train_split.images[:40]
    filters = units.enumerate_units(params, "filter")  # 32 hidden + 10 output neurons
    found = calibrated.class_output_units(model, params, state, filters, images, [7, 2],
                                          preprocess=_float_images)  # fmt: skip
    np.testing.assert_array_equal(found, _head_offset(filters) + np.array([2, 7]))
    # Weights: the class's kernel column of the head (32 x 10 kernel, no bias): entry
    # (i, 7) is the head's unit 10 i + 7.
    weights = units.enumerate_units(params, "weight")
    found = calibrated.class_output_units(model, params, state, weights, images, [7],
                                          preprocess=_float_images)  # fmt: skip
    np.testing.assert_array_equal(found, _head_offset(weights) + np.arange(32) * 10 + 7)


def test_a_layer_with_as_many_channels_as_logits_is_not_taken_for_the_head(mlp):
    # A 10-unit hidden layer (784 -> 10 -> 10): its units each reach every logit.
    model, params, state, train_split = mlp
    k1, k2 = jax.random.split(jax.random.key(5))
    wide = {"hidden": {"kernel": jax.random.normal(k1, (784, 10)) * 0.05},
            "out": {"kernel": jax.random.normal(k2, (10, 10)) * 0.3}}  # fmt: skip
    spec = units.enumerate_units(wide, "filter")
    found = calibrated.class_output_units(model, wide, state, spec, train_split.images[:40],
                                          [3], preprocess=_float_images)  # fmt: skip
    np.testing.assert_array_equal(found, [_head_offset(spec) + 3])


def test_forget_sizes_the_decay_of_a_function_model_as_the_rule_says(mlp):
    # A decay-only request on a plain-function model: the final model is the sweep's chosen
    # point, its selected units shrink by exp(-lambda dt T) exactly (hand-computed), the
    # rule's ceiling holds on the forget-train images, and the class's output unit is spared.
    model, params, state, train_split = mlp
    config = tdu.DECAY_ONLY._replace(granularity="filter", unit_chunk=16, sample_batch=256)
    out = tdu.forget(model, params, state, train=train_split, forget_classes=(7,),
                     key=jax.random.key(4), config=config, retain_sample_size=200,
                     spare_class_outputs=True, preprocess=_float_images)  # fmt: skip

    point = out.calibration["chosen_point"]
    assert out.calibration["forget_max"] == calibrated.FORGET_MAX_DECAY_ONLY
    assert point["forget_train_acc"] <= 0.5
    forget_split, _ = data.forget_retain(train_split, [7])
    pred = tdu.predict(model, out.unlearned.params, out.unlearned.batch_stats,
                       forget_split.images, preprocess=_float_images)  # fmt: skip
    assert float(np.mean(pred == forget_split.labels)) * 100 == pytest.approx(
        point["forget_train_acc"], abs=1e-9
    )
    spec = units.enumerate_units(params, "filter")
    assert out.calibration["class_output_units"] == [_head_offset(spec) + 7]
    assert _head_offset(spec) + 7 not in out.unlearned.selected
    assert not out.calibration["only_class_outputs"]
    assert out.unlearned.selected.size == decay.resolve_k(point["top_k"], spec.num_units)
    mask = units.unit_mask(params, spec, out.unlearned.selected)
    factor = np.exp(-config.lam * point["dt"] * config.decay_steps)
    by_hand = jax.tree.map(lambda p, m: np.where(m, p * factor, p), params, mask)
    chex.assert_trees_all_close(out.unlearned.params, by_hand, rtol=1e-6, atol=1e-7)

    # A margin: the same choice, run with twice its Δt (the decay factor squared).
    harder = tdu.forget(model, params, state, train=train_split, forget_classes=(7,),
                        key=jax.random.key(4), config=config, retain_sample_size=200,
                        spare_class_outputs=True, preprocess=_float_images,
                        sweep=tdu.SweepConfig(dt_margin=2.0))  # fmt: skip
    assert harder.calibration["chosen"] == out.calibration["chosen"]
    assert harder.calibration["dt_margin"] == 2.0 and out.calibration["dt_margin"] == 1.0
    assert harder.config.dt == 2 * point["dt"]
    np.testing.assert_array_equal(harder.unlearned.selected, out.unlearned.selected)
    by_hand = jax.tree.map(lambda p, m: np.where(m, p * factor**2, p), params, mask)
    chex.assert_trees_all_close(harder.unlearned.params, by_hand, rtol=1e-6, atol=1e-7)


def test_the_dt_margin_defaults_to_the_chosen_point_and_an_explicit_one_wins():
    # Fine-tuned runs decayed with the chosen dt x 4 from the twenty-first session until the
    # twenty-third (held out, it cost up to 8 retain points on a request): now x 1 both ways.
    finetuned = tdu.DECAY_ONLY._replace(finetune="after_all")
    assert calibrated.dt_margin(tdu.SweepConfig(), finetuned) == 1.0
    assert calibrated.dt_margin(tdu.SweepConfig(), tdu.DECAY_ONLY) == 1.0
    assert calibrated.dt_margin(tdu.SweepConfig(dt_margin=1.0), finetuned) == 1.0
    assert calibrated.dt_margin(tdu.SweepConfig(dt_margin=3.0), tdu.DECAY_ONLY) == 3.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"forget_classes": (11,)}, "forget_classes"),
        ({"forget_classes": ()}, "forget_classes"),
        ({"sweep": tdu.SweepConfig(top_ks=(10**6,))}, "sweep.top_ks"),
        ({"sweep": tdu.SweepConfig(forget_max=150.0)}, "sweep.forget_max"),
        ({"sweep": tdu.SweepConfig(dts=(0.5, 0.0))}, "sweep.dts"),
        ({"sweep": tdu.SweepConfig(retain_sample=-1)}, "sweep.retain_sample"),
        ({"sweep": tdu.SweepConfig(dt_margin=0.5)}, "sweep.dt_margin"),
        ({"sweep": tdu.SweepConfig(margin_guard=-0.1)}, "sweep.margin_guard"),
        ({"importance_fraction": 0.0}, "importance_fraction"),
        ({"config": tdu.DECAY_ONLY._replace(finetune="sometimes")}, "finetune"),
    ],
)
def test_bad_input_is_refused_before_any_work(kwargs, message, monkeypatch):
    def no_work(*args, **kw):
        raise AssertionError("importance was computed before the input was checked")

    monkeypatch.setattr(tdu.unlearn, "request_importance", no_work)
    model = models.get_model("lenet")
    params, bs = models.init_variables(model, jax.random.key(0), (28, 28, 1))
    rng = np.random.default_rng(0)
    split = data.Split(rng.integers(0, 256, (40, 28, 28, 1), dtype=np.uint8),
                       (np.arange(40) % 10).astype(np.int32))  # fmt: skip
    call = {"train": split, "forget_classes": (3,), "key": jax.random.key(0),
            "dataset": "mnist", **kwargs}  # fmt: skip
    with pytest.raises(ValueError, match=message):
        tdu.forget(model, params, bs, **call)


def test_the_ceiling_follows_fine_tuning_unless_given():
    sweep = tdu.SweepConfig()
    assert calibrated.forget_max(sweep, tdu.DECAY_ONLY) == 0.5
    assert calibrated.forget_max(sweep, tdu.DECAY_ONLY._replace(finetune="after_all")) == 1.0
    assert calibrated.forget_max(sweep._replace(forget_max=2.0), tdu.DECAY_ONLY) == 2.0
