"""Runs every benchmark, prints each table, and writes them all to docs/benchmarks.md.

    python -m benchmarks.run            # or: nox -s bench / make bench
    python -m benchmarks.run optim      # only the named benchmarks
    python -m benchmarks.run --help     # what each one measures; runs nothing

Each benchmark module has ``run() -> list[dict]`` (rows measured side by side in one run).
"""

from __future__ import annotations

import ast
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
    "pmap_floor": "benchmarks.bench_pmap_floor",
    "grad_layout": "benchmarks.bench_grad_layout",
    "fsdp": "benchmarks.bench_fsdp",
    "resnet": "benchmarks.bench_resnet",
    "hlo": "benchmarks.bench_hlo",
}
# Run by default only where JAX's default backend is an accelerator (name them to run anyway).
ACCELERATOR_ONLY = ("resnet",)
PACKAGES = ("jax", "jaxlib", "flax", "optax", "tensorflow-datasets", "orbax-checkpoint", "clu")


def markdown_table(rows: list[dict]) -> str:
    """Renders rows (dicts with the same keys) as a markdown table."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def _devices() -> str:
    """This machine's JAX devices, e.g. ``1 x cpu`` or ``1 x NVIDIA H100 80GB HBM3``."""
    import jax

    return f"{jax.device_count()} x {jax.devices()[0].device_kind}"


def machine() -> str:
    """One line describing this machine and the library versions."""
    versions = []
    for name in PACKAGES:
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    return (
        f"{platform.platform()}, Python {platform.python_version()}, {os.cpu_count()} CPUs, "
        f"{_devices()}; " + ", ".join(versions)
    )


def _accelerator() -> bool:
    """Whether JAX's default backend here is a GPU or TPU."""
    import jax

    return jax.default_backend() != "cpu"


def _existing_sections(path: str) -> dict[str, str]:
    """The ``## name`` sections of an earlier docs/benchmarks.md, by name."""
    if not os.path.exists(path):
        return {}
    sections: dict[str, str] = {}
    name = None
    with open(path) as f:
        for line in f:
            if line.startswith("## "):
                name = line[3:].split()[0]
                sections[name] = ""
            elif name is not None:
                sections[name] += line
    return sections


def usage() -> str:
    """This module's usage and each benchmark's name with the first line of its docstring,
    read from the source (nothing is imported, so nothing heavy loads)."""
    lines = [(__doc__ or "").strip(), "", "benchmarks:"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name, module in BENCHMARKS.items():
        with open(os.path.join(root, *module.split(".")) + ".py") as f:
            doc = ast.get_docstring(ast.parse(f.read())) or ""
        where = " (by default on a GPU/TPU only)" if name in ACCELERATOR_ONLY else ""
        lines.append(f"  {name:<17} {doc.splitlines()[0] if doc else ''}{where}")
    return "\n".join(lines)


def main(argv: list[str], path: str | None = None) -> None:
    """Runs the chosen benchmarks (all by default) and writes ``path`` (docs/benchmarks.md); a
    run of some benchmarks replaces their sections and keeps the others' (each section says when
    and how it was measured), sections written by hand first."""
    if any(arg in ("-h", "--help", "help") for arg in argv):
        print(usage())
        return
    chosen = argv or [n for n in BENCHMARKS if n not in ACCELERATOR_ONLY or _accelerator()]
    unknown = [n for n in chosen if n not in BENCHMARKS]
    if unknown:
        sys.exit(
            f"unknown benchmark {unknown[0]!r}; valid: {', '.join(BENCHMARKS)} "
            "(--help says what each measures)"
        )
    knobs = ("BENCH_TTA_RUNS", "BENCH_RESNET_SIZES")
    settings = [f"{k}={os.environ[k]} " for k in knobs if k in os.environ]
    command = "".join(settings) + " ".join(["python -m benchmarks.run", *argv])
    if path is None:
        path = os.path.join(os.path.dirname(__file__), "..", "docs", "benchmarks.md")
    path = os.path.normpath(path)
    body = _existing_sections(path)
    header = [
        "# Benchmarks",
        "",
        "Regenerate with `make bench` (`nox -s bench`, i.e. `python -m benchmarks.run`);",
        "`python -m benchmarks.run NAME ...` reruns some and keeps the other sections. Each",
        "section ends with the date, command and machine it was measured with.",
    ]
    here = machine()
    for name in chosen:
        start = time.perf_counter()
        module = importlib.import_module(BENCHMARKS[name])
        rows = module.run()
        table = markdown_table(rows)
        took = time.perf_counter() - start
        print(f"\n## {name} ({took:.0f} s)\n{table}", flush=True)
        doc = (module.__doc__ or "").strip()
        when = f"Measured {datetime.date.today()} with `{command}` ({took:.0f} s) on {here}."
        body[name] = "\n".join(["", doc, "", table, "", when, "", ""])
    # Sections written by hand (the summary) first, then the benchmarks' in their order.
    order = [n for n in body if n not in BENCHMARKS] + [n for n in BENCHMARKS if n in body]
    with open(path, "w") as f:
        f.write("\n".join(header) + "\n\n")
        f.write("".join(f"## {name}\n{body[name]}" for name in order).rstrip() + "\n")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
