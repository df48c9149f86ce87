"""Summary tables of experiment rows against the reference numbers: markdown and text.

An experiment row (``L1``..``L4`` for LeNet/MNIST, ``C1``..``C10`` for ResNet-18/CIFAR-10)
writes one ``result.json`` dict holding ``row``, ``config``, ``base``/``final`` accuracies
(``forget_acc``, ``retain_acc``, ``test_acc``, ... in %), ``per_class_acc``, a per-step
``history``, ``finetune_batches``, ``importance``, ``timings`` and ``versions``; optionally
``seeds``, a list of per-seed final dicts (same keys as ``final``), reported as mean ± std.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from tdu_jax.reference import REFERENCE, REFERENCE_BASE

MISSING = "—"
_ACC_KEYS = ("forget_acc", "retain_acc", "test_acc")


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
        notes.append(
            "Rows over several runs show mean ± sample std (ddof=1) across them "
            "(seeds, or forget classes x seeds)."
        )
    if notes:
        lines += [""] + notes
    return "\n".join(lines) + "\n"


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
