"""plugins.config_cli: the one line for each way a config command line can fail to parse."""

from __future__ import annotations

import os

import pytest
from absl import flags
from ml_collections import config_flags

from plugins import config_cli

CONFIG = """
import ml_collections

def get_config():
    return ml_collections.ConfigDict(dict(num_train_steps=10, optimizer=dict(kwargs=dict(b2=0.9))))
"""


def _parse(argv: list[str]) -> str:
    """Parses ``argv`` with a locked config flag; returns the one line for what went wrong."""
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, sys_argv=argv)
    try:
        fv(argv)
        fv.config.keys()
    except config_cli.PARSE_ERRORS as error:
        return config_cli.parse_error_line(error, argv)
    except OSError as error:
        return config_cli.load_error_line(error, argv)
    raise AssertionError(f"{argv} parsed")


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "cfg.py"
    path.write_text(CONFIG)
    return str(path)


def test_unknown_key_names_the_full_override_path(config_file):
    line = _parse(["prog", f"--config={config_file}", "--config.num_train_step=5"])
    assert line.startswith("config error: unknown key 'num_train_step'. Did you mean")
    line = _parse(["prog", f"--config={config_file}", "--config.optimizer.kwargs.b1=0.9"])
    assert line.startswith("config error: unknown key 'optimizer.kwargs.b1'")
    assert "can only be added in a config file" in line


def test_wrong_type_is_a_flag_error(config_file):
    line = _parse(["prog", f"--config={config_file}", "--config.num_train_steps=abc"])
    assert line.startswith("flag error: flag --config.num_train_steps=abc: ")
    assert "\n" not in line


@pytest.mark.parametrize(
    "text, why",
    [
        (None, "No such file or directory"),
        ("def get_config(:\n", "invalid syntax (line 1)"),
    ],
)
def test_a_file_that_cannot_be_loaded(tmp_path, text, why):
    path = tmp_path / "bad.py"
    if text is not None:
        path.write_text(text)
    assert _parse(["prog", "--config", str(path)]) == (
        f"config error: cannot load --config={path}: {why}"
    )


def test_workdir_problems_are_found_before_anything_is_created(tmp_path):
    assert config_cli.workdir_problem(str(tmp_path)) is None
    assert config_cli.workdir_problem(str(tmp_path / "new" / "run")) is None
    assert not (tmp_path / "new").exists()
    file = tmp_path / "file"
    file.write_text("")
    assert config_cli.workdir_problem(str(file)) == f"{file} is a file, not a directory"
    assert config_cli.workdir_problem(str(file / "run")) == (
        f"{file / 'run'} cannot be created: {file} is a file"
    )


def test_a_workdir_that_cannot_be_written_is_a_problem(tmp_path, monkeypatch):
    """What ``os.access`` says decides (it knows read-only mounts; root may write anywhere else,
    so the answer is simulated here)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(
        config_cli.os,
        "access",
        lambda path, mode: (
            not (mode & os.W_OK and str(path) == str(locked)) and real_access(path, mode)
        ),
    )
    assert config_cli.workdir_problem(str(locked)) == (
        f"{locked} is not writable (checkpoints and TensorBoard events go there)"
    )
    assert config_cli.workdir_problem(str(locked / "run")) == (
        f"{locked / 'run'} cannot be created: {locked} is not writable"
    )
    assert config_cli.workdir_problem(str(tmp_path / "other")) is None


@pytest.mark.parametrize(
    "body, why",
    [
        (
            "    config = ml_collections.ConfigDict(dict(num_train_steps=10))\n"
            "    config.num_train_steps = 'ten'\n"
            "    return config\n",
            "num_train_steps (line 5): given 'ten' (a str), expected an int",
        ),
        (
            "    config = ml_collections.ConfigDict(dict(optimizer=dict(weight_decay=0.1)))\n"
            "    config.optimizer.weight_decay = [0.1]\n"
            "    return config\n",
            "optimizer.weight_decay (line 5): given [0.1] (a list), expected a float",
        ),
        (
            "    raise ValueError('no such size: xl')\n",
            "ValueError: no such size: xl (line 4)",
        ),
    ],
)
def test_an_error_inside_the_config_file_is_one_line(tmp_path, body, why):
    """ml_collections reports a TypeError/ValueError raised in get_config() as a flag error
    holding the whole traceback; the line names the key, the type given and the type expected
    (or the exception), and the config file's line."""
    path = tmp_path / "cfg.py"
    path.write_text("import ml_collections\n\ndef get_config():\n" + body)
    line = _parse(["prog", f"--config={path}"])
    assert line == f"config error: cannot load --config={path}: {why}"


def test_errors_of_a_config_files_own_code_are_one_line_naming_its_line(tmp_path):
    import ml_collections

    path = tmp_path / "bad.py"
    path.write_text("def get_config():\n    raise RuntimeError('boom')\n")
    argv = ["main.py", f"--config={path}"]
    namespace: dict = {}
    exec(compile(path.read_text(), str(path), "exec"), namespace)
    try:
        namespace["get_config"]()
    except RuntimeError as error:
        assert config_cli.raised_in_config_file(error, argv) == 2
        line = config_cli.config_code_error_line(error, argv)
    assert line == f"config error: cannot load --config={path}: RuntimeError: boom (line 2)"
    config = ml_collections.ConfigDict(dict(learning_rate=0.1))
    with config_cli.no_bools_as_numbers(), pytest.raises(TypeError, match="original type"):
        config.learning_rate = True
    config.learning_rate = 1  # ints still become floats
    assert config.learning_rate == 1.0


def test_a_config_file_whose_get_config_returns_none_is_one_config_error(tmp_path):
    # As main.py defines it: --config required (absl then says the value is None).
    path = tmp_path / "none.py"
    path.write_text("def get_config():\n    pass\n")
    argv = ["prog", f"--config={path}"]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, sys_argv=argv)
    flags.mark_flag_as_required("config", flag_values=fv)
    with pytest.raises(config_cli.PARSE_ERRORS) as raised:
        fv(argv)
    why = "get_config() returned None, not a ConfigDict"
    assert config_cli.parse_error_line(raised.value, argv) == (
        f"config error: cannot load --config={path}: {why}"
    )
    missing = ["prog"]  # no --config at all stays absl's flag error
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, sys_argv=missing)
    flags.mark_flag_as_required("config", flag_values=fv)
    with pytest.raises(config_cli.PARSE_ERRORS) as raised:
        fv(missing)
    assert config_cli.parse_error_line(raised.value, missing).startswith("flag error: ")
