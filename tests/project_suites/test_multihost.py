"""Two processes train like one, and one device like eight: ``main.py`` run on this machine.

Each process gets 4 simulated CPU devices (8 in all, as many as this test process has), gloo
collectives and a coordinator on 127.0.0.1. They must give the loss curve of one process with
the same global batch, write TensorBoard events from process 0 only, write each checkpoint once,
and both resume from it when the command is run again -- also after SIGTERM to one of them. One
process on one device must give the loss curve of this process's 8 devices.

A suite of the repository's, run inside a generated project (``nox -s template`` copies it
into the project's ``tests/`` for the variants ``noxfile.PROJECT_SUITES`` names).
"""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import processes
from configs import quick

PROJECT = Path(__file__).resolve().parents[1]
# The generated project's package: its folder holding train.py.
PACKAGE = next(p.name for p in PROJECT.iterdir() if (p / "train.py").is_file())
train = importlib.import_module(f"{PACKAGE}.train")
NUM_PROCESSES = 2
# (num_train_steps of the first run, of the resumed run)
STEPS = (6, 10)
OVERRIDES = dict(log_every_steps=1, eval_every_steps=3, checkpoint_every_steps=3)


def _launch(
    workdir: Path,
    num_train_steps: int,
    overrides: dict = OVERRIDES,
    sigterm_after_checkpoint: int | None = None,
) -> list[tuple[int, str]]:
    """``main.py --config=configs/quick.py`` as two processes of one job (4 CPU devices each):
    ``processes.launch``."""
    overrides = {**overrides, "num_train_steps": num_train_steps}
    args = [f"--config.{key}={value}" for key, value in overrides.items()]
    return processes.launch(
        workdir,
        ["--config=configs/quick.py", *args],
        num_processes=NUM_PROCESSES,
        sigterm_after_checkpoint=sigterm_after_checkpoint,
    )


def _events(path: Path) -> dict[str, dict[int, float]]:
    """Scalars of one TensorBoard event file: ``{tag: {step: value}}``."""
    import tensorflow as tf

    scalars: dict[str, dict[int, float]] = {}
    for event in tf.compat.v1.train.summary_iterator(str(path)):
        for value in event.summary.value:
            if value.HasField("tensor") and not value.tensor.tensor_shape.dim:
                number = tf.make_ndarray(value.tensor)
                if np.issubdtype(number.dtype, np.number):
                    scalars.setdefault(value.tag, {})[event.step] = float(number)
    return scalars


def _checkpoint_steps(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def test_two_processes_train_resume_and_log_like_one(tmp_path):
    workdir = tmp_path / "two"
    reference = tmp_path / "one"
    config = quick.get_config()
    config.update_from_flattened_dict(OVERRIDES)
    expected: dict[str, list[tuple[int, float]]] = {}
    seen: dict[str, dict[int, float]] = {}
    event_files: set[Path] = set()

    for run, num_train_steps in enumerate(STEPS):
        outputs = _launch(workdir, num_train_steps)
        config.num_train_steps = num_train_steps
        for name, values in train.train_and_evaluate(config, str(reference)).items():
            expected.setdefault(name, []).extend(values)

        # Only process 0 writes TensorBoard events: one new event file per run, named by its pid.
        new = set(workdir.glob("events.out.tfevents.*")) - event_files
        assert len(new) == 1, sorted(p.name for p in new)
        (path,) = new
        assert f".{outputs[0][0]}." in path.name, (path.name, [pid for pid, _ in outputs])
        event_files |= new
        for tag, values in _events(path).items():
            seen.setdefault(tag, {}).update(values)

        # Each checkpoint is written once (one directory per step, committed) by both together.
        steps = list(range(3, num_train_steps + 1, 3)) + [num_train_steps]
        assert _checkpoint_steps(workdir) == sorted(set(steps))[-3:]
        finals = []
        for _, out in outputs:
            finals += [line for line in out.splitlines() if line.startswith("final eval_accuracy")]
            if run:  # both processes restored the checkpoint of the first run
                assert f"Resumed from the checkpoint of step {STEPS[0]}" in out, out[-3000:]
                assert f"Training steps {STEPS[0] + 1} to {num_train_steps}" in out, out[-3000:]
        assert len(finals) == NUM_PROCESSES and len(set(finals)) == 1, finals
        assert finals[0].endswith(f"at step {num_train_steps}"), finals

    for name in ("train_loss", "grad_norm", "learning_rate", "eval_loss", "eval_accuracy"):
        steps = [step for step, _ in expected[name]]
        assert sorted(seen[name]) == steps, name
        np.testing.assert_allclose(
            [seen[name][step] for step in steps],
            [value for _, value in expected[name]],
            rtol=2e-5,
            atol=1e-6,
            err_msg=name,
        )
    assert len(expected["train_loss"]) == STEPS[-1]


PREEMPT_STEPS = 100
PREEMPT_OVERRIDES = dict(log_every_steps=5, eval_every_steps=50, checkpoint_every_steps=25)


def test_sigterm_to_one_process_stops_both_at_one_step_and_resumes(tmp_path):
    """SIGTERM to process 0 alone (a preemption notice): JAX's preemption service stops both
    processes after the same step, which is checkpointed once; the rerun resumes from it and
    logs what one uninterrupted process logs."""
    workdir = tmp_path / "two"
    outputs = _launch(workdir, PREEMPT_STEPS, PREEMPT_OVERRIDES, sigterm_after_checkpoint=25)
    saved = set()
    for _, out in outputs:
        saved.update(re.findall(r"preempted \(SIGTERM\): checkpoint saved at step (\d+)", out))
    assert len(saved) == 1, saved  # both processes name the same step
    step = int(saved.pop())
    assert 25 <= step < PREEMPT_STEPS and step in _checkpoint_steps(workdir)

    outputs = _launch(workdir, PREEMPT_STEPS, PREEMPT_OVERRIDES)
    for _, out in outputs:
        assert f"Resumed from the checkpoint of step {step}" in out, out[-3000:]
    seen: dict[str, dict[int, float]] = {}
    for path in workdir.glob("events.out.tfevents.*"):  # one per run, process 0's
        for tag, values in _events(path).items():
            seen.setdefault(tag, {}).update(values)

    config = quick.get_config()
    config.update_from_flattened_dict({**PREEMPT_OVERRIDES, "num_train_steps": PREEMPT_STEPS})
    expected = train.train_and_evaluate(config, str(tmp_path / "one"))
    # Over 100 steps the two processes' other summation order drifts up to ~1e-4 from one
    # process (2e-5 holds for the 10 steps above); a resume that lost state or data position
    # would be off by orders of magnitude more from the first log step after it.
    for name in ("train_loss", "eval_accuracy"):
        assert sorted(seen[name]) == [s for s, _ in expected[name]], name
        np.testing.assert_allclose(
            [seen[name][s] for s, _ in expected[name]],
            [value for _, value in expected[name]],
            rtol=2e-4,
            err_msg=name,
        )


def test_one_device_trains_like_eight(tmp_path):
    """The same config and global batch on one device: the curve of 8 devices, to float32
    rounding (the gradient is summed in another order)."""
    workdir = tmp_path / "one-device"
    overrides = {**OVERRIDES, "num_train_steps": STEPS[0]}
    command = [
        sys.executable, "main.py", "--config=configs/quick.py", f"--workdir={workdir}",
        *(f"--config.{key}={value}" for key, value in overrides.items()),
    ]  # fmt: skip
    env = processes.cpu_env(devices_per_process=1)
    run = subprocess.run(
        command, cwd=PROJECT, env=env, capture_output=True, text=True, timeout=processes.TIMEOUT_S
    )  # fmt: skip
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-4000:]
    assert f"Training steps 1 to {STEPS[0]} on 1 device(s)" in output, output[-4000:]
    (path,) = workdir.glob("events.out.tfevents.*")
    seen = _events(path)

    config = quick.get_config()
    config.update_from_flattened_dict(overrides)
    expected = train.train_and_evaluate(config, str(tmp_path / "eight-devices"))
    for name in ("train_loss", "grad_norm", "eval_loss", "eval_accuracy"):
        assert sorted(seen[name]) == [step for step, _ in expected[name]], name
        np.testing.assert_allclose(
            [seen[name][step] for step, _ in expected[name]],
            [value for _, value in expected[name]],
            rtol=1e-5,
            atol=1e-6,
            err_msg=name,
        )
