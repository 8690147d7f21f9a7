"""Functional checks of the benchmark harness on tiny settings (no timing thresholds)."""

from __future__ import annotations

from benchmarks import bench_accumulation, run


def test_accumulation_is_the_same_update_and_reports_memory():
    rows = bench_accumulation.run(batch_sizes=(16,))
    assert [r["accumulate_steps"] for r in rows] == [1, bench_accumulation.K]
    for row in rows:
        assert {"batch", "setup", "temp_kib", "argument_kib", "max_param_change"} <= set(row)
        assert row["temp_kib"] > 0 and row["argument_kib"] > 0
    assert float(rows[1]["max_param_diff"]) < 1e-5 < float(rows[1]["max_param_change"])


def test_every_benchmark_is_registered_and_importable():
    import importlib

    for name, module in run.BENCHMARKS.items():
        assert callable(importlib.import_module(module).run), name


def test_markdown_table():
    table = run.markdown_table([dict(a=1, b=0.5), dict(a=2, c="x")])
    assert table.splitlines() == [
        "| a | b | c |",
        "|---|---|---|",
        "| 1 | 0.500 |  |",
        "| 2 |  | x |",
    ]
