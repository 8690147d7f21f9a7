"""The plumbing of a generated project's ``main.py``: flags beyond ``--config``/``--workdir``,
one-line errors and exit codes, quiet library logs, Ctrl-C, several processes, the compilation
cache.

    flags.mark_flags_as_required(["config", "workdir"])
    cli.define_flags()                          # --coordinator_address ... --compilation_cache_dir

    def main(argv):
        config = cli.start(argv, FLAGS["config"], FLAGS.workdir)
        with cli.one_line_errors():
            history = train.train_and_evaluate(config, FLAGS.workdir)
        cli.print_final(history)

    app.run(main, flags_parser=cli.parse_flags)

Every mistake a user can make on the command line or in a config ends the program with one
line on stderr and exit code 1, before anything is compiled or written in the workdir:
``flag error: ...``, ``config error: ...``, ``workdir error: ...``, ``data error: ...``; a run
stopped by a NaN/Inf with ``non-finite: ...``. SIGTERM (preemption) and Ctrl-C save a checkpoint
and exit with 143 and 130.
"""

from __future__ import annotations

import contextlib
import logging as std_logging
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import ml_collections
from absl import flags, logging

from plugins import config_cli, tensorflow_setup

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines ``--coordinator_address``, ``--num_processes``, ``--process_id`` (several
    processes) and ``--compilation_cache_dir``."""
    flags.DEFINE_string(
        "coordinator_address", None, "host:port of process 0, for training with several processes."
    )
    flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host training).")
    flags.DEFINE_integer("process_id", None, "Index of this process (multi-host training).")
    flags.DEFINE_string(
        "compilation_cache_dir",
        None,
        "JAX's persistent compilation cache: a rerun loads the compiled steps from here instead "
        "of compiling them again. Default: $JAX_COMPILATION_CACHE_DIR, else ~/.cache/jax "
        "($XDG_CACHE_HOME/jax). An empty value turns the cache off.",
    )


def parse_flags(argv: list[str]) -> list[str]:
    """Parses the flags (``app.run``'s ``flags_parser``); a ``--config.key`` override of a key
    that does not exist (the config is locked), a wrong type or a config file that cannot be
    loaded ends the program with one line instead of a traceback."""
    try:
        with config_cli.no_bools_as_numbers():
            return FLAGS(argv)
    except Exception as error:  # noqa: BLE001 -- each is one line
        if config_cli.raised_in_config_file(error, argv) is not None and not isinstance(
            error, flags.Error | SyntaxError
        ):  # the config file's own code (get_config raising, recursing, a missing import)
            sys.exit(config_cli.config_code_error_line(error, argv))
        if isinstance(error, config_cli.PARSE_ERRORS):
            sys.exit(config_cli.parse_error_line(error, argv))
        raise


def load_config(flag: Any) -> Any:
    """The ``--config`` flag's value, loaded; a missing or unreadable config file is one line."""
    config = flag.value
    try:
        config.keys()  # a file that could not be read raises its error on first use
    except OSError as error:
        sys.exit(config_cli.load_error_line(error, sys.argv))
    except AttributeError:  # get_config() returned None, a list, ...
        pass
    if not isinstance(config, ml_collections.ConfigDict):
        sys.exit(config_cli.cannot_load_line(
            sys.argv, f"get_config() returned a {type(config).__name__}, not an "
            "ml_collections.ConfigDict (return ml_collections.ConfigDict(...))"
        ))  # fmt: skip
    return config


class QuietLibraries(std_logging.Filter):
    """Drops the INFO chatter of orbax and tfds; keeps warnings, but for orbax's on each resume
    that an item has no ``_CHECKPOINT_METADATA`` (only the step has one: orbax writes it so)."""

    NOISY = ("/orbax/", "/tensorflow_datasets/")
    # orbax's errors (with tracebacks) on a full disk or a damaged checkpoint: the run's own
    # line says what happened and what is intact (``one_line_errors``, ``loop.fit``'s warning).
    ORBAX_FAILURES = ("No space left on device", "RESOURCE_EXHAUSTED", "Failed to json parse")

    def filter(self, record: std_logging.LogRecord) -> bool:
        path = record.pathname.replace("\\", "/")
        if "/orbax/" in path and str(record.msg).startswith("Metadata file does not exist"):
            return False
        if "/orbax/" in path and any(
            text in record.getMessage() or text in str(record.exc_info)
            for text in self.ORBAX_FAILURES
        ):
            return False
        if "/clu/" in path and str(record.msg).startswith("Created artifact"):
            return False  # clu's note of each timing it records
        return record.levelno >= std_logging.WARNING or not any(part in path for part in self.NOISY)


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


def exit_interrupted(*_: Any) -> None:
    """Ends the program at once, with one line and exit code 130 (as a SIGINT handler too: a
    ``KeyboardInterrupt`` raised where Python runs a finaliser would be lost)."""
    print("interrupted (Ctrl-C): the checkpoints already saved are intact and a rerun resumes "
          "from the latest", file=sys.stderr, flush=True)  # fmt: skip
    logging.flush()
    # Not sys.exit: TensorFlow may be importing in a background thread, and interpreter shutdown
    # under it aborts the process.
    os._exit(130)


def start(argv: Sequence[str], config_flag: Any, workdir: str, *, train: bool = True) -> Any:
    """Everything ``main`` does before training; returns the loaded config.

    Refuses stray arguments, a workdir that cannot be written and, to ``train``, a workdir
    another live run trains in (its lock, ``config_cli.workdir_lock``, is taken by
    ``loop.fit``; one line each, at once, writing nothing; eval, predict and export only read),
    quietens library logs, makes Ctrl-C outside the training steps (which save a checkpoint
    first) one line and exit code 130, joins the other processes when a coordinator is given
    (flags, the ``JAX_COORDINATOR_ADDRESS`` ... variables, or a cluster JAX detects itself) and
    turns on the compilation cache.
    """
    if len(argv) > 1:
        sys.exit(f"flag error: unexpected argument(s) {' '.join(argv[1:])}; flags are --name=value")
    problem = config_cli.workdir_problem(workdir)
    if problem:
        sys.exit(f"workdir error: {problem}")
    logging.get_absl_handler().addFilter(QuietLibraries())
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not ignored (nohup, &)
        signal.signal(signal.SIGINT, exit_interrupted)  # the training steps install their own
    from plugins import sharding

    # Before any other JAX call: joins the other processes when a coordinator is given.
    sharding.initialize_distributed(
        FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id
    )
    import jax

    busy = config_cli.workdir_in_use(workdir, jax.process_index()) if train else None
    if busy:
        sys.exit(f"workdir error: {busy}")
    enable_compilation_cache(compilation_cache_dir(FLAGS.compilation_cache_dir))
    logging.info("JAX %s, process %d of %d, devices: %s", jax.__version__, jax.process_index(),
                 jax.process_count(), jax.devices())  # fmt: skip
    return load_config(config_flag)


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """Turns what a run can stop for into one line on stderr and its exit code (``SystemExit``).

    A bad config (``ConfigError``, raised before anything compiles or is written):
    ``config error: ...``, exit 1. SIGTERM or Ctrl-C (``loop.Preempted``, a checkpoint was
    saved): its line, exit 143 or 130. A NaN/Inf without ``optimizer.skip_nonfinite``
    (``loop.NonFiniteError``, the last good checkpoint intact): ``non-finite: ...``, exit 1. A
    dataset that can be neither read nor downloaded: ``data error: ...``, exit 1. No checkpoint to
    evaluate (``loop.CheckpointNotFound``), a damaged one asked for by step
    (``loop.CheckpointDamaged``), a full disk (``loop.NoSpaceLeft``: the previous checkpoint
    intact) or a workdir another run holds (``config_cli.WorkdirBusy``): ``workdir error: ...``,
    exit 1. Ctrl-C twice: exit 130 at once.
    """
    from plugins import export, loop
    from plugins.config_errors import ConfigError
    from plugins.data import DatasetUnavailable

    try:
        yield
    except ConfigError as error:
        _exit("config error: " + " ".join(str(error).split()))
    except loop.Preempted as stopped:  # a checkpoint was saved; rerun
        print(stopped, file=sys.stderr, flush=True)
        _exit(code=stopped.exit_code)
    except loop.NonFiniteError as error:  # the last good checkpoint is intact
        _exit(f"non-finite: {error}")
    except DatasetUnavailable as error:  # e.g. MNIST without network
        _exit(f"data error: {error}")
    except (loop.CheckpointNotFound, loop.WorkdirError, config_cli.WorkdirBusy) as error:
        # --mode=eval of a workdir without a checkpoint, a damaged one, a full disk, a
        # workdir another run trains in
        _exit(f"workdir error: {' '.join(str(error).split())}")
    except export.ImagesError as error:  # --mode=predict
        _exit(f"images error: {error}")
    except KeyboardInterrupt:  # Ctrl-C twice in the training steps
        exit_interrupted()


def _exit(line: str | None = None, code: int = 1) -> None:
    """``sys.exit`` with ``line`` (or ``code``), once TensorFlow's background import (if one is
    under way) is done: interpreter shutdown under it can crash the process."""
    tensorflow_setup.settle()
    sys.exit(line if line is not None else code)


def print_final(history: dict[str, list[tuple[int, float]]]) -> None:
    """Prints the run's last evaluation accuracy, if it evaluated."""
    if "eval_accuracy" in history:
        step, accuracy = history["eval_accuracy"][-1]
        print(f"final eval_accuracy {accuracy:.4f} at step {step}", flush=True)
