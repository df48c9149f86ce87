"""Compile every jitted function of the CIFAR reference run at its real shapes.

Run on the GPU machine against the ``--placeholder`` cache of ``cifar_pack.py``
(real labels, so every split has its real size) with the persistent compilation
cache on (``JAX_COMPILATION_CACHE_DIR``); the real run that follows then loads the
executables instead of compiling them. Also times the LeNet importance sweep on this
device against the naive loop. Takes the same flags as ``experiments.reproduce``.

    python scripts/gpu_warmup.py --compute_dtype=bfloat16 --workdir=/tmp/warm --out=$OUT
"""

import dataclasses
import pathlib
import sys
import time

import jax
import numpy as np
from absl import app, flags, logging

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from experiments import cifar_ship, common  # noqa: E402
from tdu_jax import data, decay, importance, models, result_files, train, units  # noqa: E402

flags.DEFINE_string("out", None, "Folder for the LeNet benchmark JSON.")
FLAGS = flags.FLAGS


def lenet_benchmark(out: str | None) -> None:
    model = models.get_model("lenet")
    params, _ = models.init_variables(model, jax.random.key(0), (28, 28, 1))
    x = jax.random.normal(jax.random.key(1), (512, 28, 28, 1))
    y = jax.random.randint(jax.random.key(2), (512,), 0, 10)
    spec = units.enumerate_units(params, "weight")
    start = time.perf_counter()
    fast = importance.ablation_importance(model, params, {}, x, y, spec, unit_chunk=1024)
    fast_s = time.perf_counter() - start
    subset = np.arange(0, spec.num_units, 61)
    naive = importance.naive_importance(model, params, {}, x, y, spec, subset)
    rate_naive = subset.size / naive.seconds
    result = {
        "device": str(jax.devices()[0]), "units": spec.num_units, "fast_seconds": fast_s,
        "fast_units_per_s": spec.num_units / fast_s, "naive_units_per_s": rate_naive,
        "speedup": spec.num_units / fast_s / rate_naive,
        "max_acc_drop_diff": float(np.abs(fast.accuracy_drop[subset] - naive.accuracy_drop).max()),
    }  # fmt: skip
    logging.info("LeNet importance benchmark: %s", result)
    if out:
        result_files.write_json_atomic(pathlib.Path(out) / "bench_lenet_gpu.json", result)


def main(argv):
    del argv
    start = time.perf_counter()
    cfg = common.config_from_flags("cifar10", cifar_ship.DEFAULTS)
    train_split, test_split = common.load_data(cfg)
    model = common.build_model(cfg)
    params, bs = models.init_variables(model, jax.random.key(0), data.image_shape("cifar10"))
    params, bs, _ = train.train(
        model, params, bs, train_split, dataset="cifar10", config=common.base_optimizer(cfg),
        epochs=1, batch_size=cfg.train_batch_size, key=jax.random.key(1),
        augment=cfg.augment, eval_split=test_split,
    )  # fmt: skip
    logging.info("warm: trained 1 epoch at %.0f s", time.perf_counter() - start)
    common.accuracies(model, params, bs, cfg, train_split, test_split)
    spec = units.enumerate_units(params, "filter", include_bn=cfg.include_bn)
    first_chunks = np.concatenate(
        [np.arange(x.offset, x.offset + min(x.num_units, cfg.unit_chunk)) for x in spec.layers]
    )
    samples = {
        "forget": common.importance_sample(cfg, train_split),
        **{
            row: common.importance_sample(common.apply_preset(cfg, row), train_split)
            for row in ("C9", "C10")
        },
    }
    for name, sample in samples.items():
        importance.ablation_importance(
            model, params, bs, data.to_float(sample.images, "cifar10"), sample.labels, spec,
            units=first_chunks, unit_chunk=cfg.unit_chunk, sample_batch=cfg.sample_batch,
        )  # fmt: skip
        logging.info("warm: importance %s (%d images) at %.0f s", name, sample.size,
                     time.perf_counter() - start)  # fmt: skip
    _, retain = data.forget_retain(train_split, cfg.forget_class)
    ucfg = common.unlearn_config(
        dataclasses.replace(cfg, finetune="after_each", finetune_batches=2), None
    )
    train.fine_tune(
        model, params, bs, retain, dataset="cifar10", config=ucfg.finetune_optimizer,
        num_batches=2, batch_size=cfg.batch_size, key=jax.random.key(2), augment=cfg.augment,
    )  # fmt: skip
    decay.decay(params, units.unit_mask(params, spec, first_chunks), 0.1, 1.0, 1)
    logging.info("warm: done at %.0f s", time.perf_counter() - start)
    lenet_benchmark(FLAGS.out)


if __name__ == "__main__":
    common.define_flags(**cifar_ship.DEFAULTS)
    app.run(main)
