"""Peak memory of LeNet importance over all weights on the full forget class, per chunking.

    python -m benchmarks.importance_memory                                  # default grid
    python -m benchmarks.importance_memory --settings=256x1024,256x128 --all_units

Each (unit_chunk x sample_batch) setting runs in its own subprocess, so every peak
resident set size (RSS, from ``getrusage``) is that setting's alone. A child builds
LeNet-5 (random init: memory and speed do not depend on training), takes
``--num_images`` images (5,923 = MNIST's digit-0 train images, the main job's
importance sample; random pixels unless ``--data=mnist``) and scores the units.
Peak memory is set by the jitted chunk shapes, not by how many chunks run, so by
default each layer scores only its first ``--chunks_per_layer`` chunks over the whole
sample (every shape the full sweep compiles, in seconds); ``--all_units`` runs the
full sweep of 61,706 weights. Prints one JSON line per setting: peak RSS in MB, RSS
before importance (imports, data, model), seconds, and units scored.
"""

import json
import resource
import subprocess
import sys
import time

from absl import app, flags

flags.DEFINE_string("settings", "256x1024,256x512,256x256,256x128,128x256,64x256",
                    "Comma list of unit_chunk x sample_batch.")  # fmt: skip
flags.DEFINE_integer("num_images", 5923, "Importance sample size (MNIST digit-0 train images).")
flags.DEFINE_enum("data", "random", ["random", "mnist"], "Random pixels or the real digit 0.")
flags.DEFINE_integer("chunks_per_layer", 2, "Chunks scored per layer (without --all_units).")
flags.DEFINE_bool("all_units", False, "Score all 61,706 weights (the full sweep).")
flags.DEFINE_string("child", None, "Internal: run one setting (unit_chunk x sample_batch).")
flags.DEFINE_string("out", None, "Optional JSON output path (all settings).")
FLAGS = flags.FLAGS


def _rss_mb(who=resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # Linux: kilobytes


def _parse(setting: str) -> tuple[int, int]:
    unit_chunk, sample_batch = (int(v) for v in setting.lower().split("x"))
    return unit_chunk, sample_batch


def run_child(setting: str) -> dict:
    """Scores units with one chunking in this process; returns its measurements."""
    import jax
    import numpy as np

    from tdu_jax import data, importance, models, units

    unit_chunk, sample_batch = _parse(setting)
    model = models.get_model("lenet")
    params, batch_stats = models.init_variables(model, jax.random.key(0), (28, 28, 1))
    if FLAGS.data == "mnist":
        forget, _ = data.forget_retain(data.load_split("mnist", "train"), [0])
        forget = data.take(forget, min(FLAGS.num_images, forget.size))
        images, labels = data.to_float(forget.images, "mnist"), forget.labels
    else:
        images = jax.random.normal(jax.random.key(1), (FLAGS.num_images, 28, 28, 1))
        labels = np.zeros(FLAGS.num_images, np.int32)
    spec = units.enumerate_units(params, "weight")
    wanted = None
    if not FLAGS.all_units:
        per_layer = FLAGS.chunks_per_layer * unit_chunk
        wanted = np.concatenate([
            np.arange(layer.offset, layer.offset + min(layer.num_units, per_layer))
            for layer in spec.layers
        ])  # fmt: skip
    rss_before = _rss_mb()
    start = time.perf_counter()
    imp = importance.ablation_importance(model, params, batch_stats, images, labels, spec,
                                         units=wanted, unit_chunk=unit_chunk,
                                         sample_batch=sample_batch)  # fmt: skip
    return {
        "unit_chunk": unit_chunk, "sample_batch": sample_batch, "images": int(labels.shape[0]),
        "units": int(imp.units.size), "all_units": FLAGS.all_units, "data": FLAGS.data,
        "seconds": time.perf_counter() - start, "rss_before_mb": rss_before,
        "peak_rss_mb": _rss_mb(), "device": str(jax.devices()[0]),
    }  # fmt: skip


def main(argv):
    del argv
    if FLAGS.child:
        print(json.dumps(run_child(FLAGS.child)))
        return
    results = []
    for setting in FLAGS.settings.split(","):
        _parse(setting)  # fail early on a malformed setting
        args = [a for a in sys.argv[1:] if not a.startswith(("--settings", "--out"))]
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.importance_memory", f"--child={setting}", *args],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if proc.returncode != 0:
            raise RuntimeError(f"setting {setting} failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    app.run(main)
