"""plugins.loop on a tiny model of its own (a linear classifier on 64 features, one device): the
workdir lock, damaged and changed checkpoints, a full disk and workdir paths. Fast: no project is
generated; the generated projects' suites (tests/project_suites) check the same end to end."""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from plugins import cli, config_cli, config_errors, loop, metrics

# w holds 640 floats: stored in its own data file, not inline in orbax's (CRC-checked) b-tree.
FEATURES, CLASSES = 64, 10


def _config(steps: int = 6) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            seed=0, dataset="toy", data_dir=None, model=dict(name="linear"),
            batch_size=8, eval_batch_size=8, num_train_steps=steps, log_every_steps=2,
            eval_every_steps=steps, checkpoint_every_steps=2, half_precision=False,
            optimizer=dict(name="sgd", learning_rate=0.1), loss=dict(name="cross_entropy"),
        )
    )  # fmt: skip


def _state() -> dict:
    key = jax.random.key(0)
    return dict(
        params=dict(w=jax.random.normal(key, (FEATURES, CLASSES)) * 0.1, b=jnp.zeros(CLASSES)),
        step=jnp.int32(0),
    )


def _loss(params, batch):
    logits = batch["image"] @ params["w"] + params["b"]
    per_example = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    return per_example.mean(), (logits, per_example)


@jax.jit
def _train_step(state, so_far, batch):
    (loss, (logits, _)), grads = jax.value_and_grad(_loss, has_aux=True)(state["params"], batch)
    params = jax.tree.map(lambda p, g: p - 0.1 * g, state["params"], grads)
    step = metrics.train_step_metrics(
        loss=loss, logits=logits, labels=batch["label"], grads=grads, learning_rate=0.1
    )
    return dict(params=params, step=state["step"] + 1), so_far.merge(step)


@jax.jit
def _eval_step(state, so_far, batch):
    logits = batch["image"] @ state["params"]["w"] + state["params"]["b"]
    here = metrics.EvalMetrics.single_from_model_output(
        loss=optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]),
        correct=(jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32),
        mask=batch["mask"],
    )
    return so_far.merge(here)


class OneDevice:
    """The ``loop.Parallel`` of one device."""

    num_devices = 1

    def put_state(self, state):
        return jax.device_put(state, jax.devices()[0])

    def host_state(self, state):
        return state

    def to_host(self, tree):
        return tree

    def train_batches(self, batches):
        return iter(batches)

    def eval_batches(self, batches):
        return iter(batches)


def _batch(step: int, *, train: bool = True) -> dict:
    rng = np.random.default_rng(step)
    batch = {
        "image": rng.normal(size=(8, FEATURES)).astype(np.float32),
        "label": rng.integers(0, CLASSES, 8).astype(np.int32),
    }
    if not train:
        batch["mask"] = np.ones(8, bool)
    return batch


def _train_batches(start_step: int):
    step = start_step
    while True:
        step += 1
        yield _batch(step)


def fit(workdir, steps: int = 6, **kwargs):
    arguments = dict(
        state=_state(), train_step=_train_step, eval_step=_eval_step, parallel=OneDevice(),
        train_batches=_train_batches, eval_batches=lambda: [_batch(0, train=False)],
        input_shape=(FEATURES,),
    )  # fmt: skip
    return loop.fit(_config(steps), str(workdir), **{**arguments, **kwargs})


def _steps(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _saved(workdir: Path, step: int) -> dict:
    restored = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "default")
    return jax.tree.map(np.asarray, restored)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A run of 6 steps, checkpoints at 2, 4 and 6 (copy it before changing it)."""
    workdir = tmp_path_factory.mktemp("trained")
    fit(workdir)
    return workdir


def _copy(trained: Path, tmp_path: Path) -> Path:
    import shutil

    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir, ignore=shutil.ignore_patterns(".lock*"))
    return workdir


def _data_files(workdir: Path, step: int) -> list[Path]:
    """The files of a checkpoint's arrays: orbax's OCDBT data files (small arrays live inside
    the b-tree files of ``default/d``, larger ones in each process's ``ocdbt.process_<i>/d``)."""
    folder = workdir / "checkpoints" / str(step) / "default"
    return sorted((p for p in folder.rglob("d/*") if p.is_file()), key=lambda p: p.stat().st_size)


# ----------------------------------------------------------------------------- the lock

HOLDER = textwrap.dedent(
    """
    import sys, time
    from plugins import config_cli
    with config_cli.workdir_lock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(600)
    """
)


def _holder(workdir: Path) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(workdir)], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline().strip() == "locked"
    return process


def test_a_second_run_into_a_busy_workdir_is_refused_at_once(tmp_path):
    workdir = tmp_path / "run"
    holder = _holder(workdir)
    try:
        busy = config_cli.workdir_in_use(str(workdir))
        assert busy.startswith(f"{workdir} is in use by process {holder.pid} on ")
        assert " since " in busy and "\n" not in busy
        with pytest.raises(config_cli.WorkdirBusy, match=f"in use by process {holder.pid} on "):
            fit(workdir)
        assert not (workdir / "checkpoints").exists()  # refused before anything was written
        # main.py's line
        with pytest.raises(SystemExit) as stopped, cli.one_line_errors():
            fit(workdir)
        assert stopped.value.code.startswith(f"workdir error: {workdir} is in use by process ")
    finally:
        holder.kill()  # SIGKILL: the operating system drops the lock
        holder.wait()
    assert config_cli.workdir_in_use(str(workdir)) is None
    fit(workdir)  # a new run starts fine in the workdir of the killed one
    assert _steps(workdir) == [2, 4, 6]


def test_a_run_holds_the_lock_while_it_trains_and_releases_it(tmp_path):
    """The other order: a run training in the workdir refuses a second process."""
    workdir = tmp_path / "run"
    seen = []

    def train_batches(start_step):
        for index, batch in enumerate(_train_batches(start_step)):
            if index == 1:
                probe = subprocess.run(
                    [sys.executable, "-c", HOLDER, str(workdir)], capture_output=True, text=True
                )
                seen.append((probe.returncode, probe.stderr.strip().splitlines()[-1]))
            yield batch

    fit(workdir, train_batches=train_batches)
    ((code, line),) = seen
    assert code != 0 and line.startswith("plugins.config_cli.WorkdirBusy: "), line
    assert f"in use by process {os.getpid()} on " in line
    assert config_cli.workdir_in_use(str(workdir)) is None  # released at the end
    fit(workdir, steps=8)  # and taken again: re-entrant in one process
    assert _steps(workdir) == [4, 6, 8]


def test_only_training_is_refused_and_remote_workdirs_are_not_locked(tmp_path):
    workdir = tmp_path / "run"
    fit(workdir)
    holder = _holder(workdir)
    try:
        step, state = loop.restore(str(workdir), _state())  # reading needs no lock
        assert step == 6
    finally:
        holder.kill()
        holder.wait()
    with config_cli.workdir_lock("gs://bucket/run"):  # no network touched
        pass
    assert config_cli.workdir_in_use("gs://bucket/run") is None


# ----------------------------------------------------------------------------- damage


def _damage_truncate(workdir: Path, step: int) -> None:
    for data in _data_files(workdir, step):
        os.truncate(data, data.stat().st_size // 2)


def _damage_delete(workdir: Path, step: int) -> None:
    for data in _data_files(workdir, step):
        data.unlink()


def _damage_metadata(workdir: Path, step: int) -> None:
    (workdir / "checkpoints" / str(step) / "default" / "_METADATA").write_text("garbage")


def _damage_step_metadata(workdir: Path, step: int) -> None:
    (workdir / "checkpoints" / str(step) / "_CHECKPOINT_METADATA").write_text("{garbage")


def _damage_manifest(workdir: Path, step: int) -> None:
    (workdir / "checkpoints" / str(step) / "default" / "manifest.ocdbt").unlink()


def _damage_flip(workdir: Path, step: int) -> None:
    """One bit of the parameters' data, changed as a failing disk would: the stored chunk still
    decompresses, to other numbers (the first such byte from the middle of a data file on)."""
    want = _saved(workdir, step)
    for data in _data_files(workdir, step)[::-1]:
        original = data.read_bytes()
        for offset in range(len(original) // 2, len(original)):
            changed = bytearray(original)
            changed[offset] ^= 0x01
            data.write_bytes(bytes(changed))
            try:
                got = _saved(workdir, step)
            except Exception:  # noqa: BLE001 -- that byte broke the format: try the next
                continue
            if not all(jax.tree.leaves(jax.tree.map(np.array_equal, got, want))):
                return
        data.write_bytes(original)
    raise AssertionError("no byte changes the restored numbers")


# What the warning says was wrong (orbax's metadata is read from the same OCDBT database as the
# arrays: a data file cut short also leaves the metadata listing no arrays).
UNREADABLE = "a file of it is missing, cut short or garbled"
DAMAGE = {
    "truncated data file": (_damage_truncate, UNREADABLE),
    "deleted data file": (_damage_delete, UNREADABLE),
    "garbage metadata": (_damage_metadata, UNREADABLE),
    "garbage step metadata": (_damage_step_metadata, "_CHECKPOINT_METADATA cannot be read"),
    "missing manifest": (_damage_manifest, UNREADABLE),
    "flipped byte": (_damage_flip, "does not match the checksum saved with it"),
}


@pytest.mark.parametrize("how", DAMAGE)
def test_a_damaged_latest_checkpoint_is_moved_aside_and_training_resumes(
    tmp_path, trained, caplog, how
):
    workdir = _copy(trained, tmp_path)
    damage, why = DAMAGE[how]
    damage(workdir, 6)
    # read only (eval, predict, export): the newest intact one, the damaged one left in place
    with caplog.at_level(logging.WARNING):
        step, state = loop.restore(str(workdir), _state())
    assert step == 4
    assert (workdir / "checkpoints" / "6").is_dir()
    warning = next(r.getMessage() for r in caplog.records if " is damaged: " in r.getMessage())
    assert warning.startswith(f"the checkpoint of step 6 in {workdir / 'checkpoints'} is damaged")
    assert why in warning and "left in place, trying step 4" in warning
    with pytest.raises(SystemExit) as stopped, cli.one_line_errors():
        loop.restore(str(workdir), _state(), step=6)  # asked for by step: an error
    assert stopped.value.code.startswith("workdir error: the checkpoint of step 6 in ")
    assert why in stopped.value.code and "\n" not in stopped.value.code
    # training: moved to 6.damaged, resumed from 4, the same result as never damaged
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        fit(workdir)
    warning = next(r.getMessage() for r in caplog.records if " is damaged: " in r.getMessage())
    assert why in warning and "moved it to" in warning and "6.damaged" in warning, warning
    assert (workdir / "checkpoints" / "6.damaged").is_dir()
    assert _steps(workdir) == [2, 4, 6]
    for got, want in zip(
        jax.tree.leaves(_saved(workdir, 6)), jax.tree.leaves(_saved(trained, 6)), strict=True
    ):
        np.testing.assert_array_equal(got, want)  # bitwise


def test_a_stray_empty_step_folder_is_damage_not_another_model(tmp_path, trained, caplog):
    workdir = _copy(trained, tmp_path)
    (workdir / "checkpoints" / "99").mkdir()
    with caplog.at_level(logging.WARNING):
        history = fit(workdir, steps=8)
    assert history["train_loss"][-1][0] == 8
    warning = next(r.getMessage() for r in caplog.records if " is damaged: " in r.getMessage())
    assert "step 99" in warning and "no 'default' folder" in warning, warning
    assert (workdir / "checkpoints" / "99.damaged").is_dir()
    assert _steps(workdir) == [4, 6, 8]


def test_every_checkpoint_damaged_starts_afresh_or_is_an_error_to_evaluate(tmp_path, trained):
    workdir = _copy(trained, tmp_path)
    for step in (2, 4, 6):
        _damage_delete(workdir, step)
    with pytest.raises(SystemExit) as stopped, cli.one_line_errors():
        loop.restore(str(workdir), _state())
    assert stopped.value.code.startswith("workdir error: every checkpoint in ")
    fit(workdir)
    assert _steps(workdir) == [2, 4, 6]
    assert {p.name for p in (workdir / "checkpoints").glob("*.damaged")} == {
        "2.damaged", "4.damaged", "6.damaged"
    }  # fmt: skip


def test_a_checkpoint_of_another_model_is_still_a_config_error(tmp_path, trained):
    workdir = _copy(trained, tmp_path)
    other = _state()
    other["params"]["w"] = jnp.zeros((FEATURES, CLASSES + 1))
    with pytest.raises(SystemExit) as stopped, cli.one_line_errors():
        loop.restore(str(workdir), other)
    assert "written for a different model or optimizer" in stopped.value.code
    assert _steps(workdir) == [2, 4, 6]  # nothing moved


def test_nan_in_a_restored_checkpoint_is_damage_and_never_called_intact(tmp_path, trained):
    """A checkpoint holding NaN (no save writes one: changed after saving, its checksum
    removed) is damage: never resumed from, and never named as the intact one."""
    workdir = _copy(trained, tmp_path)
    step_dir = workdir / "checkpoints" / "6"
    saved = _saved(workdir, 6)
    saved["state"]["params"]["b"] = np.full_like(saved["state"]["params"]["b"], np.nan)
    (step_dir / "default").rename(tmp_path / "old")
    ocp.StandardCheckpointer().save(step_dir / "default", saved)
    ocp.StandardCheckpointer().close()
    meta = json.loads((step_dir / "_CHECKPOINT_METADATA").read_text())
    meta["custom_metadata"] = {}
    (step_dir / "_CHECKPOINT_METADATA").write_text(json.dumps(meta))
    with pytest.raises(loop.NonFiniteError) as stopped:

        def nan_batches(start_step):
            assert start_step == 4  # resumed from the intact one
            for step, batch in enumerate(_train_batches(start_step), start_step + 1):
                yield dict(batch, image=batch["image"] * (np.nan if step == 5 else 1))

        fit(workdir, train_batches=nan_batches)
    assert "the last good checkpoint, step 4 " in str(stopped.value)
    assert (workdir / "checkpoints" / "6.damaged").is_dir()


def test_checksums_are_per_array_and_cover_keys():
    tree = dict(a=jnp.arange(3.0), k=jax.random.key(1), h=jnp.ones(2, jnp.bfloat16))
    sums = loop.checksums(tree)
    assert set(sums) == {"a", "k", "h"} and all(set(v) == {""} for v in sums.values())
    assert loop.checksum_mismatch(sums, tree) is None
    changed = dict(tree, a=jnp.array([0.0, 1.0, 2.0000002]))
    assert "'a' does not match" in loop.checksum_mismatch(sums, changed)


# ----------------------------------------------------------------------------- a full disk


def test_a_save_that_fails_for_lack_of_space_is_one_line(tmp_path, monkeypatch):
    workdir = tmp_path / "run"
    fit(workdir, steps=4)
    original = ocp.CheckpointManager.save

    def save(self, step, *args, **kwargs):
        if step == 6:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    with pytest.raises(SystemExit) as stopped, cli.one_line_errors():
        fit(workdir, steps=8)
    assert stopped.value.code == (
        "workdir error: no space left on device while saving the checkpoint of step 6 in "
        f"{workdir / 'checkpoints'}; the previous checkpoint (step 4) is intact; free some "
        "space and rerun to resume from it"
    )
    monkeypatch.setattr(ocp.CheckpointManager, "save", original)
    assert _steps(workdir) == [2, 4]
    fit(workdir, steps=8)
    assert _steps(workdir) == [4, 6, 8]


def _tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    if os.geteuid() != 0:
        return False
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    return result.returncode == 0


def test_a_full_disk_in_the_background_write_is_one_line(tmp_path, monkeypatch):
    """A real full device (a small tmpfs, as root), else ENOSPC injected into orbax's
    background write."""
    disk = tmp_path / "disk"
    mounted = _tmpfs(disk, "600k")
    workdir = disk / "run"
    try:
        fit(workdir, steps=2)
        if mounted:  # filled up, but for a few kB: the config and events fit, not a checkpoint
            filler = disk / "filler"
            fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
            try:
                with pytest.raises(OSError) as full:
                    while True:
                        os.write(fd, b"\0" * 4096)
                assert full.value.errno == errno.ENOSPC
                os.ftruncate(fd, os.fstat(fd).st_size - 12 * 1024)
            finally:
                os.close(fd)
        else:
            from orbax.checkpoint._src.path import atomicity

            async def finalize(self):
                raise OSError(errno.ENOSPC, "No space left on device")

            monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", finalize)
        with pytest.raises(SystemExit) as stopped, cli.one_line_errors():
            fit(workdir, steps=4)
        line = stopped.value.code
        assert line.startswith("workdir error: no space left on device while "), line
        assert "\n" not in line
        assert "the previous checkpoint (step 2) is intact" in line, line
        assert _steps(workdir) == [2]
        assert np.isfinite(_saved(workdir, 2)["state"]["params"]["w"]).all()
        if mounted:
            filler.unlink()
        monkeypatch.undo()
        fit(workdir, steps=4)  # space again: resumes
        assert _steps(workdir) == [2, 4]
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(disk)], check=False)


# ----------------------------------------------------------------------------- paths


def test_workdir_paths_urls_home_and_empty(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert str(config_cli.workdir_path("~/x")) == str(tmp_path / "x")
    assert str(config_cli.workdir_path("gs://bucket/run")) == "gs://bucket/run"
    assert str(config_cli.workdir_path("gs://bucket/run") / "checkpoints") == (
        "gs://bucket/run/checkpoints"
    )
    assert str(config_cli.workdir_path(f"file://{tmp_path}/a b")) == f"{tmp_path}/a b"
    assert str(config_cli.workdir_path("file:///x%20y")) == "/x y"
    monkeypatch.chdir(tmp_path)
    assert str(config_cli.workdir_path("rel")) == str(tmp_path / "rel")
    with pytest.raises(ValueError, match="--workdir is empty"):
        config_cli.workdir_path("")
    assert config_cli.workdir_problem("").startswith("--workdir is empty")
    assert config_cli.workdir_problem("  ").startswith("--workdir is empty")
    assert config_cli.workdir_problem("gs://bucket/run") is None  # not checked: no network
    (tmp_path / "file").write_text("")
    assert config_cli.workdir_problem("~/file") == "~/file is a file, not a directory"
    assert config_cli.workdir_problem(f"file://{tmp_path}/file").endswith(
        "is a file, not a directory"
    )


def test_a_home_workdir_is_expanded_everywhere(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    fit("~/run")
    assert _steps(tmp_path / "home" / "run") == [2, 4, 6]
    assert (tmp_path / "home" / "run" / "config.py").is_file()
    assert not (tmp_path / "~").exists()
    assert loop.restore("~/run", _state())[0] == 6


def test_a_file_url_workdir_trains_end_to_end(tmp_path):
    fit(f"file://{tmp_path}/run")
    assert _steps(tmp_path / "run") == [2, 4, 6]
    assert list((tmp_path / "run").glob("events.out.tfevents.*"))
    assert loop.restore(f"file://{tmp_path}/run", _state())[0] == 6
    assert not Path("file:").exists()


def test_a_remote_workdir_reaches_orbax_and_the_writers_untouched(tmp_path, monkeypatch):
    """No network here: the run stops at the first thing that touches ``gs://``, and the path
    it was given is the URL itself (not ``./gs:/bucket/run``)."""
    seen = []

    def manager(workdir):
        seen.append(str(workdir))
        raise RuntimeError("stop: no network")

    monkeypatch.setattr(loop, "_checkpoint_manager", manager)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RuntimeError, match="stop: no network"):
        fit("gs://bucket/run")
    assert seen == ["gs://bucket/run"]
    assert not (tmp_path / "gs:").exists()


def test_an_empty_workdir_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stopped, cli.one_line_errors():
        fit("")
    assert stopped.value.code.startswith("workdir error: --workdir is empty")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("seed", 2**64, "seed must be an int <= 4294967295"),
        ("num_train_steps", 2**31, "num_train_steps must be an int <= 2147483647"),
        ("num_train_steps", 2**70, "num_train_steps must be an int <= 2147483647"),
    ],
)
def test_seeds_and_step_counts_beyond_what_jax_counts_are_refused(key, value, message):
    config = _config()
    config[key] = value
    with pytest.raises(config_errors.ConfigError, match=message):
        loop.check_config(config, model_check=lambda model: None)


def test_a_config_that_is_not_a_configdict_is_refused():
    with pytest.raises(
        config_errors.ConfigError, match="must be an ml_collections.ConfigDict, got a dict"
    ):
        loop.check_config(_config().to_dict(), model_check=lambda model: None)


def test_each_log_step_is_one_console_line_with_progress(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        fit(tmp_path)
    lines = [r.getMessage() for r in caplog.records]
    for step in (2, 4, 6):
        (line,) = [x for x in lines if x.startswith(f"step {step}/6 (")]
        assert f"({100 * step / 6:.0f}%, ETA " in line and " steps/s): " in line, line
        assert "train_loss=" in line and "uptime" not in line, line
    assert [x for x in lines if x.startswith("step 6/6: eval_")], lines  # the evaluation's line
    assert not [x for x in lines if "Setting work unit notes" in x or x.startswith("[2]")]


def test_console_line_formats_durations_and_numbers():
    progress = dict(steps_per_sec=2.0, uptime=1.0)
    line = loop.console_line(7, 7207, dict(train_loss=0.123456, nonfinite_count=0.0), progress)
    assert line == "step 7/7207 (0%, ETA 1h00m, 2.0 steps/s): train_loss=0.1235, nonfinite_count=0"
    assert loop.console_line(10, 20, dict(eval_accuracy=1.0), None) == (
        "step 10/20: eval_accuracy=1"
    )
    assert "ETA 3m05s" in loop.console_line(0, 185, {}, dict(steps_per_sec=1.0))
    assert "ETA 12s" in loop.console_line(0, 12, {}, dict(steps_per_sec=1.0))
