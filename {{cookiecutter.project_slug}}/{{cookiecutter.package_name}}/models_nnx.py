"""Models in Flax NNX, chosen by ``config.model.name``.

Every layer is named like its twin in the Linen variant of this template (``conv_0/kernel``,
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
from flax import nnx
from plugins import config_errors


class CNN(nnx.Module):
    """A small convolutional classifier.

    One ``3x3 conv -> relu -> 2x2 average pool`` per entry of ``features``, then
    ``dense -> relu -> head``.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        input_shape: Sequence[int],
        features: Sequence[int] = (32, 64),
        dense: int = 128,
        dtype: Any = jnp.float32,
        axis_name: str | None = None,
        rngs: nnx.Rngs,
    ):
        del axis_name  # no batch norm
        height, width, channels = input_shape
        self.num_convs = len(features)
        for i, out in enumerate(features):
            conv = nnx.Conv(channels, out, (3, 3), dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
            setattr(self, f"conv_{i}", conv)
            height, width, channels = height // 2, width // 2, out
        self.dense = nnx.Linear(
            height * width * channels, dense, dtype=dtype, param_dtype=jnp.float32, rngs=rngs
        )
        self.head = nnx.Linear(dense, num_classes, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Returns the logits of a batch of images ``(B, H, W, C)``."""
        for i in range(self.num_convs):
            x = nnx.relu(getattr(self, f"conv_{i}")(x))
            x = nnx.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        x = nnx.relu(self.dense(x))
        return self.head(x)


class ResidualBlock(nnx.Module):
    """Two 3x3 convolutions with batch norm and a (projected when needed) shortcut."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        strides: int,
        *,
        dtype: Any,
        axis_name: str | None,
        rngs: nnx.Rngs,
    ):
        def conv(cin: int, cout: int, kernel: int, stride: int) -> nnx.Conv:
            return nnx.Conv(
                cin, cout, (kernel, kernel), strides=(stride, stride), use_bias=False,
                dtype=dtype, param_dtype=jnp.float32, rngs=rngs,
            )  # fmt: skip

        def norm(channels: int) -> nnx.BatchNorm:
            return nnx.BatchNorm(
                channels, momentum=0.9, epsilon=1e-5, axis_name=axis_name,
                dtype=dtype, param_dtype=jnp.float32, rngs=rngs,
            )  # fmt: skip

        self.conv_0 = conv(in_channels, out_channels, 3, strides)
        self.bn_0 = norm(out_channels)
        self.conv_1 = conv(out_channels, out_channels, 3, 1)
        self.bn_1 = norm(out_channels)
        self.project = strides != 1 or in_channels != out_channels
        if self.project:
            self.proj_conv = conv(in_channels, out_channels, 1, strides)
            self.proj_bn = norm(out_channels)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the block."""
        y = nnx.relu(self.bn_0(self.conv_0(x)))
        y = self.bn_1(self.conv_1(y))
        if self.project:
            x = self.proj_bn(self.proj_conv(x))
        return nnx.relu(x + y)


class ResNet(nnx.Module):
    """A small ResNet for 32x32 images: a 3x3 stem, ``len(stage_sizes)`` stages of residual
    blocks (channels doubling and resolution halving from stage to stage), global average pool,
    linear head. Batch norm statistics are averaged over ``axis_name`` under pmap."""

    def __init__(
        self,
        *,
        num_classes: int,
        input_shape: Sequence[int],
        stage_sizes: Sequence[int] = (1, 1, 1),
        num_filters: int = 16,
        dtype: Any = jnp.float32,
        axis_name: str | None = None,
        rngs: nnx.Rngs,
    ):
        channels = input_shape[-1]
        self.stem_conv = nnx.Conv(
            channels, num_filters, (3, 3), use_bias=False, dtype=dtype,
            param_dtype=jnp.float32, rngs=rngs,
        )  # fmt: skip
        self.stem_bn = nnx.BatchNorm(
            num_filters, momentum=0.9, epsilon=1e-5, axis_name=axis_name, dtype=dtype,
            param_dtype=jnp.float32, rngs=rngs,
        )  # fmt: skip
        self.block_names: list[str] = []
        channels = num_filters
        for stage, size in enumerate(stage_sizes):
            for j in range(size):
                out = num_filters * 2**stage
                strides = 2 if stage > 0 and j == 0 else 1
                name = f"stage_{stage}_block_{j}"
                block = ResidualBlock(
                    channels, out, strides, dtype=dtype, axis_name=axis_name, rngs=rngs
                )
                setattr(self, name, block)
                self.block_names.append(name)
                channels = out
        self.head = nnx.Linear(
            channels, num_classes, dtype=dtype, param_dtype=jnp.float32, rngs=rngs
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """Returns the logits of a batch of images ``(B, H, W, C)``."""
        x = nnx.relu(self.stem_bn(self.stem_conv(x)))
        for name in self.block_names:
            x = getattr(self, name)(x)
        x = jnp.mean(x, axis=(1, 2))
        return self.head(x)


# name -> (class, its config keys besides ``name``, each with how its value is checked)
MODELS: dict[str, tuple[type[nnx.Module], dict[str, Any]]] = {
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
    input_shape: Sequence[int],
    dtype: Any = jnp.float32,
    axis_name: str | None = None,
    rngs: nnx.Rngs,
) -> nnx.Module:
    """Builds the model ``model_config.name`` names, with the other keys as its arguments.

    Args:
      model_config: ``ConfigDict`` with ``name`` and the model's options.
      num_classes: size of the output layer.
      input_shape: ``(H, W, C)`` of one image.
      dtype: computation dtype (bfloat16 for half precision); parameters stay float32.
      axis_name: the pmap axis to average batch norm statistics over (None under jit).
      rngs: parameter initialisation keys.
    """
    kwargs = check_model_config(model_config)
    cls = MODELS[model_config["name"]][0]
    return cls(
        num_classes=num_classes,
        input_shape=tuple(input_shape),
        dtype=dtype,
        axis_name=axis_name,
        rngs=rngs,
        **kwargs,
    )
