"""Gradient accumulation: ``accumulate_steps=4`` at batch B/4 against one step at batch B.

``plugins.optim.create`` with ``accumulate_steps=4`` (``optax.MultiSteps``) takes 4 micro-steps
of B/4 examples (the 4 quarters of each batch) per optimizer step; the reference takes one step
of the whole batch with ``accumulate_steps=1``. Same recipe otherwise (AdamW, warmup-cosine,
weight decay on matrices), same initial parameters, a CNN like the template's default on
digits-shaped data. ``max_param_diff`` is the largest absolute parameter difference after
``OPT_STEPS`` optimizer steps (float32 round-off: the mean of the 4 quarter-batch mean gradients
is the whole-batch mean gradient). Memory is XLA's own analysis of each compiled step
(``jitted.lower(...).compile().memory_analysis()``): ``temp_kib`` is the step's scratch space
(activations, gradients), ``argument_kib`` its inputs (parameters, optimizer state -- with
accumulation it also holds the gradient accumulator -- and the batch).

    python -m benchmarks.run accumulation
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from plugins import optim

OPT_STEPS = 3
K = 4
CONFIG = dict(
    name="adamw",
    learning_rate=3e-3,
    schedule=dict(name="warmup_cosine", warmup_steps=2, end_value=1e-5),
    weight_decay=1e-2,
    weight_decay_mask="matrices",
)


def _params(key: jax.Array) -> dict:
    k = jax.random.split(key, 4)
    return {
        "conv_0": {"kernel": jax.random.normal(k[0], (3, 3, 1, 32)) * 0.3, "bias": jnp.zeros(32)},
        "conv_1": {"kernel": jax.random.normal(k[1], (3, 3, 32, 64)) * 0.06, "bias": jnp.zeros(64)},
        "dense": {"kernel": jax.random.normal(k[2], (256, 128)) * 0.06, "bias": jnp.zeros(128)},
        "head": {"kernel": jax.random.normal(k[3], (128, 10)) * 0.09, "bias": jnp.zeros(10)},
    }


def _loss(p: dict, image: jax.Array, label: jax.Array) -> jax.Array:
    x = image
    for name in ("conv_0", "conv_1"):
        x = jax.lax.conv_general_dilated(
            x, p[name]["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        x = jax.nn.relu(x + p[name]["bias"])
        x = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "VALID") / 4
    x = jax.nn.relu(x.reshape(x.shape[0], -1) @ p["dense"]["kernel"] + p["dense"]["bias"])
    logits = x @ p["head"]["kernel"] + p["head"]["bias"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, label).mean()


def _step(tx: optax.GradientTransformation):
    def step(params, opt_state, image, label):
        grads = jax.grad(_loss)(params, image, label)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return jax.jit(step, donate_argnums=(0, 1))


def _memory(step, params, opt_state, image, label) -> dict:
    analysis = step.lower(params, opt_state, image, label).compile().memory_analysis()
    return dict(
        temp_kib=round(analysis.temp_size_in_bytes / 1024, 1),
        argument_kib=round(analysis.argument_size_in_bytes / 1024, 1),
    )


def run(batch_sizes: tuple[int, ...] = (128, 1024)) -> list[dict]:
    """Two rows per batch size B: one step at B, and K micro-steps at B/K."""
    rows = []
    rng = np.random.default_rng(0)
    for b in batch_sizes:
        images = rng.random((OPT_STEPS, b, 8, 8, 1), dtype=np.float32)
        labels = rng.integers(0, 10, (OPT_STEPS, b)).astype(np.int32)
        params0 = _params(jax.random.key(0))
        total = OPT_STEPS * K
        results = {}
        for k in (1, K):
            tx = optim.create(dict(CONFIG, accumulate_steps=k), total_steps=total)
            params = jax.tree.map(jnp.copy, params0)
            opt_state = tx.init(params)
            step = _step(tx)
            mb = b // k
            memory = _memory(step, params, opt_state, images[0, :mb], labels[0, :mb])
            for s in range(OPT_STEPS):
                for i in range(k):
                    part = slice(i * mb, (i + 1) * mb)
                    params, opt_state = step(params, opt_state, images[s, part], labels[s, part])
            results[k] = (params, memory)
        whole, accumulated = (jax.tree.leaves(results[k][0]) for k in (1, K))
        diff = max(float(jnp.abs(x - y).max()) for x, y in zip(whole, accumulated, strict=True))
        moved = max(
            float(jnp.abs(x - y).max())
            for x, y in zip(jax.tree.leaves(results[1][0]), jax.tree.leaves(params0), strict=True)
        )
        for k in (1, K):
            rows.append(
                dict(
                    batch=b,
                    setup=f"1 step of {b}" if k == 1 else f"{K} micro-steps of {b // K}",
                    accumulate_steps=k,
                    **results[k][1],
                    max_param_diff=f"{diff:.1e}" if k == K else "",
                    max_param_change=f"{moved:.1e}",
                    optimizer_steps=OPT_STEPS,
                )
            )
    return rows


if __name__ == "__main__":
    from benchmarks.run import markdown_table

    print(markdown_table(run()))
