"""Tests for tdu_jax.plots (PNG files written atomically; no JAX computation)."""

import os

import numpy as np
import pytest

from tdu_jax import plots
from tests.summary_test import example_result

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _assert_png(path):
    with open(path, "rb") as f:
        head = f.read(8)
    assert head == PNG_MAGIC
    assert os.path.getsize(path) > 1000


def _leftovers(directory):
    return [name for name in os.listdir(directory) if name.endswith(".tmp")]


def test_plot_history(tmp_path):
    path = tmp_path / "history.png"
    partial = example_result("C2")
    partial["history"][2]["forget_acc"] = float("nan")
    partial["history"][3].pop("retain_acc")
    plots.plot_history(
        [example_result("C7"), example_result("C1", with_accuracies=False), partial], path
    )
    _assert_png(path)
    assert _leftovers(tmp_path) == []


def test_plot_history_without_any_accuracies(tmp_path):
    path = tmp_path / "history.png"
    no_history = example_result("C5")
    del no_history["history"]
    plots.plot_history([example_result("C1", with_accuracies=False), no_history], path)
    _assert_png(path)
    plots.plot_history([], tmp_path / "empty.png")
    _assert_png(tmp_path / "empty.png")


def test_plot_bars(tmp_path):
    seeds = [{"forget_acc": 2.0, "retain_acc": 90.0}, {"forget_acc": 4.0, "retain_acc": 91.0}]
    nan_row = example_result("X9")
    nan_row["final"]["forget_acc"] = float("nan")
    results = [
        example_result("C7"),
        example_result("L2", with_accuracies=False),
        example_result("C8", seeds=seeds),
    ]
    plots.plot_bars(results + [nan_row], tmp_path / "bars.png")
    _assert_png(tmp_path / "bars.png")
    plots.plot_bars([], tmp_path / "empty.png")
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
    plots.plot_importance(scores, 50, path, title="C7 filter importance")
    _assert_png(path)
    assert _leftovers(tmp_path) == []


def test_pareto_front_by_hand():
    points = [(0.0, 90.0), (1.0, 95.0), (0.5, 80.0), (2.0, 94.0), (3.0, 99.0), (0.0, 90.0)]
    # (0.5, 80) is beaten by (0, 90); (2, 94) by (1, 95); the duplicate is kept once.
    assert plots.pareto_front(points) == [(0.0, 90.0), (1.0, 95.0), (3.0, 99.0)]
    assert plots.pareto_front([]) == []


def test_plot_tradeoff(tmp_path):
    path = tmp_path / "tradeoff.png"
    curves = {"before fine-tuning": [(0.0, 40.0), (0.7, 97.7), (60.0, 99.0)],
              "after fine-tuning": [(0.2, 99.1)], "empty": []}  # fmt: skip
    plots.plot_tradeoff(curves, path, title="digit 0", chosen={"after fine-tuning": (0.2, 99.1)},
                        forget_max=1.0, partial=True)  # fmt: skip
    _assert_png(path)
    assert _leftovers(tmp_path) == []
