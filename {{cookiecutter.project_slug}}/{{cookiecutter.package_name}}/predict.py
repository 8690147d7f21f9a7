"""Using a trained model: classify images with it, or export it for use without this code.

    python main.py --config=configs/default.py --workdir=DIR --mode=predict --images=PATH
    python main.py --config=configs/default.py --workdir=DIR --mode=export

Both take the latest checkpoint in the workdir (or ``--step``'s), with the evaluation parameters
(EMA ones if configured). ``PATH`` is a ``.npy``/``.npz`` file of images, an image file or a
folder of them (``plugins.export.read_images``). The export, ``DIR/export/model.jax`` and
``model.json``, is the forward pass serialised with ``jax.export``, taking images as the dataset
has them (float32 in [0, 1]; ``config.augment``'s evaluation ops run inside it): load it with
``plugins.export.load``, or ``jax.export.deserialize`` alone, without this project's code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import ml_collections
from plugins import config_cli, data, export

from . import input_pipeline, train


def class_names(config: ml_collections.ConfigDict) -> list[str]:
    """The dataset's class names (from its tfds metadata), or their numbers as text."""
    label = data.builder(config.dataset, config.data_dir).info.features["label"]
    return list(label.names) if label.names else [str(i) for i in range(label.num_classes)]


def predict(
    config: ml_collections.ConfigDict,
    workdir: str,
    images: str,
    *,
    step: int | None = None,
    top_k: int = 3,
) -> list[tuple[str, list[tuple[str, float]]]]:
    """The ``top_k`` classes and probabilities of each image in ``images`` (a path), by the
    model of the checkpoint of ``step`` (default: the latest): ``[(image name, [(class,
    probability), ...]), ...]``."""
    pipeline = input_pipeline.augmentation(config)  # evaluation's: normalize, resize, ...
    batch, names = export.read_images(images, pipeline.input_shape)
    batch = pipeline.eval({"image": batch})["image"]
    _, forward = train.trained_model(config, workdir, step=step)
    logits = jax.jit(forward)(batch)
    labels = class_names(config)
    ranked = export.top_k(logits, top_k)
    return [(n, [(labels[c], p) for c, p in row]) for n, row in zip(names, ranked, strict=True)]


def export_model(
    config: ml_collections.ConfigDict,
    workdir: str,
    out: str | None = None,
    *,
    step: int | None = None,
) -> Path:
    """Exports the model of the checkpoint of ``step`` (default: the latest) with
    ``plugins.export.save`` into ``out`` (default ``<workdir>/export``); returns that folder."""
    pipeline = input_pipeline.augmentation(config)
    step, forward = train.trained_model(config, workdir, step=step)

    def preprocess_and_forward(images: jax.Array) -> jax.Array:
        # The dataset's images in [0, 1], as a user has them: evaluation's ops (normalize,
        # resize, center crops) are part of the exported function.
        return forward(pipeline.eval({"image": images})["image"])

    info: dict[str, Any] = dict(step=step, dataset=config.dataset, model=config.model.to_dict())
    return export.save(
        preprocess_and_forward,
        out or Path(config_cli.workdir_path(workdir)) / "export",  # local: ~ expanded
        input_shape=pipeline.input_shape,
        class_names=class_names(config),
        info=info,
    )
