"""Tests for tdu_jax.reference: the reference tables match METHOD.md."""

import pathlib
import re

import pytest

from tdu_jax import reference


def test_reference_has_all_rows():
    assert list(reference.REFERENCE) == [f"L{i}" for i in range(1, 5)] + [
        f"C{i}" for i in range(1, 11)
    ]
    for row, ref in reference.REFERENCE.items():
        assert set(ref) == {"setting", "forget", "retain", "finetune_batches"}, row
        assert isinstance(ref["setting"], str) and ref["setting"]
        assert 0 <= ref["forget"] <= 100 and 0 <= ref["retain"] <= 100
    for row in ("L1", "L2", "L3", "L4"):
        assert reference.REFERENCE[row]["finetune_batches"] is None


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
    assert sorted(rows) == sorted(r for r in reference.REFERENCE if r in rows) and len(rows) == 14
    for row, (forget, retain, batches) in rows.items():
        ref = reference.REFERENCE[row]
        assert (ref["forget"], ref["retain"], ref["finetune_batches"]) == (forget, retain, batches)


def test_reference_base_matches_method_md():
    path = pathlib.Path(__file__).resolve().parents[2] / "shared" / "METHOD.md"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    text = path.read_text()
    match = re.search(r"ship ([\d.]+),\s*retain ([\d.]+), overall ([\d.]+)", text)
    forget, retain, overall = (float(g) for g in match.groups())
    assert reference.REFERENCE_BASE == {"cifar": {"forget": forget, "retain": retain,
                                               "overall": overall}}  # fmt: skip
