"""Trainer overhead: each generated variant's train step against a hand-written ``jax.jit`` loop.

The four variants (NNX/Linen x jit/pmap) are generated from this template with cookiecutter. In a
fresh process per variant, the variant's own ``trainer.run`` builds its train state and step
(``build_task``, ``DataParallel.compile_train_step``), fed by its own input path
(``input_pipeline.train_batches`` then ``DataParallel.train_batches``) at the default config
(CNN, batch 128, AdamW with warmup-cosine, digits). Beside it, in the same process, runs a
hand-written loop: the same network in plain ``jax.lax`` starting from the variant's initial
parameters, the same label-smoothed cross-entropy and AdamW recipe in optax, one ``jax.jit`` over
``(params, opt_state, image, label)`` with donated buffers, fed by ``plugins.data.train_iterator``.
``first_loss_diff`` (the first step's loss of both, same parameters and batch) shows they compute
the same network. Blocks of 50 steps alternate (A B, B A, ...), each ending in the host read the
trainer does at a log step; steps/s are medians over blocks. ``ratio`` = variant / hand-written
steps/s (target >= 0.98). ``data_wait`` is the share of the variant's wall time spent in
``next(batches)``. One CPU device (the default).

    python -m benchmarks.run overhead
"""

from __future__ import annotations

from benchmarks import _template

BLOCKS = 16
STEPS_PER_BLOCK = 50


def run(blocks: int = BLOCKS, steps_per_block: int = STEPS_PER_BLOCK) -> list[dict]:
    """One row per variant: its steps/s, the hand-written loop's, their ratio."""
    rows = []
    for variant, project in _template.generate().items():
        r = _template.run_driver(project, "overhead", str(blocks), str(steps_per_block))
        rows.append(
            dict(
                variant=variant,
                steps_per_s=round(r["variant_steps_per_s"], 1),
                hand_written_steps_per_s=round(r["hand_steps_per_s"], 1),
                ratio=round(r["variant_steps_per_s"] / r["hand_steps_per_s"], 3),
                data_wait=f"{100 * r['data_wait_share']:.2f}%",
                first_loss_diff=f"{r['first_loss_diff']:.1e}",
                steps=r["steps"],
            )
        )
    return rows


if __name__ == "__main__":
    from benchmarks.run import markdown_table

    print(markdown_table(run()))
