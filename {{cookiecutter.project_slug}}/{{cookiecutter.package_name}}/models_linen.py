"""Models in Flax Linen, chosen by ``config.model.name``.

Every layer is named like its twin in the NNX variant of this template (``conv_0/kernel``,
``dense/kernel``, ``head/bias``, ``stage_1_block_0/bn_0/scale``...), so parameters map one to one
between the two APIs and the same config trains the same network in both.

Add a model: write the module, then register it in ``MODELS`` with the config keys it takes
and how each is checked.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from plugins import config_errors


class CNN(nn.Module):
    """A small convolutional classifier.

    One ``3x3 conv -> relu -> 2x2 average pool`` per entry of ``features``, then
    ``dense -> relu -> head``.
    """

    num_classes: int
    features: Sequence[int] = (32, 64)
    dense: int = 128
    dtype: Any = jnp.float32
    axis_name: str | None = None  # no batch norm

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        """Returns the logits of a batch of images ``(B, H, W, C)``."""
        del train
        for i, out in enumerate(self.features):
            x = nn.Conv(out, (3, 3), dtype=self.dtype, name=f"conv_{i}")(x)
            x = nn.avg_pool(nn.relu(x), window_shape=(2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(self.dense, dtype=self.dtype, name="dense")(x))
        return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and a (projected when needed) shortcut."""

    out_channels: int
    strides: int
    dtype: Any
    axis_name: str | None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """Applies the block."""

        def conv(cout: int, kernel: int, stride: int, name: str) -> nn.Conv:
            return nn.Conv(
                cout, (kernel, kernel), strides=(stride, stride), use_bias=False,
                dtype=self.dtype, name=name,
            )  # fmt: skip

        def norm(name: str) -> nn.BatchNorm:
            return nn.BatchNorm(
                use_running_average=not train, momentum=0.9, epsilon=1e-5,
                axis_name=self.axis_name, dtype=self.dtype, name=name,
            )  # fmt: skip

        y = nn.relu(norm("bn_0")(conv(self.out_channels, 3, self.strides, "conv_0")(x)))
        y = norm("bn_1")(conv(self.out_channels, 3, 1, "conv_1")(y))
        if self.strides != 1 or x.shape[-1] != self.out_channels:
            x = norm("proj_bn")(conv(self.out_channels, 1, self.strides, "proj_conv")(x))
        return nn.relu(x + y)


class ResNet(nn.Module):
    """A small ResNet for 32x32 images: a 3x3 stem, ``len(stage_sizes)`` stages of residual
    blocks (channels doubling and resolution halving from stage to stage), global average pool,
    linear head. Batch norm statistics are averaged over ``axis_name`` under pmap."""

    num_classes: int
    stage_sizes: Sequence[int] = (1, 1, 1)
    num_filters: int = 16
    dtype: Any = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        """Returns the logits of a batch of images ``(B, H, W, C)``."""
        x = nn.Conv(self.num_filters, (3, 3), use_bias=False, dtype=self.dtype, name="stem_conv")(x)
        x = nn.BatchNorm(
            use_running_average=not train, momentum=0.9, epsilon=1e-5,
            axis_name=self.axis_name, dtype=self.dtype, name="stem_bn",
        )(x)  # fmt: skip
        x = nn.relu(x)
        for stage, size in enumerate(self.stage_sizes):
            for j in range(size):
                x = ResidualBlock(
                    self.num_filters * 2**stage,
                    strides=2 if stage > 0 and j == 0 else 1,
                    dtype=self.dtype,
                    axis_name=self.axis_name,
                    name=f"stage_{stage}_block_{j}",
                )(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)


# name -> (class, its config keys besides ``name``, each with how its value is checked)
MODELS: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    "cnn": (
        CNN,
        {"features": config_errors.check_positive_ints, "dense": config_errors.check_positive_int},
    ),
    "resnet": (
        ResNet,
        {
            "stage_sizes": config_errors.check_positive_ints,
            "num_filters": config_errors.check_positive_int,
        },
    ),
}


def check_model_config(model_config: Any) -> dict[str, Any]:
    """Returns the model's keyword arguments; raises ``ConfigError`` for an unknown model or key,
    or a bad value."""
    choices = {name: options for name, (_, options) in MODELS.items()}
    return config_errors.check_named(model_config, choices, "model", "model")


def create_model(
    model_config: Any,
    *,
    num_classes: int,
    dtype: Any = jnp.float32,
    axis_name: str | None = None,
) -> nn.Module:
    """Builds the model ``model_config.name`` names, with the other keys as its arguments.

    Args:
      model_config: ``ConfigDict`` with ``name`` and the model's options.
      num_classes: size of the output layer.
      dtype: computation dtype (bfloat16 for half precision); parameters stay float32.
      axis_name: the pmap axis to average batch norm statistics over (None under jit).
    """
    kwargs = check_model_config(model_config)
    cls = MODELS[model_config["name"]][0]
    return cls(num_classes=num_classes, dtype=dtype, axis_name=axis_name, **kwargs)
