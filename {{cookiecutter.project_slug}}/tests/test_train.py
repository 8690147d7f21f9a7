"""End-to-end tests of train_and_evaluate on 8 simulated CPU devices."""

from __future__ import annotations

import collections
import logging
import math
import runpy
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds
from plugins import data, export
from plugins.config_errors import ConfigError

from {{ cookiecutter.package_name }} import (
    parallel,
    predict,
    train,
)

from configs import cifar10, mnist, quick, vit_cifar10


def _checkpoint_steps(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def test_eight_devices():
    assert jax.device_count() == 8


def test_loss_falls_checkpoints_and_resume(tmp_path):
    config = quick.get_config()
    config.augment = [dict(name="normalize", mean=0.2, std=0.3)]  # the export must include it
    history = train.train_and_evaluate(config, str(tmp_path))

    losses = [value for _, value in history["train_loss"]]
    assert [step for step, _ in history["train_loss"]] == [5, 10, 15, 20]
    assert losses[-1] < losses[0]
    for name in ("train_accuracy", "grad_norm", "learning_rate", "eval_loss", "eval_accuracy"):
        assert all(math.isfinite(value) for _, value in history[name]), name
    assert history["eval_accuracy"][-1][1] > 0.3
    assert _checkpoint_steps(tmp_path) == [10, 20]
    assert (tmp_path / "learning_rate.png").is_file()
    assert list(tmp_path.glob("events.out.tfevents.*"))

    # The resolved config is saved in the workdir, as a config file to rerun or diff.
    saved = runpy.run_path(str(tmp_path / "config.py"))["get_config"]()
    assert saved.to_dict() == config.to_dict()

    # --mode=eval: a checkpoint evaluated without training gives what the run logged.
    assert train.evaluate(config, str(tmp_path)) == (
        20, {name: history[name][-1][1] for name in ("eval_loss", "eval_accuracy")}
    )  # fmt: skip
    assert (
        train.evaluate(config, str(tmp_path), step=10)[1]["eval_accuracy"]
        == (history["eval_accuracy"][0][1])
    )

    # --mode=predict and --mode=export: the exported forward pass (jax.export, usable without
    # this code) takes the images as they are and gives the logits the checkpoint's model
    # gives them normalized.
    images = data.load_split(config.dataset, "test")["image"][:6]
    np.save(tmp_path / "images.npy", images)
    ranked = predict.predict(config, str(tmp_path), str(tmp_path / "images.npy"), top_k=2)
    assert [name for name, _ in ranked] == [f"images.npy[{i}]" for i in range(6)]
    assert all(len(top) == 2 and top[0][1] >= top[1][1] for _, top in ranked)
    call, meta = export.load(predict.export_model(config, str(tmp_path)))
    assert meta["step"] == 20 and len(meta["class_names"]) == 10
    _, forward = train.trained_model(config, str(tmp_path))
    batch = images.astype(np.float32) / 255.0
    normalized = (batch - 0.2) / 0.3
    np.testing.assert_allclose(call(batch), jax.jit(forward)(normalized), rtol=1e-5, atol=1e-5)
    best = [top[0][0] for _, top in ranked]
    assert best == [meta["class_names"][i] for i in np.argmax(call(batch), axis=-1)]

    # The same workdir with more steps resumes at step 20 instead of starting over; this run
    # also traces steps 26-27 (after 5 of warm-up) for TensorBoard's profile tab.
    config.num_train_steps = 30
    config.profile_steps = 2
    resumed = train.train_and_evaluate(config, str(tmp_path))
    assert [step for step, _ in resumed["train_loss"]] == [25, 30]
    assert _checkpoint_steps(tmp_path)[-1] == 30
    assert len(list(tmp_path.glob("plugins/profile/*/*.xplane.pb"))) == 1


class _Tracked:
    """A compiled step (or its ``lower()`` result) that names itself in ``active`` while it is
    called, lowered or compiled: XLA compilations logged meanwhile by the same thread are that
    step's (other threads, such as the learning-rate plot's, compile their own programs)."""

    def __init__(self, step: Any, name: str, active: dict[int, str]) -> None:
        self.step, self.name, self.active = step, name, active

    def _run(self, method: Any, *args: Any) -> Any:
        self.active[threading.get_ident()] = self.name
        try:
            return method(*args)
        finally:
            del self.active[threading.get_ident()]

    def __call__(self, *args: Any) -> Any:
        return self._run(self.step, *args)

    def lower(self, *args: Any) -> _Tracked:
        return _Tracked(self._run(self.step.lower, *args), self.name, self.active)

    def compile(self) -> Any:
        return self._run(self.step.compile)


def test_steps_compile_once(tmp_path, monkeypatch, caplog):
    """The train and eval steps compile once per run (ahead of time, before the first batch):
    no log step, evaluation, checkpoint or last partial eval batch compiles them again."""
    active: dict[int, str] = {}  # thread -> the step it is running
    compiles: collections.Counter = collections.Counter()

    class CompileLog(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            step = active.get(record.thread)
            if step and record.getMessage().startswith("Finished XLA compilation"):
                compiles[step] += 1

    def tracking(method: str) -> Any:
        original = getattr(parallel.DataParallel, method)
        return lambda dp, fn, state: _Tracked(original(dp, fn, state), method, active)

    for method in ("compile_train_step", "compile_eval_step"):
        monkeypatch.setattr(parallel.DataParallel, method, tracking(method))
    caplog.set_level(logging.DEBUG, logger="jax._src.dispatch")  # where jax logs compilations
    logger, handler = logging.getLogger("jax._src.dispatch"), CompileLog()
    logger.addHandler(handler)
    try:
        history = train.train_and_evaluate(quick.get_config(), str(tmp_path))
    finally:
        logger.removeHandler(handler)
    assert len(history["eval_loss"]) == 2 and len(history["train_loss"]) == 4
    assert compiles == {"compile_train_step": 1, "compile_eval_step": 1}, dict(compiles)


def test_finished_run_only_evaluates(tmp_path):
    config = quick.get_config()
    config.num_train_steps = 4
    config.log_every_steps = 2
    config.optimizer.schedule.warmup_steps = 2
    config.optimizer.ema_decay = 0.9  # evaluates the EMA parameters
    config.half_precision = True  # bfloat16 compute
    first = train.train_and_evaluate(config, str(tmp_path))
    again = train.train_and_evaluate(config, str(tmp_path))
    assert "train_loss" not in again
    assert again["eval_accuracy"][0][0] == 4
    # The restored state is evaluated as the run evaluated it at its end (EMA included).
    assert again["eval_loss"] == first["eval_loss"][-1:]
    assert again["eval_accuracy"] == first["eval_accuracy"][-1:]


def _assert_resumed_from(step: int, config: Any, tmp_path: Path) -> None:
    """A run resumed from the checkpoint of ``step`` of the uninterrupted run in
    ``tmp_path / 'straight'`` ends with that run's final parameters, bitwise."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    shutil.copytree(straight / "checkpoints" / str(step), resumed / "checkpoints" / str(step))
    train.train_and_evaluate(config, str(resumed))
    last = str(config.num_train_steps)
    final = [ocp.StandardCheckpointer().restore(w / "checkpoints" / last / "default")
             for w in (straight, resumed)]  # fmt: skip
    for a, b in zip(*(jax.tree.leaves(f) for f in final), strict=True):
        np.testing.assert_array_equal(a, b)


def test_vit_with_dropout_learns_digits_and_resumes_exactly(tmp_path):
    """A small ViT (scanned blocks, remat, dropout) learns the digits; its dropout masks depend
    only on (seed, step), so a run resumed from a checkpoint ends with the parameters of the
    uninterrupted run, bitwise."""
    config = quick.get_config()
    config.model = ml_collections.ConfigDict(
        dict(name="vit", patch_size=2, width=32, depth=2, num_heads=2, dropout=0.1, remat=True)
    )
    config.update(num_train_steps=100, log_every_steps=50, eval_every_steps=100)
    config.update(checkpoint_every_steps=50)
    history = train.train_and_evaluate(config, str(tmp_path / "straight"))
    assert history["eval_accuracy"][-1][1] > 0.5  # chance: 0.1

    _assert_resumed_from(50, config, tmp_path)


@pytest.mark.parametrize(
    "get_config",
    [mnist.get_config, cifar10.get_config, vit_cifar10.get_config],
    ids=["mnist", "cifar10", "vit_cifar10"],
)
def test_real_dataset_configs_with_mock_data(tmp_path, get_config):
    config = get_config()
    config.num_train_steps = 2
    config.log_every_steps = 1
    config.eval_every_steps = 2
    config.checkpoint_every_steps = 2
    config.batch_size = 16
    config.eval_batch_size = 16
    config.optimizer.schedule.warmup_steps = 1
    if config.model.name == "resnet":  # the same architecture, smaller: compiles faster
        config.model.stage_sizes = (1, 1)
        config.model.num_filters = 8
    if config.model.name == "vit":
        config.model.update(width=16, depth=2, num_heads=2, remat=True)
    with tfds.testing.mock_data(num_examples=32):
        history = train.train_and_evaluate(config, str(tmp_path))
    assert len(history["train_loss"]) == 2
    assert all(math.isfinite(value) for _, value in history["train_loss"])
    assert math.isfinite(history["eval_loss"][-1][1])
    assert _checkpoint_steps(tmp_path) == [2]


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("model.name", "transformer", "unknown model 'transformer'"),
        ("optimizer.name", "adamm", "adamm"),
        ("loss.name", "cross_entropy", "cross_entropy"),
        ("batch_size", 12, "does not divide over the 8 devices"),
    ],
)
def test_bad_config_fails_before_training(tmp_path, key, value, message):
    config = quick.get_config()
    *parents, leaf = key.split(".")
    node = config
    for parent in parents:
        node = node[parent]
    node[leaf] = value
    with pytest.raises(ConfigError, match=message):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_command_line_misspelled_override_is_one_line(tmp_path):
    project = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "main.py", "--config=configs/quick.py", f"--workdir={tmp_path / 'run'}",
         "--config.num_train_step=5"],
        cwd=project, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        "config error: unknown key 'num_train_step'. "
        'Did you mean "num_train_steps" instead of "num_train_step"?'
    )
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_unknown_top_level_key(tmp_path):
    config = quick.get_config()
    config.unlock()
    config.num_train_step = 10
    with pytest.raises(ConfigError, match="num_train_step"):
        train.train_and_evaluate(config, str(tmp_path))


_WITHOUT_TENSORFLOW = """
import functools
import importlib
import sys

for name in ("tensorflow", "tensorflow_datasets"):
    sys.modules[name] = None  # importing them now raises ImportError
from configs import quick
from plugins import data, losses, metrics, optim

train = importlib.import_module(sys.argv[1] + ".train")
parallel = importlib.import_module(sys.argv[1] + ".parallel")
config = quick.get_config()
tx = optim.create(config.optimizer, total_steps=config.num_train_steps)
state = train.create_train_state(config, tx, 10, (8, 8, 1))
dp = parallel.DataParallel(config.mesh)
step = functools.partial(train.train_step, loss_fn=losses.create(config.loss))
if isinstance(state, tuple):  # NNX: (graphdef, state)
    graphdef, state = state
    step = functools.partial(step, graphdef)
step = dp.compile_train_step(step, state)
batch = next(dp.train_batches([data.example_batch((8, 8, 1), config.batch_size)]))
state, so_far = step(dp.put_state(state), dp.put_state(metrics.TrainMetrics.empty()), batch)
print(metrics.scalars(dp.to_host(so_far))["train_loss"])
try:
    data.load_split("digits", "train")
except ImportError as error:
    print(error)
"""


def test_steps_build_and_run_without_tensorflow():
    """``create_train_state`` and ``train_step``: a model's state and steps build, compile and run
    where TensorFlow and tensorflow-datasets are missing (only reading data needs them, and
    says so)."""
    package = train.__name__.rpartition(".")[0]
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TENSORFLOW, package],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, check=True,
    )  # fmt: skip
    loss, error = result.stdout.strip().splitlines()[-2:]
    assert abs(float(loss) - math.log(10)) < 0.5  # ten classes, untrained: about log(10)
    assert "needs tensorflow-datasets" in error


def test_mixup_run_compiles_once_and_resumes_exactly(tmp_path, monkeypatch, caplog):
    """config.augment with mixup/cutmix: the steps compile once (ahead of time, for batches with
    soft ``target`` labels), accuracy counts the hard labels, and a run resumed from a checkpoint
    ends with the parameters of the uninterrupted run, bitwise (the draws depend on (seed,
    step) only)."""
    config = quick.get_config()
    config.augment = [
        dict(name="crop", padding=1),
        dict(name="flip"),
        dict(name="normalize", mean=0.3, std=0.4),
        dict(name="mixup", alpha=0.4),
        dict(name="cutmix", prob=0.5),
    ]
    active: dict[int, str] = {}
    compiles: collections.Counter = collections.Counter()

    class CompileLog(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            step = active.get(record.thread)
            if step and record.getMessage().startswith("Finished XLA compilation"):
                compiles[step] += 1

    original = parallel.DataParallel.compile_train_step
    monkeypatch.setattr(
        parallel.DataParallel,
        "compile_train_step",
        lambda dp, fn, state: _Tracked(original(dp, fn, state), "train", active),
    )
    caplog.set_level(logging.DEBUG, logger="jax._src.dispatch")  # where jax logs compilations
    logger, handler = logging.getLogger("jax._src.dispatch"), CompileLog()
    logger.addHandler(handler)
    try:
        history = train.train_and_evaluate(config, str(tmp_path / "straight"))
    finally:
        logger.removeHandler(handler)
    assert compiles == {"train": 1}, dict(compiles)
    for name in ("train_loss", "train_accuracy", "eval_accuracy"):
        assert all(math.isfinite(value) for _, value in history[name]), name
    assert all(0 <= value <= 1 for _, value in history["train_accuracy"])

    _assert_resumed_from(10, config, tmp_path)
