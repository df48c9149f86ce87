"""An NNX CNN (BatchNorm, dropout) forgets a digit.

Run::

    TFDS_DATA_DIR=/path/to/tensorflow_datasets python -m examples.nnx_cnn

``tdu.from_nnx`` splits the module into a graphdef per mode (``.eval()`` / ``.train()``),
params and BatchNorm statistics; ``tdu.find_bn_pairs`` finds which BatchNorm normalises
which conv from the computation (``c1 -> n1``, ``c2 -> n2``; they could also be given
explicitly as ``bn_pairs={"c1": "n1", "c2": "n2"}``).
"""

from flax import nnx

import tdu_jax as tdu
from examples import _mnist


class CNN(nnx.Module):
    """conv -> norm -> ReLU -> max-pool, twice; dropout; a dense head."""

    def __init__(self, rngs: nnx.Rngs, width: int = 16):
        self.c1 = nnx.Conv(1, width, (3, 3), use_bias=False, rngs=rngs)
        self.n1 = nnx.BatchNorm(width, momentum=0.9, rngs=rngs)
        self.c2 = nnx.Conv(width, 2 * width, (3, 3), use_bias=False, rngs=rngs)
        self.n2 = nnx.BatchNorm(2 * width, momentum=0.9, rngs=rngs)
        self.drop = nnx.Dropout(0.25, rngs=rngs)
        self.hidden = nnx.Linear(7 * 7 * 2 * width, 64, rngs=rngs)
        self.out = nnx.Linear(64, 10, rngs=rngs)

    def __call__(self, x):
        for conv, norm in ((self.c1, self.n1), (self.c2, self.n2)):
            x = nnx.max_pool(nnx.relu(norm(conv(x))), (2, 2), (2, 2))
        x = self.drop(x.reshape(x.shape[0], -1))
        return self.out(nnx.relu(self.hidden(x)))


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
    model, params, state = tdu.from_nnx(CNN(nnx.Rngs(params=seed, dropout=seed + 1)))
    params, state, _ = _mnist.fit(model, params, state, train, epochs=epochs, seed=seed)
    pairs = tdu.find_bn_pairs(model, params, state, _mnist.preprocess(train.images[:2]))
    assert pairs == {"c1": "n1", "c2": "n2"}, pairs
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
        name="NNX CNN",
    )


if __name__ == "__main__":
    run()
