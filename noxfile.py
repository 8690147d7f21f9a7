"""Nox sessions: tests, lint, demo, bench (and, with the template, its variants).

Sessions run in the environment nox itself runs in (``make`` bootstraps ``.venv`` with
everything installed), so no session downloads jax again. Tools are run as
``sys.executable -m tool`` so they come from that environment, never from the PATH.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.default_venv_backend = "none"

LINTED = ("plugins", "tests", "benchmarks", "hooks", "noxfile.py")
EIGHT_CPU_DEVICES = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}


@nox.session
def tests(session: nox.Session) -> None:
    """Runs the plugins test suite on 8 simulated CPU devices."""
    workers = os.environ.get("PYTEST_WORKERS", "2")
    session.run(
        sys.executable, "-m", "pytest", "-q", "-n", workers, *session.posargs, env=EIGHT_CPU_DEVICES
    )


@nox.session
def lint(session: nox.Session) -> None:
    """Lints with ruff."""
    # Explicit paths: the template folder holds Jinja (its pyproject.toml is not TOML until
    # generated); the template session lints each generated project instead.
    session.run(sys.executable, "-m", "ruff", "check", *LINTED)
    session.run(sys.executable, "-m", "ruff", "format", "--check", *LINTED)


TEMPLATE_VARIANTS = {"model_api": ["nnx", "linen"], "parallelism": ["jit", "pmap"]}
ROOT = Path(__file__).resolve().parent
# The repository's heavier suites run inside generated projects (tests/project_suites/): each on
# one variant of each model API and one of each parallelism, so every variant runs one of them.
# Both resume a killed or preempted run: reliability in one process (SIGKILL/SIGTERM/Ctrl-C at
# random steps, NaN/Inf), multihost with two processes and one device. FSDP (config.mesh) is
# the jit variants' only, on both APIs. processes.py, their helper, goes with them.
PROJECT_SUITES = {
    ("nnx", "pmap"): ("test_reliability.py",),
    ("linen", "jit"): ("test_reliability.py", "test_fsdp.py"),
    ("nnx", "jit"): ("test_multihost.py", "test_fsdp.py"),
    ("linen", "pmap"): ("test_multihost.py",),
}
JIT_ONLY_SUITES = ("test_fsdp.py",)


def _generate(session: nox.Session, out: Path, **answers: str) -> Path:
    """Generates a project from this repository's template into ``out``; returns its folder."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    session.run(
        sys.executable, "-m", "cookiecutter", str(ROOT), "--no-input", "-o", str(out),
        *(f"{key}={value}" for key, value in answers.items()),
    )  # fmt: skip
    (project,) = [p for p in out.iterdir() if p.is_dir()]
    return project


def _project_env(session: nox.Session, project: Path) -> Path:
    """A venv for a generated project, layered on this environment, with the project installed.

    The venv sees this environment's packages through a ``.pth`` file (so jax, tensorflow... are
    not downloaded again, and ``plugins`` stays this checkout's editable install) and gets the
    project itself installed editable in its own site-packages, leaving this environment alone.
    Every requirement the project declares must be installed.
    """
    venv = project.parent / "venv"
    shutil.rmtree(venv, ignore_errors=True)
    session.run(sys.executable, "-m", "venv", "--without-pip", str(venv))
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    base = sysconfig.get_paths()["purelib"]
    Path(site, "_base_environment.pth").write_text(f"import site; site.addsitedir({base!r})\n")
    session.run(
        sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
        "--no-deps", "--no-build-isolation", "-e", str(project),
    )  # fmt: skip
    check = "\n".join(
        [
            "import importlib.metadata as md, sys",
            "from packaging.requirements import Requirement",
            "dists = md.distributions()",
            "installed = {d.metadata['Name'].lower().replace('_', '-') for d in dists}",
            "reqs = [Requirement(r) for r in md.requires(sys.argv[1]) or []]",
            "needed = [r.name.lower() for r in reqs if r.marker is None or r.marker.evaluate()]",
            "missing = [n for n in needed if n.replace('_', '-') not in installed]",
            "sys.exit(f'{sys.argv[1]} requirements not installed: {missing}' if missing else 0)",
        ]
    )
    session.run(str(python), "-c", check, project.name)
    return python


@nox.session
@nox.parametrize("parallelism", TEMPLATE_VARIANTS["parallelism"])
@nox.parametrize("model_api", TEMPLATE_VARIANTS["model_api"])
def template(session: nox.Session, model_api: str, parallelism: str) -> None:
    """Generates one template variant, installs it in its own venv, lints it, runs its tests
    (and the repository's suites ``PROJECT_SUITES`` gives it) and a quick training run."""
    out = Path(session.create_tmp()).resolve() / f"template-{model_api}-{parallelism}"
    project = _generate(
        session,
        out,
        project_name=f"demo {model_api} {parallelism}",
        model_api=model_api,
        parallelism=parallelism,
    )
    python = _project_env(session, project)
    session.chdir(project)
    session.run(sys.executable, "-m", "ruff", "check", "--no-cache", ".")
    session.run(sys.executable, "-m", "ruff", "format", "--no-cache", "--check", ".")
    for suite in PROJECT_SUITES.get((model_api, parallelism), ()) + ("processes.py",):
        shutil.copy(ROOT / "tests" / "project_suites" / suite, project / "tests" / suite)
    # Two workers, a test file each at a time (a file's module fixtures are built once).
    workers = ["-n", "2", "--dist", "loadfile"]
    session.run(
        str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", *workers, *session.posargs
    )
    workdir = out / "quick-run"
    session.run(
        str(python), "main.py", "--config=configs/quick.py", f"--workdir={workdir}",
        env={"JAX_PLATFORMS": "cpu"},
    )  # fmt: skip


@nox.session
def demo(session: nox.Session) -> None:
    """Generates the default project, installs it, trains it on digits with configs/default.py
    end to end and prints the final test accuracy."""
    out = ROOT / "_demo"
    project = _generate(session, out, project_name="flax demo")
    python = _project_env(session, project)
    session.chdir(project)
    workdir = out / "workdir"
    shutil.rmtree(workdir, ignore_errors=True)
    session.run(
        str(python), "main.py", "--config=configs/default.py", f"--workdir={workdir}",
        *session.posargs, env={"JAX_PLATFORMS": "cpu"},
    )  # fmt: skip
    session.log(f"Project in {project}; TensorBoard: tensorboard --logdir {workdir}")


@nox.session
def bench(session: nox.Session) -> None:
    """Runs the benchmarks and prints side-by-side ratios."""
    session.run(sys.executable, "-m", "benchmarks.run", *session.posargs)
