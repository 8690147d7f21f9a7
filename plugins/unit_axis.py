"""A per-device function run on per-device blocks that keep a leading axis of size 1.

``lift(fn)`` takes and returns what ``fn`` does with one more leading axis, of size 1, on every
array. ``plugins.sharding.pmap`` uses it. Its ``jax.shard_map`` over a 1-D mesh hands each device
its block of a pmap-style argument, of shape ``(1, ...)``, and ``fn`` wants the ``(...)`` inside.
The two obvious bridges each cost something on XLA:CPU:

- Squeeze the block on the way in and expand it on the way out (``x[0]``, ``y[None]``). This is
  how ``jax.pmap`` is built. Each output is then a reshape of the update that computes it, and
  XLA can no longer write a donated buffer in place: it copies every donated array every step
  (``python -m benchmarks.run pmap_floor``).
- ``jax.vmap(fn)`` over the size-1 axis. Every operation becomes a batched one, and JAX's
  batching rules for convolutions and matrix products add layout changes that XLA does not
  undo. A ResNet step with batch norm, on one CPU device, ran 8-12 % slower than the same
  step unbatched in five A/B runs of six (3 % in the sixth).

``lift`` evaluates ``fn``'s jaxpr one equation at a time instead. Each equation runs on squeezed
operands (a reshape that drops a size-1 axis is free, a bitcast), exactly as in ``fn``. The
exception is an elementwise equation whose results reach ``fn``'s outputs only through other
elementwise equations (the optimizer update of each parameter, the counters, the metrics
sums). Those run on the ``(1, ...)`` blocks themselves, so the update writes each output in
its final shape and a donated buffer is updated in place. Calls to ``jax.jit`` functions are
inlined first (``jnp.where`` is one), so a tail inside them counts too. Every other equation
(collectives, loops, conditionals, custom derivatives, kernels) is bound as it is, on squeezed
operands. No operation changes; only shapes gain or lose a size-1 axis.

One exception, for one device: a collective (``COLLECTIVES``) over axes of size 1 only
(``axis_env``) is evaluated the way ``jax.vmap`` evaluates it over a size-1 axis (a sum, max
or min is its operand), which leaves no collective in the program. XLA:CPU runs each
all-reduce as a synchronisation even with one participant; a ResNet step with batch norm (11
of them) ran about 5 % slower with them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.extend.core as jex
import jax.numpy as jnp

__all__ = ["lift"]

# lax primitives that apply one scalar function to each element (any rank; rank-0 operands
# broadcast): they give the same values on a (1, ...) block as on the squeezed one.
ELEMENTWISE = frozenset(
    """abs acos acosh add add_any and asin asinh atan atan2 atanh cbrt ceil clamp complex conj
    convert_element_type copy cos cosh digamma div eq erf erf_inv erfc exp exp2 expm1 floor ge
    gt imag integer_pow is_finite le lgamma log log1p logistic lt max min mul ne neg nextafter
    not or population_count pow real reduce_precision rem round rsqrt select_n shift_left
    shift_right_arithmetic shift_right_logical sign sin sinh sqrt square sub tan tanh
    xor""".split()
)
# Collectives over named axes, which ``jax.vmap`` can evaluate over an axis of size 1.
COLLECTIVES = frozenset(
    "all_gather all_to_all axis_index pbroadcast pmax pmin ppermute psum reduce_scatter".split()
)
# Those among them that, over axes of size 1, are their operands.
_IDENTITY_ALONE = frozenset("psum pmax pmin".split())
_CALL_JAXPR = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr"}


def _bind(eqn: jex.JaxprEqn, args: Sequence[Any]) -> list[Any]:
    """``eqn``'s primitive applied to ``args``; always a list of results."""
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*args, **eqn.primitive.get_bind_params(eqn.params))
    return list(out) if eqn.primitive.multiple_results else [out]


def _inline(jaxpr: jex.Jaxpr, consts: Sequence[Any], args: Sequence[Any]) -> list[Any]:
    """Evaluates ``jaxpr`` with the bodies of ``jax.jit`` calls evaluated in place (to be traced
    into one flat jaxpr)."""
    env: dict[jex.Var, Any] = {}
    read = lambda v: v.val if isinstance(v, jex.Literal) else env[v]  # noqa: E731
    env.update(zip(jaxpr.constvars, consts, strict=True))
    env.update(zip(jaxpr.invars, args, strict=True))
    for eqn in jaxpr.eqns:
        args_in = [read(v) for v in eqn.invars]
        inner = eqn.params.get(_CALL_JAXPR.get(eqn.primitive.name, ""))
        if isinstance(inner, jex.ClosedJaxpr):
            out = _inline(inner.jaxpr, inner.consts, args_in)
        else:
            out = _bind(eqn, args_in)
        env.update(zip(eqn.outvars, out, strict=True))
    return [read(v) for v in jaxpr.outvars]


def _broadcasts(v: Any, out_shape: tuple[int, ...]) -> bool:
    """Whether operand ``v`` is a rank-0 value broadcast against a larger elementwise result."""
    return v.aval.shape == () and out_shape != ()


def _fits(shape: tuple[int, ...], out_shape: tuple[int, ...]) -> bool:
    """Whether an operand of ``shape`` meets an elementwise result of ``out_shape`` dimension by
    dimension (equal, or 1 and broadcast: lax allows both), so that it still does with the unit
    axis in front of both."""
    return len(shape) == len(out_shape) and all(
        d in (1, o) for d, o in zip(shape, out_shape, strict=True)
    )


def _tail(jaxpr: jex.Jaxpr) -> set[int]:
    """Indices of the elementwise equations whose results reach the outputs through elementwise
    equations only."""
    wanted = {v for v in jaxpr.outvars if isinstance(v, jex.Var)}
    tail: set[int] = set()
    for i in reversed(range(len(jaxpr.eqns))):
        eqn = jaxpr.eqns[i]
        if eqn.primitive.name not in ELEMENTWISE or not any(v in wanted for v in eqn.outvars):
            continue
        shape = eqn.outvars[0].aval.shape
        if any(v.aval.shape != shape for v in eqn.outvars) or not all(
            _broadcasts(v, shape) or _fits(v.aval.shape, shape) for v in eqn.invars
        ):
            continue  # not the plain elementwise form: evaluate it squeezed
        tail.add(i)
        wanted.update(v for v in eqn.invars if isinstance(v, jex.Var))
    return tail


def _axis_names(eqn: jex.JaxprEqn) -> set[Any]:
    """The named axes a collective equation spans; empty for any other equation."""
    if eqn.primitive.name not in COLLECTIVES:
        return set()
    names = eqn.params.get("axes", eqn.params.get("axis_name", ()))
    return set(names) if isinstance(names, tuple | list) else {names}


def _bind_alone(eqn: jex.JaxprEqn, args: Sequence[Any], axes: set[Any]) -> list[Any]:
    """A collective over axes of size 1 evaluated as ``jax.vmap`` evaluates it over such an axis:
    what one participant gets, with no collective left for XLA to run. A sum, max or min is its
    operands themselves: vmap's reduction over the size-1 axis would leave XLA a reshape that
    keeps it from seeing through, e.g., the concatenation a synced batch norm reduces."""
    if eqn.primitive.name in _IDENTITY_ALONE:
        return [jnp.asarray(x, v.aval.dtype) for x, v in zip(args, eqn.outvars, strict=True)]
    fn = lambda *xs: _bind(eqn, xs)  # noqa: E731
    for name in axes:
        fn = jax.vmap(fn, axis_name=name, axis_size=1)
    expanded = [jnp.reshape(x, (1,) * len(axes) + jnp.shape(x)) for x in args]
    return [jnp.reshape(out, jnp.shape(out)[len(axes) :]) for out in fn(*expanded)]


def _evaluate(
    jaxpr: jex.Jaxpr, consts: Sequence[Any], blocks: Sequence[Any], alone: frozenset = frozenset()
) -> list[Any]:
    """Evaluates a flat ``jaxpr`` (traced on squeezed shapes) on ``(1, ...)`` blocks; collectives
    over only the axes in ``alone`` (of size 1) are evaluated without a collective."""
    tail = _tail(jaxpr)
    env: dict[jex.Var, tuple[Any, bool]] = {}  # var -> (value, has the leading axis)

    def read(v: Any, blocked: bool) -> Any:
        value, has_axis = (v.val, False) if isinstance(v, jex.Literal) else env[v]
        if blocked and not has_axis:
            return jnp.reshape(jnp.asarray(value, v.aval.dtype), (1, *v.aval.shape))
        if has_axis and not blocked:
            return jnp.reshape(value, v.aval.shape)
        return value

    env.update((v, (c, False)) for v, c in zip(jaxpr.constvars, consts, strict=True))
    env.update((v, (b, True)) for v, b in zip(jaxpr.invars, blocks, strict=True))
    for i, eqn in enumerate(jaxpr.eqns):
        blocked = i in tail
        shape = eqn.outvars[0].aval.shape if blocked else ()
        args = [read(v, blocked and not _broadcasts(v, shape)) for v in eqn.invars]
        axes = _axis_names(eqn)
        out = _bind_alone(eqn, args, axes) if axes and axes <= alone else _bind(eqn, args)
        env.update((v, (o, blocked)) for v, o in zip(eqn.outvars, out, strict=True))
    return [read(v, True) for v in jaxpr.outvars]


def lift(fn: Callable[..., Any], *, axis_env: Sequence[tuple[str, int]] = ()) -> Callable[..., Any]:
    """``fn`` on arrays with an extra leading axis of size 1, in and out.

    The same values as ``jax.vmap(fn)`` on such arrays (and as ``fn`` on them squeezed), with
    the program of ``fn`` itself plus free reshapes. Meant to be traced: inside ``jax.jit`` or a
    ``shard_map`` body, where the work happens once per compilation.

    Args:
      fn: a function of positional array pytrees.
      axis_env: ``(name, size)`` of each named axis ``fn``'s collectives use (``psum`` over
        ``'batch'``...): under a ``shard_map``, its mesh axes. ``jax.lax.pmean`` and
        ``axis_size`` read the size when ``fn`` is traced; collectives over axes of size 1
        only are computed without one.

    Raises:
      ValueError: an argument without a leading axis of size 1.
    """

    alone = frozenset(name for name, size in axis_env if size == 1)

    @functools.wraps(fn)
    def lifted(*args: Any) -> Any:
        leaves, tree = jax.tree.flatten(args)
        for leaf in leaves:
            if jnp.shape(leaf)[:1] != (1,):
                raise ValueError(
                    f"unit_axis.lift({getattr(fn, '__name__', fn)!r}): every argument needs a "
                    f"leading axis of size 1; got an array of shape {jnp.shape(leaf)}"
                )
        avals = [jax.typeof(x) for x in leaves]
        squeezed = [
            jax.ShapeDtypeStruct(a.shape[1:], a.dtype, weak_type=a.weak_type) for a in avals
        ]
        flat_fn = lambda *xs: fn(*jax.tree.unflatten(tree, xs))  # noqa: E731
        closed, out_shape = jax.make_jaxpr(flat_fn, axis_env=list(axis_env), return_shape=True)(
            *squeezed
        )
        flat = jax.make_jaxpr(
            lambda *xs: _inline(closed.jaxpr, closed.consts, xs), axis_env=list(axis_env)
        )(*squeezed)
        out = _evaluate(flat.jaxpr, flat.consts, leaves, alone)
        return jax.tree.unflatten(jax.tree.structure(out_shape), out)

    return lifted
