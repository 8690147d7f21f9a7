"""Trains and evaluates the model a config describes.

    python main.py --config=configs/default.py --workdir=/tmp/run [--config.key=value ...]

Rerunning the same command resumes from the latest checkpoint in ``--workdir``. For several
processes (multi-host), give ``--coordinator_address``, ``--num_processes`` and ``--process_id``
(or the ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` environment
variables, or run under a cluster JAX detects itself, e.g. SLURM or Cloud TPU).

A mistake on the command line or in the config is one line on stderr (``config error: ...``)
and exit code 1, before anything compiles or is written; SIGTERM and Ctrl-C save a checkpoint
and exit with 143 and 130 (``plugins.cli`` says what else).
"""

from __future__ import annotations

import sys
from typing import Any

from absl import app, flags
from ml_collections import config_flags
from plugins import cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config",
    None,
    "Path to a config file, e.g. configs/default.py; override keys with --config.key=value.",
    lock_config=True,
)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard logs and plots.")
flags.DEFINE_enum(
    "mode", "train", ["train", "eval", "predict", "export"],
    "train: train (or resume) and evaluate. With the latest checkpoint in --workdir (or --step's), "
    "training nothing: eval: evaluate it; predict: classify --images; export: write the model to "
    "<workdir>/export (jax.export), usable without this code.",
)  # fmt: skip
flags.DEFINE_integer(
    "step", None, "The checkpoint's step for eval/predict/export (default: latest)."
)
flags.DEFINE_string(
    "images", None, "--mode=predict: a .npy/.npz file, an image or a folder of them."
)
flags.DEFINE_integer("top_k", 3, "predict: how many classes to print per image.")
cli.define_flags()  # --coordinator_address ... (several processes), --compilation_cache_dir
flags.mark_flags_as_required(["config", "workdir"])


def train_or_exit(config: Any, workdir: str) -> dict[str, list[tuple[int, float]]]:
    """``train.train_and_evaluate(config, workdir)``; what stops it ends the program with one
    line and its exit code (``cli.one_line_errors``)."""
    from {{ cookiecutter.package_name }} import train

    with cli.one_line_errors():
        return train.train_and_evaluate(config, workdir)


def evaluate_or_exit(config: Any, workdir: str, step: int | None) -> None:
    """Evaluates a checkpoint (``train.evaluate``) and prints its metrics."""
    from {{ cookiecutter.package_name }} import train

    with cli.one_line_errors():
        step, scalars = train.evaluate(config, workdir, step=step)
    print(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(scalars.items())))


def use_or_exit(config: Any, workdir: str, mode: str) -> None:
    """``--mode=predict`` (prints each image's top classes) or ``--mode=export``."""
    from {{ cookiecutter.package_name }} import predict

    if mode == "predict" and not FLAGS.images:
        sys.exit("flag error: --mode=predict needs --images=PATH (.npy, .npz, image or folder)")
    with cli.one_line_errors():
        if mode == "export":
            print(f"exported to {predict.export_model(config, workdir, step=FLAGS.step)}")
            return
        for name, ranked in predict.predict(
            config, workdir, FLAGS.images, step=FLAGS.step, top_k=FLAGS.top_k
        ):
            print(f"{name}: " + ", ".join(f"{label} {p:.3f}" for label, p in ranked))


def main(argv: list[str]) -> None:
    # Checks the arguments and the workdir, joins the other processes (if any), turns on the
    # compilation cache and loads the config.
    # A workdir another run trains in is refused at once (eval/predict/export only read it).
    config = cli.start(argv, FLAGS["config"], FLAGS.workdir, train=FLAGS.mode == "train")
    if FLAGS.mode == "eval":
        evaluate_or_exit(config, FLAGS.workdir, FLAGS.step)
    elif FLAGS.mode in ("predict", "export"):
        use_or_exit(config, FLAGS.workdir, FLAGS.mode)
    else:
        cli.print_final(train_or_exit(config, FLAGS.workdir))


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
