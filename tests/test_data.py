"""Tests of plugins.data: the offline digits builder and the deterministic input pipelines."""

from __future__ import annotations

import contextlib
import itertools
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from sklearn.datasets import load_digits

from plugins import config_errors, data, digits

N_TRAIN, N_TEST = 1438, 359


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    """A data_dir with digits prepared once for the module."""
    path = str(tmp_path_factory.mktemp("tfds"))
    tfds.builder("digits", data_dir=path).download_and_prepare()
    return path


def ids(images: np.ndarray) -> list[bytes]:
    """Identifies digits examples by their pixels (all 1797 images are distinct)."""
    pixels = np.round(np.asarray(images) * 255).astype(np.uint8)
    return [p.tobytes() for p in pixels]


def take(iterator, count: int) -> list[dict]:
    batches = list(itertools.islice(iterator, count))
    if hasattr(iterator, "close"):
        iterator.close()
    return batches


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


# ------------------------------------------------------------------------------- the builder


def test_builder_through_tfds_builder_and_load(data_dir):
    builder = tfds.builder("digits", data_dir=data_dir)
    assert builder.version == digits.Digits.VERSION
    assert builder.info.splits["train"].num_examples == N_TRAIN
    assert builder.info.splits["test"].num_examples == N_TEST
    assert builder.info.features["label"].num_classes == 10
    assert builder.info.citation and builder.info.description

    train = tfds.as_numpy(tfds.load("digits", split="train", data_dir=data_dir, batch_size=-1))
    test = tfds.as_numpy(tfds.load("digits", split="test", data_dir=data_dir, batch_size=-1))
    assert train["image"].shape == (N_TRAIN, 8, 8, 1) and train["image"].dtype == np.uint8
    assert len(test["label"]) == N_TEST and N_TRAIN + N_TEST == 1797
    assert train["image"].max() == 255 and train["image"].min() == 0
    assert set(np.unique(train["label"])) == set(range(10))
    assert set(np.unique(test["label"])) == set(range(10))


def test_split_is_fixed_stratified_and_matches_sklearn(data_dir):
    bunch = load_digits()
    indices = digits.split_indices(bunch.target)
    again = digits.split_indices(bunch.target)
    for name in ("train", "test"):
        np.testing.assert_array_equal(indices[name], again[name])
    assert len(indices["train"]) == N_TRAIN and len(indices["test"]) == N_TEST
    assert not set(indices["train"]) & set(indices["test"])
    for label in range(10):  # Stratified: every class is ~20% test.
        count = np.sum(bunch.target == label)
        assert np.sum(bunch.target[indices["test"]] == label) == round(0.2 * count)

    # The prepared split holds exactly those sklearn examples, pixels scaled by 255/16.
    for name in ("train", "test"):
        split = data.load_split("digits", name, data_dir=data_dir)
        expected = np.round(bunch.images[indices[name]] * 255 / 16).astype(np.uint8)[..., None]
        by_pixels = {
            img.tobytes(): int(lab)
            for img, lab in zip(expected, bunch.target[indices[name]], strict=True)
        }
        got = {
            img.tobytes(): int(lab) for img, lab in zip(split["image"], split["label"], strict=True)
        }
        assert got == by_pixels


def test_preparation_is_deterministic(data_dir, tmp_path):
    other = data.load_split("digits", "train", data_dir=str(tmp_path))
    mine = data.load_split("digits", "train", data_dir=data_dir)
    np.testing.assert_array_equal(other["image"], mine["image"])
    np.testing.assert_array_equal(other["label"], mine["label"])
    assert data.num_examples("digits", "test", data_dir=data_dir) == N_TEST


# ------------------------------------------------------------------------------ train batches


def train(data_dir, count, **kwargs):
    kwargs = {"batch_size": 128, "seed": 0, "process_index": 0, "process_count": 1} | kwargs
    return take(data.train_iterator("digits", data_dir=data_dir, **kwargs), count)


def test_train_batches_shape_dtype_range(data_dir):
    for batch in train(data_dir, 3):
        assert set(batch) == {"image", "label"}
        assert batch["image"].shape == (128, 8, 8, 1) and batch["image"].dtype == np.float32
        assert batch["label"].shape == (128,) and batch["label"].dtype == np.int32
        assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
        assert batch["image"].max() == 1.0
        assert 0 <= batch["label"].min() and batch["label"].max() <= 9


@pytest.mark.parametrize("mock", ["digits", "mnist", "cifar10"])
def test_example_batch_is_typed_like_the_iterators(data_dir, mock, tmp_path):
    def typed(batch):
        return {k: (v.shape, v.dtype) for k, v in batch.items()}

    if mock == "digits":
        name, where, shape = "digits", data_dir, (8, 8, 1)
        context = contextlib.nullcontext()
    else:
        name, where = mock, str(tmp_path)
        shape = tuple(tfds.builder(name, data_dir=where).info.features["image"].shape)
        context = tfds.testing.mock_data(num_examples=64, data_dir=where)
    with context:
        first = take(data.train_iterator(name, batch_size=16, seed=0, data_dir=where), 1)[0]
        last = list(data.eval_iterator(name, batch_size=48, split="test", data_dir=where))[-1]
    assert typed(data.example_batch(shape, 16)) == typed(first)
    assert typed(data.example_batch(shape, 48, train=False)) == typed(last)


def test_default_processes_come_from_jax(data_dir):
    explicit = train(data_dir, 2)
    default = take(data.train_iterator("digits", batch_size=128, seed=0, data_dir=data_dir), 2)
    assert_same_batches(explicit, default)


def test_same_seed_same_batches_other_seed_other_batches(data_dir):
    assert_same_batches(train(data_dir, 4), train(data_dir, 4))
    assert_same_batches(train(data_dir, 4, prefetch=0), train(data_dir, 4))
    a, b = train(data_dir, 1)[0], train(data_dir, 1, seed=1)[0]
    assert ids(a["image"]) != ids(b["image"])


def test_each_epoch_is_a_new_permutation_without_repeats(data_dir):
    steps = N_TRAIN // 128
    assert data.steps_per_epoch("digits", batch_size=128, data_dir=data_dir, process_count=1) == 11
    batches = train(data_dir, 2 * steps)
    epochs = [
        [i for b in batches[e * steps : (e + 1) * steps] for i in ids(b["image"])] for e in range(2)
    ]
    for epoch in epochs:
        assert len(epoch) == len(set(epoch)) == steps * 128  # No example twice in an epoch.
    assert epochs[0] != epochs[1]  # Reshuffled...
    assert len(set(epochs[0]) & set(epochs[1])) > 0.8 * steps * 128  # ...over the same split.


@pytest.mark.parametrize("start_step", [1, 10, 11, 12, 25])  # 11 steps per epoch.
def test_resume_yields_the_batches_of_an_uninterrupted_run(data_dir, start_step):
    uninterrupted = train(data_dir, start_step + 4)
    resumed = train(data_dir, 4, start_step=start_step)
    assert_same_batches(uninterrupted[start_step:], resumed)


def test_resume_with_two_processes(data_dir):
    for p in (0, 1):
        kw = {"batch_size": 32, "process_index": p, "process_count": 2}
        assert_same_batches(train(data_dir, 30, **kw)[24:], train(data_dir, 6, start_step=24, **kw))


@pytest.mark.parametrize("chunk_bytes", [1, 3 * 32 * 64 * 4])  # One batch, or 3 of 32 examples.
def test_batches_do_not_depend_on_how_many_are_cut_at_once(data_dir, monkeypatch, chunk_bytes):
    """The default cuts a whole digits epoch at once; smaller chunks give the same batches
    (resumed mid-chunk, across epochs, on either of two processes), as fresh writable arrays."""
    kw = {"batch_size": 32, "process_count": 2, "prefetch": 0}
    whole_epoch = {p: train(data_dir, 40, process_index=p, **kw) for p in (0, 1)}
    monkeypatch.setattr(data, "_CHUNK_BYTES", chunk_bytes)
    for p in (0, 1):
        assert_same_batches(train(data_dir, 40, process_index=p, **kw), whole_epoch[p])
        assert_same_batches(
            train(data_dir, 14, process_index=p, start_step=26, **kw), whole_epoch[p][26:]
        )
    first, second = train(data_dir, 2, **kw)
    kept = second["image"].copy()
    first["image"][:] = -1.0  # A batch edited in place leaves the others alone.
    np.testing.assert_array_equal(second["image"], kept)


def test_processes_get_disjoint_examples_covering_each_epoch(data_dir):
    batch, steps = 64, N_TRAIN // 128  # 2 processes x 64 = 128 per global batch.
    per_process = [
        train(data_dir, 2 * steps, batch_size=batch, process_index=p, process_count=2)
        for p in (0, 1)
    ]
    everything = set(ids(data.load_split("digits", "train", data_dir=data_dir)["image"] / 255))
    for e in range(2):
        seen = [
            [i for b in per_process[p][e * steps : (e + 1) * steps] for i in ids(b["image"])]
            for p in (0, 1)
        ]
        assert len(set(seen[0])) == len(seen[0]) == steps * batch
        assert not set(seen[0]) & set(seen[1])
        union = set(seen[0]) | set(seen[1])
        assert union <= everything and len(everything - union) == N_TRAIN % 128

    # The global batch (process batches concatenated in order) does not depend on the topology.
    single = train(data_dir, 2 * steps, batch_size=128)
    for step in range(2 * steps):
        glued = np.concatenate([per_process[p][step]["image"] for p in (0, 1)])
        np.testing.assert_array_equal(glued, single[step]["image"])


# ------------------------------------------------------------------------------- eval batches


@pytest.mark.parametrize(
    "process_count,batch_size", [(1, 128), (2, 128), (3, 32), (2, 500), (2, 179), (3, 119)]
)
def test_eval_sees_every_example_once_with_equal_batch_counts(data_dir, process_count, batch_size):
    runs = [
        list(
            data.eval_iterator(
                "digits",
                batch_size=batch_size,
                data_dir=data_dir,
                process_index=p,
                process_count=process_count,
            )
        )
        for p in range(process_count)
    ]
    expected = data.num_eval_batches(N_TEST, batch_size=batch_size, process_count=process_count)
    assert [len(r) for r in runs] == [expected] * process_count
    seen, masked = [], 0
    for batches in runs:
        for b in batches:
            assert b["image"].shape == (batch_size, 8, 8, 1) and b["image"].dtype == np.float32
            assert b["label"].dtype == np.int32 and b["mask"].dtype == bool
            assert b["mask"].shape == (batch_size,)
            seen += ids(b["image"][b["mask"]])
            masked += int(b["mask"].sum())
            assert not b["image"][~b["mask"]].any()  # Padding is zeros.
    assert masked == N_TEST
    test_split = data.load_split("digits", "test", data_dir=data_dir)
    assert sorted(seen) == sorted(ids(test_split["image"] / 255))


def test_eval_batches_follow_split_order(data_dir):
    split = data.load_split("digits", "test", data_dir=data_dir)
    batches = list(data.eval_iterator("digits", batch_size=100, data_dir=data_dir))
    labels = np.concatenate([b["label"][b["mask"]] for b in batches])
    np.testing.assert_array_equal(labels, split["label"])
    assert [int(b["mask"].sum()) for b in batches] == [100, 100, 100, 59]


# ------------------------------------------------------------------- other datasets (mocked)


@pytest.mark.parametrize("name,shape", [("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))])
def test_mock_tfds_datasets(tmp_path, name, shape):
    with tfds.testing.mock_data(num_examples=40):
        batches = take(
            data.train_iterator(
                name,
                batch_size=16,
                seed=0,
                data_dir=str(tmp_path),
                process_index=0,
                process_count=1,
            ),
            4,  # 2 per epoch: crosses an epoch.
        )
        evals = list(data.eval_iterator(name, batch_size=16, data_dir=str(tmp_path)))
        assert data.num_examples(name, "train", data_dir=str(tmp_path)) == 40
    for b in batches:
        assert b["image"].shape == (16, *shape) and b["image"].dtype == np.float32
        assert b["label"].shape == (16,) and b["label"].dtype == np.int32
        assert 0 <= b["image"].min() and b["image"].max() <= 1
    assert len(evals) == 3 and sum(int(b["mask"].sum()) for b in evals) == 40
    assert evals[0]["image"].shape == (16, *shape)


def test_prepared_splits_are_cached_read_only_but_mock_data_is_not(data_dir, tmp_path):
    first = data.load_split("digits", "test", data_dir=data_dir)
    assert data.load_split("digits", "test", data_dir=data_dir) is first
    assert not first["image"].flags.writeable and not first["label"].flags.writeable
    data.clear_cache()
    assert data.load_split("digits", "test", data_dir=data_dir) is not first

    for count in (20, 30):  # Same name and data_dir, different mocks: never a stale cache hit.
        with tfds.testing.mock_data(num_examples=count):
            assert data.num_examples("mnist", "test", data_dir=str(tmp_path)) == count


# --------------------------------------------------------------------------------------- errors


def test_unknown_dataset_suggests_the_nearest(data_dir):
    with pytest.raises(config_errors.ConfigError, match=r"unknown dataset 'digitz'.*'digits'"):
        data.train_iterator("digitz", batch_size=8, seed=0, data_dir=data_dir)
    with pytest.raises(ValueError, match="unknown dataset"):
        data.eval_iterator("no_such_dataset_at_all", batch_size=8, data_dir=data_dir)


_WITHOUT_TFDS = """
import sys

sys.modules["tensorflow_datasets"] = None  # importing it now raises ImportError
from plugins import data

batch = data.example_batch((8, 8, 1), 4)
print(sorted(batch), batch["image"].shape)
try:
    data.train_iterator("digits", batch_size=8, seed=0)
except ImportError as error:
    print(error)
"""


def test_imports_without_tensorflow_datasets_and_says_what_reading_needs():
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TFDS], capture_output=True, text=True, check=True
    )
    keys, error = result.stdout.strip().splitlines()
    assert keys == "['image', 'label'] (4, 8, 8, 1)"
    assert error.startswith("reading dataset 'digits' needs tensorflow-datasets")


def test_unknown_split(data_dir):
    with pytest.raises(ValueError, match=r"unknown split 'tset'.*did you mean 'test'"):
        data.eval_iterator("digits", batch_size=8, split="tset", data_dir=data_dir)


@pytest.mark.parametrize("batch_size", [0, -1, 2.5])
def test_bad_batch_size(data_dir, batch_size):
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        data.train_iterator("digits", batch_size=batch_size, seed=0, data_dir=data_dir)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        data.eval_iterator("digits", batch_size=batch_size, data_dir=data_dir)


def test_split_smaller_than_one_batch_per_process(data_dir):
    with pytest.raises(ValueError, match="719 per process: fewer than one batch of 1000"):
        data.train_iterator(
            "digits", batch_size=1000, seed=0, data_dir=data_dir, process_index=0, process_count=2
        )


def test_bad_process_index_and_start_step(data_dir):
    with pytest.raises(ValueError, match="process_index=2"):
        data.eval_iterator(
            "digits", batch_size=8, data_dir=data_dir, process_index=2, process_count=2
        )
    with pytest.raises(ValueError, match="start_step"):
        data.train_iterator("digits", batch_size=8, seed=0, data_dir=data_dir, start_step=-1)


# ------------------------------------------------------------------------------------ prefetch


def test_prefetch_passes_items_and_errors_and_stops():
    def source():
        yield from range(5)
        raise RuntimeError("boom")

    it = data.Prefetch(source(), size=2)
    assert [next(it) for _ in range(5)] == list(range(5))
    with pytest.raises(RuntimeError, match="boom"):
        next(it)
    with pytest.raises(StopIteration):
        next(it)

    endless = data.Prefetch(itertools.count(), size=2)
    assert next(endless) == 0 and next(endless) == 1
    endless.close()
    endless._thread.join(timeout=2)
    assert not endless._thread.is_alive()
    with pytest.raises(StopIteration):
        next(endless)


def test_a_dataset_that_cannot_be_downloaded_is_one_clear_error(tmp_path, monkeypatch):
    # What MNIST does without network, after tfds' own retries: a ConnectionError (an OSError).
    def offline(self, *args, **kwargs):
        raise ConnectionError("Max retries exceeded with url: https://storage.googleapis.com/...")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", offline)
    # The download host answers the one-attempt probe (this machine may have no network):
    # tfds' own download is what fails here.
    monkeypatch.setattr(data, "_network_problem", lambda host, timeout=10.0: None)
    with pytest.raises(data.DatasetUnavailable) as raised:
        data.load_split("mnist", "train", data_dir=str(tmp_path))
    message = str(raised.value)
    assert message.startswith(f"cannot prepare dataset 'mnist' in {tmp_path}")
    assert "ConnectionError: Max retries exceeded" in message and "needs network" in message
    assert "\n" not in message


# ------------------------------------------------------------- checks before a run (issue 25)


@pytest.mark.parametrize(
    "name, message",
    [
        (
            "digits:9.9.9",
            "dataset 'digits:9.9.9': 'digits' has no version 9.9.9 (its versions: 1.0.0)",
        ),
        ("digits/foo", "dataset 'digits/foo': 'digits' has no config 'foo' (it has no configs)"),
        ("mnist:x", "dataset 'mnist:x': 'x' is not a version (name:MAJOR.MINOR.PATCH"),
    ],
)
def test_a_version_or_config_that_does_not_exist_is_named(name, message, tmp_path):
    with pytest.raises(config_errors.ConfigError) as info:
        data.builder(name, str(tmp_path))
    assert str(info.value).startswith(message), info.value


def test_check_dataset_names_a_missing_split_and_a_batch_bigger_than_the_split(data_dir):
    with pytest.raises(config_errors.ConfigError, match="split 'validation'"):
        data.check_dataset("digits", data_dir=data_dir, eval_split="validation")
    with pytest.raises(
        config_errors.ConfigError, match=f"batch_size=4000 is more than the {N_TRAIN}"
    ):
        data.check_dataset("digits", data_dir=data_dir, batch_size=4000)
    dataset = data.check_dataset("digits", data_dir=data_dir, batch_size=N_TRAIN)
    assert data.eval_batch_size_limit(dataset, "test", 8) == 360  # 359 rounded up to 8


def test_a_data_dir_that_is_a_file_or_cannot_be_written_is_a_data_error(tmp_path):
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(data.DatasetUnavailable, match=f"data_dir {file} is a file"):
        data.check_dataset("digits", data_dir=str(file))
    with pytest.raises(data.DatasetUnavailable, match="which cannot be written"):
        data.check_dataset("digits", data_dir="/proc/no-such-folder/tfds")


def test_no_network_is_one_attempt_and_writes_no_data(tmp_path, monkeypatch):
    attempts = []

    def offline(host, timeout=10.0):
        attempts.append(host)
        return f"{host} cannot be reached: gaierror"

    monkeypatch.setattr(data, "_network_problem", offline)
    monkeypatch.setattr(
        tfds.core.DatasetBuilder, "download_and_prepare", lambda *a, **k: pytest.fail("tried")
    )
    with pytest.raises(data.DatasetUnavailable, match="is not prepared in .* cannot be reached"):
        data.check_dataset("mnist", data_dir=str(tmp_path))
    assert len(attempts) == 1
    assert not list(tmp_path.rglob("*.tfrecord*"))


@pytest.mark.parametrize("damage", ["garbage_info", "empty_record", "truncated_record"])
def test_damaged_dataset_files_are_a_data_error(damage, data_dir, tmp_path):
    import shutil

    copy = tmp_path / "tfds"
    shutil.copytree(data_dir, copy)
    folder = next(p.parent for p in copy.rglob("dataset_info.json"))
    if damage == "garbage_info":
        (folder / "dataset_info.json").write_text("{garbage")
    else:
        record = next(folder.glob("*test.tfrecord*"))
        record.write_bytes(b"" if damage == "empty_record" else record.read_bytes()[:100])
    data.clear_cache()
    with pytest.raises(data.DatasetUnavailable, match=str(copy)):
        data.load_split("digits", "test", data_dir=str(copy))
