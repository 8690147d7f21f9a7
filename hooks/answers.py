"""Checks the template answers, at several points, so that a bad answer leaves nothing behind.

1. Before anything is generated, by :class:`CheckAnswers` (a cookiecutter ``_extensions``
   entry): ``cookiecutter.json`` renders its last (private) variable ``__answers_checked`` with
   the Jinja filter ``check_answers`` right after the last answer is known, and the extension
   checks again when cookiecutter renders the project folder's name, just before creating it
   (that covers a replayed or passed-in context, which skips the prompts). A bad answer stops
   cookiecutter with ``FailedHookException('ERROR: ...')``, which its command line prints as
   one line -- no output directory, not even an empty parent of ``project_slug='a/b'``.
2. ``hooks/pre_gen_project.py`` runs :func:`problem` once more, for a tool that loads no
   extensions; cookiecutter then removes the folder it created.

The extension also gives the templates and hooks what they need from this module: the
absolute template folder and start directory (``template_root``, ``launch_dir``; hooks run in
the new project, where a relative template path no longer resolves) and the filter
``docstring_text`` (free text made safe inside a Python docstring).
"""

from __future__ import annotations

import keyword
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# Import names the generated project (its training run, tests and tools) needs unshadowed: the
# non-stdlib top-level modules a training run imports (a test of the template checks that this
# list still covers them), and the project's own top-level names and tools.
SHADOWED = frozenset(
    """
    absl astunparse certifi charset_normalizer chex cloudpickle clu configs conftest cycler
    dateutil etils filelock flatbuffers flax fonttools fsspec gast google h5py humanize idna
    immutabledict jax jaxlib joblib keras kiwisolver main matplotlib ml_collections ml_dtypes
    mpl_toolkits msgpack namex narwhals nox np numpy opt_einsum optax optree orbax packaging
    pil pip pkg_resources plugins promise psutil pybind11_abseil pygments pyparsing pytest
    requests rich scipy setuptools simplejson six sklearn tensorboard tensorflow
    tensorflow_datasets tensorflow_metadata tensorstore termcolor test tests tf tfds
    threadpoolctl toml tqdm tree treescope typing_extensions urllib3 uvloop wheel wrapt yaml
    """.split()
)
# A PEP 508 project name (what pyproject.toml's ``name`` must be): letters, digits, '.', '_',
# '-', starting and ending with a letter or digit.
SLUG_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")
MAX_NAME_LENGTH = 64
# Taken when cookiecutter first imports this module, before it changes directory.
TEMPLATE_ROOT = str(Path(__file__).resolve().parent.parent)
LAUNCH_DIR = os.getcwd()


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
        if _slugify(project_name) == slug:
            return (
                f"project_name {project_name!r} has no letters or digits to name the project "
                "folder after; give a name such as 'My Flax Project' (or set project_slug)."
            )
        return "project_slug is empty; it names the folder to create, e.g. 'my-flax-project'."
    if "/" in slug or "\\" in slug or ".." in slug or slug.strip() != slug:
        return (
            f"project_slug {slug!r} must be a plain folder name: no path separators, no '..', "
            "no surrounding spaces."
        )
    if not SLUG_RE.match(slug):
        return (
            f"project_slug {slug!r} may only hold letters, digits, '.', '_' and '-', "
            "and must start and end with a letter or digit."
        )
    if len(slug) > MAX_NAME_LENGTH:
        return (
            f"project_slug is {len(slug)} characters long; keep it to {MAX_NAME_LENGTH} "
            "(give a shorter project_name, or set project_slug and package_name)."
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


def _slugify(text: str) -> str:
    """The folder name ``cookiecutter.json`` derives from ``project_name`` (its ``slugify``)."""
    try:
        from slugify import slugify  # python-slugify, a cookiecutter dependency
    except ImportError:
        return text
    return slugify(text)


def check(answers: Mapping[str, Any], returns: str = "yes") -> str:
    """Raises cookiecutter's ``FailedHookException('ERROR: <problem>')`` for a bad answer (its
    command line prints that one line); returns ``returns`` when all answers are fine."""
    message = problem(answers)
    if message is None:
        return returns
    from cookiecutter.exceptions import FailedHookException

    raise FailedHookException(f"ERROR: {message}")


def docstring_text(text: str) -> str:
    """``text`` escaped to sit inside a triple-quoted docstring: backslashes and quotes."""
    return str(text).replace("\\", "\\\\").replace('"', '\\"')


try:
    from jinja2.ext import Extension
except ImportError:  # the pre-generation hook needs only problem()
    Extension = object  # type: ignore[assignment,misc]


# The template folder's name, which cookiecutter renders to create the project folder.
PROJECT_FOLDER = "{{cookiecutter.project_slug}}"


class CheckAnswers(Extension):  # type: ignore[misc,valid-type]
    """Jinja extension: the filters ``check_answers`` (``cookiecutter | check_answers``) and
    ``docstring_text``, the globals ``template_root`` and ``launch_dir``, and the check of the
    answers when the project folder's name is rendered."""

    def __init__(self, environment: Any) -> None:
        super().__init__(environment)
        environment.filters["check_answers"] = check
        environment.filters["docstring_text"] = docstring_text
        environment.globals["template_root"] = TEMPLATE_ROOT
        environment.globals["launch_dir"] = LAUNCH_DIR

    def preprocess(self, source: str, name: str | None, filename: str | None = None) -> str:
        """Prefixes the project folder's name with the check, which renders as nothing."""
        if source == PROJECT_FOLDER:
            return "{{ cookiecutter | check_answers('') }}" + source
        return source
