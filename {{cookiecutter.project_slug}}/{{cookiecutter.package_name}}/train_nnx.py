"""Trains and evaluates a Flax NNX model: ``train_and_evaluate(config, workdir)``.

``train_and_evaluate`` builds the model (``models.py``), the optimizer (``plugins.optim`` from
``config.optimizer``) and the ``nnx.Optimizer``; compiles ``train_step`` and ``eval_step`` for
the devices (``parallel.py``: jit over a device mesh, or pmap) and hands them to
``plugins.loop.fit``, which logs, evaluates, checkpoints and resumes.

The steps take the model and optimizer as one plain dict of arrays: ``nnx.split`` once here,
``nnx.merge`` inside the step. jit flattens a dict in C++, so NNX's object bookkeeping costs
nothing per step; the model code stays ordinary NNX.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from plugins import loop, losses, masks, metrics, optim

from . import input_pipeline, models, parallel


def create_model(
    config: ml_collections.ConfigDict, num_classes: int, input_shape: tuple[int, ...]
) -> nnx.Module:
    """The model ``config.model`` describes, initialised from ``config.seed``."""
    return models.create_model(
        config.model,
        num_classes=num_classes,
        input_shape=input_shape,
        dtype=jnp.bfloat16 if config.half_precision else jnp.float32,
        axis_name=parallel.AXIS_NAME,  # batch norm averages over the pmap axis
        rngs=nnx.Rngs(config.seed),
    )


def create_train_state(
    config: ml_collections.ConfigDict,
    tx: Any,
    num_classes: int,
    input_shape: tuple[int, ...],
    init_params: Any = None,
) -> tuple[nnx.GraphDef, dict]:
    """The model and its ``nnx.Optimizer``, split into a graph definition and a plain dict of
    arrays (the state the steps take).

    Built in one compiled program, without XLA's backend optimisations (a program run once
    does not need them): run eagerly, each initialiser and each initial optimizer value
    compiles on its own, which takes seconds on a CPU. The values are the same.
    """

    def create(params: Any) -> tuple[nnx.Module, nnx.Optimizer]:
        model = create_model(config, num_classes, input_shape)
        if params is not None:  # e.g. the parameters of another run
            state = nnx.state(model, nnx.Param)
            nnx.replace_by_pure_dict(state, params)
            nnx.update(model, state)
        return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

    if init_params is not None:
        init_params = jax.tree.map(np.asarray, init_params)
    graphdef = nnx.graphdef(nnx.eval_shape(create, init_params))
    initial = jax.jit(
        lambda params: nnx.to_pure_dict(nnx.state(create(params))),
        compiler_options=metrics.RUN_ONCE_OPTIONS,
    )
    return graphdef, initial(init_params)


def dropout_key(seed: int, step: jax.Array) -> jax.Array:
    """The dropout key of a train step: it depends only on (seed, step), so a resumed run draws
    what an uninterrupted one would; under pmap, each device draws its own."""
    key = jax.random.fold_in(jax.random.key(seed), step)
    if parallel.AXIS_NAME is not None:
        key = jax.random.fold_in(key, jax.lax.axis_index(parallel.AXIS_NAME))
    return key


def train_step(
    graphdef: nnx.GraphDef,
    state: dict,
    so_far: metrics.TrainMetrics,
    batch: dict,
    *,
    loss_fn: Any,
    update_args: frozenset[str] = frozenset(),
    seed: int = 0,
) -> tuple[dict, metrics.TrainMetrics]:
    """One optimizer step on ``batch``; returns the new state and the metrics merged so far."""
    model, optimizer = nnx.merge(graphdef, state)
    images, labels = batch["image"], batch["label"]
    # Soft labels (mixup/cutmix, config.augment) for the loss; accuracy counts the hard labels.
    targets = batch.get("target", labels)
    key = dropout_key(seed, optimizer.step[...])
    # Values, not the Variables themselves (which the forward pass below updates).
    old_stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))

    def loss_of(model: nnx.Module) -> tuple[jax.Array, jax.Array]:
        logits = model(images, dropout_key=key)
        return loss_fn(logits, targets), logits

    (loss, logits), grads = nnx.value_and_grad(loss_of, has_aux=True)(model)
    grads = parallel.mean(grads)  # over the devices (pmap; under jit XLA does it)
    extra = {}
    if update_args:  # optimizers that take the loss too (momo, sophia, ...)
        model_def, _, rest = nnx.split(model, nnx.Param, ...)

        def loss_of_params(params: Any) -> jax.Array:
            return loss_fn(nnx.merge(model_def, params, rest)(images, dropout_key=key), targets)

        extra = optim.update_args(
            update_args, loss=parallel.mean(loss), grads=grads, loss_of_params=loss_of_params
        )
    optimizer.update(model, grads, **extra)
    # A skipped (non-finite) update leaves the batch-norm statistics as they were too.
    new_stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
    nnx.update(model, optim.keep_if_skipped(optimizer.opt_state, new_stats, old_stats))
    step = metrics.train_step_metrics(
        loss=loss,
        logits=logits,
        labels=labels,
        grads=grads,
        learning_rate=optim.learning_rate(optimizer.opt_state),
        nonfinite_count=optim.nonfinite_count(optimizer.opt_state),
        axis_name=parallel.AXIS_NAME,
    )
    return nnx.to_pure_dict(nnx.state((model, optimizer))), so_far.merge(step)


def eval_step(
    graphdef: nnx.GraphDef, state: dict, so_far: metrics.EvalMetrics, batch: dict, *, loss_fn: Any
) -> metrics.EvalMetrics:
    """The metrics of ``batch``'s real examples (``mask``), merged into those so far."""
    model, optimizer = nnx.merge(graphdef, state)
    # EMA or schedule-free evaluation parameters when configured, else the parameters.
    nnx.update(model, optim.eval_params(optimizer.opt_state, nnx.state(model, nnx.Param)))
    model.eval()  # batch norm uses its running averages
    logits = model(batch["image"])
    step = metrics.eval_step_metrics(
        loss_fn, logits, batch["label"], batch["mask"], axis_name=parallel.AXIS_NAME
    )
    return so_far.merge(step)


def init_params(config: ml_collections.ConfigDict) -> dict:
    """The model's freshly initialised parameters as a nested dict of numpy arrays
    (what ``train_and_evaluate`` starts from without ``init_params``)."""
    model = create_model(config, *input_pipeline.dataset_info(config, check_data=False))
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, init_params: Any = None
) -> loop.History:
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
    # A bad key or value stops here, with one line, before anything compiles or is written.
    loop.prepare(config, model_check=models.check_model_config)
    dp = parallel.DataParallel(config.get("mesh"))  # the devices: a mesh, or pmap's
    num_classes, input_shape = input_pipeline.dataset_info(config)

    tx = optim.create(config.optimizer, total_steps=config.num_train_steps)
    graphdef, state = create_train_state(config, tx, num_classes, input_shape, init_params)
    if jax.process_index() == 0:
        params = nnx.state(nnx.merge(graphdef, state)[0], nnx.Param)
        table = masks.summary(
            params, config.optimizer, total_steps=config.num_train_steps, mesh=dp.mesh,
            partition=dp.rule,
        )  # fmt: skip
        logging.info("Parameters:\n%s", table)

    loss_fn = losses.create(config.loss)
    update_args = optim.extra_update_args(config.optimizer)
    return loop.fit(
        config,
        workdir,
        state=state,
        train_step=dp.compile_train_step(
            functools.partial(
                train_step, graphdef, loss_fn=loss_fn, update_args=update_args, seed=config.seed
            ),
            state,
        ),
        eval_step=dp.compile_eval_step(
            functools.partial(eval_step, graphdef, loss_fn=loss_fn), state
        ),
        parallel=dp,
        train_batches=lambda start_step: input_pipeline.train_batches(config, start_step),
        eval_batches=lambda: input_pipeline.eval_batches(config),
        input_shape=input_shape,
        num_classes=num_classes,
    )


def evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, step: int | None = None
) -> tuple[int, dict[str, float]]:
    """Evaluates the checkpoint of ``step`` (default: the latest) in ``workdir`` on the eval
    split, training nothing; returns ``(step, {'eval_loss': ..., 'eval_accuracy': ...})``."""
    loop.check_config(config, model_check=models.check_model_config)
    dp = parallel.DataParallel(config.get("mesh"))
    num_classes, input_shape = input_pipeline.dataset_info(config)
    tx = optim.create(config.optimizer, total_steps=config.num_train_steps)
    graphdef, state = create_train_state(config, tx, num_classes, input_shape)
    loss_fn = losses.create(config.loss)
    return loop.evaluate(
        workdir,
        state=state,
        eval_step=dp.compile_eval_step(
            functools.partial(eval_step, graphdef, loss_fn=loss_fn), state
        ),
        parallel=dp,
        eval_batches=lambda: input_pipeline.eval_batches(config),
        step=step,
    )


def trained_model(
    config: ml_collections.ConfigDict, workdir: str, *, step: int | None = None
) -> tuple[int, Any]:
    """``(step, forward)``: the model of the checkpoint of ``step`` (default: the latest) in
    ``workdir`` as ``forward(images) -> logits``, in evaluation mode with the evaluation
    parameters (the EMA ones if configured), on one device."""
    loop.check_config(config, model_check=models.check_model_config)
    num_classes, input_shape = input_pipeline.dataset_info(config, check_data=False)
    tx = optim.create(config.optimizer, total_steps=config.num_train_steps)
    graphdef, state = create_train_state(config, tx, num_classes, input_shape)
    step, state = loop.restore(workdir, state, step=step)
    model, optimizer = nnx.merge(graphdef, state)
    nnx.update(model, optim.eval_params(optimizer.opt_state, nnx.state(model, nnx.Param)))
    model.eval()  # batch norm uses its running averages
    model_def, model_state = nnx.split(model)
    return step, lambda images: nnx.merge(model_def, model_state)(images)
