"""plugins.cli: main.py's plumbing (one-line errors, exit codes, quiet logs, compilation cache)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from plugins import cli, loop
from plugins.config_errors import ConfigError
from plugins.data import DatasetUnavailable

_CACHE_CHECK = """
import sys
import jax
from absl import flags
from plugins import cli

cli.define_flags()
flags.FLAGS(["main.py", *sys.argv[1:]])
path = cli.compilation_cache_dir(flags.FLAGS.compilation_cache_dir)
cli.enable_compilation_cache(path)
jax.jit(lambda x: x * 2 + 1)(jax.numpy.arange(3.0)).block_until_ready()
print(repr(path))
print(repr(jax.config.jax_compilation_cache_dir))
"""


@pytest.mark.parametrize("how", ["flag", "env", "default", "off"])
def test_compilation_cache_location(tmp_path, how):
    """The persistent compilation cache goes where the flag, then JAX_COMPILATION_CACHE_DIR,
    then $XDG_CACHE_HOME/jax say, and compiled programs are written there; '' turns it off."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env["XDG_CACHE_HOME"] = str(tmp_path / "xdg")
    args = []
    expected = {"default": tmp_path / "xdg" / "jax", "flag": tmp_path / "flag", "off": None}
    if how == "flag":
        args = [f"--compilation_cache_dir={tmp_path / 'flag'}"]
    elif how == "env":
        env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path / "env")
        expected["env"] = tmp_path / "env"
    elif how == "off":
        args = ["--compilation_cache_dir="]
    result = subprocess.run(
        [sys.executable, "-c", _CACHE_CHECK, *args],
        cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
        check=True,
    )  # fmt: skip
    path, configured = result.stdout.strip().splitlines()[-2:]
    if expected[how] is None:
        assert path == "''" and configured == "None"
        assert not (tmp_path / "xdg").exists()
    else:
        assert path == configured == repr(str(expected[how]))
        assert any(expected[how].iterdir())  # the compiled program was written there


@pytest.mark.parametrize(
    "error, code",
    [
        (ConfigError("batch_size must be an int >= 1,\n  got 0"), "config error: batch_size must "
         "be an int >= 1, got 0"),
        (loop.NonFiniteError(7, "the loss became NaN/Inf at step 7"),
         "non-finite: the loss became NaN/Inf at step 7"),
        (DatasetUnavailable("mnist needs a download"), "data error: mnist needs a download"),
        (loop.Preempted(12, {}), 143),
        (loop.Preempted(12, {}, signal.SIGINT), 130),
    ],
)  # fmt: skip
def test_what_stops_a_run_is_one_line_and_its_exit_code(error, code, capsys):
    with pytest.raises(SystemExit) as stopped, cli.one_line_errors():
        raise error
    assert stopped.value.code == code
    if isinstance(error, loop.Preempted):
        line = capsys.readouterr().err.strip()
        assert line == str(error) and line.endswith("checkpoint saved at step 12; rerun to resume")


def test_other_errors_pass_through():
    with pytest.raises(ZeroDivisionError), cli.one_line_errors():
        1 / 0  # noqa: B018 -- a bug, not a user's mistake: its traceback is what helps


def _record(pathname: str, level: int, msg: str) -> logging.LogRecord:
    return logging.LogRecord("absl", level, pathname, 1, msg, None, None)


def test_library_chatter_is_dropped_and_progress_kept():
    quiet = cli.QuietLibraries()
    orbax = "/site-packages/orbax/checkpoint/checkpoint_manager.py"
    assert not quiet.filter(_record(orbax, logging.INFO, "Saving checkpoint"))
    assert quiet.filter(_record(orbax, logging.WARNING, "Something went wrong"))
    assert not quiet.filter(_record(orbax, logging.WARNING, "Metadata file does not exist: x"))
    tfds = "/site-packages/tensorflow_datasets/core/dataset_builder.py"
    assert not quiet.filter(_record(tfds, logging.INFO, "Load dataset info"))
    progress = "/site-packages/clu/platform/local.py"
    assert quiet.filter(_record(progress, logging.INFO, "Setting work unit notes: 50.0% ETA"))
    assert quiet.filter(_record("/project/train.py", logging.INFO, "Parameters:"))
