"""One jitted optimizer update: plugins-built against the same hand-written optax chain.

The pytree is ~10M parameters (transformer-like: matrices, biases, norm scales, an embedding).
The recipe is the "production stack" of the optax tutorial: clip by global norm, AdamW with
weight decay on matrices only, warmup + cosine schedule. Both updates are jitted with donated
buffers and timed interleaved (A, B, A, B, ...) so machine noise hits both alike.

    python -m benchmarks.bench_optim
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import optax

from plugins import optim

TOTAL_STEPS = 10_000
CONFIG = dict(
    name="adamw",
    learning_rate=1e-3,
    schedule=dict(name="warmup_cosine", warmup_steps=100, end_value=1e-5),
    weight_decay=0.01,
    weight_decay_mask="matrices",
    clip_global_norm=1.0,
)


def make_params(width: int = 512, layers: int = 3, vocab: int = 2048) -> dict:
    """A ~10M-parameter pytree shaped like a small transformer."""
    key = jax.random.PRNGKey(0)
    params: dict = {"embed": {"embedding": jax.random.normal(key, (vocab, width)) * 0.02}}
    for i in range(layers):
        k = jax.random.fold_in(key, i)
        params[f"block{i}"] = {
            "attn": {"kernel": jax.random.normal(k, (width, 4 * width)) * 0.02},
            "mlp_in": {
                "kernel": jax.random.normal(k, (width, 4 * width)) * 0.02,
                "bias": jnp.zeros(4 * width),
            },
            "mlp_out": {
                "kernel": jax.random.normal(k, (4 * width, width)) * 0.02,
                "bias": jnp.zeros(width),
            },
            "norm": {"scale": jnp.ones(width), "bias": jnp.zeros(width)},
        }
    return params


def hand_written() -> optax.GradientTransformation:
    """The same recipe written by hand, as the optax tutorial teaches it."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-3, 100, TOTAL_STEPS, 1e-5)
    mask = lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)
    return optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(schedule, weight_decay=0.01, mask=mask),
    )


def _step_fn(tx: optax.GradientTransformation):
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step, donate_argnums=(0, 1))


def run(repeats: int = 51) -> list[dict]:
    """Times both updates; returns one row per optimizer with the median seconds per update."""
    params = make_params()
    n_params = sum(x.size for x in jax.tree.leaves(params))
    grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)
    contenders = {
        "hand-written optax": hand_written(),
        "plugins.optim.create": optim.create(CONFIG, total_steps=TOTAL_STEPS),
    }
    state = {}
    for name, tx in contenders.items():
        p = jax.tree.map(jnp.copy, params)
        state[name] = [_step_fn(tx), p, tx.init(p)]
        for _ in range(3):  # compile and warm up
            fn, p, s = state[name]
            state[name][1:] = fn(p, s, grads)
        jax.block_until_ready(state[name][1])
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name in contenders:
            fn, p, s = state[name]
            start = time.perf_counter()
            p, s = fn(p, s, grads)
            jax.block_until_ready(p)
            times[name].append(time.perf_counter() - start)
            state[name][1:] = [p, s]
    base = statistics.median(times["hand-written optax"])
    return [
        dict(
            benchmark="optimizer update (10M params)",
            variant=name,
            params=n_params,
            median_ms=1e3 * statistics.median(t),
            ratio=statistics.median(t) / base,
        )
        for name, t in times.items()
    ]


def main() -> None:
    """Prints the side-by-side table."""
    rows = run()
    print(f"{'variant':<24} {'params':>12} {'median ms':>10} {'ratio':>7}")
    for r in rows:
        print(f"{r['variant']:<24} {r['params']:>12,} {r['median_ms']:>10.2f} {r['ratio']:>7.3f}")


if __name__ == "__main__":
    main()
