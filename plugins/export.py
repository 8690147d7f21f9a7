"""A trained model as a standalone artefact, and classifying images with it.

``save(forward, path, ...)`` serialises ``forward(images) -> logits`` (the trained parameters,
EMA ones if configured, baked in) with ``jax.export`` for any batch size, beside a small JSON
file of what it takes and gives. ``load(path)`` gives it back as a function that needs only
``jax`` -- not the model code, Flax or this library's training code:

    import jax, json, numpy as np
    exported = jax.export.deserialize(open("DIR/model.jax", "rb").read())
    logits = exported.call(np.zeros((4, 8, 8, 1), np.float32))

``read_images(path, shape)`` reads a ``.npy``/``.npz`` file or a folder of image files into a
float32 batch in [0, 1] (what training feeds the model), and ``top_k`` ranks the classes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

MODEL_FILE = "model.jax"
INFO_FILE = "model.json"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def save(
    forward: Callable[[jax.Array], jax.Array],
    path: str | os.PathLike,
    *,
    input_shape: Sequence[int],
    class_names: Sequence[str],
    info: dict[str, Any] | None = None,
) -> Path:
    """Writes ``forward`` (float32 images ``(B, *input_shape)`` in [0, 1] -> logits) to
    ``path/model.jax``, exported for any batch size ``B`` and for this backend, and
    ``path/model.json`` (input shape, class names and ``info``). Returns ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (batch,) = jax.export.symbolic_shape("b")
    spec = jax.ShapeDtypeStruct((batch, *input_shape), np.float32)
    exported = jax.export.export(jax.jit(forward))(spec)
    (path / MODEL_FILE).write_bytes(exported.serialize())
    meta = dict(input_shape=list(input_shape), class_names=list(class_names), **(info or {}))
    (path / INFO_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return path


def load(path: str | os.PathLike) -> tuple[Callable[[np.ndarray], jax.Array], dict[str, Any]]:
    """The function ``save`` wrote to ``path`` and its JSON facts."""
    path = Path(path)
    exported = jax.export.deserialize(bytearray((path / MODEL_FILE).read_bytes()))
    return exported.call, json.loads((path / INFO_FILE).read_text())


class ImagesError(ValueError):
    """Images that cannot be read: the message names the path and what was wrong."""


def _fit(image: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """An image (H, W) or (H, W, C) of any size and channels, as ``shape`` (resized, gray or
    colour as the model takes), float32 in [0, 1]."""
    from PIL import Image

    height, width, channels = shape
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.dtype != np.uint8:  # floats in [0, 1]
        array = np.clip(np.asarray(array, np.float32) * 255.0, 0, 255).astype(np.uint8)
    picture = Image.fromarray(array).convert("L" if channels == 1 else "RGB")
    if picture.size != (width, height):
        picture = picture.resize((width, height), Image.BILINEAR)
    out = np.asarray(picture, np.float32) / 255.0
    return out[..., None] if channels == 1 else out


def read_images(path: str | os.PathLike, shape: Sequence[int]) -> tuple[np.ndarray, list[str]]:
    """Images to classify, as a float32 batch ``(N, *shape)`` in [0, 1], and their names.

    ``path`` is a ``.npy`` file of images ``(N, H, W[, C])`` (uint8, or floats in [0, 1]), a
    ``.npz`` file holding such an array under ``image`` (or its only array), an image file, or a
    folder of image files (PNG, JPEG, ...; sorted by name). Images of another size or number of
    channels are resized and converted.
    """
    path = Path(path)
    if not path.exists():
        raise ImagesError(f"{path} does not exist")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ImagesError(f"{path} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
        return _from_files(files, shape)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return _from_files([path], shape)
    if path.suffix not in (".npy", ".npz"):
        raise ImagesError(f"{path}: give a .npy or .npz file, an image file or a folder of them")
    try:
        images = np.load(path)
        if path.suffix == ".npz":
            images = images["image" if "image" in images.files else images.files[0]]
    except (OSError, ValueError, IndexError) as error:
        raise ImagesError(f"{path} cannot be read as a numpy array: {error}") from None
    if images.ndim == 3:  # (N, H, W): gray
        images = images[..., None]
    if images.ndim != 4:
        raise ImagesError(f"{path} holds an array of shape {images.shape}; expected (N, H, W[, C])")
    if tuple(images.shape[1:]) != tuple(shape):
        batch = np.stack([_fit(image, shape) for image in images])
    elif images.dtype == np.uint8:
        batch = images.astype(np.float32) / 255.0
    else:
        batch = images.astype(np.float32)
    return batch, [f"{path.name}[{i}]" for i in range(len(batch))]


def _from_files(files: Sequence[Path], shape: Sequence[int]) -> tuple[np.ndarray, list[str]]:
    from PIL import Image

    batch = []
    for f in files:
        try:
            batch.append(_fit(np.asarray(Image.open(f).convert("RGB")), shape))
        except (OSError, ValueError) as error:
            raise ImagesError(f"{f} cannot be read as an image: {error}") from None
    return np.stack(batch), [f.name for f in files]


def top_k(logits: Any, k: int) -> list[list[tuple[int, float]]]:
    """For each row of ``logits``, the ``k`` most probable classes and their probabilities."""
    probs = np.asarray(jax.nn.softmax(np.asarray(logits, np.float32), axis=-1))
    k = min(k, probs.shape[-1])
    order = np.argsort(-probs, axis=-1)[:, :k]
    return [[(int(c), float(p[c])) for c in row] for p, row in zip(probs, order, strict=True)]
