"""The training loop every variant shares: config checks, data, logging, evaluation, checkpoints.

``train.py`` (the NNX or Linen variant) builds a :class:`Task` -- the initial train state and two
pure step functions -- and :func:`run` drives it:

- the config is checked first (unknown keys and names fail with one clear ``ConfigError`` before
  anything compiles or any file is written);
- the steps are compiled by ``parallel.DataParallel`` (jit over a mesh, or pmap);
- the train step carries its metrics (clu ``metrics.Collection``) on the devices, so the hot loop
  never waits for the host except at log, eval and checkpoint steps (and never runs more than
  ``MAX_STEPS_IN_FLIGHT`` steps ahead of the devices: :class:`Fence`);
- :func:`make_setup` + ``build_task`` build the state and steps without reading data (nor
  importing TensorFlow), given the dataset's number of classes and image shape;
- metrics go to TensorBoard and the console (clu metric writers; only process 0 writes);
- orbax checkpoints go to ``<workdir>/checkpoints`` every ``checkpoint_every_steps`` and at the
  end, and a rerun resumes from the latest one, data position included;
- SIGTERM (preemption) and a first Ctrl-C (SIGINT) finish the current step, save a checkpoint and
  raise :class:`Preempted` (a second Ctrl-C stops at once); a rerun continues exactly as if never
  stopped (the checkpoint holds the train state and the
  metrics accumulated since the last log step; the data depend only on the step);
- a NaN/Inf loss or gradient is skipped and counted with ``optimizer.skip_nonfinite``, else it
  stops the run with :class:`NonFiniteError` naming its step; no checkpoint holding NaN/Inf is
  ever written. It is detected on the devices and read only at log, eval and checkpoint steps.
"""

import collections
import dataclasses
import functools
import math
import os
import signal
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
from clu import metrics
from plugins import config_errors, data, losses, masks, optim, schedules, tensorflow_setup

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
# XLA options of programs that run once or rarely (parameter initialisation, the checkpoint
# check): without backend optimisations they compile several times faster (seconds on a CPU),
# and their own speed does not matter.
RUN_ONCE_OPTIONS = {"xla_backend_optimization_level": 0}
# Imported with TensorFlow in a background thread while the steps compile (see ``run``).
WRITER_MODULES = ("clu.metric_writers", "clu.periodic_actions")
# At most this many steps are dispatched ahead of the devices (see ``Fence``).
MAX_STEPS_IN_FLIGHT = 32


def _finite_average(name: str) -> type[metrics.Average]:
    """Average of the output ``name`` over the steps whose loss and gradients were finite."""

    @flax.struct.dataclass
    class FiniteAverage(metrics.Average):
        @classmethod
        def from_model_output(cls, **outputs: Any) -> metrics.Average:
            keep = outputs["finite"]
            total = jnp.where(keep, outputs[name], 0.0).astype(jnp.float32)
            return cls(total=total, count=keep.astype(jnp.int32))

    return FiniteAverage


@flax.struct.dataclass
class FirstNonfinite(metrics.Metric):
    """Where the first step with a NaN/Inf loss or gradient lies among the steps merged.

    ``compute()`` counts back from the last step merged: 1 if it was the last one, ``k`` if it was
    ``k - 1`` steps before; 0 if every step was finite.
    """

    steps: jax.Array  # steps merged
    first: jax.Array  # index of the first non-finite one among them; -1: none

    @classmethod
    def empty(cls) -> "FirstNonfinite":
        """No steps merged yet."""
        return cls(steps=jnp.array(0, jnp.int32), first=jnp.array(-1, jnp.int32))

    @classmethod
    def from_model_output(cls, *, finite: jax.Array, **_: Any) -> "FirstNonfinite":
        """One step, finite or not."""
        first = jnp.where(finite, -1, 0).astype(jnp.int32)
        return cls(steps=jnp.ones_like(first), first=first)

    def merge(self, other: "FirstNonfinite") -> "FirstNonfinite":
        """These steps followed by ``other``'s."""
        later = jnp.where(other.first >= 0, self.steps + other.first, -1)
        first = jnp.where(self.first >= 0, self.first, later)
        return type(self)(steps=self.steps + other.steps, first=first)

    def compute(self) -> jax.Array:
        """Steps back from the last one to the first non-finite one, counting both; 0: none."""
        return jnp.where(self.first >= 0, self.steps - self.first, 0)


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
    """Training metrics, averaged over the steps between two log steps.

    Steps whose loss or gradients were NaN/Inf (skipped with ``optimizer.skip_nonfinite``) are
    left out of the averages; ``nonfinite_count`` is the optimizer's running total of them and
    ``first_nonfinite`` (not logged) locates the first one for the trainer's check.
    """

    train_loss: _finite_average("loss")
    train_accuracy: _finite_average("accuracy")
    grad_norm: _finite_average("grad_norm")
    learning_rate: metrics.LastValue.from_output("learning_rate")
    nonfinite_count: metrics.LastValue.from_output("nonfinite_count")
    first_nonfinite: FirstNonfinite


class Preempted(Exception):  # noqa: N818 -- not an error: the run stopped as asked
    """Training stopped on SIGTERM (or Ctrl-C) after saving a checkpoint at ``step``; rerun to
    resume.

    ``history`` holds what was logged before stopping. ``main.py`` exits with ``exit_code``
    (128 + the signal: 143 for SIGTERM, ``EXIT_CODE``, and 130 for SIGINT, what the shell reports
    for a process the signal ended), so schedulers see a stopped run, not a finished one.
    """

    EXIT_CODE = 128 + signal.SIGTERM

    def __init__(
        self,
        step: int,
        history: dict[str, list[tuple[int, float]]],
        signum: int = signal.SIGTERM,
    ) -> None:
        what = "preempted" if signum == signal.SIGTERM else "interrupted"
        name = signal.Signals(signum).name
        super().__init__(f"{what} ({name}): checkpoint saved at step {step}; rerun to resume")
        self.step = step
        self.history = history
        self.exit_code = 128 + signum


class NonFiniteError(RuntimeError):
    """The loss or gradients became NaN/Inf at ``step`` without ``optimizer.skip_nonfinite``."""

    def __init__(self, step: int, message: str) -> None:
        super().__init__(message)
        self.step = step


class _PreemptionNotice:
    """Turns SIGTERM and a first Ctrl-C (SIGINT) into a flag the loop reads once per step (a
    Python bool, no device sync); a second Ctrl-C raises ``KeyboardInterrupt`` at once.

    With several processes, JAX's preemption service (started by ``jax.distributed``) catches
    SIGTERM instead, and every process stops at the same step; Ctrl-C keeps its default there.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested = False
        self.signum = signal.SIGTERM
        self._previous: dict[int, Any] = {}
        self._multihost = jax.process_count() > 1

    def __enter__(self) -> "_PreemptionNotice":
        if not self._multihost and threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._notice)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}

    def _notice(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: stop now
        if not self.requested:
            self.signum = signum
            again = " (Ctrl-C again stops at once)" if signum == signal.SIGINT else ""
            logging.warning("%s: saving a checkpoint after this step, then stopping%s.",
                            signal.Signals(signum).name, again)  # fmt: skip
        self.requested = True

    def reached(self, step: int) -> bool:
        """Whether to save and stop after ``step``."""
        if self._multihost:
            from jax.experimental import multihost_utils

            try:
                return multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError:  # jax.distributed without its preemption service
                return False
        return self.requested


@flax.struct.dataclass
class EvalMetrics(metrics.Collection):
    """Evaluation metrics over every example of the evaluation split (sums only: the devices'
    metrics add up)."""

    eval_loss: metrics.Average.from_output("loss")
    eval_accuracy: metrics.Average.from_output("correct")


class Fence:
    """Bounds how far the host runs ahead of the devices when called with each step's outputs.

    Every ``MAX_STEPS_IN_FLIGHT // 2`` calls it waits for the outputs it was given that many
    calls before -- normally finished long ago, so the devices never run dry. Unbounded, a
    thousand-step log interval queues a thousand executions, and XLA's CPU client aborts once
    about 160 executions with collectives wait on 8 simulated devices.
    """

    def __init__(self, every: int = MAX_STEPS_IN_FLIGHT // 2) -> None:
        self.every, self.calls, self.pending = every, 0, None

    def __call__(self, outputs: Any) -> None:
        self.calls += 1
        if self.calls % self.every == 0:
            if self.pending is not None:
                jax.block_until_ready(self.pending)
            self.pending = outputs


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
    for key in ("batch_size", "eval_batch_size", "num_train_steps", "log_every_steps",
                "eval_every_steps", "checkpoint_every_steps"):  # fmt: skip
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
    nonfinite_count: jax.Array | int = 0,
) -> TrainMetrics:
    """One train step's metrics (inside the step; ``grads`` already averaged over devices).

    ``nonfinite_count`` is ``optim.nonfinite_count(opt_state)``: the steps skipped so far.
    """
    accuracy = losses.accuracy(logits, labels).astype(jnp.float32)
    # Under pmap only the loss and accuracy differ between devices: one mean of these two
    # scalars makes every metric the same on all devices, at a fraction of the cost of
    # gathering whole metrics from each (the same numbers: every device holds as many examples).
    loss, accuracy = dp.mean((loss.astype(jnp.float32), accuracy))
    grad_norm = optax.tree.norm(grads).astype(jnp.float32)  # NaN/Inf if any gradient is
    # Finite as optax.apply_if_finite judges it, element by element: the norm of large finite
    # gradients can overflow. Only then (a cond) is every gradient checked: a finite norm says so.
    grads_finite = jax.lax.cond(jnp.isfinite(grad_norm), lambda _: jnp.array(True), _finite, grads)
    return TrainMetrics.single_from_model_output(
        loss=loss,
        accuracy=accuracy,
        grad_norm=grad_norm,
        learning_rate=jnp.asarray(learning_rate, jnp.float32),
        nonfinite_count=jnp.asarray(nonfinite_count, jnp.float32),
        finite=jnp.isfinite(loss) & grads_finite,
    )


def eval_metrics(
    dp: Any, loss_fn: Callable, logits: jax.Array, labels: jax.Array, mask: jax.Array
) -> EvalMetrics:
    """One eval batch's metrics over its real (``mask``) examples, across devices.

    ``loss_fn`` is one of ``plugins.losses.create``, whose ``per_example`` gives the loss of each
    example; any other ``fn(preds, targets) -> scalar`` is mapped over the examples.
    """
    if hasattr(loss_fn, "per_example"):
        per_example = loss_fn.per_example(logits, labels)
    else:
        per_example = jax.vmap(lambda x, y: loss_fn(x[None], y[None]))(logits, labels)
    correct = jnp.argmax(logits, axis=-1) == labels
    here = EvalMetrics.single_from_model_output(
        loss=per_example.astype(jnp.float32), correct=correct.astype(jnp.float32), mask=mask
    )
    # Sums over this device's real examples (an Average is a total and a count): summed over
    # the devices under pmap, already global under jit.
    return dp.sum(here)


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


@functools.partial(jax.jit, compiler_options=RUN_ONCE_OPTIONS)
def _compute(collection: metrics.Collection) -> dict[str, jax.Array]:
    return collection.compute()  # one program, not one per operation of each metric


def _scalars(collection: metrics.Collection) -> dict[str, float]:
    return {name: float(value) for name, value in jax.device_get(_compute(collection)).items()}


def _finite(tree: Any) -> jax.Array:
    """Whether every float in ``tree`` is finite (traced: the gradients of a step whose norm
    overflowed)."""
    leaves = jax.tree.leaves(tree)
    checks = [jnp.isfinite(x).all() for x in leaves if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.stack(checks).all() if checks else jnp.array(True)


@functools.partial(jax.jit, compiler_options=RUN_ONCE_OPTIONS)
def _all_finite(tree: Any) -> jax.Array:
    """``_finite`` compiled on its own: the state, checked before each checkpoint is saved."""
    return _finite(tree)


def _save_plot(optimizer_config: Any, *, total_steps: int, path: Path) -> None:
    """Writes the LR plot under a temporary name, then renames it: a kill never leaves half."""
    partial = path.with_name(f"{path.stem}.partial{path.suffix}")
    schedules.save_plot(optimizer_config, total_steps=total_steps, path=partial)
    os.replace(partial, path)


def make_setup(
    config: ml_collections.ConfigDict, *, num_classes: int, input_shape: tuple[int, int, int]
) -> Setup:
    """What a variant's ``build_task`` needs: the optimizer, loss and data parallelism of
    ``config`` for a dataset of ``num_classes`` classes of ``input_shape`` images.

    ``run`` reads both from the dataset's metadata. Given them, a model's state and steps can be
    built and compiled without TensorFlow or any data (the repository's ResNet benchmark does
    this on accelerator machines without TensorFlow).
    """
    dp = parallel.DataParallel()
    for key in ("batch_size", "eval_batch_size"):
        config_errors.check_batch_divides(config[key], key, dp.num_devices)
    wanted = optim.extra_update_args(config.optimizer)
    if wanted - SUPPORTED_UPDATE_ARGS:
        raise config_errors.ConfigError(
            f"optimizer.name={config.optimizer.name!r} needs the update argument(s) "
            f"{sorted(wanted - SUPPORTED_UPDATE_ARGS)} that this trainer does not supply"
        )
    return Setup(
        dp=dp,
        tx=optim.create(config.optimizer, total_steps=config.num_train_steps),
        loss_fn=losses.create(config.loss),
        update_args=wanted,
        num_classes=num_classes,
        input_shape=tuple(input_shape),
        dtype=jnp.bfloat16 if config.half_precision else jnp.float32,
    )


def checkpoint_mismatch(directory: Path, target: Any) -> str | None:
    """How the arrays saved in ``directory`` differ from ``target``'s (paths and shapes), or
    ``None`` when they fit (or the checkpoint's metadata cannot be read: restore will tell)."""
    try:
        metadata = ocp.StandardCheckpointer().metadata(directory).item_metadata
    except Exception:  # noqa: BLE001 -- an unreadable layout is left for restore to report
        return None
    metadata = getattr(metadata, "tree", metadata)

    def shape_of(tree: Any) -> dict[str, tuple[int, ...]]:
        paths, leaves = masks.path_strings(tree), jax.tree.leaves(tree)
        return {p: tuple(getattr(x, "shape", ())) for p, x in zip(paths, leaves, strict=True)}

    stored, wanted = shape_of(metadata), shape_of(target)
    state_paths = [p for p in wanted if p.startswith("state/")]
    if state_paths and not any(p in stored for p in state_paths):
        return (
            "no array of its train state is where this project keeps one: NNX and Linen "
            "projects lay out their state differently, so was it written by the other model_api?"
        )
    for path, shape in wanted.items():
        if path in stored and stored[path] != shape:
            return f"{path!r} is {stored[path]} there, {shape} here"
    missing = [p for p in wanted if p not in stored]
    if missing:
        more = f" and {len(missing) - 1} more" if missing[1:] else ""
        return f"it has no {missing[0]!r}{more}"
    extra = [p for p in stored if p not in wanted]
    if extra:
        return f"it has {extra[0]!r}, which this config does not"
    return None


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
    # TensorFlow (for tfds reading and TensorBoard events) and clu's writers take seconds to
    # import and are first needed after the model is built and its steps are compiled: import
    # them meanwhile.
    tensorflow_setup.start_import(WRITER_MODULES)
    num_classes, input_shape = input_pipeline.dataset_info(config)
    setup = make_setup(config, num_classes=num_classes, input_shape=input_shape)
    dp, total_steps = setup.dp, config.num_train_steps
    task = build_task(config, setup)

    workdir_path = Path(workdir).absolute()
    is_chief = jax.process_index() == 0
    checkpoints = ocp.CheckpointManager(
        workdir_path / "checkpoints",
        # orbax writes a checkpoint into '<step>.orbax-checkpoint-tmp' and renames it when
        # complete: a save killed midway leaves only that folder, which latest_step() never
        # picks and which is deleted here.
        options=ocp.CheckpointManagerOptions(
            max_to_keep=3, create=True, cleanup_tmp_directories=True
        ),
    )
    state = dp.put_state(task.state)
    empty_train = dp.put_state(TrainMetrics.empty())
    accumulated = empty_train  # train metrics since the last log step
    latest = checkpoints.latest_step()
    if latest is not None:
        # Restore straight into the layout checkpoints are saved from (global arrays under jit).
        # A checkpoint also holds the train metrics accumulated since the last log step, so a
        # resumed run logs exactly what an uninterrupted one would.
        saved = dict(state=dp.host_state(state), train_metrics=dp.host_state(empty_train))
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, saved)
        mismatch = checkpoint_mismatch(checkpoints.directory / str(latest) / "default", target)
        if mismatch:
            checkpoints.close()
            raise config_errors.ConfigError(
                f"the checkpoint of step {latest} in {checkpoints.directory} was written for a "
                f"different model or optimizer ({mismatch}); rerun with the config it was "
                "trained with, or start afresh with a new --workdir"
            )
        restored = checkpoints.restore(latest, args=ocp.args.StandardRestore(target))
        state = dp.put_state(restored["state"])
        accumulated = dp.put_state(restored["train_metrics"])
        logging.info("Resumed from the checkpoint of step %d in %s", latest, workdir_path)
    initial_step = task.step_of(dp.host_state(state))

    empty_eval = dp.put_state(EvalMetrics.empty())
    train_step = dp.compile_train_step(task.train_step)
    eval_step = dp.compile_eval_step(task.eval_step)
    # Each process reads its own share of every global batch.
    local_batch = config.batch_size // jax.process_count()
    local_eval_batch = config.eval_batch_size // jax.process_count()
    # Compiled now, while TensorFlow imports, on zeros in the form the steps take batches; the
    # loop's calls find them in jit's cache.
    train_batch = next(dp.train_batches([data.example_batch(input_shape, local_batch)]))
    eval_zeros = data.example_batch(input_shape, local_eval_batch, train=False)
    eval_batch = next(dp.eval_batches([eval_zeros]))
    train_step.lower(state, accumulated, train_batch).compile()
    eval_step.lower(state, empty_eval, eval_batch).compile()
    tensorflow_setup.wait(WRITER_MODULES)
    from clu import metric_writers, periodic_actions

    writer = metric_writers.create_default_writer(str(workdir_path), just_logging=not is_chief)
    plot_thread = None
    if is_chief:
        # Each run records its own config (a rerun may train longer, or with another batch size).
        writer.write_hparams(_flat_hparams(config))
        logging.info(
            "Parameters:\n%s", masks.summary(task.params, config.optimizer, total_steps=total_steps)
        )
        # matplotlib is slow to import: plot while the steps compile.
        accumulate = config.optimizer.get("accumulate_steps", 1) or 1
        plot_thread = threading.Thread(
            target=_save_plot,
            args=(config.optimizer,),
            kwargs=dict(
                total_steps=optim.optimizer_steps(total_steps, accumulate),
                path=workdir_path / "learning_rate.png",
            ),
            daemon=True,
        )
        plot_thread.start()

    history: dict[str, list[tuple[int, float]]] = collections.defaultdict(list)

    def write(step: int, scalars: dict[str, float]) -> None:
        writer.write_scalars(step, scalars)
        for name, value in scalars.items():
            history[name].append((step, value))

    def evaluate(state: Any) -> dict[str, float]:
        totals, fence = empty_eval, Fence()
        batches = input_pipeline.eval_batches(config, batch_size=local_eval_batch)
        for batch in dp.eval_batches(batches):
            totals = eval_step(state, totals, batch)
            fence(totals)
        return _scalars(dp.to_host(totals))

    skip_nonfinite = bool(config.optimizer.get("skip_nonfinite", False))

    def kept() -> str:
        """What a run stopped for NaN/Inf leaves behind."""
        good = checkpoints.latest_step()
        if good is None:
            return "no checkpoint was saved"
        return (
            f"the last good checkpoint, step {good} in {workdir_path / 'checkpoints'}, is intact "
            "and a rerun resumes from it"
        )

    def check_finite(step: int, back: float) -> None:
        """Stops the run if a step up to ``step`` had a NaN/Inf loss or gradient (``back`` is
        ``FirstNonfinite.compute()``), unless the optimizer skips such steps."""
        if not back or skip_nonfinite:
            return
        first = step - int(back) + 1
        where = (
            " in a new --workdir (skipping adds to the optimizer state, so these checkpoints "
            "cannot resume with it)"
            if checkpoints.latest_step() is not None
            else ""
        )
        raise NonFiniteError(
            first,
            f"the loss or gradients became NaN/Inf at step {first} (found at step {step}); "
            f"stopped without saving: {kept()}. To skip such batches instead, set "
            f"--config.optimizer.skip_nonfinite=True{where}",
        )

    def warn_if_all_skipped(step: int, scalars: dict[str, float]) -> None:
        """Warns when every step since the last log step was skipped as non-finite: the run
        goes on, but nothing is learnt (the averaged train metrics are NaN: no step counted)."""
        if skip_nonfinite and math.isnan(scalars.get("train_loss", 0.0)):
            since = max(history["train_loss"][-1][0] if history["train_loss"] else 0, initial_step)
            logging.warning(
                "Every step from %d to %d was skipped: the loss or gradients were NaN/Inf "
                "(%d skipped so far). Nothing is being learnt; a lower learning rate, "
                "clip_global_norm or half_precision=False may help.",
                since + 1, step, int(scalars.get("nonfinite_count", 0)),
            )  # fmt: skip

    def save_checkpoint(step: int, state: Any, accumulated: TrainMetrics) -> None:
        saved = dict(state=dp.host_state(state), train_metrics=dp.host_state(accumulated))
        if not bool(_all_finite(saved)):
            why = (
                ": the gradients were finite (skip_nonfinite skips only non-finite ones) but the "
                "updates overflowed the parameters or the optimizer state; a lower learning rate "
                "or clip_global_norm may help"
                if skip_nonfinite
                else ""
            )
            raise NonFiniteError(
                step,
                f"the train state holds NaN/Inf at step {step}{why}; not saved: {kept()}",
            )
        writer.flush()  # what was logged up to this checkpoint is on disk before it exists
        checkpoints.save(step, args=ocp.args.StandardSave(saved))

    report = periodic_actions.ReportProgress(
        num_train_steps=total_steps, writer=writer, every_steps=config.log_every_steps
    )
    host_batches = input_pipeline.train_batches(
        config, batch_size=local_batch, start_step=initial_step
    )
    train_batches = dp.train_batches(host_batches)
    if initial_step < total_steps:
        logging.info("Training steps %d to %d on %d device(s).", initial_step + 1, total_steps,
                     dp.num_devices)  # fmt: skip
    start = time.monotonic()
    preemption = _PreemptionNotice()
    preempted_at = None
    try:
        with preemption, metric_writers.ensure_flushes(writer):
            fence = Fence()
            for step in range(initial_step + 1, total_steps + 1):
                state, accumulated = train_step(state, accumulated, next(train_batches))
                fence(accumulated)
                last = step == total_steps
                stop = not last and preemption.reached(step)
                log = step % config.log_every_steps == 0 or last
                evaluate_now = step % config.eval_every_steps == 0 or last
                save = step % config.checkpoint_every_steps == 0 or last or stop
                if log or evaluate_now or save:  # the only steps that wait for the devices
                    scalars = _scalars(dp.to_host(accumulated))
                    check_finite(step, scalars.pop("first_nonfinite"))
                if log:
                    warn_if_all_skipped(step, scalars)
                    write(step, scalars)
                    accumulated = empty_train
                report(step)
                if evaluate_now:
                    with report.timed("eval"):
                        write(step, evaluate(state))
                if save:
                    with report.timed("checkpoint"):
                        save_checkpoint(step, state, accumulated)
                if stop:
                    preempted_at = step
                    break
            if initial_step >= total_steps:
                logging.info("Already trained %d steps; evaluating only.", initial_step)
                write(initial_step, evaluate(state))
    finally:
        if hasattr(host_batches, "close"):
            host_batches.close()
        checkpoints.wait_until_finished()  # a checkpoint being written is completed
        checkpoints.close()
        if plot_thread is not None:
            plot_thread.join()
        writer.close()
    if preempted_at is not None:
        raise Preempted(preempted_at, dict(history), preemption.signum)
    final = {name: values[-1][1] for name, values in history.items() if name.startswith("eval_")}
    logging.info("Done in %.1f s of training; final %s", time.monotonic() - start, final)
    return dict(history)
