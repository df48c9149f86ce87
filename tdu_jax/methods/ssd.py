"""Selective Synaptic Dampening (SSD; Foster et al., AAAI 2024).

Source (read 2026-11-27): if-loops/selective-synaptic-dampening, ssd.py
(`ParameterPerturber.calc_importance`, `modify_weight`, `ssd_tuning`) and
src/forget_full_class_main.py (unshuffled loaders of batch 64 over the forget set and over
ConcatDataset(retain, forget); lambda 1, alpha 10). Importance of a parameter on a data set is
the diagonal of the empirical Fisher as the official code computes it: the square of the
gradient of each batch's mean cross-entropy, averaged over batches, with the model in evaluation
mode. With []_D the importance on the full training set and []_f on the forget set, every
parameter with []_f > alpha * []_D is multiplied by min(lambda * []_D / []_f, 1); others are
unchanged. Defaults: lambda = 1, alpha = 10 (the paper's ResNet-18 / CIFAR setting; exponent 1,
lower bound 1 as in `ssd_tuning`).
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from tdu_jax.methods import base
from tdu_jax.methods.base import MethodData, MethodResult, PyTree


class SSDConfig(NamedTuple):
    """SSD settings.

    Attributes:
      alpha: selection weighting; a parameter is dampened where forget importance exceeds
        alpha times its full-training-set importance.
      lam: dampening constant lambda; the factor is min(lam * imp_D / imp_f, 1).
      batch_size: batch of the importance passes (the importances depend on it; 64 is the
        official `-b` default).
    """

    alpha: float = 10.0
    lam: float = 1.0
    batch_size: int = 64


def importance(
    model: nn.Module,
    params: PyTree,
    batch_stats: PyTree,
    split,
    *,
    dataset: str,
    batch_size: int,
) -> PyTree:
    """SSD's importance: mean over batches of the squared batch-mean CE gradient (eval mode)."""
    sums = base.gradient_sums(
        model, params, batch_stats, split, dataset=dataset, batch_size=batch_size
    )
    return jax.tree.map(lambda s: s / sums.num_batches, sums.grad_sq)


def dampen(
    params: PyTree, imp_full: PyTree, imp_forget: PyTree, alpha: float, lam: float
) -> tuple[PyTree, PyTree]:
    """SSD's update: theta <- theta * min(lam * imp_full / imp_forget, 1) where
    imp_forget > alpha * imp_full; other entries are returned unchanged (bit for bit).

    Args:
      params: parameter pytree.
      imp_full: importances on the full training set, shaped like params (>= 0).
      imp_forget: importances on the forget set, shaped like params (>= 0).
      alpha: selection weighting.
      lam: dampening constant.

    Returns:
      (new params, selected): selected is a bool pytree of the dampened entries.
    """
    selected = jax.tree.map(lambda d, f: f > alpha * d, imp_full, imp_forget)

    def one(p, d, f, s):
        factor = jnp.minimum(lam * d / jnp.where(s, f, 1.0), 1.0)
        return jnp.where(s, p * factor.astype(p.dtype), p)

    return jax.tree.map(one, params, imp_full, imp_forget, selected), selected


def ssd(
    model: nn.Module,
    params: PyTree,
    batch_stats: PyTree,
    data_in: MethodData,
    key: jax.Array,
    config: SSDConfig,
    *,
    dataset: str,
) -> MethodResult:
    """Dampens the parameters much more important to the forget set than to all training data.

    The full training set is retain + forget (`base.full_train`), in that order, unshuffled.
    No training: `key` is unused, batch_stats are returned as given.

    Returns:
      MethodResult; info adds `dampened` (entries changed) and `num_params`.
    """
    del key  # deterministic
    base.check_data(data_in)
    if not (config.alpha >= 0 and config.lam >= 0):
        raise ValueError(f"alpha and lam must be >= 0; got {config.alpha}, {config.lam}.")
    timer = base.Timer()
    imp = lambda split: importance(
        model, params, batch_stats, split, dataset=dataset, batch_size=config.batch_size
    )
    imp_forget = imp(data_in.forget_train)
    imp_full = imp(base.full_train(data_in))
    new_params, selected = dampen(params, imp_full, imp_forget, config.alpha, config.lam)
    dampened = int(sum(jnp.sum(s) for s in jax.tree.leaves(selected)))
    num_params = int(sum(jnp.size(p) for p in jax.tree.leaves(params)))
    info = {"gradient_steps": 0, "retain_batches": 0, "dampened": dampened}
    info["num_params"] = num_params
    return MethodResult(
        new_params, base.copy_tree(batch_stats), {**info, "seconds": timer.seconds()}
    )
