"""The training loop every variant shares: config checks, data, logging, evaluation, checkpoints.

``train.py`` (the NNX or Linen variant) builds a :class:`Task` -- the initial train state and two
pure step functions -- and :func:`run` drives it:

- the config is checked first (unknown keys and names fail with one clear ``ConfigError`` before
  anything compiles or any file is written);
- the steps are compiled by ``parallel.DataParallel`` (jit over a mesh, or pmap);
- the train step carries its metrics (clu ``metrics.Collection``) on the devices, so the hot loop
  never waits for the host except at log, eval and checkpoint steps;
- metrics go to TensorBoard and the console (clu metric writers; only process 0 writes);
- orbax checkpoints go to ``<workdir>/checkpoints`` every ``checkpoint_every_steps`` and at the
  end, and a rerun resumes from the latest one, data position included.
"""

import collections
import dataclasses
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
import orbax.checkpoint as ocp
from absl import logging
from clu import metric_writers, metrics, periodic_actions
from plugins import config_errors, losses, masks, optim, schedules

from . import input_pipeline, parallel

# Every top-level config key (see configs/default.py for what each does).
TOP_LEVEL_KEYS = (
    "seed",
    "dataset",
    "data_dir",
    "model",
    "batch_size",
    "eval_batch_size",
    "num_train_steps",
    "log_every_steps",
    "eval_every_steps",
    "checkpoint_every_steps",
    "half_precision",
    "optimizer",
    "loss",
)
# Extra ``update`` arguments of some optimizers that the train steps can supply.
SUPPORTED_UPDATE_ARGS = frozenset({"value", "grad", "obj_fn", "value_fn"})


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
    """Training metrics, averaged over the steps between two log steps."""

    train_loss: metrics.Average.from_output("loss")
    train_accuracy: metrics.Average.from_output("accuracy")
    grad_norm: metrics.Average.from_output("grad_norm")
    learning_rate: metrics.LastValue.from_output("learning_rate")


@flax.struct.dataclass
class EvalMetrics(metrics.Collection):
    """Evaluation metrics over every example of the evaluation split."""

    eval_loss: metrics.Average.from_output("loss")
    eval_accuracy: metrics.Average.from_output("correct")


@dataclasses.dataclass(frozen=True)
class Setup:
    """What a variant's ``build_task`` needs to build its model, state and steps."""

    dp: Any  # parallel.DataParallel
    tx: optax.GradientTransformation
    loss_fn: Callable[..., jax.Array]
    update_args: frozenset[str]
    num_classes: int
    input_shape: tuple[int, int, int]
    dtype: Any


@dataclasses.dataclass(frozen=True)
class Task:
    """A variant's train state and pure steps.

    Attributes:
      state: the initial train state on the host (a pytree; checkpointed as is).
      train_step: ``(state, TrainMetrics, batch) -> (state, TrainMetrics)``, pure.
      eval_step: ``(state, EvalMetrics, batch) -> EvalMetrics``, pure.
      step_of: reads the number of steps taken from a host state.
      params: the parameters, for the summary table.
    """

    state: Any
    train_step: Callable[[Any, TrainMetrics, dict], tuple[Any, TrainMetrics]]
    eval_step: Callable[[Any, EvalMetrics, dict], EvalMetrics]
    step_of: Callable[[Any], int]
    params: Any


def _positive_int(cfg: dict[str, Any], key: str, minimum: int = 1) -> None:
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise config_errors.ConfigError(f"{key} must be an int >= {minimum}, got {value!r}")


def validate_config(config: ml_collections.ConfigDict, model_check: Callable[[Any], Any]) -> None:
    """Raises ``ConfigError`` naming the first bad key of ``config``; compiles nothing.

    Args:
      config: the run's config.
      model_check: the variant's ``models.check_model_config``.
    """
    cfg = config_errors.as_dict(config)
    config_errors.check_keys(cfg, TOP_LEVEL_KEYS, "config")
    missing = [k for k in TOP_LEVEL_KEYS if k not in cfg]
    if missing:
        raise config_errors.ConfigError(f"config is missing the key(s) {', '.join(missing)}")
    _positive_int(cfg, "seed", minimum=0)
    for key in ("batch_size", "eval_batch_size", "num_train_steps", "log_every_steps"):
        _positive_int(cfg, key)
    for key in ("eval_every_steps", "checkpoint_every_steps"):
        _positive_int(cfg, key)
    if not isinstance(cfg["half_precision"], bool):
        raise config_errors.ConfigError(
            f"half_precision must be True or False, got {cfg['half_precision']!r}"
        )
    if not isinstance(cfg["dataset"], str) or not cfg["dataset"]:
        raise config_errors.ConfigError(f"dataset must be a tfds name, got {cfg['dataset']!r}")
    if cfg["data_dir"] is not None and not isinstance(cfg["data_dir"], str):
        raise config_errors.ConfigError(f"data_dir must be a path or None, got {cfg['data_dir']!r}")
    for key in ("model", "optimizer", "loss"):
        if not isinstance(cfg[key], dict):
            raise config_errors.ConfigError(
                f"{key} must be a ConfigDict with a 'name', e.g. {key}=dict(name=...); "
                f"got {cfg[key]!r}"
            )
    model_check(config.model)
    losses.create(config.loss)


def train_metrics(
    dp: Any,
    *,
    loss: jax.Array,
    logits: jax.Array,
    labels: jax.Array,
    grads: Any,
    learning_rate: jax.Array,
) -> TrainMetrics:
    """One train step's metrics (inside the step; ``grads`` already averaged over devices)."""
    return dp.metrics_from_output(
        TrainMetrics,
        loss=loss.astype(jnp.float32),
        accuracy=losses.accuracy(logits, labels).astype(jnp.float32),
        grad_norm=optax.global_norm(grads).astype(jnp.float32),
        learning_rate=jnp.asarray(learning_rate, jnp.float32),
    )


def eval_metrics(
    dp: Any, loss_fn: Callable, logits: jax.Array, labels: jax.Array, mask: jax.Array
) -> EvalMetrics:
    """One eval batch's metrics over its real (``mask``) examples, across devices."""
    per_example = jax.vmap(lambda x, y: loss_fn(x[None], y[None]))(logits, labels)
    correct = jnp.argmax(logits, axis=-1) == labels
    return dp.metrics_from_output(
        EvalMetrics,
        loss=per_example.astype(jnp.float32),
        correct=correct.astype(jnp.float32),
        mask=mask,
    )


def update_args(
    names: Iterable[str], *, loss: jax.Array, grads: Any, loss_of_params: Callable
) -> dict[str, Any]:
    """The extra ``tx.update`` keyword arguments the optimizer asked for (momo: ``value``...)."""
    supplies = {"value": loss, "grad": grads, "obj_fn": loss_of_params, "value_fn": loss_of_params}
    return {name: supplies[name] for name in names}


def _flat_hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
    flat: dict[str, Any] = {}

    def visit(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                visit(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, bool | int | float | str):
            flat[prefix] = value
        else:
            flat[prefix] = str(value)

    visit("", config_errors.as_dict(config))
    return flat


def _scalars(collection: Any) -> dict[str, float]:
    return {name: float(value) for name, value in collection.compute().items()}


def run(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    build_task: Callable[[ml_collections.ConfigDict, Setup], Task],
    model_check: Callable[[Any], Any],
) -> dict[str, list[tuple[int, float]]]:
    """Trains and evaluates; returns every logged scalar as ``{name: [(step, value), ...]}``.

    Args:
      config: the run's config (see ``configs/default.py``).
      workdir: where TensorBoard events, checkpoints and the LR plot go; a rerun with the same
        workdir resumes from its latest checkpoint.
      build_task: the variant's state and step builder.
      model_check: the variant's ``models.check_model_config``.
    """
    validate_config(config, model_check)
    dp = parallel.DataParallel()
    dp.check_batch_size(config.batch_size, "batch_size")
    dp.check_batch_size(config.eval_batch_size, "eval_batch_size")
    num_classes, input_shape = input_pipeline.dataset_info(config)
    total_steps = config.num_train_steps
    tx = optim.create(config.optimizer, total_steps=total_steps)
    wanted = optim.extra_update_args(config.optimizer)
    if wanted - SUPPORTED_UPDATE_ARGS:
        raise config_errors.ConfigError(
            f"optimizer.name={config.optimizer.name!r} needs the update argument(s) "
            f"{sorted(wanted - SUPPORTED_UPDATE_ARGS)} that this trainer does not supply"
        )
    setup = Setup(
        dp=dp,
        tx=tx,
        loss_fn=losses.create(config.loss),
        update_args=wanted,
        num_classes=num_classes,
        input_shape=input_shape,
        dtype=jnp.bfloat16 if config.half_precision else jnp.float32,
    )
    task = build_task(config, setup)

    workdir_path = Path(workdir).absolute()
    is_chief = jax.process_index() == 0
    checkpoints = ocp.CheckpointManager(
        workdir_path / "checkpoints",
        options=ocp.CheckpointManagerOptions(max_to_keep=3, create=True),
    )
    state = dp.put_state(task.state)
    latest = checkpoints.latest_step()
    if latest is not None:
        # Restore straight into the layout checkpoints are saved from (global arrays under jit).
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, dp.host_state(state))
        restored = checkpoints.restore(latest, args=ocp.args.StandardRestore(target))
        state = dp.put_state(restored)
        logging.info("Resumed from the checkpoint of step %d in %s", latest, workdir_path)
    initial_step = task.step_of(dp.host_state(state))

    writer = metric_writers.create_default_writer(str(workdir_path), just_logging=not is_chief)
    plot_thread = None
    if is_chief:
        if initial_step == 0:
            writer.write_hparams(_flat_hparams(config))
        logging.info(
            "Parameters:\n%s", masks.summary(task.params, config.optimizer, total_steps=total_steps)
        )
        plot = workdir_path / "learning_rate.png"
        if not plot.exists():  # matplotlib is slow to import: plot while the steps compile
            accumulate = config.optimizer.get("accumulate_steps", 1) or 1
            plot_thread = threading.Thread(
                target=schedules.save_plot,
                args=(config.optimizer,),
                kwargs=dict(total_steps=max(total_steps // accumulate, 1), path=plot),
                daemon=True,
            )
            plot_thread.start()

    empty_train = dp.put_state(TrainMetrics.empty())
    empty_eval = dp.put_state(EvalMetrics.empty())
    train_step = dp.compile_train_step(task.train_step)
    eval_step = dp.compile_eval_step(task.eval_step)
    local_eval_batch = dp.local_batch_size(config.eval_batch_size)

    history: dict[str, list[tuple[int, float]]] = collections.defaultdict(list)

    def write(step: int, scalars: dict[str, float]) -> None:
        writer.write_scalars(step, scalars)
        for name, value in scalars.items():
            history[name].append((step, value))

    def evaluate(state: Any) -> dict[str, float]:
        totals = empty_eval
        batches = input_pipeline.eval_batches(config, batch_size=local_eval_batch)
        for batch in dp.eval_batches(batches):
            totals = eval_step(state, totals, batch)
        return _scalars(dp.to_host(totals))

    report = periodic_actions.ReportProgress(
        num_train_steps=total_steps, writer=writer, every_steps=config.log_every_steps
    )
    host_batches = input_pipeline.train_batches(
        config, batch_size=dp.local_batch_size(config.batch_size), start_step=initial_step
    )
    train_batches = dp.train_batches(host_batches)
    logging.info("Training steps %d to %d on %d device(s).", initial_step + 1, total_steps,
                 dp.num_devices)  # fmt: skip
    start = time.monotonic()
    accumulated = empty_train
    with metric_writers.ensure_flushes(writer):
        for step in range(initial_step + 1, total_steps + 1):
            state, accumulated = train_step(state, accumulated, next(train_batches))
            last = step == total_steps
            if step % config.log_every_steps == 0 or last:
                write(step, _scalars(dp.to_host(accumulated)))
                accumulated = empty_train
            report(step)
            if step % config.eval_every_steps == 0 or last:
                with report.timed("eval"):
                    write(step, evaluate(state))
            if step % config.checkpoint_every_steps == 0 or last:
                with report.timed("checkpoint"):
                    checkpoints.save(step, args=ocp.args.StandardSave(dp.host_state(state)))
        if initial_step >= total_steps:
            logging.info("Already trained %d steps; evaluating only.", initial_step)
            write(initial_step, evaluate(state))
    if hasattr(host_batches, "close"):
        host_batches.close()
    checkpoints.wait_until_finished()
    checkpoints.close()
    if plot_thread is not None:
        plot_thread.join()
    writer.close()
    final = {name: values[-1][1] for name, values in history.items() if name.startswith("eval_")}
    logging.info("Done in %.1f s of training; final %s", time.monotonic() - start, final)
    return dict(history)
