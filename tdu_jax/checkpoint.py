"""Saving and restoring trained models (orbax), guarded by the config that produced them.

A model directory holds:
  checkpoint/   orbax PyTree checkpoint of {"params": ..., "batch_stats": ...} (batch_stats
                omitted when empty); orbax writes it to a temporary directory and renames it.
  config.json   the config dict (everything that determines the model), written atomically
                last, so a directory holding both is complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from tdu_jax import atomic

PyTree = Any
CHECKPOINT_NAME = "checkpoint"
CONFIG_NAME = "config.json"


def _normalise(config: dict) -> dict:
    """The config as it reads back from JSON (tuples -> lists, keys -> str)."""
    return json.loads(json.dumps(config, sort_keys=True, default=str))


def config_key(config: dict) -> str:
    """Stable short hash of a config.

    Args:
      config: JSON-serialisable dict (non-JSON values are hashed via `str`).

    Returns:
      16 hex characters of the sha256 of the key-sorted JSON text; equal for equal configs
      regardless of key order or tuple/list spelling.
    """
    text = json.dumps(_normalise(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def exists(directory: str | os.PathLike) -> bool:
    """Whether `directory` holds a complete saved model (checkpoint and config.json)."""
    root = pathlib.Path(directory)
    return (root / CHECKPOINT_NAME).is_dir() and (root / CONFIG_NAME).is_file()


def _write_json_atomic(path: pathlib.Path, obj: Any) -> None:
    def write(f):
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")

    atomic.atomic_write(path, write, binary=False)


def save_model(
    directory: str | os.PathLike,
    params: PyTree,
    batch_stats: PyTree,
    config: dict,
    *,
    overwrite: bool = False,
) -> pathlib.Path:
    """Saves a model's variables and config.

    Args:
      directory: model directory (created if missing).
      params: parameter pytree (jax or numpy arrays, any device).
      batch_stats: BatchNorm statistics pytree, or {}.
      config: JSON-serialisable dict of everything that determines the model.
      overwrite: replace a model already saved in `directory`.

    Returns:
      The absolute model directory.
    """
    root = pathlib.Path(directory).expanduser().absolute()
    if exists(root) and not overwrite:
        raise FileExistsError(
            f"A model is already saved in {root}; pass overwrite=True to replace it, or use "
            "another directory."
        )
    root.mkdir(parents=True, exist_ok=True)
    tree = {"params": jax.device_get(params)}  # host numpy: no device sharding is recorded
    if jax.tree.leaves(batch_stats):
        tree["batch_stats"] = jax.device_get(batch_stats)
    # Drop config.json first: during the replacement the directory does not count as complete.
    with contextlib.suppress(FileNotFoundError):
        os.unlink(root / CONFIG_NAME)
    if (root / CHECKPOINT_NAME).exists():
        shutil.rmtree(root / CHECKPOINT_NAME)
    with ocp.PyTreeCheckpointer() as checkpointer:
        checkpointer.save(root / CHECKPOINT_NAME, tree)
    _write_json_atomic(root / CONFIG_NAME, _normalise(config))
    return root


def load_config(directory: str | os.PathLike) -> dict:
    """The config.json of a saved model."""
    with open(pathlib.Path(directory) / CONFIG_NAME) as f:
        return json.load(f)


def _config_diff(saved: dict, expected: dict) -> list[str]:
    missing = "<missing>"
    lines = []
    for key in sorted(set(saved) | set(expected)):
        a, b = saved.get(key, missing), expected.get(key, missing)
        if a != b:
            lines.append(f"  {key}: saved={a!r} expected={b!r}")
    return lines


def restore_model(
    directory: str | os.PathLike, expected_config: dict | None = None
) -> tuple[PyTree, PyTree, dict]:
    """Restores a model saved by `save_model` onto the default device.

    Works whatever device saved it: arrays are read as numpy, then put on the default device.

    Args:
      directory: model directory.
      expected_config: if given, must equal the saved config (after a JSON round trip).

    Returns:
      (params, batch_stats, config): jax arrays bit-identical to those saved; batch_stats is {}
      if none were saved.
    """
    root = pathlib.Path(directory).expanduser().absolute()
    if not exists(root):
        raise FileNotFoundError(
            f"No saved model in {root} (expected {CHECKPOINT_NAME}/ and {CONFIG_NAME})."
        )
    config = load_config(root)
    if expected_config is not None:
        diff = _config_diff(config, _normalise(expected_config))
        if diff:
            raise ValueError(
                f"The model saved in {root} was made with a different config:\n"
                + "\n".join(diff)
                + "\nUse another --workdir, or retrain (overwrite) the model."
            )
    with ocp.PyTreeCheckpointer() as checkpointer:
        path = root / CHECKPOINT_NAME
        metadata = checkpointer.metadata(path)
        # orbax >= 0.11 wraps the tree: StepMetadata.item_metadata.tree; older: the tree itself.
        metadata = getattr(metadata, "item_metadata", metadata)
        metadata = getattr(metadata, "tree", metadata)
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
        tree = checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
    tree = jax.device_put(tree)  # default device
    return tree["params"], tree.get("batch_stats", {}), config
