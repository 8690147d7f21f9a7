"""Scaling on 8 simulated CPU devices: the jit variant against the pmap variant.

``XLA_FLAGS=--xla_force_host_platform_device_count=8``: 8 XLA CPU devices sharing this machine's
cores, so this measures what data parallelism costs (the per-step collectives, the per-device
dispatch), not a speed-up. Each generated variant's own train step (built by its trainer, default
CNN, the same global batch of 128 = 16 per device, digits batches already prepared) runs in a
fresh process: ``compile_s`` is JAX's backend-compile time of the first call, ``steps_per_s`` the
median over blocks of 100 steps. In the same process, blocks of a load meter alternate with the
variant's: a fixed hand-written 8-device step (the same CNN under ``jit`` of a ``shard_map``,
identical in every process), and ``relative`` is the variant's speed over the meter's, paired
by block -- how fast the variant is whatever the machine's load at the time. The jit and pmap
processes alternate; medians over ``rounds``. ``pmap_vs_jit`` = the median over rounds of that
round's pmap ``relative`` / jit ``relative`` (target within 5 %: 0.95 - 1.05); ``ratio_range``
the lowest and highest of those per-round ratios; ``raw_pmap_vs_jit`` the same from the raw
steps/s, without the meter.

    python -m benchmarks.run scaling
"""

from __future__ import annotations

import statistics

from benchmarks import _template

STEPS = 100
ROUNDS = 8  # raw per-round ratios scatter +-15 % on a 2-core machine; the meter narrows that


def run(rounds: int = ROUNDS, steps: int = STEPS) -> list[dict]:
    """One row per variant on 8 devices: steps/s, compile time, pmap relative to jit."""
    projects = _template.generate()
    results: dict[str, list[dict]] = {v: [] for v in projects}
    for _ in range(rounds):
        for variant, project in projects.items():
            r = _template.run_driver(project, "throughput", str(steps), devices=8)
            assert r["devices"] == 8, r
            results[variant].append(r)
    rows = []
    for variant, rs in results.items():
        rows.append(
            dict(
                variant=variant,
                devices=8,
                global_batch=128,
                steps_per_s=round(statistics.median(r["steps_per_s"] for r in rs), 1),
                relative=round(statistics.median(r["relative"] for r in rs), 3),
                compile_s=round(statistics.median(r["compile_s"] for r in rs), 2),
                runs=len(rs),
            )
        )
    by = {r["variant"]: r for r in rows}
    for api in ("nnx", "linen"):
        # Paired by round (the two processes of a round run back to back): the median of the
        # per-round ratios.
        jit, pmap = results[f"{api}-jit"], results[f"{api}-pmap"]
        ratios = [p["relative"] / j["relative"] for j, p in zip(jit, pmap, strict=True)]
        raw = [p["steps_per_s"] / j["steps_per_s"] for j, p in zip(jit, pmap, strict=True)]
        by[f"{api}-pmap"]["pmap_vs_jit"] = round(statistics.median(ratios), 3)
        by[f"{api}-pmap"]["ratio_range"] = f"{min(ratios):.3f}-{max(ratios):.3f}"
        by[f"{api}-pmap"]["raw_pmap_vs_jit"] = round(statistics.median(raw), 3)
    return rows


if __name__ == "__main__":
    from benchmarks.run import markdown_table

    print(markdown_table(run()))
