"""Models in Flax NNX, chosen by ``config.model.name``.

Every layer is named like its twin in the Linen variant of this template (``conv_0/kernel``,
``dense/kernel``, ``head/bias``, ``stage_1_block_0/bn_0/scale``...), so parameters map one to one
between the two APIs and the same config trains the same network in both.

Add a model: write the module, then register it in ``MODELS`` with the config keys it takes
and how each is checked. A model is called as ``model(images, dropout_key=key)``: the train
step gives a key per step (deterministic in (seed, step)); evaluation gives none.
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

    def __call__(self, x: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
        """Returns the logits of a batch of images ``(B, H, W, C)`` (no dropout here)."""
        del dropout_key
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

    def __call__(self, x: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
        """Returns the logits of a batch of images ``(B, H, W, C)`` (no dropout here)."""
        del dropout_key
        x = nnx.relu(self.stem_bn(self.stem_conv(x)))
        for name in self.block_names:
            x = getattr(self, name)(x)
        x = jnp.mean(x, axis=(1, 2))
        return self.head(x)


class EncoderBlock(nnx.Module):
    """A pre-norm transformer block: ``x + attention(norm(x))``, then ``x + mlp(norm(x))``, with
    dropout after the attention, inside the MLP and after it (given a ``dropout_key``)."""

    def __init__(
        self, width: int, num_heads: int, mlp_dim: int, dropout: float, *, dtype: Any,
        rngs: nnx.Rngs,
    ):  # fmt: skip
        kw = dict(dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        self.norm_0 = nnx.LayerNorm(width, **kw)
        self.attn = nnx.MultiHeadAttention(
            num_heads=num_heads, in_features=width, decode=False, keep_rngs=False, **kw
        )
        self.norm_1 = nnx.LayerNorm(width, **kw)
        self.mlp_0 = nnx.Linear(width, mlp_dim, **kw)
        self.mlp_1 = nnx.Linear(mlp_dim, width, **kw)
        self.dropout = nnx.Dropout(dropout)

    def __call__(self, x: jax.Array, dropout_key: jax.Array | None) -> jax.Array:
        """Applies the block; without a ``dropout_key``, no dropout."""
        keys = jax.random.split(dropout_key, 3) if dropout_key is not None else [None] * 3

        def drop(y: jax.Array, key: jax.Array | None) -> jax.Array:
            return y if key is None else self.dropout(y, rngs=key)

        x = x + drop(self.attn(self.norm_0(x)), keys[0])
        y = drop(nnx.gelu(self.mlp_0(self.norm_1(x))), keys[1])
        return x + drop(self.mlp_1(y), keys[2])


class ViT(nnx.Module):
    """A Vision Transformer: ``patch_size`` x ``patch_size`` patches embedded to ``width``, a
    class token (``pool='cls'``) or mean pooling (``'mean'``), learnt position embeddings,
    ``depth`` pre-norm blocks stacked along a leading axis and applied with ``nnx.scan``
    (compiled once, whatever the depth; ``remat=True`` recomputes each block's activations in
    the backward pass instead of keeping them), a final norm and a linear head."""

    def __init__(
        self,
        *,
        num_classes: int,
        input_shape: Sequence[int],
        patch_size: int = 2,
        width: int = 64,
        depth: int = 2,
        num_heads: int = 4,
        mlp_ratio: int = 4,
        dropout: float = 0.0,
        pool: str = "cls",
        remat: bool = False,
        dtype: Any = jnp.float32,
        axis_name: str | None = None,
        rngs: nnx.Rngs,
    ):
        del axis_name  # no batch norm
        height, width_px, channels = input_shape
        kw = dict(dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        self.depth, self.pool, self.remat = depth, pool, remat
        patch = (patch_size, patch_size)
        self.embed = nnx.Conv(channels, width, patch, strides=patch, padding="VALID", **kw)
        tokens = (height // patch_size) * (width_px // patch_size) + (pool == "cls")
        init = nnx.initializers.normal(0.02)
        self.pos_embedding = nnx.Param(init(rngs.params(), (1, tokens, width), jnp.float32))
        if pool == "cls":
            self.cls = nnx.Param(jnp.zeros((1, 1, width), jnp.float32))

        @nnx.split_rngs(splits=depth)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create_blocks(rngs: nnx.Rngs) -> EncoderBlock:
            return EncoderBlock(
                width, num_heads, width * mlp_ratio, dropout, dtype=dtype, rngs=rngs
            )

        self.blocks = create_blocks(rngs)
        self.norm = nnx.LayerNorm(width, **kw)
        self.head = nnx.Linear(width, num_classes, **kw)

    def __call__(self, x: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
        """Returns the logits of a batch of images ``(B, H, W, C)``; dropout only with a
        ``dropout_key`` (the train step gives one per step)."""
        x = self.embed(x)
        batch, height, width, channels = x.shape
        x = x.reshape(batch, height * width, channels)
        if self.pool == "cls":
            cls = jnp.broadcast_to(self.cls[...].astype(x.dtype), (batch, 1, channels))
            x = jnp.concatenate([cls, x], axis=1)
        x = x + self.pos_embedding[...].astype(x.dtype)
        keys = None if dropout_key is None else jax.random.split(dropout_key, self.depth)

        def apply(x: jax.Array, block: EncoderBlock, key: jax.Array | None) -> jax.Array:
            return block(x, key)

        if self.remat:
            apply = nnx.remat(apply)
        in_axes = (nnx.Carry, 0, None if keys is None else 0)
        scan = nnx.scan(apply, in_axes=in_axes, out_axes=nnx.Carry)
        x = scan(x, self.blocks, keys)
        x = self.norm(x)
        x = x[:, 0] if self.pool == "cls" else x.mean(axis=1)
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
