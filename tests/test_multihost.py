"""Two real JAX processes (gloo CPU collectives, coordinator on 127.0.0.1) against one process.

Each process runs tests/multihost_worker.py with 4 simulated CPU devices (8 global), builds one
global batch from its own half of the data with ``plugins.sharding.global_batch`` and runs one
jitted and one pmapped step; both must equal one process's step on the concatenated batch.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location(
    "multihost_worker", ROOT / "tests/multihost_worker.py"
)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)
NUM_PROCESSES = 2
TIMEOUT_S = 120  # a hang fails the test instead of blocking CI


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict[str, np.ndarray]]:
    out = tmp_path_factory.mktemp("multihost")
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(name, None)
    port = _free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-u",
                str(ROOT / "tests/multihost_worker.py"),
                str(i),
                str(NUM_PROCESSES),
                str(port),
                str(out / f"{i}.npz"),
            ],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(NUM_PROCESSES)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"multi-process workers did not finish in {TIMEOUT_S}s")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, (p, log) in enumerate(zip(procs, logs, strict=True)):
        tail = "\n".join(line for line in log.splitlines() if "[Gloo]" not in line)[-4000:]
        assert p.returncode == 0, f"process {i} failed (rc={p.returncode}):\n{tail}"
    return [dict(np.load(out / f"{i}.npz")) for i in range(NUM_PROCESSES)]


@pytest.mark.parametrize("mode", ["jit", "pmap"])
def test_two_processes_match_one_process(results, mode):
    loss, grads = worker.reference()
    for r in results:
        np.testing.assert_array_equal(r["global_shape"], [worker.GLOBAL_BATCH, worker.FEATURES])
        np.testing.assert_allclose(r[f"{mode}_loss"], loss, rtol=1e-5)
        for name, g in grads.items():
            np.testing.assert_allclose(r[f"{mode}_{name}"], g, rtol=1e-5, atol=1e-6)


def test_pad_shard_unpad_per_process(results):
    for r in results:
        assert r["eval_out"].shape == (7, worker.HIDDEN)
        np.testing.assert_allclose(r["eval_out"], r["eval_ref"], rtol=1e-5, atol=1e-6)


def test_disagreeing_batches_raise_one_clear_error_everywhere(results):
    for r in results:
        message = str(r["shape_error"])
        assert "per-process batch differs across processes" in message
        assert "process 0: x: (8, 6) float32" in message
        assert "process 1: x: (6, 6) float32" in message


def test_disagreeing_values_raise(results):
    for r in results:
        assert "differs across processes at 'seed'" in str(r["value_error"])
