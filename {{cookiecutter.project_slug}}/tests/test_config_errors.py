"""Every config mistake ends the run with one clear line, before anything compiles or is written.

Most cases run in this process through ``main.train_or_exit``, the function ``main.py`` calls
(a ``ConfigError`` becomes ``SystemExit("config error: ...")``, i.e. one line on stderr and exit
code 1). A few run ``main.py`` for real to prove the exit code, the missing traceback and the
untouched workdir end to end.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import jax.monitoring
import ml_collections
import pytest

import main
from configs import quick

PROJECT = Path(__file__).resolve().parents[1]
DELETE = object()  # as a value: remove the key

# Every trace, lowering or compilation JAX does in this process (name, function name).
_COMPILE_EVENTS: list[tuple[str, str]] = []


def _record(name: str, *args, **kwargs) -> None:
    if name.startswith("/jax/core/compile/"):
        _COMPILE_EVENTS.append((name, str(kwargs.get("fun_name", ""))))


jax.monitoring.register_event_duration_secs_listener(_record)


def _set(tree: dict, key: str, value) -> None:
    *parents, leaf = key.split(".")
    for parent in parents:
        tree = tree[parent]
    if value is DELETE:
        del tree[leaf]
    else:
        tree[leaf] = value


def from_file(key: str, value) -> ml_collections.ConfigDict:
    """``configs/quick.py`` with ``key`` set to ``value`` as a config file could write it (any
    type, new keys allowed)."""
    tree = quick.get_config().to_dict()
    _set(tree, key, value)
    return ml_collections.ConfigDict(tree)


def from_override(key: str, value) -> ml_collections.ConfigDict:
    """``configs/quick.py`` changed the way ``--config.key=value`` changes it: the config is
    locked and keeps its types (a misspelled key or a wrong type is a flag error, tested below)."""
    config = quick.get_config()
    config.lock()
    config.update_from_flattened_dict({key: value})
    return config


# (how the mistake is made, key, value, what the one line must say)
CASES = [
    # misspelled keys, at the top level and nested
    (
        from_file,
        "num_train_step",
        5,
        "unknown key 'num_train_step' at config.num_train_step (did you mean 'num_train_steps'?)",
    ),
    (
        from_file,
        "optimzer",
        dict(name="adam", learning_rate=1e-3),
        "at config.optimzer (did you mean 'optimizer'?)",
    ),
    (
        from_file,
        "optimizer.learning_rat",
        1e-3,
        "at optimizer.learning_rat (did you mean 'learning_rate'?)",
    ),
    (
        from_file,
        "optimizer.schedule.warmup_step",
        3,
        "at optimizer.schedule.warmup_step (did you mean 'warmup_steps'",
    ),
    (
        from_file,
        "optimizer.kwargs",
        dict(b3=0.9),
        "'b3' at optimizer.kwargs.b3 (did you mean 'b2', 'b1'?)",
    ),
    (
        from_file,
        "loss.label_smoothng",
        0.1,
        "at loss.label_smoothng (did you mean 'label_smoothing'?)",
    ),
    (from_file, "model.featurs", (8,), "at model.featurs (did you mean 'features'?)"),
    (from_file, "loss", DELETE, "config is missing the key(s) loss"),
    # unknown names
    (
        from_file,
        "optimizer.name",
        "adamm",
        "unknown optimizer 'adamm' at optimizer.name (did you mean 'adam'",
    ),
    (
        from_override,
        "optimizer.name",
        "sgdd",
        "unknown optimizer 'sgdd' at optimizer.name (did you mean 'sgd'",
    ),
    (
        from_file,
        "optimizer.schedule.name",
        "cosin",
        "unknown schedule 'cosin' at optimizer.schedule.name (did you mean 'cosine'",
    ),
    (
        from_file,
        "loss.name",
        "cross_entropy",
        "unknown loss 'cross_entropy' at loss.name (did you mean 'softmax_cross_entropy'",
    ),
    (
        from_override,
        "model.name",
        "resnett",
        "unknown model 'resnett' at model.name (did you mean 'resnet'?)",
    ),
    (from_file, "dataset", "mnistt", "unknown dataset 'mnistt' at dataset (did you mean 'mnist'"),
    (
        from_override,
        "dataset",
        "cifar_10",
        "unknown dataset 'cifar_10' at dataset (did you mean 'cifar10'",
    ),
    # wrong types (a config file can write any type; overrides are type-checked by the flags)
    (from_file, "num_train_steps", "abc", "num_train_steps must be an int >= 1, got 'abc'"),
    (from_file, "batch_size", 64.0, "batch_size must be an int >= 1, got 64.0"),
    (from_file, "half_precision", "yes", "half_precision must be True or False, got 'yes'"),
    (from_file, "model", "cnn", "model must be a ConfigDict with a 'name'"),
    (from_file, "model.features", 8, "model.features must be a non-empty tuple of ints >= 1"),
    (from_file, "optimizer.learning_rate", "fast", "optimizer.learning_rate"),
    (from_file, "optimizer.weight_decay", "lots", "optimizer.weight_decay"),
    (from_file, "data_dir", 3, "data_dir must be a path or None, got 3"),
    # values out of range
    (
        from_override,
        "batch_size",
        12,
        "batch_size=12 does not divide over the 8 devices; use a multiple of 8",
    ),
    (
        from_override,
        "eval_batch_size",
        100,
        "eval_batch_size=100 does not divide over the 8 devices",
    ),
    (
        from_override,
        "optimizer.schedule.warmup_steps",
        100,
        "optimizer.schedule.warmup_steps = 100 is longer than training (total_steps = 20)",
    ),
    (
        from_override,
        "optimizer.learning_rate",
        -1.0,
        "optimizer.learning_rate must be > 0, got -1.0",
    ),
    (from_override, "optimizer.learning_rate", 0.0, "optimizer.learning_rate must be > 0, got 0.0"),
    (from_override, "seed", -1, "seed must be an int >= 0, got -1"),
    (from_file, "seed", 2**64, "seed must be an int <= 4294967295"),
    (from_file, "num_train_steps", 2**31, "num_train_steps must be an int <= 2147483647"),
    (from_file, "dataset", "digits:9.9.9", "'digits' has no version 9.9.9"),
    (from_file, "dataset", "digits/foo", "'digits' has no config 'foo'"),
    (from_override, "batch_size", 4000, "batch_size=4000 is more than the 1438 examples"),
    (from_override, "log_every_steps", 0, "log_every_steps must be an int >= 1, got 0"),
    (from_override, "model.dense", -3, "model.dense must be an int >= 1, got -3"),
    (
        from_override,
        "model.name",
        "resnet",
        "model.dense is not an option of model 'resnet' (its options: num_filters, "
        "stage_sizes) but of 'cnn'",
    ),
    (
        from_override,
        "model.features",
        (32, 0),
        "model.features must be a non-empty tuple of ints >= 1",
    ),
    (from_file, "optimizer.clip_global_norm", -1.0, "optimizer.clip_global_norm must be > 0"),
    (from_file, "optimizer.accumulate_steps", 0, "optimizer.accumulate_steps must be an int >= 1"),
    (from_file, "optimizer.ema_decay", 1.5, "optimizer.ema_decay must be None or in (0, 1)"),
    (
        from_override,
        "loss.label_smoothing",
        2.0,
        "loss.label_smoothing for 'softmax_cross_entropy' must be a number in [0.0, 1.0)",
    ),
    # path regexes that match no parameter (known only once the parameters exist)
    (
        from_file,
        "optimizer.weight_decay_mask",
        ["matrix"],
        "regex 'matrix' matches no parameter; paths are: conv_0/bias",
    ),
    (from_file, "optimizer.freeze", ["^backbone/"], "regex '^backbone/' matches no parameter"),
]
# Mistakes found only once the parameters exist: the model is initialised (small eager ops
# compile), but no train or eval step is traced or compiled.
NEEDS_PARAMS = {"optimizer.weight_decay_mask", "optimizer.freeze"}


@pytest.mark.parametrize(
    "make, key, value, message",
    CASES,
    ids=[  # stable names (pytest-xdist's workers must collect the same ones)
        f"{make.__name__}:{key}={'<deleted>' if value is DELETE else repr(value)}"
        for make, key, value, _ in CASES
    ],
)
def test_bad_config_is_one_line_before_anything_compiles(tmp_path, make, key, value, message):
    config = make(key, value)
    workdir = tmp_path / "run"
    _COMPILE_EVENTS.clear()
    with pytest.raises(SystemExit) as exit_info:
        main.train_or_exit(config, str(workdir))
    line = exit_info.value.code
    assert isinstance(line, str), line  # sys.exit(str): printed to stderr, exit code 1
    assert line.startswith("config error: ") and "\n" not in line, line
    assert message in line, line
    assert not workdir.exists()  # nothing created: no workdir, checkpoints or event file
    if key in NEEDS_PARAMS:
        steps = [f for _, f in _COMPILE_EVENTS if "step" in f]
        assert not steps, steps
    else:
        assert not _COMPILE_EVENTS, _COMPILE_EVENTS


def test_at_least_25_configs_are_checked():
    assert len(CASES) >= 25


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file of a workdir but its lock (``.lock``: a run that starts takes it, naming
    itself there, before it reads the checkpoints)."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if not p.name.startswith(".lock")
    }


def _main(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "main.py", *args], cwd=PROJECT, capture_output=True, text=True, timeout=300
    )


def _one_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if "error: " in line]
    assert len(lines) == 1, result.stderr[-3000:]
    assert result.stderr.rstrip().endswith(lines[0])
    return lines[0]


def test_config_file_mistake_leaves_an_existing_workdir_untouched(tmp_path):
    # A run that already has a workdir (checkpoints, events) is restarted with a broken config.
    workdir = tmp_path / "run"
    (workdir / "checkpoints" / "10").mkdir(parents=True)
    (workdir / "checkpoints" / "10" / "state").write_text("checkpoint")
    (workdir / "events.out.tfevents.1").write_text("events")
    before = _snapshot(workdir)
    config_file = tmp_path / "broken.py"
    config_file.write_text(
        "from configs import quick\n\n\n"
        "def get_config():\n"
        "    config = quick.get_config()\n"
        "    config.optimizer.name = 'adamm'\n"
        "    return config\n"
    )
    result = _main(tmp_path, f"--config={config_file}", f"--workdir={workdir}")
    line = _one_line(result)
    assert line.startswith("config error: unknown optimizer 'adamm' at optimizer.name"), line
    assert _snapshot(workdir) == before


def test_override_of_the_wrong_type_is_one_line(tmp_path):
    workdir = tmp_path / "run"
    result = _main(
        tmp_path, "--config=configs/quick.py", f"--workdir={workdir}", "--config.batch_size=abc"
    )
    line = _one_line(result)
    assert line.startswith("flag error: ") and "batch_size" in line, line
    assert not workdir.exists()


def test_a_workdir_that_is_a_file_is_one_line_at_once(tmp_path):
    file = tmp_path / "run"
    file.write_text("not a directory")
    line = _one_line(_main(tmp_path, "--config=configs/quick.py", f"--workdir={file}"))
    assert line == f"workdir error: {file} is a file, not a directory", line
    assert file.read_text() == "not a directory"


def test_a_stray_argument_is_one_line(tmp_path):
    workdir = tmp_path / "run"
    result = _main(tmp_path, "--config=configs/quick.py", f"--workdir={workdir}", "quick")
    line = _one_line(result)
    assert line == "flag error: unexpected argument(s) quick; flags are --name=value", line
    assert not workdir.exists()


def test_ctrl_c_while_starting_up_is_one_line(tmp_path):
    """SIGINT once the program logs its devices (it then loads data and compiles, before the
    training steps take over Ctrl-C): exit code 130, one line, no traceback."""
    log, workdir = tmp_path / "out.log", tmp_path / "run"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "main.py", "--config=configs/quick.py", f"--workdir={workdir}"],
            cwd=PROJECT, stdout=out, stderr=subprocess.STDOUT, text=True,
            # A background job's children ignore SIGINT; a terminal's get Ctrl-C.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while "devices: [" not in log.read_text():
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=120) == 130, log.read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
    output = log.read_text()
    assert "Traceback" not in output, output[-3000:]
    last = output.rstrip().splitlines()[-1]
    assert last.startswith("interrupted ("), output[-3000:]


def test_override_that_does_not_divide_is_one_line(tmp_path):
    workdir = tmp_path / "run"
    result = _main(
        tmp_path, "--config=configs/quick.py", f"--workdir={workdir}", "--config.batch_size=12"
    )
    line = _one_line(result)
    assert line == (
        "config error: batch_size=12 does not divide over the 8 devices; use a multiple of 8"
    )
    assert not workdir.exists()


@pytest.mark.parametrize("name", ["default", "quick", "mnist", "cifar10", "vit_cifar10"])
def test_every_optimizer_key_is_in_every_config_file(name):
    # The config is locked: only keys the file holds can be set with --config.optimizer.<key>.
    from importlib import import_module

    from plugins import optim

    config = import_module(f"configs.{name}").get_config()
    assert sorted(config.optimizer.keys()) == sorted(optim.TOP_KEYS)


def test_every_optional_optimizer_key_can_be_set_on_the_command_line(tmp_path):
    workdir = tmp_path / "run"
    overrides = [
        "--config.optimizer.ema_decay=0.99",
        "--config.optimizer.skip_nonfinite=True",
        "--config.optimizer.clip_global_norm=1.0",
        "--config.optimizer.clip_value=0.5",
        "--config.optimizer.accumulate_steps=2",
        "--config.optimizer.weight_decay=0.001",
        "--config.optimizer.freeze=('^conv_0/',)",
        "--config.num_train_steps=0",  # parsed like the rest, then stops the run at the check
    ]
    result = _main(tmp_path, "--config=configs/quick.py", f"--workdir={workdir}", *overrides)
    assert _one_line(result) == "config error: num_train_steps must be an int >= 1, got 0"
    assert not workdir.exists()


def test_an_optimizer_kwarg_the_file_lacks_is_one_line_saying_where_to_set_it(tmp_path):
    result = _main(
        tmp_path,
        "--config=configs/quick.py",
        f"--workdir={tmp_path}",
        "--config.optimizer.kwargs.b1=0.9",
    )
    line = _one_line(result)
    assert line.startswith(
        "config error: unknown key 'optimizer.kwargs.b1' (the config is locked"
    ), line


@pytest.mark.parametrize(
    "text, why",
    [
        (None, "No such file or directory"),
        ("x = 1\n", "it defines no get_config()"),
        ("def get_config(:\n", "(line 1)"),
    ],
    ids=["missing", "no_get_config", "syntax_error"],
)
def test_a_config_file_that_cannot_be_loaded_is_one_line(tmp_path, text, why):
    path = tmp_path / "my_config.py"
    if text is not None:
        path.write_text(text)
    workdir = tmp_path / "run"
    result = _main(tmp_path, f"--config={path}", f"--workdir={workdir}")
    line = _one_line(result)
    assert line.startswith(f"config error: cannot load --config={path}: ") and why in line, line
    assert not workdir.exists()


def test_resuming_with_another_model_or_optimizer_is_one_line_and_keeps_the_run(tmp_path):
    def short(steps: int) -> ml_collections.ConfigDict:
        config = quick.get_config()
        config.num_train_steps = steps
        config.optimizer.schedule.warmup_steps = 1
        return config

    workdir = tmp_path / "run"
    main.train_or_exit(short(2), str(workdir))
    before = _snapshot(workdir)
    changes = {
        "model.features": ((16, 64), "conv_0/bias' is (32,) there, (16,) here"),
        "optimizer.name": ("lion", "which this config does not"),  # adamw's second moment
        "optimizer.accumulate_steps": (2, "it has no "),  # MultiSteps' state
    }
    for key, (value, why) in changes.items():
        changed = short(4)
        changed.update_from_flattened_dict({key: value})
        with pytest.raises(SystemExit) as exit_info:
            main.train_or_exit(changed, str(workdir))
        line = exit_info.value.code
        assert line.startswith("config error: the checkpoint of step 2 in "), line
        assert "was written for a different model or optimizer" in line and why in line, line
        assert _snapshot(workdir) == before, key


def test_a_dataset_that_cannot_be_downloaded_is_one_line(tmp_path, monkeypatch):
    # MNIST without network: tfds gives up after its retries; main.py says so in one line.
    import tensorflow_datasets as tfds

    def offline(self, *args, **kwargs):
        raise ConnectionError("Max retries exceeded with url: https://storage.googleapis.com/...")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", offline)
    config = quick.get_config()
    config.dataset, config.data_dir = "mnist", str(tmp_path / "tfds")
    with pytest.raises(SystemExit) as exit_info:
        main.train_or_exit(config, str(tmp_path / "run"))
    line = exit_info.value.code
    assert isinstance(line, str) and "\n" not in line, line
    # Offline, one attempt to reach the download host says so; where it answers, tfds' own
    # (here failing) download does.
    assert line.startswith(
        ("data error: dataset 'mnist' is not prepared in ", "data error: cannot prepare dataset")
    ), line
    assert not (tmp_path / "run").exists()  # nothing written: the data is checked first
