"""The training loop a generated project's ``train.py`` hands its compiled steps to.

``train.py`` builds the model, the optimizer and the train state, writes ``train_step`` and
``eval_step``, compiles them for the devices (its ``parallel.py``) and calls :func:`fit`, which
does what every run needs and no step should:

- metrics go to TensorBoard and the console (clu metric writers; only process 0 writes), with
  progress and ETA (clu's ``ReportProgress``);
- the train step carries its metrics (``plugins.metrics.TrainMetrics``) on the devices, so the
  hot loop never waits for the host except at log, eval and checkpoint steps, and never runs
  more than ``MAX_STEPS_IN_FLIGHT`` steps ahead of the devices (:class:`Fence`);
- orbax checkpoints go to ``<workdir>/checkpoints`` every ``checkpoint_every_steps`` and at the
  end, and a rerun resumes from the latest one, data position and metrics since the last log
  step included, exactly as if never stopped;
- SIGTERM (preemption) and a first Ctrl-C finish the current step, save a checkpoint and raise
  :class:`Preempted` (a second Ctrl-C stops at once);
- a NaN/Inf loss or gradient is skipped and counted with ``optimizer.skip_nonfinite``, else it
  stops the run with :class:`NonFiniteError` naming its step; no checkpoint holding NaN/Inf is
  ever written.

Call :func:`prepare` first: it checks the config (one ``ConfigError`` naming the first bad key,
before anything compiles or any file is written) and imports TensorFlow and the writers in the
background while the model is built and its steps compile.
"""

from __future__ import annotations

import collections
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

from plugins import config_errors, data, losses, masks, metrics, optim, schedules, tensorflow_setup

History = dict[str, list[tuple[int, float]]]

# The top-level config keys a generated project's config has (configs/default.py says what each
# does). A key of your own: pass it to ``prepare(..., extra_keys=...)``.
CONFIG_KEYS = (
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
# Keys a config may have; their defaults when it has not.
OPTIONAL_KEYS = {"profile_steps": 0, "mesh": None}
# A profile (``profile_steps``) starts after this many steps of the run: compiled and warm.
PROFILE_AFTER_STEPS = 5
# Imported with TensorFlow in a background thread while the steps compile (see ``prepare``).
WRITER_MODULES = ("clu.metric_writers", "clu.periodic_actions")
# At most this many steps are dispatched ahead of the devices (see ``Fence``).
MAX_STEPS_IN_FLIGHT = 32


class Parallel(Protocol):
    """What :func:`fit` needs of a project's ``parallel.DataParallel`` (jit or pmap)."""

    num_devices: int

    def put_state(self, state: Any) -> Any: ...  # host state -> as the compiled steps take it
    def host_state(self, state: Any) -> Any: ...  # as checkpointed
    def to_host(self, tree: Any) -> Any: ...  # one copy of replicated values
    def train_batches(self, batches: Iterable[dict]) -> Iterator[dict]: ...
    def eval_batches(self, batches: Iterable[dict]) -> Iterator[dict]: ...


class Preempted(Exception):  # noqa: N818 -- not an error: the run stopped as asked
    """Training stopped on SIGTERM (or Ctrl-C) after saving a checkpoint at ``step``; rerun to
    resume.

    ``history`` holds what was logged before stopping. ``main.py`` exits with ``exit_code``
    (128 + the signal: 143 for SIGTERM, ``EXIT_CODE``, and 130 for SIGINT, what the shell reports
    for a process the signal ended), so schedulers see a stopped run, not a finished one.
    """

    EXIT_CODE = 128 + signal.SIGTERM

    def __init__(self, step: int, history: History, signum: int = signal.SIGTERM) -> None:
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


class CheckpointNotFound(FileNotFoundError):
    """The workdir has no checkpoint (of the step asked for) to evaluate."""


class PreemptionNotice:
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

    def __enter__(self) -> PreemptionNotice:
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


# ----------------------------------------------------------------------------- config


def _positive_int(cfg: dict[str, Any], key: str, minimum: int = 1) -> None:
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise config_errors.ConfigError(f"{key} must be an int >= {minimum}, got {value!r}")


def check_config(
    config: ml_collections.ConfigDict,
    *,
    model_check: Callable[[Any], Any],
    extra_keys: Sequence[str] = (),
) -> None:
    """Raises ``ConfigError`` naming the first bad key of ``config``; compiles nothing.

    Args:
      config: the run's config.
      model_check: the project's ``models.check_model_config``.
      extra_keys: top-level keys of your own, besides ``CONFIG_KEYS``.
    """
    cfg = config_errors.as_dict(config)
    config_errors.check_keys(cfg, (*CONFIG_KEYS, *OPTIONAL_KEYS, *extra_keys), "config")
    missing = [k for k in CONFIG_KEYS if k not in cfg]
    if missing:
        raise config_errors.ConfigError(f"config is missing the key(s) {', '.join(missing)}")
    _positive_int(cfg, "seed", minimum=0)
    _positive_int({**OPTIONAL_KEYS, **cfg}, "profile_steps", minimum=0)
    if cfg.get("mesh") is not None and not isinstance(cfg["mesh"], dict):
        raise config_errors.ConfigError(
            f"mesh must be a dict of axis sizes, e.g. dict(data=-1, fsdp=1); got {cfg['mesh']!r}"
        )
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
    optim.optimizer_steps(config.num_train_steps, config.optimizer.get("accumulate_steps") or 1)
    wanted = optim.extra_update_args(config.optimizer)
    if wanted - optim.SUPPLIED_UPDATE_ARGS:
        raise config_errors.ConfigError(
            f"optimizer.name={config.optimizer.name!r} needs the update argument(s) "
            f"{sorted(wanted - optim.SUPPLIED_UPDATE_ARGS)} that the train step does not supply"
        )
    for key in ("batch_size", "eval_batch_size"):
        config_errors.check_batch_divides(config[key], key, jax.device_count())


def prepare(
    config: ml_collections.ConfigDict,
    *,
    model_check: Callable[[Any], Any],
    extra_keys: Sequence[str] = (),
) -> None:
    """Checks ``config`` (:func:`check_config`), then starts importing TensorFlow (for tfds
    and TensorBoard events) and clu's writers in a background thread: they take seconds and are
    first needed after the model is built and its steps compile."""
    check_config(config, model_check=model_check, extra_keys=extra_keys)
    tensorflow_setup.start_import(WRITER_MODULES)


# ----------------------------------------------------------------------------- checkpoints


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


def _checkpoint_manager(workdir: Path) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        workdir / "checkpoints",
        # orbax writes a checkpoint into '<step>.orbax-checkpoint-tmp' and renames it when
        # complete: a save killed midway leaves only that folder, which latest_step() never
        # picks and which is deleted here.
        options=ocp.CheckpointManagerOptions(
            max_to_keep=3, create=True, cleanup_tmp_directories=True
        ),
    )


def _restore(
    checkpoints: ocp.CheckpointManager, step: int, state: Any, train_metrics: Any, parallel: Any
) -> tuple[Any, Any]:
    """The state and train metrics saved at ``step``, placed as the steps take them."""
    # Restore straight into the layout checkpoints are saved from (global arrays under jit).
    saved = dict(state=parallel.host_state(state), train_metrics=parallel.host_state(train_metrics))
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, saved)
    mismatch = checkpoint_mismatch(checkpoints.directory / str(step) / "default", target)
    if mismatch:
        raise config_errors.ConfigError(
            f"the checkpoint of step {step} in {checkpoints.directory} was written for a "
            f"different model or optimizer ({mismatch}); rerun with the config it was "
            "trained with, or start afresh with a new --workdir"
        )
    restored = checkpoints.restore(step, args=ocp.args.StandardRestore(target))
    return parallel.put_state(restored["state"]), parallel.put_state(restored["train_metrics"])


# ----------------------------------------------------------------------------- files


def flat_hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config as ``{'optimizer.learning_rate': 0.003, ...}`` (TensorBoard's hparams)."""
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


def config_file_text(config: ml_collections.ConfigDict) -> str:
    """A config file holding ``config`` as resolved (command-line overrides included): rerun
    with ``--config=<workdir>/config.py``, or diff two runs' files."""
    return (
        '"""The config this run was started with (written by plugins.loop.fit)."""\n\n'
        "import ml_collections\n\n\n"
        "def get_config() -> ml_collections.ConfigDict:\n"
        f"    return ml_collections.ConfigDict({config_errors.as_dict(config)!r})\n"
    )


def _write_atomically(path: Path, write: Callable[[Path], Any]) -> None:
    """``write(temporary path)``, then renames it to ``path``: a kill never leaves half."""
    partial = path.with_name(f"{path.stem}.partial{path.suffix}")
    write(partial)
    os.replace(partial, path)


def _save_plot(optimizer_config: Any, *, total_steps: int, path: Path) -> None:
    _write_atomically(
        path,
        lambda p: schedules.save_plot(optimizer_config, total_steps=total_steps, path=p),
    )


# ----------------------------------------------------------------------------- the loop


class _Profile:
    """A ``jax.profiler`` trace of ``steps`` training steps, ``PROFILE_AFTER_STEPS`` after the
    run's ``first`` step, into ``<workdir>/plugins/profile/<time>/`` (TensorBoard's profile
    plugin shows it: ``tensorboard --logdir <workdir>``, tab PROFILE). Process 0 only."""

    def __init__(self, workdir: Path, steps: int, first: int) -> None:
        self.workdir, self.steps = workdir, steps if jax.process_index() == 0 else 0
        self.start = first + PROFILE_AFTER_STEPS
        self.running = False

    def before(self, step: int) -> None:
        if self.steps and step == self.start:
            jax.profiler.start_trace(str(self.workdir))
            self.running = True

    def after(self, step: int, outputs: Any) -> None:
        if self.running and step == self.start + self.steps - 1:
            jax.block_until_ready(outputs)  # the traced steps run inside the trace
            self.stop()
            logging.info("Profiled steps %d to %d into %s", self.start, step, self.workdir)

    def stop(self) -> None:
        if self.running:
            self.running = False
            jax.profiler.stop_trace()


def fit(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    state: Any,
    train_step: Any,
    eval_step: Any,
    parallel: Parallel,
    train_batches: Callable[[int], Iterator[dict]],
    eval_batches: Callable[[], Iterable[dict]],
    input_shape: Sequence[int],
) -> History:
    """Trains ``state`` to ``config.num_train_steps``, evaluating, logging and checkpointing in
    ``workdir``; a rerun with the same ``workdir`` resumes from its latest checkpoint.

    Args:
      config: the run's config (checked by :func:`prepare`).
      workdir: where TensorBoard events, checkpoints, the config and the LR plot go.
      state: the initial train state, on the host.
      train_step: compiled ``(state, TrainMetrics, batch) -> (state, TrainMetrics)``, the state
        donated.
      eval_step: compiled ``(state, EvalMetrics, batch) -> EvalMetrics``.
      parallel: the project's ``parallel.DataParallel``: places state and batches for the
        steps and reads them back.
      train_batches: ``start_step -> iterator`` of this process's training batches from that
        step on (``image``, ``label``).
      eval_batches: ``() -> iterable`` of this process's evaluation batches (``image``,
        ``label``, ``mask``).
      input_shape: an image's shape: the steps are compiled on zeros of it before any data is
        read.

    Returns:
      Every logged scalar: ``{name: [(step, value), ...]}``.
    """
    total_steps = config.num_train_steps
    workdir_path = Path(workdir).absolute()
    is_chief = jax.process_index() == 0
    checkpoints = _checkpoint_manager(workdir_path)
    state = parallel.put_state(state)
    empty_train = parallel.put_state(metrics.TrainMetrics.empty())
    accumulated = empty_train  # train metrics since the last log step
    initial_step = checkpoints.latest_step() or 0
    if initial_step:
        try:
            state, accumulated = _restore(checkpoints, initial_step, state, empty_train, parallel)
        except BaseException:
            checkpoints.close()
            raise
        logging.info("Resumed from the checkpoint of step %d in %s", initial_step, workdir_path)

    # Compiled now, while TensorFlow imports, on zeros in the form the steps take batches; the
    # loop's calls find them in jit's cache.
    empty_eval = parallel.put_state(metrics.EvalMetrics.empty())
    local_batch = config.batch_size // jax.process_count()
    local_eval_batch = config.eval_batch_size // jax.process_count()
    train_zeros = data.example_batch(tuple(input_shape), local_batch)
    eval_zeros = data.example_batch(tuple(input_shape), local_eval_batch, train=False)
    train_step.lower(state, accumulated, next(parallel.train_batches([train_zeros]))).compile()
    eval_step.lower(state, empty_eval, next(parallel.eval_batches([eval_zeros]))).compile()
    tensorflow_setup.wait(WRITER_MODULES)
    from clu import metric_writers, periodic_actions

    writer = metric_writers.create_default_writer(str(workdir_path), just_logging=not is_chief)
    plot_thread = None
    if is_chief:
        # Each run records its own config (a rerun may train longer, or with another batch size).
        writer.write_hparams(flat_hparams(config))
        config_text = config_file_text(config)
        _write_atomically(workdir_path / "config.py", lambda p: p.write_text(config_text))
        # matplotlib is slow to import: plot while the first steps run.
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

    history: History = collections.defaultdict(list)
    skip_nonfinite = bool(config.optimizer.get("skip_nonfinite", False))

    def write(step: int, scalars: dict[str, float]) -> None:
        writer.write_scalars(step, scalars)
        for name, value in scalars.items():
            history[name].append((step, value))

    def evaluate(state: Any) -> dict[str, float]:
        totals, fence = empty_eval, Fence()
        for batch in parallel.eval_batches(eval_batches()):
            totals = eval_step(state, totals, batch)
            fence(totals)
        return metrics.scalars(parallel.to_host(totals))

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

    def save_checkpoint(step: int, state: Any, accumulated: Any) -> None:
        saved = dict(
            state=parallel.host_state(state), train_metrics=parallel.host_state(accumulated)
        )
        if not bool(metrics.all_finite(saved)):
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
    host_batches = train_batches(initial_step)
    device_batches = parallel.train_batches(host_batches)
    if initial_step < total_steps:
        logging.info("Training steps %d to %d on %d device(s).", initial_step + 1, total_steps,
                     parallel.num_devices)  # fmt: skip
    start = time.monotonic()
    preemption = PreemptionNotice()
    preempted_at = None
    profile = _Profile(workdir_path, config.get("profile_steps", 0), first=initial_step + 1)
    try:
        with preemption, metric_writers.ensure_flushes(writer):
            fence = Fence()
            for step in range(initial_step + 1, total_steps + 1):
                profile.before(step)
                state, accumulated = train_step(state, accumulated, next(device_batches))
                fence(accumulated)
                profile.after(step, accumulated)
                last = step == total_steps
                stop = not last and preemption.reached(step)
                log = step % config.log_every_steps == 0 or last
                evaluate_now = step % config.eval_every_steps == 0 or last
                save = step % config.checkpoint_every_steps == 0 or last or stop
                if log or evaluate_now or save:  # the only steps that wait for the devices
                    scalars = metrics.scalars(parallel.to_host(accumulated))
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
        profile.stop()
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


class _OneDevice:
    """Placement on the default device (``restore`` without a ``parallel``)."""

    def put_state(self, state: Any) -> Any:
        return jax.device_put(state, jax.devices()[0])

    def host_state(self, state: Any) -> Any:
        return state


def restore(
    workdir: str, state: Any, *, parallel: Parallel | None = None, step: int | None = None
) -> tuple[int, Any]:
    """``(step, state)`` of the checkpoint of ``step`` (default: the latest) in ``workdir``,
    writing nothing.

    ``state`` is an initial train state of the run's config, on the host (the checkpoint is
    restored into its layout); the result is placed as ``parallel`` places states for the
    compiled steps, or on one device. Raises :class:`CheckpointNotFound` when there is no such
    checkpoint, ``ConfigError`` when it was written for another model or optimizer.
    """
    parallel = parallel or _OneDevice()
    directory = Path(workdir).absolute() / "checkpoints"
    if not directory.is_dir():
        raise CheckpointNotFound(f"{directory} does not exist: train first, or name the workdir")
    checkpoints = ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(create=False)
    )
    try:
        steps = checkpoints.all_steps()
        if not steps:
            raise CheckpointNotFound(f"{directory} holds no checkpoint: train first")
        step = max(steps) if step is None else step
        if step not in steps:
            raise CheckpointNotFound(
                f"{directory} holds no checkpoint of step {step}; it has steps "
                f"{', '.join(map(str, sorted(steps)))}"
            )
        empty_train = parallel.put_state(metrics.TrainMetrics.empty())
        state, _ = _restore(checkpoints, step, parallel.put_state(state), empty_train, parallel)
    finally:
        checkpoints.close()
    return step, state


def evaluate(
    workdir: str,
    *,
    state: Any,
    eval_step: Any,
    parallel: Parallel,
    eval_batches: Callable[[], Iterable[dict]],
    step: int | None = None,
) -> tuple[int, dict[str, float]]:
    """Evaluates the checkpoint of ``step`` (default: the latest) in ``workdir``, training
    nothing and writing nothing; returns ``(step, {'eval_loss': ..., 'eval_accuracy': ...})``.

    ``state`` is an initial train state of the run's config (see :func:`restore`); the other
    arguments are :func:`fit`'s.
    """
    step, state = restore(workdir, state, parallel=parallel, step=step)
    totals, fence = parallel.put_state(metrics.EvalMetrics.empty()), Fence()
    for batch in parallel.eval_batches(eval_batches()):
        totals = eval_step(state, totals, batch)
        fence(totals)
    scalars = metrics.scalars(parallel.to_host(totals))
    logging.info("Evaluated the checkpoint of step %d in %s: %s", step, workdir, scalars)
    return step, scalars
