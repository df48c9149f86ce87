"""Tests for tdu_jax.data (real MNIST / CIFAR-10 from the offline TFDS directory)."""

import importlib.util
import os
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tdu_jax import data

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    """Keeps a developer's TFDS_DATA_DIR / TDU_JAX_CACHE_DIR out of the tests."""
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    monkeypatch.delenv(data.CACHE_DIR_ENV, raising=False)


def _toy_split(labels):
    """Split whose image i is unique: (N, 2, 2, 1) uint8 holding the bytes of int32 i."""
    labels = np.asarray(labels, np.int32)
    images = np.arange(labels.size, dtype="<i4").view(np.uint8).reshape(labels.size, 2, 2, 1)
    return data.Split(images, labels)


# ---------------------------------------------------------------------------------------------
# Metadata.


def test_dataset_metadata():
    assert data.DATASETS == ("mnist", "cifar10")
    assert data.check_dataset("mnist") == "mnist"
    assert data.check_dataset(" CIFAR10 ") == "cifar10"
    assert data.num_classes("mnist") == 10
    assert data.num_classes("cifar10") == 10
    assert data.image_shape("mnist") == (28, 28, 1)
    assert data.image_shape("cifar10") == (32, 32, 3)
    assert data.class_names("mnist") == tuple("0123456789")
    assert data.class_names("cifar10") == (
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    )


@pytest.mark.parametrize("bad", ["imagenet", "", None])
def test_check_dataset_rejects(bad):
    with pytest.raises(ValueError, match="mnist, cifar10"):
        data.check_dataset(bad)
    with pytest.raises(ValueError, match="Unknown dataset"):
        data.num_classes(bad)


@pytest.mark.parametrize("spec", ["ship", "8", 8, np.int64(8), "SHIP", "  Ship "])
def test_class_index_accepts(spec):
    assert data.class_index("cifar10", spec) == 8


def test_class_index_mnist():
    assert data.class_index("mnist", "3") == 3
    assert data.class_index("mnist", 0) == 0
    assert data.class_index("mnist", " 9") == 9


@pytest.mark.parametrize("spec", ["boat", 10, -1, "-1", "10", "", True, 2.0])
def test_class_index_rejects(spec):
    with pytest.raises(ValueError) as e:
        data.class_index("cifar10", spec)
    msg = str(e.value)
    assert repr(spec) in msg
    assert "airplane" in msg and "truck" in msg
    assert "0..9" in msg


def test_parse_classes():
    assert data.parse_classes("cifar10", "ship") == (8,)
    assert data.parse_classes("cifar10", "8") == (8,)
    assert data.parse_classes("cifar10", 8) == (8,)
    assert data.parse_classes("cifar10", "ship,cat") == (3, 8)
    assert data.parse_classes("cifar10", " ship , Cat ,ship") == (3, 8)
    assert data.parse_classes("cifar10", [8, "cat"]) == (3, 8)
    assert data.parse_classes("cifar10", ("truck", "1,2")) == (1, 2, 9)
    assert data.parse_classes("mnist", "7,1") == (1, 7)
    for empty in ["", " , ", []]:
        with pytest.raises(ValueError, match="Empty class specification"):
            data.parse_classes("cifar10", empty)
    with pytest.raises(ValueError, match="boat"):
        data.parse_classes("cifar10", "ship,boat")


# ---------------------------------------------------------------------------------------------
# Loading.


def test_mnist_train(tfds_dir):
    s = data.load_split("mnist", "train", tfds_dir)
    assert isinstance(s, data.Split)
    chex.assert_shape(s.images, (60000, 28, 28, 1))
    chex.assert_shape(s.labels, (60000,))
    assert s.images.dtype == np.uint8 and s.labels.dtype == np.int32
    assert s.size == 60000
    np.testing.assert_array_equal(np.bincount(s.labels, minlength=10), MNIST_TRAIN_COUNTS)
    # Documented train statistics of this copy.
    p = np.bincount(s.images.ravel(), minlength=256) / s.images.size
    v = np.arange(256) / 255.0
    mean = (p * v).sum()
    std = np.sqrt((p * (v - mean) ** 2).sum())
    np.testing.assert_allclose([mean, std], [0.1307, 0.3081], atol=5e-4)


def test_mnist_test(tfds_dir):
    s = data.load_split("mnist", "test", tfds_dir)
    chex.assert_shape(s.images, (10000, 28, 28, 1))
    assert s.images.dtype == np.uint8 and s.labels.dtype == np.int32
    np.testing.assert_array_equal(np.bincount(s.labels, minlength=10), MNIST_TEST_COUNTS)


@pytest.mark.parametrize("split,n", [("train", 50000), ("test", 10000)])
def test_cifar10(tfds_dir, split, n):
    s = data.load_split("cifar10", split, tfds_dir)
    chex.assert_shape(s.images, (n, 32, 32, 3))
    chex.assert_shape(s.labels, (n,))
    assert s.images.dtype == np.uint8 and s.labels.dtype == np.int32
    np.testing.assert_array_equal(np.bincount(s.labels, minlength=10), [n // 10] * 10)


def test_memo_returns_same_read_only_arrays(tfds_dir):
    a = data.load_split("mnist", "test", tfds_dir)
    b = data.load_split("MNIST", "test", tfds_dir)
    assert a.images is b.images and a.labels is b.labels
    assert not a.images.flags.writeable and not a.labels.flags.writeable
    with pytest.raises(ValueError):
        a.images[0, 0, 0, 0] = 1


def test_data_dir_from_env(tfds_dir, monkeypatch):
    monkeypatch.setenv(data.DATA_DIR_ENV, tfds_dir)
    assert data.resolve_data_dir(None) == tfds_dir
    assert data.resolve_data_dir("/explicit") == "/explicit"
    s = data.load_split("mnist", "test")
    assert s.images is data.load_split("mnist", "test", tfds_dir).images


def test_resolve_data_dir_default():
    assert data.resolve_data_dir(None) is None
    assert data.resolve_data_dir("") is None


def test_npz_cache_round_trip(tfds_dir, tmp_path):
    cache = tmp_path / "cache"
    ref = data.load_split("mnist", "test", tfds_dir, cache_dir=str(cache))
    path = cache / "mnist-3.0.1-test.npz"
    assert path.is_file()
    assert path == data.npz_cache_path(cache, "mnist", "test")
    assert sorted(os.listdir(cache)) == ["mnist-3.0.1-test.npz"]  # No temp files left.
    # No TFDS directory at all: must come from the npz file.
    missing = str(tmp_path / "no_such_tfds_dir")
    got = data.load_split("mnist", "test", missing, cache_dir=str(cache))
    assert got.images is not ref.images
    np.testing.assert_array_equal(got.images, ref.images)
    np.testing.assert_array_equal(got.labels, ref.labels)
    assert got.images.dtype == np.uint8 and got.labels.dtype == np.int32
    assert not got.images.flags.writeable
    # Memoised under the missing directory now.
    assert data.load_split("mnist", "test", missing, cache_dir=str(cache)).images is got.images


def test_npz_cache_dir_from_env(tfds_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(data.CACHE_DIR_ENV, str(tmp_path))
    data.load_split("mnist", "test", tfds_dir)
    assert (tmp_path / "mnist-3.0.1-test.npz").is_file()


def test_save_npz_cache_atomic_overwrite(tmp_path):
    path = tmp_path / "sub" / "x.npz"
    data.save_npz_cache(_toy_split([0, 1, 2]), path)
    data.save_npz_cache(_toy_split([5, 6]), path)
    with np.load(path) as z:
        np.testing.assert_array_equal(z["labels"], [5, 6])
        assert z["images"].shape == (2, 2, 2, 1)
    assert os.listdir(path.parent) == ["x.npz"]


def test_bad_npz_cache(tmp_path):
    # Wrong image shape for cifar10.
    data.save_npz_cache(_toy_split([0, 1]), data.npz_cache_path(tmp_path, "cifar10", "test"))
    with pytest.raises(ValueError, match="Delete it"):
        data.load_split("cifar10", "test", str(tmp_path / "none"), cache_dir=str(tmp_path))


def test_import_and_npz_load_without_tensorflow_datasets(tfds_dir, tmp_path):
    data.load_split("mnist", "test", tfds_dir, cache_dir=str(tmp_path))
    code = textwrap.dedent(
        f"""
        import sys
        sys.modules["tensorflow_datasets"] = None  # Any import of it now fails.
        from tdu_jax import data
        s = data.load_split("mnist", "test", cache_dir={str(tmp_path)!r})
        assert s.images.shape == (10000, 28, 28, 1), s.images.shape
        try:
            data.load_split("mnist", "train", cache_dir={str(tmp_path)!r})
        except ImportError as e:
            assert "tensorflow-datasets" in str(e) and "TDU_JAX_CACHE_DIR" in str(e), e
        else:
            raise AssertionError("expected ImportError")
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TFDS_DATA_DIR", "TDU_JAX_CACHE_DIR")}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("make_dir", [True, False])
def test_missing_data_dir(tmp_path, make_dir):
    d = tmp_path / "tfds"
    if make_dir:
        (d / "cifar10").mkdir(parents=True)  # Present but not prepared.
    with pytest.raises(FileNotFoundError) as e:
        data.load_split("cifar10", "test", str(d))
    assert str(d) in str(e.value)
    assert "TFDS_DATA_DIR" in str(e.value) and "--data_dir" in str(e.value)
    assert not (d / "cifar10" / "3.0.2").exists()  # Nothing downloaded / prepared there.


def test_missing_data_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="TFDS_DATA_DIR"):
        data.load_split("mnist", "train")


def test_bad_split_and_dataset():
    with pytest.raises(ValueError, match="'validation'.*train, test"):
        data.load_split("mnist", "validation", "/nonexistent")
    with pytest.raises(ValueError, match="'svhn'.*mnist, cifar10"):
        data.load_split("svhn", "train", "/nonexistent")


# ---------------------------------------------------------------------------------------------
# Preprocessing.


def test_to_float_mnist():
    x = np.array([0, 128, 255], np.uint8).reshape(1, 1, 3, 1)
    want = (x.astype(np.float64) / 255.0 - 0.1307) / 0.3081
    got = data.to_float(x, "mnist")
    assert got.dtype == jnp.float32
    chex.assert_shape(got, (1, 1, 3, 1))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_to_float_cifar_jax_and_jit():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
    mean = np.array([0.4914, 0.4822, 0.4465])
    std = np.array([0.2470, 0.2435, 0.2616])
    want = (x / 255.0 - mean) / std
    np.testing.assert_allclose(data.to_float(jnp.asarray(x), "cifar10"), want, atol=1e-5)
    jitted = jax.jit(data.to_float, static_argnums=1)(jnp.asarray(x), "cifar10")
    np.testing.assert_allclose(jitted, want, atol=1e-5)
    assert jitted.dtype == jnp.float32


# ---------------------------------------------------------------------------------------------
# Subsets.


def test_forget_retain_real(tfds_dir):
    s = data.load_split("cifar10", "test", tfds_dir)
    forget, retain = data.forget_retain(s, data.parse_classes("cifar10", "ship"))
    assert forget.size == 1000 and retain.size == 9000
    assert set(np.unique(forget.labels)) == {8}
    assert 8 not in set(np.unique(retain.labels))
    chex.assert_shape(forget.images, (1000, 32, 32, 3))
    assert forget.images.dtype == np.uint8 and forget.labels.dtype == np.int32
    np.testing.assert_array_equal(data.select_classes(s, [8]).images, forget.images)


def test_forget_retain_multi_class(tfds_dir):
    s = data.load_split("mnist", "train", tfds_dir)
    classes = data.parse_classes("mnist", "1,7")
    forget, retain = data.forget_retain(s, classes)
    assert forget.size == MNIST_TRAIN_COUNTS[1] + MNIST_TRAIN_COUNTS[7]
    assert forget.size + retain.size == s.size
    assert set(np.unique(forget.labels)) == {1, 7}
    assert not np.isin(retain.labels, classes).any()
    with pytest.raises(ValueError, match="forget_classes"):
        data.forget_retain(s, [])


def test_forget_retain_order_and_select_toy():
    s = _toy_split([3, 1, 3, 0, 2])
    forget, retain = data.forget_retain(s, (3,))
    np.testing.assert_array_equal(forget.labels, [3, 3])
    np.testing.assert_array_equal(forget.images, s.images[[0, 2]])
    np.testing.assert_array_equal(retain.labels, [1, 0, 2])
    np.testing.assert_array_equal(retain.images, s.images[[1, 3, 4]])
    np.testing.assert_array_equal(data.select_classes(s, [0, 1]).labels, [1, 0])
    assert data.select_classes(s, [9]).size == 0


def test_random_fraction():
    s = _toy_split(np.arange(1000) % 10)
    a = data.random_fraction(s, 0.1, seed=0)
    b = data.random_fraction(s, 0.1, seed=0)
    c = data.random_fraction(s, 0.1, seed=1)
    assert a.size == 100 and c.size == 100
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert not np.array_equal(a.images, c.images)
    assert np.all(np.diff(_indices_of(s, a)) > 0)  # Original order kept.
    assert data.random_fraction(s, 1.0, seed=3).size == 1000
    assert data.random_fraction(s, 1e-9, seed=3).size == 1
    assert data.random_fraction(s, 0.0125, seed=3).size == round(12.5)


def _indices_of(full, sub):
    """Positions in `full` of the examples of a `_toy_split` subset."""
    return sub.images.reshape(sub.size, 4).copy().view("<i4")[:, 0]


@pytest.mark.parametrize("fraction", [0.0, -0.5, 1.5, float("nan")])
def test_random_fraction_rejects(fraction):
    with pytest.raises(ValueError, match="fraction"):
        data.random_fraction(_toy_split([0, 1, 2]), fraction, seed=0)


def test_take():
    s = _toy_split([4, 5, 6, 7])
    t = data.take(s, 2)
    np.testing.assert_array_equal(t.labels, [4, 5])
    np.testing.assert_array_equal(t.images, s.images[:2])
    assert data.take(s, 10).size == 4
    assert data.take(s, 0).size == 0
    with pytest.raises(ValueError):
        data.take(s, -1)


# ---------------------------------------------------------------------------------------------
# Batching and augmentation.


def test_batch_indices_epochs():
    key = jax.random.key(0)
    n, bs = 10, 3
    idx = data.batch_indices(n, bs, key, num_batches=7)
    assert idx.shape == (7, 3) and idx.dtype == np.int32
    # 3 batches per epoch (remainder 1 dropped); each epoch is a slice of a fresh permutation.
    for epoch in range(3):
        chunk = idx[3 * epoch : 3 * epoch + 3].ravel()
        perm = np.asarray(jax.random.permutation(jax.random.fold_in(key, epoch), n))
        np.testing.assert_array_equal(chunk, perm[: chunk.size])
        assert len(set(chunk.tolist())) == chunk.size
    assert not np.array_equal(idx[0:3], idx[3:6])
    np.testing.assert_array_equal(idx, data.batch_indices(n, bs, key, 7))
    np.testing.assert_array_equal(idx[:4], data.batch_indices(n, bs, key, 4))
    assert not np.array_equal(idx, data.batch_indices(n, bs, jax.random.key(1), 7))


def test_batch_indices_full_epoch_is_permutation():
    idx = data.batch_indices(12, 4, jax.random.PRNGKey(3), num_batches=9)  # Raw uint32 key.
    for epoch in range(3):
        np.testing.assert_array_equal(
            np.sort(idx[3 * epoch : 3 * epoch + 3].ravel()), np.arange(12)
        )
    assert data.batch_indices(5, 5, jax.random.key(0), 0).shape == (0, 5)


@pytest.mark.parametrize("bs", [0, -1, 11])
def test_batch_indices_rejects_batch_size(bs):
    with pytest.raises(ValueError, match="batch_size"):
        data.batch_indices(10, bs, jax.random.key(0), 1)


def test_batch_indices_rejects_others():
    with pytest.raises(ValueError, match="num_batches"):
        data.batch_indices(10, 2, jax.random.key(0), -1)
    with pytest.raises(ValueError, match="num_examples"):
        data.batch_indices(0, 1, jax.random.key(0), 1)


def _candidates(img, pad=4):
    """All (2*pad+1)^2 crops of the zero-padded image, with and without a horizontal flip."""
    h, w, _ = img.shape
    padded = np.pad(img, ((pad, pad), (pad, pad), (0, 0)))
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[dy : dy + h, dx : dx + w]
            yield (dy, dx, False), crop
            yield (dy, dx, True), crop[:, ::-1]


def test_augment_cifar_is_crop_and_flip():
    rng = np.random.default_rng(0)
    images = rng.integers(1, 256, (32, 32, 32, 3), dtype=np.uint8)  # No zeros: padding is visible.
    out = data.augment_cifar(jax.random.key(0), jnp.asarray(images))
    assert out.shape == images.shape and out.dtype == jnp.uint8
    out = np.asarray(out)
    seen = set()
    for img, got in zip(images, out, strict=True):
        matches = [params for params, cand in _candidates(img) if np.array_equal(cand, got)]
        assert len(matches) == 1
        seen.add(matches[0])
    assert {flip for _, _, flip in seen} == {False, True}
    assert len({(dy, dx) for dy, dx, _ in seen}) > 10


def test_augment_cifar_constant_image():
    images = jnp.full((16, 32, 32, 3), 7, jnp.uint8)
    out = np.asarray(data.augment_cifar(jax.random.key(1), images))
    assert set(np.unique(out).tolist()) <= {0, 7}
    for img in out:
        nonzero = img[..., 0] != 0
        rows, cols = np.nonzero(nonzero.any(1))[0], np.nonzero(nonzero.any(0))[0]
        # The constant part is one rectangle of at least 28x28; zeros only in border strips.
        assert rows.size >= 28 and cols.size >= 28
        assert np.all(nonzero[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1])
        assert rows[0] in (0, 32 - rows.size) and cols[0] in (0, 32 - cols.size)
        assert nonzero.sum() == rows.size * cols.size
        assert np.all((img == 7) == nonzero[..., None])


def test_augment_cifar_deterministic_per_key(tfds_dir):
    images = jnp.asarray(data.load_split("cifar10", "test", tfds_dir).images[:64])
    a = data.augment_cifar(jax.random.key(5), images)
    b = data.augment_cifar(jax.random.key(5), images)
    c = data.augment_cifar(jax.random.key(6), images)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    f = data.augment_cifar(jax.random.key(5), images.astype(jnp.float32))
    assert f.dtype == jnp.float32
    np.testing.assert_array_equal(f, a.astype(jnp.float32))


# ---------------------------------------------------------------------------------------------
# check_available: where data is looked for, before any work.


def _offline():
    return False


def _must_not_probe():
    raise AssertionError("the network must not be probed when data is found")


def test_check_available_finds_prepared_dirs(tfds_dir, tmp_path, monkeypatch):
    assert data.check_available("mnist", tfds_dir, online=_must_not_probe) == f"TFDS {tfds_dir}"
    monkeypatch.setenv(data.DATA_DIR_ENV, tfds_dir)
    assert data.check_available("cifar10", online=_must_not_probe) == f"TFDS {tfds_dir}"
    # The TFDS default directory (~/tensorflow_datasets) counts when nothing is given.
    monkeypatch.delenv(data.DATA_DIR_ENV)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "tensorflow_datasets").symlink_to(tfds_dir)
    where = data.check_available("mnist", online=_must_not_probe)
    assert where == f"TFDS {tmp_path / 'tensorflow_datasets'}"


def test_check_available_npz_cache_needs_both_splits(tmp_path, monkeypatch):
    empty = str(tmp_path / "empty")
    split = data.Split(np.zeros((2, 28, 28, 1), np.uint8), np.zeros(2, np.int32))
    data.save_npz_cache(split, data.npz_cache_path(tmp_path, "mnist", "train"))
    with pytest.raises(data.DataNotFoundError, match="mnist-\\*.npz"):
        data.check_available("mnist", empty, cache_dir=str(tmp_path), online=_offline)
    data.save_npz_cache(split, data.npz_cache_path(tmp_path, "mnist", "test"))
    where = data.check_available("mnist", empty, cache_dir=str(tmp_path), online=_must_not_probe)
    assert where == f"npz cache {tmp_path}"


def test_check_available_offline_names_searched_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(data.DataNotFoundError) as info:
        data.check_available("mnist", online=_offline)
    message = str(info.value)
    assert "\n" not in message
    assert str(tmp_path / "tensorflow_datasets" / "mnist") in message
    assert "TFDS_DATA_DIR" in message and "--data_dir" in message
    if importlib.util.find_spec("tensorflow_datasets") is None:
        assert "tensorflow-datasets is not installed" in message
        return
    assert "no network" in message
    # Online: TFDS may download into its default directory.
    assert data.check_available("mnist", online=lambda: True).startswith("TFDS download into")


def test_check_available_given_dir_never_downloads(tmp_path):
    calls = []
    with pytest.raises(data.DataNotFoundError, match="--data_dir") as info:
        data.check_available("cifar10", str(tmp_path / "nope"), online=lambda: calls.append(1))
    assert str(tmp_path / "nope" / "cifar10") in str(info.value)
    assert not calls  # nothing is downloaded into a given directory, so no probe either
