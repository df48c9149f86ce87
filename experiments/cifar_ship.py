"""Unlearn the CIFAR-10 class `ship` from a CIFAR ResNet-18 by time-inspired decay.

    python -m experiments.cifar_ship --lambda=0.1 --preset=C7          # GPU: minutes
    python -m experiments.cifar_ship --width=0.25 --train_epochs=3     # CPU: scaled run
    python -m experiments.cifar_ship --model=resnet_tiny --max_train_examples=512 \\
        --max_test_examples=256 --train_epochs=1 --top_k=4              # smoke, seconds

Full width, 20 epochs: about 3 minutes of training on one H200 with
--compute_dtype=bfloat16 (about 50 minutes per epoch on 2 CPU cores).
"""

from experiments import common

# K (10% of filters) and dt: what the train-split sweep of `reproduce` chose on the
# H200 run (BUILD_NOTES.md).
DEFAULTS = dict(
    forget_class="ship", model="resnet18", lam=0.1, dt=1.0, decay_steps=16, top_k="0.1",
    granularity="filter", include=None, finetune_lr=0.01, train_epochs=20,
    train_optimizer="sgd", train_lr=0.1, train_weight_decay=5e-4, train_schedule="onecycle",
    augment=True, unit_chunk=32,
    sweep_top_k="0.01,0.02,0.05,0.1", sweep_dt="1,2,5,10", sweep_search_steps=6, calibrate=True,
)  # fmt: skip


if __name__ == "__main__":
    common.main_single("cifar10", DEFAULTS)
