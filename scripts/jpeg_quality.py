"""Estimates the JPEG luminance quantisation table and quality of decoded CIFAR-10 images.

    python scripts/jpeg_quality.py [--split=train] [--data_dir=...]

A JPEG decoder reconstructs each 8x8 block of luma (Y) from DCT coefficients that are
integer multiples of the quantisation table's entry Q[u, v]. Re-computing the DCT of the
decoded images' Y (RGB -> YCbCr as JPEG defines it, level-shifted by 128) therefore gives
values that cluster at multiples of Q[u, v], blurred only by rounding the decoded pixels.
For each frequency, the estimate is the largest step q for which at least 200 coefficients
have |c| >= q/2 (they would round to a nonzero multiple of q) and at least 60% of those lie
within min(1, q/4) of a multiple of q: the true step passes, twice the step fails on the odd
multiples, a step beyond the coefficients' range has too few of them, and pixel noise (which
rarely reaches q/2 for a large step) cannot pass for a large step. The estimated table is
then matched to the IJG tables (``ijg_table``) of qualities 1..100. Chroma is subsampled
(4:2:0) and upsampled by the decoder, so its table cannot be read back this way; only luma
is estimated.
"""

import argparse
import json
import pathlib
import sys

import numpy as np
import scipy.fft

# The IJG (libjpeg) standard luminance table (JPEG Annex K.1), natural (row-major) order.
IJG_LUMA = np.array([
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99,
]).reshape(8, 8)  # fmt: skip
MIN_COEFFICIENTS = 200  # fewer coefficients behind a step than this: undetermined
MIN_SHARE = 0.6  # share of coefficients near a nonzero multiple that a step must explain


def ijg_table(quality: int, base: np.ndarray = IJG_LUMA) -> np.ndarray:
    """libjpeg's ``jpeg_quality_scaling`` applied to ``base`` (baseline: entries in 1..255)."""
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    return np.clip((base * scale + 50) // 100, 1, 255)


def luma_blocks(images_uint8: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N * H/8 * W/8, 8, 8) level-shifted JPEG luma blocks."""
    rgb = images_uint8.astype(np.float64)
    y = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2] - 128.0
    n, h, w = y.shape
    return y.reshape(n, h // 8, 8, w // 8, 8).transpose(0, 1, 3, 2, 4).reshape(-1, 8, 8)


def estimate_steps(blocks: np.ndarray, max_step: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """(M, 8, 8) pixel blocks -> (estimated step per frequency, 0 where undetermined;
    number of coefficients with |c| >= step / 2 behind each estimate), both (8, 8)."""
    coefficients = scipy.fft.dctn(blocks, axes=(1, 2), norm="ortho")
    steps = np.zeros((8, 8), np.int64)
    counts = np.zeros((8, 8), np.int64)
    for u in range(8):
        for v in range(8):
            c = np.sort(np.abs(coefficients[:, u, v]))
            for q in range(max_step, 1, -1):  # the largest step that explains them
                kept = c[np.searchsorted(c, q / 2) :]
                if kept.size >= MIN_COEFFICIENTS and _share_near_multiples(kept, q) >= MIN_SHARE:
                    steps[u, v], counts[u, v] = q, kept.size
                    break
    return steps, counts


def _share_near_multiples(c: np.ndarray, q: int) -> float:
    """Share of ``c`` (all >= q / 2) within min(1, q / 4) of a multiple of q."""
    return float(np.mean(np.abs(c - q * np.round(c / q)) <= min(1.0, q / 4)))


def match_quality(steps: np.ndarray) -> tuple[int, int, int]:
    """The IJG quality whose table agrees with ``steps`` on the most determined entries ->
    (quality, entries that agree, entries determined)."""
    known = steps > 0
    agree = [int(np.sum(ijg_table(q)[known] == steps[known])) for q in range(1, 101)]
    best = int(np.argmax(agree))
    return best + 1, agree[best], int(known.sum())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", default="train", choices=["train", "test"])
    parser.add_argument("--data_dir", default=None, help="TFDS data dir (default: $TFDS_DATA_DIR)")
    parser.add_argument("--out", default=None, help="Also write the result as JSON here.")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    from tdu_jax import data

    split = data.load_split("cifar10", args.split, data.resolve_data_dir(args.data_dir))
    steps, counts = estimate_steps(luma_blocks(split.images))
    quality, agree, known = match_quality(steps)
    print(f"cifar10 {args.split}: {split.size} images, {len(split.images) * 16} luma blocks")
    print("estimated luma steps (0: undetermined, fewer than "
          f"{MIN_COEFFICIENTS} coefficients of |c| >= step / 2):\n{steps}")  # fmt: skip
    print(f"IJG quality {quality}: its table agrees on {agree} of {known} determined entries")
    print(f"IJG quality {quality} table:\n{ijg_table(quality)}")
    if args.out:
        result = {"split": args.split, "steps": steps.tolist(), "counts": counts.tolist(),
                  "quality": quality, "agree": agree, "determined": known}  # fmt: skip
        pathlib.Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
