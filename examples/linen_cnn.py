"""A custom Linen CNN (auto-named layers, BatchNorm, dropout, ``training=``) forgets a digit.

Run::

    TFDS_DATA_DIR=/path/to/tensorflow_datasets python -m examples.linen_cnn

Trains briefly on MNIST, discovers the Conv -> BatchNorm pairs from the computation,
unlearns digit 0 at filter granularity and prints forget/retain accuracy.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

import tdu_jax as tdu
from examples import _mnist


class CNN(nn.Module):
    """Two conv blocks (Conv -> BatchNorm -> ReLU -> max-pool), dropout, a dense head."""

    width: int = 16

    @nn.compact
    def __call__(self, x, training: bool = False):
        for features in (self.width, 2 * self.width):
            x = nn.Conv(features, (3, 3), use_bias=False)(x)
            x = nn.BatchNorm(use_running_average=not training, momentum=0.9)(x)
            x = nn.max_pool(nn.relu(x), (2, 2), (2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nn.Dropout(0.25, deterministic=not training)(x)
        x = nn.relu(nn.Dense(64)(x))
        return nn.Dense(10)(x)


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
    """Trains the CNN, unlearns ``digit`` and returns forget/retain accuracy (see _mnist)."""
    train, evaluation = _mnist.load(num_train, num_eval, train_split, data_dir)
    cnn = CNN()
    x = _mnist.preprocess(jnp.asarray(train.images[:2]))
    variables = cnn.init(jax.random.key(seed), x)
    model, params, state = tdu.from_linen(cnn, variables)  # detects training=False/True
    params, state, _ = _mnist.fit(model, params, state, train, epochs=epochs, seed=seed)
    # Conv_0 -> BatchNorm_0 etc., found from which module consumes which output.
    pairs = tdu.find_bn_pairs(model, params, state, x)
    config = tdu.UnlearnConfig(
        granularity="filter",
        top_k=12,
        lam=1.0,
        dt=1.0,
        decay_steps=5,
        bn_pairs=tuple(pairs.items()),
        finetune="after_all",
        finetune_batches=20,
        batch_size=64,
        evaluate_each_step=False,
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
        name="Linen CNN",
    )


if __name__ == "__main__":
    run()
