"""Model zoo: LeNet-5 (MNIST) and CIFAR ResNets, all as chains of named stages."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tdu_jax.models.lenet import LeNet5
from tdu_jax.models.resnet import PADDINGS, ResNet, ResNet18, ResNetTiny, check_padding
from tdu_jax.models.stages import Stage, apply_stages, stage_variables

MODELS = ("lenet", "resnet18", "resnet_tiny")


def get_model(
    name: str,
    num_classes: int = 10,
    width: float = 1.0,
    dtype: Any = jnp.float32,
    conv_padding: str = "same",
):
    """Builds a model by name.

    Args:
      name: one of ``MODELS``.
      num_classes: number of logits.
      width: channel multiplier for ResNets (ignored by LeNet; must be > 0).
      dtype: ResNet computation dtype (parameters stay float32).
      conv_padding: ResNet 3x3 conv padding, one of ``PADDINGS`` (ignored by LeNet).

    Returns:
      An unbound ``flax.linen.Module`` with a ``stages()`` method.
    """
    if name not in MODELS:
        raise ValueError(f"model must be one of {', '.join(MODELS)}; got {name!r}")
    if not width > 0:
        raise ValueError(f"width must be > 0; got {width}")
    check_padding(conv_padding)
    if name == "lenet":
        return LeNet5(num_classes=num_classes)
    family = ResNet18 if name == "resnet18" else ResNetTiny
    if name == "resnet_tiny":
        width = width * 0.125
    return family(num_classes=num_classes, width=width, dtype=dtype, conv_padding=conv_padding)


def init_variables(model: nn.Module, key: jax.Array, image_shape: tuple[int, int, int]):
    """Initialises ``model`` on a dummy batch -> ``(params, batch_stats)``."""
    variables = model.init(key, jnp.zeros((1, *image_shape), jnp.float32), train=False)
    return variables["params"], variables.get("batch_stats", {})


__all__ = [
    "MODELS",
    "PADDINGS",
    "LeNet5",
    "ResNet",
    "ResNet18",
    "ResNetTiny",
    "Stage",
    "apply_stages",
    "get_model",
    "init_variables",
    "stage_variables",
]
