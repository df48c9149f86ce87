"""Selection of units and their time-inspired decay ``theta <- theta * exp(-lambda * dt)``."""

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tdu_jax.importance import Importance
from tdu_jax.units import UnitSpec, check_mask_structure, locate

PyTree = Any
SELECTIONS = ("topk", "random")
# How a top-K is spread over layers: "global" ranks every unit against every other;
# "per_layer" gives each layer a share of K in proportion to its unit count;
# "per_layer_equal" gives every layer the same count (a small layer can be taken whole).
TOPK_BUDGETS = ("global", "per_layer", "per_layer_equal")


def resolve_k(k: int | float, num_units: int) -> int:
    """Turns K (a count, or a fraction in (0, 1] given as a float) into a count.

    Args:
      k: an int in [1, num_units], or a float fraction in (0, 1].
      num_units: how many units there are.

    Returns:
      The number of units to select (>= 1).
    """
    if isinstance(k, bool) or not isinstance(k, int | float | np.integer | np.floating):
        raise ValueError(f"top_k must be a count or a fraction; got {k!r}")
    if isinstance(k, float | np.floating):
        if not 0.0 < k <= 1.0:
            raise ValueError(f"top_k as a fraction must be in (0, 1]; got {k}")
        return max(1, int(round(k * num_units)))
    if not 1 <= k <= num_units:
        raise ValueError(f"top_k must be in [1, {num_units}] (the number of units); got {k}")
    return int(k)


def check_topk_budget(budget: str) -> str:
    if budget not in TOPK_BUDGETS:
        raise ValueError(f"topk_budget must be one of {', '.join(TOPK_BUDGETS)}; got {budget!r}")
    return budget


def rank_units(
    importance: Importance, budget: str = "global", spec: UnitSpec | None = None
) -> np.ndarray:
    """Unit indices from most to least important.

    Order (``budget="global"``): accuracy drop (descending), then cross-entropy increase
    (descending), then unit index (ascending), so the ranking is deterministic.

    With ``budget="per_layer"`` (needs ``spec``) every layer keeps that order among its own
    units, and the layers are interleaved by rank within the layer over the layer's scored
    unit count (ties: the global order above), so the first K units take about
    K x (layer units / all units) from every layer: a layer with many units the class relies
    on cannot fill the whole budget. With K below the number of layers, the most important
    of the layers' top units are taken. ``budget="per_layer_equal"`` interleaves by rank
    within the layer alone, so every layer gives about K / (number of layers) units until it
    has none left.
    """
    check_topk_budget(budget)
    if budget != "global" and spec is None:
        raise ValueError(f"topk_budget={budget} needs the unit spec (which layer holds a unit)")
    order = np.lexsort((importance.units, -importance.loss_increase, -importance.accuracy_drop))
    ranked = importance.units[order]
    if budget == "global":
        return ranked
    layer, _ = locate(spec, ranked)
    position = np.empty(ranked.size, dtype=np.int64)  # rank within the unit's own layer
    for index in np.unique(layer):
        in_layer = layer == index
        position[in_layer] = np.arange(in_layer.sum())
    if budget == "per_layer":
        share = position / np.bincount(layer)[layer]  # in [0, 1): how far down its own layer
    else:  # per_layer_equal
        share = position.astype(np.float64)
    return ranked[np.argsort(share, kind="stable")]  # equal shares keep the global order


def select_top_k(
    importance: Importance, k: int | float, budget: str = "global", spec: UnitSpec | None = None
) -> np.ndarray:
    """The K most important units (sorted by unit index); ``budget``: see ``rank_units``."""
    count = resolve_k(k, importance.units.size)
    return np.sort(rank_units(importance, budget, spec)[:count])


def select_random_k(key: jax.Array, num_units: int, k: int | float) -> np.ndarray:
    """K distinct units drawn uniformly with ``key`` (sorted), the reference baseline."""
    count = resolve_k(k, num_units)
    return np.sort(np.asarray(jax.random.choice(key, num_units, (count,), replace=False)))


def _traced(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


def check_decay_args(lam: float, dt: float, steps: int = 0) -> None:
    """ValueError naming ``lambda``, ``dt`` or ``decay_steps`` when out of range.

    Traced values (under ``jax.jit``) cannot be checked and are let through.
    """
    if not _traced(lam) and (not math.isfinite(lam) or lam < 0):
        raise ValueError(f"lambda must be finite and >= 0; got {lam}")
    if not _traced(dt) and (not math.isfinite(dt) or dt <= 0):
        raise ValueError(f"dt must be finite and > 0; got {dt}")
    if _traced(steps):
        return
    if isinstance(steps, bool) or not isinstance(steps, int | np.integer) or steps < 0:
        raise ValueError(f"decay_steps must be an integer >= 0; got {steps!r}")


def decay_factor(lam: float | jax.Array, dt: float | jax.Array) -> float | jax.Array:
    """``exp(-lambda * dt)``: the factor one decay step applies (a float32 array if traced)."""
    check_decay_args(lam, dt)
    if _traced(lam) or _traced(dt):
        return jnp.exp(-jnp.asarray(lam, jnp.float32) * jnp.asarray(dt, jnp.float32))
    return math.exp(-lam * dt)


@jax.jit
def _decay_step(params: PyTree, mask: PyTree, factor: jax.Array) -> PyTree:
    return jax.tree.map(lambda p, m: jnp.where(m, p * factor.astype(p.dtype), p), params, mask)


def decay_step(params: PyTree, mask: PyTree, lam: float, dt: float) -> PyTree:
    """One decay step: masked entries times ``exp(-lambda * dt)``, others bit-identical.

    Args:
      params: params tree.
      mask: bool tree of the same structure (``units.unit_mask``).
      lam: decay rate lambda >= 0 (per unit of time).
      dt: time step > 0.

    Returns:
      The decayed params tree.
    """
    check_mask_structure(params, mask)
    return _decay_step(params, mask, jnp.asarray(decay_factor(lam, dt), jnp.float32))


def decay(params: PyTree, mask: PyTree, lam: float, dt: float, steps: int) -> PyTree:
    """``steps`` decay steps in a row (the T-step schedule without fine-tuning).

    Works under ``jax.jit`` with traced ``lam``, ``dt``, ``mask`` and ``steps`` (a traced
    ``steps`` runs a ``fori_loop``; a Python int unrolls, one step at a time as
    ``decay_step``, so results are bit-identical either way).
    """
    check_decay_args(lam, dt, steps)
    if _traced(steps):
        check_mask_structure(params, mask)
        factor = jnp.asarray(decay_factor(lam, dt), jnp.float32)
        return jax.lax.fori_loop(0, steps, lambda _, p: _decay_step(p, mask, factor), params)
    for _ in range(steps):
        params = decay_step(params, mask, lam, dt)
    return params
