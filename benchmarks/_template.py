"""Generated template variants for the benchmarks, and a way to run code inside one.

``generate()`` renders the four variants (``model_api`` x ``parallelism``) of this repository's
template with cookiecutter into a temporary folder, once per benchmark run. ``run_driver()`` runs
``benchmarks/_driver.py`` in a fresh process inside a generated project (its folder first on
``sys.path``, so ``configs`` and the package import as they do for ``main.py``) and returns the
JSON the driver prints last.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DRIVER = Path(__file__).resolve().parent / "_driver.py"
VARIANTS = [("nnx", "jit"), ("nnx", "pmap"), ("linen", "jit"), ("linen", "pmap")]
PACKAGE = "bench_project"


def name(model_api: str, parallelism: str) -> str:
    return f"{model_api}-{parallelism}"


@functools.cache
def generate() -> dict[str, Path]:
    """Renders every variant (once per process); returns ``{'nnx-jit': project_dir, ...}``.

    With ``BENCH_PROJECTS=DIR`` set, the variants rendered earlier into ``DIR/<variant>`` (by
    ``python -m benchmarks.offline_bundle``) are used instead: for machines without cookiecutter.
    Rendered projects live in a temporary folder that is deleted when this process exits.
    """
    rendered = os.environ.get("BENCH_PROJECTS")
    if rendered:
        projects = {name(*v): Path(rendered, name(*v)).absolute() for v in VARIANTS}
        missing = [str(p) for p in projects.values() if not (p / "main.py").is_file()]
        if missing:
            raise FileNotFoundError(f"BENCH_PROJECTS: no rendered project at {missing}")
        return projects
    from cookiecutter.main import cookiecutter

    out = Path(tempfile.mkdtemp(prefix="bench_template_"))
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    projects = {}
    for model_api, parallelism in VARIANTS:
        projects[name(model_api, parallelism)] = Path(
            cookiecutter(
                str(ROOT),
                no_input=True,
                output_dir=str(out / name(model_api, parallelism)),
                extra_context=dict(
                    project_name="bench project", model_api=model_api, parallelism=parallelism
                ),
            )
        )
    return projects


def env(devices: int = 1, platforms: str | None = "cpu", **extra: str) -> dict[str, str]:
    """The environment of a benchmark subprocess: ``devices`` simulated CPU devices, on
    ``platforms`` (``JAX_PLATFORMS``; ``None`` keeps this process's setting: JAX's default
    backend, a GPU where there is one)."""
    out = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **extra)
    if platforms is not None:
        out["JAX_PLATFORMS"] = platforms
    flags = [f for f in out.get("XLA_FLAGS", "").split() if "device_count" not in f]
    if devices > 1:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    out["XLA_FLAGS"] = " ".join(flags)
    return out


def run_driver(
    project: Path,
    mode: str,
    *args: str,
    devices: int = 1,
    platforms: str | None = "cpu",
    timeout: float = 600,
):
    """Runs ``_driver.py mode args`` inside ``project`` (see :func:`env`); returns its JSON."""
    proc = subprocess.run(
        [sys.executable, str(DRIVER), mode, PACKAGE, *args],
        cwd=project,
        env=env(devices, platforms),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode or not lines:
        raise RuntimeError(f"driver {mode} failed in {project}:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])
