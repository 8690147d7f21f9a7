"""Training with Flax NNX: ``train_and_evaluate(config, workdir)``.

The model and its ``nnx.Optimizer`` are split once into a graph definition and a state (a plain
nested dict of arrays, ``nnx.to_pure_dict``). The compiled steps take and return that state and
rebuild the objects with ``nnx.merge`` inside the trace, so the hot loop is a plain jitted (or
pmapped) function of arrays with donated buffers: NNX's object bookkeeping costs nothing per step.
The model code itself (``models.py``) stays ordinary NNX.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from plugins import optim

from . import input_pipeline, models, parallel, trainer


def _initialise(make: Callable[[], nnx.Module]) -> nnx.Module:
    """``make()``, with every initialiser in one compiled program instead of one per op.

    Run eagerly, each initialiser compiles on its own (dozens of compiles, seconds); compiled
    once without XLA's backend optimisations, which a program run once does not need, it takes
    a fraction of that. The values are the same as eager initialisation.
    """
    graphdef = nnx.graphdef(nnx.eval_shape(make))
    state = jax.jit(lambda: nnx.state(make()), compiler_options=trainer.RUN_ONCE_OPTIONS)()
    return nnx.merge(graphdef, state)


def create_optimizer(model: nnx.Module, tx: Any) -> nnx.Optimizer:
    """``nnx.Optimizer(model, tx, wrt=nnx.Param)``, its state initialised in one compiled program
    (eagerly, each initial value and schedule value compiles on its own)."""
    graphdef, state = nnx.split(model)

    def make(state: Any) -> nnx.Optimizer:
        return nnx.Optimizer(nnx.merge(graphdef, state), tx, wrt=nnx.Param)

    optimizer_def = nnx.graphdef(nnx.eval_shape(make, state))
    initial = jax.jit(
        lambda state: nnx.state(make(state)), compiler_options=trainer.RUN_ONCE_OPTIONS
    )
    return nnx.merge(optimizer_def, initial(state))


def create_model(config: ml_collections.ConfigDict, setup: trainer.Setup) -> nnx.Module:
    """The model ``config.model`` describes, initialised from ``config.seed``."""
    return _model(config, setup.num_classes, setup.input_shape, setup.dtype)


def _model(
    config: ml_collections.ConfigDict, num_classes: int, input_shape, dtype=jnp.float32
) -> nnx.Module:
    """``create_model`` from the dataset's facts (``dtype``: the computation's)."""
    return _initialise(
        lambda: models.create_model(
            config.model,
            num_classes=num_classes,
            input_shape=input_shape,
            dtype=dtype,
            axis_name=parallel.AXIS_NAME,
            rngs=nnx.Rngs(config.seed),
        )
    )


def build_task(
    config: ml_collections.ConfigDict, setup: trainer.Setup, init_params: Any = None
) -> trainer.Task:
    """Builds the model, optimizer, state and the pure train/eval steps.

    Args:
      config: the run's config.
      setup: optimizer, loss, data parallelism and dataset facts from ``trainer.run``.
      init_params: optional nested dict of parameters (``{'conv_0': {'kernel': ...}}``) to start
        from instead of the random initialisation.
    """
    model = create_model(config, setup)
    if init_params is not None:
        params = nnx.state(model, nnx.Param)
        nnx.replace_by_pure_dict(params, jax.tree.map(np.asarray, init_params))
        nnx.update(model, params)
    optimizer = create_optimizer(model, setup.tx)
    graphdef, state = nnx.split((model, optimizer))
    # The steps take and return a plain nested dict of arrays, whose flattening jit does in C++;
    # an nnx.State costs ~0.1 ms more per step (its Variables flatten in Python).
    state = nnx.to_pure_dict(state)
    dp, loss_fn = setup.dp, setup.loss_fn

    def train_step(state: dict, metrics: trainer.TrainMetrics, batch: dict) -> tuple:
        model, optimizer = nnx.merge(graphdef, state)
        images, labels = batch["image"], batch["label"]
        # Values, not the Variables themselves (which the forward pass below updates).
        old_stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))

        def loss_of(model: nnx.Module) -> tuple[jax.Array, jax.Array]:
            logits = model(images)
            return loss_fn(logits, labels), logits

        (loss, logits), grads = nnx.value_and_grad(loss_of, has_aux=True)(model)
        grads = dp.mean(grads)
        extra = {}
        if setup.update_args:
            model_def, _, rest = nnx.split(model, nnx.Param, ...)

            def loss_of_params(params: Any) -> jax.Array:
                return loss_fn(nnx.merge(model_def, params, rest)(images), labels)

            extra = trainer.update_args(
                setup.update_args, loss=dp.mean(loss), grads=grads, loss_of_params=loss_of_params
            )
        optimizer.update(model, grads, **extra)
        # A skipped (non-finite) update leaves the batch-norm statistics as they were too.
        new_stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
        nnx.update(model, optim.keep_if_skipped(optimizer.opt_state, new_stats, old_stats))
        step_metrics = trainer.train_metrics(
            dp,
            loss=loss,
            logits=logits,
            labels=labels,
            grads=grads,
            learning_rate=optim.learning_rate(optimizer.opt_state),
            nonfinite_count=optim.nonfinite_count(optimizer.opt_state),
        )
        return nnx.to_pure_dict(nnx.state((model, optimizer))), metrics.merge(step_metrics)

    def eval_step(state: dict, metrics: trainer.EvalMetrics, batch: dict):
        model, optimizer = nnx.merge(graphdef, state)
        # EMA or schedule-free evaluation parameters when configured, else the parameters.
        nnx.update(model, optim.eval_params(optimizer.opt_state, nnx.state(model, nnx.Param)))
        model.eval()  # batch norm uses its running averages
        logits = model(batch["image"])
        return metrics.merge(
            trainer.eval_metrics(dp, loss_fn, logits, batch["label"], batch["mask"])
        )

    def step_of(state: dict) -> int:
        _, optimizer = nnx.merge(graphdef, state)
        return int(jax.device_get(optimizer.step[...]))

    return trainer.Task(
        state=state,
        train_step=train_step,
        eval_step=eval_step,
        step_of=step_of,
        params=nnx.state(model, nnx.Param),
    )


def init_params(config: ml_collections.ConfigDict) -> dict:
    """The model's freshly initialised parameters as a nested dict of numpy arrays
    (what ``train_and_evaluate`` starts from without ``init_params``)."""
    model = _model(config, *input_pipeline.dataset_info(config))
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, init_params: Any = None
) -> dict[str, list[tuple[int, float]]]:
    """Trains the model ``config`` describes, evaluating and checkpointing in ``workdir``.

    Rerunning with the same ``workdir`` resumes from the latest checkpoint.

    Args:
      config: the run's config (see ``configs/default.py``).
      workdir: directory for TensorBoard events, checkpoints and the learning-rate plot.
      init_params: optional nested dict of starting parameters (e.g. from another run, or the
        Linen variant: the layer names match); default: initialised from ``config.seed``.

    Returns:
      Every logged scalar: ``{name: [(step, value), ...]}``.
    """
    return trainer.run(
        config,
        workdir,
        build_task=lambda config, setup: build_task(config, setup, init_params),
        model_check=models.check_model_config,
    )
