"""Training with Flax Linen: ``train_and_evaluate(config, workdir)``.

The train state is a ``flax.training.train_state.TrainState`` subclass that also carries the
batch norm statistics (``batch_stats``, None for models without batch norm) and passes extra
``update`` arguments to optimizers that need them (e.g. the loss for momo).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import linen as nn
from flax.training import train_state
from plugins import optim

from . import input_pipeline, models, parallel, trainer


class TrainState(train_state.TrainState):
    """``TrainState`` with batch norm statistics and extra optimizer update arguments."""

    batch_stats: Any = None

    def apply_gradients(self, *, grads: Any, update_args: dict | None = None, **kwargs: Any):
        """One optimizer step; ``update_args`` go to ``tx.update`` (e.g. ``value=loss``)."""
        updates, opt_state = self.tx.update(
            grads, self.opt_state, self.params, **(update_args or {})
        )
        params = optax.apply_updates(self.params, updates)
        return self.replace(step=self.step + 1, params=params, opt_state=opt_state, **kwargs)


def _model(config: ml_collections.ConfigDict, num_classes: int, dtype: Any) -> nn.Module:
    return models.create_model(
        config.model, num_classes=num_classes, dtype=dtype, axis_name=parallel.AXIS_NAME
    )


def _init_variables(model: nn.Module, config: ml_collections.ConfigDict, input_shape) -> dict:
    dummy = jnp.zeros((1, *input_shape), jnp.float32)
    # Run once: compiled without XLA's backend optimisations (seconds faster on a CPU).
    init = jax.jit(
        lambda key: model.init(key, dummy, train=False), compiler_options=trainer.RUN_ONCE_OPTIONS
    )
    return init(jax.random.key(config.seed))


def _create_state(model: nn.Module, tx: Any, params: Any, batch_stats: Any) -> TrainState:
    """The initial ``TrainState``, its optimizer state initialised in one compiled program
    (eagerly, each initial value and schedule value compiles on its own)."""

    def create(params: Any, batch_stats: Any) -> TrainState:
        state = TrainState.create(
            apply_fn=model.apply, params=params, tx=tx, batch_stats=batch_stats
        )
        return state.replace(step=jnp.zeros((), jnp.int32))

    return jax.jit(create, compiler_options=trainer.RUN_ONCE_OPTIONS)(params, batch_stats)


def build_task(
    config: ml_collections.ConfigDict, setup: trainer.Setup, init_params: Any = None
) -> trainer.Task:
    """Builds the model, train state and the pure train/eval steps.

    Args:
      config: the run's config.
      setup: optimizer, loss, data parallelism and dataset facts from ``trainer.run``.
      init_params: optional nested dict of parameters (``{'conv_0': {'kernel': ...}}``) to start
        from instead of the random initialisation.
    """
    model = _model(config, setup.num_classes, setup.dtype)
    variables = _init_variables(model, config, setup.input_shape)
    params = variables["params"]
    if init_params is not None:
        params = jax.tree.map(lambda p, q: jnp.asarray(q, p.dtype), params, dict(init_params))
    state = _create_state(model, setup.tx, params, variables.get("batch_stats"))
    dp, loss_fn = setup.dp, setup.loss_fn

    def apply(state: TrainState, params: Any, images: jax.Array, train: bool):
        """Logits and (in training, with batch norm) the new batch statistics."""
        if state.batch_stats is None:
            return state.apply_fn({"params": params}, images, train=train), None
        variables = {"params": params, "batch_stats": state.batch_stats}
        if not train:
            return state.apply_fn(variables, images, train=False), state.batch_stats
        logits, updates = state.apply_fn(variables, images, train=True, mutable=["batch_stats"])
        return logits, updates["batch_stats"]

    def train_step(state: TrainState, metrics: trainer.TrainMetrics, batch: dict) -> tuple:
        images, labels = batch["image"], batch["label"]

        def loss_of(params: Any) -> tuple[jax.Array, tuple]:
            logits, batch_stats = apply(state, params, images, train=True)
            return loss_fn(logits, labels), (logits, batch_stats)

        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_of, has_aux=True)(
            state.params
        )
        grads = dp.mean(grads)
        extra = None
        if setup.update_args:
            extra = trainer.update_args(
                setup.update_args,
                loss=dp.mean(loss),
                grads=grads,
                loss_of_params=lambda params: loss_of(params)[0],
            )
        new_state = state.apply_gradients(grads=grads, update_args=extra)
        # A skipped (non-finite) update leaves the batch-norm statistics as they were too.
        batch_stats = optim.keep_if_skipped(new_state.opt_state, batch_stats, state.batch_stats)
        state = new_state.replace(batch_stats=batch_stats)
        step_metrics = trainer.train_metrics(
            dp,
            loss=loss,
            logits=logits,
            labels=labels,
            grads=grads,
            learning_rate=optim.learning_rate(state.opt_state),
            nonfinite_count=optim.nonfinite_count(state.opt_state),
        )
        return state, metrics.merge(step_metrics)

    def eval_step(state: TrainState, metrics: trainer.EvalMetrics, batch: dict):
        # EMA or schedule-free evaluation parameters when configured, else the parameters.
        params = optim.eval_params(state.opt_state, state.params)
        logits, _ = apply(state, params, batch["image"], train=False)
        return metrics.merge(
            trainer.eval_metrics(dp, loss_fn, logits, batch["label"], batch["mask"])
        )

    return trainer.Task(
        state=state,
        train_step=train_step,
        eval_step=eval_step,
        step_of=lambda state: int(jax.device_get(state.step)),
        params=params,
    )


def init_params(config: ml_collections.ConfigDict) -> dict:
    """The model's freshly initialised parameters as a nested dict of numpy arrays
    (what ``train_and_evaluate`` starts from without ``init_params``)."""
    num_classes, input_shape = input_pipeline.dataset_info(config)
    variables = _init_variables(_model(config, num_classes, jnp.float32), config, input_shape)
    return jax.tree.map(np.asarray, dict(variables["params"]))


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, init_params: Any = None
) -> dict[str, list[tuple[int, float]]]:
    """Trains the model ``config`` describes, evaluating and checkpointing in ``workdir``.

    Rerunning with the same ``workdir`` resumes from the latest checkpoint.

    Args:
      config: the run's config (see ``configs/default.py``).
      workdir: directory for TensorBoard events, checkpoints and the learning-rate plot.
      init_params: optional nested dict of starting parameters (e.g. from another run, or the
        NNX variant: the layer names match); default: initialised from ``config.seed``.

    Returns:
      Every logged scalar: ``{name: [(step, value), ...]}``.
    """
    return trainer.run(
        config,
        workdir,
        build_task=lambda config, setup: build_task(config, setup, init_params),
        model_check=models.check_model_config,
    )
