"""Image augmentation on the host, in numpy, deterministic per ``(seed, step)``.

A config lists the ops in the order they run, each a ``dict(name=..., **options)``::

    config.augment = [
        dict(name="crop", padding=4),  # CIFAR-style: pad 4 (zeros), random 32x32 crop
        dict(name="flip"),  # random horizontal flip
        dict(name="normalize", mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)),
    ]

Ops (options and defaults):

- ``crop``: random crop of ``size`` (default: the input's own ``(H, W)``) out of the image padded
  by ``padding`` (4) pixels on every side with ``pad_mode`` (``'constant'``: zeros, ``'reflect'``,
  ``'edge'``). Evaluation: unchanged if ``size`` is the input size, else a center crop.
- ``flip``: horizontal flip with probability ``prob`` (0.5). Evaluation: unchanged.
- ``normalize``: ``(x - mean) / std`` per channel; ``mean``/``std`` a number or one per channel.
  Applied to evaluation batches too.
- ``random_resized_crop``: inception-style crop of a random area fraction in ``scale``
  ((0.08, 1.0)) of the image and aspect ratio (log-uniform) in ``ratio`` ((3/4, 4/3)), resized
  (bilinear) to ``size`` (an int or ``(h, w)``); after 10 rejected draws, a center crop of the
  whole image. Evaluation: a center crop of ``eval_crop`` (0.875) of the shorter side resized to
  ``size``.
- ``resize``: bilinear resize to ``size``, in training and evaluation.
- ``mixup``: with probability ``prob`` (1.0) per batch, each image is blended with the batch's
  reversed order, ``lam * x + (1 - lam) * x[::-1]``, ``lam ~ Beta(alpha, alpha)`` (``alpha``
  0.2), one ``lam`` per batch.
- ``cutmix``: with probability ``prob`` (1.0) per batch, a box covering ``1 - lam`` of the image
  (``lam ~ Beta(alpha, alpha)``, ``alpha`` 1.0, the box clipped to the image and ``lam`` set to the
  area kept) is pasted from the batch's reversed order.

Labels under mixup/cutmix: the batch gains ``target``, float32 ``(B, num_classes)`` soft labels
(``lam`` on the image's own class, ``1 - lam`` on its partner's; every row sums to 1), which the
train steps give the loss (``plugins.losses``' ``softmax_cross_entropy`` takes probability
targets, label smoothing included); ``label`` stays an int32 hard label, the class with the most
mass in ``target``, which accuracy uses. Evaluation never mixes.

Determinism: every random draw comes from a numpy Generator seeded by ``(seed, step, op index)``,
drawn for the whole global batch and sliced to this process's part, so a batch depends only on
``(seed, step)`` and a run resumed at step ``k`` sees the same augmented batches as one that
never stopped. Crop, flip and random-resized-crop draws are also independent of the process count;
mixup/cutmix pair the images within each process's batch, so their pairs depend on it.

Images are float32 ``(B, H, W, C)`` (``plugins.data``'s batches, in [0, 1] before ``normalize``);
every op returns new arrays, the input batch is left as it was.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from plugins import config_errors

__all__ = ["OPS", "Pipeline", "check", "create", "mixes"]

Batch = dict[str, np.ndarray]
ConfigError = config_errors.ConfigError

# A tag mixed into the Generator seeds, apart from the shuffling's (seed, epoch) streams.
_STREAM = 0xA06E


# ----------------------------------------------------------------------------- option checks


def _number(low: float, high: float | None = None, *, open_low: bool = False, closed_high=True):
    def check(value: Any, key: str) -> None:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)
        ok = ok and (value > low if open_low else value >= low)
        ok = ok and (high is None or value < high or (closed_high and value == high))
        if not ok:
            lo = f"({low}" if open_low else f"[{low}"
            hi = "inf)" if high is None else f"{high}{']' if closed_high else ')'}"
            raise ConfigError(f"{key} must be a number in {lo}, {hi}, got {value!r}")

    return check


def _size(value: Any, key: str) -> None:
    if _as_size(value) is None:
        raise ConfigError(
            f"{key} must be an int >= 1 or a pair (height, width) of them; got {value!r}"
        )


def _as_size(value: Any) -> tuple[int, int] | None:
    def positive(v: Any) -> bool:
        return isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1

    if positive(value):
        return int(value), int(value)
    if isinstance(value, list | tuple) and len(value) == 2 and all(map(positive, value)):
        return int(value[0]), int(value[1])
    return None


def _optional_size(value: Any, key: str) -> None:
    if value is not None:
        _size(value, key)


def _range(low: float, high: float | None, *, open_low: bool):
    def check(value: Any, key: str) -> None:
        number = _number(low, high, open_low=open_low)
        if not isinstance(value, list | tuple) or len(value) != 2:
            raise ConfigError(f"{key} must be a pair (low, high), got {value!r}")
        for v in value:
            number(v, key)
        if value[0] > value[1]:
            raise ConfigError(f"{key} must be a pair (low, high) with low <= high, got {value!r}")

    return check


def _channels(positive: bool):
    def check(value: Any, key: str) -> None:
        values = value if isinstance(value, list | tuple) else [value]
        ok = len(values) >= 1 and all(
            isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
            for v in values
        )
        if not ok or (positive and any(v <= 0 for v in values)):
            what = "a number > 0" if positive else "a number"
            raise ConfigError(f"{key} must be {what} or one per channel, got {value!r}")

    return check


# name -> {option: (default, check)}; ``None`` defaults of required options are marked below.
OPS: dict[str, dict[str, tuple[Any, Callable[[Any, str], None]]]] = {
    "crop": {
        "padding": (4, _number(0)),
        "size": (None, _optional_size),
        "pad_mode": ("constant", config_errors.check_one_of("constant", "reflect", "edge")),
    },
    "flip": {"prob": (0.5, _number(0, 1))},
    "normalize": {"mean": (None, _channels(False)), "std": (None, _channels(True))},
    "random_resized_crop": {
        "size": (None, _size),
        "scale": ((0.08, 1.0), _range(0, 1, open_low=True)),
        "ratio": ((3 / 4, 4 / 3), _range(0, None, open_low=True)),
        "eval_crop": (0.875, _number(0, 1, open_low=True)),
    },
    "resize": {"size": (None, _size)},
    "mixup": {"alpha": (0.2, _number(0, open_low=True)), "prob": (1.0, _number(0, 1))},
    "cutmix": {"alpha": (1.0, _number(0, open_low=True)), "prob": (1.0, _number(0, 1))},
}
_REQUIRED = {"normalize": ("mean", "std"), "random_resized_crop": ("size",), "resize": ("size",)}
_MIXES = ("mixup", "cutmix")


def _integer_padding(value: Any, key: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{key} must be an int >= 0, got {value!r}")


def check(augment: Any) -> list[tuple[str, dict[str, Any]]]:
    """Checks an ``augment`` config (a list of op dicts; ``None`` or ``()``: no ops); returns
    ``[(name, options with defaults filled in), ...]``. Compiles and reads nothing.

    Raises:
      ConfigError: an unknown op name, an unknown option, a bad or missing value, naming
        ``augment[i].<key>``.
    """
    if augment is None:
        return []
    if isinstance(augment, Mapping) or hasattr(augment, "to_dict"):
        raise ConfigError(
            "augment must be a list of ops, e.g. [dict(name='crop', padding=4), "
            f"dict(name='flip')]; got one dict {config_errors.as_dict(augment)!r}"
        )
    if not isinstance(augment, list | tuple):
        raise ConfigError(f"augment must be a list of op dicts, got {augment!r}")
    checks = {name: {k: c for k, (_, c) in options.items()} for name, options in OPS.items()}
    ops = []
    for i, op in enumerate(augment):
        where = f"augment[{i}]"
        if not (isinstance(op, Mapping) or hasattr(op, "to_dict")):
            raise ConfigError(f"{where} must be a dict(name=..., ...), got {op!r}")
        given = config_errors.check_named(op, checks, where, "augmentation")
        name = config_errors.as_dict(op)["name"]
        if name == "crop" and "padding" in given:
            _integer_padding(given["padding"], f"{where}.padding")
        missing = [k for k in _REQUIRED.get(name, ()) if given.get(k) is None]
        if missing:
            raise ConfigError(
                f"{where} ({name}) needs {' and '.join(missing)}, e.g. "
                + ("dict(name='normalize', mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))"
                   if name == "normalize" else f"dict(name={name!r}, size=224)")
            )  # fmt: skip
        ops.append((name, {**{k: d for k, (d, _) in OPS[name].items()}, **given}))
    return ops


def mixes(augment: Any) -> bool:
    """Whether the (checked) ``augment`` config has mixup or cutmix: batches then carry soft
    ``target`` labels."""
    return any(name in _MIXES for name, _ in check(augment))


# ----------------------------------------------------------------------------- the ops


def _gather(images: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``out[b, i, j] = images[b, rows[b, i], cols[b, j]]``; ``rows`` and ``cols`` of one row
    are every image's (the batch size is then never read: a traced batch may be symbolic)."""
    if len(rows) == 1:
        return images[:, rows[0]][:, :, cols[0]]
    b = np.arange(len(images))[:, None, None]
    return images[b, rows[:, :, None], cols[:, None, :]]


def _bilinear(images: np.ndarray, boxes: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Crops ``boxes`` ``(B, 4)`` = ``(top, left, height, width)`` (floats, pixels) of each image
    (``(1, 4)``: one box for all) and resizes them to ``size`` bilinearly (half-pixel centres,
    no antialiasing)."""
    height, width = images.shape[1:3]

    def axis(start, extent, out, limit):
        pos = start[:, None] + (np.arange(out) + 0.5)[None] * (extent[:, None] / out) - 0.5
        pos = np.clip(pos, 0, limit - 1)
        lo = np.floor(pos).astype(np.intp)
        hi = np.minimum(lo + 1, limit - 1)
        return lo, hi, (pos - lo).astype(np.float32)

    y0, y1, wy = axis(boxes[:, 0], boxes[:, 2], size[0], height)
    x0, x1, wx = axis(boxes[:, 1], boxes[:, 3], size[1], width)
    wy, wx = wy[:, :, None, None], wx[:, None, :, None]
    top = _gather(images, y0, x0) * (1 - wx) + _gather(images, y0, x1) * wx
    bottom = _gather(images, y1, x0) * (1 - wx) + _gather(images, y1, x1) * wx
    return (top * (1 - wy) + bottom * wy).astype(np.float32)


def _center_box(height: int, width: int, fraction: float, aspect: float) -> np.ndarray:
    """``(top, left, h, w)`` of the largest centred box of aspect ``aspect`` (w / h) within
    ``fraction`` of the image's sides."""
    h, w = height * fraction, width * fraction
    if w / h > aspect:
        w = h * aspect
    else:
        h = w / aspect
    return np.array([(height - h) / 2, (width - w) / 2, h, w])


class Pipeline:
    """Checked ops for images of one shape; ``train``/``eval`` apply them to batches."""

    def __init__(self, ops: list[tuple[str, dict[str, Any]]], image_shape: Sequence[int],
                 num_classes: int | None = None) -> None:  # fmt: skip
        self.ops = ops
        self.input_shape = tuple(int(d) for d in image_shape)
        self.num_classes = num_classes
        self.mixes = any(name in _MIXES for name, _ in ops)
        self.output_shape = self._shapes()
        if self.mixes and (num_classes is None or num_classes < 2):
            raise ConfigError(
                "mixup/cutmix make soft labels and need the number of classes (>= 2); "
                f"got num_classes={num_classes!r}"
            )

    def __bool__(self) -> bool:
        return bool(self.ops)

    def _shapes(self) -> tuple[int, ...]:
        """The image shape after the ops; ``ConfigError`` for a shape an op cannot take."""
        shape = self.input_shape
        if len(shape) != 3 or min(shape) < 1:
            raise ConfigError(f"augment needs images of shape (H, W, C); the dataset's are {shape}")
        self._sizes = []
        for i, (name, options) in enumerate(self.ops):
            height, width, channels = shape
            where = f"augment[{i}] ({name})"
            if name == "crop":
                size = _as_size(options["size"]) if options["size"] is not None else (height, width)
                pad = options["padding"]
                if size[0] > height + 2 * pad or size[1] > width + 2 * pad:
                    raise ConfigError(
                        f"{where}: a {size[0]}x{size[1]} crop does not fit images of "
                        f"{height}x{width} padded by {pad}"
                    )
                if options["pad_mode"] == "reflect" and pad >= min(height, width):
                    raise ConfigError(
                        f"{where}: pad_mode='reflect' needs padding < the image's sides "
                        f"({height}x{width}); got padding={pad}"
                    )
                shape = (*size, channels)
            elif name == "normalize":
                for key in ("mean", "std"):
                    value = options[key]
                    n = len(value) if isinstance(value, list | tuple) else 1
                    if n not in (1, channels):
                        raise ConfigError(
                            f"{where}: {key} has {n} values for images of {channels} channel(s)"
                        )
            elif name in ("random_resized_crop", "resize"):
                shape = (*_as_size(options["size"]), channels)
            self._sizes.append(shape)
        return shape

    # -- one op

    def _apply(self, i: int, name: str, options: dict, batch: Batch, rng, part, train: bool):
        images = batch["image"]
        height, width = images.shape[1:3]
        out_h, out_w = self._sizes[i][:2]
        if name == "normalize":
            channels = images.shape[-1]
            mean = np.broadcast_to(np.asarray(options["mean"], np.float32), (channels,))
            std = np.broadcast_to(np.asarray(options["std"], np.float32), (channels,))
            return {**batch, "image": ((images - mean) * (1 / std)).astype(np.float32)}
        if name == "resize":
            boxes = np.array([[0.0, 0.0, height, width]])
            return {**batch, "image": _bilinear(images, boxes, (out_h, out_w))}
        if not train:
            if name == "crop" and (out_h, out_w) != (height, width):
                top, left = (height - out_h) // 2, (width - out_w) // 2
                image = images[:, top : top + out_h, left : left + out_w]
                return {**batch, "image": image.copy()}  # contiguous
            if name == "random_resized_crop":
                box = _center_box(height, width, options["eval_crop"], out_w / out_h)
                return {**batch, "image": _bilinear(images, box[None], (out_h, out_w))}
            return batch
        if name == "crop":
            pad = options["padding"]
            top = part(rng.integers(0, height + 2 * pad - out_h + 1, size=part.total))
            left = part(rng.integers(0, width + 2 * pad - out_w + 1, size=part.total))
            padded = images
            if pad:
                mode = options["pad_mode"]
                padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode=mode)
            rows = top[:, None] + np.arange(out_h)
            cols = left[:, None] + np.arange(out_w)
            return {**batch, "image": _gather(padded, rows, cols)}
        if name == "flip":
            flip = part(rng.random(part.total) < options["prob"])
            image = np.where(flip[:, None, None, None], images[:, :, ::-1], images)
            return {**batch, "image": image}
        if name == "random_resized_crop":
            image = self._random_resized_crop(options, images, rng, part, (out_h, out_w))
            return {**batch, "image": image}
        return self._mix(name, options, batch, rng)

    def _random_resized_crop(self, options, images, rng, part, size) -> np.ndarray:
        height, width = images.shape[1:3]
        attempts = 10
        area = height * width * rng.uniform(*options["scale"], size=(part.total, attempts))
        log_ratio = np.log(np.asarray(options["ratio"], np.float64))
        aspect = np.exp(rng.uniform(*log_ratio, size=(part.total, attempts)))
        h = np.round(np.sqrt(area / aspect))
        w = np.round(np.sqrt(area * aspect))
        u = rng.random((part.total, attempts, 2))
        area, aspect, h, w, u = (part(a) for a in (area, aspect, h, w, u))
        fits = (h >= 1) & (w >= 1) & (h <= height) & (w <= width)
        first = np.argmax(fits, axis=1)
        rows = np.arange(len(images))
        h, w, u = h[rows, first], w[rows, first], u[rows, first]
        top = np.floor(u[:, 0] * (height - h + 1))
        left = np.floor(u[:, 1] * (width - w + 1))
        boxes = np.stack([top, left, h, w], axis=1)
        # No draw fitted: the whole image's largest centred box of a ratio in range.
        ratio = np.clip(width / height, *options["ratio"])
        fallback = _center_box(height, width, 1.0, ratio)
        boxes = np.where(fits.any(axis=1)[:, None], boxes, fallback)
        return _bilinear(images, boxes, size)

    def _mix(self, name: str, options: dict, batch: Batch, rng) -> Batch:
        apply = rng.random() < options["prob"]
        lam = rng.beta(options["alpha"], options["alpha"])
        box_u = rng.random(2)
        if not apply:
            return batch
        images, target = batch["image"], batch["target"]
        partner = images[::-1]
        if name == "mixup":
            image = (lam * images + (1 - lam) * partner).astype(np.float32)
        else:
            height, width = images.shape[1:3]
            cut = math.sqrt(1 - lam)
            cy, cx = int(box_u[0] * height), int(box_u[1] * width)
            ch, cw = int(height * cut), int(width * cut)
            y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, height)
            x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, width)
            image = images.copy()
            image[:, y0:y1, x0:x1] = partner[:, y0:y1, x0:x1]
            lam = 1 - (y1 - y0) * (x1 - x0) / (height * width)
        target = (lam * target + (1 - lam) * target[::-1]).astype(np.float32)
        return {**batch, "image": image, "target": target}

    # -- batches

    def train(self, batch: Batch, *, seed: int, step: int, process_index: int = 0,
              process_count: int = 1) -> Batch:  # fmt: skip
        """``batch`` (this process's part of global batch ``step``) augmented: every draw from
        ``(seed, step)`` for the global batch, this process's slice taken."""
        if not self.ops:
            return batch
        local = len(batch["label"])
        part = _Part(local, process_index, process_count)
        if self.mixes:
            target = np.zeros((local, self.num_classes), np.float32)
            target[np.arange(local), batch["label"]] = 1
            batch = {**batch, "target": target}
        for i, (name, options) in enumerate(self.ops):
            rng = np.random.default_rng([int(seed) & 0xFFFFFFFFFFFFFFFF, int(step), _STREAM, i])
            batch = self._apply(i, name, options, batch, rng, part, train=True)
        if self.mixes:
            batch["label"] = np.argmax(batch["target"], axis=-1).astype(np.int32)
        return batch

    def eval(self, batch: Batch) -> Batch:
        """``batch`` with the deterministic ops only (normalize, resize, center crops). Its
        images may be ``jax.Array``s too, traced ones included (any batch size): an exported
        forward pass takes the dataset's images and applies these ops itself."""
        for i, (name, options) in enumerate(self.ops):
            batch = self._apply(i, name, options, batch, None, None, train=False)
        return batch


class _Part:
    """Slices draws made for the global batch down to this process's part."""

    def __init__(self, local: int, index: int, count: int) -> None:
        self.total = local * count
        self.lo, self.hi = local * index, local * (index + 1)

    def __call__(self, draws: np.ndarray) -> np.ndarray:
        return draws[self.lo : self.hi]


def create(augment: Any, image_shape: Sequence[int], num_classes: int | None = None) -> Pipeline:
    """Checks ``augment`` (see :func:`check`) for images of ``image_shape`` ``(H, W, C)``;
    returns the :class:`Pipeline` (``output_shape``: the images' shape after it).

    Raises:
      ConfigError: a bad config, a shape an op cannot take (a crop larger than the padded
        image, ``mean``/``std`` not one per channel), or mixup/cutmix without ``num_classes``.
    """
    if isinstance(augment, Pipeline):
        return augment
    return Pipeline(check(augment), image_shape, num_classes)
