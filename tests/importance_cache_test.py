"""The on-disk importance cache: round trip, key checks, atomic files, compute-once."""

import numpy as np

from experiments import importance_cache
from tdu_jax import importance

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
