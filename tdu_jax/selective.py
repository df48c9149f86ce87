"""Selective importance: what a unit does to the forget class *relative* to the retained ones.

The plain score (``importance_score="forget"``) ranks units by the accuracy drop their removal
causes on a forget-class sample. Units that every class relies on (early conv weights) rank
high too, and decaying them costs retain accuracy. The selective score runs the same exact
ablation engine on a retain-class sample and subtracts it::

    selective_drop(u) = forget_drop(u) - beta * retain_drop(u)      (percentage points)
    selective_loss(u) = forget_loss_inc(u) - beta * retain_loss_inc(u)   (tie-break, nats)

``beta = 1`` weighs a point of retain accuracy like a point of forget accuracy. A unit that
helps the forget class as much as the others scores ~0; one that only the forget class uses
keeps its full score. (SSD uses a ratio of Fisher importances instead; a difference keeps
the exact-ablation scale and has no division by near-zero retain scores.)
"""

import numpy as np

from tdu_jax.importance import Importance

IMPORTANCE_SCORES = ("forget", "selective")


def check_importance_score(score: str) -> str:
    if score not in IMPORTANCE_SCORES:
        raise ValueError(
            f"importance_score must be one of {', '.join(IMPORTANCE_SCORES)}; got {score!r}"
        )
    return score


def selective_importance(forget: Importance, retain: Importance, beta: float = 1.0) -> Importance:
    """Combines forget-sample and retain-sample ablation scores of the same units.

    Args:
      forget: importance on a forget-class sample.
      retain: importance of the same units (same order) on a retain-class sample.
      beta: weight of the retain drop, >= 0 (0 gives back the forget score).

    Returns:
      ``Importance`` whose ``accuracy_drop``/``loss_increase`` are the differences above;
      ``base_accuracy``/``base_loss``/``sample_size`` are the forget sample's and ``seconds``
      the sum of both.
    """
    if not beta >= 0:
        raise ValueError(f"selective beta must be >= 0; got {beta}")
    if not np.array_equal(forget.units, retain.units):
        raise ValueError("forget and retain importance must score the same units in one order")
    return forget._replace(
        accuracy_drop=forget.accuracy_drop - beta * retain.accuracy_drop,
        loss_increase=forget.loss_increase - beta * retain.loss_increase,
        seconds=forget.seconds + retain.seconds,
    )
