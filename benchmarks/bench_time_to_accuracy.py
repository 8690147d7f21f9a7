"""Time to accuracy: process start to >= 97% digits test accuracy with ``configs/default.py``.

Each run is a fresh process running the generated project's ``main.py --config=configs/default.py``
(600 steps, evaluation at steps 300 and 600) with a fresh workdir; the digits data are already
prepared in tfds' data directory (a one-time step). The clock starts just before the process is
launched. Phases: ``imports_s`` -- interpreter start and the imports of main.py and the trainer
(tensorflow comes with clu's TensorBoard writer); ``compile_s`` -- JAX's backend-compile events
(XLA compilation, or loading from the persistent compilation cache) until the accuracy was
reached; ``time_to_97_s`` -- until the first evaluation at >= 97%; ``rest_s`` = time_to_97 -
imports - compile (data, initialisation, checkpoints, training steps, evaluation). ``cold``: an
empty compilation cache; ``warm``: the cache the first cold run filled (``--compilation_cache_dir``,
on by default in ~/.cache/jax). Medians over the runs; the variants' runs are interleaved.

    python -m benchmarks.run time_to_accuracy     # 5 runs of each; BENCH_TTA_RUNS=N for N
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks import _template

RUNS = int(os.environ.get("BENCH_TTA_RUNS", "5"))


def _one(project: Path, cache_dir: str) -> dict:
    workdir = tempfile.mkdtemp(prefix="bench_tta_")
    try:
        start = time.time()
        return _template.run_driver(project, "tta", repr(start), workdir, cache_dir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run(runs: int = RUNS, variants: list[str] | None = None) -> list[dict]:
    """One row per variant and cache state (cold, warm): median phase times over ``runs``."""
    projects = _template.generate()
    chosen = variants or list(projects)
    caches = {v: tempfile.mkdtemp(prefix="bench_jax_cache_") for v in chosen}
    results: dict[tuple[str, str], list[dict]] = {}
    try:
        for i in range(runs):
            for v in chosen:
                cold_cache = caches[v] if i == 0 else tempfile.mkdtemp(prefix="bench_jax_cache_")
                results.setdefault((v, "cold"), []).append(_one(projects[v], cold_cache))
                if cold_cache != caches[v]:
                    shutil.rmtree(cold_cache, ignore_errors=True)
                results.setdefault((v, "warm"), []).append(_one(projects[v], caches[v]))
    finally:
        for path in caches.values():
            shutil.rmtree(path, ignore_errors=True)
    rows = []
    for (variant, cache), rs in results.items():
        med = lambda key, rs=rs: statistics.median(r[key] for r in rs)  # noqa: E731
        reached = [r["time_to_97_s"] for r in rs if r["time_to_97_s"] is not None]
        tta = statistics.median(reached) if len(reached) == len(rs) else None
        rows.append(
            dict(
                variant=variant,
                cache=cache,
                runs=len(rs),
                imports_s=round(med("imports_s"), 2),
                compile_s=round(med("compile_s"), 2),
                rest_s=round(tta - med("imports_s") - med("compile_s"), 2) if tta else "",
                time_to_97_s=round(tta, 2) if tta else "not reached",
                total_s=round(med("total_s"), 2),
                accuracy=round(med("accuracy"), 4),
                compiles=int(med("compiles")),
                cache_hits=int(med("cache_hits")),
            )
        )
    return rows


if __name__ == "__main__":
    from benchmarks.run import markdown_table

    print(markdown_table(run()))
