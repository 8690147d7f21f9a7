"""Trains and evaluates a Flax Linen model: ``train_and_evaluate(config, workdir)``.

``train_and_evaluate`` builds the model (``models.py``), the optimizer (``plugins.optim`` from
``config.optimizer``) and the ``TrainState``; compiles ``train_step`` and ``eval_step`` for the
devices (``parallel.py``: jit over a device mesh, or pmap) and hands them to
``plugins.loop.fit``, which logs, evaluates, checkpoints and resumes.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import linen as nn
from flax.training import train_state
from plugins import loop, losses, masks, metrics, optim

from . import input_pipeline, models, parallel


class TrainState(train_state.TrainState):
    """``TrainState`` with batch norm statistics (``None`` for models without batch norm) and
    extra optimizer ``update`` arguments (e.g. the loss, for momo)."""

    batch_stats: Any = None

    def apply_gradients(self, *, grads: Any, update_args: dict | None = None, **kwargs: Any):
        """One optimizer step; ``update_args`` go to ``tx.update`` (e.g. ``value=loss``)."""
        updates, opt_state = self.tx.update(
            grads, self.opt_state, self.params, **(update_args or {})
        )
        params = optax.apply_updates(self.params, updates)
        return self.replace(step=self.step + 1, params=params, opt_state=opt_state, **kwargs)


def create_model(config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
    """The model ``config.model`` describes."""
    return models.create_model(
        config.model,
        num_classes=num_classes,
        dtype=jnp.bfloat16 if config.half_precision else jnp.float32,
        axis_name=parallel.AXIS_NAME,  # batch norm averages over the pmap axis
    )


def initial_variables(
    model: nn.Module, config: ml_collections.ConfigDict, input_shape: tuple[int, ...]
) -> dict:
    """``model.init`` from ``config.seed``: ``{'params': ..., 'batch_stats': ...}``."""
    dummy = jnp.zeros((1, *input_shape), jnp.float32)
    # Run once: compiled without XLA's backend optimisations (seconds faster on a CPU).
    init = jax.jit(
        lambda key: model.init(key, dummy, train=False), compiler_options=metrics.RUN_ONCE_OPTIONS
    )
    return init(jax.random.key(config.seed))


def create_train_state(
    config: ml_collections.ConfigDict,
    tx: Any,
    num_classes: int,
    input_shape: tuple[int, ...],
    init_params: Any = None,
) -> TrainState:
    """The initial ``TrainState``: the model's variables (or ``init_params``, e.g. the
    parameters of another run) and the optimizer state, initialised in one compiled program
    (eagerly, each initial value and schedule value compiles on its own)."""
    model = create_model(config, num_classes)
    variables = initial_variables(model, config, input_shape)
    params = variables["params"]
    if init_params is not None:
        params = jax.tree.map(lambda p, q: jnp.asarray(q, p.dtype), params, dict(init_params))

    def create(params: Any, batch_stats: Any) -> TrainState:
        state = TrainState.create(
            apply_fn=model.apply, params=params, tx=tx, batch_stats=batch_stats
        )
        return state.replace(step=jnp.zeros((), jnp.int32))

    create = jax.jit(create, compiler_options=metrics.RUN_ONCE_OPTIONS)
    return create(params, variables.get("batch_stats"))


def apply_model(
    state: TrainState, params: Any, images: jax.Array, train: bool, key: jax.Array | None = None
) -> tuple:
    """Logits and (in training, with batch norm) the new batch statistics; ``key`` feeds
    dropout in training."""
    rngs = None if key is None else {"dropout": key}
    if state.batch_stats is None:
        return state.apply_fn({"params": params}, images, train=train, rngs=rngs), None
    variables = {"params": params, "batch_stats": state.batch_stats}
    if not train:
        return state.apply_fn(variables, images, train=False), state.batch_stats
    logits, updates = state.apply_fn(
        variables, images, train=True, rngs=rngs, mutable=["batch_stats"]
    )
    return logits, updates["batch_stats"]


def dropout_key(seed: int, step: jax.Array) -> jax.Array:
    """The dropout key of a train step: it depends only on (seed, step), so a resumed run draws
    what an uninterrupted one would; under pmap, each device draws its own."""
    key = jax.random.fold_in(jax.random.key(seed), step)
    if parallel.AXIS_NAME is not None:
        key = jax.random.fold_in(key, jax.lax.axis_index(parallel.AXIS_NAME))
    return key


def train_step(
    state: TrainState,
    so_far: metrics.TrainMetrics,
    batch: dict,
    *,
    loss_fn: Any,
    update_args: frozenset[str] = frozenset(),
    seed: int = 0,
) -> tuple[TrainState, metrics.TrainMetrics]:
    """One optimizer step on ``batch``; returns the new state and the metrics merged so far."""
    images, labels = batch["image"], batch["label"]
    # Soft labels (mixup/cutmix, config.augment) for the loss; accuracy counts the hard labels.
    targets = batch.get("target", labels)
    key = dropout_key(seed, state.step)

    def loss_of(params: Any) -> tuple[jax.Array, tuple]:
        logits, batch_stats = apply_model(state, params, images, train=True, key=key)
        return loss_fn(logits, targets), (logits, batch_stats)

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
    grads = parallel.mean(grads)  # over the devices (pmap; under jit XLA does it)
    extra = None
    if update_args:  # optimizers that take the loss too (momo, sophia, ...)
        extra = optim.update_args(
            update_args,
            loss=parallel.mean(loss),
            grads=grads,
            loss_of_params=lambda params: loss_of(params)[0],
        )
    new_state = state.apply_gradients(grads=grads, update_args=extra)
    # A skipped (non-finite) update leaves the batch-norm statistics as they were too.
    batch_stats = optim.keep_if_skipped(new_state.opt_state, batch_stats, state.batch_stats)
    state = new_state.replace(batch_stats=batch_stats)
    step = metrics.train_step_metrics(
        loss=loss,
        logits=logits,
        labels=labels,
        grads=grads,
        learning_rate=optim.learning_rate(state.opt_state),
        nonfinite_count=optim.nonfinite_count(state.opt_state),
        axis_name=parallel.AXIS_NAME,
    )
    return state, so_far.merge(step)


def eval_step(
    state: TrainState, so_far: metrics.EvalMetrics, batch: dict, *, loss_fn: Any
) -> metrics.EvalMetrics:
    """The metrics of ``batch``'s real examples (``mask``), merged into those so far."""
    # EMA or schedule-free evaluation parameters when configured, else the parameters.
    params = optim.eval_params(state.opt_state, state.params)
    logits, _ = apply_model(state, params, batch["image"], train=False)
    step = metrics.eval_step_metrics(
        loss_fn, logits, batch["label"], batch["mask"], axis_name=parallel.AXIS_NAME
    )
    return so_far.merge(step)


def init_params(config: ml_collections.ConfigDict) -> dict:
    """The model's freshly initialised parameters as a nested dict of numpy arrays
    (what ``train_and_evaluate`` starts from without ``init_params``)."""
    num_classes, input_shape = input_pipeline.dataset_info(config, check_data=False)
    variables = initial_variables(create_model(config, num_classes), config, input_shape)
    return jax.tree.map(np.asarray, dict(variables["params"]))


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, init_params: Any = None
) -> loop.History:
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
    # A bad key or value stops here, with one line, before anything compiles or is written.
    loop.prepare(config, model_check=models.check_model_config)
    dp = parallel.DataParallel(config.get("mesh"))  # the devices: a mesh, or pmap's
    num_classes, input_shape = input_pipeline.dataset_info(config)

    tx = optim.create(config.optimizer, total_steps=config.num_train_steps)
    state = create_train_state(config, tx, num_classes, input_shape, init_params)
    if jax.process_index() == 0:
        table = masks.summary(
            state.params, config.optimizer, total_steps=config.num_train_steps, mesh=dp.mesh,
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
                train_step, loss_fn=loss_fn, update_args=update_args, seed=config.seed
            ),
            state,
        ),
        eval_step=dp.compile_eval_step(functools.partial(eval_step, loss_fn=loss_fn), state),
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
    state = create_train_state(config, tx, num_classes, input_shape)
    loss_fn = losses.create(config.loss)
    return loop.evaluate(
        workdir,
        state=state,
        eval_step=dp.compile_eval_step(functools.partial(eval_step, loss_fn=loss_fn), state),
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
    state = create_train_state(config, tx, num_classes, input_shape)
    step, state = loop.restore(workdir, state, step=step)
    params = optim.eval_params(state.opt_state, state.params)
    return step, lambda images: apply_model(state, params, images, train=False)[0]
