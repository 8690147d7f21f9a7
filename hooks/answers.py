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
the new project, where a relative template path no longer resolves) and the filters
``docstring_text`` (free text made safe inside a Python docstring) and ``toml_string`` (free text
as a TOML basic string, non-ASCII characters written as they are).

Answers are data. Cookiecutter renders every string of the context as a Jinja template before
using it (``cookiecutter.prompt.render_variable``): the defaults of ``cookiecutter.json``, but also
an answer passed in (``extra_context``, ``key=value`` on the command line, a user config's
``default_context``), so ``{{ ... }}`` in a description would run as code. The extension's
``preprocess`` sees every source Jinja compiles; any string that is not one of the template's
own (``cookiecutter.json``'s values, the hook scripts, the paths of the template's files) is
rendered as the literal text it holds, as an answer typed at a prompt always is.
"""

from __future__ import annotations

import json
import keyword
import os
import re
import sys
import unicodedata
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# Import names the generated project (its training run, tests and tools) needs unshadowed: the
# non-stdlib top-level modules a training run imports, those of pytest and its dependencies
# (also the ones only Python 3.10 or Windows needs: exceptiongroup, tomli, colorama), of ruff and
# the build (setuptools' distutils), and the project's own top-level names and tools. A test of
# the template checks that this list still covers what a training run and pytest import.
SHADOWED = frozenset(
    """
    _distutils_hack _pytest absl astunparse certifi charset_normalizer chex cloudpickle clu
    colorama configs conftest cycler dateutil distutils etils exceptiongroup execnet filelock
    flatbuffers flax fonttools fsspec gast google h5py humanize idna immutabledict iniconfig jax
    jaxlib joblib keras kiwisolver main matplotlib ml_collections ml_dtypes mpl_toolkits msgpack
    namex narwhals nox np numpy opt_einsum optax optree orbax packaging pil pip pkg_resources
    pluggy plugins promise psutil py pybind11_abseil pygments pyparsing pytest requests rich
    ruff scipy setuptools simplejson six sklearn tensorboard tensorflow tensorflow_datasets
    tensorflow_metadata tensorstore termcolor test tests tf tfds threadpoolctl toml tomli tqdm
    tree treescope typing_extensions urllib3 uvloop wheel wrapt xdist yaml
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


# The answers written into the project as they were given (the others are names and choices).
FREE_TEXT = ("project_name", "description", "author_name")


def text_problem(key: str, value: Any) -> str | None:
    """Why a free-text answer cannot be written into the project's files, or None. Only a
    replayed context or a caller of cookiecutter's API can give these."""
    if not isinstance(value, str):
        return f"{key} must be text, not {type(value).__name__} ({value!r})."
    for char in value:
        category = unicodedata.category(char)
        if category == "Cs":
            return (
                f"{key} holds {char!r}, a lone surrogate, which is not text (undecodable bytes?); "
                "give it as valid UTF-8."
            )
        if category == "Cc":
            return (
                f"{key} holds the control character {char!r} (U+{ord(char):04X}); "
                "give one line of printable text."
            )
    return None


def problem(answers: Mapping[str, Any]) -> str | None:
    """Returns a one-line description of the first bad answer, or None when all are fine."""
    for key in (*FREE_TEXT, "project_slug", "package_name"):
        message = text_problem(key, answers.get(key, ""))
        if message:
            return message
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
    command line prints that one line); returns ``returns`` when all answers are fine.
    ``cookiecutter.json`` applies it only where the extension is loaded (a replay whose file
    names ``_extensions`` renders its missing variables without it)."""
    if "project_name" in answers:
        message = problem(answers)
    elif "_extensions" in answers:
        # A replay renders only the variables its file lacks: here the template's extension.
        message = (
            'the replayed context lacks "_extensions": ["hooks.answers.CheckAnswers"], '
            "which the template needs; replay a file that cookiecutter wrote, or add it."
        )
    else:  # a replay that lacks only private variables; checked when the folder is named
        message = None
    if message is None:
        return returns
    from cookiecutter.exceptions import FailedHookException

    raise FailedHookException(f"ERROR: {message}")


def docstring_text(text: str) -> str:
    """``text`` escaped to sit inside a triple-quoted docstring: backslashes and quotes."""
    return str(text).replace("\\", "\\\\").replace('"', '\\"')


def toml_string(text: str) -> str:
    """``text`` as a TOML basic string: quotes, backslashes and control characters escaped,
    everything else (emoji, accents) written as it is. Jinja's ``tojson`` would write
    ``"\\ud83d\\ude80"``, surrogate escapes that TOML does not accept."""
    out = []
    for char in str(text):
        if char in '"\\':
            out.append("\\" + char)
        elif unicodedata.category(char) == "Cc":
            out.append(f"\\u{ord(char):04X}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def _strings(value: Any) -> set[str]:
    """Every string in a JSON value: its keys and values, recursively."""
    if isinstance(value, str):
        return {value}
    if isinstance(value, dict):
        return {s for k, v in value.items() for s in (*_strings(k), *_strings(v))}
    if isinstance(value, list):
        return {s for v in value for s in _strings(v)}
    return set()


def _template_sources() -> tuple[frozenset[str], tuple[str, ...]]:
    """The strings this template itself renders with ``from_string``: the values of
    ``cookiecutter.json`` and the hook scripts; and the relative paths of the project folder's
    files and folders whose names are templates (longest first)."""
    root = Path(TEMPLATE_ROOT)
    sources: set[str] = set()
    try:
        sources |= _strings(json.loads((root / "cookiecutter.json").read_text(encoding="utf-8")))
    except (OSError, ValueError):
        pass
    for hook in (root / "hooks").glob("*"):
        if hook.stem in ("pre_prompt", "pre_gen_project", "post_gen_project") and hook.is_file():
            try:
                sources.add(hook.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError):
                pass
    folder = root / PROJECT_FOLDER
    paths = {
        os.path.normpath(path.relative_to(folder))
        for path in folder.rglob("*")
        if "{" in str(path.relative_to(folder))
    }
    return frozenset(sources), tuple(sorted(paths, key=len, reverse=True))


def jinja_literal(text: str) -> str:
    """A Jinja template that renders to ``text`` exactly: one string literal whose characters,
    but for letters, digits and spaces, are written as ``\\U`` escapes."""
    body = "".join(
        c if (c.isascii() and c.isalnum()) or c == " " else f"\\U{ord(c):08x}" for c in text
    )
    return "{{ '" + body + "' }}"


try:
    from jinja2.ext import Extension
except ImportError:  # the pre-generation hook needs only problem()
    Extension = object  # type: ignore[assignment,misc]


# The template folder's name, which cookiecutter renders to create the project folder.
PROJECT_FOLDER = "{{cookiecutter.project_slug}}"


_SOURCES: tuple[frozenset[str], tuple[str, ...]] | None = None


class CheckAnswers(Extension):  # type: ignore[misc,valid-type]
    """Jinja extension: the filters ``check_answers`` (``cookiecutter | check_answers``),
    ``docstring_text`` and ``toml_string``, the globals ``template_root`` and ``launch_dir``, the
    check of the answers when the project folder's name is rendered, and answers kept as data."""

    def __init__(self, environment: Any) -> None:
        global _SOURCES
        super().__init__(environment)
        environment.filters["check_answers"] = check
        environment.filters["docstring_text"] = docstring_text
        environment.filters["toml_string"] = toml_string
        environment.globals["template_root"] = TEMPLATE_ROOT
        environment.globals["launch_dir"] = LAUNCH_DIR
        if _SOURCES is None:
            _SOURCES = _template_sources()
        self._sources, self._paths = _SOURCES
        self._markers = (
            environment.variable_start_string,
            environment.block_start_string,
            environment.comment_start_string,
            *(p for p in (environment.line_statement_prefix, environment.line_comment_prefix) if p),
        )

    def preprocess(self, source: str, name: str | None, filename: str | None = None) -> str:
        """Prefixes the project folder's name with the check, which renders as nothing; renders
        a string that is not the template's own (an answer) as the text it holds."""
        if source == PROJECT_FOLDER:
            return "{{ cookiecutter | check_answers('') }}" + source
        if name is not None or source in self._sources:  # a template file, or the template's own
            return source
        if not any(marker in source for marker in self._markers):
            return source
        path = os.path.normpath(source)
        for rel in self._paths:  # a file or folder name of the template, under the output folder
            if path == rel:
                return source
            if path.endswith(os.sep + rel):
                return jinja_literal(path[: -len(rel)]) + rel
        return jinja_literal(source)
