"""Validates the template answers before anything is generated, and notes which variant files
an existing project already holds.

The checks live in ``hooks/answers.py``. They normally run earlier still: ``cookiecutter.json``
applies them (Jinja extension ``hooks.answers.CheckAnswers``) before cookiecutter creates any
folder. This hook repeats them; a bad answer prints one line naming the answer and why, and
exits non-zero; cookiecutter then removes the output directory it created.

Regenerating into an existing project (``-f``), the post-generation hook moves the chosen
variant's files onto their plain names (``train.py``, ...). With ``-s`` (skip files that exist)
it must leave such a file alone: this hook lists the ones that exist in ``KEPT_LIST``, a file the
template also holds (as ``[]``), so the list survives exactly when cookiecutter skips existing
files.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# The answers, as JSON rendered by cookiecutter (tojson escapes quotes and backslashes).
ANSWERS = json.loads(
    r"""{
    "project_name": {{ cookiecutter.project_name | tojson }},
    "project_slug": {{ cookiecutter.project_slug | tojson }},
    "package_name": {{ cookiecutter.package_name | tojson }},
    "description": {{ cookiecutter.description | tojson }},
    "author_name": {{ cookiecutter.author_name | tojson }},
    "model_api": {{ cookiecutter.model_api | tojson }},
    "parallelism": {{ cookiecutter.parallelism | tojson }},
    "_template_root": {{ template_root | default(cookiecutter._repo_dir) | tojson }}
}"""
)
sys.path.insert(0, ANSWERS.pop("_template_root"))

from hooks.answers import problem  # noqa: E402
from hooks.variants import KEPT_LIST, PLAIN_NAMES  # noqa: E402

if __name__ == "__main__":
    message = problem(ANSWERS)
    if message:
        print(f"ERROR: {message}", file=sys.stderr)
        sys.exit(1)
    package = Path(ANSWERS["package_name"])
    existing = [name for name in PLAIN_NAMES if (package / name).exists()]
    Path(KEPT_LIST).write_text(json.dumps(existing))
