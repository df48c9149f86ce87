"""scripts/jpeg_quality.py: the luma table read back from decoded pixels is the encoder's."""

import importlib.util
import io
import pathlib

import numpy as np
import pytest
from PIL import Image

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "jpeg_quality.py"
_spec = importlib.util.spec_from_file_location("jpeg_quality", SCRIPT)
jpeg_quality = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(jpeg_quality)


def _jpeg_round_trip(quality: int, n: int = 1500) -> np.ndarray:
    """Smooth random 32x32 colour images through Pillow's libjpeg at ``quality``."""
    rng = np.random.default_rng(quality)
    out = []
    for _ in range(n):
        coarse = rng.normal(128, 35, (8, 8, 3))
        image = np.kron(coarse, np.ones((4, 4, 1))) + rng.normal(0, 10, (32, 32, 3))
        encoded = _as_jpeg(np.clip(image, 0, 255).astype(np.uint8), quality)
        out.append(np.asarray(Image.open(encoded).convert("RGB")))
    return np.stack(out)


def test_ijg_scaling_by_hand():
    # Quality 75 halves the standard table (scale 50): (16 * 50 + 50) // 100 = 8.
    assert jpeg_quality.ijg_table(75)[0, 0] == 8 and jpeg_quality.ijg_table(75)[7, 7] == 50
    assert jpeg_quality.ijg_table(50)[0, 0] == 16 and jpeg_quality.ijg_table(100).max() == 1
    assert jpeg_quality.ijg_table(10)[0, 0] == 80  # scale 500


@pytest.mark.parametrize("quality", [75, 90])
def test_estimated_luma_steps_are_the_encoders(quality):
    images = _jpeg_round_trip(quality)
    encoded = Image.open(_as_jpeg(images[0], quality))
    table = np.array(encoded.quantization[0]).reshape(8, 8)
    np.testing.assert_array_equal(table, jpeg_quality.ijg_table(quality))  # Pillow is IJG
    steps, counts = jpeg_quality.estimate_steps(jpeg_quality.luma_blocks(images))
    known = steps > 0
    assert known.sum() >= 40  # the low frequencies, at least
    assert (counts[known] >= jpeg_quality.MIN_COEFFICIENTS).all()
    np.testing.assert_array_equal(steps[known], table[known])
    assert jpeg_quality.match_quality(steps) == (quality, int(known.sum()), int(known.sum()))


def _as_jpeg(image: np.ndarray, quality: int) -> io.BytesIO:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=quality)
    return buffer
