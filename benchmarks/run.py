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
from importlib import metadata

BENCHMARKS = {
    "optim": "benchmarks.bench_optim",
    "input_pipeline": "benchmarks.bench_input_pipeline",
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
    sections = [
        "# Benchmarks",
        "",
        f"Measured {datetime.date.today()} on {machine()}.",
        "",
        "Regenerate with `make bench` (`nox -s bench`, i.e. `python -m benchmarks.run`).",
    ]
    for name in chosen:
        module = importlib.import_module(BENCHMARKS[name])
        rows = module.run()
        table = markdown_table(rows)
        print(f"\n## {name}\n{table}", flush=True)
        doc = (module.__doc__ or "").strip()
        sections += ["", f"## {name}", "", doc, "", table]
    path = os.path.join(os.path.dirname(__file__), "..", "docs", "benchmarks.md")
    with open(path, "w") as f:
        f.write("\n".join(sections) + "\n")
    print(f"\nwrote {os.path.normpath(path)}")


if __name__ == "__main__":
    main(sys.argv[1:])
