"""ResNet on CIFAR-10-shaped data: each variant's train step against a hand-written loop.
It runs on the default JAX backend (a GPU where there is one; the other benchmarks force the CPU).

For each generated variant, a fresh process builds the variant's train state and step as its
``train_and_evaluate`` does (``_driver.build`` with CIFAR-10's 10 classes of 32x32x3 images)
on ``configs/cifar10.py`` (its ResNet with batch norm, SGD with Nesterov
momentum, decoupled weight decay, label smoothing) at the sizes of each row, and runs it on one
fixed batch of random 32x32x3 images already on the device (this measures the step, not the
input pipeline). It never imports TensorFlow or tensorflow-datasets, which accelerator machines
often lack. Beside it, in the same process: the same model class called as a pure function
(``nnx.split``/``nnx.merge``, or Linen's ``apply``) in one hand-written ``jax.jit`` over
``(params, batch statistics, optimizer state, image, label)`` with donated buffers, with the
optax transformation of ``plugins.optim.create`` (the ``optim`` benchmark compares that with a
hand-written optax chain) -- no trainer, ``TrainState`` or metrics -- and that hand-written step
compiled a second time. Blocks of steps rotate over the three, each ending in
``block_until_ready``. ``ratio`` = variant / hand-written steps/s, the median of the per-round
ratios, ``ratio_iqr`` their interquartile range; ``hand_vs_hand`` = the second hand-written
copy / the first, the same median: two identical loops, so its distance from 1 is the noise
floor to read ``ratio`` against.
``gflop_per_step`` is XLA's cost analysis of each compiled step; ``tflop_per_s`` = that times
steps/s, the achieved rate.

    python -m benchmarks.run resnet        # on a GPU machine; BENCH_RESNET_SIZES=small on a CPU
"""

from __future__ import annotations

import os

from benchmarks import _template

# name -> (global batch, ResNet stage sizes, filters of the first stage, bfloat16 compute)
SIZES = {
    "cifar10": (256, (2, 2, 2), 32, False),  # configs/cifar10.py as shipped
    "cifar10-bf16": (256, (2, 2, 2), 32, True),  # the same, half_precision=True
    "wide-bf16": (512, (2, 2, 2, 2), 64, True),  # ResNet-18's stage layout, 64 filters
}
SMALL = {"small": (32, (1, 1), 16, False)}  # a CPU-sized run
BLOCKS = 12  # a multiple of the three loops: each goes first as often
SMALL_BLOCKS = 30  # a shared CPU: with 10, the medians scattered by +-4 % between runs
STEPS_PER_BLOCK = 20


def run(
    sizes: dict | None = None,
    blocks: int | None = None,
    steps_per_block: int = STEPS_PER_BLOCK,
    variants: list[str] | None = None,
) -> list[dict]:
    """One row per variant and size: steps/s and achieved FLOP/s of the variant and of the
    hand-written loop, and their ratio. ``blocks`` defaults to :data:`BLOCKS`, or
    :data:`SMALL_BLOCKS` for the CPU-sized run (``BENCH_RESNET_SIZES=small``)."""
    small = sizes is None and os.environ.get("BENCH_RESNET_SIZES") == "small"
    if sizes is None:
        sizes = SMALL if small else SIZES
    if blocks is None:
        blocks = SMALL_BLOCKS if small else BLOCKS
    projects = _template.generate()
    rows = []
    for size, (batch, stages, filters, half) in sizes.items():
        for variant in variants or list(projects):
            args = [str(blocks), str(steps_per_block), str(batch)]
            args += [",".join(map(str, stages)), str(filters), "1" if half else "0"]
            r = _template.run_driver(projects[variant], "resnet", *args, platforms=None)
            rows.append(
                dict(
                    variant=variant,
                    size=size,
                    batch=batch,
                    dtype=r["dtype"],
                    steps_per_s=round(r["variant_steps_per_s"], 1),
                    hand_written_steps_per_s=round(r["hand_steps_per_s"], 1),
                    ratio=round(r["ratio"], 3),
                    ratio_iqr="{:.3f}-{:.3f}".format(*r["ratio_quartiles"]),
                    hand_vs_hand=round(r["hand_vs_hand"], 3),
                    gflop_per_step=round(r["variant_flops"] / 1e9, 2),
                    hand_gflop_per_step=round(r["hand_flops"] / 1e9, 2),
                    tflop_per_s=round(r["variant_flops"] * r["variant_steps_per_s"] / 1e12, 3),
                    hand_tflop_per_s=round(r["hand_flops"] * r["hand_steps_per_s"] / 1e12, 3),
                    device=r["device"],
                    steps=r["steps"],
                )
            )
    return rows


if __name__ == "__main__":
    from benchmarks.run import markdown_table

    print(markdown_table(run()))
