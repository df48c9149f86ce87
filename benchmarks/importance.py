"""Importance-engine benchmark: the fast engine against the naive loop, same process.

    python -m benchmarks.importance                       # LeNet, all 61,706 weights, 512 images
    python -m benchmarks.importance --naive_units=2000    # more naive units, tighter rate
    python -m benchmarks.importance --model=resnet18 --width=0.25 --granularity=filter \\
        --num_images=256 --naive_units=100

Reports per layer ablations/s of the fast engine (and its strategy), the whole-sweep
time, the naive loop's rate on an evenly spaced subset of units (its full-sweep time
is extrapolated), their ratio, how many units differ at all between the two on that
subset, and the process's peak resident memory after each phase. Uses random-init
weights and random images: speed does not depend on training.
"""

import json
import resource
import time

import jax
import numpy as np
from absl import app, flags

from tdu_jax import importance, models, units

flags.DEFINE_string("model", "lenet", "lenet | resnet18 | resnet_tiny")
flags.DEFINE_float("width", 1.0, "ResNet width.")
flags.DEFINE_string("granularity", "weight", "weight | filter")
flags.DEFINE_integer("num_images", 512, "Importance sample size.")
flags.DEFINE_integer("naive_units", 1000, "Units timed with the naive loop.")
flags.DEFINE_integer("unit_chunk", 256, "Units per jitted call.")
flags.DEFINE_integer("sample_batch", 1024, "Images per jitted call.")
flags.DEFINE_string("out", None, "Optional JSON output path.")
FLAGS = flags.FLAGS


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv):
    del argv
    model = models.get_model(FLAGS.model, width=FLAGS.width)
    shape = (28, 28, 1) if FLAGS.model == "lenet" else (32, 32, 3)
    params, batch_stats = models.init_variables(model, jax.random.key(0), shape)
    images = jax.random.normal(jax.random.key(1), (FLAGS.num_images, *shape))
    labels = jax.random.randint(jax.random.key(2), (FLAGS.num_images,), 0, 10)
    spec = units.enumerate_units(params, FLAGS.granularity)
    kw = dict(unit_chunk=FLAGS.unit_chunk, sample_batch=FLAGS.sample_batch)

    start = time.perf_counter()
    fast = importance.ablation_importance(model, params, batch_stats, images, labels, spec, **kw)
    total = time.perf_counter() - start
    rss_fast = peak_rss_mb()
    layers = []
    for layer in spec.layers:  # per layer, compile included, as a user would see it
        ids = np.arange(layer.offset, layer.offset + layer.num_units)
        t = time.perf_counter()
        importance.ablation_importance(model, params, batch_stats, images, labels, spec,
                                       units=ids, **kw)  # fmt: skip
        seconds = time.perf_counter() - t
        layers.append({"layer": layer.name, "units": layer.num_units, "seconds": seconds,
                       "units_per_s": layer.num_units / seconds,
                       "strategy": importance.layer_strategy(model, spec, layer)})  # fmt: skip

    subset = np.linspace(0, spec.num_units - 1, min(FLAGS.naive_units, spec.num_units))
    subset = np.unique(subset.astype(np.int64))
    naive = importance.naive_importance(model, params, batch_stats, images, labels, spec, subset)
    naive_rate = subset.size / naive.seconds
    fast_sub = fast.accuracy_drop[subset]
    result = {
        "model": FLAGS.model, "width": FLAGS.width, "granularity": FLAGS.granularity,
        "units": spec.num_units, "images": FLAGS.num_images, "device": str(jax.devices()[0]),
        "fast_total_seconds": total, "fast_units_per_s": spec.num_units / total,
        "naive_units_per_s": naive_rate, "naive_extrapolated_seconds": spec.num_units / naive_rate,
        "speedup": (spec.num_units / total) / naive_rate,
        "units_differing": int(np.sum(fast_sub != naive.accuracy_drop)),
        "max_loss_diff": float(np.max(np.abs(fast.loss_increase[subset] - naive.loss_increase))),
        "peak_rss_mb_after_fast": rss_fast, "peak_rss_mb_after_naive": peak_rss_mb(),
        "layers": layers,
    }  # fmt: skip
    for row in layers:
        print(f"{row['layer']:>28} {row['strategy']:>6} {row['units']:>7} units "
              f"{row['units_per_s']:>10.0f}/s")  # fmt: skip
    print(json.dumps({k: v for k, v in result.items() if k != "layers"}, indent=2))
    if FLAGS.out:
        from tdu_jax import result_files

        result_files.write_json_atomic(FLAGS.out, result)


if __name__ == "__main__":
    app.run(main)
