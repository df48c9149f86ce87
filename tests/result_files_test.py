"""Tests for tdu_jax.result_files (atomic JSON and text files)."""

import json
import os

import numpy as np
import pytest

from tdu_jax import result_files


def _leftovers(directory):
    return [name for name in os.listdir(directory) if name.endswith(".tmp")]


def test_write_json_round_trip_nan_and_numpy(tmp_path):
    path = tmp_path / "sub" / "result.json"
    obj = {
        "a": float("nan"),
        "b": [1.5, float("inf"), -float("inf"), np.float32(np.nan)],
        "c": np.float32(2.5),
        "d": np.int64(7),
        "e": np.arange(3, dtype=np.int32),
        "f": np.array([[0.5, np.nan]]),
        "g": (1, np.bool_(True)),
        "h": {"nested": {"x": np.float64(np.inf), 3: "int key"}},
        "s": "λ ± —",
        "n": None,
    }
    result_files.write_json_atomic(path, obj)
    text = path.read_text(encoding="utf-8")
    assert "NaN" not in text and "Infinity" not in text
    json.loads(text)  # strict JSON
    assert text.startswith('{\n  "a": null')  # indent=2
    back = result_files.read_json(path)
    assert back == {
        "a": None,
        "b": [1.5, None, None, None],
        "c": 2.5,
        "d": 7,
        "e": [0, 1, 2],
        "f": [[0.5, None]],
        "g": [1, True],
        "h": {"nested": {"x": None, "3": "int key"}},
        "s": "λ ± —",
        "n": None,
    }
    assert type(back["d"]) is int and type(back["g"][1]) is bool
    assert _leftovers(path.parent) == []


def test_write_json_rejects_unknown_types_without_touching_file(tmp_path):
    path = tmp_path / "result.json"
    result_files.write_json_atomic(path, {"ok": 1})
    with pytest.raises(TypeError, match="object"):
        result_files.write_json_atomic(path, {"bad": object()})
    assert result_files.read_json(path) == {"ok": 1}
    assert _leftovers(tmp_path) == []


def test_write_json_replaces_existing_only_with_complete_file(tmp_path, monkeypatch):
    path = tmp_path / "result.json"
    result_files.write_json_atomic(path, {"version": 1})

    def partial_dump(obj, f, **kwargs):
        f.write('{"version": ')
        raise OSError("disk full")

    monkeypatch.setattr(result_files.json, "dump", partial_dump)
    with pytest.raises(OSError, match="disk full"):
        result_files.write_json_atomic(path, {"version": 2})
    monkeypatch.undo()
    assert result_files.read_json(path) == {"version": 1}
    assert _leftovers(tmp_path) == []

    def failing_replace(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(result_files.os, "replace", failing_replace)
    with pytest.raises(OSError, match="rename failed"):
        result_files.write_json_atomic(path, {"version": 3})
    monkeypatch.undo()
    assert result_files.read_json(path) == {"version": 1}
    assert _leftovers(tmp_path) == []

    result_files.write_json_atomic(path, {"version": 4})
    assert result_files.read_json(path) == {"version": 4}
    assert sorted(os.listdir(tmp_path)) == ["result.json"]


def test_write_text_atomic(tmp_path):
    path = tmp_path / "summary.md"
    result_files.write_text_atomic(path, "old")
    result_files.write_text_atomic(path, "| λ | ± |\n")
    assert path.read_text(encoding="utf-8") == "| λ | ± |\n"
    assert sorted(os.listdir(tmp_path)) == ["summary.md"]


def test_written_file_respects_umask(tmp_path):
    old = os.umask(0o022)
    try:
        result_files.write_text_atomic(tmp_path / "x.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "x.txt").stat().st_mode & 0o777 == 0o644
