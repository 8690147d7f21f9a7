"""The metrics a train and an eval step compute, as clu ``metrics.Collection``s.

Inside a step, one call makes that step's metrics, and the step merges them into the ones it
carries, so the metrics stay on the devices until a log step reads them:

    step = metrics.train_step_metrics(loss=loss, logits=logits, labels=labels, grads=grads,
                                      learning_rate=optim.learning_rate(opt_state),
                                      axis_name=None)     # 'batch' under pmap
    return state, so_far.merge(step)

The names are the TensorBoard tags: ``train_loss``, ``train_accuracy``, ``grad_norm``,
``learning_rate`` (and ``nonfinite_count``), ``eval_loss``, ``eval_accuracy``. Steps whose loss or
gradients are NaN/Inf (skipped with ``optimizer.skip_nonfinite``) are left out of the averages,
and ``first_nonfinite`` says where the first such step lies, so the loop can name it.
"""

# No ``from __future__ import annotations``: clu reads the Collections' annotations as types.
import functools
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from clu import metrics

from plugins import losses

# XLA options of programs that run once or rarely (parameter initialisation, the checks before
# each checkpoint, the metrics read at log steps): without backend optimisations they compile
# several times faster (seconds on a CPU), and their own speed does not matter.
RUN_ONCE_OPTIONS = {"xla_backend_optimization_level": 0}


def _finite_average(name: str) -> type[metrics.Average]:
    """Average of the output ``name`` over the steps whose loss and gradients were finite."""

    @flax.struct.dataclass
    class FiniteAverage(metrics.Average):
        @classmethod
        def from_model_output(cls, **outputs: Any) -> metrics.Average:
            keep = outputs["finite"]
            total = jnp.where(keep, outputs[name], 0.0).astype(jnp.float32)
            return cls(total=total, count=keep.astype(jnp.int32))

    return FiniteAverage


@flax.struct.dataclass
class FirstNonfinite(metrics.Metric):
    """Where the first step with a NaN/Inf loss or gradient lies among the steps merged.

    ``compute()`` counts back from the last step merged: 1 if it was the last one, ``k`` if it was
    ``k - 1`` steps before; 0 if every step was finite.
    """

    steps: jax.Array  # steps merged
    first: jax.Array  # index of the first non-finite one among them; -1: none

    @classmethod
    def empty(cls) -> "FirstNonfinite":
        """No steps merged yet."""
        return cls(steps=jnp.array(0, jnp.int32), first=jnp.array(-1, jnp.int32))

    @classmethod
    def from_model_output(cls, *, finite: jax.Array, **_: Any) -> "FirstNonfinite":
        """One step, finite or not."""
        first = jnp.where(finite, -1, 0).astype(jnp.int32)
        return cls(steps=jnp.ones_like(first), first=first)

    def merge(self, other: "FirstNonfinite") -> "FirstNonfinite":
        """These steps followed by ``other``'s."""
        later = jnp.where(other.first >= 0, self.steps + other.first, -1)
        first = jnp.where(self.first >= 0, self.first, later)
        return type(self)(steps=self.steps + other.steps, first=first)

    def compute(self) -> jax.Array:
        """Steps back from the last one to the first non-finite one, counting both; 0: none."""
        return jnp.where(self.first >= 0, self.steps - self.first, 0)


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
    """Training metrics, averaged over the steps between two log steps.

    Steps whose loss or gradients were NaN/Inf (skipped with ``optimizer.skip_nonfinite``) are
    left out of the averages; ``nonfinite_count`` is the optimizer's running total of them and
    ``first_nonfinite`` (not logged) locates the first one for the loop's check.
    """

    train_loss: _finite_average("loss")
    train_accuracy: _finite_average("accuracy")
    grad_norm: _finite_average("grad_norm")
    learning_rate: metrics.LastValue.from_output("learning_rate")
    nonfinite_count: metrics.LastValue.from_output("nonfinite_count")
    first_nonfinite: FirstNonfinite


@flax.struct.dataclass
class EvalMetrics(metrics.Collection):
    """Evaluation metrics over every example of the evaluation split (sums only: the devices'
    metrics add up)."""

    eval_loss: metrics.Average.from_output("loss")
    eval_accuracy: metrics.Average.from_output("correct")


def all_finite_in(tree: Any) -> jax.Array:
    """Whether every float in ``tree`` is finite (inside a traced function)."""
    leaves = jax.tree.leaves(tree)
    checks = [jnp.isfinite(x).all() for x in leaves if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.stack(checks).all() if checks else jnp.array(True)


@functools.partial(jax.jit, compiler_options=RUN_ONCE_OPTIONS)
def all_finite(tree: Any) -> jax.Array:
    """``all_finite_in`` compiled on its own (the loop checks the state before each save)."""
    return all_finite_in(tree)


def _mean(tree: Any, axis_name: str | None) -> Any:
    return tree if axis_name is None else jax.lax.pmean(tree, axis_name)


def _sum(tree: Any, axis_name: str | None) -> Any:
    return tree if axis_name is None else jax.lax.psum(tree, axis_name)


def train_step_metrics(
    *,
    loss: jax.Array,
    logits: jax.Array,
    labels: jax.Array,
    grads: Any,
    learning_rate: jax.Array,
    nonfinite_count: jax.Array | int = 0,
    axis_name: str | None = None,
) -> TrainMetrics:
    """One train step's metrics (inside the step; ``grads`` already averaged over devices).

    Args:
      loss, logits, labels: this device's batch loss, the model's outputs and the labels.
      grads: the gradients the optimizer gets (averaged over the devices).
      learning_rate: ``optim.learning_rate(opt_state)``.
      nonfinite_count: ``optim.nonfinite_count(opt_state)``: the steps skipped so far.
      axis_name: the pmap axis, whose devices' losses and accuracies are averaged; ``None``
        under jit, where the batch is one global array already.
    """
    accuracy = losses.accuracy(logits, labels).astype(jnp.float32)
    # Under pmap only the loss and accuracy differ between devices: one mean of these two
    # scalars makes every metric the same on all devices, at a fraction of the cost of
    # gathering whole metrics from each (the same numbers: every device holds as many examples).
    loss, accuracy = _mean((loss.astype(jnp.float32), accuracy), axis_name)
    grad_norm = optax.tree.norm(grads).astype(jnp.float32)  # NaN/Inf if any gradient is
    # Finite as optax.apply_if_finite judges it, element by element: the norm of large finite
    # gradients can overflow. Only then (a cond) is every gradient checked: a finite norm says so.
    grads_finite = jax.lax.cond(
        jnp.isfinite(grad_norm), lambda _: jnp.array(True), all_finite_in, grads
    )
    return TrainMetrics.single_from_model_output(
        loss=loss,
        accuracy=accuracy,
        grad_norm=grad_norm,
        learning_rate=jnp.asarray(learning_rate, jnp.float32),
        nonfinite_count=jnp.asarray(nonfinite_count, jnp.float32),
        finite=jnp.isfinite(loss) & grads_finite,
    )


def eval_step_metrics(
    loss_fn: Callable,
    logits: jax.Array,
    labels: jax.Array,
    mask: jax.Array,
    *,
    axis_name: str | None = None,
) -> EvalMetrics:
    """One eval batch's metrics over its real (``mask``) examples, summed over the devices of
    ``axis_name`` (pmap; ``None`` under jit).

    ``loss_fn`` is one of ``plugins.losses.create``, whose ``per_example`` gives the loss of each
    example; any other ``fn(preds, targets) -> scalar`` is mapped over the examples.
    """
    if hasattr(loss_fn, "per_example"):
        per_example = loss_fn.per_example(logits, labels)
    else:
        per_example = jax.vmap(lambda x, y: loss_fn(x[None], y[None]))(logits, labels)
    correct = jnp.argmax(logits, axis=-1) == labels
    here = EvalMetrics.single_from_model_output(
        loss=per_example.astype(jnp.float32), correct=correct.astype(jnp.float32), mask=mask
    )
    # An Average is a total and a count: summed over the devices under pmap.
    return _sum(here, axis_name)


@functools.partial(jax.jit, compiler_options=RUN_ONCE_OPTIONS)
def _compute(collection: metrics.Collection) -> dict[str, jax.Array]:
    return collection.compute()  # one program, not one per operation of each metric


def scalars(collection: metrics.Collection) -> dict[str, float]:
    """The collection's values as Python floats (one compiled program, one transfer)."""
    return {name: float(value) for name, value in jax.device_get(_compute(collection)).items()}
