"""Tests of the cookiecutter template: generation, answer checks, variants, and parity.

Parity: for one config and seed, the NNX and Linen variants give the same loss curve when they
start from the same parameters (their layer names match, so ``init_params`` of one feeds the
other), and the jit and pmap variants give the same curve on 8 simulated devices.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from slugify import slugify  # python-slugify: cookiecutter's, which derives project_slug

cookiecutter_main = pytest.importorskip("cookiecutter.main")
from cookiecutter.exceptions import FailedHookException  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
VARIANT_FILES = {"train.py", "models.py", "parallel.py"}
SHIPPED = {
    "README.md",
    ".gitignore",
    "pyproject.toml",
    "main.py",
    "configs/__init__.py",
    "configs/default.py",
    "configs/quick.py",
    "configs/mnist.py",
    "configs/cifar10.py",
    "configs/vit_cifar10.py",
    "tests/conftest.py",
    "tests/test_config_errors.py",
    "tests/test_train.py",
}
PACKAGE_FILES = {"__init__.py", "input_pipeline.py", "predict.py", *VARIANT_FILES}


def generate(output_dir: Path, **answers: str) -> Path:
    """Generates a project from this repository with ``answers``; returns its directory."""
    return Path(
        cookiecutter_main.cookiecutter(
            str(REPO), no_input=True, extra_context=answers, output_dir=str(output_dir)
        )
    )


def files_of(project: Path) -> set[str]:
    """Relative paths of the project's files, without caches."""
    return {
        p.relative_to(project).as_posix()
        for p in project.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and ".ruff_cache" not in p.parts
    }


# ----------------------------------------------------------------------------- generation


@pytest.mark.parametrize("model_api", ["nnx", "linen"])
@pytest.mark.parametrize("parallelism", ["jit", "pmap"])
def test_variant_files_names_and_lint(tmp_path, model_api, parallelism):
    project = generate(
        tmp_path,
        project_name="My Flax Project",
        model_api=model_api,
        parallelism=parallelism,
    )
    assert project.name == "my-flax-project"
    package = "my_flax_project"
    expected = SHIPPED | {f"{package}/{name}" for name in PACKAGE_FILES}
    assert files_of(project) == expected

    train = (project / package / "train.py").read_text()
    models = (project / package / "models.py").read_text()
    parallel = (project / package / "parallel.py").read_text()
    # train.py reads like a Flax example: the optimizer, the state and top-level steps in sight.
    for line in ("tx = optim.create(config.optimizer", "\ndef train_step(", "\ndef eval_step(",
                 "\ndef train_and_evaluate(", "loop.fit("):  # fmt: skip
        assert line in train, line
    if model_api == "nnx":
        assert "nnx.Optimizer(model, tx, wrt=nnx.Param)" in train
        assert "from flax import nnx" in models
    else:
        assert "class TrainState(train_state.TrainState)" in train
        assert "from flax import linen as nn" in models
    assert ("jax.shard_map(" in parallel) == (parallelism == "pmap")
    assert ("sharding.mesh_from_axes(" in parallel) == (parallelism == "jit")

    for path in project.rglob("*.py"):
        text = path.read_text()
        assert "cookiecutter" not in text and "{{" not in text and "{%" not in text, path
    assert f"from {package} import train" in (project / "main.py").read_text()

    # Lint-clean whatever the package's name: here one that sorts after ``configs`` and ``main``,
    # one that sorts before them (import order), and one as long as a name may be.
    early = generate(
        tmp_path / "early", project_name="Alpha", model_api=model_api, parallelism=parallelism
    )
    longest = generate(
        tmp_path / "long", project_name="a" * 64, model_api=model_api, parallelism=parallelism
    )
    for path in (project, early, longest):
        lint = [str(BIN / "ruff"), "check", "--no-cache", "."]
        subprocess.run(lint, cwd=path, check=True)
        fmt = [str(BIN / "ruff"), "format", "--no-cache", "--check", "."]
        subprocess.run(fmt, cwd=path, check=True)


def _template_copy(where: Path) -> Path:
    """This repository's tracked files (the template and plugins) copied to ``where``."""
    files = (
        subprocess.run(["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True, check=True)
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, files):
        if (REPO / name).is_file():
            (where / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, where / name)
    return where


def _git(root: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(root), *args], capture_output=True, text=True, check=True
    ).stdout.strip()


def test_local_template_pins_plugins_as_file_url_or_its_published_commit(tmp_path):
    if subprocess.run(["git", "-C", str(REPO), "rev-parse"], capture_output=True).returncode:
        pytest.skip("not a git checkout")
    template = _template_copy(tmp_path / "template")

    def pin(name: str) -> str:
        # In a process of its own: this one has imported this repository's hooks already.
        subprocess.run(
            [str(BIN / "cookiecutter"), str(template), "--no-input", "-o", str(tmp_path / name),
             "--config-file", str(_isolated_config(tmp_path)), "project_name=pinned"],
            cwd=tmp_path, check=True, capture_output=True,
        )  # fmt: skip
        project = tmp_path / name / "pinned"
        text = (project / "pyproject.toml").read_text()
        assert text.count('"flax-plugins') == 1
        return next(line for line in text.splitlines() if '"flax-plugins' in line).strip()

    # A folder that is not a git checkout: its path (a development option).
    assert pin("plain") == f'"flax-plugins @ {template.as_uri()}",'
    # A clean checkout whose commit a network remote holds: that remote's URL and commit.
    _git(template, "init", "-q")
    _git(template, "add", "-A")
    _git(template, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "template")
    _git(template, "remote", "add", "origin", "https://example.com/owner/flax-plugins.git")
    _git(template, "update-ref", "refs/remotes/origin/main", "HEAD")
    commit = _git(template, "rev-parse", "HEAD")
    url = f"git+https://example.com/owner/flax-plugins.git@{commit}"
    assert pin("published") == f'"flax-plugins @ {url}",'
    # Local changes the commit does not hold, or a commit no network remote has: the path.
    (template / "README.md").write_text("changed\n")
    assert pin("changed") == f'"flax-plugins @ {template.as_uri()}",'
    _git(template, "checkout", "-q", "README.md")
    _git(template, "remote", "set-url", "origin", str(tmp_path / "elsewhere"))
    assert pin("local-remote") == f'"flax-plugins @ {template.as_uri()}",'


def test_answers_with_quotes_stay_valid_toml_and_python(tmp_path):
    import tomllib

    project = generate(
        tmp_path,
        project_name='Say """ \\s',
        description='Say "hi" \\ there """',
        author_name="O'Neil",
    )
    meta = tomllib.loads((project / "pyproject.toml").read_text())["project"]
    assert meta["description"] == 'Say "hi" \\ there """'
    assert meta["authors"] == [{"name": "O'Neil"}]
    init = project / "say_s" / "__init__.py"
    # Compiles without warnings (no invalid escape sequence), and says what was typed.
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c",
         "import ast, sys; print(ast.get_docstring(ast.parse(open(sys.argv[1]).read())))",
         str(init)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert result.stdout.startswith('Say """ \\s.\n\nSay "hi" \\ there """')


@pytest.mark.parametrize(
    "name, folder",
    [("Ünïcødé Prøject", "unicode-project"), ("My Project_", "my-project"), ("_x  y", "x-y")],
)
def test_folder_name_is_derived_as_a_valid_project_name(tmp_path, name, folder):
    project = generate(tmp_path, project_name=name)
    assert project.name == folder
    assert (project / folder.replace("-", "_") / "train.py").is_file()


def test_relative_template_path(tmp_path):
    # Hooks run inside the new project, where a relative template path no longer resolves.
    for cwd, template in ((REPO.parent, REPO.name), (REPO, ".")):
        out = tmp_path / template.strip(".") / "out"
        subprocess.run(
            [str(BIN / "cookiecutter"), template, "--no-input", "-o", str(out)],
            cwd=cwd, check=True, capture_output=True,
        )  # fmt: skip
        pyproject = (out / "flax-project" / "pyproject.toml").read_text()
        assert f'"flax-plugins @ {REPO.as_uri()}",' in pyproject


def test_zip_template_pins_plugins_to_the_zip(tmp_path):
    # cookiecutter unpacks a zip into a folder it deletes afterwards: the pin names the zip.
    import shutil

    tree = tmp_path / "src" / "flax-template"
    tree.mkdir(parents=True)
    for name in (
        "cookiecutter.json",
        "pyproject.toml",
        "hooks",
        "plugins",
        "{{cookiecutter.project_slug}}",
    ):
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, tree / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(REPO / name, tree / name)
    archive = Path(shutil.make_archive(str(tmp_path / "template"), "zip", tree.parent))
    project = Path(
        cookiecutter_main.cookiecutter(
            str(archive), no_input=True, output_dir=str(tmp_path / "out"),
            config_file=_isolated_config(tmp_path),
        )
    )  # fmt: skip
    assert f'"flax-plugins @ {archive.as_uri()}",' in (project / "pyproject.toml").read_text()


def _isolated_config(tmp_path: Path) -> str:
    """A cookiecutter config that keeps clones, unpacked zips and replays under ``tmp_path``."""
    config = tmp_path / "cookiecutter.yaml"
    config.write_text(f"cookiecutters_dir: {tmp_path / 'clones'}\nreplay_dir: {tmp_path}\n")
    return str(config)


def test_regenerating_with_skip_keeps_edited_files(tmp_path):
    project = generate(tmp_path, project_name="edited")
    train = project / "edited" / "train.py"
    for path in (train, project / "main.py"):
        path.write_text(path.read_text() + "# edited\n")
    cli = [str(BIN / "cookiecutter"), str(REPO), "--no-input", "-o", str(tmp_path)]
    # -f -s: existing files stay as they are, the variant file among them.
    subprocess.run([*cli, "-f", "-s", "project_name=edited"], check=True, capture_output=True)
    assert train.read_text().endswith("# edited\n")
    assert (project / "main.py").read_text().endswith("# edited\n")
    assert files_of(project) == SHIPPED | {f"edited/{name}" for name in PACKAGE_FILES}
    # -f alone: every file is written again, here with the other model API.
    subprocess.run(
        [*cli, "-f", "project_name=edited", "model_api=linen"], check=True, capture_output=True
    )
    assert "class TrainState(train_state.TrainState)" in train.read_text()
    assert not (project / "main.py").read_text().endswith("# edited\n")
    assert files_of(project) == SHIPPED | {f"edited/{name}" for name in PACKAGE_FILES}


def test_git_template_pins_plugins_to_the_cloned_commit(tmp_path):
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True)
    if head.returncode:
        pytest.skip("not a git checkout")
    url = "git+" + REPO.as_uri()  # cloned with git, as a remote would be
    project = Path(
        cookiecutter_main.cookiecutter(
            url,
            checkout="HEAD",
            no_input=True,
            extra_context={"project_name": "from git"},
            output_dir=str(tmp_path / "out"),
            config_file=_isolated_config(tmp_path),
        )
    )
    commit = head.stdout.decode().strip()
    assert f'"flax-plugins @ {url}@{commit}",' in (project / "pyproject.toml").read_text()


def test_cli_no_input_with_choices(tmp_path):
    subprocess.run(
        [str(BIN / "cookiecutter"), str(REPO), "--no-input", "-o", str(tmp_path),
         "model_api=linen", "parallelism=pmap"],
        check=True, capture_output=True,
    )  # fmt: skip
    project = tmp_path / "flax-project"
    assert "train_state.TrainState" in (project / "flax_project" / "train.py").read_text()
    assert "jax.shard_map(" in (project / "flax_project" / "parallel.py").read_text()


def test_prompts_cover_every_variable():
    spec = json.loads((REPO / "cookiecutter.json").read_text())
    variables = {k for k in spec if not k.startswith("_")}
    assert variables == {
        "project_name",
        "project_slug",
        "package_name",
        "description",
        "author_name",
        "model_api",
        "parallelism",
    }
    assert set(spec["__prompts__"]) == variables
    assert spec["model_api"] == ["nnx", "linen"] and spec["parallelism"] == ["jit", "pmap"]


# ----------------------------------------------------------------------------- bad answers

BAD_ANSWERS = [
    ({"project_name": ""}, "project_name is empty"),
    ({"project_name": "   "}, "project_name is empty"),
    ({"project_name": "x", "project_slug": "../x"}, "no path separators"),
    ({"project_name": "x", "project_slug": "a/b"}, "no path separators"),
    ({"project_name": "x", "project_slug": "a\\b"}, "no path separators"),
    ({"project_name": "x", "project_slug": "ok", "package_name": "   "}, "package_name is empty"),
    ({"project_name": "3d models"}, "starts with a digit"),
    ({"project_name": "class"}, "is a Python keyword"),
    ({"project_name": "x", "package_name": "my-pkg"}, "not a valid Python identifier"),
    ({"project_name": "jax"}, "would shadow the module 'jax'"),
    ({"project_name": "Flax"}, "would shadow the module 'flax'"),
    ({"project_name": "optax"}, "would shadow"),
    ({"project_name": "tensorflow"}, "would shadow"),
    ({"project_name": "plugins"}, "would shadow"),
    ({"project_name": "test"}, "would shadow"),
    ({"project_name": "json"}, "would shadow"),
    ({"project_name": "x", "project_slug": ""}, "project_slug is empty"),
    ({"project_name": "x", "project_slug": "  "}, "project_slug is empty"),
    ({"project_name": "x", "project_slug": ".."}, "no path separators"),
    ({"project_name": "x", "project_slug": "/tmp/abs"}, "no path separators"),
    ({"project_name": "x", "project_slug": " x"}, "no surrounding spaces"),
    ({"project_name": "x", "project_slug": "-x"}, "must start and end with a letter or digit"),
    ({"project_name": "x", "project_slug": "x-"}, "must start and end with a letter or digit"),
    ({"project_name": "x", "project_slug": "x."}, "must start and end with a letter or digit"),
    ({"project_name": "!!!"}, "project_name '!!!' has no letters or digits"),
    ({"project_name": "a" * 65}, "project_slug is 65 characters long; keep it to 64"),
    ({"project_name": "keras"}, "would shadow the module 'keras'"),
    ({"project_name": "tree"}, "would shadow the module 'tree'"),
    ({"project_name": "x", "package_name": ""}, "package_name is empty"),
    ({"project_name": "x", "package_name": "../x"}, "not a valid Python identifier"),
    ({"project_name": "x", "package_name": "9lives"}, "starts with a digit"),
    ({"project_name": "x", "package_name": "match"}, "is a Python keyword"),  # soft keyword
    ({"project_name": "x", "package_name": "jax"}, "would shadow the module 'jax'"),
    ({"project_name": "x", "package_name": "plugins"}, "would shadow the module 'plugins'"),
    # pytest's own modules and dependencies: the project's tests could not start.
    ({"project_name": "pluggy"}, "would shadow the module 'pluggy'"),
    ({"project_name": "iniconfig"}, "would shadow the module 'iniconfig'"),
    ({"project_name": "py"}, "would shadow the module 'py'"),
    ({"project_name": "x", "package_name": "_pytest"}, "would shadow the module '_pytest'"),
    # Text that cannot be written into the project's files.
    ({"project_name": "x", "description": "a\x00b"}, "description holds the control character"),
    ({"project_name": "x", "author_name": "a\nb"}, "author_name holds the control character"),
    ({"project_name": "x\ty"}, "project_name holds the control character '\\t' (U+0009)"),
    ({"project_name": "x", "author_name": "\udc80"}, "author_name holds '\\udc80', a lone surr"),
]


@pytest.mark.parametrize("answers, message", BAD_ANSWERS, ids=[str(a)[:60] for a, _ in BAD_ANSWERS])
def test_bad_answer_stops_generation_and_leaves_nothing(tmp_path, capfd, answers, message):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(FailedHookException, match="^ERROR: ") as raised:
        generate(out, **answers)
    assert message in str(raised.value) and "\n" not in str(raised.value)
    captured = capfd.readouterr()
    assert "Traceback" not in captured.err + captured.out
    # Checked before cookiecutter creates any folder: not even an empty parent of 'a/b' is left.
    assert list(out.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("answers, message", BAD_ANSWERS, ids=[str(a)[:60] for a, _ in BAD_ANSWERS])
def test_pre_generation_hook_rejects_the_same_answers(answers, message):
    # The hook repeats the checks (hooks/answers.py), e.g. for a replayed context.
    from hooks import answers as checks

    full = {"project_name": "x", "model_api": "nnx", "parallelism": "jit", **answers}
    full.setdefault("project_slug", slugify(full["project_name"]))
    full.setdefault("package_name", full["project_slug"].replace("-", "_").replace(".", "_"))
    assert message in checks.problem(full)
    assert checks.problem({**full, **GOOD}) is None


GOOD = {
    "project_name": "Good",
    "project_slug": "good",
    "package_name": "good_pkg",
    "description": "Good.",
    "author_name": "Good",
}


def test_replayed_bad_answer_is_one_line_and_leaves_nothing(tmp_path):
    # A replayed context skips the prompts, where the answers are first checked.
    replay = tmp_path / "replay.json"
    context = {
        "project_name": "x", "project_slug": "a/b", "package_name": "x_pkg",
        "description": "d", "author_name": "n", "model_api": "nnx", "parallelism": "jit",
        "_extensions": ["hooks.answers.CheckAnswers"], "__answers_checked": "yes",
        "_template": str(REPO), "_repo_dir": str(REPO), "_checkout": None,
    }  # fmt: skip
    replay.write_text(json.dumps({"cookiecutter": context}))
    out = tmp_path / "out"
    result = subprocess.run(
        [str(BIN / "cookiecutter"), str(REPO), "--replay-file", str(replay), "-o", str(out)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 1
    lines = (result.stdout + result.stderr).splitlines()
    assert len(lines) == 1 and lines[0].startswith("ERROR: project_slug 'a/b' must be"), lines
    assert not out.exists() or list(out.iterdir()) == []


def _replay_context(**answers: object) -> dict:
    """A context as cookiecutter writes it to a replay file, with ``answers``."""
    return {
        "project_name": "x", "project_slug": "x", "package_name": "x_pkg",
        "description": "d", "author_name": "n", "model_api": "nnx", "parallelism": "jit",
        "_extensions": ["hooks.answers.CheckAnswers"], "__answers_checked": "yes",
        "_template": str(REPO), "_repo_dir": str(REPO), "_checkout": None, **answers,
    }  # fmt: skip


def _generate_by(how: str, out: Path, answers: dict) -> tuple[int, list[str]]:
    """Generates into ``out`` with ``answers`` passed in (``extra_context``), on the command
    line (``key=value``), typed at the prompts or replayed (a replay file); returns the exit
    code and output lines."""
    typed = None
    if how == "extra_context":
        code = (
            "import sys; from cookiecutter.main import cookiecutter; "
            "from cookiecutter.exceptions import FailedHookException\n"
            f"try: cookiecutter({str(REPO)!r}, no_input=True, extra_context={answers!r}, "
            f"output_dir={str(out)!r})\n"
            "except FailedHookException as e: sys.exit(str(e))"
        )
        command = [sys.executable, "-c", code]
    elif how == "command_line":
        pairs = [f"{key}={value}" for key, value in answers.items()]
        command = [str(BIN / "cookiecutter"), str(REPO), "--no-input", "-o", str(out), *pairs]
    elif how == "prompt":  # Enter takes the default; then the first of each choice
        order = ("project_name", "project_slug", "package_name", "description", "author_name")
        typed = "".join(f"{answers.get(key, '')}\n" for key in order) + "1\n1\n"
        command = [str(BIN / "cookiecutter"), str(REPO), "-o", str(out)]
    else:
        replay = out.parent / "replay.json"
        replay.write_text(json.dumps({"cookiecutter": _replay_context(**answers)}))
        command = [str(BIN / "cookiecutter"), str(REPO), "--replay-file", str(replay)]
        command += ["-o", str(out)]
    result = subprocess.run(command, input=typed, capture_output=True, text=True, cwd=out.parent)
    if how == "prompt":  # what follows the last prompt
        return result.returncode, (
            result.stdout.rsplit("(1): ", 1)[-1] + result.stderr
        ).splitlines()
    return result.returncode, (result.stdout + result.stderr).splitlines()


def _docstring(path: Path) -> str:
    import ast

    return ast.get_docstring(ast.parse(path.read_text()))


JINJA_ANSWERS = [
    "{{ cycler.__init__.__globals__.os.system('touch MARKER') }}",
    "{% set x = cycler.__init__.__globals__.os.system('touch MARKER') %}{# c #}{% raw %}",
]


@pytest.mark.parametrize("payload", JINJA_ANSWERS, ids=["expression", "statement"])
@pytest.mark.parametrize("how", ["extra_context", "command_line", "prompt", "replay"])
@pytest.mark.parametrize("field", ["project_name", "description", "author_name"])
def test_jinja_in_an_answer_is_kept_as_text(tmp_path, field, how, payload):
    # Cookiecutter renders every string of the context, answers passed in among them; the
    # template's extension renders an answer as the text it holds, as a typed answer is.
    marker = tmp_path / "MARKER"
    text = payload.replace("MARKER", str(marker))
    # Named explicitly: the folder name derived from the text would be too long (below).
    answers = {field: text, "project_slug": "jinja-answer", "package_name": "jinja_answer"}
    out = tmp_path / "out"
    out.mkdir()
    code, lines = _generate_by(how, out, answers)
    assert not marker.exists()
    assert code == 0, lines
    (project,) = out.iterdir()
    import tomllib

    meta = tomllib.loads((project / "pyproject.toml").read_text())["project"]
    readme = (project / "README.md").read_text().splitlines()
    docstring = _docstring(project / "jinja_answer" / "__init__.py")
    if field == "project_name":
        assert readme[0] == f"# {text}" and docstring.startswith(f"{text}.\n")
    elif field == "description":
        assert meta["description"] == text and readme[2] == text and f"\n{text}\n" in docstring
    else:
        assert meta["authors"] == [{"name": text}]


@pytest.mark.parametrize("how", ["extra_context", "command_line", "prompt"])
def test_jinja_in_a_project_name_that_names_the_folder(tmp_path, how):
    # The folder and package names are derived from the literal text.
    out = tmp_path / "out"
    out.mkdir()
    code, lines = _generate_by(how, out, {"project_name": "{{ name }} {% if 1 %}x{% endif %}"})
    assert code == 0, lines
    project = out / "name-if-1-x-endif"
    readme = (project / "README.md").read_text().splitlines()
    assert readme[0] == "# {{ name }} {% if 1 %}x{% endif %}"
    assert (project / "name_if_1_x_endif" / "train.py").is_file()
    # Here too long a name: refused with one line.
    marker = tmp_path / "MARKER"
    out = tmp_path / "out2"
    out.mkdir()
    answer = JINJA_ANSWERS[0].replace("MARKER", str(marker)) + " and a long name to go with it"
    code, lines = _generate_by(how, out, {"project_name": answer})
    assert not marker.exists()
    assert code == 1 and len(lines) == 1, lines
    assert lines[0].startswith("ERROR: project_slug is ") and "characters long" in lines[0]
    assert list(out.iterdir()) == []


@pytest.mark.parametrize(
    "answers, message",
    [
        ({"description": "a\x00b"}, "description holds the control character '\\x00' (U+0000)"),
        ({"project_name": "x\x00"}, "project_name holds the control character '\\x00'"),
        ({"author_name": "\udc80"}, "author_name holds '\\udc80', a lone surrogate"),
        ({"description": "\ud83d"}, "description holds '\\ud83d', a lone surrogate"),
        ({"description": None}, "description must be text, not NoneType (None)."),
        ({"author_name": ["a"]}, "author_name must be text, not list (['a'])."),
        ({"project_name": 3}, "project_name must be text, not int (3)."),
    ],
)
def test_replayed_text_that_cannot_be_written_is_refused(tmp_path, answers, message):
    out = tmp_path / "out"
    out.mkdir()
    code, lines = _generate_by("replay", out, answers)
    assert code == 1 and len(lines) == 1 and lines[0].startswith("ERROR: " + message), lines
    assert list(out.iterdir()) == []


@pytest.mark.parametrize(
    "missing, error",
    [
        (("__answers_checked",), None),
        (("_extensions", "__answers_checked", "_template", "_repo_dir", "_checkout"),
         'ERROR: the replayed context lacks "_extensions": ["hooks.answers.CheckAnswers"]'),
    ],
)  # fmt: skip
def test_replay_file_without_private_variables(tmp_path, missing, error):
    # A hand-written replay file: cookiecutter renders the variables it lacks, with or without
    # the template's extension. The answers are checked all the same, or one line says why not.
    context = _replay_context(description="{{ 6 * 7 }}")
    replay = tmp_path / "replay.json"
    replay.write_text(json.dumps({"cookiecutter": {k: v for k, v in context.items()
                                                   if k not in missing}}))  # fmt: skip
    out = tmp_path / "out"
    result = subprocess.run(
        [str(BIN / "cookiecutter"), str(REPO), "--replay-file", str(replay), "-o", str(out)],
        capture_output=True, text=True,
    )  # fmt: skip
    lines = (result.stdout + result.stderr).splitlines()
    if error is None:
        assert result.returncode == 0, lines
        assert (out / "x" / "README.md").read_text().splitlines()[2] == "{{ 6 * 7 }}"
    else:
        assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith(error), lines
        assert not out.exists() or list(out.iterdir()) == []


def test_non_ascii_answers_are_written_as_they_are(tmp_path):
    # tojson wrote an emoji as "\\ud83d\\ude80", which TOML refuses (pip install failed).
    import tomllib

    description = 'Rockets 🚀 "fly" \\ far -- Ünïcødé, 中文, 🤖'
    author = "Zoë 🚀 Ångström"
    project = generate(
        tmp_path, project_name="Emoji 🚀 net", description=description, author_name=author
    )
    text = (project / "pyproject.toml").read_text(encoding="utf-8")
    assert "\\ud83d" not in text and "🚀" in text
    meta = tomllib.loads(text)["project"]
    assert meta["description"] == description and meta["authors"] == [{"name": author}]
    assert _docstring(project / "emoji_net" / "__init__.py").startswith(
        f"Emoji 🚀 net.\n\n{description}\n"
    )
    # setuptools takes it (the metadata pip builds before installing).
    (tmp_path / "meta").mkdir()
    result = subprocess.run(
        [sys.executable, "-c",
         "import sys; from setuptools import build_meta as b; "
         "print(b.prepare_metadata_for_build_wheel(sys.argv[1]))", str(tmp_path / "meta")],
        cwd=project, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    metadata = (tmp_path / "meta" / result.stdout.split()[-1] / "METADATA").read_text("utf-8")
    assert f"Summary: {description}\n" in metadata and f"Author: {author}\n" in metadata


def test_shadow_list_covers_what_a_training_run_imports(tmp_path):
    # A package named like any module a training run or the project's pytest imports would
    # shadow it: the answer checks refuse those names, and these runs find any the list missed.
    from hooks import answers as checks

    project = generate(tmp_path, project_name="shadow check", parallelism="pmap")
    dump = "import atexit, sys; atexit.register(lambda: print('MODULES', *sorted(sys.modules)))"
    train = (
        "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path('main.py', run_name='__main__')"
    )
    collect = "import pytest, sys; sys.exit(pytest.main(['--collect-only', '-q', '-p', 'no:cacheprovider']))"  # noqa: E501
    stdlib = {name.lower() for name in (*sys.stdlib_module_names, *sys.builtin_module_names)}
    own = {"shadow_check", "configs", "config_config", "cython_runtime"}
    own |= {path.stem for path in (project / "tests").glob("*.py")}
    env = {**os.environ, "PYTHONPATH": str(project)}
    for code, args, expected, extra_env in (
        (train, ["main.py", "--config=configs/quick.py", f"--workdir={tmp_path / 'work'}"],
         {"jax", "flax", "optax", "tensorflow"}, {}),  # the run did train
        # The tests were collected; without this venv's pytest plugins, which the project's
        # '.[test]' extra does not install.
        (collect, [], {"pytest", "pluggy", "iniconfig"}, {"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}),
    ):  # fmt: skip
        result = subprocess.run(
            [sys.executable, "-c", f"{dump}\n{code}", *args],
            cwd=project, env={**env, **extra_env}, capture_output=True, text=True,
        )  # fmt: skip
        assert result.returncode == 0, (result.stdout + result.stderr)[-2000:]
        (line,) = [line for line in result.stdout.splitlines() if line.startswith("MODULES ")]
        top = {name.split(".")[0] for name in line.split()[1:]}
        imported = {
            name.lower()
            for name in top - own
            if not name.startswith("_") and not re.fullmatch(r"[0-9a-f]{40}", name)
        }
        assert expected <= imported
        assert sorted(imported - stdlib - checks.SHADOWED) == []


def test_shadow_list_covers_the_test_tools_and_their_dependencies():
    # pytest and ruff (the project's test extra) with everything they may need on any platform
    # and Python the project supports (exceptiongroup and tomli on 3.10, colorama on Windows),
    # by their installed top-level modules or, when not installed here, by their names.
    import importlib.metadata as metadata

    from packaging.requirements import Requirement

    from hooks import answers as checks

    modules_of: dict[str, set[str]] = {}
    for module, dists in metadata.packages_distributions().items():
        for dist in dists:
            modules_of.setdefault(re.sub(r"[-_.]+", "-", dist).lower(), set()).add(module.lower())
    needed: set[str] = set()
    todo, seen = ["pytest", "ruff"], set()
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:
            requires = []
        needed |= modules_of.get(name, {name.replace("-", "_")})
        for text in requires:
            requirement = Requirement(text)
            if "extra" not in str(requirement.marker or ""):
                todo.append(requirement.name)
    assert {"pytest", "_pytest", "py", "pluggy", "iniconfig", "tomli", "colorama"} <= needed
    assert sorted(needed - checks.SHADOWED) == []


def test_unknown_choice_is_refused(tmp_path):
    with pytest.raises(ValueError, match="haiku provided for choice variable model_api"):
        generate(tmp_path, project_name="x", model_api="haiku")
    assert list(tmp_path.iterdir()) == []


def test_bad_answer_on_the_command_line_exits_non_zero(tmp_path):
    result = subprocess.run(
        [str(BIN / "cookiecutter"), str(REPO), "--no-input", "-o", str(tmp_path),
         "project_name=import"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode != 0
    lines = (result.stdout + result.stderr).splitlines()
    assert lines == ["ERROR: package_name 'import' is a Python keyword; choose another name."]
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- parity


def _import_variant(root: Path, model_api: str, parallelism: str):
    package = f"parity_{model_api}_{parallelism}"
    project = generate(
        root,
        project_name=f"parity {model_api} {parallelism}",
        package_name=package,
        model_api=model_api,
        parallelism=parallelism,
    )
    sys.path.insert(0, str(project))
    return importlib.import_module(f"{package}.train"), project


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    root = tmp_path_factory.mktemp("variants")
    saved = list(sys.path)
    found = {
        (api, par): _import_variant(root, api, par)
        for api in ("nnx", "linen")
        for par in ("jit", "pmap")
    }
    yield found
    sys.path[:] = saved
    for name in [m for m in sys.modules if m.startswith("parity_") or m == "configs"]:
        del sys.modules[name]


def _parity_config(project: Path, features: str = "quick"):
    """``configs/quick.py`` cut to 12 steps, logging each; ``features`` adds to it:

    - ``"optimizer"``: muon (AdamW for what is not a matrix), EMA evaluation, accumulation over 2
      micro-steps, clipping, a frozen parameter and two parameter groups;
    - ``"resnet"``: the BatchNorm ResNet (batch statistics in the state, averaged over devices).
    """
    spec = importlib.util.spec_from_file_location("parity_quick", project / "configs/quick.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.num_train_steps = 12
    config.log_every_steps = 1
    config.eval_every_steps = 12
    config.checkpoint_every_steps = 12
    config.optimizer.schedule.warmup_steps = 3
    if features == "optimizer":
        config.optimizer.name = "muon"
        config.optimizer.ema_decay = 0.9
        config.optimizer.accumulate_steps = 2
        config.optimizer.clip_global_norm = 1.0
        config.optimizer.freeze = ["^head/bias$"]
        config.optimizer.param_groups = [
            dict(match="^conv_0/", lr_mult=0.5),
            dict(match="bias$", optimizer=dict(name="adam")),
        ]
    elif features == "resnet":
        config.model = dict(name="resnet", stage_sizes=(1, 1), num_filters=8)
    return config


def _curve(history: dict, name: str = "train_loss") -> np.ndarray:
    return np.array([value for _, value in history[name]])


def _run(variants, key, config, workdir, init_params=None):
    train, _ = variants[key]
    return train.train_and_evaluate(config, str(workdir), init_params=init_params)


def _assert_same_curves(got: dict, expected: dict) -> None:
    """Every logged metric but the speed agrees, step by step, to float32 rounding."""
    names = sorted(set(expected) - {"steps_per_sec", "uptime"})
    assert sorted(set(got) - {"steps_per_sec", "uptime"}) == names
    for name in names:
        assert [s for s, _ in got[name]] == [s for s, _ in expected[name]], name
        np.testing.assert_allclose(
            _curve(got, name), _curve(expected, name), rtol=1e-6, atol=1e-6, err_msg=name
        )
    assert _curve(expected)[-1] < _curve(expected)[0]


FEATURES = ["quick", "optimizer", "resnet"]


@pytest.mark.parametrize("features", FEATURES)
def test_nnx_and_linen_give_the_same_loss_curve(variants, tmp_path, features):
    config = _parity_config(variants["nnx", "jit"][1], features)
    params = variants["linen", "jit"][0].init_params(config)
    nnx_params = variants["nnx", "jit"][0].init_params(config)
    shapes = {k: np.shape(v) for k, v in _flatten(params).items()}
    assert shapes == {k: np.shape(v) for k, v in _flatten(nnx_params).items()}  # same layers

    linen = _run(variants, ("linen", "jit"), config, tmp_path / "linen", params)
    nnx = _run(variants, ("nnx", "jit"), config, tmp_path / "nnx", params)
    assert len(_curve(linen)) == 12
    _assert_same_curves(nnx, linen)


@pytest.mark.parametrize("features", FEATURES)
@pytest.mark.parametrize("model_api", ["nnx", "linen"])
def test_jit_and_pmap_give_the_same_loss_curve(variants, tmp_path, model_api, features):
    config = _parity_config(variants["nnx", "jit"][1], features)
    jit = _run(variants, (model_api, "jit"), config, tmp_path / "jit")
    pmap = _run(variants, (model_api, "pmap"), config, tmp_path / "pmap")
    _assert_same_curves(pmap, jit)


def test_a_checkpoint_of_the_other_model_api_is_one_clear_error(variants, tmp_path):
    from plugins.config_errors import ConfigError

    config = _parity_config(variants["nnx", "jit"][1])
    config.num_train_steps = config.checkpoint_every_steps = config.eval_every_steps = 2
    config.optimizer.schedule.warmup_steps = 1
    _run(variants, ("linen", "jit"), config, tmp_path)
    saved = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    config.num_train_steps = 4
    with pytest.raises(ConfigError, match="written by the other model_api"):
        _run(variants, ("nnx", "pmap"), config, tmp_path)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == saved


def _flatten(tree: dict, prefix: tuple = ()) -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, (*prefix, str(key))))
        else:
            out[(*prefix, str(key))] = value
    return out


def test_readme_documents_the_commands(tmp_path):
    project = generate(tmp_path, project_name="docs check")
    readme = (project / "README.md").read_text()
    for needle in (
        "python main.py --config=configs/default.py --workdir=",
        "--config.",
        "tensorboard --logdir",
        "resume",
        "--coordinator_address",
    ):
        assert needle in readme, needle
    assert not re.search(r"\{\{|\{%", readme)


def test_interactive_prompts_answered_on_stdin(tmp_path):
    # Name, then Enter for the derived slug, package, description and author, then the choices.
    answers = "My Net\n\n\n\n\n2\n2\n"
    result = subprocess.run(
        [str(BIN / "cookiecutter"), str(REPO), "-o", str(tmp_path)],
        input=answers, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Flax model API" in result.stdout and "Data parallelism" in result.stdout
    project = tmp_path / "my-net"
    assert "train_state.TrainState" in (project / "my_net" / "train.py").read_text()
    assert "jax.shard_map(" in (project / "my_net" / "parallel.py").read_text()


def test_project_suites_run_on_every_api_and_parallelism():
    """Each suite of tests/project_suites runs (``nox -s template``) on an NNX and a Linen
    variant and on a jit and a pmap one (the jit-only ones on both jit variants); every variant
    runs one."""
    noxfile = importlib.util.spec_from_file_location("noxfile", REPO / "noxfile.py")
    module = importlib.util.module_from_spec(noxfile)
    noxfile.loader.exec_module(module)
    suites = {p.name for p in (REPO / "tests" / "project_suites").glob("test_*.py")}
    variants = {(m, p) for m in ("nnx", "linen") for p in ("jit", "pmap")}
    assert set(module.PROJECT_SUITES) == variants
    for suite in suites:
        runs = [v for v, names in module.PROJECT_SUITES.items() if suite in names]
        assert {m for m, _ in runs} == {"nnx", "linen"}, suite
        jit_only = suite in module.JIT_ONLY_SUITES
        assert {p for _, p in runs} == ({"jit"} if jit_only else {"jit", "pmap"}), suite
