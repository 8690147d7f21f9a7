"""The learning-rate-curve command: run as users run it, and its error path."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import ml_collections
import pytest

from plugins import lr_curve
from plugins.config_errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

CONFIG = textwrap.dedent(
    """
    import ml_collections

    def get_config():
        config = ml_collections.ConfigDict()
        config.num_train_steps = 400
        config.optimizer = ml_collections.ConfigDict(dict(
            name='adamw',
            learning_rate=2e-3,
            accumulate_steps=1,
            schedule=dict(name='warmup_cosine', warmup_steps=0.1, end_value=1e-5),
        ))
        return config
    """
)


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "config.py"
    path.write_text(CONFIG)
    return path


def run_command(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "plugins.lr_curve", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_command_prints_chart_and_saves_png(config_file, tmp_path):
    out = tmp_path / "plots" / "lr.png"
    result = run_command(
        f"--config={config_file}",
        f"--out={out}",
        "--config.optimizer.learning_rate=3e-3",  # overrides work as for main.py
        "--config.optimizer.accumulate_steps=2",  # the schedule counts optimizer steps
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "peak 0.003 at step 20" in text  # warmup 10% of 400 // 2 = 200 optimizer steps
    assert "200 optimizer steps = num_train_steps 400 // accumulate_steps 2" in text
    assert "0.003 |" in text and "199" in text  # y axis at the peak; x axis to the last step
    assert "(peak)" in text
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert f"saved {out}" in text


def test_command_default_out_is_lr_png_in_cwd(config_file, tmp_path):
    result = run_command(f"--config={config_file}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "peak 0.002 at step 40" in result.stdout
    assert (tmp_path / "lr.png").read_bytes()[:8] == PNG_MAGIC


def test_command_bad_config_one_line_no_traceback(config_file, tmp_path):
    result = run_command(
        f"--config={config_file}", "--config.optimizer.schedule.name=warmup_cosin", cwd=tmp_path
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if "plugins-lr-curve" in line]
    assert len(lines) == 1
    assert "optimizer.schedule.name" in lines[0] and "did you mean 'warmup_cosine'" in lines[0]
    assert not (tmp_path / "lr.png").exists()


def test_main_error_paths(config_file, tmp_path, capsys):
    cases = {
        "--config.optimizer.learning_rate=-1": "optimizer.learning_rate",
        "--config.optimizer.schedule.warmup_steps=1000": "optimizer.schedule.warmup_steps",
        "--config.optimizer.accumulate_steps=1000": "optimizer.accumulate_steps",
        "--config.optimizer.schedule.warmup_stepz=3": "warmup_stepz",
    }
    for override, expected in cases.items():
        status = lr_curve.main([f"--config={config_file}", override, "--out="])
        err = capsys.readouterr().err.strip()
        assert status == 2, override
        assert err.count("\n") == 0 and err.startswith("plugins-lr-curve: config error:"), err
        assert expected in err and "Unknown command line flag" not in err, err

    assert lr_curve.main([]) == 2
    assert "--config is required" in capsys.readouterr().err
    # The generated project's main.py says the same (plugins.config_cli) for the same mistakes.
    missing = tmp_path / "missing.py"
    assert lr_curve.main([f"--config={missing}"]) == 2
    assert capsys.readouterr().err == (
        f"plugins-lr-curve: config error: cannot load --config={missing}: "
        "No such file or directory\n"
    )
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config(:\n")
    assert lr_curve.main([f"--config={broken}"]) == 2
    assert f"cannot load --config={broken}: invalid syntax (line 1)" in capsys.readouterr().err
    assert lr_curve.main([f"--config={config_file}", "--config.optimizer.learning_rat=1"]) == 2
    assert capsys.readouterr().err.startswith(
        "plugins-lr-curve: config error: unknown key 'optimizer.learning_rat'. "
        'Did you mean "learning_rate"'
    )
    assert lr_curve.main([f"--config={config_file}", "--config.num_train_steps=abc"]) == 2
    assert capsys.readouterr().err.startswith("plugins-lr-curve: flag error: ")
    assert lr_curve.main([f"--config={config_file}", "--nonsense"]) == 2
    assert "nonsense" in capsys.readouterr().err


def test_main_success_in_process(config_file, tmp_path, capsys):
    out = tmp_path / "x.png"
    assert lr_curve.main([f"--config={config_file}", f"--out={out}", "--width=30"]) == 0
    text = capsys.readouterr().out
    assert "learning rate (warmup_cosine), 400 steps" in text
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert lr_curve.main(["--help"]) == 0
    assert "--config" in capsys.readouterr().out


def test_optimizer_steps():
    config = ml_collections.ConfigDict(
        dict(num_train_steps=1000, optimizer=dict(learning_rate=1.0, accumulate_steps=4))
    )
    assert lr_curve.optimizer_steps(config) == 250
    assert lr_curve.optimizer_steps(dict(num_train_steps=10, optimizer=dict())) == 10
    with pytest.raises(ConfigError, match="num_train_steps"):
        lr_curve.optimizer_steps(dict(num_train_steps=0, optimizer=dict()))
    with pytest.raises(ConfigError, match="optimizer"):
        lr_curve.optimizer_steps(dict(num_train_steps=10))


def _project_with_configs_package(root: Path) -> Path:
    """A project as the template generates it: configs/ a package whose quick.py imports
    ``configs.default``, as main.py (in the project root) loads it."""
    configs = root / "project" / "configs"
    configs.mkdir(parents=True)
    (configs / "__init__.py").write_text("")
    (configs / "default.py").write_text(CONFIG)
    (configs / "quick.py").write_text(
        textwrap.dedent(
            """
            from configs import default

            def get_config():
                config = default.get_config()
                config.num_train_steps = 20
                config.optimizer.schedule.warmup_steps = 5
                return config
            """
        )
    )
    return root / "project"


def test_a_config_that_imports_its_configs_package_loads_as_under_main_py(tmp_path):
    project = _project_with_configs_package(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # From another folder (python -m puts only the cwd on sys.path): the config's folder's
    # parent is what lets `from configs import default` work.
    result = run_command(
        "--config=../project/configs/quick.py",
        "--out=",
        "--config.optimizer.learning_rate=1e-3",
        cwd=elsewhere,
    )
    assert result.returncode == 0, result.stderr
    assert "peak 0.001 at step 5" in result.stdout
    # The installed command (no cwd on sys.path at all), from the project root.
    script = Path(sys.executable).with_name("plugins-lr-curve")
    if script.exists():
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        result = subprocess.run(
            [str(script), "--config=configs/quick.py", "--out="],
            cwd=project,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        assert "peak 0.002 at step 5" in result.stdout


def test_a_wrong_type_in_the_config_file_is_one_line_naming_key_and_types(tmp_path, capsys):
    path = tmp_path / "typed.py"
    path.write_text(
        textwrap.dedent(
            """
            import ml_collections

            def get_config():
                config = ml_collections.ConfigDict()
                config.num_train_steps = 400
                config.optimizer = ml_collections.ConfigDict(dict(name='adamw', learning_rate=1e-3))
                config.optimizer.learning_rate = 'fast'
                return config
            """
        )
    )
    assert lr_curve.main([f"--config={path}", "--out="]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"plugins-lr-curve: config error: cannot load --config={path}: "
        "optimizer.learning_rate (line 8): given 'fast' (a str), expected a float"
    )
