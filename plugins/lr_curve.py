"""Shows the learning-rate curve of a config: a text chart, sample values and a PNG.

Usage::

    plugins-lr-curve --config=configs/default.py [--out=lr.png] [--config.key=value ...]
    python -m plugins.lr_curve --config=configs/default.py --config.optimizer.learning_rate=3e-4

The config file is an ml_collections config file (``get_config()``) with ``optimizer`` (see
``plugins.schedules``) and ``num_train_steps``; overrides work as they do for ``main.py``. With
``optimizer.accumulate_steps = k`` the schedule has ``num_train_steps // k`` optimizer steps, as in
training. ``--out=`` (empty) skips the PNG. A bad config prints one line and exits with status 2.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import flags
from ml_collections import config_flags

from plugins import config_cli
from plugins.config_errors import ConfigError, as_dict

_PROG = "plugins-lr-curve"


def _flag_values(argv: list[str]) -> flags.FlagValues:
    """Flags of this command, in their own FlagValues (no clash with a trainer's --config).
    config_flags defines the ``--config.key`` overrides it finds in ``argv`` (by default it
    would look in ``sys.argv``, which is not ``main(argv)``'s when called in-process)."""
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, "Path to an ml_collections config file.", flag_values=fv, sys_argv=argv
    )
    flags.DEFINE_string("out", "lr.png", "Where to save the PNG; empty to skip it.", flag_values=fv)
    flags.DEFINE_integer("width", 60, "Width of the text chart, in characters.", flag_values=fv)
    flags.DEFINE_integer("height", 12, "Height of the text chart, in lines.", flag_values=fv)
    return fv


def optimizer_steps(config: Any) -> int:
    """Optimizer steps of a training config: ``num_train_steps // optimizer.accumulate_steps``."""
    cfg = as_dict(config)
    if cfg.get("optimizer") is None:
        raise ConfigError("missing key optimizer: the config has no optimizer to plot")
    steps = cfg.get("num_train_steps")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ConfigError(f"num_train_steps must be a positive int, got {steps!r}")
    accumulate = as_dict(cfg["optimizer"]).get("accumulate_steps")
    accumulate = 1 if accumulate is None else accumulate
    if isinstance(accumulate, bool) or not isinstance(accumulate, (int, np.integer)):
        raise ConfigError(f"optimizer.accumulate_steps must be a positive int, got {accumulate!r}")
    if accumulate < 1:
        raise ConfigError(f"optimizer.accumulate_steps must be at least 1, got {accumulate}")
    from plugins import optim

    return optim.optimizer_steps(int(steps), int(accumulate))


def report(config: Any, *, out: str | None = "lr.png", width: int = 60, height: int = 12) -> str:
    """The command's output for a loaded config: text chart and sample values; saves the PNG."""
    from plugins import schedules

    total = optimizer_steps(config)
    optimizer = config["optimizer"]
    sampled_steps, sampled = schedules.sampled_curve(optimizer, total_steps=total)
    lines = [schedules.text_plot(optimizer, total_steps=total, width=width, height=height), ""]
    accumulate = as_dict(optimizer).get("accumulate_steps") or 1
    if accumulate > 1:
        lines.append(
            f"{total} optimizer steps = num_train_steps {as_dict(config)['num_train_steps']} // "
            f"accumulate_steps {accumulate}"
        )
    samples = sorted({0, *(int(round(f * (total - 1))) for f in (0.1, 0.25, 0.5, 0.75)), total - 1})
    peak_step = int(sampled_steps[np.argmax(sampled)])
    samples = sorted(set(samples) | {peak_step})
    # The listed steps exactly (the plots sample at most schedules.PLOT_POINTS steps).
    values = schedules.create(optimizer, total_steps=total)
    lines.append(f"{'step':>10}  learning rate")
    for step in samples:
        note = "  (peak)" if step == peak_step else ""
        lines.append(f"{step:>10}  {float(np.float32(values(np.int32(step)))):.6g}{note}")
    if out:
        path = schedules.save_plot(optimizer, total_steps=total, path=out)
        lines.append(f"saved {os.path.abspath(path)}")
    return "\n".join(lines)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``plugins-lr-curve`` and ``python -m plugins.lr_curve``.

    Args:
      argv: command-line arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
      The exit status: 0 on success, 2 for a bad command line or config (one line on stderr).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    command_line = [_PROG, *args]
    fv = _flag_values(command_line)
    if any(a in ("-h", "--help", "--helpshort", "--helpfull") for a in args):
        print(__doc__.strip() + "\n\nFlags:\n" + fv.get_help())
        return 0
    try:
        try:
            with config_cli.config_imports(args):
                fv(command_line)
        except config_cli.PARSE_ERRORS as e:
            raise ConfigError(config_cli.parse_error_line(e, args)) from None
        except ValueError:
            raise
        except Exception as e:  # the config file's own code
            raise ConfigError(f"could not load --config: {_one_line(e)}") from None
        if fv.config is None:
            raise ConfigError("--config is required: the path to an ml_collections config file")
        try:
            fv.config.keys()  # a file that could not be read raises its error on first use
        except OSError as e:
            raise ConfigError(config_cli.load_error_line(e, args)) from None
        text = report(fv.config, out=fv.out, width=fv.width, height=fv.height)
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as e:
        # ConfigError is a ValueError; the others come from configs that are not training configs.
        message = " ".join((str(e) if isinstance(e, ValueError) else _one_line(e)).split())
        if not message.startswith(("config error: ", "flag error: ")):
            message = f"config error: {message}"
        print(f"{_PROG}: {message}", file=sys.stderr)
        return 2
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
