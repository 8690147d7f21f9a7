"""Deterministic, per-process, resumable input pipelines over tfds datasets.

Importing this module registers the offline ``digits`` tfds builder (see ``plugins.digits``).
It imports without tensorflow-datasets installed (building and compiling a model reads no data,
e.g. on an accelerator machine that has JAX but not TensorFlow); reading a dataset then raises
``ImportError``.

The pipelines read a split once into numpy arrays (``load_split``) and batch it with index
permutations, which is exact, cheap and fast for datasets that fit in memory (digits, mnist,
cifar10, ...):

- ``train_iterator`` shuffles the whole split by ``(seed, epoch)`` and cuts every epoch into global
  batches of ``batch_size * process_count`` examples; process ``p`` yields the ``p``-th slice of
  each global batch. So the processes see disjoint examples whose union is the epoch (less the
  remainder of ``n % global_batch``, dropped), and the global batch -- the concatenation of the
  process batches in process order, as ``jax.make_array_from_process_local_data`` builds it --
  depends only on ``seed`` and the global batch size, not on how many processes share it.
  ``start_step=k`` jumps straight to batch ``k``.
- ``eval_iterator`` gives process ``p`` a contiguous part of the split, pads the last batch and
  marks padding with ``mask=False``; every process yields the same number of batches.

Batches are dicts of numpy arrays: ``image`` float32 in [0, 1] ``(B, H, W, C)``, ``label`` int32
``(B,)``, and for evaluation ``mask`` bool ``(B,)``.
"""

from __future__ import annotations

import math
import os
import queue
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import numpy as np

from plugins import augment as augment_lib
from plugins import config_errors, tensorflow_setup

try:
    import tensorflow_datasets as tfds
except ImportError as error:  # see the module docstring
    tfds = None
    _TFDS_MISSING = error
else:
    from plugins import digits  # noqa: F401  (registers the ``digits`` builder)

__all__ = [
    "builder",
    "ensure_prepared",
    "check_dataset",
    "eval_batch_size_limit",
    "load_split",
    "num_examples",
    "steps_per_epoch",
    "train_iterator",
    "eval_iterator",
    "num_eval_batches",
    "example_batch",
    "Prefetch",
    "clear_cache",
]

Batch = dict[str, np.ndarray]

_CACHE_SIZE = 4
_cache: OrderedDict[tuple, dict[str, np.ndarray]] = OrderedDict()
_cache_lock = threading.Lock()


class DatasetUnavailable(RuntimeError):
    """A dataset that is not prepared locally and could not be downloaded and prepared."""


def builder(name: str, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
    """Returns the tfds builder of ``name`` (reads metadata, no data); an unknown name raises
    ``ConfigError``, a missing tensorflow-datasets ``ImportError``."""
    if tfds is None:
        raise ImportError(
            f"reading dataset {name!r} needs tensorflow-datasets and tensorflow "
            "(pip install tensorflow-datasets tensorflow-cpu)"
        ) from _TFDS_MISSING
    _check_data_dir(data_dir)
    base, config, version = _NAME.match(name).groups() if _NAME.match(name) else (name, None, None)
    try:
        cls = tfds.builder_cls(base)
    except Exception:  # noqa: BLE001 -- an unknown name: tfds.builder says so below
        cls = None
    if cls is not None:
        _check_version_and_config(name, cls, config, version)
    try:
        return tfds.builder(name, data_dir=data_dir)
    except tfds.core.DatasetNotFoundError:
        choices = tfds.list_builders(with_community_datasets=False)
        raise config_errors.unknown("dataset", "dataset", base, choices) from None
    except Exception as error:  # e.g. a garbage dataset_info.json in data_dir
        where = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
        raise DatasetUnavailable(
            f"cannot read the metadata of dataset {name!r} in {where} ({_brief(error)}); "
            "delete the dataset's folder there to prepare it again"
        ) from None


# ``name``, ``name/config``, ``name:version``, ``name/config:version``.
_NAME = re.compile(r"^([^/:]+)(?:/([^:]*))?(?::(.*))?$")
_VERSION = re.compile(r"^\d+\.(\d+|\*)\.(\d+|\*)$")


def _brief(error: BaseException, limit: int = 200) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())[:limit]}"


def _check_data_dir(data_dir: str | None) -> None:
    """A ``data_dir`` that is a file: ``DatasetUnavailable`` naming it (TensorFlow aborts the
    process on it)."""
    if data_dir and not _is_url(data_dir):
        path = os.path.abspath(os.path.expanduser(data_dir))
        if os.path.exists(path) and not os.path.isdir(path):
            raise DatasetUnavailable(f"data_dir {path} is a file, not a directory")


def _is_url(path: str) -> bool:
    return bool(re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", path))


def _check_version_and_config(name: str, cls: Any, config: str | None, version: str | None):
    """``ConfigError`` for a version or builder config the dataset does not have."""
    configs = [c.name for c in (getattr(cls, "BUILDER_CONFIGS", None) or [])]
    if config is not None and config not in configs:
        have = f"its configs: {', '.join(configs)}" if configs else "it has no configs"
        raise config_errors.ConfigError(
            f"dataset {name!r}: {cls.name!r} has no config {config!r} ({have})"
        )
    if version is None:
        return
    versions = {str(v) for v in [cls.VERSION, *getattr(cls, "SUPPORTED_VERSIONS", [])] if v}
    if not _VERSION.match(version):
        raise config_errors.ConfigError(
            f"dataset {name!r}: {version!r} is not a version (name:MAJOR.MINOR.PATCH, '*' "
            f"allowed, e.g. '{cls.name}:{cls.VERSION}'; its versions: "
            f"{', '.join(sorted(versions))})"
        )
    pattern = re.compile("^" + re.escape(version).replace(r"\*", r"\d+") + "$")
    if not any(pattern.match(v) for v in versions):
        raise config_errors.ConfigError(
            f"dataset {name!r}: {cls.name!r} has no version {version} "
            f"(its versions: {', '.join(sorted(versions))})"
        )


def _writable(path: str) -> bool:
    """Whether ``path`` (or, if it does not exist yet, its nearest existing parent) can be
    written."""
    path = os.path.abspath(os.path.expanduser(path))
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return os.access(path, os.W_OK)


def _download_host(dataset: Any) -> str | None:
    """The host the dataset's files come from, or None for a builder that downloads nothing
    (``digits``)."""
    import urllib.parse

    try:
        urls = list(dataset.url_infos or {})
    except Exception:  # noqa: BLE001 -- no checksums file: assume tfds' usual host
        urls = ["https://storage.googleapis.com/"]
    return urllib.parse.urlparse(urls[0]).hostname if urls else None


def _network_problem(host: str, timeout: float = 10.0) -> str | None:
    """One attempt to reach ``host`` (HTTPS): None, or why not."""
    import socket

    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError as error:
        return f"{host} cannot be reached: {type(error).__name__}: {error}"
    return None


def ensure_prepared(name: str, data_dir: str | None = None) -> Any:
    """The dataset's tfds builder, its data prepared: downloaded and prepared now if it is not
    yet, after one check that this can work (``data_dir`` writable, the download host reachable:
    one attempt, instead of tfds' minutes of retries). Raises ``DatasetUnavailable`` naming the
    folder when it cannot, ``ConfigError`` for an unknown name, version or config."""
    dataset = builder(name, data_dir)
    mocked = "mock" in getattr(type(dataset).download_and_prepare, "__name__", "")
    if mocked or dataset.is_prepared():
        return dataset
    where = os.fspath(dataset.data_dir)
    advice = (
        "tfds downloads it once, which needs network: run once where there is one, or set "
        "data_dir to a folder that holds a prepared copy"
    )
    try:
        unwritable = not _writable(where)
        # The data_dir itself (tfds writes the dataset's own folder): TensorFlow aborts the
        # process where it cannot create it.
        os.makedirs(getattr(dataset, "_data_dir_root", None) or where, exist_ok=True)
    except OSError:
        unwritable = True
    if unwritable:
        raise DatasetUnavailable(
            f"dataset {name!r} is not prepared in {where}, which cannot be written; set data_dir "
            "to a folder that holds a prepared copy or that can be written"
        )
    host = _download_host(dataset)
    problem = _network_problem(host) if host else None
    if problem:
        raise DatasetUnavailable(
            f"dataset {name!r} is not prepared in {where} and {problem}; {advice}"
        )
    tensorflow_setup.hide_accelerators()  # TensorFlow writes the files: keep it off the GPUs
    try:
        dataset.download_and_prepare()
    except Exception as error:  # tfds retries a download for minutes before it gives up
        raise DatasetUnavailable(
            f"cannot prepare dataset {name!r} in {where} ({_brief(error)}); {advice}"
        ) from error
    return dataset


def check_dataset(
    name: str,
    *,
    data_dir: str | None = None,
    train_split: str | None = "train",
    eval_split: str | None = "test",
    batch_size: int | None = None,
) -> Any:
    """The checks before a run compiles or writes anything: the dataset exists and is prepared
    (:func:`ensure_prepared`: downloaded now if need be), has the splits the run reads, an
    ``image`` and a ``label`` feature and at least ``batch_size`` training examples (see also
    :func:`eval_batch_size_limit`). Split sizes are checked where tfds' metadata has them (not under
    ``tfds.testing.mock_data``). Returns the builder; raises ``ConfigError`` naming the key or
    ``DatasetUnavailable`` naming the folder."""
    dataset = ensure_prepared(name, data_dir)
    features = dataset.info.features
    missing = [k for k in ("image", "label") if k not in features]
    if missing:
        raise config_errors.ConfigError(
            f"dataset {name!r} has no {' or '.join(map(repr, missing))} feature (its features: "
            f"{', '.join(sorted(features.keys()))}); this project trains image classifiers"
        )
    splits = dataset.info.splits
    if not splits:
        return dataset
    for split, key, size in ((train_split, "batch_size", batch_size), (eval_split, "", None)):
        if split is None:
            continue
        try:
            n = splits[split].num_examples
        except (KeyError, ValueError):
            raise config_errors.unknown(
                "split", f"dataset {name!r}", split, list(splits.keys())
            ) from None
        if size is None:
            continue
        if key == "batch_size" and size > n:
            raise config_errors.ConfigError(
                f"batch_size={size} is more than the {n} examples of split {split!r} of dataset "
                f"{name!r}"
            )
    return dataset


def eval_batch_size_limit(dataset: Any, split: str, device_count: int) -> int | None:
    """The evaluation split's size rounded up to a multiple of ``device_count``: a larger
    evaluation batch holds only padding beyond it (``eval_batch_size=10**9`` would allocate
    hundreds of GiB of zeros); None where tfds' metadata has no split sizes."""
    splits = dataset.info.splits
    if not splits:
        return None
    n = splits[split].num_examples
    return max(1, -(-n // device_count)) * device_count


def clear_cache() -> None:
    """Forgets the splits that ``load_split`` keeps in memory."""
    with _cache_lock:
        _cache.clear()


def load_split(name: str, split: str, *, data_dir: str | None = None) -> dict[str, np.ndarray]:
    """Reads a whole tfds split into memory, preparing the dataset first if needed.

    Args:
      name: tfds dataset name, optionally with config/version (``'digits'``, ``'mnist:3.*.*'``).
      split: a split name or tfds split expression (``'train'``, ``'train[:90%]'``).
      data_dir: tfds data directory (``None``: tfds' default, ``~/tensorflow_datasets``).

    Returns:
      ``{'image': array (N, H, W, C) as stored (usually uint8), 'label': int32 (N,)}`` in the
      split's deterministic tfds order. The arrays are read-only; splits of prepared datasets are
      cached in memory (a few at most), so repeated evaluation does not re-read files.

    Raises:
      ValueError: unknown dataset or split, an empty split, or no ``image``/``label`` features.
      DatasetUnavailable: the dataset is not prepared and preparing it failed (no network).
    """
    # Keyed by the arguments (and tfds' default-dir variable), so that a hit skips even
    # tfds.builder, which re-reads the dataset's metadata files.
    where = os.path.abspath(os.path.expanduser(data_dir)) if data_dir else None
    key = (name, split, where, os.environ.get("TFDS_DATA_DIR"))
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]

    dataset = ensure_prepared(name, data_dir)
    tensorflow_setup.hide_accelerators()  # TensorFlow reads the files: keep it off the GPUs
    splits = dataset.info.splits
    expected = None
    if splits:  # Empty before preparation and under tfds.testing.mock_data: accept any split.
        try:
            expected = splits[split].num_examples
        except (KeyError, ValueError):
            raise config_errors.unknown(
                "split", f"dataset {name!r}", split, list(splits.keys())
            ) from None
    features = dataset.info.features
    missing = [k for k in ("image", "label") if k not in features]
    if missing:
        raise ValueError(
            f"dataset {name!r} has no {' or '.join(map(repr, missing))} feature; "
            f"its features are {sorted(features.keys())}"
        )

    try:
        ds = dataset.as_dataset(split=split, shuffle_files=False)
        ds = ds.map(lambda ex: {"image": ex["image"], "label": ex["label"]}).batch(8192)
        parts = list(tfds.as_numpy(ds))
    except Exception as error:  # a truncated or empty record file, ...
        if "tensorflow" not in type(error).__module__:
            raise
        raise DatasetUnavailable(
            f"cannot read split {split!r} of dataset {name!r} in {dataset.data_dir} "
            f"({_brief(error)}); its files are damaged: delete that folder to prepare it again"
        ) from None
    if not parts:
        raise ValueError(f"split {split!r} of dataset {name!r} is empty")
    data = {
        "image": np.concatenate([p["image"] for p in parts]),
        "label": np.concatenate([p["label"] for p in parts]).astype(np.int32),
    }
    for array in data.values():
        array.setflags(write=False)
    # Cache only what tfds' own metadata vouches for: never mock data (tfds.testing.mock_data
    # leaves info.splits empty or with counts that do not match what it generates).
    if expected == len(data["label"]):
        with _cache_lock:
            _cache[key] = data
            while len(_cache) > _CACHE_SIZE:
                _cache.popitem(last=False)
    return data


def num_examples(name: str, split: str = "train", *, data_dir: str | None = None) -> int:
    """Returns the number of examples in ``split``, counted from the data actually read."""
    return len(load_split(name, split, data_dir=data_dir)["label"])


def _processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    """Fills in ``jax.process_index()``/``jax.process_count()`` and checks the pair."""
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index={process_index} must be in [0, process_count={process_count})"
        )
    return int(process_index), int(process_count)


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


# XLA's CPU client uses a host array's memory as it is, without a copy, when the array starts at a
# multiple of 64 bytes: batches cut into such memory are placed for free on CPU devices.
_ALIGN = 64


def _aligned_empty(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts at a multiple of ``_ALIGN`` bytes."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + _ALIGN, np.uint8)
    start = -raw.ctypes.data % _ALIGN
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def _to_float(images: np.ndarray) -> np.ndarray:
    """Integer images scaled to float32 [0, 1]; float images as float32 (aligned, one pass)."""
    out = _aligned_empty(images.shape, np.float32)
    if np.issubdtype(images.dtype, np.integer):
        scale = np.float32(1.0 / np.iinfo(images.dtype).max)
        np.multiply(images, scale, out=out, dtype=np.float32)
    else:
        out[...] = images
    return out


def _global_steps_per_epoch(n: int, batch_size: int, process_count: int, name: str, split: str):
    global_batch = batch_size * process_count
    if n < global_batch:
        raise ValueError(
            f"split {split!r} of dataset {name!r} has {n} examples, {n // process_count} per "
            f"process: fewer than one batch of {batch_size} (over {process_count} process(es))"
        )
    return n // global_batch


def steps_per_epoch(
    name: str,
    *,
    batch_size: int,
    split: str = "train",
    data_dir: str | None = None,
    process_count: int | None = None,
) -> int:
    """Returns the number of ``train_iterator`` batches per epoch (the remainder is dropped)."""
    _check_batch_size(batch_size)
    _, process_count = _processes(0, process_count)
    n = num_examples(name, split, data_dir=data_dir)
    return _global_steps_per_epoch(n, batch_size, process_count, name, split)


def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([int(seed) & 0xFFFFFFFFFFFFFFFF, epoch]).permutation(n)


# Float32 bytes of training images cut and converted at once: a whole epoch of small images (the
# per-batch Python work then disappears), a few batches of large ones (bounded memory).
_CHUNK_BYTES = 4 << 20


def _train_batches(
    data: dict[str, np.ndarray],
    *,
    batch_size: int,
    seed: int,
    start_step: int,
    process_index: int,
    process_count: int,
    steps: int,
    pipeline: augment_lib.Pipeline | None = None,
) -> Iterator[Batch]:
    """This process's batches: for each chunk of consecutive steps, one gather and one float
    conversion of all their examples, then one view of the chunk per batch."""
    images, labels = data["image"], data["label"]
    n = len(labels)
    per_chunk = max(1, _CHUNK_BYTES // (batch_size * max(1, images[0].size) * 4))
    epoch, step_in_epoch = divmod(start_step, steps)
    while True:
        # Row s: this process's slice of global batch s.
        rows = _permutation(seed, epoch, n)[: steps * batch_size * process_count]
        rows = rows.reshape(steps, process_count, batch_size)[:, process_index]
        for first in range(step_in_epoch, steps, per_chunk):
            idx = rows[first : first + per_chunk].ravel()
            chunk_images = _to_float(images[idx])
            chunk_labels = np.take(labels, idx, out=_aligned_empty(idx.shape, labels.dtype))
            for s, lo in enumerate(range(0, len(idx), batch_size), start=first):
                hi = lo + batch_size
                batch = {"image": chunk_images[lo:hi], "label": chunk_labels[lo:hi]}
                if pipeline:
                    batch = pipeline.train(
                        batch,
                        seed=seed,
                        step=epoch * steps + s,
                        process_index=process_index,
                        process_count=process_count,
                    )
                yield batch
        epoch, step_in_epoch = epoch + 1, 0


class _Done:
    """End-of-stream marker passed through the prefetch queue, carrying an error if any."""

    def __init__(self, error: BaseException | None = None):
        self.error = error


def _produce(source: Iterator[Any], q: queue.Queue, stop: threading.Event) -> None:
    """Prefetch thread body; references no iterator object so that one can be collected."""

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    try:
        for item in source:
            if not put(item):
                return
    except BaseException as e:  # noqa: BLE001 -- re-raised in the consumer.
        put(_Done(e))
    else:
        put(_Done())


class Prefetch(Iterator[Any]):
    """Iterates ``source`` in a daemon thread, ``size`` items ahead. ``close()`` stops it."""

    def __init__(self, source: Iterator[Any], size: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, size))
        self._stop = threading.Event()
        self._done: _Done | None = None
        self._thread = threading.Thread(
            target=_produce,
            args=(source, self._queue, self._stop),
            name="plugins.data.prefetch",
            daemon=True,
        )
        self._thread.start()

    def __next__(self) -> Any:
        if self._done is None:
            item = self._queue.get()
            if not isinstance(item, _Done):
                return item
            self._done = item
        if self._done.error is not None:
            error, self._done.error = self._done.error, None
            raise error
        raise StopIteration

    def close(self) -> None:
        """Stops the background thread (it exits within 0.1 s)."""
        self._stop.set()
        self._done = self._done or _Done()

    def __del__(self) -> None:
        self._stop.set()


def train_iterator(
    name: str,
    *,
    batch_size: int,
    seed: int,
    split: str = "train",
    data_dir: str | None = None,
    start_step: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    prefetch: int = 2,
    augment: Any = (),
    num_classes: int | None = None,
) -> Iterator[Batch]:
    """Returns an infinite iterator of shuffled training batches for this process.

    Each epoch is a permutation of the whole split drawn from ``(seed, epoch)``, cut into global
    batches of ``batch_size * process_count`` examples (the remainder is dropped); this process
    yields slice ``process_index`` of every global batch. The processes' examples are thus disjoint
    and together cover the epoch, and concatenating the process batches in process order gives
    the same global batches whatever the number of processes.

    Args:
      name: tfds dataset name (``'digits'``, ``'mnist'``, ``'cifar10'``, ...).
      batch_size: examples per batch on this process (the per-process batch).
      seed: shuffle seed; the same seed gives the same batches.
      split: tfds split or split expression.
      data_dir: tfds data directory.
      start_step: the first batch to yield: batches ``start_step, start_step + 1, ...`` of an
        iterator started at 0, computed directly (no replay) -- for resuming from a checkpoint.
      process_index: this process (default ``jax.process_index()``).
      process_count: number of processes (default ``jax.process_count()``).
      prefetch: batches prepared ahead in a background thread (0: none, batches made on demand).
      augment: ``plugins.augment`` ops (a config list or a ``Pipeline``) applied to every batch on
        the host (in the prefetch thread when there is one), their random draws seeded by
        ``(seed, step)``: ``start_step=k`` still gives exactly the batches ``k, k + 1, ...``.
      num_classes: the number of classes, needed by mixup/cutmix (soft ``target`` labels).

    Returns:
      An iterator of ``{'image': float32 [0, 1] (B, H, W, C), 'label': int32 (B,)}`` (images as
      the augmentation leaves them, and ``target`` float32 ``(B, num_classes)`` under
      mixup/cutmix); with ``prefetch`` it has a ``close()`` that stops its thread.

    Raises:
      ValueError: unknown dataset or split, ``batch_size <= 0``, ``start_step < 0``, a bad
        process index, or fewer than ``batch_size`` examples per process; ``ConfigError`` (a
        ``ValueError``) for a bad ``augment``.
    """
    _check_batch_size(batch_size)
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    process_index, process_count = _processes(process_index, process_count)
    data = load_split(name, split, data_dir=data_dir)
    steps = _global_steps_per_epoch(len(data["label"]), batch_size, process_count, name, split)
    pipeline = augment_lib.create(augment, data["image"].shape[1:], num_classes)
    batches = _train_batches(
        data,
        batch_size=batch_size,
        seed=seed,
        start_step=int(start_step),
        process_index=process_index,
        process_count=process_count,
        steps=steps,
        pipeline=pipeline,
    )
    return Prefetch(batches, prefetch) if prefetch > 0 else batches


def num_eval_batches(n: int, *, batch_size: int, process_count: int) -> int:
    """Returns how many batches ``eval_iterator`` yields on every process for a split of ``n``."""
    return math.ceil(math.ceil(n / process_count) / batch_size)


def eval_iterator(
    name: str,
    *,
    batch_size: int,
    split: str = "test",
    data_dir: str | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    augment: Any = (),
) -> Iterator[Batch]:
    """Returns a finite iterator over this process's part of ``split``, each example once.

    Process ``p`` of ``P`` takes the contiguous examples ``[p * n // P, (p + 1) * n // P)`` in
    tfds order. Batches are padded to ``batch_size`` with zeros and ``mask=False``; every process
    yields ``ceil(ceil(n / P) / batch_size)`` batches (all-padding ones where its part is shorter),
    so collectives across processes stay in step.

    Args:
      name: tfds dataset name.
      batch_size: examples per batch on this process.
      split: tfds split or split expression.
      data_dir: tfds data directory.
      process_index: this process (default ``jax.process_index()``).
      process_count: number of processes (default ``jax.process_count()``).
      augment: ``plugins.augment`` ops (a config list or a ``Pipeline``), of which only the
        deterministic ones apply (normalize, resize, center crops); padding is augmented too.

    Returns:
      An iterator of ``{'image': float32 (B, H, W, C), 'label': int32 (B,), 'mask': bool (B,)}``.

    Raises:
      ValueError: unknown dataset or split, ``batch_size <= 0`` or a bad process index.
    """
    _check_batch_size(batch_size)
    process_index, process_count = _processes(process_index, process_count)
    data = load_split(name, split, data_dir=data_dir)
    n = len(data["label"])
    lo, hi = process_index * n // process_count, (process_index + 1) * n // process_count
    count = num_eval_batches(n, batch_size=batch_size, process_count=process_count)
    batches = _eval_batches(data, lo, hi, batch_size, count)
    pipeline = augment_lib.create(augment, data["image"].shape[1:])
    return map(pipeline.eval, batches) if pipeline else batches


def example_batch(
    image_shape: tuple[int, ...],
    batch_size: int,
    *,
    train: bool = True,
    target_classes: int | None = None,
) -> Batch:
    """A batch of zeros typed exactly like ``train_iterator``'s (``train``) or ``eval_iterator``'s
    batches of ``(H, W, C)`` images: to compile steps before any data is read.
    ``target_classes``: training batches also hold soft ``target`` labels of that many classes
    (as under mixup/cutmix)."""
    _check_batch_size(batch_size)
    batch = {
        "image": np.zeros((batch_size, *image_shape), np.float32),
        "label": np.zeros(batch_size, np.int32),
    }
    if train and target_classes:
        batch["target"] = np.zeros((batch_size, target_classes), np.float32)
    if not train:
        batch["mask"] = np.ones(batch_size, bool)
    return batch


def _eval_batches(
    data: dict[str, np.ndarray], lo: int, hi: int, batch_size: int, count: int
) -> Iterator[Batch]:
    images, labels = data["image"], data["label"]
    for b in range(count):
        start = min(lo + b * batch_size, hi)
        stop = min(start + batch_size, hi)
        real, pad = stop - start, batch_size - (stop - start)
        image = _to_float(images[start:stop])
        label = labels[start:stop].copy()
        if pad:
            image = np.concatenate([image, np.zeros((pad, *images.shape[1:]), np.float32)])
            label = np.concatenate([label, np.zeros(pad, np.int32)])
        mask = np.arange(batch_size) < real
        yield {"image": image, "label": label, "mask": mask}
