"""One process of the multi-process test (tests/test_multihost.py); also importable for the
model, data and reference step it shares with the test.

Run: ``python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT OUT.npz`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` and ``JAX_PLATFORMS=cpu`` in the
environment. It joins the others through ``plugins.sharding.initialize_distributed`` (gloo CPU
collectives, coordinator on 127.0.0.1), builds one global batch from its own slice of the data,
runs one jitted step and one pmapped step, checks the cross-process errors, and saves what it saw.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

GLOBAL_BATCH, FEATURES, HIDDEN, CLASSES = 16, 6, 8, 3


def make_data() -> dict[str, np.ndarray]:
    """The full global batch, identical in every process."""
    rng = np.random.default_rng(42)
    return {
        "x": rng.normal(size=(GLOBAL_BATCH, FEATURES)).astype(np.float32),
        "y": rng.integers(0, CLASSES, size=GLOBAL_BATCH).astype(np.int32),
    }


def make_params() -> dict[str, np.ndarray]:
    """A small MLP, identical in every process."""
    rng = np.random.default_rng(0)
    return {
        "w1": rng.normal(size=(FEATURES, HIDDEN)).astype(np.float32) / 3,
        "b1": np.zeros(HIDDEN, np.float32),
        "w2": rng.normal(size=(HIDDEN, CLASSES)).astype(np.float32) / 3,
        "b2": np.zeros(CLASSES, np.float32),
    }


def loss_fn(params, batch):
    """Mean softmax cross-entropy of the MLP over the batch."""
    h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
    logits = h @ params["w2"] + params["b2"]
    return optax.losses.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


def reference(data=None):
    """(loss, grads) of one step on the whole batch, on one device."""
    data = make_data() if data is None else data
    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(make_params(), data)
    return np.asarray(loss), jax.tree.map(np.asarray, grads)


def _error(fn) -> str:
    try:
        fn()
    except ValueError as e:
        return str(e)
    return ""


def main(process_id: int, num_processes: int, port: int, out: str) -> None:
    """One process's part of the test; results saved to ``out`` (npz)."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from plugins import sharding

    assert sharding.initialize_distributed(
        f"127.0.0.1:{port}",
        num_processes,
        process_id,
        initialization_timeout=60,
        shutdown_timeout_seconds=30,
    )
    assert sharding.initialize_distributed(), "a second call must be a no-op returning True"
    assert jax.process_count() == num_processes and jax.process_index() == process_id

    data = make_data()
    per_process = GLOBAL_BATCH // num_processes
    local = jax.tree.map(
        lambda a: a[process_id * per_process : (process_id + 1) * per_process], data
    )

    # jit + mesh: one global batch from each process's slice.
    mesh = sharding.data_mesh()
    batch = sharding.global_batch(mesh, local, check_processes=True)
    params = sharding.place_replicated(make_params(), mesh)
    sharding.assert_same_across_processes(make_params(), what="initial params")
    shardings = sharding.state_shardings(mesh, params)
    step = jax.jit(
        jax.value_and_grad(loss_fn),
        in_shardings=(shardings, sharding.batch_sharding(mesh)),
        out_shardings=(sharding.replicated_sharding(mesh), shardings),
    )
    loss, grads = step(params, batch)
    result = {
        "global_shape": np.asarray(batch["x"].shape),
        "jit_loss": np.asarray(loss.addressable_data(0)),
        **{f"jit_{k}": np.asarray(v.addressable_data(0)) for k, v in grads.items()},
    }

    # pmap over all processes' devices, grads pmean'd across them.
    def pmap_step(p, b):
        loss, grads = jax.value_and_grad(loss_fn)(p, b)
        return jax.lax.pmean((loss, grads), "batch")

    (pmap_batch,) = sharding.prefetch_to_device([sharding.shard(local)])
    out_loss, out_grads = jax.pmap(pmap_step, axis_name="batch")(
        sharding.replicate(make_params()), pmap_batch
    )
    result["pmap_loss"] = np.asarray(sharding.unreplicate(out_loss))
    for k, v in sharding.unreplicate(out_grads).items():
        result[f"pmap_{k}"] = np.asarray(v)

    # An uneven per-process eval batch through pad_shard_unpad: this process's rows come back.
    def hidden(params, x):
        return jnp.tanh(x @ params["w1"] + params["b1"])

    uneven = local["x"][:7]
    padded = sharding.pad_shard_unpad(jax.pmap(hidden, in_axes=(None, 0)))
    result["eval_out"] = padded(make_params(), uneven)
    result["eval_ref"] = np.asarray(jax.jit(hidden)(make_params(), uneven))

    # Disagreeing per-process batches and values: one clear error on every process.
    skewed = jax.tree.map(lambda a: a[: per_process - process_id * 2], local)
    result["shape_error"] = np.asarray(
        _error(lambda: sharding.global_batch(mesh, skewed, check_processes=True))
    )
    result["value_error"] = np.asarray(
        _error(lambda: sharding.assert_same_across_processes({"seed": np.int32(process_id)}))
    )
    np.savez(out, **result)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
