"""CIFAR-10 with a small Vision Transformer: 4x4 patches (64 tokens and a class token), width
192, 6 blocks of 3 heads, dropout 0.1, AdamW.

Downloads CIFAR-10 through tfds on first use, like ``configs/cifar10.py``. Best run on a GPU or
TPU with ``--config.half_precision=True``; ``--config.model.remat=True`` trades compute for
activation memory, and in a jit project ``--config.mesh.fsdp=N`` splits the parameters and
optimizer state over N devices.

For ImageNet-size input (224x224), the ViT-S/16 of the ViT papers is
``model = dict(name='vit', patch_size=16, width=384, depth=12, num_heads=6, mlp_ratio=4,
dropout=0.0, pool='cls')`` (196 patches and a class token, about 22M parameters), with a global
batch of 1024, AdamW at learning rate 1e-3 with weight decay 0.05 to 0.1, 10k warmup steps, and
bfloat16 compute; it needs an input pipeline that resizes images to 224x224.
"""

import ml_collections

from configs import cifar10, default


def get_config() -> ml_collections.ConfigDict:
    """Returns the ViT on CIFAR-10 config."""
    config = cifar10.get_config()
    config.model = ml_collections.ConfigDict(
        dict(
            name="vit",
            patch_size=4,  # 32x32 images: 8x8 = 64 patches
            width=192,  # embedding size
            depth=6,  # transformer blocks (stacked and scanned: compiled once)
            num_heads=3,  # attention heads (width must divide into them)
            mlp_ratio=4,  # MLP hidden size = mlp_ratio * width
            dropout=0.1,  # after attention and in the MLP, in training
            pool="cls",  # 'cls': a class token; 'mean': mean over the patches
            remat=False,  # True: recompute block activations in the backward pass
        )
    )
    config.optimizer = default.optimizer(
        name="adamw",
        learning_rate=1e-3,
        schedule=dict(name="warmup_cosine", warmup_steps=1000, end_value=1e-5),
        weight_decay=0.05,  # on matrices (kernels, position embeddings), not biases or norms
        clip_global_norm=1.0,  # transformers train more stably with clipped gradients
    )
    return config
