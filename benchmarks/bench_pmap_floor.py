"""The floor under the pmap variants: ``jax.pmap`` against ``jax.jit`` of the same function.

No framework on either side: one dense update step (a 4096x256 matrix, batch 128 of 64x64
inputs), the state donated, on one device, with the batch as a numpy array (what the trainers
pass on CPU) and already on the device. Blocks of 100 steps alternate jit and pmap; medians.
A ``pmap/jit`` time ratio above 1 is what ``jax.pmap`` itself costs per step on this backend,
before any trainer code runs: the pmap variants' ``overhead`` ratio cannot beat it.

    python -m benchmarks.run pmap_floor
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


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
    to_pmap = jax.pmap(lambda a: a)
    rows = []
    for inputs, xj, xp in (
        ("numpy", x, x[None]),
        ("on device", jnp.asarray(x), to_pmap(x[None])),
    ):
        wj = jnp.zeros((64 * 64, 256))
        wp = to_pmap(jnp.zeros((1, 64 * 64, 256)))
        _, wj = _block(jit_step, wj, xj, 5)  # compile and warm up
        _, wp = _block(pmap_step, wp, xp, 5)
        times: dict[str, list[float]] = {"jit": [], "pmap": []}
        for _ in range(blocks):
            seconds, wj = _block(jit_step, wj, xj, steps)
            times["jit"].append(seconds)
            seconds, wp = _block(pmap_step, wp, xp, steps)
            times["pmap"].append(seconds)
        jit_us, pmap_us = (1e6 * statistics.median(times[k]) for k in ("jit", "pmap"))
        rows.append(
            dict(
                inputs=inputs,
                jit_us_per_step=round(jit_us, 1),
                pmap_us_per_step=round(pmap_us, 1),
                pmap_over_jit=round(pmap_us / jit_us, 3),
            )
        )
    return rows


if __name__ == "__main__":
    from benchmarks.run import markdown_table

    print(markdown_table(run()))
