"""Data parallelism with ``jax.jit`` over a device mesh.

The train state is replicated over a 1-D ``data`` mesh of every device of every process, and each
batch is one global ``jax.Array`` split along its leading axis. Each process reads only its own
slice of the data (``plugins.data``); ``plugins.sharding.global_batch`` assembles the global batch.
XLA inserts the gradient all-reduce itself, so the step function is written as for one device
(``mean`` is the identity here).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
from plugins import sharding

# Batch norm needs no named axis: under jit the batch is global.
AXIS_NAME: str | None = None


def mean(tree: Any) -> Any:
    """Mean over the devices inside a step: the identity, XLA reduces global arrays itself."""
    return tree


class DataParallel:
    """Places state and batches on a ``data`` mesh and compiles steps with ``jax.jit``."""

    def __init__(self) -> None:
        self.mesh = sharding.data_mesh()
        self.replicated = sharding.replicated_sharding(self.mesh)
        self.batch_sharding = sharding.batch_sharding(self.mesh)
        self.num_devices = self.mesh.size
        # Arrays typed exactly like the compiled steps' outputs, so that feeding either kind to
        # a step never compiles it a second time.
        self._as_step_output = jax.jit(lambda tree: tree, out_shardings=self.replicated)

    def put_state(self, state: Any) -> Any:
        """Replicates a host state (or metrics) over the mesh."""
        return self._as_step_output(sharding.place_replicated(state, self.mesh))

    def host_state(self, state: Any) -> Any:
        """The state as checkpointed: global arrays are saved as they are."""
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

    def compile_train_step(self, fn: Callable) -> Callable:
        """``fn(state, metrics, batch) -> (state, metrics)`` jitted; the state is donated."""
        return jax.jit(
            fn,
            in_shardings=(self.replicated, self.replicated, self.batch_sharding),
            out_shardings=self.replicated,
            donate_argnums=(0,),
        )

    def compile_eval_step(self, fn: Callable) -> Callable:
        """``fn(state, metrics, batch) -> metrics`` jitted."""
        return jax.jit(
            fn,
            in_shardings=(self.replicated, self.replicated, self.batch_sharding),
            out_shardings=self.replicated,
        )
