"""Chain layers: a linear map (conv or dense) followed by a channel-wise post-op.

Each stage keeps ``kernel`` and ``bias`` directly under its own name, and its math
is split into ``*_linear`` (pre-activation) and ``*_post`` (ReLU / max-pool),
which are pure functions the fast importance path reuses. Because the post-op
acts on each channel separately, removing a unit of output channel ``c`` changes
only channel ``c`` of the stage output.
"""

import flax.linen as nn
import jax


def conv_linear(kernel_KxKxIxO: jax.Array, bias_O: jax.Array, x_BxHxWxI: jax.Array, padding: str):
    """Stride-1 convolution plus bias -> ``h_BxH'xW'xO``."""
    h = jax.lax.conv_general_dilated(
        x_BxHxWxI, kernel_KxKxIxO, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return h + bias_O


def conv_post(h_BxHxWxC: jax.Array, pool: int) -> jax.Array:
    """ReLU then non-overlapping max-pool of size ``pool`` (1 = none)."""
    y = nn.relu(h_BxHxWxC)
    if pool > 1:
        y = nn.max_pool(y, (pool, pool), strides=(pool, pool))
    return y


def dense_linear(kernel_IxO: jax.Array, bias_O: jax.Array, x: jax.Array) -> jax.Array:
    """Flattens ``x`` to ``B x I`` and applies ``x @ kernel + bias`` -> ``h_BxO``."""
    return x.reshape(x.shape[0], -1) @ kernel_IxO + bias_O


def dense_post(h_BxO: jax.Array, relu: bool) -> jax.Array:
    return nn.relu(h_BxO) if relu else h_BxO


class ConvStage(nn.Module):
    """Conv (stride 1, ``padding`` 'SAME' or 'VALID') -> ReLU -> max-pool ``pool``."""

    features: int
    kernel_size: int
    padding: str = "SAME"
    pool: int = 2

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train
        k = self.kernel_size
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (k, k, x.shape[-1], self.features)
        )
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        return conv_post(conv_linear(kernel, bias, x, self.padding), self.pool)


class DenseStage(nn.Module):
    """Flatten -> dense ``features`` -> optional ReLU."""

    features: int
    relu: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train
        fan_in = 1
        for d in x.shape[1:]:
            fan_in *= d
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (fan_in, self.features))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        return dense_post(dense_linear(kernel, bias, x), self.relu)


def is_chain_stage(module: nn.Module) -> bool:
    return isinstance(module, (ConvStage, DenseStage))


__all__ = [
    "ConvStage",
    "DenseStage",
    "conv_linear",
    "conv_post",
    "dense_linear",
    "dense_post",
    "is_chain_stage",
]
