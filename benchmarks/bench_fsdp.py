"""FSDP against data parallelism on 8 simulated CPU devices: a ViT's steps/s and memory.

The jit variants' train step (``configs/default.py`` with a ViT of 4x4 patches on random
CIFAR-10-shaped images, one batch placed once) built twice in one fresh process, with
``mesh=dict(data=-1, fsdp=1)`` (the state replicated on every device) and with
``mesh=dict(data=-1, fsdp=8)`` (each large parameter and its optimizer state split 8 ways), and
timed in alternating blocks. ``ratio`` is FSDP's steps/s over data parallelism's, the median of
per-round ratios (target: >= 0.90); ``bytes_ratio`` the train state's bytes on the fullest
device, FSDP over data (target: about 1/8, plus the small leaves FSDP leaves whole). On a CPU,
the 8 devices share this machine's cores: the all-gathers FSDP adds cost compute time here, where
a GPU or TPU overlaps them with the step.

    python -m benchmarks.run fsdp
"""

from __future__ import annotations

from benchmarks import _template

BLOCKS, STEPS = 6, 10
SIZES = {"vit-w128-d4": (128, 4, 64)}  # name -> (width, depth, global batch)


def run(blocks: int = BLOCKS, steps: int = STEPS) -> list[dict]:
    """One row per jit variant and ViT size: FSDP relative to data parallelism."""
    projects = _template.generate()
    rows = []
    for variant in ("nnx-jit", "linen-jit"):
        for size, (width, depth, batch) in SIZES.items():
            r = _template.run_driver(
                projects[variant], "fsdp", str(blocks), str(steps), str(width), str(depth),
                str(batch), devices=8,
            )  # fmt: skip
            assert r["devices"] == 8, r
            rows.append(
                dict(
                    variant=variant,
                    model=size,
                    ratio=round(r["ratio"], 3),
                    ratio_quartiles="{:.3f}-{:.3f}".format(*r["ratio_quartiles"]),
                    data_steps_per_s=round(r["data_steps_per_s"], 2),
                    fsdp_steps_per_s=round(r["fsdp_steps_per_s"], 2),
                    data_mib_per_device=round(r["data_bytes_per_device"] / 2**20, 2),
                    fsdp_mib_per_device=round(r["fsdp_bytes_per_device"] / 2**20, 2),
                    bytes_ratio=round(r["fsdp_bytes_per_device"] / r["data_bytes_per_device"], 3),
                    first_loss_diff=f"{r['first_loss_diff']:.1e}",
                    steps=r["steps"],
                )
            )
    return rows


if __name__ == "__main__":
    from benchmarks.run import markdown_table

    print(markdown_table(run()))
