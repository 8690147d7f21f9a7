"""Runs inside a generated project (its folder is the working directory): measures one variant.

    python _driver.py overhead PACKAGE BLOCKS STEPS_PER_BLOCK
    python _driver.py throughput PACKAGE STEPS [BLOCKS]
    python _driver.py tta PACKAGE PARENT_START_TIME WORKDIR CACHE_DIR
    python _driver.py resnet PACKAGE BLOCKS STEPS_PER_BLOCK BATCH STAGES FILTERS HALF
    python _driver.py fsdp PACKAGE BLOCKS STEPS_PER_BLOCK WIDTH DEPTH BATCH
    python _driver.py hlo PACKAGE MODEL BATCH ABLATE [STAGES FILTERS HALF]

Prints one JSON line last. Launched by ``benchmarks._template.run_driver``.

- ``overhead``: three loops in one process. The variant's own train step, built by its
  ``train_and_evaluate`` (:func:`build`), (1) fed by its own
  input path and (2) fed one fixed batch -- the first item of its ``dp.train_batches`` iterator,
  reused every step, from a second copy of the initial state -- and (3) a hand-written
  ``jax.jit`` loop over the same network (pure ``jax.lax``, the variant's initial parameters,
  the same loss and AdamW recipe, donated buffers). Blocks of steps rotate over the three
  (1 2 3, 2 3 1, 3 1 2, ...; BLOCKS must be a multiple of 3); each block ends with the host
  read the trainer does at a log step. The input path costs ``1 - (1) / (2)`` of the wall time.
- ``throughput``: the variant's train step on a few fixed batches, steps/s and the compile time
  of its first call, in blocks alternating with ``load_meter``'s (a fixed hand-written
  8-device step): ``relative`` is the median per-pair speed of the variant over the meter's.
- ``resnet``: the variant's train step on a ResNet (the CIFAR-10 config's model, sizes given)
  and one fixed CIFAR-10-shaped batch against the same model called as a pure function in a
  hand-written ``jax.jit`` step; steps/s and XLA's FLOPs per step of each. Built with
  ``build``, without TensorFlow or tensorflow-datasets (refused if imported).
- ``hlo``: no timing: the variant's train step (``build``) and :func:`hand_written_model`
  compiled for one batch of the default CNN (``MODEL=cnn``) or of the CIFAR-10 config's ResNet
  (``MODEL=resnet``, sizes given), and the variant's step again with parts of its metrics left
  out (:func:`_metrics_without`; ``ABLATE=0`` skips those); each compiled program's kernels,
  custom calls, transposes and copies from its HLO text, and bytes accessed from XLA's cost and
  memory analyses (:func:`hlo_counts`).
- ``tta``: ``main.py --config=configs/default.py`` in this process, timing the imports, the
  compilation (JAX's own compile events) and the first evaluation at >= 97% accuracy.
"""

from __future__ import annotations

import collections
import importlib
import json
import logging
import os
import re
import runpy
import statistics
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.getcwd())


CIFAR10_CLASSES, CIFAR10_SHAPE = 10, (32, 32, 3)


def _compile_listener() -> dict:
    """Sums JAX's compile events (backend compile, including persistent-cache loads)."""
    import jax

    totals = {"compile_s": 0.0, "trace_lower_s": 0.0, "compiles": 0, "cache_hits": 0}

    def on_duration(event: str, duration: float, **_) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            totals["compile_s"] += duration
            totals["compiles"] += 1
        elif event in (
            "/jax/core/compile/jaxpr_trace_duration",
            "/jax/core/compile/jaxpr_to_mlir_module_duration",
        ):
            totals["trace_lower_s"] += duration

    def on_event(event: str, **_) -> None:
        if event == "/jax/compilation_cache/cache_hits":
            totals["cache_hits"] += 1

    jax.monitoring.register_event_duration_secs_listener(on_duration)
    jax.monitoring.register_event_listener(on_event)
    return totals


def _rotate(loops: list, blocks: int, steps: int) -> tuple[dict, dict]:
    """Seconds per block, of wall time and of this (the dispatching) thread's CPU time:
    ``blocks`` rounds, each running every ``(key, block)`` of ``loops`` for ``steps`` steps back
    to back, the loops taking turns to go first (1 2 3, 2 3 1, ...)."""
    wall: dict[str, list[float]] = {key: [] for key, _ in loops}
    cpu: dict[str, list[float]] = {key: [] for key, _ in loops}
    for i in range(blocks):
        first = i % len(loops)
        for key, block in loops[first:] + loops[:first]:
            start, start_cpu = time.perf_counter(), time.thread_time()
            block(steps)
            wall[key].append(time.perf_counter() - start)
            cpu[key].append(time.thread_time() - start_cpu)
    return wall, cpu


def _paired_ratio(variant: list[float], hand: list[float]) -> dict:
    """Variant steps/s over hand-written steps/s, paired per round (the blocks of a round run
    back to back under the same load): the median of the per-round ratios, which cancels the
    load drift that medians taken apart keep, and their quartiles (this machine's noise)."""
    ratios = [h / v for v, h in zip(variant, hand, strict=True)]
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    return dict(ratio=statistics.median(ratios), ratio_quartiles=(quartiles[0], quartiles[2]))


def build(package: str, config, num_classes: int | None = None, input_shape=None):
    """The variant's state and compiled train step as its ``train_and_evaluate`` builds them:
    the config checked, the dataset's facts (read from its metadata unless given), the optimizer,
    ``train.create_train_state`` and ``train.train_step`` compiled by ``parallel.DataParallel``.

    Returns a namespace: ``dp``, ``state`` (on the host), ``train_step`` (compiled), ``train``
    (the module), ``num_classes``, ``input_shape``, ``dtype``.
    """
    import functools
    import types

    import jax.numpy as jnp

    from plugins import loop, losses, optim

    train = importlib.import_module(f"{package}.train")
    models = importlib.import_module(f"{package}.models")
    parallel = importlib.import_module(f"{package}.parallel")
    loop.check_config(config, model_check=models.check_model_config)
    if num_classes is None:
        input_pipeline = importlib.import_module(f"{package}.input_pipeline")
        num_classes, input_shape = input_pipeline.dataset_info(config)
    tx = optim.create(config.optimizer, total_steps=config.num_train_steps)
    state = train.create_train_state(config, tx, num_classes, tuple(input_shape))
    step = functools.partial(
        train.train_step,
        loss_fn=losses.create(config.loss),
        update_args=optim.extra_update_args(config.optimizer),
    )
    if isinstance(state, tuple):  # NNX: (graphdef, state)
        graphdef, state = state
        step = functools.partial(step, graphdef)
    dp = parallel.DataParallel(config.get("mesh"))
    return types.SimpleNamespace(
        dp=dp,
        state=state,
        train_step=dp.compile_train_step(step, state),
        train=train,
        num_classes=num_classes,
        input_shape=tuple(input_shape),
        dtype=jnp.bfloat16 if config.half_precision else jnp.float32,
    )


def _hand_written_parts(config, init_params: dict):
    """The default CNN as pure ``jax.lax`` (``loss_fn(params, image, label)``), its AdamW recipe
    and its parameters as arrays."""
    import jax
    import jax.numpy as jnp
    import optax

    opt = config.optimizer
    schedule = optax.warmup_cosine_decay_schedule(
        0.0,
        opt.learning_rate,
        opt.schedule.warmup_steps,
        config.num_train_steps,
        opt.schedule.end_value,
    )
    tx = optax.adamw(
        schedule,
        weight_decay=opt.weight_decay,
        mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p),
    )
    convs = sorted(k for k in init_params if k.startswith("conv_"))

    def apply(p, x):
        for name in convs:
            x = jax.lax.conv_general_dilated(
                x, p[name]["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
            )
            x = jax.nn.relu(x + p[name]["bias"])
            x = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
            x = x * 0.25
        x = x.reshape(x.shape[0], -1)
        x = jax.nn.relu(x @ p["dense"]["kernel"] + p["dense"]["bias"])
        return x @ p["head"]["kernel"] + p["head"]["bias"]

    def loss_fn(p, image, label):
        logits = apply(p, image)
        targets = optax.smooth_labels(jax.nn.one_hot(label, logits.shape[-1]), 0.1)
        return optax.softmax_cross_entropy(logits, targets).mean()

    return loss_fn, tx, jax.tree.map(jnp.asarray, init_params)


def _update_step(loss_fn, tx, mean=lambda tree: tree):
    """``(params, opt_state, image, label) -> (params, opt_state, loss)``, the gradients and
    loss passed through ``mean`` (a ``pmean`` where the step runs per device)."""
    import jax
    import optax

    def step(params, opt_state, image, label):
        loss, grads = mean(jax.value_and_grad(loss_fn)(params, image, label))
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def hand_written(config, init_params: dict):
    """The same CNN, loss and AdamW recipe as a plain jitted function of arrays."""
    import jax

    loss_fn, tx, params = _hand_written_parts(config, init_params)
    return jax.jit(_update_step(loss_fn, tx), donate_argnums=(0, 1)), params, tx.init(params)


def load_meter(config, init_params: dict, image, label):
    """A fixed workload on every device, the same in every variant's process: the hand-written
    CNN step as ``jax.jit`` of a ``jax.shard_map`` over the data mesh (gradients ``pmean``-ed,
    state replicated and donated, one batch already placed). Timed in blocks beside a variant's,
    it measures how fast this machine is at the moment: a variant's speed over it cancels the
    load drift between processes. Returns ``block(steps)``."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from plugins import sharding

    mesh = sharding.data_mesh()
    loss_fn, tx, params = _hand_written_parts(config, init_params)
    step = _update_step(loss_fn, tx, lambda tree: jax.lax.pmean(tree, "data"))
    step = jax.jit(
        jax.shard_map(
            step, mesh=mesh, in_specs=(P(), P(), P("data"), P("data")), out_specs=P(),
            check_vma=False,
        ),
        donate_argnums=(0, 1),
    )  # fmt: skip
    replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    state = {"params": jax.device_put(params, replicated)}
    state["opt_state"] = jax.device_put(tx.init(params), replicated)
    image, label = jax.device_put(image, split), jax.device_put(label, split)

    def block(steps: int) -> None:
        params, opt_state = state["params"], state["opt_state"]
        for i in range(steps):
            params, opt_state, loss = step(params, opt_state, image, label)
            if i % 10 == 9:
                jax.block_until_ready(loss)
        jax.block_until_ready(loss)
        state.update(params=params, opt_state=opt_state)

    return block


def overhead(package: str, blocks: str, steps_per_block: str) -> dict:
    blocks, n = int(blocks), int(steps_per_block)
    if blocks % 3:
        raise ValueError(f"blocks={blocks}: use a multiple of 3 (each loop goes first as often)")
    import jax
    from configs import default

    from plugins import data, loop, metrics

    config = default.get_config()
    built = build(package, config)
    input_pipeline = importlib.import_module(f"{package}.input_pipeline")
    dp, train = built.dp, built.train

    def input_path():
        host = input_pipeline.train_batches(config, 0)
        return host, dp.train_batches(host)

    # The variant, as its trainer runs it. Both of its loops start from their own copy of the
    # initial state (the step donates its state argument) and share the (never donated) empty
    # metrics.
    empty = dp.put_state(metrics.TrainMetrics.empty())
    step = built.train_step
    host, batches = input_path()
    variant = {"state": dp.put_state(built.state)}

    def variant_block(steps: int) -> None:
        state, acc, fence = variant["state"], empty, loop.Fence()
        for _ in range(steps):
            state, acc = step(state, acc, next(batches))
            fence(acc)  # as the trainer's loop bounds the steps in flight
        variant["loss"] = metrics.scalars(dp.to_host(acc))["train_loss"]  # the log-step read
        variant.update(state=state)

    # The same step with no input path: the first batch of a second, identical iterator (so the
    # variant's own iterator still starts at batch 0), in the form the step takes, every step.
    fixed_host, fixed_batches = input_path()
    fixed_batch = next(fixed_batches)
    fixed_host.close() if hasattr(fixed_host, "close") else None
    fixed = {"state": dp.put_state(built.state)}

    def fixed_block(steps: int) -> None:
        state, acc, fence = fixed["state"], empty, loop.Fence()
        for _ in range(steps):
            state, acc = step(state, acc, fixed_batch)
            fence(acc)
        fixed["loss"] = metrics.scalars(dp.to_host(acc))["train_loss"]  # the log-step read
        fixed.update(state=state)

    # The hand-written loop over the same network and initial parameters.
    hstep, params, opt_state = hand_written(config, train.init_params(config))
    hdata = data.train_iterator(
        config.dataset, batch_size=config.batch_size, seed=config.seed, data_dir=config.data_dir
    )
    hand = {"params": params, "opt_state": opt_state}

    def hand_block(steps: int) -> None:
        params, opt_state = hand["params"], hand["opt_state"]
        for _ in range(steps):
            batch = next(hdata)
            params, opt_state, loss = hstep(params, opt_state, batch["image"], batch["label"])
        hand.update(params=params, opt_state=opt_state, loss=float(loss))

    # Same network: the first step's loss of all three (same parameters, same first batch).
    variant_block(1)
    fixed_block(1)
    hand_block(1)
    first_loss_diff = abs(variant["loss"] - hand["loss"])
    if variant["loss"] != fixed["loss"]:
        raise RuntimeError(f"fixed-batch loop: first loss {fixed['loss']} != {variant['loss']}")
    loops = [("variant", variant_block), ("fixed", fixed_block), ("hand", hand_block)]
    for _ in range(2):  # warm up
        for _, block in loops:
            block(n)
    times, cpu = _rotate(loops, blocks, n)
    host.close() if hasattr(host, "close") else None
    hdata.close()
    pairs = list(zip(times["variant"], times["fixed"], strict=True))
    return dict(
        devices=jax.device_count(),
        **_paired_ratio(times["variant"], times["hand"]),
        data_wait=statistics.median(1 - f / v for v, f in pairs),  # paired per round too
        variant_steps_per_s=n / statistics.median(times["variant"]),
        fixed_batch_steps_per_s=n / statistics.median(times["fixed"]),
        hand_steps_per_s=n / statistics.median(times["hand"]),
        # The dispatching thread's CPU time that the input path adds, per variant wall time.
        input_cpu=statistics.median(
            (cv - cf) / v
            for v, cv, cf in zip(times["variant"], cpu["variant"], cpu["fixed"], strict=True)
        ),
        first_loss_diff=first_loss_diff,
        steps=blocks * n,
    )


def throughput(package: str, steps: str, blocks: str = "9") -> dict:
    """Steady-state steps/s of the variant's train step on a few fixed batches, its compile
    time, and its speed relative to :func:`load_meter` (blocks of the two alternate)."""
    steps, blocks = int(steps), int(blocks)
    import jax
    import numpy as np
    from configs import default

    from plugins import data, metrics

    config = default.get_config()
    built = build(package, config)
    input_pipeline = importlib.import_module(f"{package}.input_pipeline")
    dp = built.dp
    state = dp.put_state(built.state)
    empty = dp.put_state(metrics.TrainMetrics.empty())
    step = built.train_step
    host = input_pipeline.train_batches(config, 0)
    batches = dp.train_batches(host)
    batch_list = [next(batches) for _ in range(8)]
    totals = _compile_listener()
    start = time.perf_counter()
    state, acc = step(state, empty, batch_list[0])
    jax.block_until_ready(acc)
    first_call_s = time.perf_counter() - start
    compile_s = totals["compile_s"]
    variant = {"state": state, "acc": acc}

    def variant_block(steps: int) -> None:
        state, acc = variant["state"], variant["acc"]
        for i in range(steps):
            state, acc = step(state, acc, batch_list[i % len(batch_list)])
            if i % 10 == 9:  # bounded work in flight, like the trainer's log steps
                jax.block_until_ready(acc)
        jax.block_until_ready(acc)
        variant.update(state=state, acc=acc)

    # One batch for the meter, made on demand (no prefetch thread left running beside the timing).
    reference = next(
        data.train_iterator(config.dataset, batch_size=config.batch_size, seed=0, prefetch=0)
    )
    meter = load_meter(
        config, built.train.init_params(config), np.asarray(reference["image"]),
        np.asarray(reference["label"]),
    )  # fmt: skip
    meter(2)  # compile
    blocks = blocks + blocks % 2  # each goes first as often
    wall, _ = _rotate([("variant", variant_block), ("meter", meter)], blocks, steps)
    host.close() if hasattr(host, "close") else None
    return dict(
        devices=jax.device_count(),
        steps_per_s=steps / statistics.median(wall["variant"]),
        meter_steps_per_s=steps / statistics.median(wall["meter"]),
        relative=statistics.median(
            m / v for v, m in zip(wall["variant"], wall["meter"], strict=True)
        ),
        compile_s=compile_s,
        first_call_s=first_call_s,
    )


def _flops(compiled) -> float:
    """FLOPs per call of a compiled function, by XLA's cost analysis (0 where it has none)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):  # one entry per device program in older jax versions
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


def hand_written_model(package: str, config, num_classes: int, input_shape, dtype):
    """The variant's own model called as a pure function in one ``jax.jit`` over ``(params,
    other model variables, optimizer state, image, label)`` with donated buffers: no trainer,
    no TrainState or metrics; the optax transformation of ``plugins.optim.create``."""
    import inspect

    import jax
    import jax.numpy as jnp
    import optax

    from plugins import losses, optim

    models = importlib.import_module(f"{package}.models")
    tx = optim.create(config.optimizer, total_steps=config.num_train_steps)
    loss_fn = losses.create(config.loss)
    kwargs = dict(num_classes=num_classes, dtype=dtype)
    if "rngs" in inspect.signature(models.create_model).parameters:  # Flax NNX
        from flax import nnx

        model = models.create_model(
            config.model, input_shape=input_shape, rngs=nnx.Rngs(config.seed), **kwargs
        )
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)

        def forward(params, rest, image):
            model = nnx.merge(graphdef, params, rest)
            logits = model(image)
            return logits, nnx.to_pure_dict(nnx.split(model, nnx.Param, ...)[2])

    else:  # Flax Linen
        model = models.create_model(config.model, **kwargs)
        dummy = jnp.zeros((1, *input_shape), jnp.float32)
        variables = model.init(jax.random.key(config.seed), dummy, train=False)
        params = variables["params"]
        rest = {k: v for k, v in variables.items() if k != "params"}

        def forward(params, rest, image):
            if not rest:  # no batch norm
                return model.apply({"params": params}, image, train=True), rest
            return model.apply({"params": params, **rest}, image, train=True, mutable=list(rest))

    def step(params, rest, opt_state, image, label):
        def loss_of(params):
            logits, new_rest = forward(params, rest, image)
            return loss_fn(logits, label), new_rest

        (loss, rest), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), rest, opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1, 2)), (params, rest, tx.init(params))


def resnet(
    package: str, blocks: str, steps: str, batch_size: str, stages: str, filters: str, half: str
) -> dict:
    """The variant's train step on the CIFAR-10 config's ResNet, on one fixed CIFAR-10-shaped
    batch, against :func:`hand_written_model`; steps/s and XLA's FLOPs per step of each."""
    blocks, n = int(blocks), int(steps)
    # Accelerator machines may have JAX but no TensorFlow: this mode must never need it.
    for name in ("tensorflow", "tensorflow_datasets"):
        sys.modules.setdefault(name, None)  # importing it now raises ImportError
    import jax
    import jax.numpy as jnp
    import numpy as np
    from configs import cifar10

    from plugins import data, metrics

    config = cifar10.get_config()
    config.batch_size = int(batch_size)
    config.model.stage_sizes = tuple(int(s) for s in stages.split(","))
    config.model.num_filters = int(filters)
    config.half_precision = half == "1"
    # CIFAR-10's facts, as train_and_evaluate would read them from the dataset's metadata.
    setup = build(package, config, CIFAR10_CLASSES, CIFAR10_SHAPE)
    dp = setup.dp
    rng = np.random.default_rng(0)
    host = data.example_batch(setup.input_shape, config.batch_size)
    host["image"] = rng.standard_normal(host["image"].shape).astype(host["image"].dtype)
    host["label"] = rng.integers(0, setup.num_classes, config.batch_size).astype(np.int32)

    step = setup.train_step
    batch = next(dp.train_batches([host]))
    empty = dp.put_state(metrics.TrainMetrics.empty())
    variant = {"state": dp.put_state(setup.state)}
    compiled = step.lower(variant["state"], empty, batch).compile()
    variant_flops = _flops(compiled)
    # On CPU train_batches gives the step numpy batches, which its dispatch places every step;
    # placed once here as the step takes them, like the hand-written loop's.
    batch = jax.device_put(batch, compiled.input_shardings[0][2])

    def variant_block(steps: int) -> None:
        state, acc = variant["state"], empty
        for _ in range(steps):
            state, acc = step(state, acc, batch)
        jax.block_until_ready(acc)
        variant["state"] = state

    himage, hlabel = jax.device_put(host["image"]), jax.device_put(host["label"])

    def hand_loop() -> tuple[Callable[[int], None], Callable[[], float]]:
        """A hand-written step compiled on its own: a block of its steps (each block carries on
        from its own state), and a function counting XLA's FLOPs per step (one more compile)."""
        hstep, hargs = hand_written_model(
            package, config, setup.num_classes, setup.input_shape, setup.dtype
        )
        hand = {"args": jax.device_put(hargs)}
        flops = lambda: _flops(hstep.lower(*hand["args"], himage, hlabel).compile())  # noqa: E731

        def hand_block(steps: int) -> None:
            params, rest, opt_state = hand["args"]
            for _ in range(steps):
                params, rest, opt_state, loss = hstep(params, rest, opt_state, himage, hlabel)
            jax.block_until_ready(loss)
            hand["args"] = (params, rest, opt_state)

        return hand_block, flops

    hand_block, count_flops = hand_loop()
    hand_flops = count_flops()
    # The same hand-written step compiled a second time: what two identical loops measure
    # against each other is this machine's noise floor for ``ratio``.
    again_block, _ = hand_loop()
    loops = [("variant", variant_block), ("hand", hand_block), ("hand_again", again_block)]
    for _, block in loops:  # warm up
        block(n)
    times, _ = _rotate(loops, blocks, n)
    device = jax.devices()[0]
    return dict(
        device=f"{jax.device_count()} x {device.device_kind}",
        dtype=jnp.dtype(setup.dtype).name,
        **_paired_ratio(times["variant"], times["hand"]),
        hand_vs_hand=_paired_ratio(times["hand_again"], times["hand"])["ratio"],
        variant_steps_per_s=n / statistics.median(times["variant"]),
        hand_steps_per_s=n / statistics.median(times["hand"]),
        variant_flops=variant_flops,
        hand_flops=hand_flops,
        steps=blocks * n,
    )


# Entry-computation instructions that launch no kernel: they name, bundle or unbundle buffers.
NOT_KERNELS = frozenset({"parameter", "constant", "tuple", "get-tuple-element", "bitcast"})
_OPCODE = re.compile(r"=\s.*?\s([a-z][a-z0-9_-]*)\(")


def entry_opcodes(hlo_text: str) -> list[str]:
    """The opcode of each instruction of the entry computation of an HLO module's text (the
    program's top level: each fusion there is one kernel; fused computations are not read)."""
    opcodes, inside = [], False
    for line in hlo_text.splitlines():
        if line.startswith("ENTRY "):
            inside = True
        elif inside and line.startswith("}"):
            break
        elif inside and " = " in line:
            match = _OPCODE.search(line)
            if match:
                opcodes.append(match.group(1))
    return opcodes


def hlo_counts(compiled) -> dict:
    """Structural counts of a compiled program (``jax.stages.Compiled``), from its optimised HLO
    (``as_text()``) and XLA's cost and memory analyses: ``kernels`` (entry-computation
    instructions but :data:`NOT_KERNELS`), ``fusions``, ``custom_calls``, ``transposes``
    (top-level ``transpose`` and ``copy``), ``collectives`` (all-reduce, all-gather, ...),
    ``conditionals``, ``bytes_accessed`` (cost analysis), ``temp_bytes`` and ``argument_bytes``
    (memory analysis), ``flops``, and ``opcodes`` (how many of each top-level opcode)."""
    text = compiled.as_text()
    if isinstance(text, list | tuple):
        text = text[0]
    opcodes = entry_opcodes(text)
    count = lambda *names: sum(op in names for op in opcodes)  # noqa: E731
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):  # one entry per device program in older jax versions
        cost = cost[0] if cost else {}
    cost = cost or {}
    memory = compiled.memory_analysis()
    collectives = sum(
        op.split("-start")[0] in ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
                                  "collective-permute")
        for op in opcodes if not op.endswith("-done")
    )  # fmt: skip
    kernels = [op for op in opcodes if op not in NOT_KERNELS]
    return dict(
        kernels=len(kernels),
        fusions=count("fusion"),
        custom_calls=count("custom-call"),
        transposes=count("transpose", "copy"),
        collectives=collectives,
        conditionals=count("conditional"),
        bytes_accessed=float(cost.get("bytes accessed", 0.0)),
        temp_bytes=int(getattr(memory, "temp_size_in_bytes", 0)),
        argument_bytes=int(getattr(memory, "argument_size_in_bytes", 0)),
        flops=float(cost.get("flops", 0.0)),
        opcodes=dict(collections.Counter(kernels)),
    )


# Parts of ``plugins.metrics.train_step_metrics`` that ``hlo`` leaves out, cumulatively: each
# level's program differs from the one before by that part only.
METRIC_PARTS = ("learning_rate", "grad_norm", "accuracy")


def _metrics_without(parts) -> Callable:
    """``plugins.metrics.train_step_metrics`` fed constants in place of the inputs of ``parts``
    (``learning_rate``: the learning rate and non-finite count read from the optimizer state;
    ``grad_norm``: the gradients, so no norm and no finite check; ``accuracy``: the logits and
    labels), which XLA folds away: the step's program without those parts, everything else (the
    loss, the merge into the metrics carried, the trainer) as it is."""
    import jax.numpy as jnp

    from plugins import metrics

    original = metrics.train_step_metrics

    def train_step_metrics(*, loss, logits, labels, grads, learning_rate, nonfinite_count=0,
                           axis_name=None):  # fmt: skip
        if "accuracy" in parts:
            logits = jnp.zeros((1, logits.shape[-1]), logits.dtype)
            labels = jnp.zeros((1,), labels.dtype)
        if "grad_norm" in parts:
            grads = jnp.zeros([], jnp.float32)
        if "learning_rate" in parts:
            learning_rate, nonfinite_count = jnp.zeros([]), jnp.zeros([])
        return original(
            loss=loss, logits=logits, labels=labels, grads=grads, learning_rate=learning_rate,
            nonfinite_count=nonfinite_count, axis_name=axis_name,
        )  # fmt: skip

    return train_step_metrics


def hlo(package: str, model: str, batch_size: str, ablate: str = "1", stages: str = "",
        filters: str = "", half: str = "0") -> dict:  # fmt: skip
    """Compiles (never runs) the variant's train step, the same step with parts of its metrics
    left out, and :func:`hand_written_model`, for one batch of ``model`` (``cnn``: the default
    config's CNN on digits-shaped images; ``resnet``: the CIFAR-10 config's ResNet at the sizes
    given); :func:`hlo_counts` of each."""
    for name in ("tensorflow", "tensorflow_datasets"):
        sys.modules.setdefault(name, None)  # no TensorFlow needed (nor its import time)
    import jax
    import numpy as np

    from plugins import data, metrics

    if model == "cnn":
        from configs import default

        config, classes, shape = default.get_config(), 10, (8, 8, 1)  # digits' facts
    elif model == "resnet":
        from configs import cifar10

        config, classes, shape = cifar10.get_config(), CIFAR10_CLASSES, CIFAR10_SHAPE
        config.model.stage_sizes = tuple(int(s) for s in stages.split(","))
        config.model.num_filters = int(filters)
        config.half_precision = half == "1"
    else:
        raise ValueError(f"model {model!r}: use cnn or resnet")
    config.batch_size = int(batch_size)
    host = data.example_batch(shape, config.batch_size)
    host["label"] = np.arange(config.batch_size, dtype=np.int32) % classes
    counts = {}
    levels = [("variant", ())]
    if ablate == "1":
        levels += [
            ("without_" + "_".join(METRIC_PARTS[: i + 1]), METRIC_PARTS[: i + 1])
            for i in range(len(METRIC_PARTS))
        ]
    original = metrics.train_step_metrics
    for key, parts in levels:
        metrics.train_step_metrics = _metrics_without(parts) if parts else original
        try:
            built = build(package, config, classes, shape)
            dp = built.dp
            args = (dp.put_state(built.state), dp.put_state(metrics.TrainMetrics.empty()))
            batch = next(dp.train_batches([host]))
            counts[key] = hlo_counts(built.train_step.lower(*args, batch).compile())
        finally:
            metrics.train_step_metrics = original
    hstep, hargs = hand_written_model(package, config, classes, shape, built.dtype)
    hbatch = (jax.numpy.asarray(host["image"]), jax.numpy.asarray(host["label"]))
    counts["hand"] = hlo_counts(hstep.lower(*hargs, *hbatch).compile())
    return dict(device=f"{jax.device_count()} x {jax.devices()[0].device_kind}", **counts)


def tta(package: str, parent_start: str, workdir: str, cache_dir: str) -> dict:
    """``main.py`` on the default config, timed from the parent's ``Popen``."""
    parent_start = float(parent_start)
    # The imports main.py and the trainer need, timed on their own.
    import clu.metric_writers  # noqa: F401  (imports tensorflow)
    import jax
    import orbax.checkpoint  # noqa: F401

    importlib.import_module(f"{package}.train")
    imports_done = time.time()
    totals = _compile_listener()
    marks: list[tuple[float, float, float]] = []  # (time, accuracy, compile_s so far)

    class EvalWatcher(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            text = record.getMessage()
            if "eval_accuracy=" in text:
                value = float(text.split("eval_accuracy=")[1].split(",")[0])
                marks.append((time.time(), value, totals["compile_s"]))

    logging.getLogger().addHandler(EvalWatcher())
    sys.argv = [
        "main.py",
        "--config=configs/default.py",
        f"--workdir={workdir}",
        f"--compilation_cache_dir={cache_dir}",
    ]
    try:
        runpy.run_path("main.py", run_name="__main__")
    except SystemExit as exit:
        if exit.code:
            raise
    end = time.time()
    reached = [m for m in marks if m[1] >= 0.97]
    at, accuracy, compile_s = reached[0] if reached else (end, marks[-1][1], totals["compile_s"])
    return dict(
        imports_s=imports_done - parent_start,
        compile_s=compile_s,
        time_to_97_s=at - parent_start if reached else None,
        total_s=end - parent_start,
        accuracy=accuracy,
        final_accuracy=marks[-1][1],
        compiles=totals["compiles"],
        cache_hits=totals["cache_hits"],
        jax=jax.__version__,
    )


def fsdp(package: str, blocks: str, steps: str, width: str, depth: str, batch: str) -> dict:
    """The variant's train step on a ViT (CIFAR-10-shaped random images, one fixed batch placed
    once) with ``mesh=dict(data=-1, fsdp=1)`` and with ``fsdp=8``, built side by side in this
    process and timed in alternating blocks; bytes per device of each placed train state."""
    blocks, n = int(blocks), int(steps)
    import jax
    import ml_collections
    import numpy as np
    from configs import default

    from plugins import data, metrics, sharding

    config = default.get_config()
    config.batch_size = int(batch)
    config.model = ml_collections.ConfigDict(
        dict(name="vit", patch_size=4, width=int(width), depth=int(depth), num_heads=4)
    )
    rng = np.random.default_rng(0)
    host = data.example_batch(CIFAR10_SHAPE, config.batch_size)
    host["image"] = rng.random(host["image"].shape, np.float32)
    host["label"] = rng.integers(0, CIFAR10_CLASSES, config.batch_size).astype(np.int32)
    loops, held, losses = [], {}, {}
    for name, fsdp_size in (("data", 1), ("fsdp", 8)):
        config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=fsdp_size))
        built = build(package, config, CIFAR10_CLASSES, CIFAR10_SHAPE)
        dp = built.dp
        state = dp.put_state(built.state)
        held[name] = max(sharding.bytes_per_device(state).values())
        empty = dp.put_state(metrics.TrainMetrics.empty())
        batch = next(dp.train_batches([host]))
        compiled = built.train_step.lower(state, empty, batch).compile()
        batch = jax.device_put(batch, compiled.input_shardings[0][2])
        run = {"state": state}

        def block(
            steps: int, run=run, step=built.train_step, empty=empty, batch=batch, dp=dp
        ) -> None:
            state, acc = run["state"], empty
            for i in range(steps):
                state, acc = step(state, acc, batch)
                if i % 10 == 9:
                    jax.block_until_ready(acc)
            run["loss"] = metrics.scalars(dp.to_host(acc))["train_loss"]
            run["state"] = state

        block(1)
        losses[name] = run["loss"]
        loops.append((name, block))
    for _, block in loops:  # warm up
        block(n)
    times, _ = _rotate(loops, blocks, n)
    return dict(
        devices=jax.device_count(),
        **_paired_ratio(times["fsdp"], times["data"]),
        data_steps_per_s=n / statistics.median(times["data"]),
        fsdp_steps_per_s=n / statistics.median(times["fsdp"]),
        data_bytes_per_device=held["data"],
        fsdp_bytes_per_device=held["fsdp"],
        first_loss_diff=abs(losses["data"] - losses["fsdp"]),
        steps=blocks * n,
    )


if __name__ == "__main__":
    mode, package, *args = sys.argv[1:]
    modes = {
        "overhead": overhead, "throughput": throughput, "tta": tta, "resnet": resnet,
        "fsdp": fsdp, "hlo": hlo,
    }  # fmt: skip
    result = modes[mode](package, *args)
    print(json.dumps(result), flush=True)
