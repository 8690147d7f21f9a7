"""The floor under the pmap variants: ``jax.pmap`` against ``jax.jit`` of the same function.

No framework on either side: one dense update step (a 4096x256 matrix, batch 128 of 64x64
inputs), the state donated, on one device, with the batch as a numpy array (what the trainers
pass on CPU) and already on the device. Blocks of 100 steps take turns over the contenders;
medians. A ``pmap/jit`` time ratio above 1 is what ``jax.pmap`` itself costs per step on this
backend, before any trainer code runs.

Where it comes from: since jax 0.8 ``jax.pmap`` is ``jax.jit`` of a ``shard_map`` that squeezes
the leading device axis off each input and puts it back on each output. The third contender is
plain ``jax.jit`` of the same function on arrays with that leading axis of size 1 (``w[0]``
in, ``[None]`` out, donated): XLA's CPU backend then copies the donated output instead of
updating it in place, and ``leading_axis_over_jit`` shows that this alone costs about what pmap
costs. The fourth is ``plugins.sharding.pmap`` (what the pmap variants compile their steps with):
``jax.pmap``'s own construction, with the per-device function run on the size-1 block by
``plugins.unit_axis.lift`` instead of squeezed (the update that writes each output runs on the
block itself), which leaves the donated buffer updated in place: ``plugins_pmap_over_jit``
near 1.

    python -m benchmarks.run pmap_floor
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from plugins import sharding


def _step(w: jax.Array, x: jax.Array) -> jax.Array:
    return w - 1e-3 * jnp.tanh(x.reshape(x.shape[0], -1) @ w).mean(axis=0)


def _block(fn, w, x, steps: int) -> tuple[float, jax.Array]:
    start = time.perf_counter()
    for _ in range(steps):
        w = fn(w, x)
    jax.block_until_ready(w)
    return (time.perf_counter() - start) / steps, w


def run(blocks: int = 9, steps: int = 100) -> list[dict]:
    """Per-step time of the same function under jit and under pmap, numpy and device inputs."""
    x = np.random.default_rng(0).random((128, 64, 64), dtype=np.float32)
    jit_step = jax.jit(_step, donate_argnums=(0,))
    pmap_step = jax.pmap(_step, donate_argnums=(0,))
    axis_step = jax.jit(lambda w, x: _step(w[0], x[0])[None], donate_argnums=(0,))
    plugins_step = sharding.pmap(_step, "devices", donate_argnums=(0,))
    to_pmap = jax.pmap(lambda a: a)
    to_plugins = sharding.pmap(lambda a: a, "devices")
    rows = []
    for inputs, xj, xp in (
        ("numpy", x, x[None]),
        ("on device", jnp.asarray(x), to_pmap(x[None])),
    ):
        xa = xp if inputs == "numpy" else jnp.asarray(x[None])
        contenders = {
            "jit": [jit_step, jnp.zeros((64 * 64, 256)), xj],
            "pmap": [pmap_step, to_pmap(jnp.zeros((1, 64 * 64, 256))), xp],
            "leading_axis": [axis_step, jnp.zeros((1, 64 * 64, 256)), xa],
            "plugins_pmap": [
                plugins_step,
                to_plugins(jnp.zeros((1, 64 * 64, 256))),
                xp if inputs == "numpy" else to_plugins(x[None]),
            ],
        }
        for c in contenders.values():  # compile and warm up
            _, c[1] = _block(c[0], c[1], c[2], 5)
        times: dict[str, list[float]] = {k: [] for k in contenders}
        for _ in range(blocks):
            for key, c in contenders.items():
                seconds, c[1] = _block(c[0], c[1], c[2], steps)
                times[key].append(seconds)
        us = {k: 1e6 * statistics.median(v) for k, v in times.items()}
        rows.append(
            dict(
                inputs=inputs,
                jit_us_per_step=round(us["jit"], 1),
                pmap_us_per_step=round(us["pmap"], 1),
                plugins_pmap_us_per_step=round(us["plugins_pmap"], 1),
                pmap_over_jit=round(us["pmap"] / us["jit"], 3),
                leading_axis_over_jit=round(us["leading_axis"] / us["jit"], 3),
                plugins_pmap_over_jit=round(us["plugins_pmap"] / us["jit"], 3),
            )
        )
    return rows


if __name__ == "__main__":
    from benchmarks.run import markdown_table

    print(markdown_table(run()))
