"""Input pipeline: the config's dataset through ``plugins.data``.

``plugins.data`` reads a tfds split into memory once and cuts it into deterministic batches:
``image`` float32 in [0, 1] ``(B, H, W, C)``, ``label`` int32 ``(B,)`` (and ``mask`` for
evaluation). Training batches depend only on ``(seed, step)``, so a resumed run picks up the data
exactly where it stopped. Each process reads only its own slice.

``config.augment`` (a list of ``plugins.augment`` ops, e.g. crop + flip + normalize; default none)
augments the training batches on the host, in a background thread, every random draw seeded by
``(seed, step)`` so that resuming stays exact; evaluation batches get only its deterministic ops
(normalize, resize, center crops). With mixup/cutmix the training batches also carry soft
``target`` labels ``(B, num_classes)``, which the train step gives the loss; ``label`` stays the
hard label that accuracy counts.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
from absl import logging
from plugins import augment, config_errors
from plugins import data as plugins_data  # registers the offline ``digits`` dataset

TRAIN_SPLIT = "train"
EVAL_SPLIT = "test"


def dataset_info(config: Any, *, check_data: bool = True) -> tuple[int, tuple[int, int, int]]:
    """Returns ``(num_classes, (H, W, C))``: the classes of ``config.dataset`` and the shape of
    its images as the model takes them (after ``config.augment``, e.g. a resize).

    With ``check_data``, first makes sure that the run's data is there, before anything compiles
    or is written (``plugins.data.check_dataset``): the dataset is prepared (downloaded now if
    need be: one attempt), has ``TRAIN_SPLIT`` and ``EVAL_SPLIT``, and ``batch_size`` fits the
    first; an ``eval_batch_size`` beyond the evaluation split (rounded up to the devices) is
    lowered to it, with a warning (a bigger one is only padding). Without, reads only metadata
    (works before the dataset is downloaded). An unknown dataset, a bad batch size or
    augmentation ops that cannot take its images raise ``ConfigError``; data that cannot be had
    ``DatasetUnavailable``.
    """
    num_classes, shape = _dataset_info(config, check_data=check_data)
    return num_classes, augment.create(config.get("augment"), shape, num_classes).output_shape


def augmentation(config: Any) -> augment.Pipeline:
    """The ``plugins.augment`` pipeline of ``config.augment`` for the dataset's images
    (``input_shape``: the dataset's image shape, ``output_shape``: the model's)."""
    num_classes, shape = _dataset_info(config, check_data=False)
    return augment.create(config.get("augment"), shape, num_classes)


def _dataset_info(config: Any, *, check_data: bool) -> tuple[int, tuple[int, int, int]]:
    """``(num_classes, (H, W, C))`` of ``config.dataset``'s images, from its tfds metadata
    (with ``check_data``, after checking the data: see ``dataset_info``)."""
    if check_data:
        dataset = plugins_data.check_dataset(
            config.dataset,
            data_dir=config.data_dir,
            train_split=TRAIN_SPLIT,
            eval_split=EVAL_SPLIT,
            batch_size=config.batch_size,
        )
        most = plugins_data.eval_batch_size_limit(dataset, EVAL_SPLIT, jax.device_count())
        if most is not None and config.eval_batch_size > most:
            logging.warning(
                "eval_batch_size=%d is more than split %r of %r holds (rounded up to the %d "
                "devices): evaluating in batches of %d", config.eval_batch_size, EVAL_SPLIT,
                config.dataset, jax.device_count(), most,
            )  # fmt: skip
            config.eval_batch_size = most
    else:
        dataset = plugins_data.builder(config.dataset, config.data_dir)
    features = dataset.info.features
    missing = [k for k in ("image", "label") if k not in features]
    if missing:
        raise config_errors.ConfigError(
            f"dataset {config.dataset!r} has no {' or '.join(missing)} feature; "
            "this project trains image classifiers"
        )
    shape = tuple(features["image"].shape)
    if len(shape) != 3 or None in shape:
        raise config_errors.ConfigError(
            f"dataset {config.dataset!r} has images of varying shape {shape}; "
            "this project needs a fixed (H, W, C)"
        )
    return int(features["label"].num_classes), shape


def train_batches(config: Any, start_step: int) -> Iterator[dict]:
    """Endless shuffled training batches of this process (its share of each global batch of
    ``config.batch_size``), starting at batch ``start_step``."""
    pipeline = augmentation(config)
    return plugins_data.train_iterator(
        config.dataset,
        batch_size=config.batch_size // jax.process_count(),
        seed=config.seed,
        split=TRAIN_SPLIT,
        data_dir=config.data_dir,
        start_step=start_step,
        # Without augmentation no prefetch thread: a batch of in-memory data takes microseconds
        # to cut, and is cut while the device runs the previous step (dispatch is asynchronous);
        # a thread's hand-off costs more than that. Augmentation (milliseconds) runs in one.
        prefetch=2 if pipeline else 0,
        augment=pipeline,
        num_classes=pipeline.num_classes,
    )


def eval_batches(config: Any) -> Iterator[dict]:
    """This process's part of the evaluation split, once, in its share of batches of
    ``config.eval_batch_size``; the last is padded, the padding marked by ``mask``."""
    return plugins_data.eval_iterator(
        config.dataset,
        batch_size=config.eval_batch_size // jax.process_count(),
        split=EVAL_SPLIT,
        data_dir=config.data_dir,
        augment=augmentation(config),
    )
