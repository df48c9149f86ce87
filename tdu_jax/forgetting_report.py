"""Tables and plots of forgetting quality across requests (forget classes x seeds).

Input: result dicts (one per row, forget class and seed) that carry, besides ``final``
(accuracies and attack metrics of the unlearned model), ``retrained``, ``control``,
``base_metrics``, ``gap``, ``cost_ratio`` and ``separates`` (experiments/gold.py).
Everything is mean ± sample std (ddof=1) over the requests.
"""

import math
import os
from collections.abc import Sequence

import numpy as np

from tdu_jax import plots

METRICS = ("forget_acc", "retain_acc", "forget_train_acc", "retain_train_acc", "mia_svc",
           "mia_entropy", "forget_entropy_median", "mia_loss_auc", "probe_recovery",
           "relearn_steps", "forget_prediction_js")  # fmt: skip
SOURCES = (("final", "unlearned"), ("retrained", "retrained"), ("control", "silenced control"),
           ("base_metrics", "base"))  # fmt: skip


class Goal:
    """``metric`` of the unlearned model compared with the retrained one.

    kind: "max" (value <= bound), "above_retrained" (value >= retrained - bound),
    "near_retrained" (abs(value - retrained) <= bound), "below_retrained"
    (value <= retrained + bound), or "cost" (cost_ratio <= bound).
    """

    def __init__(self, metric: str, kind: str, bound: float):
        self.metric, self.kind, self.bound = metric, kind, bound

    def label(self) -> str:
        text = {"max": "{m} <= {b:g}", "above_retrained": "{m} >= retrained - {b:g}",
                "near_retrained": "abs({m} - retrained) <= {b:g}",
                "below_retrained": "{m} <= retrained + {b:g}",
                "cost": "cost_ratio <= {b:g}"}[self.kind]  # fmt: skip
        return text.format(m=self.metric, b=self.bound)

    def met(self, result: dict) -> bool | None:
        if self.kind == "cost":
            value = result.get("cost_ratio") if counts_calibration(result) else None
            return None if value is None else bool(value <= self.bound)
        value = (result.get("final") or {}).get(self.metric)
        ref = (result.get("retrained") or {}).get(self.metric)
        if value is None or (self.kind != "max" and ref is None):
            return None
        if self.kind == "max":
            return bool(value <= self.bound)
        if self.kind == "above_retrained":
            return bool(value >= ref - self.bound)
        if self.kind == "near_retrained":
            return bool(abs(value - ref) <= self.bound)
        return bool(value <= ref + self.bound)


def counts_calibration(result: dict) -> bool:
    """Whether the result's ``cost_ratio`` includes its calibration's seconds: results that
    calibrated K and dt recorded them (``timings.calibration``) only from 0a8a47e on."""
    calibrated = (result.get("config") or {}).get("calibrate")
    return not calibrated or "calibration" in (result.get("timings") or {})


def cost_text(results: Sequence[dict]) -> str:
    """Mean ± std of ``cost_ratio`` in % over the results whose cost counts their calibration,
    saying how many were left out."""
    counted = [r for r in results if r.get("cost_ratio") is not None and counts_calibration(r)]
    text = mean_std([100.0 * r["cost_ratio"] for r in counted])
    left = sum(r.get("cost_ratio") is not None for r in results) - len(counted)
    if left:
        text += f" (over {len(counted)} requests; {left} recorded without calibration seconds)"
    return text


def reversed_fit_count(results: Sequence[dict], source: str = "final") -> str:
    """Text "n/m": of the m results whose ``source`` model recorded SSD's entropy-attack
    slope, the n where it is >= 0 (the attack's premise reversed, so its ``mia_entropy`` is
    no evidence there); "" if none recorded one."""
    slopes = values(results, source, "mia_entropy_slope")
    return f"{sum(v >= 0 for v in slopes)}/{len(slopes)}" if slopes else ""


def reversed_entropy_attack(results: Sequence[dict]) -> str:
    """Per model, on how many requests SSD's entropy attack fitted a slope >= 0
    (``reversed_fit_count``); "" if no result recorded slopes."""
    counts = [f"{name} {count}" for source, name in SOURCES
              if (count := reversed_fit_count(results, source))]  # fmt: skip
    if not counts:
        return ""
    return (
        "mia_entropy's attack fitted a slope >= 0 (higher entropy -> member, its premise "
        "reversed; mia_entropy is no evidence there) on: " + ", ".join(counts)
    )


def values(results: Sequence[dict], source: str, metric: str) -> list[float]:
    out = []
    for r in results:
        v = (r.get(source) or {}).get(metric)
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
            out.append(float(v))
    return out


def mean_std(values: Sequence[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}"


def row_name(result: dict) -> str:
    """The table row a result belongs to ("custom" for a run outside the reference rows)."""
    return str(result.get("row") or "custom")


def group_by_row(results: Sequence[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for r in results:
        groups.setdefault(row_name(r), []).append(r)
    return groups


def forgetting_markdown(results: Sequence[dict], title: str, goals: Sequence[Goal] = (),
                        partial: bool = False) -> str:  # fmt: skip
    """Per row: every metric for unlearned / retrained / control / base, the gap, and goals.

    Args:
      results: result dicts with the forgetting report (others are skipped).
      title: section title.
      goals: goals to count (share of requests that meet each).
      partial: mark the summary as covering an unfinished run.

    Returns:
      Markdown text.
    """
    results = [r for r in results if r.get("retrained")]
    lines = [f"## {title}" + (" (PARTIAL: run not finished)" if partial else ""), ""]
    if not results:
        return "\n".join(lines + ["No result with a retrained comparison yet.", ""])
    for row, group in group_by_row(results).items():
        classes = sorted({tuple((r.get("config") or {}).get("forget_class", [])) for r in group})
        seeds = sorted({(r.get("config") or {}).get("seed") for r in group})
        lines += [f"### {row}: {len(group)} requests ({len(classes)} forget classes x "
                  f"{len(seeds)} seeds)", "",
                  "| metric | " + " | ".join(name for _, name in SOURCES)
                  + " | gap (unlearned - retrained) | control separated |",
                  "|---|" + "---|" * (len(SOURCES) + 2)]  # fmt: skip
        for metric in METRICS:
            cells = [mean_std(values(group, src, metric)) for src, _ in SOURCES]
            gap = mean_std(values(group, "gap", metric))
            sep = [r["separates"][metric] for r in group if metric in (r.get("separates") or {})]
            sep_text = f"{sum(sep)}/{len(sep)}" if sep else "—"
            lines.append(f"| {metric} | " + " | ".join(cells) + f" | {gap} | {sep_text} |")
        lines += [
            "",
            "cost_ratio (unlearning seconds, calibration included / retraining "
            f"seconds), in %: {cost_text(group)}",
        ]
        reversed_text = reversed_entropy_attack(group)
        if reversed_text:
            lines += ["", reversed_text]
        if goals:
            lines += ["", "| goal | met |", "|---|---|"]
            for goal in goals:
                met = [m for m in (goal.met(r) for r in group) if m is not None]
                lines.append(f"| {goal.label()} | {sum(met)}/{len(met)} |")
        lines.append("")
    lines.append(
        "A metric whose 'control separated' count is low cannot tell a model that only "
        "silenced the class's logit from the retrained one on this dataset: it is weak evidence."
    )
    return "\n".join(lines) + "\n"


def plot_per_class(results: Sequence[dict], class_names: Sequence[str],
                   path: str | os.PathLike, metric: str = "forget_acc") -> None:  # fmt: skip
    """Bars of ``metric`` per forget class: each row's mean over seeds beside retrained."""
    fig = plots._figure(figsize=(max(6.0, 0.9 * len(class_names)), 3.6), layout="tight")
    ax = fig.add_subplot()
    groups = group_by_row([r for r in results if r.get("retrained")])
    series = {name: {} for name in groups}
    retrained: dict[int, list[float]] = {}
    for row, group in groups.items():
        for r in group:
            classes = (r.get("config") or {}).get("forget_class") or []
            if len(classes) != 1:
                continue
            c = int(classes[0])
            series[row].setdefault(c, []).extend(values([r], "final", metric))
            retrained.setdefault(c, []).extend(values([r], "retrained", metric))
    names = list(series) + ["retrained"]
    width = 0.8 / max(1, len(names))
    x = np.arange(len(class_names))
    for i, name in enumerate(names):
        data = retrained if name == "retrained" else series[name]
        heights = [float(np.mean(data[c])) if data.get(c) else np.nan for c in range(len(x))]
        ax.bar(x + i * width - 0.4 + width / 2, heights, width, label=name)
    ax.set_xticks(x, class_names, rotation=45, ha="right")
    ax.set_ylabel(f"{metric} (mean over seeds)")
    ax.legend(fontsize=7, ncol=min(4, len(names)))
    plots._save_figure(fig, path)
