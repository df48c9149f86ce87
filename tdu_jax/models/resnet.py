"""ResNet for CIFAR (3x3 stem, no max-pool, BasicBlocks), as named stages.

Stages: ``stem``, ``stage{i}_block{j}`` (i, j from 1), ``head``. Inside a block:
``conv1``/``bn1``, ``conv2``/``bn2`` and, where the shape changes, ``proj_conv``/
``proj_bn``. Every conv is bias-free and followed by the BatchNorm whose name
swaps ``conv`` for ``bn`` (the unit code relies on that pairing).
ResNet18 (width 1): 11,173,962 parameters.

``conv_padding`` sets how the 3x3 convs pad: ``"same"`` is Flax's (and TensorFlow's) SAME,
which on a stride-2 conv pads one pixel after and none before, so the output's pixel i looks
at input pixels 2i..2i+2 while the 1x1 stride-2 shortcut takes pixel 2i; ``"symmetric"`` pads
one pixel on every side, as PyTorch's CIFAR ResNets do, and centres both branches on 2i.
"""

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tdu_jax.models.stages import Stage, call_stages

_conv = functools.partial(nn.Conv, use_bias=False, kernel_init=nn.initializers.he_normal())
PADDINGS = ("same", "symmetric")


def check_padding(conv_padding: str) -> str:
    """``conv_padding`` if it is one of ``PADDINGS``, else a ValueError naming them."""
    if conv_padding not in PADDINGS:
        raise ValueError(f"conv_padding must be one of {', '.join(PADDINGS)}; got {conv_padding!r}")
    return conv_padding


def _pad3x3(conv_padding: str) -> str | tuple:
    return "SAME" if conv_padding == "same" else ((1, 1), (1, 1))


def _bn(train: bool, name: str, dtype: Any) -> nn.BatchNorm:
    return nn.BatchNorm(
        use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype, name=name
    )


class Stem(nn.Module):
    channels: int
    dtype: Any = jnp.float32
    conv_padding: str = "same"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        conv = _conv(self.channels, (3, 3), padding=_pad3x3(self.conv_padding), dtype=self.dtype,
                     name="conv")  # fmt: skip
        x = conv(x.astype(self.dtype))
        return nn.relu(_bn(train, "bn", self.dtype)(x))


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual; a 1x1 projection when stride or width change."""

    channels: int
    stride: int = 1
    dtype: Any = jnp.float32
    conv_padding: str = "same"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        s, pad = (self.stride, self.stride), _pad3x3(self.conv_padding)
        y = _conv(self.channels, (3, 3), s, padding=pad, dtype=self.dtype, name="conv1")(x)
        y = nn.relu(_bn(train, "bn1", self.dtype)(y))
        y = _conv(self.channels, (3, 3), padding=pad, dtype=self.dtype, name="conv2")(y)
        y = _bn(train, "bn2", self.dtype)(y)
        shortcut = x
        if self.stride != 1 or x.shape[-1] != self.channels:
            shortcut = _conv(self.channels, (1, 1), s, dtype=self.dtype, name="proj_conv")(x)
            shortcut = _bn(train, "proj_bn", self.dtype)(shortcut)
        return nn.relu(y + shortcut)


class Head(nn.Module):
    num_classes: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        return nn.Dense(self.num_classes, name="dense")(x)


def channels_for(base: int, width: float) -> int:
    return max(1, int(round(base * width)))


class ResNet(nn.Module):
    """CIFAR ResNet. ``__call__(x_BxHxWx3, train) -> logits_BxC`` (float32 logits).

    Attributes:
      stage_sizes: blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18.
      num_classes: number of logits.
      width: channel multiplier (1.0 -> 64-128-256-512).
      dtype: computation dtype (parameters stay float32), e.g. jnp.bfloat16 on GPU.
      conv_padding: "same" or "symmetric" padding of the 3x3 convs (module docstring).
    """

    stage_sizes: Sequence[int]
    num_classes: int = 10
    width: float = 1.0
    dtype: Any = jnp.float32
    conv_padding: str = "same"

    def stages(self) -> tuple[Stage, ...]:
        common = dict(dtype=self.dtype, conv_padding=check_padding(self.conv_padding), parent=None)
        out = [Stage("stem", Stem(channels_for(64, self.width), **common))]
        for i, size in enumerate(self.stage_sizes):
            channels = channels_for(64 * 2**i, self.width)
            for j in range(size):
                stride = 2 if i > 0 and j == 0 else 1
                block = BasicBlock(channels, stride, **common)
                out.append(Stage(f"stage{i + 1}_block{j + 1}", block))
        out.append(Stage("head", Head(self.num_classes, parent=None)))
        return tuple(out)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        return call_stages(self, self.stages(), x, train)


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2))
# Tiny variant for tests: two stages of one block, 8 and 16 channels.
ResNetTiny = functools.partial(ResNet, stage_sizes=(1, 1), width=0.125)
