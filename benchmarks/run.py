"""Runs every benchmark, prints each table, and writes them all to docs/benchmarks.md.

    python -m benchmarks.run            # or: nox -s bench / make bench
    python -m benchmarks.run optim      # only the named benchmarks

Each benchmark module has ``run() -> list[dict]`` (rows measured side by side in one run).
"""

from __future__ import annotations

import datetime
import importlib
import os
import platform
import sys
import time
from importlib import metadata

BENCHMARKS = {
    "overhead": "benchmarks.bench_overhead",
    "input_pipeline": "benchmarks.bench_input_pipeline",
    "time_to_accuracy": "benchmarks.bench_time_to_accuracy",
    "scaling": "benchmarks.bench_scaling",
    "optim": "benchmarks.bench_optim",
    "accumulation": "benchmarks.bench_accumulation",
}
PACKAGES = ("jax", "jaxlib", "flax", "optax", "tensorflow-datasets", "orbax-checkpoint", "clu")


def markdown_table(rows: list[dict]) -> str:
    """Renders rows (dicts with the same keys) as a markdown table."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def machine() -> str:
    """One line describing this machine and the library versions."""
    import jax

    versions = []
    for name in PACKAGES:
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    devices = jax.devices()
    return (
        f"{platform.platform()}, Python {platform.python_version()}, {os.cpu_count()} CPUs, "
        f"{len(devices)} x {devices[0].device_kind}; " + ", ".join(versions)
    )


def main(argv: list[str]) -> None:
    """Runs the chosen benchmarks (all by default) and writes docs/benchmarks.md."""
    chosen = argv or list(BENCHMARKS)
    unknown = [n for n in chosen if n not in BENCHMARKS]
    if unknown:
        sys.exit(f"unknown benchmark {unknown[0]!r}; valid: {', '.join(BENCHMARKS)}")
    settings = [f"{k}={os.environ[k]} " for k in ("BENCH_TTA_RUNS",) if k in os.environ]
    command = "".join(settings) + " ".join(["python -m benchmarks.run", *argv])
    sections = [
        "# Benchmarks",
        "",
        f"Measured {datetime.date.today()} on {machine()}.",
        "",
        "Regenerate with `make bench` (`nox -s bench`, i.e. `python -m benchmarks.run`).",
        f"This file: `{command}`.",
    ]
    begin = time.perf_counter()
    for name in chosen:
        start = time.perf_counter()
        module = importlib.import_module(BENCHMARKS[name])
        rows = module.run()
        table = markdown_table(rows)
        took = f"({time.perf_counter() - start:.0f} s)"
        print(f"\n## {name} {took}\n{table}", flush=True)
        doc = (module.__doc__ or "").strip()
        sections += ["", f"## {name}", "", doc, "", table, "", f"Took {took[1:-1]}."]
    sections += ["", f"All together: {time.perf_counter() - begin:.0f} s."]
    path = os.path.join(os.path.dirname(__file__), "..", "docs", "benchmarks.md")
    with open(path, "w") as f:
        f.write("\n".join(sections) + "\n")
    print(f"\nwrote {os.path.normpath(path)}")


if __name__ == "__main__":
    main(sys.argv[1:])
