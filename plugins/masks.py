"""Canonical parameter paths, predicates, label trees and masks over any pytree.

Every function here works the same on a Linen params dict (or ``FrozenDict``), an ``nnx.State``
(e.g. ``nnx.state(model, nnx.Param)``), an Equinox module (``eqx.filter(model, eqx.is_array)``),
and plain nested dicts, lists and tuples.

A parameter's *path* is its keys joined by ``'/'``: ``'Dense_0/kernel'`` (Linen),
``'linear1/kernel'`` (NNX), ``'layers/0/weight'`` (Equinox). The ``.value`` attribute of Flax
variables is not part of the path.

Predicates take ``(path, leaf)``. The ``path`` they receive is a :class:`Path`: a tuple of the
key strings (so ``'kernel' in path`` and ``path[-1] == 'bias'`` work, as the optax cheat sheets
write them) whose ``str()`` is the ``'/'``-joined path (so ``'embedding' in str(path)`` works too).

Wherever a selection of parameters is asked for (``match``, ``decay_mask``, ``partition``,
``freeze`` and the optimizer config's ``weight_decay_mask``, ``freeze`` and
``param_groups[i].match``), it may be given as:

- a regex, or a list of them (``re.search`` on the path string; any may match);
- a predicate ``(path, leaf) -> bool``;
- a tree of bools like the parameters (what optax's ``mask=`` takes), matched by path;
- a function ``params -> tree of bools`` (the other form optax's ``mask=`` takes), recognised by
  its one positional argument.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import numpy as np
import optax

from plugins.config_errors import ConfigError

PyTree = Any
Predicate = Callable[["Path", Any], bool]
# A regex, a list of regexes, a predicate, a bool tree or a ``params -> bool tree`` function.
Patterns = str | Sequence[str] | Predicate | PyTree


class Path(tuple):
    """A parameter path: a tuple of key strings whose ``str()`` is ``'/'``-joined."""

    def __str__(self) -> str:
        return "/".join(self)

    def __repr__(self) -> str:
        return f"Path({str(self)!r})"


def _key_str(key: Any) -> str:
    """Returns the plain string of one jax key-path entry."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _is_flax_variable(x: Any) -> bool:
    """True for ``nnx.Variable`` instances (imported lazily: flax is optional here)."""
    nnx = _nnx()
    return nnx is not None and isinstance(x, nnx.Variable)


def _nnx():
    try:
        from flax import nnx
    except ImportError:  # pragma: no cover - flax is a dependency, but masks do not need it
        return None
    return nnx


def leaf_paths(tree: PyTree) -> list[Path]:
    """Returns the :class:`Path` of every leaf of ``tree``, in ``jax.tree.leaves`` order."""
    paths: list[Path] = []
    outer, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_flax_variable)
    for keypath, node in outer:
        prefix = tuple(_key_str(k) for k in keypath)
        if _is_flax_variable(node):
            inner, _ = jax.tree_util.tree_flatten_with_path(node)
            for inner_path, _leaf in inner:
                # Drop the variable's own ``.value`` attribute from the path.
                rest = tuple(_key_str(k) for k in inner_path[1:])
                paths.append(Path(prefix + rest))
        else:
            paths.append(Path(prefix))
    return paths


def map_with_paths(fn: Callable[[Path, Any], Any], tree: PyTree) -> PyTree:
    """Maps ``fn(path, leaf)`` over the leaves of ``tree``, keeping its structure.

    Unlike ``jax.tree_util.tree_map_with_path``, ``path`` is a canonical :class:`Path`.
    """
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return jax.tree_util.tree_unflatten(
        treedef, [fn(p, x) for p, x in zip(leaf_paths(tree), leaves, strict=True)]
    )


def _unwrapped(tree: PyTree) -> PyTree:
    """``tree`` with each ``nnx.Variable`` replaced by its value: the structure of the arrays
    ``nnx.Optimizer`` hands optax (a tree of plain leaves is also a prefix of the variables')."""
    return jax.tree.map(
        lambda x: x.get_value() if _is_flax_variable(x) else x, tree, is_leaf=_is_flax_variable
    )


def path_tree(tree: PyTree) -> PyTree:
    """Returns a tree like ``tree`` whose leaves are their ``'/'``-joined path strings."""
    return map_with_paths(lambda path, _: str(path), tree)


def path_strings(tree: PyTree) -> list[str]:
    """Returns every leaf's ``'/'``-joined path, in leaf order."""
    return [str(p) for p in leaf_paths(tree)]


# ----------------------------------------------------------------------------- predicates

_NORM_SCALE = re.compile(r"(^|/)([^/]*(norm|ln|bn)[^/]*)/(scale|weight|gamma)$", re.IGNORECASE)


def is_bias(path: Path, leaf: Any) -> bool:
    """True for biases: the last key is ``bias``/``b``/``beta``... (``beta`` of norms)."""
    return path[-1].lower() in ("bias", "b", "beta") if path else False


def is_norm_scale(path: Path, leaf: Any) -> bool:
    """True for normalisation scales: ``LayerNorm_0/scale``, ``bn/scale``, ``norm/weight``."""
    return bool(_NORM_SCALE.search(str(path)))


def is_embedding(path: Path, leaf: Any) -> bool:
    """True for embedding tables: any key containing ``embed`` (``Embed_0/embedding``...)."""
    return any("embed" in key.lower() for key in path)


def is_matrix(path: Path, leaf: Any) -> bool:
    """True for leaves of rank >= 2 (dense and conv kernels, embeddings)."""
    return getattr(leaf, "ndim", 0) >= 2


def is_2d_non_embedding(path: Path, leaf: Any) -> bool:
    """True for rank-2 weights that are not embeddings: what Muon should update."""
    return getattr(leaf, "ndim", 0) == 2 and not is_embedding(path, leaf)


# ----------------------------------------------------------------------------- matching


def compile_patterns(patterns: str | Iterable[str], where: str = "patterns") -> list[re.Pattern]:
    """Compiles regexes, raising ``ConfigError`` naming ``where`` for an invalid one."""
    if isinstance(patterns, str):
        patterns = [patterns]
    compiled = []
    for i, pattern in enumerate(patterns):
        if not isinstance(pattern, str):
            raise ConfigError(f"{where}[{i}] must be a regex string, got {pattern!r}")
        try:
            compiled.append(re.compile(pattern))
        except re.error as e:
            raise ConfigError(f"{where}[{i}]: invalid regex {pattern!r}: {e}") from None
    return compiled


def _required_positional(fn: Callable[..., Any]) -> int | None:
    """How many positional arguments ``fn`` requires (``None`` when it has no signature)."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(1 for p in parameters if p.kind in positional and p.default is p.empty)


def is_mask_function(value: Any) -> bool:
    """True for an optax-style mask function ``params -> tree of bools`` (one positional
    argument), as opposed to a predicate ``(path, leaf) -> bool``."""
    return callable(value) and _required_positional(value) == 1


def _is_bool(leaf: Any) -> bool:
    if isinstance(leaf, bool | np.bool_):
        return True
    return getattr(leaf, "dtype", None) == np.bool_ and getattr(leaf, "shape", None) == ()


def is_mask_tree(value: Any) -> bool:
    """True for a non-empty tree (dict, ``nnx.State``, list...) whose leaves are all bools."""
    if isinstance(value, str) or callable(value):
        return False
    leaves = jax.tree.leaves(value)
    return bool(leaves) and all(_is_bool(leaf) for leaf in leaves)


def _mask_tree_of(patterns: Any, tree: PyTree | None, where: str) -> PyTree | None:
    """The bool tree that ``patterns`` stands for, or ``None`` when it is a regex or predicate."""
    if is_mask_function(patterns):
        if tree is None:
            raise TypeError(
                f"{where}: a mask function params -> tree needs the parameters it applies to"
            )
        result = patterns(tree)
        if not is_mask_tree(result):
            raise ConfigError(
                f"{where}: the mask function returned {type(result).__name__}, "
                "not a tree of bools like the parameters"
            )
        return result
    return patterns if is_mask_tree(patterns) else None


def as_predicate(patterns: Patterns, where: str = "patterns", *, tree: PyTree = None) -> Predicate:
    """Turns any selection (see the module docstring) into a predicate ``(path, leaf) -> bool``.

    A bool tree selects the paths where it holds True. A mask function ``params -> bool tree``
    is evaluated on ``tree``, which it needs.
    """
    mask_tree = _mask_tree_of(patterns, tree, where)
    if mask_tree is not None:
        chosen = {
            str(path)
            for path, keep in zip(leaf_paths(mask_tree), jax.tree.leaves(mask_tree), strict=True)
            if keep
        }
        return lambda path, leaf: str(path) in chosen
    if callable(patterns):
        return patterns
    compiled = compile_patterns(patterns, where)
    return lambda path, leaf: any(p.search(str(path)) for p in compiled)


def match(tree: PyTree, patterns: Patterns, *, keep_variables: bool = False) -> PyTree:
    """Returns a bool tree like ``tree``: True where the path matches ``patterns``.

    Of an ``nnx.State`` the tree has plain leaves, as ``nnx.Optimizer`` passes parameters to
    optax's ``update`` (a prefix of the state's ``Variable`` nodes, which its ``init`` gets).
    ``keep_variables=True`` keeps them: for a mask computed inside optax from the tree it got.
    """
    predicate = as_predicate(patterns, tree=tree)
    result = map_with_paths(lambda path, leaf: bool(predicate(path, leaf)), tree)
    return result if keep_variables else _unwrapped(result)


def check_patterns_match(tree: PyTree, patterns: Patterns, where: str) -> None:
    """Raises ``ConfigError`` naming ``where`` for a regex that matches no parameter path, or a
    bool tree (or a mask function's result) whose paths are not the parameters' paths.

    The message lists the paths nearest to the pattern so typos are easy to spot. Predicates
    are not checked.
    """
    import difflib

    paths = path_strings(tree)
    mask_tree = _mask_tree_of(patterns, tree, where)
    if mask_tree is not None:
        given = path_strings(mask_tree)
        known, selected = set(paths), set(given)
        missing = [p for p in paths if p not in selected]
        extra = [p for p in given if p not in known]
        if missing or extra:
            raise ConfigError(
                f"{where}: the mask tree's paths are not the parameters': "
                f"missing {missing[:5]}, not parameters {extra[:5]}"
            )
        return
    if callable(patterns):
        return
    if isinstance(patterns, str):
        patterns = [patterns]
    for i, pattern in enumerate(compile_patterns(patterns, where)):
        if not any(pattern.search(p) for p in paths):
            close = difflib.get_close_matches(pattern.pattern, paths, n=3, cutoff=0.3)
            hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
            raise ConfigError(
                f"{where}[{i}]: regex {pattern.pattern!r} matches no parameter{hint}; "
                f"paths are: {', '.join(paths[:20])}{' ...' if len(paths) > 20 else ''}"
            )


def label_tree(
    tree: PyTree, fn: Callable[[Path, Any], Any], *, keep_variables: bool = False
) -> PyTree:
    """Returns a tree like ``tree`` whose leaves are ``fn(path, leaf)`` (e.g. group labels),
    ready for ``optax.multi_transform``/``optax.partition``; ``nnx.State`` and
    ``keep_variables`` as in :func:`match`."""
    result = map_with_paths(fn, tree)
    return result if keep_variables else _unwrapped(result)


def labels_by_patterns(
    tree: PyTree,
    groups: Sequence[tuple[Any, Patterns]],
    default: Any = "default",
    *,
    keep_variables: bool = False,
) -> PyTree:
    """Labels each leaf with the label of the first ``(label, patterns)`` group it matches;
    ``nnx.State`` and ``keep_variables`` as in :func:`match`."""
    predicates = [(label, as_predicate(p, tree=tree)) for label, p in groups]

    def label(path: Path, leaf: Any) -> Any:
        for name, predicate in predicates:
            if predicate(path, leaf):
                return name
        return default

    return label_tree(tree, label, keep_variables=keep_variables)


def decay_mask(
    tree: PyTree, spec: Patterns = "matrices", *, keep_variables: bool = False
) -> PyTree:
    """Returns the weight-decay mask of ``tree``: True where weight decay applies.

    ``spec`` is ``'all'``, ``'matrices'`` (rank >= 2: kernels and embeddings, not biases or
    norm scales), or any selection (regexes, a predicate, a bool tree, a mask function).
    ``nnx.State`` and ``keep_variables`` as in :func:`match`.
    """
    return match(tree, decay_predicate(spec, tree=tree), keep_variables=keep_variables)


def is_named(spec: Any, name: str) -> bool:
    """Whether a weight-decay mask spec is the named one (``'all'``, ``'matrices'``); a bool
    tree is never equal to a name (and must not be compared with ``==``: arrays compare
    elementwise)."""
    return isinstance(spec, str) and spec == name


def decay_predicate(spec: Patterns = "matrices", *, tree: PyTree = None) -> Predicate:
    """The predicate ``(path, leaf) -> bool`` of a weight-decay mask spec (see ``decay_mask``);
    ``tree`` is needed only by a mask function."""
    if is_named(spec, "all"):
        return lambda path, leaf: True
    if is_named(spec, "matrices"):
        return is_matrix
    return as_predicate(spec, "weight_decay_mask", tree=tree)


def decay_mask_fn(spec: Patterns = "matrices") -> Callable[[PyTree], PyTree]:
    """Returns ``params -> decay_mask(params, spec)``, the callable form optax's ``mask=`` takes."""
    return lambda params: decay_mask(params, spec, keep_variables=True)


# ----------------------------------------------------------------------------- partition


def partition(
    condition: Patterns | None = None,
    true_transform: optax.GradientTransformation | None = None,
    false_transform: optax.GradientTransformation | None = None,
    *,
    true_gradient_transform: optax.GradientTransformation | None = None,
    false_gradient_transform: optax.GradientTransformation | None = None,
) -> optax.GradientTransformation:
    """Applies ``true_transform`` to the parameters where ``condition`` holds and
    ``false_transform`` to the rest, each with its own state (no state for the other part).

    ``condition`` is a predicate ``(path, leaf) -> bool`` (``path`` behaves as a tuple of keys and
    as a ``'/'``-joined string), a regex, a list of regexes, a bool tree or a mask function
    ``params -> bool tree``. The cheat-sheet spelling
    ``partition(condition=..., true_gradient_transform=..., false_gradient_transform=...)`` works
    too. Built on ``optax.partition``.
    """
    true_transform = true_transform or true_gradient_transform
    false_transform = false_transform or false_gradient_transform
    if condition is None or true_transform is None or false_transform is None:
        raise TypeError("partition() needs condition, true_transform and false_transform")
    if not is_mask_function(condition):
        as_predicate(condition, "condition")  # a bad regex fails here, not at init

    def labels(params: PyTree) -> PyTree:
        predicate = as_predicate(condition, "condition", tree=params)
        return map_with_paths(lambda path, leaf: bool(predicate(path, leaf)), params)

    return optax.partition({True: true_transform, False: false_transform}, labels)


def freeze(
    transform: optax.GradientTransformation, frozen: Patterns
) -> optax.GradientTransformation:
    """Wraps ``transform`` so the parameters matching ``frozen`` never change and get no
    optimizer state (their updates are zero)."""
    return partition(frozen, optax.set_to_zero(), transform)


def summary(
    params: PyTree,
    optimizer_config: Any,
    *,
    total_steps: int,
    mesh: Any = None,
    partition: Callable[[str, Any], Any] | None = None,
) -> str:
    """Returns a table of every parameter: path, shape, size, group, lr multiplier, weight decay,
    frozen or not, and the transform that updates it; with totals for parameters and for the
    optimizer state that ``plugins.optim.create(optimizer_config, ...)`` allocates. With a
    ``mesh`` and a ``partition`` rule (``plugins.sharding.partition_rule``): each parameter's
    sharding and bytes per device, and the totals per device."""
    from plugins import optim  # optim builds on masks; import lazily to keep masks light

    return optim.summary(
        params, optimizer_config, total_steps=total_steps, mesh=mesh, partition=partition
    )
