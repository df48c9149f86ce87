"""Shared pytest fixtures."""

import os
import pathlib

import pytest

# Offline TFDS data directory next to the repository (`<repo>/../shared/tensorflow_datasets`).
_DEFAULT_TFDS_DIR = pathlib.Path(__file__).resolve().parents[2] / "shared" / "tensorflow_datasets"


@pytest.fixture(scope="session")
def tfds_dir() -> str:
    """TFDS data directory with prepared `mnist` and `cifar10`; skips the test if absent.

    The first that holds both of: $TDU_JAX_TEST_DATA_DIR, $TFDS_DATA_DIR (what README tells
    users to set), `<repo>/../shared/tensorflow_datasets`.
    """
    names = ("TDU_JAX_TEST_DATA_DIR", "TFDS_DATA_DIR")
    tried = [pathlib.Path(os.environ[n]) for n in names if os.environ.get(n)] + [_DEFAULT_TFDS_DIR]
    for path in tried:
        if all((path / name).is_dir() for name in ("mnist", "cifar10")):
            return str(path)
    pytest.skip(
        f"no TFDS data directory with mnist/ and cifar10/ in {', '.join(map(str, tried))}; "
        "set TDU_JAX_TEST_DATA_DIR or TFDS_DATA_DIR to one."
    )
