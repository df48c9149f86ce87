"""Result files: JSON and text written atomically, JSON read back.

All files are written atomically: to a temporary file in the destination directory, flushed
and fsynced, then renamed over the destination with ``os.replace``, so a reader sees either
the old file or the complete new one.
"""

from __future__ import annotations

import json
import math
import os
from typing import IO, Any

import numpy as np

from tdu_jax import atomic


def to_jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON types: numpy scalars/arrays -> Python, non-finite floats -> None.

    Dict keys become strings, tuples/sets become lists, path-like objects strings.

    Raises:
      TypeError: for any other non-JSON type.
    """
    if obj is None or isinstance(obj, bool | str):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k) if not isinstance(k, str) else k: to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, set | frozenset):
        return [to_jsonable(v) for v in sorted(obj, key=repr)]
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, np.ndarray) or hasattr(obj, "__array__"):  # incl. jax arrays
        return to_jsonable(np.asarray(obj).tolist())
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to JSON: {obj!r}")


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Writes ``obj`` as JSON (indent=2) atomically; NaN/inf become null, numpy -> Python."""
    clean = to_jsonable(obj)  # converted before the temp file exists: bad input writes nothing

    def write(f: IO) -> None:
        json.dump(clean, f, indent=2, allow_nan=False, ensure_ascii=False)
        f.write("\n")

    atomic.atomic_write(path, write, binary=False)


def read_json(path: str | os.PathLike) -> dict:
    """Reads a JSON file (UTF-8)."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` (UTF-8) atomically."""
    atomic.atomic_write(path, lambda f: f.write(text), binary=False)
