"""Trains and evaluates the model a config describes.

    python main.py --config=configs/default.py --workdir=/tmp/run [--config.key=value ...]

Rerunning the same command resumes from the latest checkpoint in ``--workdir``. For several
processes (multi-host), give ``--coordinator_address``, ``--num_processes`` and ``--process_id``
(or the ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` environment
variables, or run under a cluster JAX detects itself, e.g. SLURM or Cloud TPU).
"""

from __future__ import annotations

import logging as std_logging
import os
import signal
import sys
from typing import Any

from absl import app, flags, logging
from ml_collections import config_flags
from plugins import config_cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config",
    None,
    "Path to a config file, e.g. configs/default.py; override keys with --config.key=value.",
    lock_config=True,
)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard logs and plots.")
flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for training with several processes."
)
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host training).")
flags.DEFINE_integer("process_id", None, "Index of this process (multi-host training).")
flags.DEFINE_string(
    "compilation_cache_dir",
    None,
    "JAX's persistent compilation cache: a rerun loads the compiled steps from here instead of "
    "compiling them again. Default: $JAX_COMPILATION_CACHE_DIR, else ~/.cache/jax "
    "($XDG_CACHE_HOME/jax). An empty value turns the cache off.",
)
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(std_logging.Filter):
    """Drops the INFO chatter of orbax, tfds and clu's work-unit notes; keeps warnings, but for
    orbax's on each resume that an item has no ``_CHECKPOINT_METADATA`` (only the step has one:
    orbax writes it so)."""

    NOISY = ("/orbax/", "/tensorflow_datasets/", "/clu/platform/")

    def filter(self, record: std_logging.LogRecord) -> bool:
        path = record.pathname.replace("\\", "/")
        if "/orbax/" in path and str(record.msg).startswith("Metadata file does not exist"):
            return False
        return record.levelno >= std_logging.WARNING or not any(part in path for part in self.NOISY)


def parse_flags(argv: list[str]) -> list[str]:
    """Parses the flags; a ``--config.key`` override of a key that does not exist (the config is
    locked), a wrong type or a config file that cannot be loaded ends the program with one line
    instead of a traceback."""
    try:
        return FLAGS(argv)
    except config_cli.PARSE_ERRORS as error:
        sys.exit(config_cli.parse_error_line(error, argv))


def load_config(flag: Any) -> Any:
    """The ``--config`` flag's value, loaded; a missing or unreadable config file is one line."""
    config = flag.value
    try:
        config.keys()  # a file that could not be read raises its error on first use
    except OSError as error:
        sys.exit(config_cli.load_error_line(error, sys.argv))
    return config


def train_or_exit(config: Any, workdir: str) -> dict[str, list[tuple[int, float]]]:
    """Runs ``train.train_and_evaluate(config, workdir)``; a bad config ends the program.

    Every config mistake raises ``ConfigError`` before anything compiles and before anything
    is created or written in ``workdir``; here it becomes one line on stderr,
    ``config error: <what is wrong and what is valid>``, and exit code 1 (``SystemExit``).
    SIGTERM (preemption) or Ctrl-C saves a checkpoint and exits with code 143 or 130; a NaN/Inf
    loss without ``optimizer.skip_nonfinite`` exits with code 1 and ``non-finite: ...`` naming
    the step; a dataset that can be neither read nor downloaded, with ``data error: ...``.
    """
    from plugins import loop
    from plugins.config_errors import ConfigError
    from plugins.data import DatasetUnavailable

    from {{ cookiecutter.package_name }} import train

    try:
        return train.train_and_evaluate(config, workdir)
    except ConfigError as error:
        sys.exit("config error: " + " ".join(str(error).split()))
    except loop.Preempted as stopped:  # SIGTERM/Ctrl-C: a checkpoint was saved; rerun
        print(stopped, file=sys.stderr, flush=True)
        sys.exit(stopped.exit_code)
    except loop.NonFiniteError as error:  # the last good checkpoint is intact
        sys.exit(f"non-finite: {error}")
    except DatasetUnavailable as error:  # e.g. MNIST without network
        sys.exit(f"data error: {error}")


def compilation_cache_dir(flag: str | None) -> str:
    """Where the persistent compilation cache goes: the flag, else ``$JAX_COMPILATION_CACHE_DIR``,
    else ``$XDG_CACHE_HOME/jax`` (``~/.cache/jax``); an empty string means no cache."""
    if flag is not None:
        return os.path.expanduser(flag)
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return os.path.expanduser(os.environ["JAX_COMPILATION_CACHE_DIR"])
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return os.path.join(os.path.expanduser(cache_home), "jax")


def enable_compilation_cache(path: str) -> None:
    """Turns on JAX's persistent compilation cache in ``path`` (nothing for ``''``).

    Every compiled program is written there, keyed by the program, the devices and the versions
    of jax and jaxlib; the next run of the same config loads it in milliseconds instead of
    compiling it (the many small programs of eager initialisation code included).
    """
    if not path:
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def main(argv: list[str]) -> None:
    """Checks the workdir, then runs; Ctrl-C where the training steps do not catch it (they save
    a checkpoint first) ends the program with one line and exit code 130."""
    if len(argv) > 1:
        sys.exit(f"flag error: unexpected argument(s) {' '.join(argv[1:])}; flags are --name=value")
    problem = config_cli.workdir_problem(FLAGS.workdir)
    if problem:
        sys.exit(f"workdir error: {problem}")
    logging.get_absl_handler().addFilter(_QuietLibraries())
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not ignored (nohup, &)
        signal.signal(signal.SIGINT, _exit_interrupted)  # the training steps install their own
    try:
        run()
    except KeyboardInterrupt:  # Ctrl-C twice in the training steps
        _exit_interrupted()


def _exit_interrupted(*_: Any) -> None:
    """Ends the program at once, with one line and exit code 130 (as a SIGINT handler too: a
    ``KeyboardInterrupt`` raised where Python runs a finaliser would be lost)."""
    print("interrupted (Ctrl-C): the checkpoints already saved are intact and a rerun resumes "
          "from the latest", file=sys.stderr, flush=True)  # fmt: skip
    logging.flush()
    # Not sys.exit: TensorFlow may be importing in a background thread, and interpreter shutdown
    # under it aborts the process.
    os._exit(130)


def run() -> None:
    """Joins the other processes (if any), turns on the compilation cache, trains, prints the
    final accuracy."""
    from plugins import sharding

    # Before any other JAX call: joins the other processes when a coordinator is given.
    sharding.initialize_distributed(
        FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id
    )

    # TensorFlow (it only reads data and writes TensorBoard events here) is imported by the
    # trainer, in the background and hidden from the GPUs/TPUs: see plugins.tensorflow_setup.
    import jax

    enable_compilation_cache(compilation_cache_dir(FLAGS.compilation_cache_dir))
    logging.info("JAX %s, process %d of %d, devices: %s", jax.__version__, jax.process_index(),
                 jax.process_count(), jax.devices())  # fmt: skip
    history = train_or_exit(load_config(FLAGS["config"]), FLAGS.workdir)
    if "eval_accuracy" in history:
        step, accuracy = history["eval_accuracy"][-1]
        print(f"final eval_accuracy {accuracy:.4f} at step {step}", flush=True)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
