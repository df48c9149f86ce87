"""Calibration-sweep benchmark: retain accuracy only where the rule needs it, against every
point scored, in one process.

    python -m benchmarks.sweep                    # LeNet/MNIST, digit 0, the table's grid
    python -m benchmarks.sweep --forget_class=7 --max_train_examples=0

Trains a LeNet briefly (``--train_epochs`` on ``--max_train_examples`` images; MNIST from
``--data_dir`` or ``$TFDS_DATA_DIR``), scores importance exactly on ``--importance_images``
forget images, then runs ``calibrate.sweep_decay`` on the table's grid twice: with every
point scored on forget and retain images (the baseline) and with retain scored only at the
points that silence the class (the default). Reports both times, their ratio, the points
scored on retain, and whether the two choose the same point (they must).
"""

import json
import time

import jax
from absl import app, flags

from experiments import common, config, mnist_lenet
from tdu_jax import calibrate, data, importance, models, train, units

flags.DEFINE_integer("forget_class", 0, "Digit to forget.")
flags.DEFINE_integer("max_train_examples", 20000, "Training images (0: all 60,000).")
flags.DEFINE_integer("train_epochs", 2, "Epochs of the briefly trained LeNet.")
flags.DEFINE_integer("importance_images", 300, "Forget images scored for importance.")
flags.DEFINE_string("data_dir", None, "TFDS directory (else $TFDS_DATA_DIR).")
flags.DEFINE_string("out", None, "Optional JSON output path.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    split = data.load_split("mnist", "train", data.resolve_data_dir(FLAGS.data_dir))
    if FLAGS.max_train_examples:
        split = data.Split(split.images[: FLAGS.max_train_examples],
                           split.labels[: FLAGS.max_train_examples])  # fmt: skip
    model = models.get_model("lenet")
    params, bs = models.init_variables(model, jax.random.key(0), data.image_shape("mnist"))
    opt = train.OptimizerConfig(name="adam", learning_rate=2e-3, schedule="cosine")
    params, bs, _ = train.train(model, params, bs, split, dataset="mnist", config=opt,
                                epochs=FLAGS.train_epochs, batch_size=128,
                                key=jax.random.key(1))  # fmt: skip
    forget, retain = data.forget_retain(split, [FLAGS.forget_class])
    spec = units.enumerate_units(params, "weight")
    sample = forget.images[: FLAGS.importance_images]
    imp = importance.ablation_importance(
        model, params, bs, data.to_float(sample, "mnist"),
        forget.labels[: FLAGS.importance_images], spec,
    )  # fmt: skip
    table = mnist_lenet.DEFAULTS
    kwargs = dict(dataset="mnist", forget_train=forget,
                  retain_train=calibrate.subsample(
                      retain, config.default("sweep_retain_sample"), 0),
                  imp=imp, spec=spec, top_ks=common.parse_number_list(
                      "sweep_top_k", table["sweep_top_k"], common.parse_top_k),
                  dts=common.parse_number_list("sweep_dt", table["sweep_dt"]),
                  lam=0.1, decay_steps=7, forget_max=table["sweep_forget_max"],
                  search_steps=table["sweep_search_steps"])  # fmt: skip
    calibrate.sweep_decay(model, params, bs, **{**kwargs, "top_ks": [10]})  # compile once
    out = {}
    for name, retain_all in (("every_point", True), ("where_needed", False)):
        start = time.perf_counter()
        sweep = calibrate.sweep_decay(model, params, bs, **kwargs, retain_all_points=retain_all)
        out[name] = {
            "seconds": time.perf_counter() - start,
            "points": len(sweep["points"]),
            "retain_scored": sum(p["retain_train_acc"] is not None for p in sweep["points"]),
            "chosen": sweep["chosen_point"],
        }
    out["ratio"] = out["every_point"]["seconds"] / out["where_needed"]["seconds"]
    out["same_choice"] = out["every_point"]["chosen"] == out["where_needed"]["chosen"]
    out["images"] = {"forget": forget.size, "retain": kwargs["retain_train"].size}
    out["device"] = str(jax.devices()[0].device_kind)
    print(json.dumps(out, indent=1, default=float))
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump(out, f, indent=1, default=float)
    if not out["same_choice"]:
        raise SystemExit("the two sweeps chose different points")


if __name__ == "__main__":
    app.run(main)
