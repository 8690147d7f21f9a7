"""Functional checks of the benchmark harness on tiny settings (no timing thresholds)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import (
    _template,
    bench_accumulation,
    bench_hlo,
    bench_overhead,
    bench_resnet,
    offline_bundle,
    run,
)


def test_accumulation_is_the_same_update_and_reports_memory():
    rows = bench_accumulation.run(batch_sizes=(16,))
    assert [r["accumulate_steps"] for r in rows] == [1, bench_accumulation.K]
    for row in rows:
        assert {"batch", "setup", "temp_kib", "argument_kib", "max_param_change"} <= set(row)
        assert row["temp_kib"] > 0 and row["argument_kib"] > 0
    assert float(rows[1]["max_param_diff"]) < 1e-5 < float(rows[1]["max_param_change"])


def test_overhead_rows(monkeypatch):
    """One variant, tiny blocks: the three loops run (the driver checks that the fixed-batch
    loop's first loss equals the variant's) and the row has its columns."""
    projects = _template.generate()
    monkeypatch.setattr(_template, "generate", lambda: {"nnx-jit": projects["nnx-jit"]})
    (row,) = bench_overhead.run(blocks=3, steps_per_block=2)
    assert list(row) == [
        "variant",
        "steps_per_s",
        "hand_written_steps_per_s",
        "ratio",
        "ratio_iqr",
        "data_wait",
        "input_cpu",
        "first_loss_diff",
        "steps",
    ]
    assert row["variant"] == "nnx-jit" and row["steps"] == 6
    for key in ("data_wait", "input_cpu"):  # percentages (data_wait may be negative: noise)
        assert row[key].endswith("%") and -100 < float(row[key][:-1]) <= 100, key
    assert float(row["first_loss_diff"]) < 1e-5


def test_resnet_rows_both_model_apis():
    """A tiny ResNet, one NNX and one Linen variant: the variant's loop and two hand-written ones
    run, and the variant and hand-written steps compile the same work (XLA's FLOPs per step
    agree)."""
    sizes = {"tiny": (8, (1,), 4, False)}
    rows = bench_resnet.run(sizes, blocks=3, steps_per_block=1, variants=["nnx-jit", "linen-pmap"])
    assert [(r["variant"], r["size"], r["batch"]) for r in rows] == [
        ("nnx-jit", "tiny", 8),
        ("linen-pmap", "tiny", 8),
    ]
    for row in rows:
        assert row["dtype"] == "float32" and row["steps"] == 3
        assert row["steps_per_s"] > 0 and row["hand_written_steps_per_s"] > 0
        assert row["hand_vs_hand"] > 0  # two copies of the hand-written loop, timed
        assert row["hand_gflop_per_step"] > 0
        # The trainer adds metrics (accuracy, gradient norm) to the same forward/backward pass.
        assert 1 <= row["gflop_per_step"] / row["hand_gflop_per_step"] < 1.5, row


def test_hlo_counts_read_the_entry_computation():
    """``hlo_counts`` counts the top-level instructions of a compiled program: a ``lax.cond``
    is one conditional, and the parameters and the result tuple are not kernels."""
    import jax
    import jax.numpy as jnp

    from benchmarks import _driver

    def f(x):
        return jax.lax.cond(x.sum() > 0, jnp.sin, jnp.cos, x), x.T @ x

    counts = _driver.hlo_counts(jax.jit(f).lower(jnp.ones((4, 3))).compile())
    assert counts["conditionals"] == 1 and counts["kernels"] >= 3, counts
    assert counts["bytes_accessed"] > 0 and "parameter" not in counts["opcodes"], counts


# The variant's compiled step over the hand-written one's, in kernels (top-level instructions
# of the entry computation; ``bench_hlo``), measured 1.37-1.38 for the default CNN on the CPU
# (jax 0.12.0): 15 kernels for the gradient norm and finite check, 2 for the accuracy, 14 for
# the merge into the metrics carried and the trainer's counters.
MAX_KERNEL_RATIO = 1.45


def test_hlo_rows_bound_the_variants_extra_kernels():
    """The default CNN, one NNX and one Linen variant, compiled (never run): the rows have their
    columns, the variant's step holds the hand-written step's work (as many kernels or more,
    the same bytes within 10 %), and its extra kernels stay within :data:`MAX_KERNEL_RATIO`."""
    rows = bench_hlo.run(
        {"cnn": bench_hlo.MODELS["cnn"]}, variants=["nnx-jit", "linen-pmap"], ablate=False
    )
    assert [(r["variant"], r["model"]) for r in rows] == [("nnx-jit", "cnn"), ("linen-pmap", "cnn")]
    for row in rows:
        assert {"fusions", "custom_calls", "transposes", "mb_accessed", "conditionals"} <= set(row)
        assert row["hand_kernels"] > 10, row
        assert 1 <= row["kernel_ratio"] <= MAX_KERNEL_RATIO, row
        assert 1 <= row["bytes_ratio"] < 1.1, row
        assert row["conditionals"] <= 1, row  # the finite check's lax.cond, no more


def test_hlo_breakdown_sums_to_the_extra_kernels():
    """``bench_hlo.row`` attributes the variant's extra kernels level by level: the parts add up
    to the difference from the hand-written step."""
    counts = lambda k: dict(  # noqa: E731
        kernels=k, fusions=k, custom_calls=0, transposes=0, collectives=0, conditionals=0,
        bytes_accessed=1.0,
    )  # fmt: skip
    r = dict(variant=counts(20), hand=counts(10))
    r |= {f"without_{i}": counts(k) for i, k in enumerate((19, 15, 14))}
    row = bench_hlo.row("nnx-jit", "cnn", r)
    extra = [row[k] for k in ("extra_lr", "extra_grad_norm", "extra_accuracy", "extra_trainer")]
    assert extra == [1, 4, 1, 4] and row["kernel_ratio"] == 2.0


def test_offline_bundle_projects_replace_rendering(tmp_path, monkeypatch):
    """``offline_bundle.render`` copies the four variants; ``BENCH_PROJECTS`` makes the
    benchmarks use those copies (no cookiecutter) and names a missing one."""
    projects = offline_bundle.render(tmp_path / "projects")
    assert sorted(projects) == sorted(_template.generate())
    _template.generate.cache_clear()
    monkeypatch.setenv("BENCH_PROJECTS", str(tmp_path / "projects"))
    try:
        assert _template.generate() == projects
        assert all((p / "bench_project" / "train.py").is_file() for p in projects.values())
        _template.generate.cache_clear()
        shutil.rmtree(projects["linen-pmap"])
        with pytest.raises(FileNotFoundError, match="linen-pmap"):
            _template.generate()
    finally:
        _template.generate.cache_clear()


def test_every_benchmark_is_registered_and_importable():
    import importlib

    for name, module in run.BENCHMARKS.items():
        assert callable(importlib.import_module(module).run), name


def test_help_lists_every_benchmark_and_runs_none(capsys, monkeypatch):
    monkeypatch.setattr(run, "markdown_table", None)  # any benchmark run would fail on it
    run.main(["--help"])
    out = capsys.readouterr().out
    listed = [line.split()[0] for line in out.split("benchmarks:\n")[1].splitlines()]
    assert listed == list(run.BENCHMARKS)
    assert "Trainer overhead: each generated variant's train step" in out
    with pytest.raises(SystemExit, match=r"unknown benchmark 'nosuch'; valid: overhead, "):
        run.main(["nosuch"])


def test_markdown_table():
    table = run.markdown_table([dict(a=1, b=0.5), dict(a=2, c="x")])
    assert table.splitlines() == [
        "| a | b | c |",
        "|---|---|---|",
        "| 1 | 0.500 |  |",
        "| 2 |  | x |",
    ]


def test_grad_layout_rows():
    """Tiny settings on 8 simulated devices: the four constructions make the same updates (the
    loss after one of them agrees), and only plain ``jax.jit`` all-reduces gradients in a
    transposed layout."""
    from benchmarks import bench_grad_layout

    rows = bench_grad_layout.run(rounds=1, steps=2)
    assert [r["model"] for r in rows] == ["mlp", "scan_mlp", "cnn"]
    for row in rows:
        assert float(row["loss_spread"]) < 1e-5, row
        counts = row["transposed_grads (jit / folded / shard_map / pmap)"]
        assert counts.split(" / ")[1:] == ["0", "0", "0"], row
        if row["model"] != "cnn":  # (convolutions' backward passes keep some transposes)
            # sharding.pmap runs the unbatched step on each device: XLA folds autodiff's
            # transposes itself, as under shard_map (the pmap variants need no fold).
            assert row["hlo_transposes"].split(" / ")[2:] == ["0", "0"], row
        assert all(row[f"{k}_over_jit"] > 0 for k in ("jit_folded", "shard_map", "plugins_pmap"))


def test_throughput_reports_speed_relative_to_the_load_meter():
    """The scaling benchmark's driver mode, tiny: 8 devices, the variant's and the meter's
    speeds, and the variant's relative to the meter's (paired by block)."""
    project = _template.generate()["linen-jit"]
    r = _template.run_driver(project, "throughput", "4", "2", devices=8)
    assert r["devices"] == 8
    assert r["steps_per_s"] > 0 and r["meter_steps_per_s"] > 0 and r["compile_s"] > 0
    ratio_of_medians = r["steps_per_s"] / r["meter_steps_per_s"]
    assert 0.5 < r["relative"] / ratio_of_medians < 2, r  # two blocks each: the same pairs


def test_rendered_projects_are_deleted_when_the_process_exits():
    """``generate()`` renders into a temporary folder, which is gone after the process that
    rendered it exits (repeated benchmark runs leave nothing behind)."""
    code = "from benchmarks import _template; print(_template.generate()['nnx-jit'])"
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=_template.ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    project = Path(out.stdout.strip().splitlines()[-1])
    assert project.name == "bench-project" and project.is_absolute()
    assert not project.parents[1].exists()  # bench_template_*/nnx-jit/bench-project


def test_a_rerun_replaces_its_section_and_keeps_the_hand_written_ones_first(tmp_path, monkeypatch):
    import sys
    import types

    fake = types.ModuleType("fake_bench")
    fake.__doc__ = "A fake benchmark.\n\nIt measures nothing."
    fake.run = lambda: [dict(ratio=1.5)]
    monkeypatch.setitem(sys.modules, "fake_bench", fake)
    monkeypatch.setattr(run, "BENCHMARKS", {"fake": "fake_bench", "other": "other_bench"})
    monkeypatch.setattr(run, "machine", lambda: "a machine")
    doc = tmp_path / "benchmarks.md"
    doc.write_text(
        "# Benchmarks\n\nintro\n\n## other\n\nkept table\n\n## fake\n\nold table\n\n"
        "## summary\n\nwritten by hand\n"
    )
    run.main(["fake"], path=str(doc))
    text = doc.read_text()
    assert [line for line in text.splitlines() if line.startswith("## ")] == [
        "## summary", "## fake", "## other"
    ]  # fmt: skip
    assert "written by hand" in text and "kept table" in text and "old table" not in text
    assert "| 1.500 |" in text and "with `python -m benchmarks.run fake`" in text
