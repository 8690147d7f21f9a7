"""Validates the template answers before anything is generated.

A bad answer prints one line naming the answer and why, and exits non-zero; cookiecutter then
removes the half-created output directory, so nothing is left behind.
"""

from __future__ import annotations

import json
import keyword
import re
import sys

# The answers, as JSON rendered by cookiecutter (tojson escapes quotes and backslashes).
ANSWERS = json.loads(
    r"""{
    "project_name": {{ cookiecutter.project_name | tojson }},
    "project_slug": {{ cookiecutter.project_slug | tojson }},
    "package_name": {{ cookiecutter.package_name | tojson }},
    "model_api": {{ cookiecutter.model_api | tojson }},
    "parallelism": {{ cookiecutter.parallelism | tojson }}
}"""
)
PROJECT_NAME = ANSWERS["project_name"]
PROJECT_SLUG = ANSWERS["project_slug"]
PACKAGE_NAME = ANSWERS["package_name"]
MODEL_API = ANSWERS["model_api"]
PARALLELISM = ANSWERS["parallelism"]

# Import names the generated project (or its tests and tools) needs to import unshadowed.
SHADOWED = {
    "absl",
    "chex",
    "clu",
    "configs",
    "conftest",
    "etils",
    "flax",
    "jax",
    "jaxlib",
    "main",
    "matplotlib",
    "ml_collections",
    "nox",
    "np",
    "numpy",
    "optax",
    "orbax",
    "pip",
    "pkg_resources",
    "plugins",
    "pytest",
    "scipy",
    "setuptools",
    "sklearn",
    "tensorboard",
    "tensorflow",
    "tensorflow_datasets",
    "test",
    "tests",
    "tf",
    "tfds",
    "wheel",
}
SLUG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _stdlib() -> set[str]:
    names = set(getattr(sys, "stdlib_module_names", ()))
    names.update(sys.builtin_module_names)
    return {n.lower() for n in names}


def problem() -> str | None:
    """Returns a one-line description of the first bad answer, or None when all are fine."""
    if not PROJECT_NAME.strip():
        return "project_name is empty; give the project a name, e.g. 'My Flax Project'."
    slug = PROJECT_SLUG
    if not slug.strip():
        return "project_slug is empty; it names the folder to create, e.g. 'my-flax-project'."
    if "/" in slug or "\\" in slug or ".." in slug or slug.strip() != slug:
        return (
            f"project_slug {slug!r} must be a plain folder name: no path separators, no '..', "
            "no surrounding spaces."
        )
    if not SLUG_RE.match(slug):
        return (
            f"project_slug {slug!r} may only hold letters, digits, '.', '_' and '-', "
            "and must start with a letter or digit."
        )
    pkg = PACKAGE_NAME
    if not pkg.strip():
        return "package_name is empty; it must be a Python identifier such as 'my_flax_project'."
    if pkg[0].isdigit():
        return f"package_name {pkg!r} starts with a digit; a Python package name cannot."
    if not (pkg.isascii() and pkg.isidentifier()):
        return (
            f"package_name {pkg!r} is not a valid Python identifier "
            "(use letters, digits and '_', e.g. 'my_flax_project')."
        )
    if keyword.iskeyword(pkg) or keyword.issoftkeyword(pkg):
        return f"package_name {pkg!r} is a Python keyword; choose another name."
    if pkg.lower() in SHADOWED or pkg.lower() in _stdlib():
        return (
            f"package_name {pkg!r} would shadow the module {pkg.lower()!r} that the project "
            "imports; choose another name (e.g. 'my_" + pkg.lower() + "')."
        )
    if MODEL_API not in ("nnx", "linen"):
        return f"model_api {MODEL_API!r} is not one of 'nnx', 'linen'."
    if PARALLELISM not in ("jit", "pmap"):
        return f"parallelism {PARALLELISM!r} is not one of 'jit', 'pmap'."
    return None


if __name__ == "__main__":
    message = problem()
    if message:
        print(f"ERROR: {message}", file=sys.stderr)
        sys.exit(1)
