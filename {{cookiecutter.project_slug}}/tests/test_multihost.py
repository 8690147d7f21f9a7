"""Two processes train like one: ``main.py`` run twice on this machine.

Each process gets 4 simulated CPU devices (8 in all, as many as this test process has), gloo
collectives and a coordinator on 127.0.0.1. They must give the loss curve of one process with
the same global batch, write TensorBoard events from process 0 only, write each checkpoint once,
and both resume from it when the command is run again.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from {{ cookiecutter.package_name }} import train

from configs import quick

PROJECT = Path(__file__).resolve().parents[1]
NUM_PROCESSES = 2
TIMEOUT_S = 300  # a hang fails the test instead of blocking CI
# (num_train_steps of the first run, of the resumed run)
STEPS = (6, 10)
OVERRIDES = dict(log_every_steps=1, eval_every_steps=3, checkpoint_every_steps=3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(workdir: Path, num_train_steps: int) -> list[tuple[int, str]]:
    """Runs ``main.py`` as two processes of one job; returns each one's (pid, output)."""
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "JAX_PLATFORMS": "cpu",
        "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
    }
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(name, None)
    overrides = {**OVERRIDES, "num_train_steps": num_train_steps}
    port = _free_port()
    command = [
        sys.executable, "main.py", "--config=configs/quick.py", f"--workdir={workdir}",
        f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={NUM_PROCESSES}",
        *(f"--config.{key}={value}" for key, value in overrides.items()),
    ]  # fmt: skip
    procs = [
        subprocess.Popen(
            [*command, f"--process_id={i}"],
            cwd=PROJECT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(NUM_PROCESSES)
    ]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        pytest.fail(f"the {NUM_PROCESSES} processes did not finish in {TIMEOUT_S}s")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, (p, out) in enumerate(zip(procs, outputs, strict=True)):
        tail = "\n".join(line for line in out.splitlines() if "[Gloo]" not in line)[-4000:]
        assert p.returncode == 0, f"process {i} failed (rc={p.returncode}):\n{tail}"
    return [(p.pid, out) for p, out in zip(procs, outputs, strict=True)]


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
