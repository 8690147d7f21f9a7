"""Data parallelism (and FSDP) with ``jax.jit`` over a device mesh.

``config.mesh`` names the mesh's axes: ``dict(data=-1, fsdp=1)`` by default, every device on the
``data`` axis. Each batch is one global ``jax.Array`` split along its leading axis over all the
devices; each process reads only its own slice of the data (``plugins.data``), and
``plugins.sharding.global_batch`` assembles the global batch. The train state is replicated,
except with ``fsdp > 1``: then each large parameter, and its optimizer state with it, is split
over the ``fsdp`` axis along its largest dimension that divides (``PARTITION_RULES`` first,
then ``plugins.sharding.partition_rule``'s FSDP rule), and XLA gathers it where a step needs it.
XLA inserts the gradient all-reduce itself, so the step function is written as for one device
(``mean`` is the identity here).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
from plugins import metrics, sharding
from plugins.config_errors import ConfigError

# Batch norm needs no named axis: under jit the batch is global.
AXIS_NAME: str | None = None
# How to split the train state's leaves over the mesh, before the FSDP rule: big_vision-style
# (path regex, spec) pairs, first match wins, e.g. [(r"head/kernel$", (None, "fsdp"))] or
# [(r"bias$", ())] (replicated). Paths are the state's '/'-joined keys (a parameter's rule
# matches its optimizer state too); see plugins.sharding.partition_rule.
PARTITION_RULES: list[tuple[str, tuple]] = []


def mean(tree: Any) -> Any:
    """Mean over the devices inside a step: the identity, XLA reduces global arrays itself."""
    return tree


class DataParallel:
    """Places state and batches on the mesh ``config.mesh`` describes and compiles steps with
    ``jax.jit``."""

    def __init__(self, mesh_axes: Any = None) -> None:
        axes = dict(mesh_axes or {"data": -1})
        try:
            self.mesh = sharding.mesh_from_axes(axes)
        except sharding.MeshError as error:
            raise ConfigError(str(error)) from None
        self.rule = sharding.partition_rule(self.mesh, PARTITION_RULES)
        self.replicated = sharding.replicated_sharding(self.mesh)
        self.batch_sharding = sharding.batch_sharding(self.mesh)
        self.num_devices = self.mesh.size

    def shardings(self, tree: Any) -> Any:
        """Where each leaf of a train state (or metrics: small leaves stay replicated) goes."""
        return sharding.state_shardings(self.mesh, tree, param_sharding=self.rule)

    def put_state(self, state: Any) -> Any:
        """Places a host state (or metrics) on the mesh, typed exactly like the compiled steps'
        outputs (so that feeding either kind to a step never compiles it a second time)."""
        shardings = self.shardings(state)
        placed = sharding.place(state, shardings)
        as_step_output = jax.jit(
            lambda tree: tree, out_shardings=shardings, compiler_options=metrics.RUN_ONCE_OPTIONS
        )
        return as_step_output(placed)

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

    def compile_train_step(self, fn: Callable, state: Any) -> Callable:
        """``fn(state, metrics, batch) -> (state, metrics)`` jitted for ``state``'s placement;
        the state is donated."""
        state_sharding = self.shardings(state)
        return jax.jit(
            fn,
            in_shardings=(state_sharding, self.replicated, self.batch_sharding),
            out_shardings=(state_sharding, self.replicated),
            donate_argnums=(0,),
        )

    def compile_eval_step(self, fn: Callable, state: Any) -> Callable:
        """``fn(state, metrics, batch) -> metrics`` jitted for ``state``'s placement."""
        return jax.jit(
            fn,
            in_shardings=(self.shardings(state), self.replicated, self.batch_sharding),
            out_shardings=self.replicated,
        )
