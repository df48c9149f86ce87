"""Supervised training: optimizer, train state with batch_stats, jitted step and loops.

`train` trains a model from scratch for whole epochs; `fine_tune` runs a number of batches on a
split (the unlearning pipeline's retain-set fine-tuning). Both are built on `train_batches`, which
runs one fixed stream of batches: `data.batch_indices` drawn from a shuffle key, so that several
calls with increasing `start_batch` continue the same stream.

Randomness: the loop key is split once into a shuffle key (batch order) and a step key; step s
(counted from the start of the stream) augments with `jax.random.fold_in(step_key, s)` and gives
the model's dropout `jax.random.fold_in(that key, 1)`.

Models are Linen modules (any call signature) or adapters (`tdu_jax.adapters`); images are
uint8 normalised for `dataset`, or go through `preprocess` (or are model inputs already, e.g.
float). `loss_fn(logits_BxC, labels_B) -> (B,)` replaces the cross-entropy when given.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from tdu_jax import adapters, data, metrics

PyTree = Any
# progress(done, total, metrics): `done` of `total` steps finished; metrics are running means.
ProgressFn = Callable[[int, int, dict], None]
LossFn = Callable[[jax.Array, jax.Array], jax.Array]  # (logits_BxC, labels_B) -> loss_B

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "cosine", "onecycle")
PROGRESS_EVERY = 50  # steps between progress callbacks
_ONECYCLE_WARMUP = 0.15  # share of steps spent warming up when warmup_steps == 0
_ONECYCLE_DIV = 25.0  # onecycle starts at peak / 25 ...
_ONECYCLE_FINAL_DIV = 1e4  # ... and ends at peak / 1e4 (the PyTorch OneCycleLR defaults)


class OptimizerConfig(NamedTuple):
    """Optimizer and loss settings.

    Attributes:
      name: "sgd" (heavy-ball momentum; Nesterov with `nesterov`) or "adam" (AdamW).
      learning_rate: peak learning rate, > 0.
      momentum: SGD momentum in [0, 1) (0 disables it); ignored by adam.
      weight_decay: >= 0. For sgd a classic L2 term (`wd * param` added to the gradient of every
        parameter, as torch.optim.SGD does); for adam the decoupled AdamW decay.
      schedule: "constant", "cosine" (decay to 0 over all steps) or "onecycle" (linear warmup
        from peak/25 to the peak, then cosine down to peak/1e4).
      warmup_steps: linear warmup steps from 0 (constant, cosine) or peak/25 (onecycle) to the
        peak; for onecycle 0 means 15% of the steps.
      label_smoothing: label smoothing of the cross-entropy in [0, 1).
      nesterov: Nesterov momentum (sgd only).
      decay_norm_and_bias: weight decay on every parameter (True), or only on kernels with
        two or more dimensions, sparing BatchNorm scales and offsets and biases (False).
    """

    name: str = "sgd"
    learning_rate: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_steps: int = 0
    label_smoothing: float = 0.0
    nesterov: bool = False
    decay_norm_and_bias: bool = True


def validate_optimizer_config(config: OptimizerConfig) -> None:
    """Checks every field of `config`; raises ValueError naming the field and allowed values."""
    if config.name not in OPTIMIZERS:
        raise ValueError(
            f"OptimizerConfig.name must be one of {', '.join(OPTIMIZERS)}; got {config.name!r}."
        )
    if config.schedule not in SCHEDULES:
        raise ValueError(
            f"OptimizerConfig.schedule must be one of {', '.join(SCHEDULES)}; "
            f"got {config.schedule!r}."
        )
    checks = (
        ("learning_rate", config.learning_rate, lambda v: math.isfinite(v) and v > 0, "> 0"),
        ("momentum", config.momentum, lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
        ("weight_decay", config.weight_decay, lambda v: math.isfinite(v) and v >= 0, ">= 0"),
        ("label_smoothing", config.label_smoothing, lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    )
    for field, value, ok, allowed in checks:
        if not isinstance(value, int | float | np.number) or not ok(float(value)):
            raise ValueError(f"OptimizerConfig.{field} must be {allowed}; got {value!r}.")
    for field in ("nesterov", "decay_norm_and_bias"):
        if not isinstance(getattr(config, field), bool):
            raise ValueError(
                f"OptimizerConfig.{field} must be a bool; got {getattr(config, field)!r}."
            )
    if config.nesterov and not (config.name == "sgd" and config.momentum > 0):
        raise ValueError(
            "OptimizerConfig.nesterov needs name 'sgd' and momentum > 0; "
            f"got name {config.name!r}, momentum {config.momentum}."
        )
    warmup = config.warmup_steps
    if not isinstance(warmup, int | np.integer) or isinstance(warmup, bool) or warmup < 0:
        raise ValueError(f"OptimizerConfig.warmup_steps must be an int >= 0; got {warmup!r}.")


def learning_rate_schedule(config: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """The learning-rate schedule of `config` over `total_steps` steps.

    Args:
      config: a valid OptimizerConfig.
      total_steps: schedule length in steps, >= 1.

    Returns:
      A function step -> learning rate.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1; got {total_steps}.")
    lr, warmup = float(config.learning_rate), int(config.warmup_steps)
    if config.schedule == "onecycle" and warmup == 0:
        warmup = int(round(_ONECYCLE_WARMUP * total_steps))
    if warmup >= total_steps and config.schedule != "constant":
        raise ValueError(
            f"OptimizerConfig.warmup_steps={config.warmup_steps} leaves no decay phase for "
            f"total_steps={total_steps}; use fewer warmup steps or the constant schedule."
        )
    if config.schedule == "constant":
        if not warmup:
            return optax.constant_schedule(lr)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup]
        )
    if config.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, total_steps, end_value=0.0)
    return optax.warmup_cosine_decay_schedule(
        lr / _ONECYCLE_DIV, lr, warmup, total_steps, end_value=lr / _ONECYCLE_FINAL_DIV
    )


@functools.cache
def make_optimizer(config: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    """Builds the optax optimizer of `config`.

    Cached: equal arguments return the same object, so train states built from it share their
    static structure and the jitted steps do not retrace.

    Args:
      config: optimizer settings (validated here).
      total_steps: length of the learning-rate schedule in steps, >= 1.

    Returns:
      An optax GradientTransformation.
    """
    validate_optimizer_config(config)
    schedule = learning_rate_schedule(config, total_steps)
    mask = None if config.decay_norm_and_bias else kernels_only
    if config.name == "adam":
        return optax.adamw(schedule, weight_decay=config.weight_decay, mask=mask)
    momentum = config.momentum or None
    sgd = optax.sgd(schedule, momentum=momentum, nesterov=config.nesterov)
    if config.weight_decay == 0:
        return sgd
    return optax.chain(optax.add_decayed_weights(config.weight_decay, mask=mask), sgd)


def kernels_only(params: PyTree) -> PyTree:
    """Weight-decay mask: True for leaves with two or more dimensions (conv and dense kernels),
    False for vectors (BatchNorm scales and offsets, biases)."""
    return jax.tree.map(lambda p: jnp.ndim(p) > 1, params)


def start_schedule_at(opt_state: optax.OptState, step: int) -> optax.OptState:
    """Moves the learning-rate schedule of a (fresh) optimizer state to `step`.

    Only the schedule counters change; Adam's bias-correction count and all moments stay.

    Args:
      opt_state: state of an optimizer from `make_optimizer`.
      step: schedule step the next update uses, >= 0.

    Returns:
      The optimizer state with every `optax.ScaleByScheduleState.count` set to `step`.
    """
    is_schedule = lambda x: isinstance(x, optax.ScaleByScheduleState)
    return jax.tree.map(
        lambda x: x._replace(count=jnp.full_like(x.count, step)) if is_schedule(x) else x,
        opt_state,
        is_leaf=is_schedule,
    )


class TrainState(train_state.TrainState):
    """flax TrainState plus the BatchNorm running statistics (`{}` for models without BN)."""

    batch_stats: Any


def create_train_state(
    model: nn.Module, params: PyTree, batch_stats: PyTree, tx: optax.GradientTransformation
) -> TrainState:
    """A TrainState at step 0 with a freshly initialised optimizer state.

    Args:
      model: the flax module whose `apply` the state uses, or an adapter (stored as
        `apply_fn`; its `state` is kept in `batch_stats`).
      params: parameter pytree.
      batch_stats: BatchNorm statistics pytree (an adapter's state), or {}.
      tx: optimizer.

    Returns:
      TrainState. Its arrays alias `params`/`batch_stats`; the jitted steps donate the state, so
      pass copies if the caller still needs the originals (as `train`/`fine_tune` do).
    """
    apply_fn = model.apply if isinstance(model, nn.Module) else adapters.as_model(model)
    return TrainState.create(apply_fn=apply_fn, params=params, tx=tx, batch_stats=batch_stats)


def _state_model(state: TrainState) -> adapters.Model:
    """The adapter behind `state.apply_fn` (a Linen module's bound `apply`, or an adapter)."""
    fn = state.apply_fn
    owner = getattr(fn, "__self__", None)
    return adapters.as_model(owner if isinstance(owner, nn.Module) else fn)


def cross_entropy(logits_BxC: jax.Array, labels_B: jax.Array, label_smoothing: float = 0.0):
    """Mean softmax cross-entropy in nats over the batch, with optional label smoothing."""
    one_hot = jax.nn.one_hot(labels_B, logits_BxC.shape[-1], dtype=jnp.float32)
    if label_smoothing:
        one_hot = optax.smooth_labels(one_hot, label_smoothing)
    return jnp.mean(optax.softmax_cross_entropy(logits_BxC.astype(jnp.float32), one_hot))


def train_step(
    state: TrainState,
    images_BxHxWxC: jax.Array,
    labels_B: jax.Array,
    key: jax.Array,
    *,
    dataset: str | None = None,
    augment: bool,
    label_smoothing: float = 0.0,
    preprocess: Callable | None = None,
    loss_fn: LossFn | None = None,
) -> tuple[TrainState, dict]:
    """One optimizer step on one batch (pure; jit it, e.g. via `make_train_step`).

    Args:
      state: train state; BatchNorm statistics are updated in training mode.
      images_BxHxWxC: uint8 images (with `dataset`) or anything `preprocess` takes.
      labels_B: int32 labels.
      key: PRNG key for augmentation and (folded with 1) the model's dropout.
      dataset: dataset name, selects the normalisation of `data.to_float`; or None.
      augment: apply `data.augment_cifar` (random crop with padding 4 and flip).
      label_smoothing: label smoothing in [0, 1) (cross-entropy only).
      preprocess: instead of `dataset`, images -> model inputs (None: images are inputs).
      loss_fn: per-example loss replacing the cross-entropy (its mean is minimised).

    Returns:
      (new state, metrics) with scalar `loss` (mean cross-entropy, nats) and `accuracy` (%), both
      measured on the batch before the update.
    """
    images = data.augment_cifar(key, images_BxHxWxC) if augment else images_BxHxWxC
    x = adapters.preprocess_fn(dataset, preprocess)(images)
    model = _state_model(state)

    def objective(params):
        logits, new_state = model.train_apply(
            params, state.batch_stats, x, jax.random.fold_in(key, 1)
        )
        if loss_fn is None:
            loss = cross_entropy(logits, labels_B, label_smoothing)
        else:
            loss = jnp.mean(loss_fn(logits, labels_B).astype(jnp.float32))
        return loss, (logits, new_state)

    (loss, (logits, new_state)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads, batch_stats=new_state)
    accuracy = 100.0 * jnp.mean((jnp.argmax(logits, -1) == labels_B).astype(jnp.float32))
    return state, {"loss": loss, "accuracy": accuracy}


@functools.cache
def make_train_step(
    dataset: str | None,
    augment: bool,
    label_smoothing: float = 0.0,
    preprocess: Callable | None = None,
    loss_fn: LossFn | None = None,
) -> Callable:
    """The jitted `train_step` for one setting, cached so each setting traces once per shape.

    Args:
      dataset: dataset name, or None.
      augment: whether to augment.
      label_smoothing: label smoothing.
      preprocess: images -> model inputs, instead of `dataset`.
      loss_fn: per-example loss replacing the cross-entropy.

    Returns:
      fn(state, images_BxHxWxC, labels_B, key) -> (state, metrics); donates `state`.
    """
    step = functools.partial(
        train_step,
        dataset=dataset,
        augment=augment,
        label_smoothing=label_smoothing,
        preprocess=preprocess,
        loss_fn=loss_fn,
    )
    return jax.jit(step, donate_argnums=(0,))


@functools.cache
def _make_indexed_step(
    dataset: str | None,
    augment: bool,
    label_smoothing: float,
    preprocess: Callable | None = None,
    loss_fn: LossFn | None = None,
) -> Callable:
    """Jitted step that gathers its batch on device: fn(state, images, labels, index_B, key, s)."""

    def step(state, images, labels, index_B, key, global_step):
        return train_step(
            state,
            images[index_B],
            labels[index_B],
            jax.random.fold_in(key, global_step),
            dataset=dataset,
            augment=augment,
            label_smoothing=label_smoothing,
            preprocess=preprocess,
            loss_fn=loss_fn,
        )

    return jax.jit(step, donate_argnums=(0,))


def _mean_metrics(history: list[dict]) -> dict:
    if not history:
        return {"loss": float("nan"), "accuracy": float("nan")}
    host = jax.device_get(history)
    return {k: float(np.mean([m[k] for m in host])) for k in ("loss", "accuracy")}


def train_batches(
    state: TrainState,
    split: data.Split,
    key: jax.Array,
    num_batches: int,
    *,
    batch_size: int,
    dataset: str | None = None,
    augment: bool,
    label_smoothing: float = 0.0,
    start_batch: int = 0,
    progress: ProgressFn | None = None,
    preprocess: Callable | None = None,
    loss_fn: LossFn | None = None,
) -> tuple[TrainState, dict]:
    """Runs exactly `num_batches` optimizer steps on batches of `split`.

    The batches are entries `[start_batch, start_batch + num_batches)` of the stream
    `data.batch_indices(split.size, batch_size, shuffle_key, ...)` (epochs of fresh permutations,
    remainders dropped), so calls with increasing `start_batch` continue one stream and give the
    same result as one long call. The split is copied to the device once per call.

    Args:
      state: train state; it is donated (consumed).
      split: uint8 (N, H, W, C) images and int32 (N,) labels.
      key: PRNG key of the stream: `shuffle_key, step_key = jax.random.split(key)`; step s uses
        `jax.random.fold_in(step_key, s)` with s counted from the stream start.
      num_batches: steps to run, >= 0.
      batch_size: B, 1 <= B <= N.
      dataset: dataset name (normalisation).
      augment: apply `data.augment_cifar`.
      label_smoothing: label smoothing in [0, 1).
      start_batch: position in the stream of the first batch, >= 0.
      progress: optional callback `progress(done, total, metrics)`, called every
        `PROGRESS_EVERY` steps and after the last; metrics hold running-mean `loss` and
        `accuracy` (%), `images_per_s` and `eta_s` (seconds).
      preprocess: instead of `dataset`, images -> model inputs (None: images are inputs).
      loss_fn: per-example loss replacing the cross-entropy.

    Returns:
      (new state, metrics) with mean `loss` (nats) and `accuracy` (%) over the steps (nan if
      none), `batches`, `seconds` (wall) and `images_per_s`.
    """
    if num_batches < 0 or start_batch < 0:
        raise ValueError(
            f"num_batches and start_batch must be >= 0; got {num_batches} and {start_batch}."
        )
    shuffle_key, step_key = jax.random.split(key)
    index = data.batch_indices(split.size, batch_size, shuffle_key, start_batch + num_batches)
    index = index[start_batch:]
    images, labels = jnp.asarray(split.images), jnp.asarray(split.labels)
    if dataset is not None:
        dataset = data.check_dataset(dataset)
    step_fn = _make_indexed_step(dataset, bool(augment), label_smoothing, preprocess, loss_fn)

    history: list[dict] = []
    start = time.perf_counter()

    def report(done: int) -> dict:
        means = _mean_metrics(history)  # device_get waits for the queued steps
        seconds = time.perf_counter() - start
        rate = done * batch_size / seconds if seconds > 0 else float("nan")
        eta = (num_batches - done) * batch_size / rate if done else float("nan")
        return {**means, "seconds": seconds, "images_per_s": rate, "eta_s": eta}

    for i in range(num_batches):
        state, step_metrics = step_fn(state, images, labels, index[i], step_key, start_batch + i)
        history.append(step_metrics)
        done = i + 1
        if progress is not None and (done % PROGRESS_EVERY == 0 or done == num_batches):
            progress(done, num_batches, report(done))
    summary = report(num_batches)
    del summary["eta_s"]
    return state, {**summary, "batches": num_batches}


def _copy_tree(tree: PyTree) -> PyTree:
    # Fresh device buffers: the jitted steps donate the state, which must not eat the caller's.
    return jax.tree.map(lambda a: jnp.array(a, copy=True), tree)


def train(
    model: nn.Module,
    params: PyTree,
    batch_stats: PyTree,
    train_split: data.Split,
    *,
    dataset: str | None = None,
    config: OptimizerConfig,
    epochs: int,
    batch_size: int,
    key: jax.Array,
    augment: bool = False,
    eval_split: data.Split | None = None,
    progress: ProgressFn | None = None,
    preprocess: Callable | None = None,
    loss_fn: LossFn | None = None,
) -> tuple[PyTree, PyTree, list[dict]]:
    """Trains for whole epochs; deterministic given `key`.

    An epoch is `train_split.size // batch_size` batches (remainder dropped); the learning-rate
    schedule spans all epochs.

    Args:
      model: flax module; params/batch_stats are its variables (not modified).
      params: initial parameters.
      batch_stats: initial BatchNorm statistics, or {}.
      train_split: uint8 (N, H, W, C) images, int32 (N,) labels.
      dataset: dataset name (normalisation).
      config: optimizer settings.
      epochs: number of epochs, >= 0.
      batch_size: B, 1 <= B <= N.
      key: PRNG key (batch order and augmentation).
      augment: apply `data.augment_cifar` to training batches.
      eval_split: optional split whose accuracy is measured after each epoch.
      progress: optional callback `progress(done, total, metrics)` over all steps of all epochs;
        metrics as in `train_batches` plus `epoch` (1-based).
      preprocess: instead of `dataset`, images -> model inputs (None: images are inputs).
      loss_fn: per-example loss replacing the cross-entropy.

    Returns:
      (params, batch_stats, history): history holds one dict per epoch with `epoch` (1-based),
      `loss` (mean, nats), `train_acc` (% on the augmented training batches), `test_acc` (% on
      `eval_split`, if given), `seconds` (training wall time) and `images_per_s`.
    """
    validate_optimizer_config(config)
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0; got {epochs}.")
    steps_per_epoch = train_split.size // batch_size
    if steps_per_epoch < 1:
        raise ValueError(
            f"batch_size={batch_size} exceeds the training split size {train_split.size}."
        )
    total = epochs * steps_per_epoch
    tx = make_optimizer(config, max(total, 1))
    state = create_train_state(model, _copy_tree(params), _copy_tree(batch_stats), tx)
    history = []
    for epoch in range(epochs):
        offset = epoch * steps_per_epoch
        epoch_progress = None
        if progress is not None:

            def epoch_progress(done, _, m, offset=offset, epoch=epoch):
                rate = m["images_per_s"]
                eta = (total - offset - done) * batch_size / rate if rate > 0 else float("nan")
                progress(offset + done, total, {**m, "eta_s": eta, "epoch": epoch + 1})

        state, m = train_batches(
            state,
            train_split,
            key,
            steps_per_epoch,
            batch_size=batch_size,
            dataset=dataset,
            augment=augment,
            label_smoothing=config.label_smoothing,
            start_batch=offset,
            progress=epoch_progress,
            preprocess=preprocess,
            loss_fn=loss_fn,
        )
        record = {"epoch": epoch + 1, "loss": m["loss"], "train_acc": m["accuracy"]}
        if eval_split is not None:
            predictions = metrics.predict(
                model,
                state.params,
                state.batch_stats,
                eval_split.images,
                dataset=dataset,
                preprocess=preprocess,
            )
            record["test_acc"] = metrics.accuracy(predictions, eval_split.labels)
        record.update(seconds=m["seconds"], images_per_s=m["images_per_s"])
        history.append(record)
    return state.params, state.batch_stats, history


def fine_tune(
    model: nn.Module,
    params: PyTree,
    batch_stats: PyTree,
    split: data.Split,
    *,
    dataset: str | None = None,
    config: OptimizerConfig,
    num_batches: int,
    batch_size: int,
    key: jax.Array,
    augment: bool = False,
    start_batch: int = 0,
    total_batches: int | None = None,
    progress: ProgressFn | None = None,
    preprocess: Callable | None = None,
    loss_fn: LossFn | None = None,
) -> tuple[PyTree, PyTree, dict]:
    """Fine-tunes for `num_batches` batches of `split` with a fresh optimizer.

    Optimizer state (momentum, Adam moments) does not carry across calls: each call starts it
    from zero. The data stream does (`start_batch`, same `key`), and so does the learning-rate
    schedule when `total_batches` is given: the schedule then spans `total_batches` steps and
    this call runs its steps `[start_batch, start_batch + num_batches)`. Without
    `total_batches` each call gets its own schedule over `num_batches` steps.

    Args:
      model: flax module.
      params: parameters (not modified).
      batch_stats: BatchNorm statistics (not modified), or {}.
      split: uint8 (N, H, W, C) images and int32 (N,) labels, e.g. the retain train set.
      dataset: dataset name (normalisation).
      config: optimizer settings.
      num_batches: steps to run, >= 0 (0 returns copies of the inputs).
      batch_size: B, 1 <= B <= N.
      key: PRNG key of the batch stream (see `train_batches`).
      augment: apply `data.augment_cifar`.
      start_batch: position in the batch stream (and schedule, see above) of the first batch.
      total_batches: optional schedule length spanning several calls.
      progress: optional callback, as in `train_batches`.
      preprocess: instead of `dataset`, images -> model inputs (None: images are inputs).
      loss_fn: per-example loss replacing the cross-entropy.

    Returns:
      (params, batch_stats, metrics) with metrics as returned by `train_batches`.
    """
    validate_optimizer_config(config)
    if total_batches is None:
        schedule_len, schedule_start = max(num_batches, 1), 0
    else:
        if start_batch + num_batches > total_batches:
            raise ValueError(
                f"start_batch + num_batches = {start_batch + num_batches} exceeds "
                f"total_batches={total_batches}."
            )
        schedule_len, schedule_start = total_batches, min(start_batch, total_batches - 1)
    tx = make_optimizer(config, schedule_len)
    state = create_train_state(model, _copy_tree(params), _copy_tree(batch_stats), tx)
    state = state.replace(opt_state=start_schedule_at(state.opt_state, schedule_start))
    state, m = train_batches(
        state,
        split,
        key,
        num_batches,
        batch_size=batch_size,
        dataset=dataset,
        augment=augment,
        label_smoothing=config.label_smoothing,
        start_batch=start_batch,
        progress=progress,
        preprocess=preprocess,
        loss_fn=loss_fn,
    )
    return state.params, state.batch_stats, m
