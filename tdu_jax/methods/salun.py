"""SalUn: saliency-masked random-label unlearning (Fan et al., ICLR 2024).

Source: OPTML-Group/Unlearn-Saliency (read 2026-11-27): Classification/generate_mask.py
(`save_gradient_ratio`: model in eval mode, the gradient of -CE summed over the forget batches,
its absolute value, one global ranking over all parameters; the top `fraction` of entries get
mask 1; the README uses the 0.5 mask) and Classification/unlearn/RL.py (random labels on the
forget set then the retain set each epoch, SGD momentum 0.9, weight decay 5e-4; README: lr 0.1,
10 epochs, batch 256).

Frozen entries: older official code only multiplied the gradients by the mask, so weight decay
(and momentum) still moved frozen weights; the current RL.py restores them after every step.
Here the mask wraps the whole optax chain (`base.element_masked`), so frozen entries get an
update of exactly 0 and stay bit-identical.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import numpy as np

from tdu_jax import train
from tdu_jax.methods import base, finetune
from tdu_jax.methods.base import MethodData, MethodResult, PyTree


class SalUnConfig(NamedTuple):
    """SalUn settings.

    Attributes:
      mask_fraction: share of all parameter entries left trainable (largest |gradient|).
      mask_batch_size: batch of the saliency gradient pass.
      optimizer, epochs, batch_size, augment: the random-label training (as `RLConfig`).
    """

    mask_fraction: float = 0.5
    mask_batch_size: int = 256
    optimizer: train.OptimizerConfig = base.sgd(0.1)
    epochs: int = 10
    batch_size: int = 256
    augment: bool = False


def saliency(
    model: nn.Module,
    params: PyTree,
    batch_stats: PyTree,
    forget,
    *,
    dataset: str,
    batch_size: int,
) -> PyTree:
    """|sum over forget batches of the gradient of -CE| (eval mode), shaped like params."""
    sums = base.gradient_sums(
        model, params, batch_stats, forget, dataset=dataset, batch_size=batch_size
    )
    return jax.tree.map(lambda g: np.abs(np.asarray(-g)), sums.grad)


def saliency_mask(scores: PyTree, fraction: float) -> PyTree:
    """Bool pytree: True at the int(fraction * total) entries with the largest score.

    One ranking over all leaves together; ties go to the earlier entry in leaf order.

    Args:
      scores: non-negative pytree (e.g. |gradient|).
      fraction: share of entries to mark, in [0, 1].

    Returns:
      Bool numpy pytree of the same structure and shapes.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1]; got {fraction}.")
    leaves, treedef = jax.tree.flatten(scores)
    flat = np.concatenate([np.asarray(x, np.float64).ravel() for x in leaves])
    k = int(flat.size * fraction)
    chosen = np.zeros(flat.size, bool)
    chosen[np.argsort(-flat, kind="stable")[:k]] = True
    out, start = [], 0
    for x in leaves:
        out.append(chosen[start : start + np.size(x)].reshape(np.shape(x)))
        start += np.size(x)
    return jax.tree.unflatten(treedef, out)


def salun(
    model: nn.Module,
    params: PyTree,
    batch_stats: PyTree,
    data_in: MethodData,
    key: jax.Array,
    config: SalUnConfig,
    *,
    dataset: str,
) -> MethodResult:
    """Random-label training of the salient parameter entries only.

    Returns:
      MethodResult; info adds `mask_fraction_trainable` (measured share of trainable entries),
      `forget_batches`, `loss` and `mask_seconds`.
    """
    base.check_data(data_in)
    timer = base.Timer()
    scores = saliency(
        model,
        params,
        batch_stats,
        data_in.forget_train,
        dataset=dataset,
        batch_size=config.mask_batch_size,
    )
    mask = saliency_mask(scores, config.mask_fraction)
    mask_seconds = timer.seconds()
    rl_config = finetune.RLConfig(
        optimizer=config.optimizer,
        epochs=config.epochs,
        batch_size=config.batch_size,
        augment=config.augment,
    )
    result = finetune.relabel_training(
        model, params, batch_stats, data_in, key, rl_config, dataset=dataset, mask=mask
    )
    leaves = jax.tree.leaves(mask)
    trainable = sum(int(m.sum()) for m in leaves) / sum(m.size for m in leaves)
    info = {**result.info, "mask_fraction_trainable": trainable, "mask_seconds": mask_seconds}
    info["seconds"] = timer.seconds()
    return result._replace(info=info)
