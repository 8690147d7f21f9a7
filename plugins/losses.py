"""Losses from config, plus accuracy helpers, on top of ``optax.losses``.

``create(loss_config)`` returns ``fn(preds, targets, *, weights=None) -> scalar``:

- the per-element loss is one of optax's own functions (see the table below);
- it is averaged over the non-batch axes of each example, so every example counts once whatever
  its shape (a sequence of tokens, an image of pixels, a vector of outputs);
- without ``weights`` the result is the plain mean over the batch; with ``weights`` of shape
  ``(B,)`` (per-example weights, or a 0/1 / boolean mask such as an eval batch's ``mask``) it is
  ``sum(w * loss) / max(sum(w), tiny)``, the weighted mean over the real examples (a ``(B, 1)``
  mask, as ``mask[:, None]`` makes it, counts as ``(B,)``). Padding examples with weight 0 never
  contribute to the value, not even a NaN; their gradient is 0 unless their loss itself is
  non-finite (infinite logits), when it is NaN as ``jnp.where``'s always is. Weights with more
  axes than ``(B,)`` (e.g. a per-token mask ``(B, T)``) weight the per-position losses directly.

Predictions in half precision are upcast to float32 before the loss.

Names, the optax function underneath, and options (defaults):

- ``softmax_cross_entropy``: ``optax.losses.softmax_cross_entropy_with_integer_labels`` for
  integer labels, ``optax.losses.softmax_cross_entropy`` for one-hot / probability targets;
  ``label_smoothing`` (0.0).
- ``sigmoid_binary_cross_entropy``: ``optax.losses.sigmoid_binary_cross_entropy``.
- ``sigmoid_focal_loss``: ``optax.losses.sigmoid_focal_loss``; ``alpha`` (None), ``gamma`` (2.0).
- ``l2``: ``optax.losses.l2_loss``, i.e. **0.5 * (x - y) ** 2**.
- ``mse``: ``optax.losses.squared_error``, i.e. **(x - y) ** 2**.
- ``huber``: ``optax.losses.huber_loss``; ``delta`` (1.0).
- ``cosine_distance``: ``optax.losses.cosine_distance`` over the last axis; ``epsilon`` (0.0).

``l2`` and ``mse`` differ by the factor 0.5 only: ``l2`` is optax's ``l2_loss`` (half the squared
error, whose gradient is ``x - y``), ``mse`` is the conventional mean squared error.

``softmax_cross_entropy`` takes integer labels (shape ``preds.shape[:-1]``, integer dtype) or
one-hot / probability targets (same shape as ``preds``, float dtype); which one is decided from
the shape and dtype. ``label_smoothing`` applies ``optax.smooth_labels`` to either form.

An unknown loss name or option raises one ``ConfigError`` (a ``ValueError``) at ``create()`` time,
naming it and the nearest valid choices.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from plugins import config_errors

LossFn = Callable[..., jax.Array]

# name -> {option: default}
OPTIONS: dict[str, dict[str, Any]] = {
    "softmax_cross_entropy": {"label_smoothing": 0.0},
    "sigmoid_binary_cross_entropy": {},
    "sigmoid_focal_loss": {"alpha": None, "gamma": 2.0},
    "l2": {},
    "mse": {},
    "huber": {"delta": 1.0},
    "cosine_distance": {"epsilon": 0.0},
}
NAMES = tuple(sorted(OPTIONS))


def _as_float(x: Any) -> jax.Array:
    """Upcasts to at least float32 (half-precision logits get a float32 loss)."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _is_integer_labels(preds: jax.Array, targets: jax.Array) -> bool:
    """True for integer class ids of shape ``preds.shape[:-1]``; False for one-hot/probabilities."""
    if jnp.issubdtype(targets.dtype, jnp.integer) and targets.ndim == preds.ndim - 1:
        return True
    if targets.shape == preds.shape:
        return False
    raise ValueError(
        f"targets of shape {targets.shape} and dtype {targets.dtype} do not fit logits of shape "
        f"{preds.shape}: expected integer labels of shape {preds.shape[:-1]} or one-hot / "
        f"probability targets of shape {preds.shape}"
    )


def _one_hot_targets(preds: jax.Array, targets: jax.Array) -> jax.Array:
    """Targets as float probabilities of ``preds``'s shape (integer labels one-hot encoded)."""
    targets = jnp.asarray(targets)
    if _is_integer_labels(preds, targets):
        return jax.nn.one_hot(targets, preds.shape[-1], dtype=preds.dtype)
    return targets.astype(preds.dtype)


def _check_same_shape(name: str, preds: jax.Array, targets: jax.Array) -> None:
    if preds.shape != targets.shape:
        raise ValueError(
            f"{name}: predictions of shape {preds.shape} and targets of shape {targets.shape} "
            "must have the same shape"
        )


def _weighted_mean(loss: jax.Array, weights: Any | None) -> jax.Array:
    """Mean of an unreduced loss ``(B, ...)``: each example averaged over its own axes, then the
    (weighted) mean over examples."""
    if loss.ndim == 0:
        raise ValueError("the loss needs a leading batch axis; got a scalar prediction")
    if weights is None:
        return jnp.mean(loss)
    weights = jnp.asarray(weights)
    if weights.ndim > 1 and weights.shape == (loss.shape[0],) + (1,) * (weights.ndim - 1):
        weights = weights.reshape(loss.shape[0])  # a (B, 1) mask, as mask[:, None] makes it
    if weights.ndim == 1:
        if weights.shape[0] != loss.shape[0]:
            raise ValueError(
                f"weights of shape {weights.shape} do not match the batch of {loss.shape[0]}"
            )
        loss = jnp.mean(loss, axis=tuple(range(1, loss.ndim)))
    else:
        try:
            if weights.ndim > loss.ndim or jnp.broadcast_shapes(weights.shape, loss.shape) != (
                loss.shape
            ):
                raise ValueError
        except ValueError:
            raise ValueError(
                f"weights of shape {weights.shape} fit neither the batch ({loss.shape[0]},) "
                f"nor the per-position loss {loss.shape}"
            ) from None
        weights = jnp.broadcast_to(weights, loss.shape)
    weights = weights.astype(loss.dtype)
    total = jnp.sum(jnp.where(weights != 0, weights * loss, 0))
    return total / jnp.maximum(jnp.sum(weights), jnp.finfo(loss.dtype).tiny)


def _softmax_cross_entropy(label_smoothing: float) -> Callable[[Any, Any], jax.Array]:
    def unreduced(preds, targets):
        preds = _as_float(preds)
        targets = jnp.asarray(targets)
        if not label_smoothing and _is_integer_labels(preds, targets):
            return optax.losses.softmax_cross_entropy_with_integer_labels(preds, targets)
        probs = _one_hot_targets(preds, targets)
        if label_smoothing:
            probs = optax.losses.smooth_labels(probs, label_smoothing)
        return optax.losses.softmax_cross_entropy(preds, probs)

    return unreduced


def _elementwise(name: str, loss: Callable[..., jax.Array], **kwargs) -> Callable:
    def unreduced(preds, targets):
        preds = _as_float(preds)
        targets = jnp.asarray(targets).astype(preds.dtype)
        _check_same_shape(name, preds, targets)
        return loss(preds, targets, **kwargs)

    return unreduced


def _cosine_distance(epsilon: float) -> Callable:
    def unreduced(preds, targets):
        preds = _as_float(preds)
        targets = jnp.asarray(targets).astype(preds.dtype)
        _check_same_shape("cosine_distance", preds, targets)
        if preds.ndim < 2:
            raise ValueError(
                f"cosine_distance needs vectors (B, ..., D); got predictions of shape {preds.shape}"
            )
        return optax.losses.cosine_distance(preds, targets, epsilon=epsilon)

    return unreduced


def _check_number(
    name: str, key: str, value: Any, *, low: float, high: float | None = None, closed: bool = False
):
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)
    ok = ok and value >= low
    ok = ok and (high is None or value < high or (closed and value == high))
    if not ok:
        bound = f">= {low}" if high is None else f"in [{low}, {high}{']' if closed else ')'}"
        raise config_errors.ConfigError(
            f"loss.{key} for {name!r} must be a number {bound}, got {value!r}"
        )


def create(loss_config: Mapping[str, Any] | Any) -> LossFn:
    """Builds a loss ``fn(preds, targets, *, weights=None) -> scalar`` from config.

    Args:
      loss_config: a ConfigDict or dict with ``name`` (one of ``NAMES``) and that loss's options
        (see the module docstring), e.g. ``dict(name='softmax_cross_entropy',
        label_smoothing=0.1)``.

    Returns:
      ``fn(preds, targets, *, weights=None)`` returning the mean loss over the (real) examples;
      ``weights`` of shape ``(B,)`` are per-example weights or a 0/1 / boolean mask.
      ``fn.per_example(preds, targets)`` gives the unreduced ``(B,)`` losses (e.g. to sum
      across devices before dividing by the real example count).

    Raises:
      ConfigError: (a ``ValueError``) for a missing or unknown name, an unknown option or a bad
        option value, naming it and the nearest valid choices.
    """
    config = config_errors.as_dict(loss_config)
    if "name" not in config or config["name"] is None:
        raise config_errors.ConfigError(f"loss.name is required; valid: {', '.join(NAMES)}")
    name = config.pop("name")
    if name not in OPTIONS:
        raise config_errors.unknown("loss", "loss.name", name, NAMES)
    config_errors.check_keys(config, OPTIONS[name], "loss")
    options = {**OPTIONS[name], **config}

    if name == "softmax_cross_entropy":
        _check_number(name, "label_smoothing", options["label_smoothing"], low=0.0, high=1.0)
        unreduced = _softmax_cross_entropy(float(options["label_smoothing"]))
    elif name == "sigmoid_binary_cross_entropy":
        unreduced = _elementwise(name, optax.losses.sigmoid_binary_cross_entropy)
    elif name == "sigmoid_focal_loss":
        if options["alpha"] is not None:
            _check_number(name, "alpha", options["alpha"], low=0.0, high=1.0, closed=True)
        _check_number(name, "gamma", options["gamma"], low=0.0)
        unreduced = _elementwise(
            name, optax.losses.sigmoid_focal_loss, alpha=options["alpha"], gamma=options["gamma"]
        )
    elif name == "l2":
        unreduced = _elementwise(name, optax.losses.l2_loss)
    elif name == "mse":
        unreduced = _elementwise(name, optax.losses.squared_error)
    elif name == "huber":
        _check_number(name, "delta", options["delta"], low=1e-12)
        unreduced = _elementwise(name, optax.losses.huber_loss, delta=options["delta"])
    else:  # cosine_distance
        _check_number(name, "epsilon", options["epsilon"], low=0.0)
        unreduced = _cosine_distance(float(options["epsilon"]))

    def loss_fn(preds: Any, targets: Any, *, weights: Any | None = None) -> jax.Array:
        return _weighted_mean(unreduced(preds, targets), weights)

    def per_example(preds: Any, targets: Any) -> jax.Array:
        loss = unreduced(preds, targets)
        return jnp.mean(loss, axis=tuple(range(1, loss.ndim)))

    per_example.__doc__ = f"{name} loss of every example, shape (B,) (no reduction over B)."
    loss_fn.per_example = per_example
    loss_fn.__name__ = name
    loss_fn.__qualname__ = name
    loss_fn.__doc__ = (
        f"{name} loss {options if options else ''}: mean over examples (weighted by ``weights``)."
    )
    return loss_fn


def _labels_as_ids(logits: jax.Array, labels: Any) -> jax.Array:
    labels = jnp.asarray(labels)
    if _is_integer_labels(logits, labels):
        return labels
    return jnp.argmax(labels, axis=-1)


def accuracy(logits: Any, labels: Any, weights: Any | None = None) -> jax.Array:
    """Fraction of examples whose arg-max logit is the label.

    Args:
      logits: ``(B, ..., C)`` scores.
      labels: integer class ids ``(B, ...)`` or one-hot targets ``(B, ..., C)``.
      weights: optional per-example weights or 0/1 / boolean mask ``(B,)``.

    Returns:
      The (weighted) mean accuracy over the real examples, a float32 scalar.
    """
    logits = jnp.asarray(logits)
    correct = jnp.argmax(logits, axis=-1) == _labels_as_ids(logits, labels)
    return _weighted_mean(correct.astype(jnp.float32), weights)


def top_k_accuracy(logits: Any, labels: Any, k: int, weights: Any | None = None) -> jax.Array:
    """Fraction of examples whose label is among the ``k`` highest logits.

    Args:
      logits: ``(B, ..., C)`` scores.
      labels: integer class ids ``(B, ...)`` or one-hot targets ``(B, ..., C)``.
      k: how many of the top logits count (``1 <= k <= C``); ``k=1`` equals ``accuracy``.
      weights: optional per-example weights or 0/1 / boolean mask ``(B,)``.

    Returns:
      The (weighted) mean top-k accuracy over the real examples, a float32 scalar.
    """
    logits = jnp.asarray(logits)
    num_classes = logits.shape[-1]
    if not isinstance(k, numbers.Integral) or isinstance(k, bool) or not 1 <= k <= num_classes:
        raise ValueError(f"top_k_accuracy: k must be an int in [1, {num_classes}], got {k!r}")
    _, top = jax.lax.top_k(logits, k)
    ids = _labels_as_ids(logits, labels)
    correct = jnp.any(top == ids[..., None], axis=-1)
    return _weighted_mean(correct.astype(jnp.float32), weights)
