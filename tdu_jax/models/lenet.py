"""LeNet-5 for 28x28x1 images, built from chain stages (linear -> channel-wise post-op).

Parameters: 61,706. Layers: conv1 6@5x5 (SAME), max-pool 2, conv2 16@5x5 (VALID),
max-pool 2, dense1 120, dense2 84, dense3 (logits).
"""

import flax.linen as nn
import jax

from tdu_jax.models.layers import ConvStage, DenseStage
from tdu_jax.models.stages import Stage, call_stages


class LeNet5(nn.Module):
    """LeNet-5. ``__call__(x_Bx28x28x1, train) -> logits_BxC``; no BatchNorm."""

    num_classes: int = 10

    def stages(self) -> tuple[Stage, ...]:
        """The chain of stages (unbound modules; ``parent=None`` keeps them detached)."""
        return (
            Stage(
                "conv1", ConvStage(features=6, kernel_size=5, padding="SAME", pool=2, parent=None)
            ),
            Stage(
                "conv2", ConvStage(features=16, kernel_size=5, padding="VALID", pool=2, parent=None)
            ),
            Stage("dense1", DenseStage(features=120, relu=True, parent=None)),
            Stage("dense2", DenseStage(features=84, relu=True, parent=None)),
            Stage("dense3", DenseStage(features=self.num_classes, relu=False, parent=None)),
        )

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        return call_stages(self, self.stages(), x, train)
