"""Finishes the generated project.

1. Keeps the chosen variant's files (``train_<model_api>.py``, ``models_<model_api>.py``,
   ``parallel_<parallelism>.py``) under their plain names and removes the others, so the project
   holds no file that its variant does not use. Regenerating with ``-f -s`` keeps a plain-named
   file the project already had (see ``hooks/pre_gen_project.py``).
2. Pins the ``flax-plugins`` dependency in ``pyproject.toml`` to where the template came from:
   a local template folder as ``flax-plugins @ git+URL@<commit>`` when it is a clean git
   checkout of a commit a network remote holds (installable anywhere), else as
   ``flax-plugins @ file:///abs/path`` (a development option), a zip of it as
   ``flax-plugins @ file:///abs/path.zip`` (or its URL), a git template as
   ``flax-plugins @ git+URL@<commit>``. ``pip install -e .`` then just works.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

# The answers, as JSON rendered by cookiecutter (tojson escapes quotes and backslashes).
ANSWERS = json.loads(
    r"""{
    "package_name": {{ cookiecutter.package_name | tojson }},
    "model_api": {{ cookiecutter.model_api | tojson }},
    "parallelism": {{ cookiecutter.parallelism | tojson }},
    "_template": {{ cookiecutter._template | tojson }},
    "_checkout": {{ cookiecutter._checkout | tojson }},
    "_template_root": {{ template_root | default(cookiecutter._repo_dir) | tojson }},
    "_launch_dir": {{ launch_dir | default('.') | tojson }}
}"""
)
TEMPLATE = ANSWERS["_template"]
CHECKOUT = ANSWERS["_checkout"] or ""
TEMPLATE_ROOT = Path(ANSWERS["_template_root"])
LAUNCH_DIR = Path(ANSWERS["_launch_dir"])
sys.path.insert(0, str(TEMPLATE_ROOT))

from hooks.variants import CHOSEN_BY, KEPT_LIST, VARIANTS  # noqa: E402

ABBREVIATIONS = {
    "gh": "https://github.com/{0}.git",
    "gl": "https://gitlab.com/{0}.git",
    "bb": "https://bitbucket.org/{0}",
}
DIST = "flax-plugins"


def select_variants(package_dir: Path, kept: list[str]) -> None:
    """Renames the chosen variant files to their plain names and deletes the rest; a plain
    name listed in ``kept`` keeps the file it already had."""
    for stem, choices in VARIANTS.items():
        for choice in choices:
            path = package_dir / f"{stem}_{choice}.py"
            if choice == ANSWERS[CHOSEN_BY[stem]] and f"{stem}.py" not in kept:
                path.replace(package_dir / f"{stem}.py")
            else:
                path.unlink()


def _is_plugins_repo(path: Path) -> bool:
    pyproject = path / "pyproject.toml"
    return pyproject.is_file() and f'name = "{DIST}"' in pyproject.read_text()


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


def cloned_commit(clone: Path) -> str | None:
    """The commit checked out in cookiecutter's clone of a git template, or None."""
    try:
        result = subprocess.run(
            ["git", "-C", str(clone), "rev-parse", "HEAD"], capture_output=True, text=True
        )
    except OSError:
        return None
    commit = result.stdout.strip()
    return commit if result.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", commit) else None


def _git(root: Path, *args: str) -> str | None:
    try:
        result = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True)
    except OSError:
        return None
    return result.stdout.strip() if result.returncode == 0 else None


NETWORK_URL = re.compile(r"^(https?|ssh|git)://|^[\w.-]+@[\w.-]+:(?!//)")


def published_url(root: Path) -> str | None:
    """``git+URL@commit`` for a local template folder that is a clean git checkout whose commit
    a remote with a network URL holds (one of its remote-tracking branches contains it): a pin
    that installs anywhere. None otherwise (then the folder's path: a development option)."""
    commit = cloned_commit(root)
    if commit is None or _git(root, "status", "--porcelain", "--untracked-files=no") != "":
        return None  # not git, or local changes the commit does not hold
    branches = _git(root, "branch", "-r", "--contains", commit, "--format=%(refname:short)")
    for branch in (branches or "").split():
        url = _git(root, "remote", "get-url", branch.split("/")[0])
        if url and NETWORK_URL.match(url):
            return f"{git_url(url)}@{commit}"
    return None


def requirement() -> str:
    """The pinned ``flax-plugins`` requirement for the generated pyproject.toml."""
    if TEMPLATE.lower().endswith(".zip"):  # cookiecutter unpacks it to a folder it deletes
        if re.match(r"^https?://", TEMPLATE):
            return f"{DIST} @ {TEMPLATE}"
        return f"{DIST} @ {(LAUNCH_DIR / Path(TEMPLATE).expanduser()).resolve().as_uri()}"
    url = git_url(TEMPLATE)
    if url is not None:
        ref = cloned_commit(TEMPLATE_ROOT) or CHECKOUT
        return f"{DIST} @ {url}@{ref}" if ref else f"{DIST} @ {url}"
    if TEMPLATE_ROOT.is_absolute() and _is_plugins_repo(TEMPLATE_ROOT):
        published = published_url(TEMPLATE_ROOT)
        return f"{DIST} @ {published or TEMPLATE_ROOT.as_uri()}"
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
    kept_list = project / KEPT_LIST
    select_variants(project / ANSWERS["package_name"], json.loads(kept_list.read_text()))
    kept_list.unlink()
    pin_plugins(project / "pyproject.toml")
    print(
        f"\nCreated {project}. Next steps:\n"
        f"  cd {project.name}\n"
        "  python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[test]'\n"
        "  python main.py --config=configs/default.py --workdir=runs/first\n"
        "  pytest -q          # its tests, on 8 simulated CPU devices\n"
        "  tensorboard --logdir runs\n"
    )
