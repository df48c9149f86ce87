"""The on-disk importance cache: round trip, key checks, atomic files, compute-once."""

import dataclasses

import jax
import numpy as np

from experiments import common, importance_cache
from experiments.config import ExperimentConfig
from tdu_jax import data, importance, models, selective

KEY = {"dataset": "mnist", "forget_class": [0], "variables_sha256": "ab" * 32}


def _imp(n=5) -> importance.Importance:
    return importance.Importance(
        units=np.arange(n), accuracy_drop=np.linspace(0.0, 2.5, n), loss_increase=-np.ones(n),
        base_accuracy=99.5, base_loss=0.125, sample_size=40, seconds=3.25,
    )  # fmt: skip


def test_round_trip_is_exact(tmp_path):
    path = importance_cache.cache_path(tmp_path, KEY)
    assert path.parent == tmp_path / "importance" and path.suffix == ".npz"
    importance_cache.save(path, _imp(), KEY)
    got = importance_cache.load(path, KEY)
    want = _imp()
    for name in want._fields:
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
    assert isinstance(got.base_accuracy, float) and isinstance(got.sample_size, int)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left


def test_other_key_stale_or_broken_file_is_a_miss(tmp_path):
    path = importance_cache.cache_path(tmp_path, KEY)
    assert importance_cache.load(path, KEY) is None  # absent
    importance_cache.save(path, _imp(), KEY)
    assert importance_cache.load(path, {**KEY, "forget_class": [1]}) is None
    path.write_bytes(b"not an npz")
    assert importance_cache.load(path, KEY) is None
    assert importance_cache.cache_path(tmp_path, {**KEY, "seed": 1}) != path


def test_cached_computes_once(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return _imp(3)

    first = importance_cache.cached(tmp_path, KEY, compute)
    second = importance_cache.cached(tmp_path, KEY, compute)
    assert len(calls) == 1
    np.testing.assert_array_equal(first.accuracy_drop, second.accuracy_drop)
    importance_cache.cached(tmp_path, {**KEY, "granularity": "filter"}, compute)
    assert len(calls) == 2


def test_scores_share_the_cached_forget_and_retain_passes(tmp_path, monkeypatch):
    cfg = ExperimentConfig(
        dataset="mnist", model="lenet", seed=0, train_epochs=1, train_optimizer="adam",
        train_lr=2e-3, train_weight_decay=0.0, train_schedule="cosine", augment=False,
        workdir=str(tmp_path), forget_class=(3,), granularity="filter", include="dense",
        top_k=5, dt=0.25, finetune_lr=0.01, retain_sample_size=12, unit_chunk=64, sample_batch=32,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    split = data.Split(rng.integers(0, 256, (60, 28, 28, 1), dtype=np.uint8),
                       (np.arange(60) % 10).astype(np.int32))  # fmt: skip
    model = models.get_model("lenet")
    params, batch_stats = models.init_variables(model, jax.random.key(0), (28, 28, 1))
    spec = common.unit_spec(cfg, params)
    samples = []
    real = importance.ablation_importance

    def spy(model, params, batch_stats, images, labels, spec, **kw):
        samples.append(np.asarray(labels))
        return real(model, params, batch_stats, images, labels, spec, **kw)

    monkeypatch.setattr(importance, "ablation_importance", spy)

    def run(**changes):
        return common.compute_importance(
            dataclasses.replace(cfg, **changes), model, params, batch_stats, split, spec
        )

    forget = run()
    assert len(samples) == 1 and set(samples[0]) == {3}  # the forget class only
    ratio = run(importance_score="ratio")
    assert len(samples) == 2 and samples[1].size == 12 and 3 not in samples[1]
    retain = real(model, params, batch_stats, data.to_float(common.retain_sample(cfg, split)
                  .images, "mnist"), samples[1], spec)  # fmt: skip
    np.testing.assert_allclose(
        ratio.loss_increase, selective.ratio_importance(forget, retain).loss_increase, rtol=1e-6
    )
    chosen = run(importance_score="selective", selective_beta=0.5)
    assert len(samples) == 2  # both passes reused from the cache
    np.testing.assert_allclose(
        chosen.accuracy_drop, forget.accuracy_drop - 0.5 * retain.accuracy_drop, atol=1e-9
    )
    run(importance_score="ratio", retain_sample_size=13)
    assert len(samples) == 3 and samples[2].size == 13  # another retain sample: a new pass
    # The worst-class ratio: one pass per retained class on 12 // 9 = 1 image of each.
    worst = run(importance_score="worst_class_ratio")
    per_class = samples[3:]
    assert [c.tolist() for c in per_class] == [[c] for c in (0, 1, 2, 4, 5, 6, 7, 8, 9)]
    sample = common.retain_sample(dataclasses.replace(cfg, importance_score="worst_class_ratio"),
                                  split)  # fmt: skip
    classes = [real(model, params, batch_stats, data.to_float(sample.images[i:i + 1], "mnist"),
                    sample.labels[i:i + 1], spec) for i in range(9)]  # fmt: skip
    np.testing.assert_allclose(
        worst.loss_increase,
        selective.worst_class_ratio_importance(forget, classes).loss_increase,
        rtol=1e-6,
    )
    run(importance_score="worst_class_ratio")
    assert len(samples) == 12  # every class's pass reused from the cache
