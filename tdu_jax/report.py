"""Reporting: result files, summary tables against the reference numbers, and plots.

An experiment row (``L1``..``L4`` for LeNet/MNIST, ``C1``..``C10`` for ResNet-18/CIFAR-10)
writes one ``result.json`` dict holding ``row``, ``config``, ``base``/``final`` accuracies
(``forget_acc``, ``retain_acc``, ``test_acc``, ... in %), ``per_class_acc``, a per-step
``history``, ``finetune_batches``, ``importance``, ``timings`` and ``versions``; optionally
``seeds``, a list of per-seed final dicts (same keys as ``final``), reported as mean ± std.

All files are written atomically: to a temporary file in the destination directory, flushed
and fsynced, then renamed over the destination with ``os.replace``, so a reader sees either
the old file or the complete new one. Plots use matplotlib's ``Figure`` directly (Agg canvas;
no pyplot, no global backend state).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from typing import IO, Any

import numpy as np

from tdu_jax import atomic

# Reference numbers (METHOD.md): accuracies in % on the test split; ``forget`` is the accuracy
# on the forgotten class (MNIST digit 0 / CIFAR-10 ship), ``retain`` on the other classes.
REFERENCE: dict[str, dict] = {
    "L1": {
        "setting": "top-K decay, no fine-tune",
        "forget": 2.96,
        "retain": 92.12,
        "finetune_batches": None,
    },
    "L2": {
        "setting": "random-K decay, no fine-tune",
        "forget": 45.41,
        "retain": 81.75,
        "finetune_batches": None,
    },
    "L3": {
        "setting": "top-K, 7 steps, then fine-tune 1 epoch",
        "forget": 0.61,
        "retain": 99.07,
        "finetune_batches": None,
    },
    "L4": {
        "setting": "top-K, fine-tune 21 batches after each of 7 steps",
        "forget": 2.35,
        "retain": 98.66,
        "finetune_batches": None,
    },
    "C1": {
        "setting": "λ=0.05, 5 steps, no fine-tune",
        "forget": 3.70,
        "retain": 87.28,
        "finetune_batches": 0,
    },
    "C2": {
        "setting": "λ=0.05, 5 steps, + fine-tune 1 epoch",
        "forget": 63.20,
        "retain": 91.54,
        "finetune_batches": 352,
    },
    "C3": {
        "setting": "λ=0.05, 5 steps, + fine-tune 2 epochs",
        "forget": 51.20,
        "retain": 91.22,
        "finetune_batches": 704,
    },
    "C4": {
        "setting": "λ=0.05, 5 steps, + fine-tune 6 epochs",
        "forget": 6.40,
        "retain": 91.28,
        "finetune_batches": 2112,
    },
    "C5": {
        "setting": "no decay, fine-tune 6 epochs",
        "forget": 12.60,
        "retain": 90.92,
        "finetune_batches": 2112,
    },
    "C6": {
        "setting": "λ=0.1, 21 steps, fine-tune 11 batches after each",
        "forget": 3.70,
        "retain": 89.67,
        "finetune_batches": 231,
    },
    "C7": {
        "setting": "λ=0.1, 16 steps, fine-tune 17 batches after each",
        "forget": 4.40,
        "retain": 90.30,
        "finetune_batches": 272,
    },
    "C8": {
        "setting": "as C7, random units",
        "forget": 42.60,
        "retain": 90.66,
        "finetune_batches": 272,
    },
    "C9": {
        "setting": "as C7, importance from 10% of forget-class train",
        "forget": 3.80,
        "retain": 90.22,
        "finetune_batches": 345,
    },
    "C10": {
        "setting": "as C7, importance from 10% of all train",
        "forget": 4.60,
        "retain": 90.61,
        "finetune_batches": 345,
    },
}

# The reference base model before unlearning (% on the test split; ``overall`` = all classes).
REFERENCE_BASE: dict[str, dict] = {"cifar": {"forget": 96.10, "retain": 91.62, "overall": 92.07}}

MISSING = "—"
_ACC_KEYS = ("forget_acc", "retain_acc", "test_acc")


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------------------------


def _num(value: Any) -> float | None:
    """``value`` as a finite float, or None (missing, NaN, inf, non-numeric)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _fmt(value: Any, std: Any = None) -> str:
    """2-decimal number, ``"mean ± std"`` when a std is given, ``"—"`` when missing."""
    x = _num(value)
    if x is None:
        return MISSING
    s = _num(std)
    return f"{x:.2f}" if s is None else f"{x:.2f} ± {s:.2f}"


def _fmt_batches(value: Any, std: Any = None) -> str:
    """Fine-tune batch count: an integer when integral, else 2 decimals; ``"—"`` if missing."""
    x = _num(value)
    if x is None:
        return MISSING
    if float(x).is_integer() and _num(std) in (None, 0.0):
        return str(int(x))
    return _fmt(x, std)


def _mean_std(values: Sequence[Any]) -> tuple[float | None, float | None]:
    """Mean and sample std (ddof=1) of per-seed values; a missing/NaN value makes both None.

    With a single value the std is None (undefined).
    """
    xs = [_num(v) for v in values]
    if not xs or any(x is None for x in xs):
        return None, None
    arr = np.asarray(xs, np.float64)
    return float(arr.mean()), (float(arr.std(ddof=1)) if arr.size > 1 else None)


def _config_setting(config: dict | None) -> str:
    """A short description of a run's config (for rows not in ``REFERENCE``)."""
    if not config:
        return ""
    parts = []
    selection = config.get("selection")
    top_k = config.get("top_k")
    if selection is not None or top_k is not None:
        parts.append(" ".join(str(p) for p in (selection, f"K={top_k}" if top_k else None) if p))
    lam = config.get("lambda", config.get("lam"))
    if lam is not None:
        parts.append(f"λ={lam}")
    if config.get("decay_steps") is not None:
        parts.append(f"{config['decay_steps']} steps")
    finetune = config.get("finetune")
    if finetune is not None:
        if finetune == "none":
            parts.append("no fine-tune")
        else:
            batches = config.get("finetune_batches")
            parts.append(f"fine-tune {finetune}" + (f" ({batches} batches)" if batches else ""))
    return ", ".join(parts)


def _row_id(result: dict) -> str:
    row = result.get("row")
    if row is None:
        row = (result.get("config") or {}).get("row")
    return str(row) if row is not None else "?"


def summary_rows(results: Iterable[dict]) -> list[dict]:
    """One flat dict per result, in order.

    Keys: ``row``, ``setting`` (from ``REFERENCE``, else described from the config),
    ``ref_forget``, ``ref_retain``, ``ref_batches`` (None when not in ``REFERENCE``),
    ``forget``, ``retain``, ``test``, ``finetune_batches`` (ours), ``base_forget``,
    ``base_retain``, ``base_test`` (ours before unlearning) and ``num_seeds``. When a result
    has ``seeds`` (a list of per-seed final dicts), ``forget``/``retain``/``test`` are the means
    across seeds and ``forget_std``/``retain_std``/``test_std`` the sample std (ddof=1; None
    with a single seed); a seed with a missing/NaN value makes that mean None. Missing or
    non-finite numbers are None.
    """
    rows = []
    for result in results:
        row_id = _row_id(result)
        ref = REFERENCE.get(row_id)
        final = result.get("final") or {}
        base = result.get("base") or {}
        row: dict[str, Any] = {
            "row": row_id,
            "setting": ref["setting"] if ref else _config_setting(result.get("config")),
            "ref_forget": ref["forget"] if ref else None,
            "ref_retain": ref["retain"] if ref else None,
            "ref_batches": ref["finetune_batches"] if ref else None,
            "base_forget": _num(base.get("forget_acc")),
            "base_retain": _num(base.get("retain_acc")),
            "base_test": _num(base.get("test_acc")),
        }
        batches = result.get("finetune_batches", final.get("finetune_batches"))
        seeds = result.get("seeds")
        if seeds:
            for name, key in zip(("forget", "retain", "test"), _ACC_KEYS, strict=True):
                row[name], row[f"{name}_std"] = _mean_std([s.get(key) for s in seeds])
            if all("finetune_batches" in s for s in seeds):
                row["finetune_batches"], row["finetune_batches_std"] = _mean_std(
                    [s["finetune_batches"] for s in seeds]
                )
            else:
                row["finetune_batches"] = _num(batches)
            row["num_seeds"] = len(seeds)
        else:
            for name, key in zip(("forget", "retain", "test"), _ACC_KEYS, strict=True):
                row[name] = _num(final.get(key))
            row["finetune_batches"] = _num(batches)
            row["num_seeds"] = 1
        if row["finetune_batches"] is not None and float(row["finetune_batches"]).is_integer():
            if row.get("finetune_batches_std") in (None, 0.0):
                row["finetune_batches"] = int(row["finetune_batches"])
        rows.append(row)
    return rows


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def summary_markdown(results: Sequence[dict], title: str, base: dict | None = None) -> str:
    """A markdown section: ``## title`` and a table of ours vs. the reference per row.

    Columns: id | setting | ref forget | ours forget | ref retain | ours retain |
    ref FT batches | ours FT batches. Numbers have 2 decimals (batch counts are integers),
    ``"—"`` marks a missing/NaN value, and seed results show ``"mean ± std"``.

    Args:
      results: result dicts (see the module docstring).
      title: the section title.
      base: the reference base model before unlearning, ``{"forget", "retain", "overall"}``
        (e.g. ``REFERENCE_BASE["cifar"]``); when given, a first ``base`` line compares it with
        our base model (the mean of the results' ``base`` accuracies), and a note below the
        table gives the overall test accuracies.
    """
    rows = summary_rows(results)
    header = [
        "id",
        "setting",
        "ref forget",
        "ours forget",
        "ref retain",
        "ours retain",
        "ref FT batches",
        "ours FT batches",
    ]
    lines = [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def mean_of(key: str) -> float | None:
        xs = [r[key] for r in rows if r[key] is not None]
        return float(np.mean(xs)) if xs else None

    if base is not None:
        cells = [
            "base",
            "before unlearning",
            _fmt(base.get("forget")),
            _fmt(mean_of("base_forget")),
            _fmt(base.get("retain")),
            _fmt(mean_of("base_retain")),
            MISSING,
            MISSING,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    for r in rows:
        cells = [
            _cell(r["row"]),
            _cell(r["setting"]),
            _fmt(r["ref_forget"]),
            _fmt(r["forget"], r.get("forget_std")),
            _fmt(r["ref_retain"]),
            _fmt(r["retain"], r.get("retain_std")),
            _fmt_batches(r["ref_batches"]),
            _fmt_batches(r["finetune_batches"], r.get("finetune_batches_std")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    notes = []
    if base is not None:
        notes.append(
            f"Base model overall test accuracy: reference {_fmt(base.get('overall'))}, "
            f"ours {_fmt(mean_of('base_test'))}."
        )
    if any(r["num_seeds"] > 1 for r in rows):
        notes.append("Rows over several runs show mean ± sample std (ddof=1) across them "
                     "(seeds, or forget classes x seeds).")
    if notes:
        lines += [""] + notes
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------


def _history_series(result: dict, key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the history entries holding a finite ``key``."""
    steps, values = [], []
    for entry in result.get("history") or []:
        step, value = _num(entry.get("step")), _num(entry.get(key))
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
                ax.plot(steps, values, marker="o", markersize=3, label=_row_id(result))
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
    rows = summary_rows(results)
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


# --------------------------------------------------------------------------------------------
# Text summary
# --------------------------------------------------------------------------------------------


def print_summary(result: dict) -> str:
    """A one-screen text summary of one run (returned; the caller prints or logs it).

    Before/after accuracies (forget, retain, overall on test; train-split ones when present)
    beside the reference, fine-tune batches, importance info, time per phase and versions.
    """
    row_id = _row_id(result)
    ref = REFERENCE.get(row_id) or {}
    before = result.get("base") or {}
    after = result.get("final") or {}
    # What actually ran (explicit flags may override a preset), else the reference's words.
    setting = _config_setting(result.get("config")) or ref.get("setting")
    title = f"Row {row_id}" if row_id != "?" else "Run"
    lines = [title + (f" — {setting}" if setting else "")]
    lines.append(f"{'accuracy (%)':<16}{'before':>9}{'after':>9}{'ref':>9}")
    ref_base = REFERENCE_BASE["cifar"] if row_id.startswith("C") else {}
    metrics = [
        ("forget", "forget_acc", ref.get("forget")),
        ("retain", "retain_acc", ref.get("retain")),
        ("overall", "test_acc", None),
        ("forget (train)", "forget_train_acc", None),
        ("retain (train)", "retain_train_acc", None),
    ]
    for name, key, ref_value in metrics:
        if key not in before and key not in after and ref_value is None:
            continue
        lines.append(
            f"{name:<16}{_fmt(before.get(key)):>9}{_fmt(after.get(key)):>9}{_fmt(ref_value):>9}"
        )
    if ref_base:
        lines.append(
            "reference base: "
            + ", ".join(f"{k} {_fmt(v)}" for k, v in ref_base.items() if _num(v) is not None)
        )
    seeds = result.get("seeds")
    if seeds:
        (row,) = summary_rows([result])
        lines.append(
            f"over {len(seeds)} seeds: forget {_fmt(row['forget'], row.get('forget_std'))}, "
            f"retain {_fmt(row['retain'], row.get('retain_std'))}, "
            f"overall {_fmt(row['test'], row.get('test_std'))}"
        )
    batches = result.get("finetune_batches", after.get("finetune_batches"))
    line = f"fine-tune batches: {_fmt_batches(batches)}"
    if ref.get("finetune_batches") is not None:
        line += f" (ref {_fmt_batches(ref['finetune_batches'])})"
    lines.append(line)
    imp = result.get("importance")
    if imp:
        parts = []
        if imp.get("granularity") is not None:
            parts.append(str(imp["granularity"]))
        if imp.get("num_units") is not None:
            parts.append(f"{imp['num_units']} units")
        if imp.get("sample_size") is not None:
            parts.append(f"sample {imp['sample_size']}")
        if _num(imp.get("selected_threshold")) is not None:
            parts.append(f"threshold {float(imp['selected_threshold']):.4g}")
        if _num(imp.get("seconds")) is not None:
            parts.append(f"{float(imp['seconds']):.1f} s")
        lines.append("importance: " + ", ".join(parts))
    timings = result.get("timings")
    if timings:
        lines.append(
            "time (s): "
            + ", ".join(f"{phase} {_fmt(seconds)}" for phase, seconds in timings.items())
        )
    versions = result.get("versions")
    if versions:
        lines.append("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    return "\n".join(lines) + "\n"
