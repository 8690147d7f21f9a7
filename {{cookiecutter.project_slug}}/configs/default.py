"""Default config: a small CNN on the offline ``digits`` dataset (8x8 grayscale, 10 classes).

Needs no network (the data ships with scikit-learn) and reaches about 98% test accuracy in
seconds on a CPU. Override any key on the command line, e.g. ``--config.num_train_steps=1000``.
"""

import ml_collections
from ml_collections import config_dict


def optimizer(**keys: object) -> ml_collections.ConfigDict:
    """An optimizer config (``plugins.optim.create``) holding every key, ``keys`` changed.

    The config is locked, so a key can be set with ``--config.optimizer.<key>=...`` only if it
    is here; unset numbers are typed placeholders (``None`` until set). ``kwargs`` (the optax
    function's own arguments) takes the keys a config file gives it.
    """
    defaults = dict(
        # Any optax or optax.contrib optimizer by name ('adamw', 'sgd', 'lion', 'muon', ...).
        name="adamw",
        # The peak learning rate.
        learning_rate=1e-3,
        # Further keyword arguments of that optax function, e.g. dict(b2=0.95).
        kwargs=dict(),
        # The learning-rate schedule; None or dict(name="constant"): constant. To switch it on
        # the command line, give the whole dict: --config.optimizer.schedule="{'name': 'constant'}".
        schedule=dict(name="warmup_cosine", warmup_steps=50, end_value=1e-5),
        # Decoupled weight decay on the parameters weight_decay_mask selects; None: the
        # optimizer's own default.
        weight_decay=config_dict.placeholder(float),
        # 'matrices' (rank >= 2: kernels), 'all', or path regexes.
        weight_decay_mask="matrices",
        # Clip gradients to this global norm, and/or every element to [-v, v], first.
        clip_global_norm=config_dict.placeholder(float),
        clip_value=config_dict.placeholder(float),
        # optax.MultiSteps over this many micro-batches (schedules count optimizer steps).
        accumulate_steps=1,
        # Keep an EMA of the parameters with this decay and evaluate with it.
        ema_decay=config_dict.placeholder(float),
        # Skip (and count) steps whose loss or gradients hold NaN/Inf, instead of stopping.
        skip_nonfinite=False,
        # Path regexes of parameters that never change, e.g. ('^conv_0/',).
        freeze=(),
        # Parameter groups: dict(match=..., lr_mult=..., weight_decay=..., optimizer=...).
        param_groups=(),
    )
    return ml_collections.ConfigDict({**defaults, **keys})


def get_config() -> ml_collections.ConfigDict:
    """Returns the default training config."""
    config = ml_collections.ConfigDict()
    # Seed of parameter initialisation and of the order training examples are drawn in.
    config.seed = 0
    # tfds dataset name: 'digits' (offline), 'mnist', 'cifar10', or any tfds image dataset with
    # 'image' and 'label' features. Splits 'train' and 'test' are used.
    config.dataset = "digits"
    # tfds data directory; None uses tfds' default (~/tensorflow_datasets).
    config.data_dir = config_dict.placeholder(str)
    # The model: 'name' picks it (see <package>/models.py), the other keys are its options.
    # 'cnn': one 3x3 conv + relu + 2x2 average pool per entry of 'features', then a hidden dense
    # layer of 'dense' units and the classifier head.
    config.model = ml_collections.ConfigDict(dict(name="cnn", features=(32, 64), dense=128))
    # Global batch size (all devices and processes together; must divide over the devices).
    config.batch_size = 128
    # Global evaluation batch size (the last batch is padded and the padding masked out).
    config.eval_batch_size = 512
    # Training steps (one optimizer micro-step per batch).
    config.num_train_steps = 600
    # Log training metrics (averaged since the last log) every this many steps.
    config.log_every_steps = 50
    # Evaluate on the whole test split every this many steps, and at the end.
    config.eval_every_steps = 300
    # Save a checkpoint in <workdir>/checkpoints every this many steps, and at the end.
    config.checkpoint_every_steps = 300
    # Compute in bfloat16 (parameters and optimizer state stay float32).
    config.half_precision = False
    # The device mesh (jit projects): 'data' splits each batch, 'fsdp' too and also splits
    # every large parameter and its optimizer state (fully sharded data parallel); -1 takes the
    # devices left. E.g. --config.mesh.fsdp=8 on 8 devices. (pmap projects: data only.)
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
    # Trace this many training steps (after 5 of warm-up) with jax.profiler into the workdir;
    # TensorBoard's profile tab shows it. 0: no trace.
    config.profile_steps = 0
    # The optimizer, built by plugins.optim.create (every key is in ``optimizer()`` above):
    # AdamW with warmup and cosine decay, weight decay on matrices only.
    config.optimizer = optimizer(name="adamw", learning_rate=3e-3, weight_decay=1e-2)
    # The loss, built by plugins.losses.create: 'softmax_cross_entropy' (with label_smoothing,
    # which regularises the small digits dataset well), 'sigmoid_binary_cross_entropy',
    # 'sigmoid_focal_loss', 'l2', 'mse', 'huber', ...
    config.loss = ml_collections.ConfigDict(dict(name="softmax_cross_entropy", label_smoothing=0.1))
    return config
