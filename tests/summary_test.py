"""Tests for tdu_jax.summary (markdown tables and text summary; no JAX computation)."""

import math

import pytest

from tdu_jax import reference, summary


def example_result(row="C7", with_accuracies=True, **overrides):
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


# ---------------------------------------------------------------------------- tables


def test_summary_rows():
    rows = summary.summary_rows([example_result("C7"), example_result("X1", finetune_batches=None)])
    c7, x1 = rows
    assert c7["row"] == "C7" and c7["setting"] == reference.REFERENCE["C7"]["setting"]
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
    result = example_result("C1")
    result["final"]["forget_acc"] = float("nan")
    result["final"]["retain_acc"] = None
    (row,) = summary.summary_rows([result])
    assert row["forget"] is None and row["retain"] is None


def test_summary_markdown():
    results = [
        example_result("C7"),
        example_result("L1", with_accuracies=False, finetune_batches=0),
    ]
    md = summary.summary_markdown(
        results, "ResNet-18 / CIFAR-10", base=reference.REFERENCE_BASE["cifar"]
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
        f"| C7 | {reference.REFERENCE['C7']['setting']} | 4.40 | 4.32 | 90.30 | 90.46 | 272 | 51 |"
    )
    l1 = next(line for line in lines if line.startswith("| L1 |"))
    assert "| 2.96 | 4.32 | 92.12 | 90.46 | — | 0 |" in l1
    assert "reference 92.07, ours 92.00" in md
    # Every table line has the same number of cells.
    table = [line for line in lines if line.startswith("|")]
    assert {line.count(" | ") for line in table[2:]} == {7}


def test_summary_markdown_missing_values_and_no_base():
    result = example_result("C3", with_accuracies=False)
    result["final"] = {"forget_acc": float("nan"), "retain_acc": 91.0}
    del result["finetune_batches"]
    md = summary.summary_markdown([result], "t")
    assert "base" not in md
    assert "| C3 | " in md and "| 51.20 | — | 91.22 | 91.00 | 704 | — |" in md


def test_summary_markdown_seeds_mean_std():
    seeds = [
        {"forget_acc": 2.0, "retain_acc": 90.0, "test_acc": 81.0},
        {"forget_acc": 4.0, "retain_acc": 91.0, "test_acc": 82.0},
        {"forget_acc": 6.0, "retain_acc": 95.0, "test_acc": 83.0},
    ]
    result = example_result("C8", seeds=seeds, finetune_batches=272)
    (row,) = summary.summary_rows([result])
    # forget: mean 4, sample std sqrt((4+0+4)/2) = 2; retain: mean 92, std sqrt((4+1+9)/2).
    assert row["forget"] == pytest.approx(4.0) and row["forget_std"] == pytest.approx(2.0)
    assert row["retain"] == pytest.approx(92.0)
    assert row["retain_std"] == pytest.approx(math.sqrt(7.0))
    assert row["num_seeds"] == 3 and row["finetune_batches"] == 272
    md = summary.summary_markdown([result], "seeds")
    assert (
        "| C8 | as C7, random units | 42.60 | 4.00 ± 2.00 | 90.66 | 92.00 ± 2.65 | 272 | 272 |"
        in (md)
    )
    assert "mean ± sample std" in md


def test_summary_seed_with_nan_is_missing():
    seeds = [{"forget_acc": 2.0, "retain_acc": 90.0}, {"forget_acc": None, "retain_acc": 92.0}]
    (row,) = summary.summary_rows([example_result("C8", seeds=seeds)])
    assert row["forget"] is None and row["forget_std"] is None
    assert row["retain"] == pytest.approx(91.0)
    # A single seed: the mean, no std.
    (row,) = summary.summary_rows([example_result("C8", seeds=seeds[:1])])
    assert row["forget"] == 2.0 and row["forget_std"] is None
    assert "| 2.00 |" in summary.summary_markdown([example_result("C8", seeds=seeds[:1])], "one")


# ---------------------------------------------------------------------------- text


def test_print_summary():
    text = summary.print_summary(example_result("C7"))
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
    text = summary.print_summary({"row": "L3", "final": {"forget_acc": float("nan")}})
    assert text.startswith("Row L3")
    assert "forget" in text and "—" in text and "0.61" in text
    seeds = [{"forget_acc": 1.0, "retain_acc": 99.0}, {"forget_acc": 3.0, "retain_acc": 99.0}]
    text = summary.print_summary(example_result("L4", seeds=seeds))
    assert "over 2 seeds: forget 2.00 ± 1.41, retain 99.00 ± 0.00" in text
