"""What every unlearning method shares: its data and result types, batch streams and steps.

Every method is `fn(model, params, batch_stats, data_in, key, config, *, dataset) -> MethodResult`
(see `registry.METHODS`). The helpers here are the pieces the peer methods are built from:

- `stream_indices`: one fixed stream of batch indices (`data.batch_indices`, remainders dropped).
- `make_step`: jitted, donated optimizer steps with BatchNorm in train mode, one per loss kind,
  cached so each (dataset, kind, classes, augment) traces once per shape.
- `gradient_sums`: sums of per-batch gradients (and their squares) in evaluation mode, with
  fixed-size padded batches, for SSD's importances and SalUn's saliency.
- `element_masked`: an optax wrapper that freezes single entries of the parameters, the whole
  chain (weight decay and momentum) included.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from tdu_jax import data, train

PyTree = Any

STEP_KINDS = ("ce", "neg_ce", "random_labels", "ce_l1")


class MethodData(NamedTuple):
    """The data a method may read.

    Attributes:
      forget_train: uint8 (Nf, H, W, C) images and int32 (Nf,) labels of the forget set.
      retain_train: uint8 (Nr, H, W, C) images and int32 (Nr,) labels of the retain set.
      forget_classes: label indices being forgotten.
      num_classes: C, the number of logits.
    """

    forget_train: data.Split
    retain_train: data.Split
    forget_classes: tuple[int, ...]
    num_classes: int


class MethodResult(NamedTuple):
    """What a method returns.

    Attributes:
      params: new parameters (the inputs are never modified).
      batch_stats: new BatchNorm statistics, or {}.
      info: at least `gradient_steps` (int, every optimizer step, forget-side ones included),
        `retain_batches` (int, optimizer steps that used a retain batch) and `seconds` (float,
        wall time), plus method-specific facts.
    """

    params: PyTree
    batch_stats: PyTree
    info: dict


def check_data(data_in: MethodData) -> None:
    """Raises ValueError if the splits are empty or the forget classes are out of range."""
    if data_in.forget_train.size == 0 or data_in.retain_train.size == 0:
        raise ValueError(
            f"forget_train and retain_train must be non-empty; got sizes "
            f"{data_in.forget_train.size} and {data_in.retain_train.size}."
        )
    bad = [c for c in data_in.forget_classes if not 0 <= c < data_in.num_classes]
    if not data_in.forget_classes or bad:
        raise ValueError(
            f"forget_classes must be non-empty labels in [0, {data_in.num_classes}); "
            f"got {data_in.forget_classes}."
        )


def full_train(data_in: MethodData) -> data.Split:
    """The whole training set seen by the base model: retain then forget examples (the order of
    SSD's `ConcatDataset((retain, forget))`)."""
    f, r = data_in.forget_train, data_in.retain_train
    return data.Split(
        np.concatenate([r.images, f.images]), np.concatenate([r.labels, f.labels]).astype(np.int32)
    )


def empty_split(like: data.Split) -> data.Split:
    """A split with no examples and the image shape and dtypes of `like`."""
    return data.Split(
        np.zeros((0, *like.images.shape[1:]), like.images.dtype), np.zeros((0,), np.int32)
    )


def copy_tree(tree: PyTree) -> PyTree:
    """Fresh device buffers, so donated steps never consume the caller's arrays."""
    return jax.tree.map(lambda a: jnp.array(a, copy=True), tree)


def effective_batch(batch_size: int, n: int) -> int:
    """min(batch_size, n): a small forget set is one batch per epoch instead of an error."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}.")
    return min(batch_size, n)


def batches_per_epoch(n: int, batch_size: int) -> int:
    """Full batches in one epoch of n examples (remainder dropped, as `data.batch_indices`)."""
    return n // effective_batch(batch_size, n)


def stream_indices(split: data.Split, batch_size: int, key: jax.Array, count: int) -> np.ndarray:
    """int32 (count, B) example indices: epochs of fresh permutations, B = min(batch_size, N)."""
    return data.batch_indices(split.size, effective_batch(batch_size, split.size), key, count)


class Timer:
    """Wall-clock seconds since construction."""

    def __init__(self):
        self.start = time.perf_counter()

    def seconds(self) -> float:
        return time.perf_counter() - self.start


# ---------------------------------------------------------------------------------------------
# Training steps.


def apply_train(apply_fn: Callable, params: PyTree, batch_stats: PyTree, x: jax.Array):
    """Forward pass in training mode -> (logits_BxC, new batch_stats)."""
    variables = {"params": params, "batch_stats": batch_stats}
    logits, updates = apply_fn(variables, x, train=True, mutable=["batch_stats"])
    return logits, updates.get("batch_stats", {})


def l1_norm(params: PyTree) -> jax.Array:
    """Sum of |entries| over every parameter (as Unlearn-Sparse's `l1_regularization`)."""
    return sum(jnp.sum(jnp.abs(p)) for p in jax.tree.leaves(params))


def accuracy_pct(logits_BxC: jax.Array, labels_B: jax.Array) -> jax.Array:
    return 100.0 * jnp.mean((jnp.argmax(logits_BxC, -1) == labels_B).astype(jnp.float32))


@functools.cache
def make_step(dataset: str, kind: str, num_classes: int, augment: bool = False) -> Callable:
    """The jitted optimizer step of one loss kind; state is donated.

    Kinds (cross-entropy in nats, mean over the batch):
      "ce": CE(labels). "neg_ce": -CE(labels) (gradient ascent). "random_labels": CE on labels
      drawn uniformly from [0, C) per example and step (the given labels are ignored).
      "ce_l1": CE(labels) + coef * sum |params|.

    Args:
      dataset: dataset name (normalisation).
      kind: one of `STEP_KINDS`.
      num_classes: C, range of the random labels.
      augment: apply `data.augment_cifar`.

    Returns:
      fn(state, images, labels, index_B, key, step, coef) -> (state, metrics): gathers batch
      `index_B` of the device arrays `images`/`labels`; step `step` uses
      `jax.random.fold_in(key, step)`; metrics hold `loss` and `accuracy` (% against the labels
      trained on).
    """
    if kind not in STEP_KINDS:
        raise ValueError(f"kind must be one of {', '.join(STEP_KINDS)}; got {kind!r}.")
    dataset = data.check_dataset(dataset)

    def step(state, images, labels, index_B, key, global_step, coef):
        aug_key, label_key = jax.random.split(jax.random.fold_in(key, global_step))
        batch = images[index_B]
        x = data.to_float(data.augment_cifar(aug_key, batch) if augment else batch, dataset)
        y = labels[index_B]
        if kind == "random_labels":
            y = jax.random.randint(label_key, y.shape, 0, num_classes, dtype=y.dtype)

        def loss_fn(params):
            logits, new_stats = apply_train(state.apply_fn, params, state.batch_stats, x)
            loss = train.cross_entropy(logits, y)
            if kind == "neg_ce":
                loss = -loss
            elif kind == "ce_l1":
                loss = loss + coef * l1_norm(params)
            return loss, (logits, new_stats)

        (loss, (logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        state = state.apply_gradients(grads=grads, batch_stats=new_stats)
        return state, {"loss": loss, "accuracy": accuracy_pct(logits, y)}

    return jax.jit(step, donate_argnums=(0,))


def run_steps(
    state: train.TrainState,
    step_fn: Callable,
    arrays: tuple[jax.Array, jax.Array],
    index: np.ndarray,
    key: jax.Array,
    first_step: int,
    coef: float = 0.0,
) -> tuple[train.TrainState, list[dict]]:
    """Runs `step_fn` over the rows of `index` (one batch each); step numbers count on."""
    history = []
    coef = jnp.float32(coef)
    for i, index_B in enumerate(index):
        state, m = step_fn(state, *arrays, index_B, key, first_step + i, coef)
        history.append(m)
    return state, history


def mean_metrics(history: list[dict]) -> dict:
    """Mean `loss`/`accuracy` over steps (nan if none)."""
    if not history:
        return {"loss": float("nan"), "accuracy": float("nan")}
    host = jax.device_get(history)
    return {k: float(np.mean([m[k] for m in host])) for k in host[0]}


def device_split(split: data.Split) -> tuple[jax.Array, jax.Array]:
    """The split's images and labels as device arrays (copied once per method call)."""
    return jnp.asarray(split.images), jnp.asarray(split.labels, jnp.int32)


# ---------------------------------------------------------------------------------------------
# Gradients in evaluation mode.


@functools.cache
def _batch_grad_fn(model: nn.Module, dataset: str) -> Callable:
    """Jitted fn(params, batch_stats, images_B, labels_B, weights_B) -> grads of the weighted CE.

    The loss is sum(w * ce) / sum(w): with w = 1 on the real rows of a zero-padded last batch it
    is the batch mean over those rows, so every batch has one shape and the function one trace.
    """

    def fn(params, batch_stats, images, labels, weights):
        x = data.to_float(images, dataset)

        def loss_fn(p):
            logits = model.apply({"params": p, "batch_stats": batch_stats}, x, train=False)
            log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
            ce = -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
            return jnp.sum(weights * ce) / jnp.sum(weights)

        return jax.grad(loss_fn)(params)

    return jax.jit(fn)


class GradientSums(NamedTuple):
    """Per-batch gradients of the mean cross-entropy, summed over the batches of a split.

    Attributes:
      grad: sum over batches b of g_b (a params-shaped pytree).
      grad_sq: sum over batches b of g_b ** 2 (entry-wise).
      num_batches: number of batches (the last one may be partial).
    """

    grad: PyTree
    grad_sq: PyTree
    num_batches: int


def gradient_sums(
    model: nn.Module,
    params: PyTree,
    batch_stats: PyTree,
    split: data.Split,
    *,
    dataset: str,
    batch_size: int,
) -> GradientSums:
    """Gradients of the batch-mean cross-entropy, batch by batch, in evaluation mode.

    Batches are consecutive slices of `split` in order (like an unshuffled DataLoader, the last
    one partial); BatchNorm uses its running statistics, so nothing is updated.

    Args:
      model: flax module.
      params: parameters.
      batch_stats: BatchNorm statistics, or {}.
      split: uint8 (N, H, W, C) images, int32 (N,) labels, N >= 1.
      dataset: dataset name (normalisation).
      batch_size: B >= 1 (min(B, N) is used).

    Returns:
      GradientSums of the gradient of the mean loss (nats) of each batch.
    """
    if split.size == 0:
        raise ValueError("gradient_sums needs a non-empty split.")
    b = effective_batch(batch_size, split.size)
    fn = _batch_grad_fn(model, data.check_dataset(dataset))
    total = total_sq = None
    num = 0
    for start in range(0, split.size, b):
        images = np.asarray(split.images[start : start + b])
        labels = np.asarray(split.labels[start : start + b], np.int32)
        weights = np.ones((b,), np.float32)
        pad = b - labels.shape[0]
        if pad:
            images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
            labels = np.concatenate([labels, np.zeros((pad,), np.int32)])
            weights[b - pad :] = 0.0
        g = fn(params, batch_stats, images, labels, weights)
        sq = jax.tree.map(jnp.square, g)
        total = g if total is None else jax.tree.map(jnp.add, total, g)
        total_sq = sq if total_sq is None else jax.tree.map(jnp.add, total_sq, sq)
        num += 1
    return GradientSums(total, total_sq, num)


# ---------------------------------------------------------------------------------------------
# Entry-wise frozen parameters.


class ElementMaskState(NamedTuple):
    """State of `element_masked`: the boolean mask (True = trainable) and the inner state."""

    mask: PyTree
    inner: optax.OptState


def element_masked(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """Wraps a whole optax chain so that entries with mask False never move.

    `optax.masked` works per leaf and passes masked-out leaves' updates through unchanged, so it
    cannot freeze single entries. Here the inner chain sees zero gradients *and zero parameters*
    at frozen entries (so weight decay adds nothing and momentum stays zero there) and its
    updates are zeroed there again, so a frozen entry gets an update of exactly 0.

    The mask lives in the state (data, not a closure), so one optimizer serves every mask
    without re-tracing: after `init`, put the mask in with `set_element_mask`. `init` starts with
    everything trainable.

    Args:
      inner: the optimizer to mask (e.g. weight decay + SGD with momentum).

    Returns:
      An optax GradientTransformation with `ElementMaskState` as state.
    """

    def init_fn(params):
        mask = jax.tree.map(lambda p: jnp.ones(jnp.shape(p), bool), params)
        return ElementMaskState(mask, inner.init(params))

    def update_fn(updates, state, params=None):
        keep = lambda tree: jax.tree.map(
            lambda x, m: jnp.where(m, x, jnp.zeros_like(x)), tree, state.mask
        )
        new, inner_state = inner.update(
            keep(updates), state.inner, None if params is None else keep(params)
        )
        return keep(new), ElementMaskState(state.mask, inner_state)

    return optax.GradientTransformation(init_fn, update_fn)


def set_element_mask(opt_state: ElementMaskState, mask: PyTree) -> ElementMaskState:
    """The state with `mask` (bool pytree shaped like params; True = trainable) in place."""
    as_bool = lambda m, old: jnp.asarray(m, bool).reshape(old.shape)
    return opt_state._replace(mask=jax.tree.map(as_bool, mask, opt_state.mask))


@functools.cache
def masked_optimizer(config: train.OptimizerConfig, total_steps: int):
    """`element_masked(train.make_optimizer(config, total_steps))`, cached (static for jit)."""
    return element_masked(train.make_optimizer(config, total_steps))


def sgd(learning_rate: float, weight_decay: float = 5e-4) -> train.OptimizerConfig:
    """SGD with momentum 0.9, L2 weight decay and a constant rate: the peer methods' optimizer
    (torch.optim.SGD(lr, momentum=0.9, weight_decay=5e-4) in the official code)."""
    return train.OptimizerConfig(
        name="sgd",
        learning_rate=learning_rate,
        momentum=0.9,
        weight_decay=weight_decay,
        schedule="constant",
    )


def new_state(
    model: nn.Module, params: PyTree, batch_stats: PyTree, tx: optax.GradientTransformation
) -> train.TrainState:
    """A TrainState on copies of params/batch_stats (the steps donate it)."""
    return train.create_train_state(model, copy_tree(params), copy_tree(batch_stats), tx)
