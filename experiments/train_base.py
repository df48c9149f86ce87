"""Train and checkpoint a base model; print its test accuracy overall and per class.

    python -m experiments.train_base --dataset=mnist --model=lenet
    python -m experiments.train_base --dataset=cifar10 --model=resnet18 --compute_dtype=bfloat16
    python -m experiments.train_base --dataset=cifar10 --width=0.25 --train_epochs=3   # CPU

Defaults per dataset are those of ``mnist_lenet`` / ``cifar_ship``; the checkpoint
goes to ``<workdir>/base/<model>-<config hash>/`` and is reused when it exists (a
changed setting gives another hash, so a stale model is never picked up).
"""

from absl import app, flags

from experiments import cifar_ship, common, mnist_lenet
from tdu_jax import data

flags.DEFINE_enum("dataset", "mnist", list(data.DATASETS), "Dataset to train on.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    defaults = mnist_lenet.DEFAULTS if FLAGS.dataset == "mnist" else cifar_ship.DEFAULTS
    with common.bad_input():
        cfg = common.config_from_flags(FLAGS.dataset, defaults)
    _, _, _, _, _, base = common.prepare_base(cfg)
    names = data.class_names(cfg.dataset)
    print(f"base model: {base['checkpoint']}")
    print(f"test accuracy: {base['acc']['test_acc']:.2f}%")
    for name, acc in zip(names, base["per_class"], strict=True):
        print(f"  {name:>10}: {acc:6.2f}%")


if __name__ == "__main__":
    common.define_flags(**mnist_lenet.DEFAULTS)
    app.run(main)
