"""Fine-tuning baselines: ft, ga (NegGrad), neggrad_plus, rl (random labels), l1_sparse.

Sources (read 2026-11-27):
- ft, ga, rl: OPTML-Group/Unlearn-Saliency, Classification/unlearn/{FT,GA,RL}.py with the
  commands of Classification/README.md (FT: lr 0.01, 10 epochs; GA: lr 1e-4, 5 epochs; RL as in
  SalUn: lr 0.1, 10 epochs) and arg_parser.py (SGD momentum 0.9, weight decay 5e-4, batch 256,
  MultiStepLR at epochs 91/136, i.e. constant over 10 epochs).
- l1_sparse: OPTML-Group/Unlearn-Sparse (the same code base), `FT_l1` in unlearn/FT.py: retain
  fine-tuning with loss CE + alpha_e * ||theta||_1 over every parameter, alpha_e =
  alpha * (1 - e / (E - no_l1_epochs)) in epoch e (0 afterwards); the scripts use alpha 1e-4,
  lr 0.01, 10 epochs.
- neggrad_plus: the OPTML-style `negative_grad` (loss alpha * CE(retain) - (1 - alpha) *
  CE(forget) on one retain batch and one forget batch per step, iterating
  `zip(retain, cycle(forget))`); alpha 0.99 here is our choice.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from tdu_jax import data, train
from tdu_jax.methods import base
from tdu_jax.methods.base import MethodData, MethodResult, PyTree


class FTConfig(NamedTuple):
    """ft: fine-tune on the retain set (Unlearn-Saliency README: lr 0.01, 10 epochs)."""

    optimizer: train.OptimizerConfig = base.sgd(0.01)
    epochs: int = 10
    batch_size: int = 256
    augment: bool = False


class GAConfig(NamedTuple):
    """ga: gradient ascent on the forget set (Unlearn-Saliency README: lr 1e-4, 5 epochs)."""

    optimizer: train.OptimizerConfig = base.sgd(1e-4)
    epochs: int = 5
    batch_size: int = 256
    augment: bool = False


class NegGradPlusConfig(NamedTuple):
    """neggrad_plus: minimise alpha * CE(retain batch) - (1 - alpha) * CE(forget batch).

    An epoch is one pass over the retain set; forget batches cycle. alpha, lr and epochs are our
    untuned choices.
    """

    optimizer: train.OptimizerConfig = base.sgd(0.01)
    alpha: float = 0.99
    epochs: int = 5
    batch_size: int = 256
    augment: bool = False


class RLConfig(NamedTuple):
    """rl: each epoch, the forget set with fresh uniform random labels, then the retain set.

    As SalUn's RL.py on CIFAR-10 (the SalUn README command: lr 0.1, 10 epochs, batch 256).
    """

    optimizer: train.OptimizerConfig = base.sgd(0.1)
    epochs: int = 10
    batch_size: int = 256
    augment: bool = False


class L1SparseConfig(NamedTuple):
    """l1_sparse: retain fine-tuning plus a linearly decaying l1 penalty (Unlearn-Sparse).

    `alpha` is the penalty weight in epoch 0 (per nat of mean cross-entropy); it falls linearly
    to 0 over the first `epochs - no_l1_epochs` epochs.
    """

    optimizer: train.OptimizerConfig = base.sgd(0.01)
    alpha: float = 1e-4
    epochs: int = 10
    no_l1_epochs: int = 0
    batch_size: int = 256
    augment: bool = False


def _check_epochs(epochs: int) -> None:
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0; got {epochs}.")


def ft(
    model: nn.Module,
    params: PyTree,
    batch_stats: PyTree,
    data_in: MethodData,
    key: jax.Array,
    config: FTConfig,
    *,
    dataset: str,
) -> MethodResult:
    """Fine-tunes on the retain set for `config.epochs` epochs (`train.fine_tune`).

    Returns:
      MethodResult; info adds `loss` (mean training CE, nats).
    """
    base.check_data(data_in)
    _check_epochs(config.epochs)
    timer = base.Timer()
    retain = data_in.retain_train
    n = config.epochs * base.batches_per_epoch(retain.size, config.batch_size)
    new_params, new_stats, m = train.fine_tune(
        model,
        params,
        batch_stats,
        retain,
        dataset=dataset,
        config=config.optimizer,
        num_batches=n,
        batch_size=base.effective_batch(config.batch_size, retain.size),
        key=key,
        augment=config.augment,
    )
    info = {"gradient_steps": n, "retain_batches": n, "loss": m["loss"]}
    return MethodResult(new_params, new_stats, {**info, "seconds": timer.seconds()})


def ga(
    model: nn.Module,
    params: PyTree,
    batch_stats: PyTree,
    data_in: MethodData,
    key: jax.Array,
    config: GAConfig,
    *,
    dataset: str,
) -> MethodResult:
    """Gradient ascent on the forget set's cross-entropy (NegGrad).

    Returns:
      MethodResult; info adds `forget_batches` and `loss` (mean of -CE, nats).
    """
    base.check_data(data_in)
    _check_epochs(config.epochs)
    timer = base.Timer()
    forget = data_in.forget_train
    n = config.epochs * base.batches_per_epoch(forget.size, config.batch_size)
    state = base.new_state(
        model, params, batch_stats, train.make_optimizer(config.optimizer, max(n, 1))
    )
    shuffle_key, step_key = jax.random.split(key)
    step = base.make_step(dataset, "neg_ce", data_in.num_classes, config.augment)
    index = base.stream_indices(forget, config.batch_size, shuffle_key, n)
    state, history = base.run_steps(state, step, base.device_split(forget), index, step_key, 0)
    info = {"gradient_steps": n, "retain_batches": 0, "forget_batches": n}
    info["loss"] = base.mean_metrics(history)["loss"]
    return MethodResult(state.params, state.batch_stats, {**info, "seconds": timer.seconds()})


@functools.cache
def _neggrad_plus_step(dataset: str, augment: bool):
    """Jitted donated step on one retain and one forget batch (two train-mode passes)."""
    dataset = data.check_dataset(dataset)

    def step(state, retain_arrays, r_index, forget_arrays, f_index, key, global_step, alpha):
        r_key, f_key = jax.random.split(jax.random.fold_in(key, global_step))

        def batch(arrays, index, k):
            images = arrays[0][index]
            images = data.augment_cifar(k, images) if augment else images
            return data.to_float(images, dataset), arrays[1][index]

        xr, yr = batch(retain_arrays, r_index, r_key)
        xf, yf = batch(forget_arrays, f_index, f_key)

        def loss_fn(params):
            r_logits, stats = base.apply_train(state.apply_fn, params, state.batch_stats, xr)
            f_logits, stats = base.apply_train(state.apply_fn, params, stats, xf)
            r_loss = train.cross_entropy(r_logits, yr)
            f_loss = train.cross_entropy(f_logits, yf)
            return alpha * r_loss - (1.0 - alpha) * f_loss, (r_loss, f_loss, stats)

        (loss, (r_loss, f_loss, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params
        )
        state = state.apply_gradients(grads=grads, batch_stats=stats)
        return state, {"loss": loss, "retain_loss": r_loss, "forget_loss": f_loss}

    return jax.jit(step, donate_argnums=(0,))


def neggrad_plus(
    model: nn.Module,
    params: PyTree,
    batch_stats: PyTree,
    data_in: MethodData,
    key: jax.Array,
    config: NegGradPlusConfig,
    *,
    dataset: str,
) -> MethodResult:
    """Descent on the retain loss and ascent on the forget loss in one step.

    Returns:
      MethodResult; info adds `forget_batches`, `retain_loss` and `forget_loss` (means, nats).
    """
    base.check_data(data_in)
    _check_epochs(config.epochs)
    if not 0.0 <= config.alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1]; got {config.alpha}.")
    timer = base.Timer()
    retain, forget = data_in.retain_train, data_in.forget_train
    n = config.epochs * base.batches_per_epoch(retain.size, config.batch_size)
    state = base.new_state(
        model, params, batch_stats, train.make_optimizer(config.optimizer, max(n, 1))
    )
    r_key, f_key, step_key = jax.random.split(key, 3)
    r_index = base.stream_indices(retain, config.batch_size, r_key, n)
    f_index = base.stream_indices(forget, config.batch_size, f_key, n)
    step = _neggrad_plus_step(data.check_dataset(dataset), bool(config.augment))
    r_arrays, f_arrays = base.device_split(retain), base.device_split(forget)
    alpha = jnp.float32(config.alpha)
    history = []
    for i in range(n):
        state, m = step(state, r_arrays, r_index[i], f_arrays, f_index[i], step_key, i, alpha)
        history.append(m)
    means = base.mean_metrics(history)
    info = {"gradient_steps": n, "retain_batches": n, "forget_batches": n}
    info.update(retain_loss=means.get("retain_loss"), forget_loss=means.get("forget_loss"))
    return MethodResult(state.params, state.batch_stats, {**info, "seconds": timer.seconds()})


def relabel_training(
    model: nn.Module,
    params: PyTree,
    batch_stats: PyTree,
    data_in: MethodData,
    key: jax.Array,
    config: RLConfig,
    *,
    dataset: str,
    mask: PyTree | None = None,
) -> MethodResult:
    """RL's loop: per epoch, forget batches with random labels, then retain batches.

    One optimizer runs through all epochs (momentum carries, as in the official code).

    Args:
      model, params, batch_stats, data_in, key, dataset: as every method.
      config: optimizer, epochs, batch size, augmentation.
      mask: optional bool pytree shaped like params (True = trainable); entries with False are
        frozen through the whole optimizer chain (`base.element_masked`), weight decay included.

    Returns:
      MethodResult; info adds `forget_batches`, `loss` (mean CE, nats, over all steps).
    """
    base.check_data(data_in)
    _check_epochs(config.epochs)
    timer = base.Timer()
    retain, forget = data_in.retain_train, data_in.forget_train
    nf = base.batches_per_epoch(forget.size, config.batch_size)
    nr = base.batches_per_epoch(retain.size, config.batch_size)
    total = config.epochs * (nf + nr)
    if mask is None:
        tx = train.make_optimizer(config.optimizer, max(total, 1))
    else:
        tx = base.masked_optimizer(config.optimizer, max(total, 1))
    state = base.new_state(model, params, batch_stats, tx)
    if mask is not None:
        state = state.replace(opt_state=base.set_element_mask(state.opt_state, mask))
    f_key, r_key, step_key = jax.random.split(key, 3)
    f_index = base.stream_indices(forget, config.batch_size, f_key, config.epochs * nf)
    r_index = base.stream_indices(retain, config.batch_size, r_key, config.epochs * nr)
    f_step = base.make_step(dataset, "random_labels", data_in.num_classes, config.augment)
    r_step = base.make_step(dataset, "ce", data_in.num_classes, config.augment)
    f_arrays, r_arrays = base.device_split(forget), base.device_split(retain)
    history, s = [], 0
    for e in range(config.epochs):
        index = f_index[e * nf : (e + 1) * nf]
        state, h = base.run_steps(state, f_step, f_arrays, index, step_key, s)
        history += h
        s += nf
        index = r_index[e * nr : (e + 1) * nr]
        state, h = base.run_steps(state, r_step, r_arrays, index, step_key, s)
        history += h
        s += nr
    info = {
        "gradient_steps": total,
        "retain_batches": config.epochs * nr,
        "forget_batches": config.epochs * nf,
        "loss": base.mean_metrics(history)["loss"],
    }
    return MethodResult(state.params, state.batch_stats, {**info, "seconds": timer.seconds()})


def rl(
    model: nn.Module,
    params: PyTree,
    batch_stats: PyTree,
    data_in: MethodData,
    key: jax.Array,
    config: RLConfig,
    *,
    dataset: str,
) -> MethodResult:
    """Random-label unlearning: forget set with random labels, then the retain set, per epoch.

    Returns:
      MethodResult; info adds `forget_batches` and `loss`.
    """
    return relabel_training(
        model, params, batch_stats, data_in, key, config, dataset=dataset, mask=None
    )


def l1_alpha(config: L1SparseConfig, epoch: int) -> float:
    """Unlearn-Sparse's l1 weight in epoch `epoch` (0-based): linear decay, then 0."""
    active = config.epochs - config.no_l1_epochs
    return config.alpha * (1.0 - epoch / active) if epoch < active else 0.0


def l1_sparse(
    model: nn.Module,
    params: PyTree,
    batch_stats: PyTree,
    data_in: MethodData,
    key: jax.Array,
    config: L1SparseConfig,
    *,
    dataset: str,
) -> MethodResult:
    """Retain fine-tuning with loss CE + alpha_e * sum |theta| (alpha_e from `l1_alpha`).

    Returns:
      MethodResult; info adds `l1_alphas` (one per epoch) and `loss` (mean CE + penalty).
    """
    base.check_data(data_in)
    _check_epochs(config.epochs)
    if config.alpha < 0 or not 0 <= config.no_l1_epochs <= config.epochs:
        raise ValueError(
            f"need alpha >= 0 and 0 <= no_l1_epochs <= epochs; got {config.alpha}, "
            f"{config.no_l1_epochs}, {config.epochs}."
        )
    timer = base.Timer()
    retain = data_in.retain_train
    per_epoch = base.batches_per_epoch(retain.size, config.batch_size)
    n = config.epochs * per_epoch
    state = base.new_state(
        model, params, batch_stats, train.make_optimizer(config.optimizer, max(n, 1))
    )
    shuffle_key, step_key = jax.random.split(key)
    index = base.stream_indices(retain, config.batch_size, shuffle_key, n)
    step = base.make_step(dataset, "ce_l1", data_in.num_classes, config.augment)
    arrays = base.device_split(retain)
    history, alphas = [], []
    for e in range(config.epochs):
        alphas.append(l1_alpha(config, e))
        rows = index[e * per_epoch : (e + 1) * per_epoch]
        state, h = base.run_steps(state, step, arrays, rows, step_key, e * per_epoch, alphas[-1])
        history += h
    info = {"gradient_steps": n, "retain_batches": n, "l1_alphas": alphas}
    info["loss"] = base.mean_metrics(history)["loss"]
    return MethodResult(state.params, state.batch_stats, {**info, "seconds": timer.seconds()})
