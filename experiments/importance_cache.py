"""On-disk cache of importance scores, keyed by everything that determines them.

Importance is the costly step of a run (minutes on CPU). A resumed or repeated run with
the same base model, importance sample, granularity and estimator loads it from
``<workdir>/importance/<hash>.npz`` instead. The key is stored beside the arrays and
checked on load, so a changed setting (another hash) or a stale file (another key)
never gives the wrong scores. Files are written atomically (temp file + ``os.replace``).
"""

import json
import os
import pathlib
from collections.abc import Callable

import numpy as np
from absl import logging

from tdu_jax import atomic, checkpoint, importance

FORMAT = 1  # bump when the stored layout changes


def cache_path(workdir: str | os.PathLike, key: dict) -> pathlib.Path:
    """``<workdir>/importance/<16-hex hash of key>.npz``."""
    return pathlib.Path(workdir) / "importance" / f"{checkpoint.config_key(key)}.npz"


def _key_text(key: dict) -> str:
    return json.dumps({**key, "cache_format": FORMAT}, sort_keys=True, default=str)


def save(path: str | os.PathLike, imp: importance.Importance, key: dict) -> None:
    """Writes ``imp`` and its key to ``path`` atomically (parents are created)."""
    arrays = {f"field_{name}": np.asarray(value) for name, value in imp._asdict().items()}
    atomic.atomic_write(
        path, lambda f: np.savez(f, key=np.asarray(_key_text(key)), **arrays), binary=True
    )


def load(path: str | os.PathLike, key: dict) -> importance.Importance | None:
    """The importance stored at ``path`` for ``key``; None if absent, stale or unreadable."""
    path = pathlib.Path(path)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) != _key_text(key):
                return None
            fields = {n[len("field_") :]: z[n] for n in z.files if n.startswith("field_")}
        scalars = {n: fields[n].item() for n in fields if fields[n].ndim == 0}
        return importance.Importance(**{**fields, **scalars})
    except (OSError, ValueError, KeyError, TypeError) as e:  # a broken or older file: recompute
        logging.warning("Ignoring unreadable importance cache %s (%s)", path, e)
        return None


def cached(
    workdir: str | os.PathLike, key: dict, compute: Callable[[], importance.Importance]
) -> importance.Importance:
    """Loads the importance for ``key`` from ``workdir``'s cache, or computes and stores it.

    Args:
      workdir: directory holding the ``importance/`` cache folder.
      key: JSON-able dict of everything that determines the scores.
      compute: called on a miss; returns the scores to store.

    Returns:
      The scores; ``seconds`` is the time the original computation took.
    """
    path = cache_path(workdir, key)
    imp = load(path, key)
    if imp is not None:
        logging.info("Reusing importance of %d units from %s", imp.units.size, path)
        return imp
    imp = compute()
    save(path, imp, key)
    logging.info("Importance cached in %s", path)
    return imp
