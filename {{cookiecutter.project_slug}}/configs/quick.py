"""Quick config: the default, cut to a few steps -- for smoke tests and trying changes out."""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    """Returns the default config shortened to 20 steps, logging every 5 and evaluating twice."""
    config = default.get_config()
    config.num_train_steps = 20  # a few steps only
    config.log_every_steps = 5  # log training metrics every 5 steps
    config.eval_every_steps = 10  # evaluate at steps 10 and 20
    config.checkpoint_every_steps = 10  # checkpoint at steps 10 and 20
    config.optimizer.schedule.warmup_steps = 5  # warm up over 5 of the 20 steps
    return config
