"""Plots of experiment rows: accuracy per decay step, bars against the reference, importance.

Plots use matplotlib's ``Figure`` directly (Agg canvas; no pyplot, no global backend state)
and are written atomically (``tdu_jax.atomic``); result dicts as in ``tdu_jax.summary``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from tdu_jax import atomic, summary

PARTIAL_MARK = "PARTIAL: run not finished"


def _save_figure(fig: Any, path: str | os.PathLike, partial: bool = False) -> None:
    if partial:  # an unfinished table must not pass for a final one
        fig.suptitle(PARTIAL_MARK, color="tab:red", fontweight="bold")
    atomic.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120), binary=True)


def _figure(**kwargs: Any) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def _history_series(result: dict, key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the history entries holding a finite ``key``."""
    steps, values = [], []
    for entry in result.get("history") or []:
        step, value = summary._num(entry.get("step")), summary._num(entry.get(key))
        if step is not None and value is not None:
            steps.append(step)
            values.append(value)
    return steps, values


def plot_history(
    results: Sequence[dict], path: str | os.PathLike, *, partial: bool = False
) -> None:
    """PNG of forget and retain accuracy (%) vs. decay step, one line per row.

    Two panels (forget, retain); rows with no per-step accuracies (history entries without
    accuracy keys, or only NaN) are left out of a panel; an empty panel says so. ``partial``
    titles the figure ``PARTIAL_MARK`` (the table is not finished).
    """
    fig = _figure(figsize=(11, 4.2), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, key, name in zip(axes, ("forget_acc", "retain_acc"), ("forget", "retain"), strict=True):
        plotted = 0
        for result in results:
            steps, values = _history_series(result, key)
            if steps:
                ax.plot(steps, values, marker="o", markersize=3, label=summary._row_id(result))
                plotted += 1
        ax.set_title(f"{name} accuracy")
        ax.set_xlabel("decay step")
        ax.set_ylabel(f"{name} accuracy (%)")
        ax.grid(alpha=0.3)
        if plotted:
            ax.legend(fontsize="small", ncols=2 if plotted > 6 else 1)
        else:
            ax.text(
                0.5, 0.5, "no per-step accuracies", ha="center", va="center", transform=ax.transAxes
            )
    _save_figure(fig, path, partial)


def plot_bars(results: Sequence[dict], path: str | os.PathLike, *, partial: bool = False) -> None:
    """PNG grouped bar chart: per row, ours forget/retain beside the reference forget/retain.

    Missing values leave a gap; seed results get ± std error bars. ``partial`` titles the
    figure ``PARTIAL_MARK`` (the table is not finished).
    """
    rows = summary.summary_rows(results)
    fig = _figure(figsize=(max(6.0, 1.1 * len(rows) + 2.0), 4.5), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(rows), dtype=np.float64)
    width = 0.2
    series = [
        ("ours forget", "forget", "forget_std", "tab:red", None),
        ("ref forget", "ref_forget", None, "tab:red", "//"),
        ("ours retain", "retain", "retain_std", "tab:blue", None),
        ("ref retain", "ref_retain", None, "tab:blue", "//"),
    ]
    for i, (label, key, std_key, color, hatch) in enumerate(series):
        heights = np.array([np.nan if r[key] is None else r[key] for r in rows], np.float64)
        yerr = None
        if std_key and any(r.get(std_key) is not None for r in rows):
            yerr = np.array([r.get(std_key) or 0.0 for r in rows], np.float64)
        ok = np.isfinite(heights)
        ax.bar(
            x[ok] + (i - 1.5) * width,
            heights[ok],
            width,
            yerr=None if yerr is None else yerr[ok],
            label=label,
            color=color,
            alpha=0.9 if hatch is None else 0.35,
            hatch=hatch,
            edgecolor=color,
            capsize=2,
        )
    ax.set_xticks(x, [r["row"] for r in rows])
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small", ncols=4, loc="upper center", bbox_to_anchor=(0.5, -0.08))
    if not rows:
        ax.text(0.5, 0.5, "no results", ha="center", va="center", transform=ax.transAxes)
    _save_figure(fig, path, partial)


def plot_importance(
    accuracy_drop: np.ndarray, k: int, path: str | os.PathLike, title: str = ""
) -> None:
    """PNG of the importance scores: sorted curve (descending) and histogram, top-K cut marked.

    The curve uses a log y-axis when all scores are positive and span over two decades, and a
    symmetric-log one when they span that much but include zero/negative scores; the histogram
    counts are log-scaled above 50 scores. Non-finite scores are dropped; ``k`` is clipped to
    the number of scores.
    """
    scores = np.asarray(accuracy_drop, np.float64).ravel()
    scores = np.sort(scores[np.isfinite(scores)])[::-1]
    n = scores.size
    k = int(min(max(k, 0), n))
    fig = _figure(figsize=(11, 4.2), layout="constrained")
    curve, hist = fig.subplots(1, 2)
    if title:
        fig.suptitle(title)
    if n == 0:
        for ax in (curve, hist):
            ax.text(0.5, 0.5, "no scores", ha="center", va="center", transform=ax.transAxes)
        _save_figure(fig, path)
        return
    ranks = np.arange(1, n + 1)
    curve.plot(ranks, scores, lw=1.2)
    abs_pos = np.abs(scores[scores != 0])
    if abs_pos.size and abs_pos.max() / abs_pos.min() > 100:
        if scores.min() > 0:
            curve.set_yscale("log")
        else:
            curve.set_yscale("symlog", linthresh=max(abs_pos.min(), abs_pos.max() * 1e-4))
    threshold = scores[k - 1] if k > 0 else None
    cut_label = f"top-K cut (K={k}" + (f", score ≥ {threshold:.4g})" if k else ")")
    curve.axvline(k + 0.5, color="tab:red", ls="--", label=cut_label)
    curve.set_xlabel("unit rank (by importance)")
    curve.set_ylabel("importance (accuracy drop)")
    curve.set_title(f"sorted importance ({n} units)")
    curve.grid(alpha=0.3)
    curve.legend(fontsize="small")
    hist.hist(scores, bins=min(100, max(10, n // 20)), color="tab:gray")
    if n > 50:  # bin counts of many units span decades
        hist.set_yscale("log")
    if threshold is not None:
        hist.axvline(threshold, color="tab:red", ls="--", label=f"top-K threshold {threshold:.4g}")
        hist.legend(fontsize="small")
    hist.set_xlabel("importance (accuracy drop)")
    hist.set_ylabel("units")
    hist.set_title("importance histogram")
    hist.grid(alpha=0.3)
    _save_figure(fig, path)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (forget %, retain %) points no other point beats on both (lower forget, higher
    retain), sorted by forget accuracy; ties keep one copy."""
    front: list[tuple[float, float]] = []
    for forget, retain in sorted(set(points), key=lambda p: (p[0], -p[1])):
        if not front or retain > front[-1][1]:
            front.append((forget, retain))
    return front


def plot_tradeoff(
    curves: dict[str, Sequence[tuple[float, float]]],
    path: str | os.PathLike,
    *,
    title: str = "",
    chosen: dict[str, tuple[float, float]] | None = None,
    forget_max: float | None = None,
    partial: bool = False,
) -> None:
    """PNG of the forget-retain trade-off: retain accuracy (%) against forget accuracy (%).

    Args:
      curves: label -> (forget, retain) points (e.g. a sweep's points before fine-tuning, or
        the points checked after it); each series is drawn with its Pareto front.
      path: output PNG.
      title: figure title.
      chosen: label -> the point a rule chose, drawn as a star.
      forget_max: a forget-accuracy ceiling, drawn as a vertical line.
      partial: title the figure ``PARTIAL_MARK``.
    """
    fig = _figure(figsize=(6.5, 4.5), layout="constrained")
    ax = fig.subplots()
    for i, (label, points) in enumerate(curves.items()):
        color = f"C{i}"
        if not points:
            continue
        forget, retain = np.asarray(points, float).T
        ax.scatter(forget, retain, s=18, color=color, alpha=0.6, label=label)
        front = np.asarray(pareto_front(list(zip(forget, retain, strict=True))))
        ax.plot(front[:, 0], front[:, 1], color=color, linewidth=1)
        if chosen and label in chosen:
            ax.scatter(*chosen[label], marker="*", s=160, color=color, edgecolor="black")
    if forget_max is not None:
        ax.axvline(forget_max, color="gray", linestyle="--", linewidth=0.8)
    ax.set_xscale("symlog", linthresh=1.0)  # linear in [0, 1]%, where the goals are
    ax.set_xlim(left=0.0)
    ax.set_xlabel("forget accuracy (%, linear below 1, log above)")
    ax.set_ylabel("retain accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize=8, loc="lower right")
    _save_figure(fig, path, partial)
