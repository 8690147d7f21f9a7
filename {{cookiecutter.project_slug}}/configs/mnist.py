"""MNIST (28x28 grayscale digits, 10 classes) with the CNN; about 99% test accuracy.

Downloads MNIST through tfds on first use (needs network once; set ``data_dir`` to share it).
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    """Returns the MNIST config: the default config with a real dataset and longer training."""
    config = default.get_config()
    config.dataset = "mnist"  # tfds name; the 'train' and 'test' splits are used
    # CNN with two conv/pool stages (28 -> 14 -> 7) and a 256-unit hidden layer.
    config.model = ml_collections.ConfigDict(dict(name="cnn", features=(32, 64), dense=256))
    config.batch_size = 128  # global batch size
    config.eval_batch_size = 1000  # global evaluation batch size
    config.num_train_steps = 4000  # about 8.5 epochs of 60k images
    config.log_every_steps = 100  # training metrics every 100 steps
    config.eval_every_steps = 1000  # test accuracy every 1000 steps and at the end
    config.checkpoint_every_steps = 1000  # checkpoint every 1000 steps and at the end
    config.optimizer.learning_rate = 2e-3  # peak learning rate
    config.optimizer.schedule.warmup_steps = 200  # linear warmup, then cosine decay
    return config
