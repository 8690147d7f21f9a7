"""Reliability: exact resume after SIGTERM/SIGINT/SIGKILL, and non-finite losses or gradients.

Runs are stopped from the inside at a random step: the data iterator sends the signal when it is
asked for a batch, or orbax's commit of a checkpoint does (an interruption in the middle of a
checkpoint write). SIGKILLed runs are separate ``main.py`` processes; SIGTERM is caught by
the training loop, so those runs stay in this process (through ``main.train_or_exit``, which
turns it into the exit code). The NaN tests feed batches of NaN/Inf images at chosen steps by
replacing ``input_pipeline.train_batches`` for the test only.

A suite of the repository's, run inside a generated project (``nox -s template`` copies it
into the project's ``tests/`` for the variants ``noxfile.PROJECT_SUITES`` names).
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import main
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow as tf
from configs import quick

from plugins import loop, metrics

PROJECT = Path(__file__).resolve().parents[1]
# The generated project's package: its folder holding train.py.
PACKAGE = next(p.name for p in PROJECT.iterdir() if (p / "train.py").is_file())
input_pipeline = importlib.import_module(f"{PACKAGE}.input_pipeline")
train = importlib.import_module(f"{PACKAGE}.train")
TMP_SUFFIX = ".orbax-checkpoint-tmp"
NOT_REPRODUCIBLE = {"steps_per_sec", "uptime"}  # wall-clock timings

# Runs main.py after arranging for SIGKILL at the AT-th batch the run asks for (the steps run
# up to two batches behind the data), or with ACTION sigkill-in-save, inside the next checkpoint
# commit after that point: orbax has written the checkpoint into its temporary folder and not
# yet renamed it. ACTION hold prints "holding" there and sleeps (a run busy in its workdir);
# enospc-in-save fails that commit as a full disk does.
DRIVER = """
import asyncio, errno, importlib, os, runpy, signal, sys, time
action, at, package = sys.argv[1], int(sys.argv[2]), sys.argv[3]
sys.argv = ["main.py", *sys.argv[4:]]
sys.path.insert(0, os.getcwd())
from orbax.checkpoint._src.path import atomicity
input_pipeline = importlib.import_module(f"{package}.input_pipeline")

fired = {"armed": False}
signum = signal.SIGKILL if action.startswith("sigkill") else signal.SIGTERM
original_batches = input_pipeline.train_batches
original_finalize = atomicity.AtomicRenameTemporaryPath.finalize

def train_batches(*args, **kwargs):
    for index, batch in enumerate(original_batches(*args, **kwargs), 1):
        if index == at:
            fired["armed"] = True
            if action == "hold":
                print("holding", flush=True)
                time.sleep(600)
            if action.startswith("sig") and not action.endswith("-in-save"):
                os.kill(os.getpid(), signum)
        yield batch

async def finalize(self):
    if fired["armed"] and action == "enospc-in-save":
        raise OSError(errno.ENOSPC, "No space left on device")
    if fired["armed"] and action.endswith("-in-save"):
        fired["armed"] = False
        os.kill(os.getpid(), signum)
        await asyncio.sleep(0.5)  # SIGKILL lands here; SIGTERM's flag is set meanwhile
    return await original_finalize(self)

input_pipeline.train_batches = train_batches
atomicity.AtomicRenameTemporaryPath.finalize = finalize
runpy.run_path("main.py", run_name="__main__")
"""


def _config():
    """24 steps; logs, evaluations and checkpoints on different periods, so that an
    interruption leaves metrics accumulated between two log steps in the checkpoint."""
    config = quick.get_config()
    config.num_train_steps = 24
    config.log_every_steps = 4
    config.eval_every_steps = 8
    config.checkpoint_every_steps = 5
    return config


def _overrides(config) -> list[str]:
    keys = ("num_train_steps", "log_every_steps", "eval_every_steps", "checkpoint_every_steps")
    return [f"--config.{key}={config[key]}" for key in keys]


def _killed_run(workdir: Path, action: str, at: int) -> subprocess.CompletedProcess:
    args = ["--config=configs/quick.py", f"--workdir={workdir}", *_overrides(_config())]
    return subprocess.run(
        [sys.executable, "-c", DRIVER, action, str(at), PACKAGE, *args],
        cwd=PROJECT, capture_output=True, text=True,
    )  # fmt: skip


def _main(workdir: str | Path, *args: str, **kwargs) -> subprocess.CompletedProcess:
    """``python main.py`` with this suite's config into ``workdir``."""
    command = ["main.py", "--config=configs/quick.py", f"--workdir={workdir}"]
    return subprocess.run(
        [sys.executable, *command, *_overrides(_config()), *args],
        cwd=PROJECT, capture_output=True, text=True, **kwargs,
    )  # fmt: skip


def _error_line(result: subprocess.CompletedProcess) -> str:
    """The one line a run that stopped for a mistake printed (exit code 1, no traceback)."""
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if "error: " in line]
    assert len(lines) == 1 and result.stderr.rstrip().endswith(lines[0]), result.stderr[-3000:]
    return lines[0]


def _checkpoint_steps(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _restore(workdir: Path, step: int):
    """A checkpoint's state as numpy arrays (restored without a target: any layout works)."""
    restored = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "default")
    return jax.tree.map(np.asarray, restored)


def _logged(workdir: Path) -> dict[tuple[str, int], set[float]]:
    """Every scalar in the workdir's TensorBoard event files: {(tag, step): {values}}."""
    logged: dict[tuple[str, int], set[float]] = {}
    for path in sorted(workdir.glob("events.out.tfevents.*")):
        try:
            for event in tf.compat.v1.train.summary_iterator(str(path)):
                for value in event.summary.value:
                    array = tf.make_ndarray(value.tensor) if value.HasField("tensor") else None
                    if array is None or array.shape or array.dtype.kind != "f":
                        continue  # hparams and other non-scalar summaries
                    if value.tag not in NOT_REPRODUCIBLE:
                        logged.setdefault((value.tag, event.step), set()).add(float(array))
        except tf.errors.DataLossError:  # the last record of a killed run may be cut short
            pass
    return logged


def _assert_same_run(workdir: Path, reference: Path, context: str) -> None:
    """Final parameters and every logged metric equal the reference's, bitwise; a step logged
    twice (before an interruption and again after it) holds the same value both times."""
    logged, expected = _logged(workdir), _logged(reference)
    repeated = {key: values for key, values in logged.items() if len(values) > 1}
    assert not repeated, f"{context}: a step logged twice with different values: {repeated}"
    assert {key: values.pop() for key, values in logged.items()} == {
        key: values.pop() for key, values in expected.items()
    }, context
    final = _config().num_train_steps
    got, want = _restore(workdir, final), _restore(reference, final)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b, err_msg=context)


@pytest.fixture
def sigterm_to_self(monkeypatch):
    """``arm(where, at, signum=SIGTERM, times=1)``: the signal (``times`` times in a row) to
    this process in the next run when it asks for its ``at``-th batch (``where='batch'``), or
    after that in the next evaluation (``'eval'``) or right after the next checkpoint save
    started writing in the background (``'save'``). A SIGTERM outside the training loop is
    recorded instead of ending pytest."""
    stray = []
    previous = signal.signal(signal.SIGTERM, lambda *_: stray.append(1))
    original_batches = input_pipeline.train_batches
    original_eval_batches = input_pipeline.eval_batches
    original_save = ocp.CheckpointManager.save

    def arm(where: str, at: int = 1, signum: int = signal.SIGTERM, times: int = 1) -> None:
        armed = []

        def fire(here: str) -> None:
            if armed and where == here:
                armed.clear()
                for _ in range(times):
                    signal.raise_signal(signum)

        def train_batches(*args, **kwargs):
            for index, batch in enumerate(original_batches(*args, **kwargs), 1):
                if index == at:
                    armed.append(1)
                    fire("batch")
                yield batch

        def eval_batches(*args, **kwargs):
            fire("eval")
            return original_eval_batches(*args, **kwargs)

        def save(self, *args, **kwargs):
            started = original_save(self, *args, **kwargs)
            fire("save")  # while the checkpoint is being written
            return started

        monkeypatch.setattr(input_pipeline, "train_batches", train_batches)
        monkeypatch.setattr(input_pipeline, "eval_batches", eval_batches)
        monkeypatch.setattr(ocp.CheckpointManager, "save", save)

    yield arm
    signal.signal(signal.SIGTERM, previous)
    assert not stray, "SIGTERM arrived outside the training loop"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run."""
    workdir = tmp_path_factory.mktemp("reference")
    train.train_and_evaluate(_config(), str(workdir))
    return workdir


def test_killed_and_preempted_runs_resume_exactly(tmp_path, reference, sigterm_to_self, capsys):
    """SIGKILL at a random step, SIGTERM at a random step, SIGKILL during a checkpoint write:
    each rerun resumes from the latest complete checkpoint, and the run ends with the same
    parameters and metrics as the uninterrupted one."""
    seed = random.randrange(10**6)
    rng = random.Random(seed)
    context = f"random seed {seed}"
    workdir = tmp_path / "run"

    # SIGKILL at a random step: nothing but the steps since the last checkpoint is lost.
    result = _killed_run(workdir, "sigkill", rng.randint(3, 14))
    assert result.returncode == -signal.SIGKILL, (context, result.stderr[-3000:])
    before = _checkpoint_steps(workdir) if (workdir / "checkpoints").exists() else []

    # SIGTERM at a random step: the step finishes, a checkpoint of it is saved, exit code 143.
    sigterm_to_self("batch", rng.randint(2, 5))
    with pytest.raises(SystemExit) as stopped:
        main.train_or_exit(_config(), str(workdir))
    assert stopped.value.code == loop.Preempted.EXIT_CODE == 143
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("preempted (SIGTERM): checkpoint saved at step "), line
    step = int(line.split("at step ")[1].split(";")[0])
    assert _checkpoint_steps(workdir)[-1] == step > (before[-1] if before else 0), context
    assert not list((workdir / "checkpoints").glob(f"*{TMP_SUFFIX}*"))

    # SIGKILL in the middle of writing a checkpoint: the partial one is ignored, then removed.
    complete = _checkpoint_steps(workdir)
    result = _killed_run(workdir, "sigkill-in-save", rng.randint(1, 4))
    assert result.returncode == -signal.SIGKILL, (context, result.stderr[-3000:])
    assert list((workdir / "checkpoints").glob(f"*{TMP_SUFFIX}*")), "killed before writing"
    assert _checkpoint_steps(workdir)[-1] >= complete[-1]
    for step in _checkpoint_steps(workdir):  # every complete checkpoint restores
        assert jax.tree.leaves(_restore(workdir, step))

    # SIGTERM during an evaluation: the next step is the last, and it lies between two log
    # steps, so the resumed run must pick up the metrics accumulated since the last log step.
    sigterm_to_self("eval")
    with pytest.raises(loop.Preempted) as preempted:
        train.train_and_evaluate(_config(), str(workdir))
    step = preempted.value.step
    config = _config()
    assert step % config.eval_every_steps == 1 and step % config.log_every_steps, context
    assert _checkpoint_steps(workdir)[-1] == step

    # SIGTERM while a checkpoint is being written: that one completes, and the next step's too.
    sigterm_to_self("save")
    with pytest.raises(loop.Preempted) as preempted:
        train.train_and_evaluate(_config(), str(workdir))
    step = preempted.value.step
    assert _checkpoint_steps(workdir)[-2:] == [step - 1, step], context

    # Ctrl-C (SIGINT): as SIGTERM, but exit code 130. At the first batch of steps 22-24 (the
    # run above stopped at 21): a signal at the last step's batch would find nothing to stop.
    sigterm_to_self("batch", 1, signal.SIGINT)
    with pytest.raises(SystemExit) as stopped:
        main.train_or_exit(_config(), str(workdir))
    assert stopped.value.code == 128 + signal.SIGINT
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("interrupted (SIGINT): checkpoint saved at step "), line
    step = int(line.split("at step ")[1].split(";")[0])
    assert _checkpoint_steps(workdir)[-1] == step, context

    # Ctrl-C twice: KeyboardInterrupt at once, after the checkpoint being written completes.
    complete = _checkpoint_steps(workdir)
    sigterm_to_self("batch", 1, signal.SIGINT, times=2)
    with pytest.raises(KeyboardInterrupt):
        train.train_and_evaluate(_config(), str(workdir))
    assert _checkpoint_steps(workdir) == complete
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored

    sigterm_to_self("none")
    train.train_and_evaluate(_config(), str(workdir))
    assert not list((workdir / "checkpoints").glob(f"*{TMP_SUFFIX}*"))
    _assert_same_run(workdir, reference, context)


def _poisoned(steps: dict[int, float]):
    """``input_pipeline.train_batches`` whose batch of each step in ``steps`` is filled with
    that value (NaN or Inf): its loss and gradients are non-finite."""
    original = input_pipeline.train_batches

    def train_batches(config, start_step):
        batches = original(config, start_step)
        for step, batch in enumerate(batches, start_step + 1):
            if step in steps:
                batch = dict(batch, image=np.full_like(batch["image"], steps[step]))
            yield batch

    return train_batches


def test_nonfinite_batches_are_skipped_counted_and_logged(tmp_path, monkeypatch):
    monkeypatch.setattr(input_pipeline, "train_batches", _poisoned({7: math.nan, 8: math.inf}))
    config = quick.get_config()  # 20 steps, logs every 5, checkpoints at 10 and 20
    config.optimizer.skip_nonfinite = True
    history = train.train_and_evaluate(config, str(tmp_path))

    assert history["nonfinite_count"] == [(5, 0.0), (10, 2.0), (15, 2.0), (20, 2.0)]
    # The skipped steps are left out of the averages; training goes on.
    for name in ("train_loss", "train_accuracy", "grad_norm", "eval_loss"):
        assert all(math.isfinite(value) for _, value in history[name]), name
    assert history["train_loss"][-1][1] < history["train_loss"][0][1]
    assert _checkpoint_steps(tmp_path) == [10, 20]
    for step in (10, 20):
        state = _restore(tmp_path, step)
        assert all(np.isfinite(x).all() for x in jax.tree.leaves(state) if x.dtype.kind == "f")


def test_a_log_window_of_only_skipped_steps_is_a_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(
        input_pipeline, "train_batches", _poisoned(dict.fromkeys(range(6, 11), math.nan))
    )
    config = quick.get_config()  # 20 steps, logs every 5
    config.optimizer.skip_nonfinite = True
    with caplog.at_level(logging.WARNING):
        history = train.train_and_evaluate(config, str(tmp_path))
    assert history["nonfinite_count"] == [(5, 0.0), (10, 5.0), (15, 5.0), (20, 5.0)]
    assert [step for step, value in history["train_loss"] if math.isnan(value)] == [10]
    warned = [r.getMessage() for r in caplog.records if "was skipped" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("Every step from 6 to 10 was skipped"), warned


def test_nonfinite_batch_leaves_batch_norm_statistics_alone(tmp_path, monkeypatch):
    """A skipped NaN batch must not reach the batch-norm running statistics either (they are
    updated by the forward pass, not by the optimizer)."""
    monkeypatch.setattr(input_pipeline, "train_batches", _poisoned({3: math.nan}))
    config = quick.get_config()
    config.model = ml_collections.ConfigDict(dict(name="resnet", stage_sizes=(1,), num_filters=8))
    config.num_train_steps = config.checkpoint_every_steps = config.eval_every_steps = 6
    config.log_every_steps = 3
    config.optimizer.schedule.warmup_steps = 2
    config.optimizer.skip_nonfinite = True
    history = train.train_and_evaluate(config, str(tmp_path))

    assert history["nonfinite_count"] == [(3, 1.0), (6, 1.0)]
    assert math.isfinite(history["eval_loss"][-1][1])
    state = _restore(tmp_path, 6)
    floats = [x for x in jax.tree.leaves(state) if x.dtype.kind == "f"]
    assert len(floats) > 20 and all(np.isfinite(x).all() for x in floats)


def test_nonfinite_without_skipping_stops_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(input_pipeline, "train_batches", _poisoned({13: math.nan}))
    config = quick.get_config()  # checkpoints at 10 and 20, logs every 5
    with pytest.raises(loop.NonFiniteError, match="NaN/Inf at step 13 ") as raised:
        train.train_and_evaluate(config, str(tmp_path))
    assert raised.value.step == 13
    assert "skip_nonfinite=True" in str(raised.value)
    assert _checkpoint_steps(tmp_path) == [10]  # nothing after the NaN was saved
    assert not list((tmp_path / "checkpoints").glob(f"*{TMP_SUFFIX}*"))
    state = _restore(tmp_path, 10)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state) if x.dtype.kind == "f")

    # main.py ends with one line naming the step and a non-zero exit code.
    with pytest.raises(SystemExit) as stopped:
        main.train_or_exit(config, str(tmp_path))
    message = stopped.value.code
    assert isinstance(message, str) and "\n" not in message  # printed to stderr, exit code 1
    assert message.startswith("non-finite: the loss or gradients became NaN/Inf at step 13 ")
    assert "the last good checkpoint, step 10" in message
    # Skipping changes the optimizer state: the checkpoint here cannot be resumed with it.
    assert message.endswith(
        "skip_nonfinite=True in a new --workdir (skipping adds to the optimizer state, so these "
        "checkpoints cannot resume with it)"
    )
    assert _checkpoint_steps(tmp_path) == [10]


def test_finite_gradients_whose_norm_overflows_are_counted_as_finite():
    """As optax.apply_if_finite judges them (element by element): the step is applied, so its
    loss and accuracy belong in the averages."""

    step = metrics.train_step_metrics(
        loss=jnp.float32(0.5), logits=jnp.eye(2), labels=jnp.arange(2),
        grads={"w": jnp.full((4,), 1e19, jnp.float32)}, learning_rate=jnp.float32(0.1),
    )  # fmt: skip
    scalars = step.compute()
    assert math.isinf(scalars["grad_norm"])  # the norm overflows float32; no gradient does
    assert scalars["train_loss"] == 0.5 and scalars["train_accuracy"] == 1.0
    assert int(scalars["first_nonfinite"]) == 0


def test_a_diverging_run_that_skips_nonfinite_gradients_says_what_overflowed(tmp_path):
    config = quick.get_config()
    config.optimizer.learning_rate = 1e6
    config.optimizer.skip_nonfinite = True
    with pytest.raises(loop.NonFiniteError) as raised:
        train.train_and_evaluate(config, str(tmp_path))
    message = str(raised.value)
    overflowed = (
        "the gradients were finite (skip_nonfinite skips only non-finite ones) but the updates "
        "overflowed the parameters or the optimizer state"
    )
    assert overflowed in message
    assert message.endswith("not saved: no checkpoint was saved")


def test_long_log_interval_on_eight_cpu_devices(tmp_path):
    """400 steps between host reads on 8 simulated CPU devices: without a bound on the steps in
    flight, XLA's CPU client aborts the process (its collectives wait on each other once about
    160 executions queue up). ``plugins.loop.Fence`` keeps the host at most 32 steps ahead."""
    every = 400
    result = subprocess.run(
        [
            sys.executable, "main.py", "--config=configs/quick.py", f"--workdir={tmp_path}",
            f"--config.num_train_steps={every}", f"--config.log_every_steps={every}",
            f"--config.eval_every_steps={every}", f"--config.checkpoint_every_steps={every}",
        ],
        cwd=PROJECT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"at step {every}" in result.stdout + result.stderr
    assert _checkpoint_steps(tmp_path) == [every]


# ----------------------------------------------------------------------------- the workdir


def test_a_second_run_into_a_busy_workdir_is_refused_until_the_first_is_killed(tmp_path):
    """A run busy in its workdir (its lock held): a second run is refused at once with one
    line naming it, evaluation still reads the workdir; after SIGKILL of the first (its lock
    dropped by the operating system), a new run resumes and finishes."""
    workdir = tmp_path / "run"
    args = ["--config=configs/quick.py", f"--workdir={workdir}", *_overrides(_config())]
    holder = subprocess.Popen(
        [sys.executable, "-c", DRIVER, "hold", "9", PACKAGE, *args],
        cwd=PROJECT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "holding"
        line = _error_line(_main(workdir))
        assert line.startswith(f"workdir error: {workdir} is in use by process {holder.pid} on ")
        assert " since " in line, line
        evaluated = _main(workdir, "--mode=eval")  # reading needs no lock
        assert evaluated.returncode == 0, evaluated.stderr[-3000:]
        assert evaluated.stdout.startswith("step 5: "), evaluated.stdout
    finally:
        holder.kill()
        holder.wait()
    result = _main(workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _checkpoint_steps(workdir)[-1] == _config().num_train_steps


def _flip_a_parameter_byte(step_dir: Path) -> None:
    """Changes one bit of a checkpoint's parameter data so that it still decompresses (a
    failing disk's change, which orbax reads silently): the restored numbers differ."""
    want = ocp.StandardCheckpointer().restore(step_dir / "default")
    files = sorted(
        (step_dir / "default").rglob("ocdbt.process_*/d/*"), key=lambda p: -p.stat().st_size
    )
    for data in files:
        original = data.read_bytes()
        for offset in range(len(original) // 2, len(original)):
            changed = bytearray(original)
            changed[offset] ^= 0x01
            data.write_bytes(bytes(changed))
            try:
                got = ocp.StandardCheckpointer().restore(step_dir / "default")
            except Exception:  # noqa: BLE001 -- that byte broke the format: try the next
                continue
            same = jax.tree.map(
                lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), got, want
            )
            if not all(jax.tree.leaves(same)):
                return
        data.write_bytes(original)
    raise AssertionError("no byte changes the restored numbers")


def test_damaged_checkpoints_are_moved_aside_and_the_run_resumes_exactly(tmp_path, reference):
    """The newest checkpoint with a changed byte (its checksum catches it) and a stray empty
    ``checkpoints/99``: each is named in a warning and moved to ``<step>.damaged``; the run
    resumes from the newest intact one and ends as the uninterrupted run, bitwise."""
    import shutil

    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir, ignore=shutil.ignore_patterns(".lock*"))
    final = _config().num_train_steps
    _flip_a_parameter_byte(workdir / "checkpoints" / str(final))
    (workdir / "checkpoints" / "99").mkdir()
    for path in workdir.glob("events.out.tfevents.*"):
        path.unlink()  # the resumed run's events only
    result = _main(workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "error: " not in result.stderr
    warnings = [line for line in result.stderr.splitlines() if " is damaged: " in line]
    assert len(warnings) == 2, result.stderr[-3000:]
    assert "step 99 " in warnings[0] and f"step {final} " in warnings[1]
    assert "does not match the checksum saved with it" in warnings[1]
    assert "99.damaged" in warnings[0] and f"{final}.damaged" in warnings[1]
    assert (workdir / "checkpoints" / f"{final}.damaged").is_dir()
    got, want = _restore(workdir, final), _restore(reference, final)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_full_disk_while_saving_is_one_line_and_the_previous_checkpoint_is_intact(
    tmp_path, reference
):
    workdir = tmp_path / "run"
    result = _killed_run(workdir, "enospc-in-save", 9)  # the save of step 10 fails
    line = _error_line(result)
    assert line == (
        "workdir error: no space left on device while saving the checkpoint of step 10 in "
        f"{workdir / 'checkpoints'}; the previous checkpoint (step 5) is intact; free some space "
        "and rerun to resume from it"
    ), line
    assert _checkpoint_steps(workdir) == [5]
    assert not list((workdir / "checkpoints").glob(f"*{TMP_SUFFIX}*"))
    result = _main(workdir)  # space again: resumes, and ends as the uninterrupted run
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_same_run(workdir, reference, "after a full disk")


def test_workdir_urls_home_and_empty(tmp_path):
    """A ``file://`` URL trains end to end in that folder; ``~`` is the home folder in every
    file the run writes; an empty ``--workdir`` is refused and writes nothing."""
    few = ["--config.num_train_steps=6", "--config.checkpoint_every_steps=3"]
    result = _main(f"file://{tmp_path}/url run", *few)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _checkpoint_steps(tmp_path / "url run") == [3, 6]
    assert list((tmp_path / "url run").glob("events.out.tfevents.*"))
    assert not (PROJECT / "file:").exists()

    env = dict(os.environ, HOME=str(tmp_path / "home"))
    result = _main("~/run", *few, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _checkpoint_steps(tmp_path / "home" / "run") == [3, 6]
    assert (tmp_path / "home" / "run" / "config.py").is_file()
    assert not (PROJECT / "~").exists()

    before = sorted(p.name for p in PROJECT.iterdir())
    line = _error_line(_main("", *few))
    assert line.startswith("workdir error: --workdir is empty"), line
    assert sorted(p.name for p in PROJECT.iterdir()) == before
