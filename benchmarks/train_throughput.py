"""Training throughput (images/s): on-device batch gathering against host-fed batches.

    python -m benchmarks.train_throughput                         # LeNet, batch 128
    python -m benchmarks.train_throughput --model=resnet18 --width=0.25 --steps=20

Both loops run the same jitted step in one process on random data; the baseline
copies every batch from host memory, ``train.train_batches`` keeps the split on the
device and gathers each batch there. Reports both rates and their ratio.
"""

import json
import time

import jax
import numpy as np
from absl import app, flags

from tdu_jax import data, models, train

flags.DEFINE_string("model", "lenet", "lenet | resnet18 | resnet_tiny")
flags.DEFINE_float("width", 1.0, "ResNet width.")
flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_integer("steps", 100, "Timed steps per loop (after one warm-up call).")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    dataset = "mnist" if FLAGS.model == "lenet" else "cifar10"
    shape = data.image_shape(dataset)
    model = models.get_model(FLAGS.model, width=FLAGS.width)
    params, batch_stats = models.init_variables(model, jax.random.key(0), shape)
    rng = np.random.default_rng(0)
    n = FLAGS.batch_size * (FLAGS.steps + 1)
    split = data.Split(rng.integers(0, 256, (n, *shape), np.uint8),
                       rng.integers(0, 10, n).astype(np.int32))  # fmt: skip
    tx = train.make_optimizer(train.OptimizerConfig(), FLAGS.steps + 1)
    augment = dataset == "cifar10"

    def fresh():
        return train.create_train_state(model, jax.tree.map(np.array, params),
                                        jax.tree.map(np.array, batch_stats), tx)  # fmt: skip

    step = train.make_train_step(dataset, augment)
    state = fresh()
    b = FLAGS.batch_size
    state, m = step(state, split.images[:b], split.labels[:b], jax.random.key(0))  # warm-up
    jax.block_until_ready(m)
    start = time.perf_counter()
    for i in range(1, FLAGS.steps + 1):
        sl = slice(i * b, (i + 1) * b)
        state, m = step(state, split.images[sl], split.labels[sl], jax.random.key(i))
    jax.block_until_ready(m)
    host_rate = FLAGS.steps * b / (time.perf_counter() - start)

    state = fresh()
    state, _ = train.train_batches(state, split, jax.random.key(0), 1, batch_size=b,
                                   dataset=dataset, augment=augment)  # fmt: skip
    state, metrics = train.train_batches(state, split, jax.random.key(0), FLAGS.steps,
                                         batch_size=b, dataset=dataset, augment=augment,
                                         start_batch=1)  # fmt: skip
    result = {"model": FLAGS.model, "width": FLAGS.width, "device": str(jax.devices()[0]),
              "host_fed_images_per_s": host_rate,
              "on_device_images_per_s": metrics["images_per_s"],
              "ratio": metrics["images_per_s"] / host_rate}  # fmt: skip
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    app.run(main)
