"""MNIST / CIFAR-10 loading, class bookkeeping, subsets, batching and augmentation.

Whole splits are held in memory as numpy arrays (`Split`): uint8 NHWC images and int32 labels.
Data come from TensorFlow Datasets' random-access `tfds.data_source` (no TensorFlow needed), or
from an on-disk `.npz` cache, so machines without `tensorflow_datasets` can still load data.
`tensorflow_datasets` is imported lazily, only when a split is actually read through TFDS.

Environment variables:
  TFDS_DATA_DIR: TFDS data directory used when `data_dir` is not given.
  TDU_JAX_CACHE_DIR: `.npz` cache directory used when `cache_dir` is not given.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import pathlib
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tdu_jax import atomic

DATASETS = ("mnist", "cifar10")
SPLITS = ("train", "test")

_CLASS_NAMES = {
    "mnist": tuple(str(i) for i in range(10)),
    "cifar10": (
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
    ),
}
_IMAGE_SHAPES = {"mnist": (28, 28, 1), "cifar10": (32, 32, 3)}
# TFDS versions the `.npz` cache file names refer to (those of tensorflow-datasets 4.9.x).
_VERSIONS = {"mnist": "3.0.1", "cifar10": "3.0.2"}
# Per-channel mean / std of the train split, on [0, 1] pixel values.
_MEANS = {"mnist": (0.1307,), "cifar10": (0.4914, 0.4822, 0.4465)}
_STDS = {"mnist": (0.3081,), "cifar10": (0.2470, 0.2435, 0.2616)}

DATA_DIR_ENV = "TFDS_DATA_DIR"
CACHE_DIR_ENV = "TDU_JAX_CACHE_DIR"

# In-process memo: (dataset, split, resolved data dir) -> read-only Split.
_MEMO: dict[tuple[str, str, str | None], Split] = {}


class Split(NamedTuple):
    """One dataset split held in memory.

    Attributes:
      images: uint8 (N, H, W, C).
      labels: int32 (N,).
    """

    images: np.ndarray
    labels: np.ndarray

    @property
    def size(self) -> int:
        """Number of examples N (`len()` of a NamedTuple is its field count)."""
        return int(self.labels.shape[0])


# ---------------------------------------------------------------------------------------------
# Dataset and class metadata.


def check_dataset(dataset: str) -> str:
    """Validates a dataset name.

    Args:
      dataset: one of `DATASETS` (surrounding whitespace and case are ignored).

    Returns:
      The canonical lower-case name.
    """
    name = dataset.strip().lower() if isinstance(dataset, str) else None
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {dataset!r}; allowed values: {', '.join(DATASETS)}.")
    return name


def class_names(dataset: str) -> tuple[str, ...]:
    """Class names in label order.

    Args:
      dataset: dataset name.

    Returns:
      Tuple of C names; index i is the name of label i.
    """
    return _CLASS_NAMES[check_dataset(dataset)]


def num_classes(dataset: str) -> int:
    """Number of classes C of `dataset`."""
    return len(class_names(dataset))


def image_shape(dataset: str) -> tuple[int, int, int]:
    """Image shape (H, W, C) of `dataset`."""
    return _IMAGE_SHAPES[check_dataset(dataset)]


def class_index(dataset: str, name_or_index: str | int) -> int:
    """Resolves a class given by name or index.

    Args:
      dataset: dataset name.
      name_or_index: a class name (case-insensitive, surrounding whitespace ignored, e.g. "Ship"),
        a decimal index string ("8") or an int index (8).

    Returns:
      The label index in [0, C).
    """
    names = class_names(dataset)
    n = len(names)
    index = None
    if isinstance(name_or_index, int | np.integer) and not isinstance(name_or_index, bool):
        index = int(name_or_index)
    elif isinstance(name_or_index, str):
        text = name_or_index.strip().lower()
        lowered = [c.lower() for c in names]
        if text in lowered:
            return lowered.index(text)
        if text.isdigit():
            index = int(text)
    if index is None or not 0 <= index < n:
        raise ValueError(
            f"Unknown class {name_or_index!r} for dataset {dataset!r}; allowed names: "
            f"{', '.join(names)}; or an index in 0..{n - 1}."
        )
    return index


def parse_classes(dataset: str, spec: str | int | Sequence[str | int]) -> tuple[int, ...]:
    """Parses a class specification into sorted unique label indices.

    Args:
      dataset: dataset name.
      spec: a class name or index ("ship", "8", 8), a comma-separated string ("ship,cat"), or a
        sequence of those ([8, "cat"]). Empty comma-separated items are ignored.

    Returns:
      Sorted tuple of unique label indices; never empty.
    """
    items = [spec] if isinstance(spec, str | int | np.integer) else list(spec)
    indices = set()
    for item in items:
        if isinstance(item, str):
            for part in item.split(","):
                if part.strip():
                    indices.add(class_index(dataset, part))
        else:
            indices.add(class_index(dataset, item))
    if not indices:
        raise ValueError(f"Empty class specification {spec!r} for dataset {dataset!r}.")
    return tuple(sorted(indices))


# ---------------------------------------------------------------------------------------------
# Loading and caching.


def resolve_data_dir(data_dir: str | None) -> str | None:
    """Chooses the TFDS data directory.

    Args:
      data_dir: explicit directory, or None / "".

    Returns:
      `data_dir` if given, else $TFDS_DATA_DIR if set and non-empty, else None (TFDS default).
    """
    if data_dir:
        return os.path.expanduser(str(data_dir))
    env = os.environ.get(DATA_DIR_ENV)
    return os.path.expanduser(env) if env else None


def _resolve_cache_dir(cache_dir: str | None) -> str | None:
    if cache_dir:
        return os.path.expanduser(str(cache_dir))
    env = os.environ.get(CACHE_DIR_ENV)
    return os.path.expanduser(env) if env else None


def npz_cache_path(cache_dir: str | os.PathLike, dataset: str, split: str) -> pathlib.Path:
    """Path of the `.npz` cache file `<cache_dir>/<dataset>-<version>-<split>.npz`."""
    dataset = check_dataset(dataset)
    return pathlib.Path(cache_dir) / f"{dataset}-{_VERSIONS[dataset]}-{split}.npz"


def save_npz_cache(split: Split, path: str | os.PathLike) -> None:
    """Writes a split to an (uncompressed) `.npz` file atomically.

    The data go to a temporary file in the same directory, which then replaces `path`, so readers
    never see a partial file. Parent directories are created.

    Args:
      split: uint8 (N, H, W, C) images and int32 (N,) labels.
      path: destination file; should end in ".npz".
    """
    atomic.atomic_write(
        path,
        lambda f: np.savez(f, images=np.asarray(split.images), labels=np.asarray(split.labels)),
        binary=True,
    )


def _load_npz_cache(path: pathlib.Path, dataset: str) -> Split:
    with np.load(path, allow_pickle=False) as z:
        if "images" not in z.files or "labels" not in z.files:
            raise ValueError(f"Cache file {path} lacks 'images'/'labels'; delete it to rebuild.")
        images, labels = z["images"], z["labels"]
    shape = image_shape(dataset)
    if (
        images.dtype != np.uint8
        or images.ndim != 4
        or images.shape[1:] != shape
        or labels.shape != images.shape[:1]
    ):
        raise ValueError(
            f"Cache file {path} holds images {images.dtype} {images.shape} and labels "
            f"{labels.dtype} {labels.shape}; expected uint8 (N, {', '.join(map(str, shape))}) "
            "and (N,) labels. Delete it to rebuild."
        )
    return Split(images, labels.astype(np.int32, copy=False))


def _is_prepared(data_dir: str, dataset: str) -> bool:
    root = pathlib.Path(data_dir) / dataset
    if not root.is_dir():
        return False
    return any((v / "dataset_info.json").is_file() for v in root.iterdir() if v.is_dir())


class DataNotFoundError(FileNotFoundError):
    """A dataset is neither prepared where it was looked for nor downloadable from here."""


# Host of TFDS's MNIST / CIFAR-10 download URLs, probed to tell "offline" from "will download".
_DOWNLOAD_PROBE = ("storage.googleapis.com", 443)


def default_tfds_dir() -> str:
    """TFDS's own default data directory, used when neither `data_dir` nor $TFDS_DATA_DIR is set."""
    return os.path.expanduser(os.path.join("~", "tensorflow_datasets"))


def network_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to TFDS's download host opens within `timeout` seconds."""
    import socket

    try:
        with socket.create_connection(_DOWNLOAD_PROBE, timeout=timeout):
            return True
    except OSError:
        return False


def check_available(
    dataset: str,
    data_dir: str | None = None,
    cache_dir: str | None = None,
    *,
    online: Callable[[], bool] = network_reachable,
) -> str:
    """Checks, before any work, that `load_split` will find both splits of `dataset`.

    Looks where `load_split` looks, in its order: the `.npz` cache, then the TFDS directory
    (`data_dir`, else $TFDS_DATA_DIR, else TFDS's default, which may be downloaded into).

    Args:
      dataset: "mnist" or "cifar10".
      data_dir: TFDS data directory as given to `load_split` (None: $TFDS_DATA_DIR / default).
      cache_dir: `.npz` cache directory as given to `load_split` (None: $TDU_JAX_CACHE_DIR).
      online: called only when a download would be needed; True if the download host answers.

    Returns:
      A short description of where the data will come from.

    Raises:
      DataNotFoundError: one line naming every directory searched and how to point
        $TFDS_DATA_DIR / --data_dir at prepared data.
    """
    dataset = check_dataset(dataset)
    cache = _resolve_cache_dir(cache_dir)
    if cache and all(npz_cache_path(cache, dataset, s).is_file() for s in SPLITS):
        return f"npz cache {cache}"
    explicit = resolve_data_dir(data_dir)
    if explicit is not None and "://" in explicit:
        return f"TFDS {explicit}"  # remote (e.g. gs://): only TFDS itself can tell
    directory = explicit or default_tfds_dir()
    if _is_prepared(directory, dataset):
        return f"TFDS {directory}"
    searched = [f"{os.path.join(directory, dataset)} ({_dir_origin(data_dir)})"]
    if cache:
        searched.append(f"{cache} (${CACHE_DIR_ENV}, {dataset}-*.npz)")
    if explicit is None:
        has_tfds = importlib.util.find_spec("tensorflow_datasets") is not None
        if has_tfds and online():
            return f"TFDS download into {directory}"
        why = "no network to download it" if has_tfds else "tensorflow-datasets is not installed"
    else:
        why = "nothing is downloaded into a given directory"
    raise DataNotFoundError(
        f"No prepared {dataset!r} data found and {why}; searched: {'; '.join(searched)}. "
        f"Point ${DATA_DIR_ENV} or --data_dir at a TFDS data directory that holds "
        f"{dataset}/<version>/dataset_info.json (e.g. export "
        f"{DATA_DIR_ENV}=/path/to/tensorflow_datasets), or prepare it once online."
    )


def _dir_origin(data_dir: str | None) -> str:
    if data_dir:
        return "--data_dir"
    return f"${DATA_DIR_ENV}" if os.environ.get(DATA_DIR_ENV) else "TFDS default"


def _load_tfds(dataset: str, split: str, data_dir: str | None) -> Split:
    if data_dir is not None and "://" not in data_dir and not _is_prepared(data_dir, dataset):
        raise FileNotFoundError(
            f"No prepared TFDS dataset {dataset!r} in data directory {data_dir!r} (looked for "
            f"{os.path.join(data_dir, dataset, '<version>', 'dataset_info.json')}). Point "
            f"${DATA_DIR_ENV} or --data_dir at a TFDS data directory holding {dataset!r}, or "
            f"unset both to download into the TFDS default directory."
        )
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError(
            f"tensorflow-datasets is needed to read {dataset!r}/{split!r} (pip install "
            f"tensorflow-datasets), or provide a .npz cache via cache_dir / ${CACHE_DIR_ENV}."
        ) from e
    if data_dir is None:
        # TFDS default directory, downloading and preparing if needed.
        ds = tfds.data_source(dataset, split=split, download=True)
    else:
        # `data_source` must get data_dir explicitly; never download into a given directory.
        ds = tfds.data_source(dataset, split=split, data_dir=data_dir, download=False)
    examples = ds.__getitems__(range(len(ds)))
    if examples:
        images = np.stack([np.asarray(e["image"], dtype=np.uint8) for e in examples])
    else:
        images = np.zeros((0, *image_shape(dataset)), np.uint8)
    labels = np.asarray([e["label"] for e in examples], dtype=np.int32)
    return Split(images, labels)


def load_split(
    dataset: str,
    split: str,
    data_dir: str | None = None,
    cache_dir: str | None = None,
) -> Split:
    """Loads a whole split into memory.

    Lookup order: in-process memo, then the `.npz` disk cache (if a cache directory is set), then
    TFDS. A TFDS read is written to the disk cache when one is set.

    Args:
      dataset: "mnist" or "cifar10".
      split: "train" or "test".
      data_dir: TFDS data directory; defaults to $TFDS_DATA_DIR, else the TFDS default directory
        (downloading there if needed). A given directory must hold the prepared dataset.
      cache_dir: `.npz` cache directory; defaults to $TDU_JAX_CACHE_DIR, else no disk cache.

    Returns:
      Split with read-only uint8 (N, H, W, C) images and int32 (N,) labels. Repeated calls in one
      process return the same arrays.
    """
    dataset = check_dataset(dataset)
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; allowed values: {', '.join(SPLITS)}.")
    data_dir = resolve_data_dir(data_dir)
    cache_dir = _resolve_cache_dir(cache_dir)
    cache_path = npz_cache_path(cache_dir, dataset, split) if cache_dir else None
    key = (dataset, split, data_dir)

    result = _MEMO.get(key)
    if result is None:
        if cache_path is not None and cache_path.is_file():
            result = _load_npz_cache(cache_path, dataset)
        else:
            result = _load_tfds(dataset, split, data_dir)
        for arr in result:
            arr.setflags(write=False)
        _MEMO[key] = result
    if cache_path is not None and not cache_path.is_file():
        save_npz_cache(result, cache_path)
    return result


def clear_memo() -> None:
    """Empties the in-process memo of `load_split`."""
    _MEMO.clear()


# ---------------------------------------------------------------------------------------------
# Preprocessing.


def to_float(images: np.ndarray | jax.Array, dataset: str) -> jax.Array:
    """Normalises uint8 images with the dataset's per-channel train mean / std.

    Args:
      images: uint8 (..., H, W, C) numpy or jax array with values in [0, 255].
      dataset: dataset name (selects mean / std).

    Returns:
      float32 jax array, same shape: (images / 255 - mean) / std.
    """
    dataset = check_dataset(dataset)
    mean = jnp.asarray(_MEANS[dataset], jnp.float32)
    std = jnp.asarray(_STDS[dataset], jnp.float32)
    x = jnp.asarray(images).astype(jnp.float32) / 255.0
    return (x - mean) / std


# ---------------------------------------------------------------------------------------------
# Subsets.


def _subset(split: Split, index: np.ndarray) -> Split:
    return Split(split.images[index], split.labels[index])


def select_classes(split: Split, classes: Sequence[int]) -> Split:
    """Examples whose label is in `classes`, in their original order.

    Args:
      split: (N, H, W, C) images, (N,) labels.
      classes: label indices.

    Returns:
      Split of the M <= N matching examples.
    """
    return _subset(split, np.isin(split.labels, np.asarray(list(classes), dtype=np.int64)))


def forget_retain(split: Split, forget_classes: Sequence[int]) -> tuple[Split, Split]:
    """Partitions a split by class into forget and retain sets (original order kept).

    Args:
      split: (N, H, W, C) images, (N,) labels.
      forget_classes: non-empty label indices to forget.

    Returns:
      (forget, retain): examples with a label in `forget_classes`, and all others.
    """
    forget_classes = list(forget_classes)
    if not forget_classes:
        raise ValueError("forget_classes must name at least one class.")
    mask = np.isin(split.labels, np.asarray(forget_classes, dtype=np.int64))
    return _subset(split, mask), _subset(split, ~mask)


def random_fraction(split: Split, fraction: float, seed: int) -> Split:
    """Seeded random subset of a split, in original order.

    Args:
      split: (N, H, W, C) images, (N,) labels with N >= 1.
      fraction: share of examples to keep, in (0, 1].
      seed: numpy random seed; equal seeds give equal subsets.

    Returns:
      Split of max(1, round(fraction * N)) examples.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got fraction={fraction!r}.")
    n = split.size
    if n == 0:
        raise ValueError("random_fraction needs a non-empty split.")
    k = max(1, round(fraction * n))
    index = np.random.default_rng(seed).choice(n, size=k, replace=False)
    return _subset(split, np.sort(index))


def take(split: Split, n: int) -> Split:
    """First `n` examples (all of them if the split is shorter).

    Args:
      split: (N, H, W, C) images, (N,) labels.
      n: number of examples, >= 0.

    Returns:
      Split of min(n, N) examples.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got n={n}.")
    return Split(split.images[:n], split.labels[:n])


# ---------------------------------------------------------------------------------------------
# Batching and augmentation.


def batch_indices(
    num_examples: int, batch_size: int, key: jax.Array, num_batches: int
) -> np.ndarray:
    """Example indices for a stream of fixed-size batches over repeated epochs.

    Epoch e is the permutation `jax.random.permutation(jax.random.fold_in(key, e), num_examples)`
    cut into `num_examples // batch_size` batches; each epoch's remainder is dropped.

    Args:
      num_examples: dataset size N >= 1.
      batch_size: B with 1 <= B <= N.
      key: PRNG key (typed or raw uint32).
      num_batches: number of batches to return, >= 0.

    Returns:
      int32 (num_batches, B) indices into [0, N).
    """
    if num_examples < 1:
        raise ValueError(f"num_examples must be >= 1, got num_examples={num_examples}.")
    if not 1 <= batch_size <= num_examples:
        raise ValueError(
            f"batch_size must be in 1..num_examples={num_examples}, got batch_size={batch_size}."
        )
    if num_batches < 0:
        raise ValueError(f"num_batches must be >= 0, got num_batches={num_batches}.")
    per_epoch = num_examples // batch_size
    num_epochs = -(-num_batches // per_epoch)
    if num_epochs == 0:
        return np.zeros((0, batch_size), np.int32)
    perms = jax.vmap(lambda e: jax.random.permutation(jax.random.fold_in(key, e), num_examples))(
        jnp.arange(num_epochs, dtype=jnp.uint32)
    )
    perms = np.asarray(perms, dtype=np.int32)[:, : per_epoch * batch_size]
    return np.ascontiguousarray(perms.reshape(-1, batch_size)[:num_batches])


@functools.partial(jax.jit, static_argnames=("pad",))
def augment_cifar(key: jax.Array, images: jax.Array, pad: int = 4) -> jax.Array:
    """Random crop after zero padding plus random horizontal flip, independently per example.

    Each image is zero-padded by `pad` pixels on every side, an (H, W) window is cut at a uniform
    random offset in 0..2*pad along each axis, and the result is mirrored left-right with
    probability 1/2. A pure function of `key`.

    Args:
      key: PRNG key (typed or raw uint32).
      images: (B, H, W, C) array, any dtype.
      pad: padding in pixels (static).

    Returns:
      Augmented images, same shape and dtype.
    """
    _, h, w, c = images.shape
    keys = jax.random.split(key, images.shape[0])

    def one(k, img):
        k_crop, k_flip = jax.random.split(k)
        dy, dx = jax.random.randint(k_crop, (2,), 0, 2 * pad + 1)
        padded = jnp.pad(img, ((pad, pad), (pad, pad), (0, 0)))
        out = jax.lax.dynamic_slice(padded, (dy, dx, 0), (h, w, c))
        return jnp.where(jax.random.bernoulli(k_flip), out[:, ::-1], out)

    return jax.vmap(one)(keys, images)
