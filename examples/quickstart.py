"""Quick tour of the top-level API on random data (no dataset needed).

Run::

    python -m examples.quickstart

units -> importance -> selection -> decay, then the whole pipeline (``run_unlearning``),
for a Linen CNN with BatchNorm and dropout whose ``__call__`` takes ``training=``.
"""

import flax.linen as nn
import jax
import numpy as np

import tdu_jax as tdu


class CNN(nn.Module):  # your own model, any call signature (here `training=`)
    @nn.compact
    def __call__(self, x, training: bool = False):
        x = nn.Conv(8, (3, 3))(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not training)(x))
        x = nn.Dropout(0.2, deterministic=not training)(x.mean((1, 2)))
        return nn.Dense(10)(x)


def main() -> tuple[np.ndarray, tdu.UnlearnResult]:
    """Runs the tour; returns the step-by-step top-K and the pipeline's result."""
    rng = np.random.default_rng(0)
    images = rng.normal(size=(64, 28, 28, 1)).astype(np.float32)  # model inputs (or preprocess=)
    labels = rng.integers(0, 10, 64).astype(np.int32)
    forget = labels == 0  # forget class 0
    cnn = CNN()
    model, params, state = tdu.from_linen(cnn, cnn.init(jax.random.key(0), images[:1]))
    # NNX: tdu.from_nnx(module); plain functions: tdu.from_function(apply_fn, variables)

    pairs = tdu.find_bn_pairs(model, params, state, images)  # {"Conv_0": "BatchNorm_0"}
    spec = tdu.enumerate_units(params, "filter", bn_pairs=pairs)  # units
    imp = tdu.ablation_importance(model, params, state, images[forget], labels[forget], spec)
    top = tdu.select_top_k(imp, 2)  # selection
    decayed = tdu.apply_decay(params, tdu.unit_mask(params, spec, top), lam=0.5, dt=1.0, steps=7)
    print(tdu.evaluate(model, decayed, state, tdu.Split(images, labels), forget_classes=(0,)))

    result = tdu.run_unlearning(  # the whole pipeline: importance, decay steps, fine-tuning
        model,
        params,
        state,
        data_in=tdu.UnlearnData(
            importance_sample=tdu.Split(images[forget], labels[forget]),
            retain_train=tdu.Split(images[~forget], labels[~forget]),
            test=tdu.Split(images, labels),
            forget_classes=(0,),
        ),
        config=tdu.UnlearnConfig(
            granularity="filter",
            top_k=2,
            lam=0.5,
            decay_steps=7,
            bn_pairs=tuple(pairs.items()),
            finetune="after_all",
            finetune_batches=5,
            batch_size=16,
        ),
        key=jax.random.key(0),
    )
    print(result.history[-1])  # forget_acc, retain_acc, test_acc in %
    return top, result


if __name__ == "__main__":
    main()
