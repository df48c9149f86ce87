"""Shared parts of the examples: MNIST slices, float preprocessing, training, forgetting a digit.

Not part of the library: each example shows how its own model plugs into ``tdu_jax``.
"""

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import tdu_jax as tdu
from tdu_jax import data
from tdu_jax import train as train_lib


def preprocess(images_uint8: jax.Array) -> jax.Array:
    """uint8 ``N x 28 x 28 x 1`` -> float32 in [0, 1] (a user's own preprocessing)."""
    return images_uint8.astype(jnp.float32) / 255.0


def load(
    num_train: int, num_eval: int, train_split: str = "train", data_dir: str | None = None
) -> tuple[data.Split, data.Split]:
    """The first ``num_train`` images of ``train_split`` and the last ``num_eval`` of test.

    With ``train_split="test"`` both come from the (faster to load) test split; they stay
    disjoint as long as ``num_train + num_eval <= 10,000``.
    """
    train_part = data.take(data.load_split("mnist", train_split, data_dir=data_dir), num_train)
    test = data.load_split("mnist", "test", data_dir=data_dir)
    if train_split == "test" and num_train + num_eval > test.size:
        raise ValueError("train and eval slices of the test split would overlap")
    return train_part, data.Split(test.images[-num_eval:], test.labels[-num_eval:])


def fit(model: Any, params, state, split: data.Split, *, epochs: int, seed: int):
    """Adam, lr 2e-3, batch 64: a brief training of ``model`` on float images."""
    config = train_lib.OptimizerConfig(
        name="adam", learning_rate=2e-3, weight_decay=0.0, schedule="constant"
    )
    params, state, history = train_lib.train(
        model,
        params,
        state,
        split,
        config=config,
        epochs=epochs,
        batch_size=64,
        key=jax.random.key(seed),
        preprocess=preprocess,
    )
    return params, state, history


def forget_digit(
    model: Any,
    params,
    state,
    train_split: data.Split,
    eval_split: data.Split,
    *,
    digit: int,
    config: tdu.UnlearnConfig,
    sample_size: int,
    seed: int,
    name: str,
) -> dict:
    """Unlearns ``digit`` with ``config`` and prints forget/retain accuracy before and after.

    Returns:
      ``{"before": {...}, "after": {...}, "selected", "unlearned": (params, state),
      "seconds": float}``; accuracies in % on ``eval_split`` (forget = the digit, retain =
      the other digits).
    """
    forget, retain = data.forget_retain(train_split, [digit])
    start = time.perf_counter()
    result = tdu.run_unlearning(
        model,
        params,
        state,
        data_in=tdu.UnlearnData(
            importance_sample=data.take(forget, sample_size),
            retain_train=retain,
            test=eval_split,
            forget_classes=(digit,),
        ),
        config=config,
        key=jax.random.key(seed),
        preprocess=preprocess,
    )
    seconds = time.perf_counter() - start
    keys = ("forget_acc", "retain_acc", "test_acc")
    before, after = (
        tdu.evaluate(m, p, s, eval_split, forget_classes=(digit,), preprocess=preprocess)
        for m, p, s in ((model, params, state), (model, result.params, result.batch_stats))
    )
    print(
        f"{name}: forget digit {digit} (K={len(result.selected)} of {result.spec.num_units} "
        f"{config.granularity} units, {seconds:.1f} s)\n"
        f"  before: forget {before['forget_acc']:.2f}%  retain {before['retain_acc']:.2f}%\n"
        f"  after:  forget {after['forget_acc']:.2f}%  retain {after['retain_acc']:.2f}%"
    )
    return {
        "before": {k: before[k] for k in keys},
        "after": {k: after[k] for k in keys},
        "selected": np.asarray(result.selected),
        "unlearned": (result.params, result.batch_stats),
        "seconds": seconds,
    }
