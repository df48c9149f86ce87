"""Sizing the decay per request on the training split: the (K, Δt) sweep and its rule.

K (how many units) and Δt (how hard they decay) are left open by the method, and a pair
chosen on one class and seed does not transfer to others (METHOD.md). ``sweep_decay``
scores a grid of pairs with the request's own decay (no fine-tuning) on *training* data
only and picks one by a fixed rule:

    the highest retain-train accuracy among the points with forget-train accuracy
    <= ``forget_max`` (%); if none reaches it, the lowest forget-train accuracy.

Test data is never looked at, so the choice can be made for every class and seed.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn

from tdu_jax import data, decay, metrics, units
from tdu_jax.importance import Importance

PyTree = Any


def choose(points: Sequence[dict], forget_max: float) -> dict:
    """The rule above over points with ``forget_train_acc`` and ``retain_train_acc`` (%)."""
    if not points:
        raise ValueError("the sweep has no points")
    ok = [p for p in points if p["forget_train_acc"] <= forget_max]
    if ok:
        return max(ok, key=lambda p: (p["retain_train_acc"], -p["forget_train_acc"]))
    return min(points, key=lambda p: (p["forget_train_acc"], -p["retain_train_acc"]))


def sweep_decay(
    model: nn.Module,
    params: PyTree,
    batch_stats: PyTree,
    *,
    dataset: str,
    forget_train: data.Split,
    retain_train: data.Split,
    imp: Importance,
    spec: units.UnitSpec,
    top_ks: Sequence[int | float],
    dts: Sequence[float],
    lam: float,
    decay_steps: int,
    forget_max: float = 5.0,
) -> dict:
    """Scores every (K, Δt) of the grid with ``decay_steps`` steps of rate ``lam``.

    Args:
      model, params, batch_stats: the trained model.
      dataset: dataset name (normalisation).
      forget_train: forget-class training images scored for forget accuracy.
      retain_train: retain-class training images (a sample is enough) for retain accuracy.
      imp: importance of the units of ``spec`` (ranking for top-K).
      spec: unit numbering.
      top_ks: K values (counts or fractions).
      dts: Δt values (> 0).
      lam: decay rate λ.
      decay_steps: T.
      forget_max: the rule's forget-train ceiling in %.

    Returns:
      {"points": [{"top_k", "dt", "units", "forget_train_acc", "retain_train_acc"}],
       "chosen": {"top_k", "dt"}, "rule": text, "lambda", "decay_steps"}.
    """
    if not top_ks or not dts:
        raise ValueError("the sweep grid needs at least one K and one dt")
    decay.check_decay_args(lam, min(dts), decay_steps)
    points = []
    for k in top_ks:
        selected = decay.select_top_k(imp, k)
        mask = units.unit_mask(params, spec, selected)
        for dt in dts:
            decayed = decay.decay(params, mask, lam, dt, decay_steps)
            accs = {}
            for name, split in (("forget_train_acc", forget_train),
                                ("retain_train_acc", retain_train)):  # fmt: skip
                pred = metrics.predict(model, decayed, batch_stats, split.images, dataset=dataset)
                accs[name] = metrics.accuracy(pred, split.labels)
            points.append({"top_k": k, "dt": float(dt), "units": int(selected.size), **accs})
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


def retain_sample(retain_train: data.Split, size: int, seed: int) -> data.Split:
    """A seeded random subset of ``size`` retain images (all of them if fewer)."""
    if retain_train.size <= size:
        return retain_train
    return data.random_fraction(retain_train, size / retain_train.size, seed)
