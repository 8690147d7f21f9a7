"""The layout XLA all-reduces gradients in, under ``jax.jit`` on 8 simulated CPU devices.

No framework: a Linen MLP (64-256-256-10, on flattened 8x8 digits), the same with its hidden
layers a scan over layers (``nn.scan`` of 4 residual 256x256 layers: the weight gradients are
computed and all-reduced inside the scan's body), and a CNN shaped like the template's default
(two 3x3 convs of 32 and 64 features with 2x2 average pooling, dense 128, head 10, on 8x8x1),
AdamW, global batch 128 split over 8 devices, the state replicated and donated, the batch
already on the devices. Four ways to compile the same step:

- ``jit``: ``jax.jit`` with the batch sharded and the state replicated; XLA's SPMD partitioner
  inserts the gradient all-reduce. JAX's autodiff computes the gradient of ``x @ w`` as
  ``dot_general(cotangent, x)``, (out, in), then transposes it; the partitioner places the
  all-reduce between that dot and the transpose, where XLA can no longer fold the transpose into
  the dot, and the AdamW update reads the reduced gradient transposed.
- ``jit_folded``: the same step through ``plugins.transpose_folding.fold_transposes``, which
  computes each such pair as one ``dot_general(x, cotangent)`` before XLA sees it, so the
  gradient is reduced in its parameter's layout (how the template's jit variant compiles now).
- ``shard_map``: ``jax.jit`` of a ``jax.shard_map`` whose step ``pmean``s the gradients itself
  (the all-reduce comes after autodiff's transpose, which XLA folds into the dot).
- ``plugins_pmap``: ``plugins.sharding.pmap`` of that step (how the pmap variants compile):
  each device runs the unbatched step (``plugins.unit_axis``), whose ``pmean`` comes after
  autodiff's transpose, as under ``shard_map``.

``transposed_grads``: per contender, the all-reduced gradients whose shape is not their
parameter's (from the compiled HLO, size-1 axes aside): 0 means every gradient is reduced in
its parameter's layout (a transposed square matrix, the MLPs' 256x256, cannot be told by its
shape).
``hlo_transposes``: the transpose instructions left in each contender's compiled program
(same order; the convolutions' backward passes need some whatever the construction).
``loss_spread``: the largest difference between the contenders' losses at the 5th step from
the same initial state (4 updates, computed four ways; float32 summation order aside, equal).
``*_over_jit``: steps/s over ``jit``'s, the median over rounds of paired 100-step blocks (the
contenders take turns; rounds scatter about +-10 % on a 2-core machine).

    python -m benchmarks.run grad_layout
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
import time
from typing import Any

DEVICES = 8
ROUNDS = 15
STEPS = 100
CHECKED_STEP = 5  # the contenders' losses are compared at this step of the first block


def _child(rounds: int, steps: int) -> list[dict]:  # runs with 8 simulated devices
    import flax.linen as nn
    import jax
    import numpy as np
    import optax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from plugins import sharding, transpose_folding

    assert jax.device_count() == DEVICES, jax.devices()

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = x.reshape((x.shape[0], -1))
            for width in (256, 256):
                x = nn.relu(nn.Dense(width)(x))
            return nn.Dense(10)(x)

    class Residual(nn.Module):
        @nn.compact
        def __call__(self, h, _):
            return h + nn.relu(nn.Dense(h.shape[-1])(h)), None

    class ScanMLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.relu(nn.Dense(256)(x.reshape((x.shape[0], -1))))
            layers = nn.scan(
                Residual, variable_axes={"params": 0}, split_rngs={"params": True}, length=4
            )
            h, _ = layers()(h, None)
            return nn.Dense(10)(h)

    class CNN(nn.Module):
        @nn.compact
        def __call__(self, x):
            for features in (32, 64):
                x = nn.avg_pool(nn.relu(nn.Conv(features, (3, 3))(x)), (2, 2), (2, 2))
            x = x.reshape((x.shape[0], -1))
            x = nn.relu(nn.Dense(128)(x))
            return nn.Dense(10)(x)

    tx = optax.adamw(1e-3)
    rng = np.random.default_rng(0)
    x = rng.random((128, 8, 8, 1), dtype=np.float32)
    y = rng.integers(0, 10, 128).astype(np.int32)
    mesh = sharding.data_mesh()
    replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))

    def make_step(model, mean):
        def step(state, x, y):
            params, opt_state = state

            def loss_of(params):
                logits = model.apply({"params": params}, x)
                return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

            loss, grads = mean(jax.value_and_grad(loss_of)(params))
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        return step

    def pmean(tree):
        return jax.lax.pmean(tree, "data")

    rows = []
    for name, cls in (("mlp", MLP), ("scan_mlp", ScanMLP), ("cnn", CNN)):
        params = cls().init(jax.random.key(0), x[:1])["params"]
        state = jax.device_get((params, tx.init(params)))
        squeeze = lambda shape: tuple(d for d in shape if d != 1)  # noqa: E731
        param_shapes = {squeeze(p.shape) for p in jax.tree.leaves(params)}
        param_shapes |= {  # jit all-reduces a scanned parameter a layer at a time
            squeeze(p.shape[1:])
            for path, p in jax.tree_util.tree_leaves_with_path(params)
            if "Scan" in jax.tree_util.keystr(path)
        }
        plain = make_step(cls(), lambda t: t)
        per_device = make_step(cls(), pmean)
        stacked = sharding.pmap(lambda t: t, "data")(sharding.replicate(state))
        # Every contender gets its batch already placed (split over the devices), so that the
        # steps alone are timed.
        bx, by = jax.device_put(x, split), jax.device_put(y, split)
        xs = jax.device_put(x.reshape(DEVICES, -1, 8, 8, 1), split)
        ys = jax.device_put(y.reshape(DEVICES, -1), split)
        contenders = {
            "jit": [
                jax.jit(plain, in_shardings=(replicated, split, split), donate_argnums=0),
                jax.device_put(state, replicated), bx, by,
            ],
            "jit_folded": [
                jax.jit(
                    transpose_folding.fold_transposes(plain),
                    in_shardings=(replicated, split, split), donate_argnums=0,
                ),
                jax.device_put(state, replicated), bx, by,
            ],
            "shard_map": [
                jax.jit(
                    jax.shard_map(
                        per_device, mesh=mesh, in_specs=(P(), P("data"), P("data")),
                        out_specs=P(), check_vma=False,
                    ),
                    donate_argnums=0,
                ),
                jax.device_put(state, replicated), bx, by,
            ],
            "plugins_pmap": [
                sharding.pmap(per_device, "data", donate_argnums=(0,)), stacked, xs, ys,
            ],
        }  # fmt: skip
        transposed, transposes = {}, {}
        for key, c in contenders.items():
            hlo = c[0].lower(*c[1:]).compile().as_text()
            reduced = re.findall(r"\(([^()]*)\) all-reduce\(", hlo)
            shapes = [  # size-1 axes dropped: the pmap blocks carry one for the device
                squeeze(int(d) for d in dims.split(","))
                for dims in re.findall(r"f32\[([\d,]+)\]", " ".join(reduced))
            ]
            transposed[key] = sum(1 for s in shapes if len(s) > 1 and s not in param_shapes)
            transposes[key] = len(re.findall(r"= \S+ transpose\(", hlo))
        times: dict[str, list[float]] = {k: [] for k in contenders}
        checked_loss = {}
        for r in range(rounds + 1):
            for key, c in contenders.items():
                fn, s, xb, yb = c
                start = time.perf_counter()
                for i in range(steps):
                    s, loss = fn(s, xb, yb)
                    if r == 0 and i == min(CHECKED_STEP, steps) - 1:
                        checked_loss[key] = loss
                    if i % 16 == 15:  # keep the host near the devices
                        jax.block_until_ready(loss)
                jax.block_until_ready(s)
                c[1] = s
                if r:  # round 0 compiles and warms up
                    times[key].append(steps / (time.perf_counter() - start))
        row: dict[str, Any] = dict(model=name)
        for key in contenders:
            row[f"{key}_steps_per_s"] = round(statistics.median(times[key]), 1)
        for key in list(contenders)[1:]:
            ratios = [a / b for a, b in zip(times[key], times["jit"], strict=True)]
            row[f"{key}_over_jit"] = round(statistics.median(ratios), 3)
        row["transposed_grads (jit / folded / shard_map / pmap)"] = " / ".join(
            str(transposed[k]) for k in contenders
        )
        row["hlo_transposes"] = " / ".join(str(transposes[k]) for k in contenders)
        losses = [float(np.mean(v)) for v in checked_loss.values()]
        row["loss_spread"] = f"{max(losses) - min(losses):.1e}"
        rows.append(row)
    return rows


def run(rounds: int = ROUNDS, steps: int = STEPS) -> list[dict]:
    """One row per model: steps/s of each construction on 8 simulated devices, ratios to jit."""
    from benchmarks import _template

    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_grad_layout", "--child", str(rounds), str(steps)],
        cwd=_template.ROOT,
        env=_template.env(DEVICES),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode or not lines:
        raise RuntimeError(f"grad_layout child failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        print(json.dumps(_child(int(sys.argv[2]), int(sys.argv[3]))))
    else:
        from benchmarks.run import markdown_table

        print(markdown_table(run()))
