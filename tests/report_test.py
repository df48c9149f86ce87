"""Tests for tdu_jax.report (files, tables, plots, text summary; no JAX computation)."""

import json
import math
import os
import pathlib
import re

import numpy as np
import pytest

from tdu_jax import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _result(row="C7", with_accuracies=True, **overrides):
    """A result.json-like dict with a 3-step history."""
    history = []
    for step in range(4):
        entry = {"step": step, "finetune_batches": 17 * step}
        if with_accuracies:
            entry.update(
                forget_acc=96.1 - 30.0 * step, retain_acc=91.6 - step, test_acc=92.0 - 3.0 * step
            )
        history.append(entry)
    result = {
        "row": row,
        "config": {
            "lambda": 0.1,
            "decay_steps": 3,
            "top_k": 300,
            "selection": "topk",
            "finetune": "after_each",
            "finetune_batches": 17,
        },
        "base": {
            "forget_acc": 96.1,
            "retain_acc": 91.6,
            "test_acc": 92.0,
            "forget_train_acc": 99.0,
            "retain_train_acc": 99.2,
        },
        "final": {
            "forget_acc": 4.321,
            "retain_acc": 90.456,
            "test_acc": 89.87,
            "forget_train_acc": 5.5,
            "retain_train_acc": 98.7,
        },
        "per_class_acc": {"base": [90.0] * 10, "final": [88.0] * 9 + [4.3]},
        "history": history,
        "finetune_batches": 51,
        "importance": {
            "granularity": "filter",
            "num_units": 4810,
            "sample_size": 5000,
            "seconds": 40.1,
            "selected_threshold": 1.2,
        },
        "timings": {"importance": 40.1, "decay": 0.1, "finetune": 20.0, "eval": 3.0, "total": 70.0},
        "versions": {"jax": "0.10.0", "flax": "0.10.4", "device": "cpu"},
    }
    result.update(overrides)
    return result


def _assert_png(path):
    with open(path, "rb") as f:
        head = f.read(8)
    assert head == PNG_MAGIC
    assert os.path.getsize(path) > 1000


def _leftovers(directory):
    return [name for name in os.listdir(directory) if name.endswith(".tmp")]


# ---------------------------------------------------------------------------- reference


def test_reference_has_all_rows():
    assert list(report.REFERENCE) == [f"L{i}" for i in range(1, 5)] + [
        f"C{i}" for i in range(1, 11)
    ]
    for row, ref in report.REFERENCE.items():
        assert set(ref) == {"setting", "forget", "retain", "finetune_batches"}, row
        assert isinstance(ref["setting"], str) and ref["setting"]
        assert 0 <= ref["forget"] <= 100 and 0 <= ref["retain"] <= 100
    for row in ("L1", "L2", "L3", "L4"):
        assert report.REFERENCE[row]["finetune_batches"] is None


def _method_md_rows() -> dict:
    """The reference tables of ../shared/METHOD.md: {row id: (forget, retain, batches|None)}."""
    path = pathlib.Path(__file__).resolve().parents[2] / "shared" / "METHOD.md"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    rows = {}
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and re.fullmatch(r"[LC]\d+", cells[0]):
            numbers = [float(c) for c in cells[2:]]
            rows[cells[0]] = (numbers[0], numbers[1], int(numbers[2]) if len(numbers) > 2 else None)
    return rows


def test_reference_numbers_match_method_md():
    rows = _method_md_rows()
    assert sorted(rows) == sorted(r for r in report.REFERENCE if r in rows) and len(rows) == 14
    for row, (forget, retain, batches) in rows.items():
        ref = report.REFERENCE[row]
        assert (ref["forget"], ref["retain"], ref["finetune_batches"]) == (forget, retain, batches)


def test_reference_base_matches_method_md():
    path = pathlib.Path(__file__).resolve().parents[2] / "shared" / "METHOD.md"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    text = path.read_text()
    match = re.search(r"ship ([\d.]+),\s*retain ([\d.]+), overall ([\d.]+)", text)
    forget, retain, overall = (float(g) for g in match.groups())
    assert report.REFERENCE_BASE == {"cifar": {"forget": forget, "retain": retain,
                                               "overall": overall}}  # fmt: skip


# ---------------------------------------------------------------------------- files


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
    report.write_json_atomic(path, obj)
    text = path.read_text(encoding="utf-8")
    assert "NaN" not in text and "Infinity" not in text
    json.loads(text)  # strict JSON
    assert text.startswith('{\n  "a": null')  # indent=2
    back = report.read_json(path)
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
    report.write_json_atomic(path, {"ok": 1})
    with pytest.raises(TypeError, match="object"):
        report.write_json_atomic(path, {"bad": object()})
    assert report.read_json(path) == {"ok": 1}
    assert _leftovers(tmp_path) == []


def test_write_json_replaces_existing_only_with_complete_file(tmp_path, monkeypatch):
    path = tmp_path / "result.json"
    report.write_json_atomic(path, {"version": 1})

    def partial_dump(obj, f, **kwargs):
        f.write('{"version": ')
        raise OSError("disk full")

    monkeypatch.setattr(report.json, "dump", partial_dump)
    with pytest.raises(OSError, match="disk full"):
        report.write_json_atomic(path, {"version": 2})
    monkeypatch.undo()
    assert report.read_json(path) == {"version": 1}
    assert _leftovers(tmp_path) == []

    def failing_replace(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(report.os, "replace", failing_replace)
    with pytest.raises(OSError, match="rename failed"):
        report.write_json_atomic(path, {"version": 3})
    monkeypatch.undo()
    assert report.read_json(path) == {"version": 1}
    assert _leftovers(tmp_path) == []

    report.write_json_atomic(path, {"version": 4})
    assert report.read_json(path) == {"version": 4}
    assert sorted(os.listdir(tmp_path)) == ["result.json"]


def test_write_text_atomic(tmp_path):
    path = tmp_path / "summary.md"
    report.write_text_atomic(path, "old")
    report.write_text_atomic(path, "| λ | ± |\n")
    assert path.read_text(encoding="utf-8") == "| λ | ± |\n"
    assert sorted(os.listdir(tmp_path)) == ["summary.md"]


def test_written_file_respects_umask(tmp_path):
    old = os.umask(0o022)
    try:
        report.write_text_atomic(tmp_path / "x.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "x.txt").stat().st_mode & 0o777 == 0o644


# ---------------------------------------------------------------------------- tables


def test_summary_rows():
    rows = report.summary_rows([_result("C7"), _result("X1", finetune_batches=None)])
    c7, x1 = rows
    assert c7["row"] == "C7" and c7["setting"] == report.REFERENCE["C7"]["setting"]
    assert (c7["ref_forget"], c7["ref_retain"], c7["ref_batches"]) == (4.40, 90.30, 272)
    assert (c7["forget"], c7["retain"], c7["test"]) == (4.321, 90.456, 89.87)
    assert c7["finetune_batches"] == 51 and type(c7["finetune_batches"]) is int
    assert (c7["base_forget"], c7["base_retain"], c7["base_test"]) == (96.1, 91.6, 92.0)
    assert "forget_std" not in c7 and c7["num_seeds"] == 1
    # A row outside REFERENCE: setting described from its config, no reference numbers.
    assert x1["ref_forget"] is None and x1["ref_batches"] is None
    assert "λ=0.1" in x1["setting"] and "3 steps" in x1["setting"] and "K=300" in x1["setting"]
    assert x1["finetune_batches"] is None


def test_summary_rows_nan_is_missing():
    result = _result("C1")
    result["final"]["forget_acc"] = float("nan")
    result["final"]["retain_acc"] = None
    (row,) = report.summary_rows([result])
    assert row["forget"] is None and row["retain"] is None


def test_summary_markdown():
    results = [
        _result("C7"),
        _result("L1", with_accuracies=False, finetune_batches=0),
    ]
    md = report.summary_markdown(
        results, "ResNet-18 / CIFAR-10", base=report.REFERENCE_BASE["cifar"]
    )
    lines = md.splitlines()
    assert lines[0] == "## ResNet-18 / CIFAR-10"
    assert lines[2] == (
        "| id | setting | ref forget | ours forget | ref retain | ours retain | "
        "ref FT batches | ours FT batches |"
    )
    assert lines[4] == "| base | before unlearning | 96.10 | 96.10 | 91.62 | 91.60 | — | — |"
    c7 = next(line for line in lines if line.startswith("| C7 |"))
    assert c7 == (
        f"| C7 | {report.REFERENCE['C7']['setting']} | 4.40 | 4.32 | 90.30 | 90.46 | 272 | 51 |"
    )
    l1 = next(line for line in lines if line.startswith("| L1 |"))
    assert "| 2.96 | 4.32 | 92.12 | 90.46 | — | 0 |" in l1
    assert "reference 92.07, ours 92.00" in md
    # Every table line has the same number of cells.
    table = [line for line in lines if line.startswith("|")]
    assert {line.count(" | ") for line in table[2:]} == {7}


def test_summary_markdown_missing_values_and_no_base():
    result = _result("C3", with_accuracies=False)
    result["final"] = {"forget_acc": float("nan"), "retain_acc": 91.0}
    del result["finetune_batches"]
    md = report.summary_markdown([result], "t")
    assert "base" not in md
    assert "| C3 | " in md and "| 51.20 | — | 91.22 | 91.00 | 704 | — |" in md


def test_summary_markdown_seeds_mean_std():
    seeds = [
        {"forget_acc": 2.0, "retain_acc": 90.0, "test_acc": 81.0},
        {"forget_acc": 4.0, "retain_acc": 91.0, "test_acc": 82.0},
        {"forget_acc": 6.0, "retain_acc": 95.0, "test_acc": 83.0},
    ]
    result = _result("C8", seeds=seeds, finetune_batches=272)
    (row,) = report.summary_rows([result])
    # forget: mean 4, sample std sqrt((4+0+4)/2) = 2; retain: mean 92, std sqrt((4+1+9)/2).
    assert row["forget"] == pytest.approx(4.0) and row["forget_std"] == pytest.approx(2.0)
    assert row["retain"] == pytest.approx(92.0)
    assert row["retain_std"] == pytest.approx(math.sqrt(7.0))
    assert row["num_seeds"] == 3 and row["finetune_batches"] == 272
    md = report.summary_markdown([result], "seeds")
    assert (
        "| C8 | as C7, random units | 42.60 | 4.00 ± 2.00 | 90.66 | 92.00 ± 2.65 | 272 | 272 |"
        in (md)
    )
    assert "mean ± sample std" in md


def test_summary_seed_with_nan_is_missing():
    seeds = [{"forget_acc": 2.0, "retain_acc": 90.0}, {"forget_acc": None, "retain_acc": 92.0}]
    (row,) = report.summary_rows([_result("C8", seeds=seeds)])
    assert row["forget"] is None and row["forget_std"] is None
    assert row["retain"] == pytest.approx(91.0)
    # A single seed: the mean, no std.
    (row,) = report.summary_rows([_result("C8", seeds=seeds[:1])])
    assert row["forget"] == 2.0 and row["forget_std"] is None
    assert "| 2.00 |" in report.summary_markdown([_result("C8", seeds=seeds[:1])], "one")


# ---------------------------------------------------------------------------- plots


def test_plot_history(tmp_path):
    path = tmp_path / "history.png"
    partial = _result("C2")
    partial["history"][2]["forget_acc"] = float("nan")
    partial["history"][3].pop("retain_acc")
    report.plot_history([_result("C7"), _result("C1", with_accuracies=False), partial], path)
    _assert_png(path)
    assert _leftovers(tmp_path) == []


def test_plot_history_without_any_accuracies(tmp_path):
    path = tmp_path / "history.png"
    no_history = _result("C5")
    del no_history["history"]
    report.plot_history([_result("C1", with_accuracies=False), no_history], path)
    _assert_png(path)
    report.plot_history([], tmp_path / "empty.png")
    _assert_png(tmp_path / "empty.png")


def test_plot_bars(tmp_path):
    seeds = [{"forget_acc": 2.0, "retain_acc": 90.0}, {"forget_acc": 4.0, "retain_acc": 91.0}]
    nan_row = _result("X9")
    nan_row["final"]["forget_acc"] = float("nan")
    results = [_result("C7"), _result("L2", with_accuracies=False), _result("C8", seeds=seeds)]
    report.plot_bars(results + [nan_row], tmp_path / "bars.png")
    _assert_png(tmp_path / "bars.png")
    report.plot_bars([], tmp_path / "empty.png")
    _assert_png(tmp_path / "empty.png")
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "scores",
    [
        np.random.default_rng(0).exponential(1.0, size=500) * 10.0 ** np.linspace(-4, 1, 500),
        np.concatenate([np.linspace(-1, 3, 200), [np.nan, 0.0, 0.0]]),
        np.array([0.5]),
        np.zeros(0),
    ],
)
def test_plot_importance(tmp_path, scores):
    path = tmp_path / "importance.png"
    report.plot_importance(scores, 50, path, title="C7 filter importance")
    _assert_png(path)
    assert _leftovers(tmp_path) == []


# ---------------------------------------------------------------------------- text


def test_print_summary():
    text = report.print_summary(_result("C7"))
    # The header describes what ran (3 steps here), not the reference row's words.
    assert text.startswith("Row C7 — topk K=300, λ=0.1, 3 steps, fine-tune after_each (17 batches)")
    forget = next(line for line in text.splitlines() if line.startswith("forget "))
    assert forget.split() == ["forget", "96.10", "4.32", "4.40"]
    retain = next(line for line in text.splitlines() if line.startswith("retain "))
    assert retain.split() == ["retain", "91.60", "90.46", "90.30"]
    overall = next(line for line in text.splitlines() if line.startswith("overall"))
    assert overall.split() == ["overall", "92.00", "89.87", "—"]
    assert "fine-tune batches: 51 (ref 272)" in text
    assert "importance: filter, 4810 units, sample 5000" in text
    assert "total 70.00" in text and "finetune 20.00" in text
    assert "device cpu" in text
    assert len(text.splitlines()) <= 25


def test_print_summary_minimal_and_seeds():
    text = report.print_summary({"row": "L3", "final": {"forget_acc": float("nan")}})
    assert text.startswith("Row L3")
    assert "forget" in text and "—" in text and "0.61" in text
    seeds = [{"forget_acc": 1.0, "retain_acc": 99.0}, {"forget_acc": 3.0, "retain_acc": 99.0}]
    text = report.print_summary(_result("L4", seeds=seeds))
    assert "over 2 seeds: forget 2.00 ± 1.41, retain 99.00 ± 0.00" in text
