"""What the benchmarks need on a machine without a package index, cookiecutter, clu or
ml-collections -- such as a lent GPU machine whose image has JAX, Flax, Optax and Orbax only.

Here (with cookiecutter and pip's package index):

    python -m benchmarks.offline_bundle .bench_bundle

renders the four template variants into ``.bench_bundle/projects/<variant>`` and downloads the
pure-Python wheels of clu and ml-collections (the versions installed here, without their
dependencies, which such images have) into ``.bench_bundle/wheels``. There, from the
repository's root (``plugins`` imports from it):

    pip install -q --no-index --no-deps --target /tmp/site .bench_bundle/wheels/*.whl
    PYTHONPATH=/tmp/site:$PWD BENCH_PROJECTS=.bench_bundle/projects python -m benchmarks.run resnet

The ``resnet`` benchmark needs neither TensorFlow nor tensorflow-datasets (it builds each
variant's steps with ``_driver.build``); the others read the digits dataset and need both.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from benchmarks import _template

WHEELS = ("clu", "ml-collections")


def render(out: Path) -> dict[str, Path]:
    """Copies the four rendered variants into ``out/<variant>``; returns them by variant."""
    projects = {}
    for variant, project in _template.generate().items():
        projects[variant] = out / variant
        shutil.rmtree(projects[variant], ignore_errors=True)
        shutil.copytree(project, projects[variant])
    return projects


def download_wheels(out: Path) -> list[Path]:
    """Downloads the wheels of :data:`WHEELS`, at the versions installed here, into ``out``."""
    pins = [f"{name}=={metadata.version(name)}" for name in WHEELS]
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps"]
    command += ["--only-binary=:all:", "-d", str(out), *pins]
    subprocess.run(command, check=True)
    return sorted(out.glob("*.whl"))


def main(argv: list[str]) -> None:
    """``python -m benchmarks.offline_bundle DIR``: projects and wheels into ``DIR``."""
    if len(argv) != 1:
        sys.exit("usage: python -m benchmarks.offline_bundle DIR")
    out = Path(argv[0])
    projects = render(out / "projects")
    wheels = download_wheels(out / "wheels")
    print(f"{len(projects)} projects in {out / 'projects'}; wheels: {[w.name for w in wheels]}")


if __name__ == "__main__":
    main(sys.argv[1:])
