"""Input-pipeline throughput on the offline digits dataset at the default batch size (128).

Measures ``plugins.data`` batches per second (with and without the prefetch thread, and for
evaluation), a reference consumer -- a jitted train step of a small CNN like the template's default
-- and the two together, so that one can see the pipeline outpace the step it feeds.

    python -m benchmarks.bench_input_pipeline
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable

BATCH_SIZE = 128


def _rate(fn: Callable[[], object], *, min_seconds: float = 1.0, warmup: int = 20) -> float:
    """Calls ``fn`` repeatedly for at least ``min_seconds``; returns calls per second."""
    for _ in range(warmup):
        fn()
    count, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < min_seconds:
        for _ in range(50):
            fn()
        count += 50
    return count / elapsed


def _reference_step() -> tuple[Callable, object]:
    """A jitted SGD step of a conv(32)-conv(64)-dense(256)-dense(10) CNN on 8x8x1 inputs."""
    import jax
    import jax.numpy as jnp

    keys = jax.random.split(jax.random.key(0), 4)
    params = {
        "c1": jax.random.normal(keys[0], (3, 3, 1, 32)) * 0.3,
        "c2": jax.random.normal(keys[1], (3, 3, 32, 64)) * 0.06,
        "d1": jax.random.normal(keys[2], (4 * 4 * 64, 256)) * 0.03,
        "d2": jax.random.normal(keys[3], (256, 10)) * 0.06,
    }

    def conv(x, w):
        return jax.lax.conv_general_dilated(
            x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    def loss(p, image, label):
        x = jax.nn.relu(conv(image, p["c1"]))
        x = jax.nn.relu(conv(x, p["c2"]))
        x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
        x = jax.nn.relu(x.reshape(x.shape[0], -1) @ p["d1"])
        logits = x @ p["d2"]
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), label[:, None], axis=1))

    @jax.jit
    def step(p, image, label):
        value, grads = jax.value_and_grad(loss)(p, image, label)
        return jax.tree.map(lambda w, g: w - 0.1 * g, p, grads), value

    return step, params


def run(data_dir: str | None = None, min_seconds: float = 1.0) -> list[dict]:
    """Measures pipeline and reference-step throughput; returns one dict per measurement.

    Each dict has ``name``, ``batch_size``, ``batches_per_s`` and ``examples_per_s``. ``data_dir``
    defaults to a temporary directory (digits is prepared there, offline, and removed after).
    """
    from plugins import data

    tmp = None
    if data_dir is None:
        data_dir = tmp = tempfile.mkdtemp(prefix="bench_digits_")
    try:
        kw = dict(batch_size=BATCH_SIZE, data_dir=data_dir, process_index=0, process_count=1)
        start = time.perf_counter()
        data.load_split("digits", "train", data_dir=data_dir)  # Prepare and read once.
        first_read_s = time.perf_counter() - start
        rates: dict[str, float] = {}

        for prefetch in (2, 0):
            it = data.train_iterator("digits", seed=0, prefetch=prefetch, **kw)
            rates[f"train_iterator (prefetch={prefetch})"] = _rate(
                lambda it=it: next(it), min_seconds=min_seconds
            )
            if prefetch:
                it.close()

        def one_eval_pass() -> None:
            for _ in data.eval_iterator("digits", split="test", **kw):
                pass

        n_eval = data.num_eval_batches(
            data.num_examples("digits", "test", data_dir=data_dir),
            batch_size=BATCH_SIZE,
            process_count=1,
        )
        rates["eval_iterator (full pass)"] = n_eval * _rate(one_eval_pass, min_seconds=min_seconds)

        step, params = _reference_step()
        batch = next(data.train_iterator("digits", seed=0, prefetch=0, **kw))
        state = {"params": params}

        def step_only() -> None:
            state["params"], value = step(state["params"], batch["image"], batch["label"])
            value.block_until_ready()

        rates["reference CNN train step alone"] = _rate(step_only, min_seconds=min_seconds)

        it = data.train_iterator("digits", seed=0, **kw)

        def pipeline_and_step() -> None:
            b = next(it)
            state["params"], value = step(state["params"], b["image"], b["label"])
            value.block_until_ready()

        rates["train_iterator + reference step"] = _rate(pipeline_and_step, min_seconds=min_seconds)
        it.close()
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)

    rows = [
        {
            "name": name,
            "batch_size": BATCH_SIZE,
            "batches_per_s": round(rate, 1),
            "examples_per_s": round(rate * BATCH_SIZE),
        }
        for name, rate in rates.items()
    ]
    rows.append(
        {
            "name": "first load_split (prepare + read)",
            "batch_size": BATCH_SIZE,
            "seconds": round(first_read_s, 2),
        }
    )
    return rows


def _table(rows: list[dict]) -> str:
    lines = [f"{'digits, batch 128':<40} {'batches/s':>12} {'examples/s':>12}"]
    for r in rows:
        if "batches_per_s" in r:
            lines.append(f"{r['name']:<40} {r['batches_per_s']:>12,.0f} {r['examples_per_s']:>12,}")
        else:
            lines.append(f"{r['name']:<40} {r['seconds']:>11.2f}s")
    return "\n".join(lines)


if __name__ == "__main__":
    print(_table(run()))
