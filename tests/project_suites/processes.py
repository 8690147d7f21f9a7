"""Running a generated project's ``main.py`` as several processes of one job on this machine.

A helper of the repository's suites that run inside generated projects (``nox -s template``
copies it beside them): each process gets its own simulated CPU devices, gloo collectives and a
coordinator on 127.0.0.1.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300  # a hang fails the test instead of blocking CI


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env(devices_per_process: int) -> dict[str, str]:
    """This process's environment for ``main.py`` on CPU devices, without a cluster's."""
    env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}",
        "JAX_PLATFORMS": "cpu",
        "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
    }
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(name, None)
    return env


def launch(
    workdir: Path,
    args: list[str],
    *,
    num_processes: int = 2,
    devices_per_process: int = 4,
    sigterm_after_checkpoint: int | None = None,
) -> list[tuple[int, str]]:
    """Runs ``main.py --workdir=WORKDIR ARGS`` as ``num_processes`` processes of one job;
    returns each one's (pid, output).

    With ``sigterm_after_checkpoint=n``, process 0 alone gets SIGTERM once checkpoint ``n`` is
    written, and all must exit with 143 (preempted); otherwise all must exit with 0.
    """
    env = cpu_env(devices_per_process)
    port = free_port()
    command = [
        sys.executable, "main.py", f"--workdir={workdir}", *args,
        f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={num_processes}",
    ]  # fmt: skip
    logs = [workdir.parent / f"{workdir.name}-process{i}.log" for i in range(num_processes)]
    procs = []
    for i, log in enumerate(logs):
        with open(log, "a") as out:  # a file, not a pipe: nothing blocks while we wait
            procs.append(
                subprocess.Popen(
                    [*command, f"--process_id={i}"],
                    cwd=PROJECT,
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            )
    deadline = time.monotonic() + TIMEOUT_S
    try:
        if sigterm_after_checkpoint is not None:
            while not (workdir / "checkpoints" / str(sigterm_after_checkpoint)).is_dir():
                if time.monotonic() > deadline or procs[0].poll() is not None:
                    pytest.fail(f"checkpoint {sigterm_after_checkpoint} never appeared")
                time.sleep(0.1)
            procs[0].send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        pytest.fail(f"the {num_processes} processes did not finish in {TIMEOUT_S}s")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    outputs = [log.read_text() for log in logs]
    expected = 0 if sigterm_after_checkpoint is None else 128 + signal.SIGTERM
    for i, (p, out) in enumerate(zip(procs, outputs, strict=True)):
        tail = "\n".join(line for line in out.splitlines() if "[Gloo]" not in line)[-4000:]
        assert p.returncode == expected, f"process {i} failed (rc={p.returncode}):\n{tail}"
    for log in logs:
        log.unlink()
    return [(p.pid, out) for p, out in zip(procs, outputs, strict=True)]
