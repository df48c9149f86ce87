"""Sizing the decay per request on the training split: the (K, Δt) sweep and its rule.

K (how many units) and Δt (how hard they decay) are left open by the method, and a pair
chosen on one class and seed does not transfer to others (METHOD.md). ``sweep_decay``
scores a grid of pairs with the request's own decay (no fine-tuning) on *training* data
only and picks one by a fixed rule:

    the highest retain-train accuracy among the points with forget-train accuracy
    <= ``forget_max`` (%); if none reaches it, the lowest forget-train accuracy.

Test data is never looked at, so the choice can be made for every class and seed.

A grid point that silences the class often overshoots: the next gentler Δt on the grid
does not silence it, and the one chosen costs retain accuracy the class did not require.
With ``search_steps > 0`` the sweep therefore also finds, for every K, the gentlest Δt
that still reaches the ceiling (``search_dt``: geometric bisection between the grid's last
failing and first silencing Δt, ``search_steps`` halvings; when the grid's smallest Δt already
silences, the bracket reaches down to min Δt / SEARCH_BELOW, and when none does, up to
max Δt * SEARCH_ABOVE). These points join the grid's and the rule picks among all of them.

Only the points that silence the class need their retain accuracy (the rule compares retain
accuracy among those alone, and the search looks at forget accuracy only), so by default
the other points are scored on the forget images only (``retain_train_acc`` None; about a
third of the sweep's cost on LeNet): the choice is the same as with every point scored.
When no point silences, the fallback's ties on forget accuracy are scored in full.
``retain_all_points=True`` scores every point, for trade-off curves.

A decay that only just silences the class is undone by fine-tuning on the retained classes
(the weights keep most of their size and retain gradients pull them back). When the run
fine-tunes, ``choose_after_finetune`` therefore checks the sweep's points through the run
itself (``scores_after_run`` scores a run):

    among the points with forget-train accuracy <= ``forget_max`` before fine-tuning, take
    them in order of least damage (highest retain-train accuracy before fine-tuning) and keep
    the least damaging one whose forget-train accuracy is still <= ``forget_max`` after the
    run's own decay and fine-tuning; if none holds, the tried point with the lowest
    forget-train accuracy after fine-tuning.

The search bisects that order (forget accuracy after fine-tuning falls as the damage grows),
so it costs at most 1 + ceil(log2(candidates)) runs of the row (decay plus its fine-tuning),
and one fewer whenever a point gentler than the most damaging one holds.

A run may decay harder than the chosen point, with its Δt times a margin (``run_point``): that
brings relearning nearer a retrained model's, but where the chosen K is large it costs retain
accuracy fine-tuning does not give back. ``guard_margin`` checks the margins through the run:

    try the margins m, m/2, m/4, ... (> 1) in that order and keep the first whose run leaves
    retain-train accuracy >= the chosen point's (margin 1) - ``tolerance`` points and
    forget-train accuracy <= max(``forget_max``, the chosen point's); else margin 1.

It costs one run of the row per margin tried (and one for margin 1 unless the fine-tune check
above already ran it).
"""

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn

from tdu_jax import data, decay, metrics, units
from tdu_jax.importance import Importance

PyTree = Any
SEARCH_BELOW = 16.0  # the Δt search reaches down to min(grid Δt) / SEARCH_BELOW
SEARCH_ABOVE = 4.0  # ... and up to max(grid Δt) * SEARCH_ABOVE
# (top_k, dt) -> (params, batch_stats) after the run's decay steps and fine-tuning.
RunFn = Callable[[int | float, float], tuple[PyTree, PyTree]]


def choose(points: Sequence[dict], forget_max: float) -> dict:
    """The rule above over points with ``forget_train_acc`` and ``retain_train_acc`` (%)."""
    if not points:
        raise ValueError("the sweep has no points")
    ok = [p for p in points if p["forget_train_acc"] <= forget_max]
    if ok:
        return max(ok, key=lambda p: (p["retain_train_acc"], -p["forget_train_acc"]))
    lowest = min(p["forget_train_acc"] for p in points)
    ties = [p for p in points if p["forget_train_acc"] == lowest]
    return max(ties, key=lambda p: p["retain_train_acc"])


def run_point(calibration: dict, dt_margin: float) -> dict:
    """The {top_k, dt} a run decays with: the calibration's chosen point with its Δt times
    ``dt_margin`` (>= 1; 1 runs the gentlest silencing point itself)."""
    chosen = calibration["chosen"]
    return {**chosen, "dt": chosen["dt"] * dt_margin}


def sweep_decay(
    model: nn.Module,
    params: PyTree,
    batch_stats: PyTree,
    *,
    dataset: str | None = None,
    forget_train: data.Split,
    retain_train: data.Split,
    imp: Importance,
    spec: units.UnitSpec,
    top_ks: Sequence[int | float],
    dts: Sequence[float],
    lam: float,
    decay_steps: int,
    forget_max: float = 5.0,
    search_steps: int = 0,
    retain_all_points: bool = False,
    budget: str = "global",
    preprocess: Callable | None = None,
) -> dict:
    """Scores every (K, Δt) of the grid with ``decay_steps`` steps of rate ``lam``, and with
    ``search_steps > 0`` each K's gentlest silencing Δt (``search_dt``).

    Args:
      model, params, batch_stats: the trained model.
      dataset: dataset name (normalisation of uint8 images), or None with ``preprocess``
        (or neither: the splits hold model inputs).
      forget_train: forget-class training images scored for forget accuracy.
      retain_train: retain-class training images (a sample is enough) for retain accuracy.
      imp: importance of the units of ``spec`` (ranking for top-K).
      spec: unit numbering.
      top_ks: K values (counts or fractions).
      dts: Δt values (> 0).
      lam: decay rate λ.
      decay_steps: T.
      forget_max: the rule's forget-train ceiling in %.
      search_steps: halvings of each K's Δt search (0: the grid only).
      retain_all_points: score retain accuracy at every point, not only where the rule
        needs it (points with forget-train accuracy <= ``forget_max``).
      budget: how each top-K is spread over layers (``decay.rank_units``).
      preprocess: images -> model inputs, instead of ``dataset``.

    Returns:
      {"points": [{"top_k", "dt", "units", "forget_train_acc", "retain_train_acc",
       "search"}], "chosen": {"top_k", "dt"}, "rule": text, "lambda", "decay_steps"};
      ``search`` is True for the Δt search's points (they follow their K's grid points);
      ``retain_train_acc`` is None where it was not needed (see ``retain_all_points``).
    """
    if not top_ks or not dts:
        raise ValueError("the sweep grid needs at least one K and one dt")
    if search_steps < 0:
        raise ValueError(f"search_steps must be >= 0; got {search_steps}")
    decay.check_decay_args(lam, min(dts), decay_steps)
    accuracy_of = functools.partial(accuracy, model, dataset=dataset, preprocess=preprocess)
    points, decayed_at = [], {}
    for k in top_ks:
        selected = decay.select_top_k(imp, k, budget, spec)
        mask = units.unit_mask(params, spec, selected)
        decayed_at[k] = lambda dt, mask=mask: decay.decay(params, mask, lam, dt, decay_steps)

        def score(dt: float, k=k) -> dict:  # this K (bound now, not late)
            decayed = decayed_at[k](dt)
            accs = {"forget_train_acc": accuracy_of(decayed, batch_stats, forget_train)}
            needed = retain_all_points or accs["forget_train_acc"] <= forget_max
            accs["retain_train_acc"] = (
                accuracy_of(decayed, batch_stats, retain_train) if needed else None
            )
            return accs

        grid = {float(dt): score(dt) for dt in dts}
        found = search_dt(score, grid, forget_max, search_steps) if search_steps else {}
        for dt, accs in [*grid.items(), *found.items()]:
            points.append({"top_k": k, "dt": dt, "units": int(selected.size), **accs,
                           "search": dt in found})  # fmt: skip
    if all(p["forget_train_acc"] > forget_max for p in points):
        # The fallback ranks by forget accuracy, then retain: score the ties' retain.
        lowest = min(p["forget_train_acc"] for p in points)
        for p in points:
            if p["forget_train_acc"] == lowest and p["retain_train_acc"] is None:
                decayed = decayed_at[p["top_k"]](p["dt"])
                p["retain_train_acc"] = accuracy_of(decayed, batch_stats, retain_train)
    best = choose(points, forget_max)
    return {
        "points": points,
        "chosen": {"top_k": best["top_k"], "dt": best["dt"]},
        "rule": f"max retain_train_acc s.t. forget_train_acc <= {forget_max}",
        "lambda": lam,
        "decay_steps": decay_steps,
        "forget_max": forget_max,
        "chosen_point": dict(best),
    }


def search_dt(
    score: Callable[[float], dict], grid: dict[float, dict], forget_max: float, steps: int
) -> dict[float, dict]:
    """The gentlest Δt whose forget-train accuracy is <= ``forget_max`` (%), for one K.

    Args:
      score: Δt -> {"forget_train_acc", "retain_train_acc"} after the decay with that Δt.
      grid: the grid's Δt -> score (already evaluated).
      forget_max: the ceiling in %.
      steps: geometric halvings of the bracket [largest failing Δt below the smallest
        silencing one, that silencing Δt]; Δt values are kept to 4 significant digits.

    Returns:
      The Δt values evaluated here (not in ``grid``) -> their scores; empty when no Δt up to
      max(grid) * SEARCH_ABOVE silences the class.
    """
    tried = dict(grid)

    def silences(dt: float) -> bool:
        if dt not in tried:
            tried[dt] = score(dt)
        return tried[dt]["forget_train_acc"] <= forget_max

    if not any(silences(dt) for dt in grid) and not silences(max(grid) * SEARCH_ABOVE):
        return {dt: a for dt, a in tried.items() if dt not in grid}
    hi = min(dt for dt in tried if silences(dt))
    if hi == min(tried):  # the grid's gentlest Δt silences already: look below the grid
        silences(min(grid) / SEARCH_BELOW)
    failing = [dt for dt in tried if dt < hi and not silences(dt)]
    if failing:
        lo = max(failing)
        for _ in range(steps):
            mid = geometric_midpoint(lo, hi)
            if not lo < mid < hi:
                break
            if silences(mid):
                hi = mid
            else:
                lo = mid
    return {dt: a for dt, a in tried.items() if dt not in grid}


def geometric_midpoint(lo: float, hi: float) -> float:
    """sqrt(lo * hi) kept to 4 significant digits (the bisections' step; lo, hi > 0)."""
    return float(f"{math.sqrt(lo * hi):.4g}")


def accuracy(model, params, batch_stats, split: data.Split, *, dataset: str | None = None,
             preprocess: Callable | None = None) -> float:  # fmt: skip
    """Accuracy in % of the model on ``split`` (``dataset``/``preprocess`` as in
    ``metrics.predict``)."""
    pred = metrics.predict(model, params, batch_stats, split.images, dataset=dataset,
                           preprocess=preprocess)  # fmt: skip
    return metrics.accuracy(pred, split.labels)


def train_accuracies(
    model,
    params,
    batch_stats,
    forget_train: data.Split,
    retain_train: data.Split,
    *,
    dataset: str | None = None,
    preprocess: Callable | None = None,
) -> dict:
    """{"forget_train_acc", "retain_train_acc"} in % on the two training samples."""
    kw = {"dataset": dataset, "preprocess": preprocess}
    return {
        "forget_train_acc": accuracy(model, params, batch_stats, forget_train, **kw),
        "retain_train_acc": accuracy(model, params, batch_stats, retain_train, **kw),
    }


def choose_after_finetune(sweep: dict, after: Callable[[dict], dict]) -> dict:
    """The module docstring's fine-tune rule over ``sweep``'s points (from ``sweep_decay``).

    Args:
      sweep: ``sweep_decay``'s output (points scored before fine-tuning, ``forget_max``).
      after: point -> {"forget_train_acc", "retain_train_acc"} (%) after the run's decay and
        fine-tuning with the point's (top_k, dt); called once per tried point.

    Returns:
      ``sweep`` with ``chosen``/``chosen_point`` replaced by the chosen point, ``tried`` (each
      tried point with ``forget_train_acc_after``/``retain_train_acc_after``), ``rule`` and
      ``confirmed`` (True when the chosen point held after fine-tuning).
    """
    forget_max = sweep["forget_max"]
    candidates = sorted(
        (p for p in sweep["points"] if p["forget_train_acc"] <= forget_max),
        key=lambda p: (-p["retain_train_acc"], p["forget_train_acc"]),
    )
    if not candidates:  # nothing silences the class before fine-tuning: try the strongest
        candidates = [choose(sweep["points"], forget_max)]
    tried: dict[int, dict] = {}

    def holds(i: int) -> bool:
        if i not in tried:
            accs = after(candidates[i])
            tried[i] = {**candidates[i], **{f"{k}_after": v for k, v in accs.items()}}
        return tried[i]["forget_train_acc_after"] <= forget_max

    # Bisection for the least damaging point that holds, as if the most damaging one held;
    # that one is run only when the bisection ends on it (one run saved whenever it does not).
    lo, hi = 0, len(candidates) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if holds(mid):
            hi = mid
        else:
            lo = mid + 1
    first_ok = hi if holds(hi) else None
    if first_ok is not None:
        best = tried[first_ok]
    else:
        after = lambda p: (p["forget_train_acc_after"], -p["retain_train_acc_after"])
        best = min(tried.values(), key=after)
    return {
        **sweep,
        "chosen": {"top_k": best["top_k"], "dt": best["dt"]},
        "chosen_point": dict(best),
        "tried": [tried[i] for i in sorted(tried)],
        "confirmed": first_ok is not None,
        "rule": (f"least damage before fine-tuning among points with forget_train_acc <= "
                 f"{forget_max} before and after the run's fine-tuning"),
    }  # fmt: skip


def scores_after_run(
    model: nn.Module,
    run: RunFn,
    *,
    dataset: str | None = None,
    forget_train: data.Split,
    retain_train: data.Split,
    preprocess: Callable | None = None,
) -> Callable[[dict], dict]:
    """point {"top_k", "dt"} -> ``train_accuracies`` after ``run`` (top_k, dt) ->
    (params, batch_stats), the run's decay and fine-tuning, on the sweep's training samples."""

    def after(point: dict) -> dict:
        params, batch_stats = run(point["top_k"], point["dt"])
        return train_accuracies(model, params, batch_stats, forget_train, retain_train,
                                dataset=dataset, preprocess=preprocess)  # fmt: skip

    return after


def guard_margins(margin: float) -> list[float]:
    """The margins the guard tries, largest first: ``margin``, halved while > 1 (4 -> [4, 2];
    1 -> [])."""
    if not margin >= 1:
        raise ValueError(f"dt_margin must be >= 1; got {margin}")
    margins = []
    while margin > 1:
        margins.append(margin)
        margin /= 2
    return margins


def guard_margin(
    calibration: dict, after: Callable[[dict], dict], margin: float, tolerance: float
) -> dict:
    """The module docstring's margin guard over ``calibration``'s chosen point.

    Args:
      calibration: ``sweep_decay``'s or ``choose_after_finetune``'s output; its
        ``chosen_point``'s ``*_after`` accuracies (when present) are margin 1's.
      after: point {"top_k", "dt"} -> {"forget_train_acc", "retain_train_acc"} (%) after the
        run's decay (and fine-tuning) with that point; called once per margin tried.
      margin: the largest margin (>= 1) to try.
      tolerance: retain-train points (>= 0) a margin may cost against margin 1.

    Returns:
      ``calibration`` with ``dt_margin`` (the margin kept), ``margin_guard`` (``tolerance``)
      and ``margin_checks`` ([{"dt_margin", "forget_train_acc", "retain_train_acc", "kept"}],
      margin 1 first).
    """
    if not tolerance >= 0:
        raise ValueError(f"the margin guard's tolerance must be >= 0 points; got {tolerance}")
    margins = guard_margins(margin)
    point = calibration["chosen_point"]
    if "retain_train_acc_after" in point:
        at_one = {k: point[f"{k}_after"] for k in ("forget_train_acc", "retain_train_acc")}
    else:
        at_one = after(run_point(calibration, 1.0)) if margins else {}
    checks = [{"dt_margin": 1.0, **at_one, "kept": False}]
    kept = 1.0
    for m in margins:
        accs = after(run_point(calibration, m))
        holds = (accs["retain_train_acc"] >= at_one["retain_train_acc"] - tolerance
                 and accs["forget_train_acc"] <= max(calibration["forget_max"],
                                                      at_one["forget_train_acc"]))  # fmt: skip
        checks.append({"dt_margin": m, **accs, "kept": holds})
        if holds:
            kept = m
            break
    checks[0]["kept"] = kept == 1.0
    return {**calibration, "dt_margin": kept, "margin_guard": tolerance, "margin_checks": checks}


def subsample(split: data.Split, size: int, seed: int) -> data.Split:
    """A seeded random subset of ``size`` images of ``split`` (all of them if fewer, or if
    ``size`` is 0)."""
    if size == 0 or split.size <= size:
        return split
    return data.random_fraction(split, size / split.size, seed)
