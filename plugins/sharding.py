"""Device placement for data-parallel training: pmap helpers, mesh helpers, multi-host setup.

pmap (per-process view, leading axis = this process's local devices):

- ``replicate(tree)`` / ``unreplicate(tree)``: state with a leading device axis and back.
- ``shard(batch)``: a host batch ``(B, ...)`` reshaped to ``(devices, B // devices, ...)``.
- ``shard_prng_key(key)``: one key per local device.
- ``prefetch_to_device(iterator, size=2)``: sharded batches put on the devices ahead of use.
- ``pad_shard_unpad(fn)``: call a pmapped function on a batch that does not divide over devices.
- ``pmap(fn, axis_name, donate_argnums=...)``: ``jax.pmap``'s contract, with donated buffers
  updated in place (``jax.pmap`` copies them every step on XLA:CPU).

Mesh (``jax.jit`` with ``jax.sharding``, global view):

- ``data_mesh()``: a 1-D mesh over every device of every process (``jax.make_mesh``, axis type
  given: ``Auto`` by default, ``Explicit`` on request; use it with ``jax.set_mesh``).
- ``batch_sharding(mesh)`` / ``replicated_sharding(mesh)``: leading-axis-sharded / replicated.
- ``global_batch(mesh, local_batch)``: process-local numpy batches to one global ``jax.Array``
  per leaf (``jax.make_array_from_process_local_data``).
- ``mesh_from_axes({'data': -1, 'fsdp': 2})``: a named mesh from config (``-1``: the devices
  left; ``MeshError`` when the sizes do not fit the devices).
- ``place(tree, shardings)``, ``place_replicated(tree, mesh)``, ``state_shardings(mesh, state,
  param_sharding=None)``: the train state's placement, replicated or per leaf;
  ``partition_rule(mesh, rules)``: big_vision-style ``(regex, spec)`` rules, first match wins,
  then FSDP (``fsdp_spec``: each large leaf's largest dimension divisible by the ``fsdp`` axis);
  ``bytes_per_device(tree)``.

Multi-host: ``initialize_distributed(...)`` and ``assert_same_across_processes(tree)``.

Nothing here uses the deprecated ``jax.device_put_replicated`` / ``jax.device_put_sharded``;
placement goes through ``jax.device_put`` and ``jax.make_array_from_*`` with explicit shardings.
"""

from __future__ import annotations

import collections
import functools
import inspect
import itertools
import math
import os
import re
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec, Sharding

from plugins import masks, unit_axis

PyTree = Any
T = TypeVar("T")

# Axis name of the 1-D mesh behind pmap-style placement (the name is not visible to pmap).
_PMAP_AXIS = "devices"


# --------------------------------------------------------------------------------------------
# helpers


def _named_leaves(tree: PyTree) -> list[tuple[str, Any]]:
    """``(path, leaf)`` pairs with canonical ``'/'``-joined paths (see ``plugins.masks``)."""
    paths = masks.path_strings(tree)
    return [(path or "<root>", x) for path, x in zip(paths, jax.tree.leaves(tree), strict=True)]


def _leading_dim(name: str, x: Any, what: str) -> int:
    shape = np.shape(x)
    if not shape:
        raise ValueError(
            f"{what}: leaf {name!r} is a scalar; every leaf needs a leading batch axis"
        )
    return shape[0]


def _batch_size(tree: PyTree, what: str) -> int:
    """The common leading dimension of every leaf, with one clear error when they disagree."""
    # Per step on the hot path: the common case costs one flatten (none for a flat dict of
    # numpy arrays), no path names.
    if type(tree) is dict and all(type(x) is np.ndarray for x in tree.values()):
        shapes = [x.shape for x in tree.values()]
    else:
        shapes = [np.shape(x) for x in jax.tree.leaves(tree)]
    if shapes and all(shapes) and len({shape[0] for shape in shapes}) == 1:
        return shapes[0][0]
    sizes = {}
    for name, x in _named_leaves(tree):
        sizes.setdefault(_leading_dim(name, x, what), name)
    if not sizes:
        raise ValueError(f"{what}: the batch has no arrays")
    if len(sizes) > 1:
        listing = ", ".join(f"{leaf!r}: {size}" for size, leaf in sizes.items())
        raise ValueError(f"{what}: leaves disagree on the batch size ({listing})")
    return next(iter(sizes))


def _local_devices(devices: Sequence[jax.Device] | None) -> list[jax.Device]:
    return list(jax.local_devices() if devices is None else devices)


def _pmap_sharding(devices: Sequence[jax.Device]) -> NamedSharding:
    """Leading axis split over ``devices``, one slice each: the layout pmap expects."""
    return NamedSharding(Mesh(np.asarray(devices), (_PMAP_AXIS,)), PartitionSpec(_PMAP_AXIS))


def _host_local(x: Any) -> np.ndarray:
    """This process's part of ``x`` as numpy, stacked along the leading axis."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if x.sharding.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
        return np.concatenate([np.asarray(s.data) for s in shards], axis=0)
    return np.asarray(jax.device_get(x))


# --------------------------------------------------------------------------------------------
# pmap helpers


def replicate(tree: PyTree, devices: Sequence[jax.Device] | None = None) -> PyTree:
    """Copies every leaf to each device, adding a leading axis of ``len(devices)``.

    Args:
      tree: a pytree of arrays (numpy, jax or Python scalars), e.g. a train state.
      devices: target devices; default ``jax.local_devices()`` (the devices ``jax.pmap`` uses).

    Returns:
      The same pytree, each leaf a ``jax.Array`` of shape ``(len(devices), *leaf.shape)`` with
      one copy per device, ready for a ``jax.pmap``-ed function.
    """
    devices = _local_devices(devices)
    sharding = _pmap_sharding(devices)

    def _local(x):
        if isinstance(x, jax.Array):
            x = x.addressable_data(0) if not x.is_fully_addressable else x
            # One device for every device leaf, so that one program can take them all.
            return x if x.sharding.device_set == {devices[0]} else jax.device_put(x, devices[0])
        return np.asarray(x)

    leaves, treedef = jax.tree.flatten(jax.tree.map(_local, tree))
    # Device arrays get their leading axis in one compiled program for the whole tree (one
    # compile instead of one per leaf shape); host arrays get it for free in numpy.
    on_device = [i for i, x in enumerate(leaves) if isinstance(x, jax.Array)]
    if on_device:
        expanded = _add_leading_axis([leaves[i] for i in on_device])
        for i, x in zip(on_device, expanded, strict=True):
            leaves[i] = x
    out = []
    for x in leaves:
        one = x if isinstance(x, jax.Array) else x[None]
        copies = [jax.device_put(one, d) for d in devices]
        out.append(
            jax.make_array_from_single_device_arrays(
                (len(devices), *one.shape[1:]), sharding, copies
            )
        )
    return jax.tree.unflatten(treedef, out)


@jax.jit
def _add_leading_axis(leaves: list[jax.Array]) -> list[jax.Array]:
    return [x[None] for x in leaves]


@jax.jit
def _drop_leading_axis(leaves: list[jax.Array]) -> list[jax.Array]:
    return [x[0] for x in leaves]


def unreplicate(tree: PyTree) -> PyTree:
    """Inverse of ``replicate``: the first device's copy of every leaf (leading axis dropped).

    Works on pmap outputs in multi-process runs too (it reads only this process's first shard).
    """

    leaves, treedef = jax.tree.flatten(tree)
    on_device = [i for i, x in enumerate(leaves) if isinstance(x, jax.Array)]
    # One compiled program for the whole tree, not one per leaf shape.
    firsts = (
        _drop_leading_axis([leaves[i].addressable_data(0) for i in on_device]) if on_device else []
    )
    firsts_by_index = dict(zip(on_device, firsts, strict=True))
    out = [firsts_by_index[i] if i in firsts_by_index else x[0] for i, x in enumerate(leaves)]
    return jax.tree.unflatten(treedef, out)


def global_replicated(tree: PyTree) -> PyTree:
    """A pmap-replicated tree as global arrays replicated over every device of every process.

    Each leaf of ``tree`` is a ``jax.Array`` with a leading axis of this process's devices and
    the same copy on each (as ``replicate`` and pmapped steps make them); it becomes one
    ``jax.Array`` without that axis, fully replicated over ``jax.devices()``, reusing those
    copies. This is what a multi-process pmap run checkpoints: orbax saves only global arrays
    (a replicated one once), and ``replicate`` takes them back. Every process calls it on its
    own part. Single-process, it gives the same values as ``unreplicate``.
    """
    leaves, treedef = jax.tree.flatten(tree)
    devices = jax.local_devices()
    replicated = NamedSharding(Mesh(np.array(jax.devices()), ("devices",)), PartitionSpec())
    shards = [{s.device: s.data for s in x.addressable_shards} for x in leaves]
    # Per device, one compiled program drops the leading axis of all of its copies.
    copies = {d: _drop_leading_axis([by_device[d] for by_device in shards]) for d in devices}
    out = [
        jax.make_array_from_single_device_arrays(
            x.shape[1:], replicated, [copies[d][i] for d in devices]
        )
        for i, x in enumerate(leaves)
    ]
    return jax.tree.unflatten(treedef, out)


def shard(batch: PyTree, num_devices: int | None = None) -> PyTree:
    """Reshapes each leaf ``(B, ...)`` to ``(num_devices, B // num_devices, ...)`` for pmap.

    Args:
      batch: a pytree of host arrays sharing the leading batch size ``B``.
      num_devices: default ``jax.local_device_count()``.

    Returns:
      The reshaped pytree (still on the host; pmap or ``prefetch_to_device`` transfers it).

    Raises:
      ValueError: when ``B`` does not divide over the devices or the leaves disagree on ``B``.
    """
    n = jax.local_device_count() if num_devices is None else num_devices
    b = _batch_size(batch, "shard")
    if b % n:
        raise ValueError(
            f"shard: the per-process batch of {b} does not divide over {n} local devices; use a "
            f"batch size that is a multiple of {n} (or pad_shard_unpad for evaluation)"
        )
    if type(batch) is dict and all(type(x) is np.ndarray for x in batch.values()):
        # The usual batch, once per step: numpy's reshape without the pytree machinery.
        return {key: x.reshape(n, b // n, *x.shape[1:]) for key, x in batch.items()}
    return jax.tree.map(lambda x: x.reshape(n, b // n, *np.shape(x)[1:]), batch)


def shard_prng_key(key: jax.Array, num_devices: int | None = None) -> jax.Array:
    """Splits ``key`` into one independent key per local device (leading axis ``num_devices``)."""
    n = jax.local_device_count() if num_devices is None else num_devices
    return jax.random.split(key, n)


def prefetch_to_device(
    iterator: Iterable[PyTree], size: int = 2, devices: Sequence[jax.Device] | None = None
) -> Iterator[PyTree]:
    """Puts the next ``size - 1`` sharded batches on the devices while the current one is used.

    Like ``flax.jax_utils.prefetch_to_device``: the items must already be sharded (leading axis
    = number of devices, e.g. ``map(shard, batches)``); each leaf is split over the devices with
    one ``jax.device_put`` (no host-side stacking copy).

    Args:
      iterator: yields pytrees of arrays with leading axis ``len(devices)``.
      size: how many batches to keep on the devices, the one in use included (2 overlaps one
        transfer with one step).
      devices: default ``jax.local_devices()``.

    Yields:
      The same pytrees with every leaf a ``jax.Array`` sharded over ``devices``.
    """
    _check_size(size, "prefetch_to_device")
    devices = _local_devices(devices)
    sharding = _pmap_sharding(devices)

    def _put(tree):
        b = _batch_size(tree, "prefetch_to_device")
        if b != len(devices):
            raise ValueError(
                f"prefetch_to_device: items need a leading axis of {len(devices)} devices, got "
                f"{b}; shard the batches first, e.g. prefetch_to_device(map(shard, batches))"
            )
        return jax.device_put(tree, sharding)

    return keep_ahead(map(_put, iterator), size)


def _check_size(size: Any, where: str) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"{where}: size must be an int >= 1, got {size!r}")


def keep_ahead(iterator: Iterable[Any], size: int = 2) -> Iterator[Any]:
    """Yields from ``iterator``, producing each item ``size - 1`` items before it is handed out
    (a buffer of ``size``, the item in use included, as ``flax.jax_utils.prefetch_to_device``):
    with items that start device transfers (``jax.device_put``, ``global_batch``), the next
    batches travel while the current one is used."""
    _check_size(size, "keep_ahead")
    return _kept_ahead(iter(iterator), size)


def _kept_ahead(iterator: Iterator[Any], size: int) -> Iterator[Any]:
    queue: collections.deque = collections.deque(itertools.islice(iterator, size))
    while queue:
        yield queue.popleft()
        queue.extend(itertools.islice(iterator, 1))


def pmap(
    fn: Callable[..., Any] | None = None,
    axis_name: str | None = None,
    *,
    donate_argnums: int | Sequence[int] = (),
    devices: Sequence[jax.Device] | None = None,
) -> Callable[..., Any]:
    """``jax.pmap(fn, axis_name, donate_argnums=...)`` whose donated buffers update in place.

    As ``jax.pmap``, it also decorates: ``@sharding.pmap(axis_name='batch')``.

    The same contract as ``jax.pmap`` with ``in_axes=0, out_axes=0``: every argument and output
    has a leading axis of ``len(devices)`` (default: this process's devices), ``fn`` sees one
    device's slice without it, and collectives over ``axis_name`` (``lax.pmean``, ``psum``,
    ``axis_index``, ...) span the devices.

    It is built the way JAX builds ``jax.pmap`` -- ``jax.jit`` of a ``jax.shard_map`` over a
    1-D mesh of the devices named ``axis_name`` -- with one difference in how ``fn`` meets each
    device's ``(1, ...)`` block. ``jax.pmap`` squeezes the size-1 axis off and expands it back on
    the outputs, and XLA:CPU then cannot update a donated buffer in place through that reshape:
    it copies every donated leaf every step (see ``benchmarks/bench_pmap_floor.py``). Here
    ``fn`` goes through ``plugins.unit_axis.lift``: its program runs on squeezed values, except
    the elementwise updates that produce its outputs, which run on the blocks themselves. On one
    device its collectives compile to none (XLA:CPU would synchronise a single participant).

    Across processes (``jax.process_count() > 1``) it returns ``jax.pmap`` itself, which turns
    each process's host-local arrays into global ones and back.

    Args:
      fn: the per-device function. Keyword arguments are mapped too (bound to their
        positions), as ``jax.pmap`` maps them.
      axis_name: the name ``fn``'s collectives use.
      donate_argnums: positions whose buffers the outputs may reuse.
      devices: default ``jax.local_devices()``.

    Returns:
      A function of arrays with the leading device axis (``.lower``, ``.trace`` and
      ``.eval_shape`` work as on a jitted one). An argument whose leading axis is not
      ``len(devices)`` raises ``ValueError`` saying so.
    """
    if fn is None:
        return functools.partial(
            pmap, axis_name=axis_name, donate_argnums=donate_argnums, devices=devices
        )
    if axis_name is None:
        raise TypeError("sharding.pmap needs axis_name: the name fn's collectives use")
    if jax.process_count() > 1:
        return jax.pmap(fn, axis_name, donate_argnums=donate_argnums, devices=devices)
    devices = _local_devices(devices)
    mesh = Mesh(np.asarray(devices), (axis_name,))
    spec = PartitionSpec(axis_name)
    lifted = unit_axis.lift(fn, axis_env=[(axis_name, len(devices))])

    @functools.wraps(fn)
    def per_device(*blocks: Any) -> Any:
        for leaf in jax.tree.leaves(blocks):
            block = jnp.shape(leaf)
            if block[:1] != (1,):  # when traced through .lower(), which skips call's check
                raise _leading_axis_error(len(devices), (len(devices) * block[0], *block[1:]))
        return lifted(*blocks)

    placed = NamedSharding(mesh, spec)
    compiled = jax.jit(
        jax.shard_map(per_device, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False),
        donate_argnums=donate_argnums,
        in_shardings=placed,
        out_shardings=placed,
    )
    signature = _signature(fn)

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        if kwargs:  # mapped like positional ones, as jax.pmap maps them
            args = _as_positional(signature, args, kwargs)
        try:
            return compiled(*args)
        except ValueError:
            _check_leading_axis(args, len(devices))  # the clear error, if that was the cause
            raise

    call.lower = compiled.lower  # type: ignore[attr-defined]
    call.trace = compiled.trace  # type: ignore[attr-defined]
    call.eval_shape = compiled.eval_shape  # type: ignore[attr-defined]
    return call


def _signature(fn: Callable[..., Any]) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):
        return None


def _as_positional(
    signature: inspect.Signature | None, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[Any, ...]:
    """``args`` and ``kwargs`` as positional arguments of the function ``signature`` is of."""
    bound = signature.bind(*args, **kwargs) if signature is not None else None
    if bound is None or bound.kwargs:
        names = ", ".join(kwargs)
        raise TypeError(
            f"sharding.pmap: cannot pass {names} by keyword to this function (keyword-only or "
            "**kwargs parameters); pass them positionally"
        )
    return bound.args


def _leading_axis_error(n: int, shape: tuple[int, ...]) -> ValueError:
    return ValueError(
        f"sharding.pmap: every argument needs a leading axis of {n} (one slice per device); "
        f"got one of shape {tuple(shape)}"
    )


def _check_leading_axis(args: tuple[Any, ...], n: int) -> None:
    """Raises the clear ``ValueError`` when a leaf of ``args`` has no leading axis of ``n``."""
    for leaf in jax.tree.leaves(args):
        shape = jnp.shape(leaf)
        if shape[:1] != (n,):
            raise _leading_axis_error(n, shape) from None


def pad_shard_unpad(
    fn: Callable[..., Any],
    static_argnums: Sequence[int] = (0,),
    static_argnames: Sequence[str] = (),
    static_return: bool = False,
) -> Callable[..., Any]:
    """Wraps a pmapped ``fn`` so it takes batches of any size: pad, shard, call, unshard, unpad.

    Like ``flax.jax_utils.pad_shard_unpad`` (same arguments), with clear errors and multi-process
    safe unsharding. Padding rows are zeros; pass a mask among the arguments (its padding is
    ``False``) when the function reduces over the batch.

    Args:
      fn: a ``jax.pmap``-ed function; non-static arguments get shape ``(devices, per_device, ...)``.
      static_argnums: positions forwarded untouched (default ``(0,)``: the replicated params).
      static_argnames: keyword arguments forwarded untouched.
      static_return: return ``fn``'s output as is (e.g. already-reduced metrics) instead of
        unsharding it and cutting it back to the batch size.

    Returns:
      ``wrapper(*args, min_device_batch=None, **kwargs)``; ``min_device_batch`` pads every
      device to at least that many rows (a fixed eval shape avoids recompiling the last batch).
    """
    static_argnums = tuple(static_argnums)
    static_argnames = tuple(static_argnames)

    @functools.wraps(fn)
    def wrapper(*args, min_device_batch: int | None = None, **kwargs):
        n = jax.local_device_count()
        # Named by position and keyword, so an error points at the argument the caller wrote.
        dynamic = {f"args[{i}]": a for i, a in enumerate(args) if i not in static_argnums}
        dynamic |= {k: v for k, v in kwargs.items() if k not in static_argnames}
        b = _batch_size(dynamic, "pad_shard_unpad")
        per_device = max(-(-b // n), min_device_batch or 0)

        def pad(x):
            x = np.asarray(x)
            extra = n * per_device - x.shape[0]
            if extra:
                x = np.concatenate([x, np.zeros((extra, *x.shape[1:]), x.dtype)], axis=0)
            return x.reshape(n, per_device, *x.shape[1:])

        args = [a if i in static_argnums else jax.tree.map(pad, a) for i, a in enumerate(args)]
        kwargs = {k: v if k in static_argnames else jax.tree.map(pad, v) for k, v in kwargs.items()}
        out = fn(*args, **kwargs)
        if static_return:
            return out

        def unpad(x):
            x = _host_local(x)
            return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])[:b]

        return jax.tree.map(unpad, out)

    return wrapper


# --------------------------------------------------------------------------------------------
# mesh helpers


def data_mesh(
    devices: Sequence[jax.Device] | None = None,
    axis_name: str = "data",
    *,
    axis_type: AxisType = AxisType.Auto,
) -> Mesh:
    """A 1-D mesh named ``axis_name`` over ``devices`` (default: every device of every process).

    Its axis type is given explicitly: ``AxisType.Auto`` by default (XLA propagates shardings
    from the step's ``in_shardings``, so any program runs unchanged), or ``AxisType.Explicit``
    (shardings become part of the arrays' types under ``jax.jit``; some programs then need
    ``out_sharding=`` annotations, e.g. the gradient of ``take_along_axis`` on a sharded batch,
    as in ``optax.losses.softmax_cross_entropy_with_integer_labels``). Default devices
    are laid out by ``jax.make_mesh`` and ordered by process, so that each process's devices hold
    one contiguous block of the global batch (what ``global_batch`` relies on); where
    ``jax.make_mesh`` would interleave processes (a TPU's physical order), the process order is
    kept. Given ``devices`` are used in the order given.
    """
    if devices is not None:
        return Mesh(np.asarray(devices), (axis_name,), axis_types=(axis_type,))
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    mesh = jax.make_mesh((len(devices),), (axis_name,), (axis_type,), devices=devices)
    processes = [d.process_index for d in mesh.devices.flat]
    if processes != sorted(processes):
        mesh = Mesh(np.asarray(devices), (axis_name,), axis_types=(axis_type,))
    return mesh


def _batch_spec(mesh: Mesh) -> PartitionSpec:
    names = tuple(mesh.axis_names)
    return PartitionSpec(names[0] if len(names) == 1 else names)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over all of ``mesh``'s devices, other axes whole."""
    return NamedSharding(mesh, _batch_spec(mesh))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """A full copy on every device of ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


def _leading_parts(sharding: Sharding) -> int | None:
    """How many pieces a ``NamedSharding`` cuts the leading axis into (``None``: another kind
    of sharding, left to JAX to check)."""
    if not isinstance(sharding, NamedSharding):
        return None
    first = sharding.spec[0] if len(sharding.spec) else None
    names = () if first is None else (first if isinstance(first, tuple) else (first,))
    return math.prod(sharding.mesh.shape[name] for name in names)


def _local_leading_parts(sharding: NamedSharding, parts: int) -> int:
    """How many of those pieces this process's devices hold."""
    shape = (parts,) + (sharding.mesh.size,) * (max(len(sharding.spec), 1) - 1)
    here = jax.process_index()
    starts = {
        index[0].start or 0
        for device, index in sharding.devices_indices_map(shape).items()
        if device.process_index == here
    }
    return len(starts)


def _process_devices(mesh: Mesh) -> tuple[int, int]:
    """(this process's devices in ``mesh``, number of processes in ``mesh``)."""
    flat = list(mesh.devices.flat)
    local = sum(d.process_index == jax.process_index() for d in flat)
    return local, len({d.process_index for d in flat})


def global_batch(
    mesh: Mesh,
    local_batch: PyTree,
    *,
    sharding: Sharding | None = None,
    check_processes: bool = False,
) -> PyTree:
    """Turns this process's numpy batch into one global ``jax.Array`` per leaf.

    Every process calls it with its own part of the batch (same shapes everywhere); the result's
    leading axis is the global batch (``processes * local_batch``), split over ``mesh``'s devices,
    ready for a ``jax.jit`` step. On one process it is simply a sharded ``device_put``.

    Args:
      mesh: e.g. ``data_mesh()``.
      local_batch: a pytree of host arrays sharing a leading per-process batch size.
      sharding: default ``batch_sharding(mesh)``.
      check_processes: first verify (one small collective) that every process passes the same
        structure, shapes and dtypes. Off by default: the check waits for the devices, which
        stalls asynchronous dispatch in a hot loop; turn it on for the first batch.

    Returns:
      The same pytree with global ``jax.Array`` leaves.

    Raises:
      ValueError: the leaves disagree on the batch size, the batch does not divide over the
        devices, or (with ``check_processes``) the processes' batches disagree.
    """
    if check_processes:  # before any local error, so that every process joins the collective
        assert_same_across_processes(local_batch, what="per-process batch", shapes_only=True)
    sharding = batch_sharding(mesh) if sharding is None else sharding
    local_devices, processes = _process_devices(mesh)
    b = _batch_size(local_batch, "global_batch")
    if local_devices == 0:
        raise ValueError(
            f"global_batch: process {jax.process_index()} has no device in the mesh {mesh}"
        )
    parts = _leading_parts(sharding)
    local_parts = _local_leading_parts(sharding, parts) if parts else 0
    if local_parts and b % local_parts:
        across = (
            f"the {mesh.size} devices of the mesh"
            if parts == mesh.size
            else f"the {parts} parts its sharding cuts the batch axis into"
        )
        raise ValueError(
            f"global_batch: the global batch of {b * processes} ({processes} process(es) x {b} "
            f"per process) does not divide over {across}: the per-process batch must be a "
            f"multiple of {local_parts} (global batch a multiple of {parts})"
        )
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch
    )


def place_replicated(tree: PyTree, mesh: Mesh) -> PyTree:
    """Puts a full copy of every leaf on every device of ``mesh`` (every process must pass the
    same values, e.g. params initialised from the same seed)."""
    replicated = replicated_sharding(mesh)
    return place(tree, jax.tree.map(lambda _: replicated, tree))


ParamSharding = (
    Callable[[str, Any], "PartitionSpec | Sharding | None"]
    | Sequence[tuple[str, PartitionSpec]]
    | None
)


def state_shardings(mesh: Mesh, state: PyTree, *, param_sharding: ParamSharding = None) -> PyTree:
    """The sharding of every leaf of a train state, for ``jax.jit(in_shardings/out_shardings)``.

    Args:
      mesh: e.g. ``data_mesh()``.
      state: a train state (``TrainState``, ``nnx.State``, dict...), concrete or abstract
        (``jax.eval_shape``); only its structure and leaf paths are used.
      param_sharding: how leaves are split. ``None`` (today's default): every leaf replicated,
        i.e. pure data parallelism. Otherwise either a function ``(path, leaf) -> PartitionSpec |
        Sharding | None`` or a list of ``(path_regex, PartitionSpec)`` pairs (first
        ``re.search`` match wins); ``None`` / no match means replicated. Paths are ``'/'``-joined
        (``params/Dense_0/kernel``, ``opt_state/0/mu/Dense_0/kernel``), so one rule on
        ``Dense_0/kernel`` shards a parameter and its optimizer moments alike (FSDP).

    Returns:
      A pytree with the structure of ``state`` whose leaves are ``NamedSharding``s on ``mesh``.
    """
    replicated = replicated_sharding(mesh)
    if param_sharding is None:
        return jax.tree.map(lambda _: replicated, state)
    if callable(param_sharding):
        rule = param_sharding
    else:
        rules = [(re.compile(pattern), spec) for pattern, spec in param_sharding]

        def rule(path, leaf):
            return next((spec for pattern, spec in rules if pattern.search(path)), None)

    def _sharding(path, leaf):
        spec = rule(str(path), leaf)
        if spec is None:
            return replicated
        if isinstance(spec, Sharding):
            return spec
        return NamedSharding(mesh, spec)

    return masks.map_with_paths(_sharding, state)


class MeshError(ValueError):
    """Mesh axes that do not fit the devices (a ``config.mesh`` mistake)."""


def mesh_from_axes(
    axes: Mapping[str, int],
    devices: Sequence[jax.Device] | None = None,
    *,
    axis_type: AxisType = AxisType.Auto,
) -> Mesh:
    """A mesh with the named axes of ``axes`` in order, e.g. ``{'data': -1, 'fsdp': 2}``.

    One axis may be ``-1``: it takes the devices the others leave. The sizes' product must equal
    the number of devices (default: every device of every process, ordered by process, so each
    process holds one contiguous block of the global batch). Raises :class:`MeshError`, naming
    the axes and the device count, when they do not fit.
    """
    if devices is None:
        devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    devices, names = list(devices), tuple(axes)
    sizes = []
    for name in names:
        size = axes[name]
        if isinstance(size, bool) or not isinstance(size, int) or (size < 1 and size != -1):
            raise MeshError(f"mesh.{name} must be a positive int or -1, got {size!r}")
        sizes.append(size)
    if not names:
        raise MeshError("mesh has no axes: give at least one, e.g. dict(data=-1)")
    if sizes.count(-1) > 1:
        raise MeshError(f"mesh {dict(axes)}: only one axis can be -1 (the devices left)")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes and len(devices) % known == 0:
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise MeshError(
            f"mesh {dict(axes)} does not fit the {len(devices)} device(s): the axes' sizes must "
            f"multiply to {len(devices)} (one of them may be -1: the devices left)"
        )
    types = (axis_type,) * len(names)
    # jax.make_mesh lays the devices out for the hardware's links (a TPU's torus); where that
    # would interleave processes, the process order is kept (each process holds one contiguous
    # block of the global batch: what global_batch relies on).
    mesh = jax.make_mesh(tuple(sizes), names, types, devices=devices)
    processes = [d.process_index for d in mesh.devices.flat]
    if processes != sorted(processes):
        mesh = Mesh(np.asarray(devices).reshape(sizes), names, axis_types=types)
    return mesh


def fsdp_spec(shape: Sequence[int], axis: str, size: int, min_size: int) -> PartitionSpec | None:
    """The FSDP spec of an array of ``shape``: its largest dimension divisible by ``size`` split
    over ``axis`` (the last of equals), or ``None`` (replicated) when none divides or the array
    has fewer than ``min_size`` elements."""
    if size <= 1 or math.prod(shape) < min_size:
        return None
    fits = [i for i, d in enumerate(shape) if d % size == 0]
    if not fits:
        return None
    best = max(fits, key=lambda i: (shape[i], i))
    return PartitionSpec(*(axis if i == best else None for i in range(len(shape))))


PartitionRules = Sequence[tuple[str, Sequence[str | Sequence[str] | None]]]


def partition_rule(
    mesh: Mesh,
    rules: PartitionRules = (),
    *,
    fsdp_axis: str = "fsdp",
    min_size: int = 1024,
) -> Callable[[str, Any], PartitionSpec | None]:
    """How to split each leaf of a train state over ``mesh``: ``(path, leaf) -> spec | None``
    (``None``: replicated), for :func:`state_shardings`.

    ``rules`` are big_vision-style ``(path_regex, spec)`` pairs, the first ``re.search`` match
    winning, e.g. ``[('embedding$', ('fsdp', None)), ('bias$', ())]``; a spec is a tuple of mesh
    axis names (or tuples of them, or ``None``) per dimension, ``()`` for replicated. Paths are
    the state's ``'/'``-joined keys, so a rule on ``conv_0/kernel$`` shards a parameter and its
    optimizer moments alike. A leaf no rule matches gets the FSDP rule when ``mesh`` has a
    ``fsdp_axis`` of size > 1 (:func:`fsdp_spec`: its largest dimension divisible by that size,
    if it has at least ``min_size`` elements), else is replicated. A rule naming an axis the mesh
    lacks, or that does not divide its dimension, is a ``ValueError`` naming the leaf.
    """
    compiled = [(re.compile(pattern), tuple(spec)) for pattern, spec in rules]
    size = dict(mesh.shape).get(fsdp_axis, 1)

    def rule(path: str, leaf: Any) -> PartitionSpec | None:
        shape = tuple(getattr(leaf, "shape", ()))
        for pattern, spec in compiled:
            if pattern.search(path):
                _check_spec(path, shape, spec, mesh)
                return PartitionSpec(*spec)
        return fsdp_spec(shape, fsdp_axis, size, min_size)

    return rule


def _check_spec(path: str, shape: tuple[int, ...], spec: tuple, mesh: Mesh) -> None:
    if len(spec) > len(shape):
        raise ValueError(f"partition rule for {path!r}: spec {spec} has more entries than its "
                         f"shape {shape} has dimensions")  # fmt: skip
    for dim, names in zip(shape, spec, strict=False):
        names = () if names is None else (names,) if isinstance(names, str) else tuple(names)
        unknown = [n for n in names if n not in mesh.shape]
        if unknown:
            raise ValueError(
                f"partition rule for {path!r}: mesh axis {unknown[0]!r} is not one of "
                f"{tuple(mesh.axis_names)}"
            )
        parts = math.prod(mesh.shape[n] for n in names)
        if dim % parts:
            raise ValueError(
                f"partition rule for {path!r}: dimension {dim} of shape {shape} does not split "
                f"into {parts} over {names}"
            )


def place(tree: PyTree, shardings: PyTree) -> PyTree:
    """Puts each leaf of ``tree`` (host values, the same in every process, or jax Arrays) on
    its sharding of ``shardings`` (a tree of the same structure)."""

    def _place(x, sharding):
        if isinstance(x, jax.Array):
            if x.sharding.is_equivalent_to(sharding, x.ndim):
                return x
            if jax.process_count() == 1 or not x.is_fully_addressable:
                return jax.device_put(x, sharding)
        x = np.asarray(x)  # host values: every process contributes its devices' parts
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(_place, tree, shardings)


def bytes_per_device(tree: PyTree) -> dict[jax.Device, int]:
    """Bytes each (addressable) device holds of ``tree``'s ``jax.Array`` leaves."""
    held: dict[jax.Device, int] = collections.defaultdict(int)
    for leaf in jax.tree.leaves(tree):
        for shard in getattr(leaf, "addressable_shards", ()):
            held[shard.device] += shard.data.nbytes
    return dict(held)


# --------------------------------------------------------------------------------------------
# multi-host


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _cluster_process_count() -> int | None:
    """Processes of the cluster JAX's auto-detection finds (SLURM, Open MPI, TPU, k8s...), or
    None outside such a cluster."""
    try:
        from jax._src import clusters  # JAX's own detection; no public query exists.

        for env in clusters.ClusterEnv._cluster_types:
            if not env.opt_in_only_method and env.is_env_present():
                return env.get_process_count()
    except Exception:  # noqa: BLE001 - detection is best effort; explicit settings still work
        return None
    return None


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
    **initialize_kwargs: Any,
) -> bool:
    """Initialises ``jax.distributed`` when this is one process of several; else does nothing.

    Settings come from the arguments, else the environment variables ``JAX_COORDINATOR_ADDRESS``,
    ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` (and ``JAX_LOCAL_DEVICE_IDS``), else JAX's own
    cluster auto-detection (SLURM, Open MPI, Cloud TPU, Kubernetes...). Call it first thing,
    before any other JAX call.

    Args:
      coordinator_address: ``host:port`` of process 0's coordinator service.
      num_processes: total number of processes.
      process_id: this process's index in ``[0, num_processes)``.
      local_device_ids: restrict this process to these local devices.
      **initialize_kwargs: passed on to ``jax.distributed.initialize`` (e.g.
        ``initialization_timeout``, ``heartbeat_timeout_seconds``).

    Returns:
      True when ``jax.distributed`` is initialised (now or by an earlier call) for more than one
      process; False on a single process, in which case nothing was done.

    Raises:
      ValueError: some but not all of the settings are given and no cluster supplies the rest.
      RuntimeError: JAX was already used in this process (jax's own message).
    """
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    if num_processes is None:
        num_processes = _env_int("JAX_NUM_PROCESSES")
    if process_id is None:
        process_id = _env_int("JAX_PROCESS_ID")
    if num_processes == 1:
        return False
    given = {
        "coordinator_address (JAX_COORDINATOR_ADDRESS)": coordinator_address,
        "num_processes (JAX_NUM_PROCESSES)": num_processes,
        "process_id (JAX_PROCESS_ID)": process_id,
    }
    cluster_processes = _cluster_process_count()
    if all(v is None for v in given.values()):
        if cluster_processes is None or cluster_processes <= 1:
            return False
    elif cluster_processes is None and any(v is None for v in given.values()):
        missing = ", ".join(k for k, v in given.items() if v is None)
        raise ValueError(
            f"initialize_distributed: multi-process settings are incomplete, missing {missing}; "
            "give all three (flags or environment variables) or none for a single process"
        )
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
        **initialize_kwargs,
    )
    return jax.process_count() > 1


def _describe(tree: PyTree) -> str:
    """Structure, shapes and dtypes of ``tree`` as one line."""
    leaves = _named_leaves(tree)
    if not leaves:
        return "<no arrays>"
    return ", ".join(f"{name}: {tuple(np.shape(x))} {np.result_type(x)}" for name, x in leaves)


def _allgather_text(text: str) -> list[str]:
    """Every process's ``text`` (a collective)."""
    data = np.frombuffer(text.encode(), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.int32(len(data)))).ravel()
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: len(data)] = data
    gathered = np.asarray(multihost_utils.process_allgather(padded))
    return [bytes(row[:n]).decode() for row, n in zip(gathered, lengths, strict=True)]


def assert_same_across_processes(
    tree: PyTree, *, what: str = "value", shapes_only: bool = False
) -> None:
    """Raises one clear ``ValueError`` unless every process passes the same ``tree``.

    Every process must call it (it is a collective). First the structure, leaf shapes and dtypes
    are compared, then, unless ``shapes_only``, the values (e.g. seeds, initial params). A single
    process passes trivially. Every process raises the same error.

    Args:
      tree: a pytree of host or fully addressable arrays.
      what: how the error names the tree (``'per-process batch'``, ``'initial params'``...).
      shapes_only: compare structure, shapes and dtypes only (per-process data batches).
    """
    if jax.process_count() == 1:
        return
    text = _describe(tree)
    fingerprint = np.uint32(zlib.crc32(text.encode()))
    fingerprints = np.asarray(multihost_utils.process_allgather(fingerprint)).ravel()
    if len(set(fingerprints.tolist())) > 1:
        texts = _allgather_text(text)  # every process saw the mismatch, so all join this
        listing = "; ".join(f"process {i}: {t}" for i, t in enumerate(texts))
        raise ValueError(
            f"{what} differs across processes in structure, shape or dtype ({listing})"
        )
    if shapes_only:
        return
    host = jax.tree.map(
        lambda x: _host_local(x) if isinstance(x, jax.Array) else np.asarray(x), tree
    )
    gathered = multihost_utils.process_allgather(host)
    for name, values in _named_leaves(gathered):
        values = np.asarray(values)
        odd = [i for i in range(len(values)) if not np.array_equal(values[i], values[0], True)]
        if odd:
            raise ValueError(
                f"{what} differs across processes at {name!r}: processes "
                f"{odd} disagree with process 0"
            )
