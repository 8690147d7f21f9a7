"""CIFAR-10 (32x32 colour images, 10 classes) with a small ResNet with batch norm.

Downloads CIFAR-10 through tfds on first use (needs network once; set ``data_dir`` to share it).
Best run on a GPU/TPU. Training batches are augmented the standard way (``config.augment``: pad 4
and random 32x32 crop, random horizontal flip, normalisation by CIFAR-10's per-channel mean and
std; evaluation normalises only). ResNet recipes of this kind (Flax's and the common PyTorch ones)
reach about 93-95% test accuracy on CIFAR-10 with this augmentation; this config's accuracy is
untested here (it was written without network access to the dataset), so expect that range, not a
measured figure.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    """Returns the CIFAR-10 config."""
    config = default.get_config()
    config.dataset = "cifar10"  # tfds name; the 'train' and 'test' splits are used
    # ResNet: 3x3 stem of 'num_filters' channels, then one stage per entry of 'stage_sizes'
    # (that many residual blocks each), channels doubling and resolution halving per stage.
    config.model = ml_collections.ConfigDict(
        dict(name="resnet", stage_sizes=(2, 2, 2), num_filters=32)
    )
    # Host-side augmentation of the training batches, in order (see plugins.augment); every draw
    # is seeded by (seed, step), so a resumed run sees the same batches. Evaluation applies only
    # 'normalize'. Add dict(name='mixup', alpha=0.2) or dict(name='cutmix') for soft labels.
    config.augment = [
        dict(name="crop", padding=4),  # zero-pad 4 pixels, random 32x32 crop
        dict(name="flip"),  # random horizontal flip (probability 0.5)
        # CIFAR-10's per-channel mean and std of the training images (in [0, 1]).
        dict(name="normalize", mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)),
    ]
    config.batch_size = 256  # global batch size
    config.eval_batch_size = 1000  # global evaluation batch size
    config.num_train_steps = 15_000  # about 77 epochs of 50k images
    config.log_every_steps = 100  # training metrics every 100 steps
    config.eval_every_steps = 1000  # test accuracy every 1000 steps and at the end
    config.checkpoint_every_steps = 1000  # checkpoint every 1000 steps and at the end
    config.half_precision = False  # True: bfloat16 compute (faster on GPU/TPU)
    config.optimizer = default.optimizer(
        name="sgd",  # SGD with Nesterov momentum, the classic ResNet recipe
        learning_rate=0.2,  # peak learning rate
        kwargs=dict(momentum=0.9, nesterov=True),  # further optax.sgd arguments
        schedule=dict(name="warmup_cosine", warmup_steps=500, end_value=0.0),
        weight_decay=5e-4,  # decoupled weight decay...
        weight_decay_mask="matrices",  # ...on kernels only (not biases or norm scales)
    )
    # Label smoothing regularises the classifier a little.
    config.loss = ml_collections.ConfigDict(dict(name="softmax_cross_entropy", label_smoothing=0.1))
    return config
