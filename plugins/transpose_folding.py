"""Transposes folded into the matrix products that feed them, before XLA partitions a program.

``fold_transposes(fn)`` is ``fn`` with every ``transpose(dot_general(a, b))`` that only swaps
the two operands' free dimensions computed as ``dot_general(b, a)`` -- the same numbers, no
transpose. Use it on a data-parallel train step compiled with ``jax.jit``::

    step = jax.jit(transpose_folding.fold_transposes(train_step), in_shardings=..., ...)

Why: JAX's autodiff computes the gradient of ``x @ w`` as ``dot_general(cotangent, x)`` in the
(out, in) order and then transposes it to ``w``'s (in, out). With the batch sharded over
devices that dot is a per-device partial sum, and XLA's SPMD partitioner inserts the gradient
all-reduce right after it -- between the dot and the transpose, where XLA can no longer fold
the transpose into the dot. The optimizer update then reads every dense gradient transposed;
on 8 XLA:CPU devices that costs a few to 20 % of a step (``python -m benchmarks.run
grad_layout``).
Folded before partitioning, the dot writes the gradient in the parameter's layout and the
all-reduce carries it that way, as ``shard_map`` + ``psum`` does. On one device XLA folds these
transposes itself, so under plain ``jax.jit`` the rewrite changes nothing there.
Under ``plugins.sharding.pmap`` (or ``shard_map``) each device runs the unbatched step
(``plugins.unit_axis``), whose ``pmean`` comes after autodiff's transpose: XLA folds the
transposes on its own there too, and the rewrite changes nothing.

The rewrite is on the jaxpr of ``fn`` (``jax.make_jaxpr``, evaluated back with
``jax.extend.core.jaxpr_as_fun``), so it sees the program after autodiff: the model code is
untouched and every derivative (forward mode included) works as before. It descends into every
nested program: ``jax.jit`` calls, the bodies of ``lax.scan`` (a scan over layers, as
``nn.scan`` and ``nnx.scan`` build), ``while_loop``/``fori_loop``, the branches of ``cond``,
remat (``jax.checkpoint``), ``shard_map`` and custom-derivative calls. A pair is folded when
the dot and its transpose are in the same body. Pallas kernels are left as they are.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.extend.core as jex
from jax import lax

__all__ = ["fold_transposes"]


def _is_kernel(primitive_name: str) -> bool:
    """Kernel languages (Pallas, lowered by Mosaic or Triton) get their bodies left alone: there
    an operand swap would change the kernel's memory layout, not just XLA's."""
    return any(name in primitive_name for name in ("pallas", "mosaic", "triton"))


def _fold_inner(value: Any) -> Any:
    """A primitive's parameter with every jaxpr in it folded (the bodies of ``jit``, ``scan``,
    ``while``, ``cond`` branches, remat, ``shard_map``, custom-derivative calls); anything
    else is returned as it is (the same object)."""
    if isinstance(value, jex.ClosedJaxpr):
        return jex.ClosedJaxpr(_fold(value.jaxpr), value.consts)
    if isinstance(value, jex.Jaxpr):
        return _fold(value)
    if isinstance(value, tuple) and any(isinstance(v, (jex.ClosedJaxpr, jex.Jaxpr)) for v in value):
        return tuple(_fold_inner(v) for v in value)
    return value


def _free_dims_swapped(dot: jex.JaxprEqn, permutation: tuple[int, ...]) -> bool:
    """Whether ``permutation`` of ``dot``'s output puts the rhs free dims before the lhs ones
    (batch dims first and unmoved): exactly the output of the dot with its operands swapped."""
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dot.params["dimension_numbers"]
    lhs_ndim, rhs_ndim = (v.aval.ndim for v in dot.invars)
    batch = len(lhs_batch)
    lhs_free = lhs_ndim - len(lhs_contract) - batch
    rhs_free = rhs_ndim - len(rhs_contract) - batch
    swapped = [
        *range(batch),
        *range(batch + lhs_free, batch + lhs_free + rhs_free),
        *range(batch, batch + lhs_free),
    ]
    return lhs_free > 0 and rhs_free > 0 and list(permutation) == swapped


def _swapped_dot(dot: jex.JaxprEqn, out: jex.Var, permutation: tuple[int, ...]) -> jex.JaxprEqn:
    """``dot`` with its operands swapped, writing ``out`` (the transpose's result)."""
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dot.params["dimension_numbers"]
    swapped = ((rhs_contract, lhs_contract), (rhs_batch, lhs_batch))
    params = dict(dot.params, dimension_numbers=swapped)
    if isinstance(params.get("precision"), tuple):  # (lhs precision, rhs precision)
        params["precision"] = params["precision"][::-1]
    sharding = params.get("out_sharding")
    if sharding is not None:  # under jit JAX records the output's sharding: permute it too
        spec = tuple(sharding.spec) + (None,) * (len(permutation) - len(sharding.spec))
        params["out_sharding"] = sharding.update(
            spec=jax.sharding.PartitionSpec(*(spec[p] for p in permutation))
        )
    return dot.replace(invars=dot.invars[::-1], outvars=[out], params=params)


def _fold(jaxpr: jex.Jaxpr) -> jex.Jaxpr:
    """``jaxpr`` with each foldable ``transpose(dot_general(...))`` pair made one swapped dot."""
    uses = collections.Counter(
        v for eqn in jaxpr.eqns for v in eqn.invars if isinstance(v, jex.Var)
    )
    uses.update(v for v in jaxpr.outvars if isinstance(v, jex.Var))
    dot_of = {
        eqn.outvars[0]: i for i, eqn in enumerate(jaxpr.eqns) if eqn.primitive is lax.dot_general_p
    }
    swapped: dict[int, jex.JaxprEqn] = {}
    folded: set[int] = set()
    for j, eqn in enumerate(jaxpr.eqns):
        if eqn.primitive is not lax.transpose_p or not isinstance(eqn.invars[0], jex.Var):
            continue
        i = dot_of.get(eqn.invars[0])
        permutation = eqn.params["permutation"]
        if i is None or uses[eqn.invars[0]] != 1:  # the untransposed product is needed too
            continue
        if _free_dims_swapped(jaxpr.eqns[i], permutation):
            swapped[i] = _swapped_dot(jaxpr.eqns[i], eqn.outvars[0], permutation)
            folded.add(j)
    eqns = []
    for i, eqn in enumerate(jaxpr.eqns):
        if i in folded:
            continue
        eqn = swapped.get(i, eqn)
        if not _is_kernel(eqn.primitive.name):
            params = {key: _fold_inner(value) for key, value in eqn.params.items()}
            if any(params[key] is not value for key, value in eqn.params.items()):
                eqn = eqn.replace(params=params)
        eqns.append(eqn)
    return jaxpr.replace(eqns=eqns)


def fold_transposes(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` (positional array-pytree arguments) with its dot-then-transpose pairs folded.

    Same results as ``fn`` up to float summation order. Meant to be wrapped in ``jax.jit``:
    the rewrite runs when ``fn`` is traced (once per compilation), not per call.
    """

    @functools.wraps(fn)
    def folded(*args: Any) -> Any:
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
        jaxpr = jex.ClosedJaxpr(_fold(closed.jaxpr), closed.consts)
        out = jex.jaxpr_as_fun(jaxpr)(*jax.tree.leaves(args))
        return jax.tree.unflatten(jax.tree.structure(out_shape), out)

    return folded
