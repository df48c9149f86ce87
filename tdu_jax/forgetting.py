"""Forgetting metrics: how much of a forget class is left in a model, beyond its accuracy.

Every metric takes arrays (or a model and its variables) and returns floats, so the same code
judges a base model, an unlearned one, the gold standard retrained without the forget classes,
and the *silenced control* (`silence_classes`: the base model with the forget classes' output
column zeroed and their bias set very negative, which hides the logit and nothing else).

Metrics (all percentages in [0, 100] unless said otherwise):

- `mia_svc`: SalUn's MIA-efficacy. An RBF SVC (C=3, gamma="auto") fitted on the true-label
  softmax confidence of members (retain-train sample) vs non-members (retain-class test images),
  equal sizes; the score is the share of forget-train examples it calls NON-member (higher =
  more forgotten). Recipe from SalUn's official code, OPTML-Group/Unlearn-Saliency,
  `Classification/evaluation/SVC_MIA.py` (`SVC_fit_predict`, with the forget set passed as
  `target_test`, so the returned value is `1 - predict(forget).mean()`).
- `mia_entropy`: the membership attack of SSD (if-loops/selective-synaptic-dampening,
  `metrics.py`, `get_membership_attack_prob`, from Chundawat et al. 2023): logistic regression
  (lbfgs, class_weight="balanced") on softmax entropy of retain-train members vs test
  non-members; the score is the share of forget-train examples it calls MEMBER (lower = more
  forgotten). `mia_entropy_slope` is the regression's coefficient on entropy (1/nats): the
  attack's premise is a negative slope (lower entropy -> member). When members and non-members
  are indistinguishable (AUC ~ 0.5, common on MNIST) the fitted sign is noise, and a slope >= 0
  calls the forget images that are MORE uncertain than its threshold members: `mia_entropy`
  then says nothing about forgetting (sixteenth session, BUILD_NOTES).
- `forget_entropy_median`: the median softmax entropy (nats) of the forget-class training
  images: the direct reading of what `mia_entropy` tries to threshold. A retrained model
  leaves them uncertain (LeNet: 0.1-0.8 nats); confidently wrong is lower, over-flattened
  higher.
- `mia_loss_auc`: AUC of the loss-threshold attack (`metrics.membership_inference`) between
  forget-train (members) and forget-test (non-members) losses; 50 = indistinguishable.
- `probe_recovery`: test accuracy on the forget classes of a linear probe fitted on the frozen
  penultimate features over all classes: what a new output layer could still read out.
- `relearn_steps`: optimizer steps of fine-tuning on a small labelled forget sample until the
  forget test accuracy reaches a target; knowledge hidden rather than removed comes back fast.
- `forget_prediction_js`: Jensen-Shannon divergence (bits) between two models' histograms of
  predicted classes on the forget-class test images (e.g. against the retrained model).

`forgetting_metrics` computes them all for one model.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from tdu_jax import adapters, data, metrics, train

PyTree = Any
FeaturesFn = Callable[[PyTree, PyTree, jax.Array], jax.Array]  # (params, state, inputs) -> (N, D)

# forgetting_metrics' relearning batches: forget sample only (False) or forget sample plus as
# many retain images (True). Chosen by measurement on LeNet/MNIST, see `relearn_steps`.
RELEARN_MIXED = True


# ---------------------------------------------------------------------------------------------
# Softmax statistics and membership-inference attacks.


def softmax_stats(logits_NxC: np.ndarray, labels_N: np.ndarray) -> dict:
    """Per-example softmax statistics (computed in float64).

    Args:
      logits_NxC: (N, C) logits.
      labels_N: (N,) int labels in [0, C).

    Returns:
      {"confidence": (N,) softmax probability of the true label,
       "entropy": (N,) softmax entropy in nats,
       "loss": (N,) cross-entropy of the true label in nats}.
    """
    z = np.asarray(logits_NxC, np.float64)
    labels = np.asarray(labels_N, np.int64)
    if z.ndim != 2 or labels.shape != z.shape[:1]:
        raise ValueError(f"need (N, C) logits and (N,) labels; got {z.shape} and {labels.shape}.")
    z = z - z.max(axis=-1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    p = np.exp(log_p)
    true_log_p = np.take_along_axis(log_p, labels[:, None], axis=-1)[:, 0]
    # p * log p -> 0 where p underflows to 0 (log_p is finite, so no nan).
    entropy = -np.sum(p * log_p, axis=-1)
    return {"confidence": np.exp(true_log_p), "entropy": entropy, "loss": -true_log_p}


def _balanced_attack_data(members, nonmembers, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(X (2n, 1), y (2n,)): n = min size; the larger set is subsampled with `seed`."""
    members = np.asarray(members, np.float64).ravel()
    nonmembers = np.asarray(nonmembers, np.float64).ravel()
    if members.size == 0 or nonmembers.size == 0:
        raise ValueError("membership attacks need non-empty member and non-member sets.")
    n = min(members.size, nonmembers.size)
    rng = np.random.default_rng(seed)
    if members.size > n:
        members = members[np.sort(rng.choice(members.size, n, replace=False))]
    if nonmembers.size > n:
        nonmembers = nonmembers[np.sort(rng.choice(nonmembers.size, n, replace=False))]
    x = np.concatenate([members, nonmembers])[:, None]
    y = np.concatenate([np.ones(n, np.int64), np.zeros(n, np.int64)])
    return x, y


def mia_svc(member_conf, nonmember_conf, target_conf, *, seed: int = 0) -> float:
    """SalUn's MIA-efficacy: % of targets an RBF SVC on confidence calls non-members.

    Args:
      member_conf: (M,) true-label softmax confidence of members (a retain-train sample).
      nonmember_conf: (K,) same for non-members (test images of the retain classes).
      target_conf: (T,) same for the targets (forget-class training images).
      seed: subsamples the larger of members / non-members to the smaller size.

    Returns:
      % of targets predicted non-member (higher = more forgotten); nan if T = 0.
    """
    x, y = _balanced_attack_data(member_conf, nonmember_conf, seed)
    target = np.asarray(target_conf, np.float64).reshape(-1, 1)
    if target.shape[0] == 0:
        return float("nan")
    clf = SVC(C=3, gamma="auto", kernel="rbf").fit(x, y)
    return float(100.0 * np.mean(clf.predict(target) == 0))


def entropy_attack(member_entropy, nonmember_entropy, target_entropy, *, seed: int = 0) -> dict:
    """SSD's entropy attack and the slope it fitted.

    Args:
      member_entropy: (M,) softmax entropy (nats) of members (retain train).
      nonmember_entropy: (K,) same for non-members (test images).
      target_entropy: (T,) same for the targets (forget-class training images).
      seed: subsamples the larger of members / non-members to the smaller size, so both sides
        weigh equally (SSD reaches the same with class_weight="balanced", kept here too).

    Returns:
      {"mia_entropy": % of targets predicted member (lower = more forgotten; nan if T = 0),
       "mia_entropy_slope": the logistic regression's coefficient on entropy in 1/nats
       (negative: lower entropy -> member, the attack's premise; >= 0: the attack reads this
       model backwards and "mia_entropy" is not evidence)}.
    """
    x, y = _balanced_attack_data(member_entropy, nonmember_entropy, seed)
    target = np.asarray(target_entropy, np.float64).reshape(-1, 1)
    clf = LogisticRegression(class_weight="balanced", solver="lbfgs").fit(x, y)
    share = float(100.0 * np.mean(clf.predict(target) == 1)) if target.shape[0] else float("nan")
    return {"mia_entropy": share, "mia_entropy_slope": float(clf.coef_[0, 0])}


def mia_entropy(member_entropy, nonmember_entropy, target_entropy, *, seed: int = 0) -> float:
    """SSD's entropy attack: % of targets a logistic regression on entropy calls members
    (``entropy_attack``'s "mia_entropy"; lower = more forgotten; nan if there are no targets)."""
    return entropy_attack(member_entropy, nonmember_entropy, target_entropy, seed=seed)[
        "mia_entropy"
    ]


def mia_loss_auc(member_losses, nonmember_losses) -> float:
    """AUC (%) of the loss-threshold attack; members = forget train, non-members = forget test.

    Args:
      member_losses: (M,) per-example losses (nats) of members.
      nonmember_losses: (K,) per-example losses of non-members.

    Returns:
      % probability that a random member has a lower loss than a random non-member (ties
      half): 50 = indistinguishable, 100 = members always lower; nan if a set is empty.
    """
    return metrics.membership_inference(member_losses, nonmember_losses)["mia_auc"]


# ---------------------------------------------------------------------------------------------
# Penultimate features and the linear probe.


def _pool_flat(x: jax.Array) -> jax.Array:
    """(B, H, W, C) -> global average pool (float32, as the ResNet head); else flatten."""
    if x.ndim == 4:
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    return x.reshape(x.shape[0], -1).astype(jnp.float32)


@functools.cache
def _features_fn(model: Any, preprocess: Callable, features_fn: FeaturesFn | None) -> Callable:
    """Jitted fn(params, batch_stats, images_BxHxWxC) -> features (B, D)."""
    if features_fn is not None:
        fn = lambda p, s, images: _pool_flat(features_fn(p, s, preprocess(images)))
    elif hasattr(model, "stages"):
        from tdu_jax.models import apply_stages

        stages = model.stages()

        def fn(params, batch_stats, images):
            x = preprocess(images)
            return _pool_flat(apply_stages(stages, params, batch_stats, x, 0, len(stages) - 1))

    else:
        fn = lambda p, s, images: _pool_flat(adapters.head_input(model, p, s, preprocess(images)))
    return jax.jit(fn)


def penultimate_features(
    model: Any,
    params: PyTree,
    batch_stats: PyTree,
    images_uint8: np.ndarray,
    *,
    dataset: str | None = None,
    batch_size: int = 1000,
    features_fn: FeaturesFn | None = None,
    preprocess: Callable | None = None,
) -> np.ndarray:
    """The input of the output layer, in evaluation mode.

    For models with `stages()` (`tdu_jax.models`) all stages but the last are applied; for
    other Linen and NNX models it is the input of the last Dense/Conv layer called
    (`adapters.head_input`); plain-function models give `features_fn`. A 4-D result
    (B, H, W, C) is global-average-pooled (the ResNet head pools, then applies its Dense),
    anything else is flattened, so the features are exactly what the output layer reads.

    Args:
      model: flax module or adapter (`tdu_jax.adapters`).
      params: parameters.
      batch_stats: BatchNorm statistics (an adapter's state), or {}.
      images_uint8: (N, H, W, C) images: uint8 for `dataset`, or what `preprocess` takes.
      dataset: dataset name (normalisation of uint8 images), or None.
      batch_size: inference batch size (one trace per model and batch size).
      features_fn: `features_fn(params, state, inputs) -> (N, D)`, used instead of the
        stages or the interception when given. Pass the same function object each time, or it
        is traced again.
      preprocess: instead of `dataset`, images -> model inputs (None: images are inputs).

    Returns:
      float32 (N, D) features.
    """
    fn = _features_fn(model, adapters.preprocess_fn(dataset, preprocess), features_fn)
    return metrics._batched(functools.partial(fn, params, batch_stats), [images_uint8], batch_size)


def class_balanced_indices(
    labels: np.ndarray, per_class: int, seed: int, classes: Sequence[int] | None = None
) -> np.ndarray:
    """Sorted indices of up to `per_class` examples of each class, drawn without replacement.

    Args:
      labels: (N,) int labels.
      per_class: examples per class, >= 1 (a class with fewer gives all of its examples).
      seed: numpy seed.
      classes: classes to draw; defaults to those present in `labels`.

    Returns:
      int64 (M,) sorted indices into `labels`.
    """
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1; got {per_class}.")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(labels) if classes is None else classes:
        where = np.flatnonzero(labels == c)
        chosen.append(rng.choice(where, min(per_class, where.size), replace=False))
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)


def probe_recovery(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    forget_classes: Sequence[int],
    *,
    per_class: int = 500,
    seed: int = 0,
) -> float:
    """Forget-class test accuracy of a linear probe fitted on frozen features of all classes.

    The probe is StandardScaler + multinomial logistic regression (lbfgs, max_iter 2000) on a
    class-balanced sample of `per_class` training examples per class (drawn with `seed`).

    Args:
      train_features: (N, D) features of training images.
      train_labels: (N,) their labels (all classes, forget classes included).
      test_features: (K, D) features of test images.
      test_labels: (K,) their labels; only the forget classes' images are scored.
      forget_classes: label indices of the forget set.
      per_class: training examples per class.
      seed: sampling seed.

    Returns:
      Probe accuracy in % on the forget-class test images (nan if there are none).
    """
    train_labels = np.asarray(train_labels)
    index = class_balanced_indices(train_labels, per_class, seed)
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    probe.fit(np.asarray(train_features)[index], train_labels[index])
    test_labels = np.asarray(test_labels)
    forget = np.isin(test_labels, np.asarray(list(forget_classes), np.int64))
    if not forget.any():
        return float("nan")
    predictions = probe.predict(np.asarray(test_features)[forget])
    return metrics.accuracy(predictions, test_labels[forget])


# ---------------------------------------------------------------------------------------------
# Prediction histograms.


def js_divergence(p, q) -> float:
    """Jensen-Shannon divergence in bits between two discrete distributions.

    Args:
      p: (C,) non-negative weights (normalised here).
      q: (C,) non-negative weights (normalised here).

    Returns:
      JS(p, q) in [0, 1]: 0 for identical distributions, 1 for disjoint supports.
    """
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    if p.shape != q.shape or p.ndim != 1:
        raise ValueError(f"p and q must be 1-D of equal length; got {p.shape} and {q.shape}.")
    if np.any(p < 0) or np.any(q < 0) or p.sum() <= 0 or q.sum() <= 0:
        raise ValueError("p and q must be non-negative with a positive sum.")
    p, q = p / p.sum(), q / q.sum()
    m = 0.5 * (p + q)

    def kl(a):  # KL(a || m) in bits; terms with a = 0 are 0, and a > 0 implies m > 0
        nz = a > 0
        return float(np.sum(a[nz] * np.log2(a[nz] / m[nz])))

    return float(np.clip(0.5 * kl(p) + 0.5 * kl(q), 0.0, 1.0))


def prediction_histogram(predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """Share of each predicted class.

    Args:
      predictions: (N,) predicted labels in [0, num_classes).
      num_classes: C.

    Returns:
      float64 (C,) histogram summing to 1 (all nan for N = 0).
    """
    predictions = np.asarray(predictions, np.int64).ravel()
    if predictions.size and (predictions.min() < 0 or predictions.max() >= num_classes):
        raise ValueError(f"predictions must lie in [0, {num_classes}).")
    if predictions.size == 0:
        return np.full(num_classes, np.nan)
    return np.bincount(predictions, minlength=num_classes) / predictions.size


def forget_prediction_js(pred_a: np.ndarray, pred_b: np.ndarray, num_classes: int) -> float:
    """JS divergence (bits) between two models' predicted-class histograms.

    Args:
      pred_a: (N,) predictions of model A on the forget-class test images.
      pred_b: (M,) predictions of model B on the same images.
      num_classes: C.

    Returns:
      JS divergence in [0, 1]; 0 when both models spread the images over classes alike.
    """
    return js_divergence(
        prediction_histogram(pred_a, num_classes), prediction_histogram(pred_b, num_classes)
    )


# ---------------------------------------------------------------------------------------------
# Silenced control.


def _dense_layers(params: PyTree, prefix: tuple = ()) -> list[tuple[tuple, tuple[int, int]]]:
    """(path, kernel shape) of every mapping holding a 2-D `kernel` and a `bias`."""
    found = []
    if isinstance(params, Mapping):
        kernel, bias = params.get("kernel"), params.get("bias")
        if kernel is not None and bias is not None and np.ndim(kernel) == 2:
            found.append((prefix, tuple(np.shape(kernel))))
        for name, child in params.items():
            if isinstance(child, Mapping):
                found.extend(_dense_layers(child, (*prefix, name)))
    return found


def output_layer_path(params: PyTree, num_classes: int) -> tuple:
    """Path of keys to the output layer: the unique dense layer with `num_classes` outputs.

    Args:
      params: parameter pytree of nested dicts.
      num_classes: C.

    Returns:
      Tuple of keys, e.g. ("dense3",) for LeNet-5 or ("head", "dense") for the ResNets.
    """
    candidates = [path for path, shape in _dense_layers(params) if shape[-1] == num_classes]
    if len(candidates) != 1:
        raise ValueError(
            f"expected exactly one dense layer (2-D kernel and bias) with {num_classes} "
            f"outputs; found {len(candidates)}: {candidates}. Pass output_path explicitly."
        )
    return candidates[0]


def _infer_num_classes(params: PyTree) -> int:
    """Outputs of the only dense layer whose outputs feed no other dense layer."""
    layers = _dense_layers(params)
    inputs = {shape[0] for _, shape in layers}
    sinks = [shape[1] for _, shape in layers if shape[1] not in inputs]
    if len(sinks) != 1:
        raise ValueError(
            f"cannot tell the output layer among dense layers {layers}; pass num_classes or "
            "output_path."
        )
    return sinks[0]


def silence_classes(
    params: PyTree,
    forget_classes: Sequence[int],
    *,
    output_path: tuple | None = None,
    bias: float = -1e4,
    num_classes: int | None = None,
) -> PyTree:
    """The silenced control: forget classes' output columns zeroed, their bias set to `bias`.

    The forget logits become the constant `bias`, so those classes are never predicted, while
    every other parameter is left as is (the same arrays; `params` is not mutated).

    Args:
      params: parameter pytree of nested dicts.
      forget_classes: label indices to silence.
      output_path: tuple of keys to the dict holding the output `kernel` (D, C) and `bias` (C,);
        defaults to `output_layer_path(params, num_classes)`.
      bias: bias given to the silenced classes.
      num_classes: C, used only to find the output layer; defaults to the outputs of the one
        dense layer that feeds no other dense layer.

    Returns:
      A new parameter pytree.
    """
    if output_path is None:
        if num_classes is None:
            num_classes = _infer_num_classes(params)
        output_path = output_layer_path(params, num_classes)
    output_path = tuple(output_path)

    def rebuild(node, path):
        if not path:
            kernel, b = jnp.asarray(node["kernel"]), jnp.asarray(node["bias"])
            classes = np.asarray(list(forget_classes), np.int64)
            if classes.size == 0 or classes.min() < 0 or classes.max() >= kernel.shape[-1]:
                raise ValueError(
                    f"forget_classes {list(forget_classes)} must be non-empty and in "
                    f"[0, {kernel.shape[-1]})."
                )
            new = dict(node)
            new["kernel"] = kernel.at[:, classes].set(0)
            new["bias"] = b.at[classes].set(jnp.asarray(bias, b.dtype))
            return new
        if not isinstance(node, Mapping) or path[0] not in node:
            raise ValueError(f"output_path {output_path} does not lead to a dict in params.")
        new = dict(node)
        new[path[0]] = rebuild(node[path[0]], path[1:])
        return new

    return rebuild(params, output_path)


# ---------------------------------------------------------------------------------------------
# Relearning.


@functools.cache
def _relearn_step(model: Any, preprocess: Callable, momentum: float):
    """(tx, jitted step(params, state, opt_state, images, labels, lr, rng) -> same three).

    The learning rate is an argument, not a constant, so every lr shares one compilation.
    """
    tx = optax.sgd(1.0, momentum=momentum)  # -(momentum trace); scaled by lr below
    adapted = adapters.as_model(model)

    def step(params, state, opt_state, images, labels, lr, rng):
        x = preprocess(images)

        def loss_fn(p):
            # Training mode (BatchNorm batch statistics, dropout from rng), as train.train_step.
            logits, new_state = adapted.train_apply(p, state, x, rng)
            return train.cross_entropy(logits, labels), new_state

        grads, new_state = jax.grad(loss_fn, has_aux=True)(params)
        changes, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, jax.tree.map(lambda u: lr * u, changes))
        return params, new_state, opt_state

    return tx, jax.jit(step)


def relearn_steps(
    model: Any,
    params: PyTree,
    batch_stats: PyTree,
    relearn_split: data.Split,
    forget_test: data.Split,
    *,
    dataset: str | None = None,
    key: jax.Array,
    retain_split: data.Split | None = None,
    lr: float = 0.01,
    batch_size: int | None = None,
    target: float = 50.0,
    max_steps: int = 200,
    eval_every: int = 1,
    preprocess: Callable | None = None,
) -> int:
    """Optimizer steps of relearning until the forget test accuracy reaches `target` %.

    Plain SGD (momentum 0.9, no weight decay) on the labelled forget sample `relearn_split`;
    the model runs in training mode (`train_apply`: BatchNorm statistics update, dropout draws
    from `key`). The forget test accuracy is measured before
    any step (a model already at the target gives 0), after every `eval_every` steps and after
    the last one.

    With `retain_split`, every batch is the forget batch plus as many retain images (a fresh
    draw each step), so the model cannot reach the target by predicting the forget class for
    everything. `forgetting_metrics` uses mixed batches (`RELEARN_MIXED`). Measured on
    LeNet/MNIST (digit 0; 2-epoch models; 100 images; lr 0.01; target 50%; 3 sample seeds):
    steps for the base model 0/0/0 both ways; base with the digit-0 output column zeroed 1/1/1
    both ways; model trained without digit 0: 2/2/1 forget-only, 2/2/2 mixed. Discrimination is
    thus about equal, but forget-only batches reach the target by collapse: at step 2 the
    retrained model predicts 0 for 38% of retain test images (retain accuracy 56%), while with
    mixed batches it predicts 0 for 0.9% (retain accuracy 92.5%, forget 92.7%), i.e. it really
    relearned the class. Note the silenced control (bias -1e4) needs 4 (forget-only) / 6
    (mixed) steps, more than the retrained model: this metric alone does not expose a hidden
    logit.

    Args:
      model: flax module or adapter (`tdu_jax.adapters`).
      params: parameters (not modified).
      batch_stats: BatchNorm statistics (an adapter's state; not modified), or {}.
      relearn_split: labelled forget-class sample (e.g. 100 training images).
      forget_test: forget-class test images and labels, for the accuracy.
      dataset: dataset name (normalisation of uint8 images), or None.
      key: PRNG key of the batch order, the retain draws and dropout.
      retain_split: optional retain images mixed into every batch.
      lr: learning rate, >= 0 (0 never relearns: a check of the cap).
      batch_size: forget images per step; None = the whole sample every step.
      target: forget test accuracy (%) to reach.
      max_steps: most steps to run.
      eval_every: steps between accuracy checks.
      preprocess: instead of `dataset`, images -> model inputs (None: images are inputs).

    Returns:
      Steps taken to reach `target`, or `max_steps + 1` if it was not reached within
      `max_steps` steps ("capped").
    """
    if max_steps < 0 or eval_every < 1 or not lr >= 0:
        raise ValueError(
            f"need max_steps >= 0, eval_every >= 1 and lr >= 0; got {max_steps}, {eval_every}, "
            f"{lr}."
        )
    preprocess = adapters.preprocess_fn(dataset, preprocess)
    n = relearn_split.size
    b = n if batch_size is None else int(batch_size)
    if not 1 <= b <= n:
        raise ValueError(f"batch_size must be in 1..{n} (the relearn sample size); got {b}.")

    def forget_acc(p, bs):
        preds = metrics.predict(model, p, bs, forget_test.images, preprocess=preprocess)
        return metrics.accuracy(preds, forget_test.labels)

    if forget_acc(params, batch_stats) >= target:
        return 0
    k_forget, k_retain = jax.random.split(key)
    forget_index = data.batch_indices(n, b, k_forget, max_steps)
    retain_index = None
    if retain_split is not None:
        retain_index = data.batch_indices(retain_split.size, b, k_retain, max_steps)

    k_dropout = jax.random.fold_in(key, 2)
    tx, step_fn = _relearn_step(model, preprocess, 0.9)
    lr = jnp.float32(lr)
    p, bs = params, batch_stats
    opt_state = tx.init(p)
    for s in range(max_steps):
        images = relearn_split.images[forget_index[s]]
        labels = relearn_split.labels[forget_index[s]]
        if retain_index is not None:
            images = np.concatenate([images, retain_split.images[retain_index[s]]])
            labels = np.concatenate([labels, retain_split.labels[retain_index[s]]])
        rng = jax.random.fold_in(k_dropout, s)
        p, bs, opt_state = step_fn(p, bs, opt_state, images, labels.astype(np.int32), lr, rng)
        done = s + 1
        if (done % eval_every == 0 or done == max_steps) and forget_acc(p, bs) >= target:
            return done
    return max_steps + 1


# ---------------------------------------------------------------------------------------------
# All metrics for one model.


def _subset(split: data.Split, index: np.ndarray) -> data.Split:
    return data.Split(split.images[index], split.labels[index])


def _key_seed(key: jax.Array) -> int:
    return int(jax.random.randint(key, (), 0, np.iinfo(np.int32).max))


def forgetting_metrics(
    model: Any,
    params: PyTree,
    batch_stats: PyTree,
    *,
    dataset: str | None = None,
    train: data.Split,
    test: data.Split,
    forget_classes: Sequence[int],
    key: jax.Array,
    mia_sample: int | None = None,
    probe_per_class: int = 500,
    relearn_size: int = 100,
    relearn_max_steps: int = 200,
    reference_predictions: Sequence[float] | None = None,
    include_relearn: bool = True,
    features_fn: FeaturesFn | None = None,
    preprocess: Callable | None = None,
) -> dict:
    """All forgetting metrics of one model (base, unlearned, retrained or silenced control).

    Samples (all drawn from `key`, so models compared with the same key see the same images):
    - MIA members: a retain-train sample as large as the retain-class test set (SalUn's
      choice), or `mia_sample` if smaller; non-members: the retain-class test images (also
      capped at `mia_sample`); targets (`mia_svc`, `mia_entropy`): all forget-class train
      images. `mia_loss_auc`: all forget-class train (members) vs test (non-members) images.
    - Probe: `probe_per_class` train images per class (all classes); scored on all forget-class
      test images.
    - Relearning: `relearn_size` forget-class train images, mixed with as many retain-train
      images per step if `RELEARN_MIXED`; target 50% forget test accuracy, lr 0.01.

    Args:
      model: flax module or adapter (`tdu_jax.adapters`); plain-function models give
        `features_fn` for the probe (see `penultimate_features`).
      params: parameters.
      batch_stats: BatchNorm statistics (an adapter's state), or {}.
      dataset: dataset name (normalisation of uint8 images), or None with `preprocess`.
      train: the full training split.
      test: the full test split.
      forget_classes: label indices of the forget set.
      key: PRNG key for all samples.
      mia_sample: optional cap on the MIA member and non-member counts.
      probe_per_class: probe training images per class.
      relearn_size: relearning sample size.
      relearn_max_steps: relearning cap (`relearn_steps` returns this + 1 when not reached).
      reference_predictions: another model's `forget_predictions` histogram, for the JS.
      include_relearn: compute `relearn_steps` (the slowest metric).
      features_fn: the output layer's input, see `penultimate_features`.
      preprocess: instead of `dataset`, images -> model inputs (None: images are inputs).

    Returns:
      {"mia_svc", "mia_entropy", "mia_loss_auc", "probe_recovery": float %,
       "mia_entropy_slope": float 1/nats (``entropy_attack``; >= 0: mia_entropy is no evidence),
       "forget_entropy_median": float nats (median softmax entropy of the forget-class train
       images: as uncertain as the retrained model's is the aim, lower is confidently wrong),
       "relearn_steps": int (if include_relearn),
       "forget_predictions": list of C floats (predicted-class shares on forget test images),
       "forget_prediction_js": float bits (if reference_predictions is given)}.
    """
    forget_classes = tuple(int(c) for c in forget_classes)
    preprocess = adapters.preprocess_fn(dataset, preprocess)
    forget_train, retain_train = data.forget_retain(train, forget_classes)
    forget_test, retain_test = data.forget_retain(test, forget_classes)
    k_members, k_nonmembers, k_attack, k_probe, k_relearn_sample, k_relearn = jax.random.split(
        key, 6
    )
    n_mia = min(retain_test.size, retain_train.size)
    if mia_sample is not None:
        n_mia = min(int(mia_sample), n_mia)
    rng_members = np.random.default_rng(_key_seed(k_members))
    members = _subset(
        retain_train, np.sort(rng_members.choice(retain_train.size, n_mia, replace=False))
    )
    nonmembers = retain_test
    if n_mia < retain_test.size:
        rng_non = np.random.default_rng(_key_seed(k_nonmembers))
        nonmembers = _subset(retain_test, np.sort(rng_non.choice(retain_test.size, n_mia, False)))

    # Logits once per split, all in one call: fixed 1000-image batches, so one trace per model.
    splits = (members, nonmembers, forget_train, forget_test)
    images = np.concatenate([s.images for s in splits])
    z = metrics.logits(model, params, batch_stats, images, preprocess=preprocess)
    ends = np.cumsum([s.size for s in splits])[:-1]
    s_mem, s_non, s_ftr, s_fte = (
        softmax_stats(z_s, s.labels) for z_s, s in zip(np.split(z, ends), splits, strict=True)
    )
    pred_fte = np.argmax(np.split(z, ends)[-1], axis=-1)
    attack_seed = _key_seed(k_attack)
    result = {
        "mia_svc": mia_svc(
            s_mem["confidence"], s_non["confidence"], s_ftr["confidence"], seed=attack_seed
        ),
        **entropy_attack(s_mem["entropy"], s_non["entropy"], s_ftr["entropy"], seed=attack_seed),
        "mia_loss_auc": mia_loss_auc(s_ftr["loss"], s_fte["loss"]),
        "forget_entropy_median": (
            float(np.median(s_ftr["entropy"])) if forget_train.size else float("nan")
        ),
    }

    probe_seed = _key_seed(k_probe)
    probe_index = class_balanced_indices(train.labels, probe_per_class, probe_seed)
    features = penultimate_features(
        model,
        params,
        batch_stats,
        np.concatenate([train.images[probe_index], forget_test.images]),
        features_fn=features_fn,
        preprocess=preprocess,
    )
    result["probe_recovery"] = probe_recovery(
        features[: probe_index.size],
        train.labels[probe_index],
        features[probe_index.size :],
        forget_test.labels,
        forget_classes,
        per_class=probe_per_class,
        seed=probe_seed,
    )

    if include_relearn:
        rng_relearn = np.random.default_rng(_key_seed(k_relearn_sample))
        size = min(int(relearn_size), forget_train.size)
        sample = _subset(forget_train, np.sort(rng_relearn.choice(forget_train.size, size, False)))
        result["relearn_steps"] = relearn_steps(
            model,
            params,
            batch_stats,
            sample,
            forget_test,
            key=k_relearn,
            preprocess=preprocess,
            retain_split=retain_train if RELEARN_MIXED else None,
            max_steps=relearn_max_steps,
        )

    histogram = prediction_histogram(pred_fte, z.shape[-1])
    result["forget_predictions"] = [float(h) for h in histogram]
    if reference_predictions is not None:
        result["forget_prediction_js"] = js_divergence(histogram, reference_predictions)
    return result
