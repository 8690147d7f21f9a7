"""Checks the template answers; used twice, so that a bad answer never leaves anything behind.

1. Before anything is generated: ``cookiecutter.json`` renders its last (private) variable
   ``__answers_checked`` with the Jinja filter ``check_answers`` of :class:`CheckAnswers` (a
   cookiecutter ``_extensions`` entry), right after the last answer is known and before cookiecutter
   creates any folder. A bad answer prints one ``ERROR: ...`` line on stderr and stops cookiecutter
   with ``FailedHookException`` -- no output directory, not even an empty parent of
   ``project_slug='a/b'`` or cookiecutter's unclear "directory already exists" for an empty slug.
2. ``hooks/pre_gen_project.py`` runs :func:`problem` again (for tools that skip the extension,
   e.g. a replayed context); cookiecutter then removes the folder it created.
"""

from __future__ import annotations

import keyword
import re
import sys
from collections.abc import Mapping
from typing import Any

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


def problem(answers: Mapping[str, Any]) -> str | None:
    """Returns a one-line description of the first bad answer, or None when all are fine."""
    project_name = str(answers.get("project_name", ""))
    project_slug = str(answers.get("project_slug", ""))
    package_name = str(answers.get("package_name", ""))
    model_api = answers.get("model_api")
    parallelism = answers.get("parallelism")
    if not project_name.strip():
        return "project_name is empty; give the project a name, e.g. 'My Flax Project'."
    slug = project_slug
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
    pkg = package_name
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
    if model_api not in ("nnx", "linen"):
        return f"model_api {model_api!r} is not one of 'nnx', 'linen'."
    if parallelism not in ("jit", "pmap"):
        return f"parallelism {parallelism!r} is not one of 'jit', 'pmap'."
    return None


def check(answers: Mapping[str, Any]) -> str:
    """Prints ``ERROR: <problem>`` and raises cookiecutter's ``FailedHookException`` for a bad
    answer; returns ``'yes'`` when all are fine."""
    message = problem(answers)
    if message is None:
        return "yes"
    from cookiecutter.exceptions import FailedHookException

    print(f"ERROR: {message}", file=sys.stderr, flush=True)
    raise FailedHookException(
        "Stopped before generating anything: a template answer is invalid (see the ERROR line)."
    )


try:
    from jinja2.ext import Extension
except ImportError:  # the pre-generation hook needs only problem()
    Extension = object  # type: ignore[assignment,misc]


class CheckAnswers(Extension):  # type: ignore[misc,valid-type]
    """Jinja extension: the filter ``check_answers``, used as ``cookiecutter | check_answers``."""

    def __init__(self, environment: Any) -> None:
        super().__init__(environment)
        environment.filters["check_answers"] = check
