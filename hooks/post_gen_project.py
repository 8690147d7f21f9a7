"""Finishes the generated project.

1. Keeps the chosen variant's files (``train_<model_api>.py``, ``models_<model_api>.py``,
   ``parallel_<parallelism>.py``) under their plain names and removes the others, so the project
   holds no file that its variant does not use.
2. Pins the ``flax-plugins`` dependency in ``pyproject.toml`` to where the template came from:
   a local template as ``flax-plugins @ file:///abs/path``, a git template as
   ``flax-plugins @ git+URL[@checkout]``. ``pip install -e .`` then just works.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

# The answers, as JSON rendered by cookiecutter (tojson escapes quotes and backslashes).
ANSWERS = json.loads(
    r"""{
    "package_name": {{ cookiecutter.package_name | tojson }},
    "model_api": {{ cookiecutter.model_api | tojson }},
    "parallelism": {{ cookiecutter.parallelism | tojson }},
    "_template": {{ cookiecutter._template | tojson }},
    "_repo_dir": {{ cookiecutter._repo_dir | tojson }},
    "_checkout": {{ cookiecutter._checkout | tojson }}
}"""
)
PACKAGE_NAME = ANSWERS["package_name"]
MODEL_API = ANSWERS["model_api"]
PARALLELISM = ANSWERS["parallelism"]
TEMPLATE = ANSWERS["_template"]
REPO_DIR = ANSWERS["_repo_dir"]
CHECKOUT = ANSWERS["_checkout"] or ""

VARIANTS = {"train": ("nnx", "linen"), "models": ("nnx", "linen"), "parallel": ("jit", "pmap")}
CHOSEN = {"train": MODEL_API, "models": MODEL_API, "parallel": PARALLELISM}
ABBREVIATIONS = {
    "gh": "https://github.com/{0}.git",
    "gl": "https://gitlab.com/{0}.git",
    "bb": "https://bitbucket.org/{0}",
}
DIST = "flax-plugins"


def select_variants(package_dir: Path) -> None:
    """Renames the chosen variant files to their plain names and deletes the rest."""
    for stem, choices in VARIANTS.items():
        for choice in choices:
            path = package_dir / f"{stem}_{choice}.py"
            if choice == CHOSEN[stem]:
                path.replace(package_dir / f"{stem}.py")
            else:
                path.unlink()


def _is_plugins_repo(path: Path) -> bool:
    pyproject = path / "pyproject.toml"
    return pyproject.is_file() and f'name = "{DIST}"' in pyproject.read_text()


def local_repo_dir() -> Path | None:
    """Absolute path of a local template checkout, or None if it cannot be found."""
    candidates = [Path(REPO_DIR)]
    if not candidates[0].is_absolute():
        # Relative to the directory cookiecutter was started from.
        if os.environ.get("PWD"):
            candidates.append(Path(os.environ["PWD"]) / REPO_DIR)
        parent_cwd = Path(f"/proc/{os.getppid()}/cwd")
        try:  # cookiecutter runs hooks from inside the template directory
            candidates.append(parent_cwd.resolve(strict=True))
        except OSError:
            pass
    for candidate in candidates:
        if candidate.is_absolute() and _is_plugins_repo(candidate):
            return candidate.resolve()
    return None


def git_url(template: str) -> str | None:
    """pip's ``git+`` URL for a git template reference, or None for a local one."""
    prefix, _, rest = template.partition(":")
    if prefix in ABBREVIATIONS and rest:
        template = ABBREVIATIONS[prefix].format(rest)
    if template.startswith(("git+", "hg+")):
        return template
    scp = re.match(r"^([\w.-]+@[\w.-]+):(?!//)(.+)$", template)  # git@github.com:owner/repo.git
    if scp:
        return f"git+ssh://{scp.group(1)}/{scp.group(2)}"
    if re.match(r"^(git|ssh|https?|file)://", template):  # cookiecutter clones these with git
        return f"git+{template}"
    return None


def requirement() -> str:
    """The pinned ``flax-plugins`` requirement for the generated pyproject.toml."""
    url = git_url(TEMPLATE)
    if url is not None:
        return f"{DIST} @ {url}@{CHECKOUT}" if CHECKOUT else f"{DIST} @ {url}"
    repo = local_repo_dir()
    if repo is not None:
        return f"{DIST} @ {repo.as_uri()}"
    print(
        f"warning: could not tell where the template came from ({TEMPLATE!r}); "
        f"pyproject.toml depends on plain '{DIST}'.",
        file=sys.stderr,
    )
    return DIST


def pin_plugins(pyproject: Path) -> None:
    """Replaces the plain ``"flax-plugins"`` dependency line with the pinned requirement."""
    text = pyproject.read_text()
    pinned = text.replace(f'"{DIST}",', f'"{requirement()}",', 1)
    pyproject.write_text(pinned)


if __name__ == "__main__":
    project = Path.cwd()
    select_variants(project / PACKAGE_NAME)
    pin_plugins(project / "pyproject.toml")
