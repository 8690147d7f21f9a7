"""Compiled programs: each variant's train step against the hand-written one, counted in its HLO.
No timing: structural counts, the same on every run of a machine (of its JAX and XLA versions).

For each generated variant and model, a fresh process (``_driver.py hlo``, CPU, one device)
compiles, for one batch, the variant's train step as its ``train_and_evaluate`` builds it
(``_driver.build``) and the hand-written step of the ``resnet`` benchmark
(``_driver.hand_written_model``: the same model as a pure function, the same optax
transformation, one ``jax.jit``, no trainer or metrics). Models: ``cnn`` = ``configs/default.py``
(the CNN, batch 128, digits-shaped 8x8x1 images); ``resnet`` = ``configs/cifar10.py`` at a small
size (batch 32, stage sizes (1, 1), 16 filters, float32: the ``resnet`` benchmark's CPU size).
Columns, each counted in the optimised HLO of the compiled program (``compiled.as_text()``),
at the top level of its entry computation (where each instruction is one kernel launch or
library call; what a fusion fuses is not counted):

- ``kernels`` / ``hand_kernels``: the entry computation's instructions other than
  ``parameter``, ``constant``, ``tuple``, ``get-tuple-element`` and ``bitcast`` (which name or
  bundle buffers and launch nothing): fusions, library calls, copies, collectives,
  conditionals, ... of the variant's step / the hand-written one; ``kernel_ratio`` = the two's
  ratio.
- ``fusions``: its ``fusion`` instructions (variant / hand-written).
- ``custom_calls``: its ``custom-call`` instructions (library calls: convolutions and matrix
  products on a GPU; none on the CPU, whose library calls are fusions).
- ``transposes``: its top-level ``transpose`` and ``copy`` instructions (layout changes and
  buffer copies; transposes fused into another kernel are not counted).
- ``collectives``: all-reduce, all-gather, reduce-scatter, all-to-all, collective-permute
  (the pmap variants' mean over devices; one device here, so these move nothing).
- ``conditionals``: ``conditional`` instructions (a ``lax.cond`` kept as one).
- ``mb_accessed``: XLA's cost analysis, bytes read and written by the program, in MB (10^6),
  variant / hand-written; ``bytes_ratio`` their ratio.
- ``extra_*``: where the variant's extra kernels come from, measured by compiling the
  variant's step again with parts of ``plugins.metrics.train_step_metrics`` fed constants
  that XLA folds away (``_driver._metrics_without``), cumulatively: ``extra_lr`` = kernels of
  the step minus those without the learning rate and non-finite count read from the optimizer
  state; ``extra_grad_norm`` = minus also the gradient norm and the finite check (its
  ``lax.cond``); ``extra_accuracy`` = minus also the accuracy; ``extra_trainer`` = what is left
  over the hand-written step: the loss kept as a metric, the merge into the metrics carried
  between log steps (sums and counts), the trainer's step counter and, under pmap, the mean
  over devices (what feeds the constants, their copies into the outputs, counts here too).

CPU counts are a proxy for a GPU's: XLA's GPU backend fuses differently (it merges sibling
reductions and calls cuDNN/cuBLAS as custom calls), but an op the CPU program gains from the
trainer is one the GPU program has to run too. ``tests/test_benchmarks.py`` bounds
``kernel_ratio`` of one variant so that it cannot grow unnoticed.

    python -m benchmarks.run hlo
"""

from __future__ import annotations

from benchmarks import _template

# name -> driver arguments after the ablation flag: model, global batch[, stages, filters, half]
MODELS = {
    "cnn": ("cnn", "128"),
    "resnet": ("resnet", "32", "1,1", "16", "0"),
}


def row(variant: str, model: str, r: dict) -> dict:
    """One table row from the driver's counts ``r`` (with the ablation levels when present)."""
    v, h = r["variant"], r["hand"]
    out = dict(
        variant=variant,
        model=model,
        kernels=v["kernels"],
        hand_kernels=h["kernels"],
        kernel_ratio=round(v["kernels"] / h["kernels"], 3),
        fusions=f"{v['fusions']} / {h['fusions']}",
        custom_calls=f"{v['custom_calls']} / {h['custom_calls']}",
        transposes=f"{v['transposes']} / {h['transposes']}",
        collectives=v["collectives"],
        conditionals=v["conditionals"],
        mb_accessed=f"{v['bytes_accessed'] / 1e6:.2f} / {h['bytes_accessed'] / 1e6:.2f}",
        bytes_ratio=round(v["bytes_accessed"] / h["bytes_accessed"], 3),
    )
    levels = [k for k in r if k.startswith("without_")]
    if levels:
        chain = [v] + [r[k] for k in levels] + [h]
        names = ["extra_lr", "extra_grad_norm", "extra_accuracy", "extra_trainer"]
        for name, (a, b) in zip(names, zip(chain, chain[1:], strict=False), strict=True):
            out[name] = a["kernels"] - b["kernels"]
    return out


def run(
    models: dict | None = None, variants: list[str] | None = None, ablate: bool = True
) -> list[dict]:
    """One row per variant and model: the kernels of the variant's compiled step and of the
    hand-written one, and (``ablate``) where the extra ones come from."""
    projects = _template.generate()
    rows = []
    for model, (name, batch, *sizes) in (models or MODELS).items():
        for variant in variants or list(projects):
            args = [name, batch, "1" if ablate else "0", *sizes]
            r = _template.run_driver(projects[variant], "hlo", *args)
            rows.append(row(variant, model, r))
    return rows


if __name__ == "__main__":
    from benchmarks.run import markdown_table

    print(markdown_table(run()))
