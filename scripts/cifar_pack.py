"""Ship CIFAR-10 to a machine without tensorflow-datasets, losslessly, in two parts.

The lent GPU machines take at most 64 MiB per call and have no TFDS. This packs the
TFDS arrays as lossless WebP (about 1.5 kB an image, 89 MiB in all) into two parts
that fit one call each, and unpacks them there into the ``.npz`` cache that
``tdu_jax.data.load_split`` reads (``TDU_JAX_CACHE_DIR``).

    python scripts/cifar_pack.py pack --data_dir ../shared/tensorflow_datasets --out .gpu_data
    python scripts/cifar_pack.py unpack --src .gpu_data --cache_dir /tmp/tdu_cache
    python scripts/cifar_pack.py unpack --src .gpu_data --cache_dir /tmp/warm --placeholder

Part ``a`` holds train[:30000] and every label; part ``b`` train[30000:] and test.
``--placeholder`` builds same-shaped splits from part ``a`` alone (real labels, pixels
repeated) so that a first call can compile every jitted function at the real shapes.
"""

import argparse
import io
import multiprocessing
import pathlib
import sys

import numpy as np
from PIL import Image

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from tdu_jax import data  # noqa: E402

SPLIT_AT = 30000


def _encode(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="WEBP", lossless=True, quality=100, method=4)
    return buf.getvalue()


def _decode(blob: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))


def _pack_images(images: np.ndarray, pool) -> dict:
    blobs = pool.map(_encode, list(images), chunksize=256)
    lengths = np.array([len(b) for b in blobs], np.int64)
    return {"blob": np.frombuffer(b"".join(blobs), np.uint8), "lengths": lengths}


def _unpack_images(blob: np.ndarray, lengths: np.ndarray, pool) -> np.ndarray:
    ends = np.cumsum(lengths)
    raw = blob.tobytes()
    parts = [raw[e - n : e] for e, n in zip(ends, lengths, strict=True)]
    return np.stack(pool.map(_decode, parts, chunksize=256))


def pack(data_dir: str, out: pathlib.Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    train = data.load_split("cifar10", "train", data_dir)
    test = data.load_split("cifar10", "test", data_dir)
    with multiprocessing.Pool() as pool:
        a = _pack_images(train.images[:SPLIT_AT], pool)
        np.savez(out / "cifar_a.npz", train_labels=train.labels, test_labels=test.labels,
                 train_a_blob=a["blob"], train_a_lengths=a["lengths"])  # fmt: skip
        b = _pack_images(train.images[SPLIT_AT:], pool)
        t = _pack_images(test.images, pool)
        np.savez(out / "cifar_b.npz", train_b_blob=b["blob"], train_b_lengths=b["lengths"],
                 test_blob=t["blob"], test_lengths=t["lengths"])  # fmt: skip
    for name in ("cifar_a.npz", "cifar_b.npz"):
        print(name, f"{(out / name).stat().st_size / 2**20:.1f} MiB")


def unpack(src: pathlib.Path, cache_dir: str, placeholder: bool) -> None:
    a = np.load(src / "cifar_a.npz")
    with multiprocessing.Pool() as pool:
        train_a = _unpack_images(a["train_a_blob"], a["train_a_lengths"], pool)
        if placeholder:
            n_train, n_test = a["train_labels"].size, a["test_labels"].size
            train_images = np.concatenate([train_a, train_a])[:n_train]
            test_images = train_a[:n_test]
        else:
            b = np.load(src / "cifar_b.npz")
            train_b = _unpack_images(b["train_b_blob"], b["train_b_lengths"], pool)
            train_images = np.concatenate([train_a, train_b])
            test_images = _unpack_images(b["test_blob"], b["test_lengths"], pool)
    for split, images, labels in (
        ("train", train_images, a["train_labels"]),
        ("test", test_images, a["test_labels"]),
    ):
        path = data.npz_cache_path(cache_dir, "cifar10", split)
        path.parent.mkdir(parents=True, exist_ok=True)
        data.save_npz_cache(data.Split(images, labels.astype(np.int32)), path)
        print(split, images.shape, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack")
    p.add_argument("--data_dir", required=True)
    p.add_argument("--out", type=pathlib.Path, required=True)
    u = sub.add_parser("unpack")
    u.add_argument("--src", type=pathlib.Path, required=True)
    u.add_argument("--cache_dir", required=True)
    u.add_argument("--placeholder", action="store_true")
    args = parser.parse_args()
    if args.command == "pack":
        pack(args.data_dir, args.out)
    else:
        unpack(args.src, args.cache_dir, args.placeholder)


if __name__ == "__main__":
    main()
