"""Trainer overhead: each generated variant's train step against a hand-written ``jax.jit`` loop.

The four variants (NNX/Linen x jit/pmap) are generated from this template with cookiecutter. In a
fresh process per variant, the variant's own ``train_and_evaluate`` builds its train state and step
(``create_train_state``, ``DataParallel.compile_train_step``), fed by its own input path
(``input_pipeline.train_batches`` then ``DataParallel.train_batches``) at the default config (CNN,
batch 128, AdamW with warmup-cosine, digits). Beside it, in the same process, runs a hand-written
loop: the same network in plain ``jax.lax`` starting from the variant's initial parameters, the same
label-smoothed cross-entropy and AdamW recipe in optax, one ``jax.jit`` over ``(params, opt_state,
image, label)`` with donated buffers, fed by ``plugins.data.train_iterator``. A third loop runs the
variant's step with no input path at all: one fixed batch (the first item of its
``dp.train_batches`` iterator, in the form the step takes -- on CPU the numpy batch, which the
step's own dispatch places) reused every step, from a second copy of the initial state.
``first_loss_diff`` (the first step's loss of the variant and the hand-written loop, same parameters
and batch) shows they compute the same network. Blocks of 50 steps rotate over the three loops
(variant, fixed batch, hand-written; then fixed, hand, variant; then hand, variant, fixed; ...),
each ending in the host read the trainer does at a log step (the variant's two loops, like the
trainer's, also wait every 16 steps for the outputs of 16 steps before: ``Fence``); steps/s are
medians over blocks. ``ratio`` = variant / hand-written steps/s (target >= 0.98) and ``data_wait`` =
1 - variant / fixed-batch steps/s, the share of wall time the trainer loses to its input path
(target < 2%), are paired estimates: each is the median over rounds of that round's ratio (the three
blocks of a round run back to back under the same load), which cancels the load drift of a shared
machine. ``ratio_iqr`` is the interquartile range of those per-round ratios: the noise of this
machine, to read the target against. Noise can still make ``data_wait`` slightly negative.
``input_cpu`` = the CPU time the input path adds to the dispatching thread (its CPU time per
variant block minus per fixed-batch block, ``time.thread_time``) / the variant's wall time, paired
per round like the others: a low-noise bound on the wait, since the input path can only delay the
step by the time it runs (all of it, if the host is the bottleneck; less when its work overlaps
the asynchronous step on free cores).
One CPU device (the default).

    python -m benchmarks.run overhead
"""

from __future__ import annotations

from benchmarks import _template

BLOCKS = 45  # a multiple of 3: each of the three loops goes first in 15 blocks
STEPS_PER_BLOCK = 50


def run(blocks: int = BLOCKS, steps_per_block: int = STEPS_PER_BLOCK) -> list[dict]:
    """One row per variant: its steps/s, the hand-written loop's, their ratio, the data wait."""
    rows = []
    for variant, project in _template.generate().items():
        r = _template.run_driver(project, "overhead", str(blocks), str(steps_per_block))
        rows.append(
            dict(
                variant=variant,
                steps_per_s=round(r["variant_steps_per_s"], 1),
                hand_written_steps_per_s=round(r["hand_steps_per_s"], 1),
                ratio=round(r["ratio"], 3),
                ratio_iqr="{:.3f}-{:.3f}".format(*r["ratio_quartiles"]),
                data_wait=f"{100 * r['data_wait']:.1f}%",
                input_cpu=f"{100 * r['input_cpu']:.1f}%",
                first_loss_diff=f"{r['first_loss_diff']:.1e}",
                steps=r["steps"],
            )
        )
    return rows


if __name__ == "__main__":
    from benchmarks.run import markdown_table

    print(markdown_table(run()))
