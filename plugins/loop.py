"""The training loop a generated project's ``train.py`` hands its compiled steps to.

``train.py`` builds the model, the optimizer and the train state, writes ``train_step`` and
``eval_step``, compiles them for the devices (its ``parallel.py``) and calls :func:`fit`, which
does what every run needs and no step should:

- metrics go to TensorBoard (clu's metric writers; process 0 writes) and to the console, one line
  per log step with the percent done and the ETA (timed by clu's ``ReportProgress``);
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
import contextlib
import errno
import gc
import json
import logging as std_logging
import math
import os
import signal
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from plugins import (
    augment,
    config_cli,
    config_errors,
    data,
    losses,
    masks,
    metrics,
    optim,
    schedules,
    tensorflow_setup,
)

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
OPTIONAL_KEYS = {"profile_steps": 0, "mesh": None, "augment": ()}
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


# JAX's PRNG keys take 32 bits of a seed (2**32 would be seed 0 again); step counters (optax's,
# the train state's) are int32.
MAX_SEED = 2**32 - 1
MAX_STEPS = 2**31 - 1


def _positive_int(
    cfg: dict[str, Any], key: str, minimum: int = 1, maximum: int | None = None, why: str = ""
) -> None:
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise config_errors.ConfigError(f"{key} must be an int >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise config_errors.ConfigError(
            f"{key} must be an int <= {maximum} (2**{maximum.bit_length()} - 1{why}), got {value!r}"
        )


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
    if not isinstance(config, ml_collections.ConfigDict):
        raise config_errors.ConfigError(
            f"the config must be an ml_collections.ConfigDict, got a {type(config).__name__} "
            "(wrap it: ml_collections.ConfigDict(...))"
        )
    cfg = config_errors.as_dict(config)
    config_errors.check_keys(cfg, (*CONFIG_KEYS, *OPTIONAL_KEYS, *extra_keys), "config")
    missing = [k for k in CONFIG_KEYS if k not in cfg]
    if missing:
        raise config_errors.ConfigError(f"config is missing the key(s) {', '.join(missing)}")
    _positive_int(cfg, "seed", minimum=0, maximum=MAX_SEED, why=": JAX keys take 32 bits of it")
    _positive_int({**OPTIONAL_KEYS, **cfg}, "profile_steps", minimum=0)
    if cfg.get("mesh") is not None and not isinstance(cfg["mesh"], dict):
        raise config_errors.ConfigError(
            f"mesh must be a dict of axis sizes, e.g. dict(data=-1, fsdp=1); got {cfg['mesh']!r}"
        )
    for key in ("batch_size", "eval_batch_size"):  # checked against the data in dataset_info
        _positive_int(cfg, key)
    for key in ("num_train_steps", "log_every_steps", "eval_every_steps",
                "checkpoint_every_steps"):  # fmt: skip
        _positive_int(cfg, key, maximum=MAX_STEPS, why=": step counters are int32")
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
    augment.check(cfg.get("augment"))
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


class WorkdirError(RuntimeError):
    """The workdir cannot be used as it is (``main.py``: ``workdir error: ...``, exit code 1)."""


class CheckpointDamaged(WorkdirError):
    """The checkpoint of ``step`` in ``directory`` cannot be used: ``why`` (a missing, truncated or
    changed file, unreadable metadata, an array that does not match its checksum, NaN/Inf)."""

    def __init__(self, directory: Any, step: int, why: str) -> None:
        super().__init__(f"the checkpoint of step {step} in {directory} is damaged: {why}")
        self.directory, self.step, self.why = directory, step, why


class NoSpaceLeft(WorkdirError):
    """A checkpoint (or another file of the run) could not be written: the device is full."""


# Where the per-array checksums go in a step's ``_CHECKPOINT_METADATA`` (orbax's custom metadata).
CHECKSUMS_KEY = "plugins_crc32"


def _host_bytes(leaf: Any) -> list[tuple[str, np.ndarray]]:
    """``[(shard index, host array)]`` of ``leaf`` as checksummed: the whole array (``''``)
    when this process holds all of it, else each of its own shards, named by their index."""
    if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        leaf = jax.random.key_data(leaf)
    if isinstance(leaf, jax.Array) and not (leaf.is_fully_addressable or leaf.is_fully_replicated):
        return [
            (str(tuple((i.start, i.stop) for i in shard.index)), np.asarray(shard.data))
            for shard in leaf.addressable_shards
            if shard.replica_id == 0
        ]
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        leaf = leaf.addressable_data(0)  # replicated over the processes: one whole copy
    return [("", np.asarray(leaf))]


def checksums(tree: Any) -> dict[str, dict[str, int]]:
    """``{path: {shard index or '': crc32}}`` of every array of ``tree``: the bytes as on the
    host, so a changed byte in a checkpoint's data shows after restore.

    Costs one copy of the arrays to the host and a CRC32 over them (GB/s) per save and restore:
    small next to the save itself for this template's models. An array spread over several
    processes (multi-host FSDP) is summed shard by shard, over the shards this process holds
    (process 0 saves the sums: the other processes' shards are left unchecked).
    """
    sums: dict[str, dict[str, int]] = {}
    for path, leaf in zip(masks.path_strings(tree), jax.tree.leaves(tree), strict=True):
        sums[path] = {
            index: zlib.crc32(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
            for index, array in _host_bytes(leaf)
        }
    return sums


def checksum_mismatch(saved: dict[str, dict[str, int]], tree: Any) -> str | None:
    """The first array of ``tree`` whose checksum differs from ``saved`` (:func:`checksums` of
    what was saved), or None. Shards not in ``saved`` (another layout) are not compared."""
    for path, sums in checksums(tree).items():
        for index, crc in sums.items():
            if path in saved and index in saved[path] and saved[path][index] != crc:
                return f"{path!r} does not match the checksum saved with it (a changed byte)"
    return None


def _read_checksums(step_dir: Any) -> dict[str, dict[str, int]] | None:
    """The checksums saved with a checkpoint (``None``: written by a version without them);
    raises ``ValueError`` when its ``_CHECKPOINT_METADATA`` is unreadable."""
    path = step_dir / "_CHECKPOINT_METADATA"
    if not path.exists():
        return None
    try:
        sums = (json.loads(path.read_text()).get("custom_metadata") or {}).get(CHECKSUMS_KEY)
    except (ValueError, AttributeError, OSError) as error:
        raise ValueError(f"its {path.name} cannot be read ({_first_line(error)})") from None
    return sums if isinstance(sums, dict) else None


def _first_line(error: BaseException, limit: int = 160) -> str:
    """``Type: the first line of the message``, cut at ``limit`` characters."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    line = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _stored_tree(item_dir: Any) -> Any:
    """The array tree a checkpoint item's metadata lists; raises ``ValueError`` when it
    cannot be read or lists nothing."""
    if not item_dir.is_dir():
        raise ValueError(
            f"it has no {item_dir.name!r} folder (an empty or partly deleted checkpoint)"
        )
    try:
        metadata = ocp.StandardCheckpointer().metadata(item_dir).item_metadata
    except Exception as error:  # noqa: BLE001 -- any unreadable layout is damage
        raise ValueError(f"its metadata cannot be read ({_first_line(error)})") from None
    tree = getattr(metadata, "tree", metadata)
    if not jax.tree.leaves(tree):
        raise ValueError(
            "its metadata lists no arrays (a file of it is missing, cut short or garbled)"
        )
    return tree


def checkpoint_mismatch(directory: Any, target: Any) -> str | None:
    """How the arrays saved in ``directory`` differ from ``target``'s (paths and shapes), or
    ``None`` when they fit. Raises ``ValueError`` when the checkpoint's metadata cannot be read
    (damage, not a mismatch)."""

    def shape_of(tree: Any) -> dict[str, tuple[int, ...]]:
        paths, leaves = masks.path_strings(tree), jax.tree.leaves(tree)
        return {p: tuple(getattr(x, "shape", ())) for p, x in zip(paths, leaves, strict=True)}

    stored, wanted = shape_of(_stored_tree(directory)), shape_of(target)
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


def _checkpoint_manager(workdir: Any) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        workdir / "checkpoints",
        # orbax writes a checkpoint into '<step>.orbax-checkpoint-tmp' and renames it when
        # complete: a save killed midway leaves only that folder, which latest_step() never
        # picks and which is deleted here.
        options=ocp.CheckpointManagerOptions(
            max_to_keep=3, create=True, cleanup_tmp_directories=True
        ),
    )


class _FailedReadNoise(std_logging.Filter):
    """Drops asyncio's "Task exception was never retrieved" for orbax's failed reads of a
    damaged checkpoint and failed writes to a full disk (each is reported in one line)."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        text = str(record.msg) + repr(record.args) + repr(getattr(record, "exc_info", ""))
        return not ("never retrieved" in text and ("tensorstore" in text or "orbax" in text))


def _unraisable_hook(previous: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``sys.unraisablehook`` without the coroutines and event loops orbax leaves behind when
    a read of a damaged checkpoint fails (each else prints a traceback on stderr, at garbage
    collection, after the failure was reported in one line)."""

    def hook(unraisable: Any) -> None:
        error, frames = unraisable.exc_value, []
        traceback = getattr(error, "__traceback__", None)
        while traceback is not None:
            frames.append(traceback.tb_frame.f_code.co_filename)
            traceback = traceback.tb_next
        from_orbax = any("/orbax/" in f for f in frames) or "orbax" in repr(unraisable.object)
        closed = isinstance(error, RuntimeError) and "Event loop is closed" in str(error)
        if not (from_orbax or closed):
            previous(unraisable)

    hook.plugins_quiet = True  # type: ignore[attr-defined]
    return hook


def _quiet_orbax_failures() -> None:
    """Keeps the tracebacks orbax's failed reads and writes leave behind off stderr (installed
    once, on the first damaged checkpoint or full disk met)."""
    if not getattr(sys.unraisablehook, "plugins_quiet", False):
        sys.unraisablehook = _unraisable_hook(sys.unraisablehook)
    asyncio_logger = std_logging.getLogger("asyncio")
    if not any(isinstance(f, _FailedReadNoise) for f in asyncio_logger.filters):
        asyncio_logger.addFilter(_FailedReadNoise())


def _agreed(bad: bool) -> bool:
    """``bad`` as process 0 found it, on every process (each decides the same)."""
    if jax.process_count() == 1:
        return bad
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.int32(bad)))


def _restore(
    checkpoints: ocp.CheckpointManager, step: int, state: Any, train_metrics: Any, parallel: Any
) -> tuple[Any, Any]:
    """The state and train metrics saved at ``step``, placed as the steps take them.

    Raises :class:`CheckpointDamaged` for a checkpoint that cannot be what was saved (a file
    missing, truncated or changed, unreadable metadata, an array that does not match its
    checksum, NaN/Inf, which no save writes) and ``ConfigError`` for one written for another
    model or optimizer (its arrays have other names or shapes).
    """
    step_dir = checkpoints.directory / str(step)

    def damaged(why: str) -> CheckpointDamaged:
        return CheckpointDamaged(checkpoints.directory, step, why)

    # Restore straight into the layout checkpoints are saved from (global arrays under jit).
    saved = dict(state=parallel.host_state(state), train_metrics=parallel.host_state(train_metrics))
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, saved)
    try:
        sums = _read_checksums(step_dir)
        mismatch = checkpoint_mismatch(step_dir / "default", target)
    except ValueError as error:
        raise damaged(str(error)) from None
    if mismatch:
        raise config_errors.ConfigError(
            f"the checkpoint of step {step} in {checkpoints.directory} was written for a "
            f"different model or optimizer ({mismatch}); rerun with the config it was "
            "trained with, or start afresh with a new --workdir"
        )
    try:
        restored = checkpoints.restore(step, args=ocp.args.StandardRestore(target))
    except Exception as error:  # noqa: BLE001 -- a file missing, truncated or garbled
        _quiet_orbax_failures()
        gc.collect()  # orbax's failed reads, now, while their noise is filtered
        raise damaged(f"its data cannot be read ({_first_line(error)})") from None
    wrong = checksum_mismatch(sums, restored) if sums and jax.process_index() == 0 else None
    if _agreed(bool(wrong)):
        raise damaged(wrong or "an array does not match the checksum saved with it")
    if not bool(metrics.all_finite(restored)):
        raise damaged("it holds NaN/Inf, which no save writes: it was changed after saving")
    return parallel.put_state(restored["state"]), parallel.put_state(restored["train_metrics"])


def _move_aside(checkpoints: ocp.CheckpointManager, step: int) -> Any:
    """Renames the damaged checkpoint of ``step`` to ``<step>.damaged`` (``.damaged-2`` ...
    when taken), out of orbax's sight, and returns where it went (process 0 moves it)."""
    source = checkpoints.directory / str(step)
    target = checkpoints.directory / f"{step}.damaged"
    n = 1
    while target.exists():
        n += 1
        target = checkpoints.directory / f"{step}.damaged-{n}"
    if jax.process_index() == 0:
        source.rename(target)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"plugins.loop: moved step {step} aside")
    checkpoints.reload()
    return target


def _resume(
    checkpoints: ocp.CheckpointManager,
    state: Any,
    train_metrics: Any,
    parallel: Any,
    *,
    step: int | None = None,
    move_aside: bool,
) -> tuple[int, Any, Any]:
    """``(step, state, train_metrics)`` of the newest intact checkpoint (at or before ``step``
    if given), or ``(0, state, train_metrics)`` as given when there is none.

    A damaged one on the way is named in a warning and, with ``move_aside`` (training), renamed
    to ``<step>.damaged``; without, left where it is (evaluation writes nothing).
    """
    steps = sorted((s for s in checkpoints.all_steps() if step is None or s <= step), reverse=True)
    for candidate in steps:
        try:
            restored = _restore(checkpoints, candidate, state, train_metrics, parallel)
        except CheckpointDamaged as damage:
            older = [s for s in steps if s < candidate]
            then = f"trying step {older[0]}" if older else "no older checkpoint is left"
            if move_aside:
                try:
                    where = _move_aside(checkpoints, candidate)
                except OSError as error:
                    raise WorkdirError(
                        f"{damage}; it could not be moved aside ({_first_line(error)}): move or "
                        "delete it, then rerun"
                    ) from None
                logging.warning("%s; moved it to %s, %s.", damage, where, then)
            else:
                logging.warning("%s; left in place, %s.", damage, then)
            continue
        return candidate, *restored
    if steps:
        logging.warning("No intact checkpoint in %s: starting from step 0.", checkpoints.directory)
    return 0, state, train_metrics


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


def _write_atomically(path: Any, write: Callable[[Path], Any]) -> None:
    """``write(temporary local path)``, then renames it to ``path`` (an ``epath.Path``): a kill
    never leaves half. A remote ``path`` gets the file's bytes in one write."""
    if isinstance(path, Path) or not config_cli.is_remote(os.fspath(path)):
        partial = Path(path).with_name(f"{path.stem}.partial{path.suffix}")
        write(partial)
        os.replace(partial, path)
        return
    with tempfile.TemporaryDirectory() as folder:
        local = Path(folder) / path.name
        write(local)
        path.write_bytes(local.read_bytes())


def _save_plot(optimizer_config: Any, *, total_steps: int, path: Any) -> None:
    try:
        _write_atomically(
            path,
            lambda p: schedules.save_plot(optimizer_config, total_steps=total_steps, path=p),
        )
    except OSError as error:  # e.g. the disk is full: the run's own errors say so
        logging.warning("The learning-rate plot %s was not written: %s", path, error)


def _no_space(error: BaseException) -> bool:
    """Whether ``error`` (or one it wraps, or its message) says the device is full."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(error) or "ENOSPC" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


# ----------------------------------------------------------------------------- the loop


class _Progress:
    """Keeps what clu's ``ReportProgress`` writes (``steps_per_sec``, ``uptime``) until the loop
    writes it with the log step's metrics."""

    def __init__(self) -> None:
        self.scalars: dict[str, float] = {}

    def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
        self.scalars.update(scalars)

    def take(self) -> dict[str, float]:
        taken, self.scalars = self.scalars, {}
        return taken


class _NoProgressNotes(std_logging.Filter):
    """Drops clu's progress note ("Setting work unit notes: ... steps/s, ...% ETA"): the log
    step's line (:func:`console_line`) says the same."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Setting work unit notes")


@contextlib.contextmanager
def _progress_in_the_log_line() -> Iterator[None]:
    absl_logger, notes = logging.get_absl_logger(), _NoProgressNotes()
    absl_logger.addFilter(notes)
    try:
        yield
    finally:
        absl_logger.removeFilter(notes)


def _duration(seconds: float) -> str:
    """``seconds`` as ``1h02m``, ``3m05s`` or ``12s``."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e6 else f"{value:.4g}"


def console_line(
    step: int, total_steps: int, scalars: dict[str, float], progress: dict[str, float] | None
) -> str:
    """The console's line for ``step``: its metrics and, at a log step (``progress`` holds clu's
    ``steps_per_sec``), the percent done, the ETA and the speed, e.g.
    ``step 50/600 (8%, ETA 2s, 191.2 steps/s): train_loss=1.842 train_accuracy=0.545``."""
    where = f"step {step}/{total_steps}"
    rate = (progress or {}).get("steps_per_sec")
    if rate:
        eta = _duration((total_steps - step) / rate)
        where += f" ({100 * step / total_steps:.0f}%, ETA {eta}, {rate:.1f} steps/s)"
    shown = ", ".join(f"{name}={_number(value)}" for name, value in scalars.items())
    return f"{where}: {shown}"


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
    num_classes: int | None = None,
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
      input_shape: an image's shape as the model takes it (after ``config.augment``): the steps
        are compiled on zeros of it before any data is read.
      num_classes: the number of classes; with mixup/cutmix in ``config.augment`` the steps are
        compiled for batches with soft ``target`` labels of that many (without it, the first
        step compiles them).

    Returns:
      Every logged scalar: ``{name: [(step, value), ...]}``.
    """
    workdir_path = _workdir(workdir)
    with config_cli.workdir_lock(workdir_path, jax.process_index()):
        try:
            return _fit(
                config, workdir_path, state=state, train_step=train_step, eval_step=eval_step,
                parallel=parallel, train_batches=train_batches, eval_batches=eval_batches,
                input_shape=input_shape, num_classes=num_classes,
            )  # fmt: skip
        except NoSpaceLeft:
            raise
        except Exception as error:
            if not _no_space(error):
                raise
            _quiet_orbax_failures()
            raise NoSpaceLeft(
                f"no space left on device while writing in {workdir_path}; "
                f"{_intact(workdir_path / 'checkpoints')}"
            ) from None


def _workdir(workdir: Any) -> Any:
    """``config_cli.workdir_path(workdir)``; an empty one is a :class:`WorkdirError`."""
    try:
        return config_cli.workdir_path(workdir)
    except ValueError as error:
        raise WorkdirError(str(error)) from None


def _intact(directory: Any, before: int | None = None) -> str:
    """``the previous checkpoint (step M) is intact`` for the newest complete checkpoint in
    ``directory`` (before step ``before``), or that there is none."""
    try:
        steps = [int(p.name) for p in directory.iterdir() if p.name.isdigit()]
    except OSError:
        steps = []
    steps = [s for s in steps if before is None or s < before]
    if not steps:
        return "no checkpoint was saved before it"
    return (
        f"the previous checkpoint (step {max(steps)}) is intact; free some space and rerun to "
        "resume from it"
    )


def _fit(
    config: ml_collections.ConfigDict,
    workdir_path: Any,
    *,
    state: Any,
    train_step: Any,
    eval_step: Any,
    parallel: Parallel,
    train_batches: Callable[[int], Iterator[dict]],
    eval_batches: Callable[[], Iterable[dict]],
    input_shape: Sequence[int],
    num_classes: int | None = None,
) -> History:
    total_steps = config.num_train_steps
    is_chief = jax.process_index() == 0
    checkpoints = _checkpoint_manager(workdir_path)
    state = parallel.put_state(state)
    empty_train = parallel.put_state(metrics.TrainMetrics.empty())
    # The newest intact checkpoint, with the train metrics since the last log step; a damaged
    # one is named in a warning and moved aside to '<step>.damaged'.
    try:
        initial_step, state, accumulated = _resume(
            checkpoints, state, empty_train, parallel, move_aside=True
        )
    except BaseException:
        checkpoints.close()
        raise
    if initial_step:
        logging.info("Resumed from the checkpoint of step %d in %s", initial_step, workdir_path)

    # Compiled now, while TensorFlow imports, on zeros in the form the steps take batches; the
    # loop's calls find them in jit's cache.
    empty_eval = parallel.put_state(metrics.EvalMetrics.empty())
    local_batch = config.batch_size // jax.process_count()
    local_eval_batch = config.eval_batch_size // jax.process_count()
    soft = num_classes if augment.mixes(config.get("augment")) else None
    train_zeros = data.example_batch(tuple(input_shape), local_batch, target_classes=soft)
    eval_zeros = data.example_batch(tuple(input_shape), local_eval_batch, train=False)
    train_step.lower(state, accumulated, next(parallel.train_batches([train_zeros]))).compile()
    eval_step.lower(state, empty_eval, next(parallel.eval_batches([eval_zeros]))).compile()
    tensorflow_setup.wait(WRITER_MODULES)
    from clu import metric_writers, periodic_actions

    # TensorBoard events from process 0; the console gets one line per log step from ``write``
    # (clu's LoggingWriter would print the metrics and its progress note as two).
    writer = metric_writers.MultiWriter(
        [metric_writers.AsyncWriter(metric_writers.SummaryWriter(str(workdir_path)))]
        if is_chief
        else []
    )
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

    def write(step: int, scalars: dict[str, float], progress: dict | None = None) -> None:
        writer.write_scalars(step, {**scalars, **(progress or {})})
        logging.info("%s", console_line(step, total_steps, scalars, progress))
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
        finish_saves()
        # Per-array checksums, verified on restore (a changed byte is damage, not a resume).
        sums = checksums(saved) if is_chief else {}
        try:
            checkpoints.save(
                step, args=ocp.args.StandardSave(saved), custom_metadata={CHECKSUMS_KEY: sums}
            )
        except Exception as error:
            if _no_space(error):
                raise disk_full(step) from None
            raise
        saving[0] = step

    saving: list[int | None] = [None]  # the step whose checkpoint may still be being written

    def disk_full(step: int) -> NoSpaceLeft:
        """The error for a save of ``step`` that failed for lack of space; its partial folder
        is removed (orbax would remove it on the next start) to give the space back."""
        _quiet_orbax_failures()
        for partial in checkpoints.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
            with contextlib.suppress(OSError):
                partial.rmtree()
        return NoSpaceLeft(
            f"no space left on device while saving the checkpoint of step {step} in "
            f"{checkpoints.directory}; {_intact(checkpoints.directory, before=step)}"
        )

    def finish_saves() -> None:
        """Waits for the checkpoint being written in the background; a failure to write it for
        lack of space is :class:`NoSpaceLeft` naming its step."""
        try:
            checkpoints.wait_until_finished()
        except Exception as error:
            if _no_space(error) and saving[0] is not None:
                raise disk_full(saving[0]) from None
            raise

    # clu's progress report: percent done and ETA on the console, steps_per_sec and uptime in
    # TensorBoard, written with the log step's metrics (one console line, not three).
    progress = _Progress()
    report = periodic_actions.ReportProgress(
        num_train_steps=total_steps, writer=progress, every_steps=config.log_every_steps
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
        with preemption, metric_writers.ensure_flushes(writer), _progress_in_the_log_line():
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
                report(step)
                if log:
                    warn_if_all_skipped(step, scalars)
                    write(step, scalars, progress.take())
                    accumulated = empty_train
                elif progress.scalars:
                    writer.write_scalars(step, progress.take())
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
        # Every step runs, whatever the ones before raise (the first error is raised): no
        # thread of the run may outlive it (one that does aborts the interpreter's exit).
        with contextlib.ExitStack() as cleanup:
            cleanup.callback(writer.close)
            if plot_thread is not None:
                cleanup.callback(plot_thread.join)
            cleanup.callback(checkpoints.close)
            cleanup.callback(finish_saves)  # a checkpoint being written is completed
            if hasattr(host_batches, "close"):
                cleanup.callback(host_batches.close)
            cleanup.callback(profile.stop)
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
    compiled steps, or on one device. Without ``step``, a damaged latest checkpoint is named in a
    warning and the newest intact one is taken. Raises :class:`CheckpointNotFound` when there is
    no such checkpoint, :class:`CheckpointDamaged` when ``step``'s (or every one) is damaged,
    ``ConfigError`` when it was written for another model or optimizer.
    """
    parallel = parallel or _OneDevice()
    directory = _workdir(workdir) / "checkpoints"
    if not directory.is_dir():
        raise CheckpointNotFound(f"{directory} does not exist: train first, or name the workdir")
    checkpoints = ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(create=False)
    )
    try:
        steps = checkpoints.all_steps()
        if not steps:
            raise CheckpointNotFound(f"{directory} holds no checkpoint: train first")
        asked = step
        step = max(steps) if step is None else step
        if step not in steps:
            raise CheckpointNotFound(
                f"{directory} holds no checkpoint of step {step}; it has steps "
                f"{', '.join(map(str, sorted(steps)))}"
            )
        empty_train = parallel.put_state(metrics.TrainMetrics.empty())
        if asked is not None:  # that one or none: a damaged one is an error
            state, _ = _restore(checkpoints, step, parallel.put_state(state), empty_train, parallel)
        else:  # the newest intact one; a damaged one on the way is named, and left in place
            step, state, _ = _resume(
                checkpoints, parallel.put_state(state), empty_train, parallel, move_aside=False
            )
            if not step:
                raise WorkdirError(
                    f"every checkpoint in {directory} is damaged (the warnings above say how)"
                )
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
