"""Data parallelism with ``jax.pmap``.

The train state is replicated on this process's local devices (a leading device axis), each
batch is reshaped to ``(devices, batch / devices, ...)``, and gradients are averaged across
devices with ``lax.pmean`` over the axis ``AXIS_NAME``. Steps are compiled by
``plugins.sharding.pmap``: ``jax.pmap``'s contract, built as JAX builds it (jit of a shard_map),
except that donated buffers update in place (``jax.pmap`` copies each of them every step on
XLA:CPU); across processes it is ``jax.pmap`` itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
from plugins import sharding
from plugins.config_errors import ConfigError

# The pmap axis: gradients are pmean'd and batch norm statistics averaged over it.
AXIS_NAME: str | None = "batch"


def mean(tree: Any) -> Any:
    """Mean over the devices inside a step (``lax.pmean`` over ``AXIS_NAME``)."""
    return jax.lax.pmean(tree, AXIS_NAME)


class DataParallel:
    """Replicates state over local devices and compiles pmapped steps."""

    def __init__(self, mesh_axes: Any = None) -> None:
        sharded = {k: v for k, v in dict(mesh_axes or {}).items() if k != "data" and v != 1}
        if sharded:
            raise ConfigError(
                f"mesh {dict(mesh_axes)}: this project's pmap steps split the data only (the "
                "state is replicated); for FSDP (mesh.fsdp > 1) generate one with "
                "parallelism=jit, or set --config.mesh.fsdp=1"
            )
        self.mesh = self.rule = None  # the jit variant's mesh and partition rule
        self.local_devices = jax.local_device_count()
        self.num_devices = jax.device_count()
        # Arrays typed exactly like the compiled steps' outputs, so that feeding either kind to
        # a step never compiles it a second time.
        self._as_step_output = sharding.pmap(lambda tree: tree, AXIS_NAME)

    def put_state(self, state: Any) -> Any:
        """Replicates a host state (or metrics) on every local device."""
        return self._as_step_output(sharding.replicate(state))

    def host_state(self, state: Any) -> Any:
        """The state as checkpointed: one copy of the replicated state. Across processes, a
        global array replicated over every process's devices (orbax saves global arrays only,
        and writes a replicated one once)."""
        if jax.process_count() > 1:
            return sharding.global_replicated(state)
        return sharding.unreplicate(state)

    def to_host(self, tree: Any) -> Any:
        """One copy of replicated values (for logging)."""
        return sharding.unreplicate(tree)

    def train_batches(self, batches: Iterable[dict]) -> Iterator[dict]:
        """Shards host batches over the local devices, placed two steps ahead.

        On CPU devices, where there is no transfer to overlap (device memory is host memory),
        the sharded numpy batches go to the step as they are: the step places them in its C++
        dispatch path, which costs less per step than placing them from Python (see the
        repository's benchmarks/bench_overhead.py).
        """
        if jax.local_devices()[0].platform == "cpu":
            return map(sharding.shard, batches)
        return sharding.prefetch_to_device(map(sharding.shard, batches), size=2)

    eval_batches = train_batches

    def compile_train_step(self, fn: Callable, state: Any = None) -> Callable:
        """``fn(state, metrics, batch) -> (state, metrics)`` pmapped; the state is donated
        (``state``, for the jit variant's placement, is not needed here)."""
        return sharding.pmap(fn, AXIS_NAME, donate_argnums=(0,))

    def compile_eval_step(self, fn: Callable, state: Any = None) -> Callable:
        """``fn(state, metrics, batch) -> metrics`` pmapped."""
        return sharding.pmap(fn, AXIS_NAME)
