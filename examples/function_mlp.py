"""A pure-function MLP (no Flax) forgets a digit.

Run::

    TFDS_DATA_DIR=/path/to/tensorflow_datasets python -m examples.function_mlp

The model is ``apply_fn(variables, images) -> logits`` over a params dict of
``{"kernel", "bias"}`` layers; units are hidden neurons (``filter`` granularity of a
dense layer: one output column and its bias).
"""

import jax
import jax.numpy as jnp

import tdu_jax as tdu
from examples import _mnist

SIZES = (784, 128, 64, 10)


def init(key: jax.Array, sizes: tuple[int, ...] = SIZES) -> dict:
    """He-normal kernels, zero biases: ``{"params": {"dense0": {...}, ...}}``."""
    keys = jax.random.split(key, len(sizes) - 1)
    params = {
        f"dense{i}": {
            "kernel": jax.random.normal(k, (n_in, n_out)) * jnp.sqrt(2.0 / n_in),
            "bias": jnp.zeros(n_out),
        }
        for i, (k, n_in, n_out) in enumerate(zip(keys, sizes[:-1], sizes[1:], strict=True))
    }
    return {"params": params}


def features_fn(params: dict, state: dict, images: jax.Array) -> jax.Array:
    """The last hidden layer ``N x 64``: what the output layer reads (for the probe of
    ``forgetting_metrics``, which cannot look inside a plain function)."""
    x = images.reshape(images.shape[0], -1)
    for name in sorted(params)[:-1]:
        x = jax.nn.relu(x @ params[name]["kernel"] + params[name]["bias"])
    return x


def apply_fn(variables: dict, images: jax.Array) -> jax.Array:
    """logits ``N x 10`` of float images ``N x 28 x 28 x 1``."""
    params = variables["params"]
    last = params[sorted(params)[-1]]
    return features_fn(params, {}, images) @ last["kernel"] + last["bias"]


def run(
    *,
    digit: int = 0,
    num_train: int = 10_000,
    num_eval: int = 2_000,
    epochs: int = 2,
    sample_size: int = 256,
    train_split: str = "train",
    seed: int = 0,
    data_dir: str | None = None,
) -> dict:
    """Trains the MLP, unlearns ``digit`` and returns forget/retain accuracy (see _mnist)."""
    train, evaluation = _mnist.load(num_train, num_eval, train_split, data_dir)
    model, params, state = tdu.from_function(apply_fn, init(jax.random.key(seed)))
    params, state, _ = _mnist.fit(model, params, state, train, epochs=epochs, seed=seed)
    config = tdu.UnlearnConfig(
        granularity="filter",
        top_k=12,
        lam=1.0,
        dt=1.0,
        decay_steps=5,
        finetune="after_all",
        finetune_batches=20,
        batch_size=64,
    )
    return _mnist.forget_digit(
        model,
        params,
        state,
        train,
        evaluation,
        digit=digit,
        config=config,
        sample_size=sample_size,
        seed=seed,
        name="Function MLP",
    )


if __name__ == "__main__":
    run()
