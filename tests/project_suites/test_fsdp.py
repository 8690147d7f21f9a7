"""FSDP on the jit variant's mesh (``config.mesh``): memory, numbers and checkpoints.

With ``mesh.fsdp=8`` on 8 simulated CPU devices every large parameter and its optimizer state
is split 8 ways; the loss curve is data=8's to 1e-5, and a checkpoint written with fsdp=8
resumes with data=8, on one device and in two processes (4 + 4), continuing the same curve.

A suite of the repository's, run inside a generated jit project (``nox -s template`` copies it
into the project's ``tests/`` for the variants ``noxfile.PROJECT_SUITES`` names).
"""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import processes
import pytest
from configs import quick

from plugins import optim, sharding
from plugins.config_errors import ConfigError

PROJECT = Path(__file__).resolve().parents[1]
# The generated project's package: its folder holding train.py.
PACKAGE = next(p.name for p in PROJECT.iterdir() if (p / "train.py").is_file())
train = importlib.import_module(f"{PACKAGE}.train")
parallel = importlib.import_module(f"{PACKAGE}.parallel")
NAMES = ("train_loss", "grad_norm", "eval_loss", "eval_accuracy")


def _config(fsdp: int = 1):
    config = quick.get_config()  # 20 steps, logs every 5, checkpoints at 10 and 20
    config.mesh.fsdp = fsdp
    return config


def _placed_state(config):
    tx = optim.create(config.optimizer, total_steps=config.num_train_steps)
    state = train.create_train_state(config, tx, 10, (8, 8, 1))
    state = state[1] if isinstance(state, tuple) else state  # NNX: (graphdef, state)
    return parallel.DataParallel(config.mesh).put_state(state)


def _final_params(workdir: Path, step: int = 20) -> list[np.ndarray]:
    """The train state of a checkpoint, restored onto one device whatever wrote it."""
    path = workdir / "checkpoints" / str(step) / "default"
    checkpointer = ocp.StandardCheckpointer()
    metadata = checkpointer.metadata(path).item_metadata
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one_device),
        getattr(metadata, "tree", metadata),
    )
    restored = checkpointer.restore(path, target)
    return [np.asarray(x) for x in jax.tree.leaves(restored["state"])]


def _assert_same_curve(got: dict, want: dict, steps: list[int] | None = None) -> None:
    for name in NAMES:
        pairs = [(s, v) for s, v in want[name] if steps is None or s in steps]
        assert [s for s, _ in got[name]] == [s for s, _ in pairs], name
        np.testing.assert_allclose(
            [v for _, v in got[name]], [v for _, v in pairs], rtol=1e-5, atol=1e-6, err_msg=name
        )


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """20 steps with data=8 and with fsdp=8: each run's workdir and history."""
    out = {}
    for name, fsdp in (("data", 1), ("fsdp", 8)):
        workdir = tmp_path_factory.mktemp(name)
        out[name] = (workdir, train.train_and_evaluate(_config(fsdp), str(workdir)))
    return out


def test_fsdp_splits_parameters_and_optimizer_state_eight_ways():
    replicated = sharding.bytes_per_device(_placed_state(_config(1)))
    split = _placed_state(_config(8))
    per_device = sharding.bytes_per_device(split)
    # What the FSDP rule leaves whole: leaves under its minimum size or with no dimension of 8.
    small = sum(
        x.nbytes for x in jax.tree.leaves(split) if x.sharding.is_fully_replicated and x.size
    )
    assert len(per_device) == len(replicated) == 8
    assert max(per_device.values()) <= max(replicated.values()) / 8 + small
    assert small < max(replicated.values()) / 8  # the large leaves were split


def test_fsdp_trains_the_curve_of_data_parallelism(runs):
    _assert_same_curve(runs["fsdp"][1], runs["data"][1])
    for a, b in zip(_final_params(runs["fsdp"][0]), _final_params(runs["data"][0]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _from_step_10(source: Path, target: Path) -> Path:
    """A workdir holding only ``source``'s checkpoint of step 10 (written with fsdp=8)."""
    shutil.copytree(source / "checkpoints" / "10", target / "checkpoints" / "10")
    return target


def test_an_fsdp_checkpoint_resumes_with_data_parallelism(runs, tmp_path):
    workdir = _from_step_10(runs["fsdp"][0], tmp_path / "resumed")
    resumed = train.train_and_evaluate(_config(1), str(workdir))
    _assert_same_curve(resumed, runs["data"][1], steps=[15, 20])


def test_an_fsdp_checkpoint_resumes_on_one_device(runs, tmp_path):
    workdir = _from_step_10(runs["fsdp"][0], tmp_path / "one-device")
    command = [sys.executable, "main.py", "--config=configs/quick.py", f"--workdir={workdir}"]
    run = subprocess.run(
        command, cwd=PROJECT, env=processes.cpu_env(devices_per_process=1), capture_output=True,
        text=True, timeout=processes.TIMEOUT_S,
    )  # fmt: skip
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-4000:]
    assert "Training steps 11 to 20 on 1 device(s)" in output, output[-4000:]
    for a, b in zip(_final_params(workdir), _final_params(runs["data"][0]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_an_fsdp_checkpoint_resumes_in_two_processes(runs, tmp_path):
    workdir = _from_step_10(runs["fsdp"][0], tmp_path / "two-processes")
    outputs = processes.launch(workdir, ["--config=configs/quick.py", "--config.mesh.fsdp=8"])
    assert all("Training steps 11 to 20 on 8 device(s)" in out for _, out in outputs)
    for a, b in zip(_final_params(workdir), _final_params(runs["data"][0]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "mesh, message",
    [
        (dict(data=2, fsdp=1), "does not fit the 8 device"),
        (dict(data=-1, fsdp=3), "does not fit the 8 device"),
        (dict(data=-1, fsdp=-1), "only one axis can be -1"),
        (dict(data=-1, fsdp=0), "mesh.fsdp must be a positive int or -1"),
    ],
)
def test_a_mesh_that_does_not_fit_is_one_config_error(tmp_path, mesh, message):
    config = _config()
    config.mesh.update(mesh)
    with pytest.raises(ConfigError, match=message):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
