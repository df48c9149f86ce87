"""Shared pytest fixtures."""

import os
import pathlib

import pytest

# Offline TFDS data directory next to the repository (`<repo>/../shared/tensorflow_datasets`).
_DEFAULT_TFDS_DIR = pathlib.Path(__file__).resolve().parents[2] / "shared" / "tensorflow_datasets"


@pytest.fixture(scope="session")
def tfds_dir() -> str:
    """TFDS data directory with prepared `mnist` and `cifar10`; skips the test if absent.

    Defaults to `<repo>/../shared/tensorflow_datasets`; override with $TDU_JAX_TEST_DATA_DIR.
    """
    path = pathlib.Path(os.environ.get("TDU_JAX_TEST_DATA_DIR") or _DEFAULT_TFDS_DIR)
    if not all((path / name).is_dir() for name in ("mnist", "cifar10")):
        pytest.skip(
            f"TFDS data directory {path} with mnist/ and cifar10/ not found; "
            "set TDU_JAX_TEST_DATA_DIR to one."
        )
    return str(path)
