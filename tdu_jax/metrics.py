"""Evaluation: batched inference, accuracies by split and class, membership inference.

Inference always runs in evaluation mode (BatchNorm uses running statistics). Models are Linen
modules (any call signature) or adapters (`tdu_jax.adapters`); images are uint8 normalised for
`dataset`, or anything a `preprocess` function (or nothing, for float inputs) turns into inputs.
Accuracies are percentages in [0, 100]; an accuracy over no examples is nan.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tdu_jax import adapters, data

PyTree = Any


def _fn(model: Any, dataset: str | None, preprocess: Callable | None, output: str) -> Callable:
    return _eval_fn(model, adapters.preprocess_fn(dataset, preprocess), output)


@functools.cache
def _eval_fn(model: Any, preprocess: Callable, output: str) -> Callable:
    """Jitted fn(params, batch_stats, images_BxHxWxC[, labels_B]) for one model/output."""
    adapted = adapters.as_model(model)

    def forward(params, batch_stats, images):
        return adapted.apply(params, batch_stats, preprocess(images))

    if output == "logits":
        fn = lambda p, bs, x: forward(p, bs, x).astype(jnp.float32)
    elif output == "predictions":
        fn = lambda p, bs, x: jnp.argmax(forward(p, bs, x), axis=-1).astype(jnp.int32)
    else:  # per-example losses

        def fn(p, bs, x, labels):
            logits = forward(p, bs, x).astype(jnp.float32)
            log_probs = jax.nn.log_softmax(logits, axis=-1)
            return -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]

    return jax.jit(fn)


_WIDTHS: dict = {}  # (eval fn, image shape, dtype) -> number of model outputs


def _output_width(fn: Callable, params: PyTree, batch_stats: PyTree, images: np.ndarray) -> int:
    """C of the model's (1, C) logits, by an abstract pass made once per fn and input shape."""
    key = (fn, np.shape(images)[1:], np.asarray(images).dtype)
    if key not in _WIDTHS:
        _WIDTHS[key] = int(jax.eval_shape(fn, params, batch_stats, images).shape[-1])
    return _WIDTHS[key]


def _batched(fn: Callable, arrays: Sequence[np.ndarray], batch_size: int) -> np.ndarray:
    """Applies `fn` to fixed-size batches of `arrays` (last one zero-padded), concatenated."""
    n = int(arrays[0].shape[0])
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}.")
    # One batch shape per call, so `fn` traces once per (model, B); small inputs use B = N.
    b = max(1, min(batch_size, n))
    outputs = []
    for start in range(0, n, b):
        chunk = [np.asarray(a[start : start + b]) for a in arrays]
        pad = b - chunk[0].shape[0]
        if pad:
            chunk = [np.concatenate([c, np.zeros((pad, *c.shape[1:]), c.dtype)]) for c in chunk]
        outputs.append(fn(*chunk))
    if not outputs:  # N = 0: an empty result of the right trailing shape and dtype
        out = jax.eval_shape(fn, *[np.zeros((1, *a.shape[1:]), a.dtype) for a in arrays])
        return np.zeros((0, *out.shape[1:]), out.dtype)
    return np.concatenate([np.asarray(o) for o in jax.device_get(outputs)])[:n]


def logits(
    model: nn.Module,
    params: PyTree,
    batch_stats: PyTree,
    images_uint8: np.ndarray,
    *,
    dataset: str | None = None,
    batch_size: int = 1000,
    preprocess: Callable | None = None,
) -> np.ndarray:
    """Model outputs in evaluation mode.

    Args:
      model: flax module.
      params: parameters.
      batch_stats: BatchNorm statistics, or {}.
      images_uint8: uint8 (N, H, W, C) images.
      dataset: dataset name (normalisation of uint8 images), or None.
      batch_size: inference batch size.
      preprocess: instead of `dataset`, images -> model inputs (None: images are inputs).

    Returns:
      float32 (N, C) logits.
    """
    fn = functools.partial(_fn(model, dataset, preprocess, "logits"), params, batch_stats)
    return _batched(fn, [images_uint8], batch_size)


def predict(
    model: nn.Module,
    params: PyTree,
    batch_stats: PyTree,
    images_uint8: np.ndarray,
    *,
    dataset: str | None = None,
    batch_size: int = 1000,
    preprocess: Callable | None = None,
) -> np.ndarray:
    """Predicted classes (argmax of the logits) in evaluation mode.

    Args:
      model: flax module.
      params: parameters.
      batch_stats: BatchNorm statistics, or {}.
      images_uint8: uint8 (N, H, W, C) images.
      dataset: dataset name (normalisation of uint8 images), or None.
      batch_size: inference batch size; the last batch is padded, so each (model, batch size)
        traces once.
      preprocess: instead of `dataset`, images -> model inputs (None: images are inputs).

    Returns:
      int32 (N,) predicted labels.
    """
    fn = _fn(model, dataset, preprocess, "predictions")
    return _batched(functools.partial(fn, params, batch_stats), [images_uint8], batch_size)


def example_losses(
    model: nn.Module,
    params: PyTree,
    batch_stats: PyTree,
    split: data.Split,
    *,
    dataset: str | None = None,
    batch_size: int = 1000,
    preprocess: Callable | None = None,
) -> np.ndarray:
    """Per-example cross-entropy in evaluation mode.

    Args:
      model: flax module.
      params: parameters.
      batch_stats: BatchNorm statistics, or {}.
      split: uint8 (N, H, W, C) images and int32 (N,) labels.
      dataset: dataset name (normalisation of uint8 images), or None.
      batch_size: inference batch size.
      preprocess: instead of `dataset`, images -> model inputs (None: images are inputs).

    Returns:
      float32 (N,) losses in nats.
    """
    fn = _fn(model, dataset, preprocess, "losses")
    arrays = [split.images, np.asarray(split.labels, np.int32)]
    return _batched(functools.partial(fn, params, batch_stats), arrays, batch_size)


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Share of `predictions` equal to `labels`, in % (nan for no examples).

    Args:
      predictions: (N,) predicted labels.
      labels: (N,) true labels.

    Returns:
      Accuracy in %.
    """
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.shape != labels.shape:
        raise ValueError(f"predictions {predictions.shape} and labels {labels.shape} differ.")
    if labels.size == 0:
        return float("nan")
    return float(100.0 * np.mean(predictions == labels))


def per_class_accuracy(predictions: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Accuracy of the examples of each true class.

    Args:
      predictions: (N,) predicted labels.
      labels: (N,) true labels in [0, num_classes).
      num_classes: C.

    Returns:
      float64 (C,) accuracies in %; nan for classes with no examples.
    """
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    counts = np.bincount(labels, minlength=num_classes)[:num_classes]
    correct = np.bincount(labels[predictions == labels], minlength=num_classes)[:num_classes]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, 100.0 * correct / counts, np.nan)


def forget_retain_accuracy(
    predictions: np.ndarray, labels: np.ndarray, forget_classes: Sequence[int]
) -> dict:
    """Accuracies on the forget classes, the other (retain) classes and all examples.

    Args:
      predictions: (N,) predicted labels.
      labels: (N,) true labels.
      forget_classes: label indices of the forget set.

    Returns:
      {"forget_acc", "retain_acc", "test_acc"} in %; `test_acc` is over all N examples (named
      for the test split it is normally computed on).
    """
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    forget = np.isin(labels, np.asarray(list(forget_classes), np.int64))
    return {
        "forget_acc": accuracy(predictions[forget], labels[forget]),
        "retain_acc": accuracy(predictions[~forget], labels[~forget]),
        "test_acc": accuracy(predictions, labels),
    }


def evaluate(
    model: nn.Module,
    params: PyTree,
    batch_stats: PyTree,
    split: data.Split,
    *,
    dataset: str | None = None,
    forget_classes: Sequence[int],
    batch_size: int = 1000,
    prefix: str = "",
    preprocess: Callable | None = None,
    num_classes: int | None = None,
) -> dict:
    """Forget, retain, overall and per-class accuracy of a model on a split.

    Args:
      model: flax module.
      params: parameters.
      batch_stats: BatchNorm statistics, or {}.
      split: uint8 (N, H, W, C) images and int32 (N,) labels.
      dataset: dataset name (normalisation, number of classes), or None.
      forget_classes: label indices of the forget set.
      batch_size: inference batch size.
      prefix: prepended to every key, e.g. "train_".
      preprocess: instead of `dataset`, images -> model inputs (None: images are inputs).
      num_classes: C for `per_class`; default: the dataset's, else the model's output width.

    Returns:
      {prefix + "forget_acc", "retain_acc", "test_acc" (all examples): float %,
       prefix + "per_class": list of C floats %, nan for absent classes}.
    """
    predictions = predict(
        model,
        params,
        batch_stats,
        split.images,
        dataset=dataset,
        batch_size=batch_size,
        preprocess=preprocess,
    )
    result = forget_retain_accuracy(predictions, split.labels, forget_classes)
    if num_classes is None and dataset is not None:
        num_classes = data.num_classes(dataset)
    elif num_classes is None:
        num_classes = _output_width(
            _fn(model, dataset, preprocess, "logits"), params, batch_stats, split.images[:1]
        )
    per_class = per_class_accuracy(predictions, split.labels, num_classes)
    result["per_class"] = [float(a) for a in per_class]
    return {prefix + k: v for k, v in result.items()}


def membership_inference(member_losses: np.ndarray, nonmember_losses: np.ndarray) -> dict:
    """Loss-threshold membership-inference attack: members are guessed where the loss is low.

    Typical use: members = forget-class training examples, non-members = forget-class test
    examples. After successful unlearning the two loss distributions match (AUC near 50%).

    Args:
      member_losses: (M,) per-example losses of training (member) examples.
      nonmember_losses: (K,) per-example losses of held-out examples.

    Returns:
      {"mia_auc": % probability that a random member has a lower loss than a random
       non-member (ties count half), "mia_acc": best balanced accuracy % over thresholds,
       "loss_gap": mean non-member loss minus mean member loss (nats)}; nan when a set is empty.
    """
    members = np.asarray(member_losses, np.float64).ravel()
    others = np.asarray(nonmember_losses, np.float64).ravel()
    if members.size == 0 or others.size == 0:
        return {"mia_auc": float("nan"), "mia_acc": float("nan"), "loss_gap": float("nan")}
    # AUC by ranks (Mann-Whitney U), with average ranks for ties.
    both = np.concatenate([members, others])
    order = np.argsort(both, kind="mergesort")
    ranks = np.empty(both.size, np.float64)
    sorted_vals = both[order]
    _, first, counts = np.unique(sorted_vals, return_index=True, return_counts=True)
    avg_rank = first + (counts - 1) / 2.0  # 0-based average rank of each tie group
    ranks[order] = np.repeat(avg_rank, counts)
    # Rank sum of non-members counts pairs where a member is lower.
    u = ranks[members.size :].sum() - others.size * (others.size - 1) / 2.0
    auc = u / (members.size * others.size)
    # Best balanced accuracy of "member iff loss <= t" over all thresholds t.
    thresholds = np.unique(both)
    tpr = np.searchsorted(np.sort(members), thresholds, side="right") / members.size
    fpr = np.searchsorted(np.sort(others), thresholds, side="right") / others.size
    best = max(0.5, float(np.max((tpr + 1.0 - fpr) / 2.0)))
    return {
        "mia_auc": float(100.0 * auc),
        "mia_acc": 100.0 * best,
        "loss_gap": float(others.mean() - members.mean()),
    }
