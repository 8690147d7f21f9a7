"""Models in Flax Linen, chosen by ``config.model.name``.

Every layer is named like its twin in the NNX variant of this template (``conv_0/kernel``,
``dense/kernel``, ``head/bias``, ``stage_1_block_0/bn_0/scale``...), so parameters map one to one
between the two APIs and the same config trains the same network in both.

Add a model: write the module, then register it in ``MODELS`` with the config keys it takes
and how each is checked. A model is called as ``model.apply(variables, images, train=...)``; in
training the step gives a ``'dropout'`` rng (deterministic in (seed, step)).
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


class EncoderBlock(nn.Module):
    """A pre-norm transformer block: ``x + attention(norm(x))``, then ``x + mlp(norm(x))``, with
    dropout after the attention, inside the MLP and after it (in training)."""

    width: int
    num_heads: int
    mlp_dim: int
    dropout: float
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, None]:
        """Applies the block (``nn.scan``'s carry in and out)."""
        drop = nn.Dropout(self.dropout, deterministic=not train)
        y = nn.LayerNorm(dtype=self.dtype, name="norm_0")(x)
        y = nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads, dtype=self.dtype, deterministic=True, name="attn"
        )(y, y)
        x = x + drop(y)
        y = nn.LayerNorm(dtype=self.dtype, name="norm_1")(x)
        y = drop(nn.gelu(nn.Dense(self.mlp_dim, dtype=self.dtype, name="mlp_0")(y)))
        return x + drop(nn.Dense(self.width, dtype=self.dtype, name="mlp_1")(y)), None


class ViT(nn.Module):
    """A Vision Transformer: ``patch_size`` x ``patch_size`` patches embedded to ``width``, a
    class token (``pool='cls'``) or mean pooling (``'mean'``), learnt position embeddings,
    ``depth`` pre-norm blocks stacked along a leading axis and applied with ``nn.scan``
    (compiled once, whatever the depth; ``remat=True`` recomputes each block's activations in
    the backward pass instead of keeping them), a final norm and a linear head. Dropout draws
    from the ``'dropout'`` rng the train step gives."""

    num_classes: int
    patch_size: int = 2
    width: int = 64
    depth: int = 2
    num_heads: int = 4
    mlp_ratio: int = 4
    dropout: float = 0.0
    pool: str = "cls"
    remat: bool = False
    dtype: Any = jnp.float32
    axis_name: str | None = None  # no batch norm

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        """Returns the logits of a batch of images ``(B, H, W, C)``."""
        patch = (self.patch_size, self.patch_size)
        x = nn.Conv(
            self.width, patch, strides=patch, padding="VALID", dtype=self.dtype, name="embed"
        )(x)
        batch, height, width, channels = x.shape
        x = x.reshape(batch, height * width, channels)
        if self.pool == "cls":
            cls = self.param("cls", nn.initializers.zeros, (1, 1, channels), jnp.float32)
            x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (batch, 1, channels)), x], 1)
        init = nn.initializers.normal(0.02)
        x = x + self.param("pos_embedding", init, (1, *x.shape[1:]), jnp.float32).astype(x.dtype)
        block = nn.remat(EncoderBlock, static_argnums=(2,)) if self.remat else EncoderBlock
        blocks = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=nn.broadcast,
            length=self.depth,
        )
        mlp_dim = self.width * self.mlp_ratio
        x, _ = blocks(self.width, self.num_heads, mlp_dim, self.dropout, self.dtype, name="blocks")(
            x, train
        )
        x = nn.LayerNorm(dtype=self.dtype, name="norm")(x)
        x = x[:, 0] if self.pool == "cls" else x.mean(axis=1)
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
    "vit": (
        ViT,
        {
            "patch_size": config_errors.check_positive_int,
            "width": config_errors.check_positive_int,
            "depth": config_errors.check_positive_int,
            "num_heads": config_errors.check_positive_int,
            "mlp_ratio": config_errors.check_positive_int,
            "dropout": config_errors.check_fraction,
            "pool": config_errors.check_one_of("cls", "mean"),
            "remat": config_errors.check_bool,
        },
    ),
}


def check_model_config(model_config: Any) -> dict[str, Any]:
    """Returns the model's keyword arguments; raises ``ConfigError`` for an unknown model or key,
    or a bad value."""
    choices = {name: options for name, (_, options) in MODELS.items()}
    kwargs = config_errors.check_named(model_config, choices, "model", "model")
    width, heads = kwargs.get("width", 64), kwargs.get("num_heads", 4)
    if model_config["name"] == "vit" and width % heads:
        raise config_errors.ConfigError(
            f"model.width={width} does not split into model.num_heads={heads} heads"
        )
    return kwargs


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
