"""Data parallelism written per device, as with ``jax.pmap``, compiled with ``jax.shard_map``.

Each device runs the step on its slice of the batch with a full copy of the train state, and the
step itself averages what the devices computed with collectives over ``AXIS_NAME``: gradients
with ``lax.pmean`` (``mean``), batch norm statistics and metrics likewise. That is ``jax.pmap``'s
programming model; JAX recommends ``jax.shard_map`` under ``jax.jit`` for it today, and that is
how the steps are compiled: over a 1-D mesh of every device, each batch one global
``jax.Array`` split along its leading axis (each process reads only its own slice of the data,
``plugins.sharding.global_batch`` assembles it), the state replicated. The state has no leading
device axis, so checkpoints are the same as the jit variant's.

``jax.shard_map`` runs with ``check_vma=False``, as ``jax.pmap`` does: the step's gradients are
those of its own slice until ``mean`` averages them (with the check on, JAX would sum them
across devices itself, in the backward pass).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
from jax.sharding import PartitionSpec as P
from plugins import metrics, sharding
from plugins.config_errors import ConfigError

# The devices' axis: gradients are pmean'd and batch norm statistics averaged over it.
AXIS_NAME: str | None = "batch"


def mean(tree: Any) -> Any:
    """Mean over the devices inside a step (``lax.pmean`` over ``AXIS_NAME``)."""
    return jax.lax.pmean(tree, AXIS_NAME)


class DataParallel:
    """Replicates the state over every device and compiles per-device steps with
    ``jax.shard_map``."""

    def __init__(self, mesh_axes: Any = None) -> None:
        sharded = {k: v for k, v in dict(mesh_axes or {}).items() if k != "data" and v != 1}
        if sharded:
            raise ConfigError(
                f"mesh {dict(mesh_axes)}: this project's per-device steps split the data only "
                "(the state is replicated); for FSDP (mesh.fsdp > 1) generate one with "
                "parallelism=jit, or set --config.mesh.fsdp=1"
            )
        self.mesh = sharding.data_mesh(axis_name=AXIS_NAME)
        self.rule = None  # every parameter replicated (the jit variant's FSDP rule)
        self.replicated = sharding.replicated_sharding(self.mesh)
        self.batch_sharding = sharding.batch_sharding(self.mesh)
        self.num_devices = self.mesh.size

    def put_state(self, state: Any) -> Any:
        """Replicates a host state (or metrics) on every device, typed exactly like the compiled
        steps' outputs (so that feeding either kind to a step never compiles it a second time)."""
        placed = sharding.place_replicated(state, self.mesh)
        as_step_output = jax.jit(
            lambda tree: tree,
            out_shardings=self.replicated,
            compiler_options=metrics.RUN_ONCE_OPTIONS,
        )
        return as_step_output(placed)

    def host_state(self, state: Any) -> Any:
        """The state as checkpointed: global replicated arrays (orbax writes each once)."""
        return state

    def to_host(self, tree: Any) -> Any:
        """This process's copy of replicated values (for logging)."""
        return jax.tree.map(lambda x: x.addressable_data(0), tree)

    def train_batches(self, batches: Iterable[dict]) -> Iterator[dict]:
        """The batches as the compiled steps take them: global arrays, placed two steps ahead.

        On CPU devices of one process, where there is no transfer to overlap (device memory is
        host memory), the numpy batches go to the step as they are: jit places them over the
        mesh (``in_shardings``) in its C++ dispatch path, which costs less per step than placing
        them from Python (see the repository's benchmarks/bench_overhead.py).
        """
        if jax.process_count() == 1 and self.mesh.devices.flat[0].platform == "cpu":
            return iter(batches)
        return sharding.keep_ahead((sharding.global_batch(self.mesh, b) for b in batches), 2)

    eval_batches = train_batches

    def _per_device(self, fn: Callable, out_specs: Any) -> Callable:
        """``fn`` run on each device's slice of the batch (``state`` and ``metrics`` whole)."""
        return jax.shard_map(
            fn,
            mesh=self.mesh,
            in_specs=(P(), P(), P(AXIS_NAME)),
            out_specs=out_specs,
            check_vma=False,
        )

    def compile_train_step(self, fn: Callable, state: Any = None) -> Callable:
        """``fn(state, metrics, batch) -> (state, metrics)`` per device; the state is donated
        (``state``, for the jit variant's placement, is not needed here)."""
        return jax.jit(
            self._per_device(fn, out_specs=(P(), P())),
            in_shardings=(self.replicated, self.replicated, self.batch_sharding),
            out_shardings=(self.replicated, self.replicated),
            donate_argnums=(0,),
        )

    def compile_eval_step(self, fn: Callable, state: Any = None) -> Callable:
        """``fn(state, metrics, batch) -> metrics`` per device."""
        return jax.jit(
            self._per_device(fn, out_specs=P()),
            in_shardings=(self.replicated, self.replicated, self.batch_sharding),
            out_shardings=self.replicated,
        )
