"""Validates the template answers before anything is generated.

The checks live in ``hooks/answers.py``. They normally run earlier still: ``cookiecutter.json``
applies them (Jinja extension ``hooks.answers.CheckAnswers``) before cookiecutter creates any
folder. This hook repeats them; a bad answer prints one line naming the answer and why, and
exits non-zero; cookiecutter then removes the output directory it created.
"""

from __future__ import annotations

import json
import sys

# The answers, as JSON rendered by cookiecutter (tojson escapes quotes and backslashes).
ANSWERS = json.loads(
    r"""{
    "project_name": {{ cookiecutter.project_name | tojson }},
    "project_slug": {{ cookiecutter.project_slug | tojson }},
    "package_name": {{ cookiecutter.package_name | tojson }},
    "model_api": {{ cookiecutter.model_api | tojson }},
    "parallelism": {{ cookiecutter.parallelism | tojson }},
    "_repo_dir": {{ cookiecutter._repo_dir | tojson }}
}"""
)
sys.path.insert(0, ANSWERS.pop("_repo_dir"))

from hooks.answers import problem  # noqa: E402

if __name__ == "__main__":
    message = problem(ANSWERS)
    if message:
        print(f"ERROR: {message}", file=sys.stderr)
        sys.exit(1)
