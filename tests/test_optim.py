"""plugins.optim: config-built optimizers equal the hand-written optax chains people write.

Every recipe runs 6 update steps of a small MLP on a Linen params dict and on NNX state through
``nnx.Optimizer(model, tx, wrt=nnx.Param)``, both starting from the same parameters, and is
compared with the hand-written optax chain on the same params dict.
"""

from __future__ import annotations

import functools
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib
import pytest
from flax import nnx

from plugins import masks, optim
from plugins.config_errors import ConfigError

STEPS = 6
TOTAL_STEPS = 20
LR = 1e-2


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(16, name="backbone")(x))
        return nn.Dense(4, name="head")(x)


class NnxMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.backbone = nnx.Linear(8, 16, rngs=rngs)
        self.head = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.backbone(x)))


def _batches(n=STEPS, batch=16, seed=0):
    rng = np.random.default_rng(seed)
    return [
        (rng.normal(size=(batch, 8)).astype(np.float32), rng.integers(0, 4, size=batch))
        for _ in range(n)
    ]


def _init_params():
    params = LinenMLP().init(jax.random.PRNGKey(0), jnp.zeros((1, 8)))["params"]
    # Non-zero biases so weight decay on biases would be visible.
    return jax.tree.map(lambda p: p + 0.1 if p.ndim == 1 else p, params)


def _loss(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def run_dict(tx, params, batches, **extra):
    """Hand-written functional loop over a Linen params dict; returns the params after each
    step and the final optimizer state."""

    def loss_fn(p, x, y):
        return _loss(LinenMLP().apply({"params": p}, x), y)

    @jax.jit
    def step(p, s, x, y):
        loss, g = jax.value_and_grad(loss_fn)(p, x, y)
        kwargs = {"value": loss} if "value" in extra else {}
        u, s = tx.update(g, s, p, **kwargs)
        return optax.apply_updates(p, u), s

    state = tx.init(params)
    history = []
    for x, y in batches:
        params, state = step(params, state, x, y)
        history.append(params)
    return history, state


def run_nnx(tx, params, batches):
    """The same through nnx.Optimizer; returns params dicts (as Linen's) after each step."""
    model = NnxMLP(nnx.Rngs(1))
    nnx.update(model, nnx.State(jax.tree.map(jnp.asarray, params)))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x, y):
        grads = nnx.grad(lambda m: _loss(m(x), y))(model)
        optimizer.update(model, grads)

    history = []
    for x, y in batches:
        step(model, optimizer, x, y)
        history.append(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    return history, optimizer


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    a, b = jax.tree.map(np.asarray, a), jax.tree.map(np.asarray, b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


def _labels(params, fn):
    return jax.tree_util.tree_map_with_path(lambda kp, x: fn(kp[0].key, x), params)


def _kernels_fn(params):
    """An optax-style mask function (params -> bool tree), as the optax tutorials write it."""
    return jax.tree_util.tree_map_with_path(lambda path, _: "kernel" in str(path), params)


def _warmup_cosine():
    return optax.warmup_cosine_decay_schedule(0.0, LR, 3, TOTAL_STEPS, 1e-4)


RECIPES = {
    "sgd_nesterov": (
        dict(name="sgd", learning_rate=LR, kwargs=dict(momentum=0.9, nesterov=True)),
        lambda p: optax.sgd(LR, momentum=0.9, nesterov=True),
    ),
    "adam": (dict(name="adam", learning_rate=LR), lambda p: optax.adam(LR)),
    "adamw": (
        dict(name="adamw", learning_rate=LR, weight_decay=0.1, weight_decay_mask="all"),
        lambda p: optax.adamw(LR, weight_decay=0.1),
    ),
    "adamw_default_decay": (dict(name="adamw", learning_rate=LR), lambda p: optax.adamw(LR)),
    "rmsprop": (
        dict(name="rmsprop", learning_rate=LR, kwargs=dict(decay=0.9)),
        lambda p: optax.rmsprop(LR, decay=0.9),
    ),
    "adafactor": (dict(name="adafactor", learning_rate=LR), lambda p: optax.adafactor(LR)),
    "lion": (dict(name="lion", learning_rate=1e-3), lambda p: optax.lion(1e-3)),
    "clip_global_norm_adamw": (
        dict(
            name="adamw",
            learning_rate=LR,
            weight_decay=1e-4,
            weight_decay_mask="all",
            clip_global_norm=0.5,
        ),
        lambda p: optax.chain(optax.clip_by_global_norm(0.5), optax.adamw(LR, weight_decay=1e-4)),
    ),
    "clip_value_adam": (
        dict(name="adam", learning_rate=LR, clip_value=0.01),
        lambda p: optax.chain(optax.clip(0.01), optax.adam(LR)),
    ),
    "warmup_cosine": (
        dict(
            name="adam",
            learning_rate=LR,
            schedule=dict(name="warmup_cosine", warmup_steps=3, end_value=1e-4),
        ),
        lambda p: optax.adam(_warmup_cosine()),
    ),
    "exponential": (
        dict(
            name="sgd",
            learning_rate=0.1,
            schedule=dict(name="exponential", transition_steps=2, decay_rate=0.5),
        ),
        lambda p: optax.sgd(optax.exponential_decay(0.1, transition_steps=2, decay_rate=0.5)),
    ),
    "piecewise": (
        dict(
            name="sgd",
            learning_rate=0.1,
            schedule=dict(name="piecewise_constant", boundaries_and_scales={"2": 0.5, "4": 0.1}),
        ),
        lambda p: optax.sgd(optax.piecewise_constant_schedule(0.1, {2: 0.5, 4: 0.1})),
    ),
    "adamw_kernel_mask": (
        dict(name="adamw", learning_rate=LR, weight_decay=0.1, weight_decay_mask=["kernel$"]),
        lambda p: optax.adamw(
            LR,
            weight_decay=0.1,
            mask=jax.tree_util.tree_map_with_path(lambda kp, x: kp[-1].key == "kernel", p),
        ),
    ),
    "adamw_matrices_mask": (
        dict(name="adamw", learning_rate=LR, weight_decay=0.1, weight_decay_mask="matrices"),
        lambda p: optax.adamw(LR, weight_decay=0.1, mask=jax.tree.map(lambda x: x.ndim >= 2, p)),
    ),
    "backbone_head_lr": (
        dict(
            name="adam", learning_rate=1e-2, param_groups=[dict(match="^backbone/", lr_mult=0.01)]
        ),
        lambda p: optax.multi_transform(
            {"backbone": optax.adam(1e-4), "head": optax.adam(1e-2)},
            _labels(p, lambda top, x: "backbone" if top == "backbone" else "head"),
        ),
    ),
    "group_with_own_optimizer_and_decay": (
        dict(
            name="adam",
            learning_rate=LR,
            param_groups=[
                dict(match="^head/", optimizer=dict(name="sgd", learning_rate=0.1)),
                dict(match="kernel", weight_decay=0.5, weight_decay_mask="all"),
            ],
        ),
        lambda p: optax.multi_transform(
            {
                "head": optax.sgd(0.1),
                "decayed": optax.chain(optax.adam(LR), _add_scaled_params(-LR * 0.5)),
                "rest": optax.adam(LR),
            },
            jax.tree_util.tree_map_with_path(
                lambda kp, x: (
                    "head"
                    if kp[0].key == "head"
                    else ("decayed" if kp[-1].key == "kernel" else "rest")
                ),
                p,
            ),
        ),
    ),
    # No embeddings here, so name='muon' is exactly optax.contrib.muon, AdamW half included.
    "muon": (dict(name="muon", learning_rate=LR), lambda p: optax.contrib.muon(LR)),
    "muon_with_kwargs_as_the_cheat_sheet_spells_them": (
        dict(
            name="muon",
            learning_rate=LR,
            kwargs=dict(momentum=0.9, nesterov=False, eps=1e-6, adam_b1=0.8),
        ),
        lambda p: optax.contrib.muon(LR, beta=0.9, nesterov=False, eps=1e-6, adam_b1=0.8),
    ),
    "muon_weight_decay_on_matrices": (
        dict(name="muon", learning_rate=LR, weight_decay=0.1),
        lambda p: optax.contrib.muon(LR, weight_decay=0.1),
    ),
    "group_with_own_optimizer_gets_no_parent_decay": (
        dict(
            name="adamw",
            learning_rate=LR,
            weight_decay=0.1,
            weight_decay_mask="all",
            param_groups=[dict(match="bias$", optimizer=dict(name="adam"))],
        ),
        lambda p: optax.multi_transform(
            {"no_decay": optax.adam(LR), "decay": optax.adamw(LR, weight_decay=0.1)},
            jax.tree_util.tree_map_with_path(
                lambda kp, x: "no_decay" if kp[-1].key == "bias" else "decay", p
            ),
        ),
    ),
    # Masks as optax takes them: a bool tree, or a function params -> bool tree.
    "adamw_mask_tree": (
        dict(
            name="adamw",
            learning_rate=LR,
            weight_decay=0.1,
            weight_decay_mask={
                "backbone": {"kernel": True, "bias": False},
                "head": {"kernel": False, "bias": True},
            },
        ),
        lambda p: optax.adamw(
            LR,
            weight_decay=0.1,
            mask={
                "backbone": {"kernel": True, "bias": False},
                "head": {"kernel": False, "bias": True},
            },
        ),
    ),
    "adamw_mask_function": (
        dict(name="adamw", learning_rate=LR, weight_decay=0.1, weight_decay_mask=_kernels_fn),
        lambda p: optax.adamw(LR, weight_decay=0.1, mask=_kernels_fn),
    ),
    "frozen_by_mask_tree": (
        dict(
            name="adam",
            learning_rate=LR,
            freeze={
                "backbone": {"kernel": True, "bias": True},
                "head": {"kernel": False, "bias": False},
            },
        ),
        lambda p: optax.multi_transform(
            {"train": optax.adam(LR), "frozen": optax.set_to_zero()},
            _labels(p, lambda top, x: "frozen" if top == "backbone" else "train"),
        ),
    ),
    "group_matched_by_mask_function": (
        dict(name="adam", learning_rate=1e-2, param_groups=[dict(match=_kernels_fn, lr_mult=0.1)]),
        lambda p: optax.multi_transform(
            {"kernels": optax.adam(1e-3), "rest": optax.adam(1e-2)},
            jax.tree_util.tree_map_with_path(
                lambda kp, x: "kernels" if kp[-1].key == "kernel" else "rest", p
            ),
        ),
    ),
    "frozen_backbone": (
        dict(name="adam", learning_rate=LR, freeze=["^backbone/"]),
        lambda p: optax.multi_transform(
            {"train": optax.adam(LR), "frozen": optax.set_to_zero()},
            _labels(p, lambda top, x: "frozen" if top == "backbone" else "train"),
        ),
    ),
    # Optimizers whose learning rate is a number (optax rejects schedules for them).
    "rprop": (dict(name="rprop", learning_rate=LR), lambda p: optax.rprop(LR)),
    "sm3": (dict(name="sm3", learning_rate=LR), lambda p: optax.sm3(LR)),
    "optimistic_adam": (
        dict(name="optimistic_adam", learning_rate=LR),
        lambda p: optax.optimistic_adam(LR),
    ),
    # Schedule-free's own warmup argument, as optax.contrib documents it.
    "schedule_free_own_warmup": (
        dict(name="schedule_free_adamw", learning_rate=LR, kwargs=dict(warmup_steps=3)),
        lambda p: optax.contrib.schedule_free_adamw(LR, warmup_steps=3),
    ),
    "sgd_decoupled_decay": (
        # sgd has no weight-decay argument: plugins adds AdamW-style decoupled decay.
        dict(name="sgd", learning_rate=0.1, weight_decay=0.01, weight_decay_mask="all"),
        lambda p: _sgd_decoupled(0.1, 0.01),
    ),
}


def _sgd_decoupled(lr, wd):
    """Hand-written: p <- p - lr * (g + wd * p), i.e. sgd then -lr*wd*p."""
    return optax.chain(optax.scale_by_learning_rate(lr), _add_scaled_params(-lr * wd))


def _add_scaled_params(scale):
    def update(u, s, p):
        return jax.tree.map(lambda ui, pi: ui + scale * pi, u, p), s

    return optax.GradientTransformation(lambda p: optax.EmptyState(), update)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_matches_hand_written_chain(recipe):
    config, hand_written = RECIPES[recipe]
    params, batches = _init_params(), _batches()
    expected, _ = run_dict(hand_written(params), params, batches)
    tx = optim.create(config, total_steps=TOTAL_STEPS)
    got_dict, _ = run_dict(tx, params, batches)
    got_nnx, _ = run_nnx(tx, params, batches)
    for step in range(STEPS):
        assert_trees_close(got_dict[step], expected[step])
        assert_trees_close(got_nnx[step], expected[step])
    # The run moved the parameters (a recipe that does nothing would pass vacuously).
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), expected[-1], params)
    assert max(jax.tree.leaves(moved)) > 0


def test_muon_excludes_embeddings():
    params = {
        "Embed_0": {"embedding": jnp.ones((10, 6))},
        "Dense_0": {"kernel": jnp.ones((6, 3)) * 0.5, "bias": jnp.ones(3)},
    }
    grads = jax.tree.map(lambda p: jnp.linspace(-1, 1, p.size).reshape(p.shape), params)
    tx = optim.create(dict(name="muon", learning_rate=LR), total_steps=10)
    updates, _ = tx.update(grads, tx.init(params), params)
    adam = optax.adamw(LR, weight_decay=0.0, nesterov=True)  # optax.contrib.muon's AdamW half
    expected_adam, _ = adam.update(grads, adam.init(params), params)
    muon = optax.contrib.muon(LR)
    expected_muon, _ = muon.update(grads, muon.init(params), params)
    np.testing.assert_allclose(
        updates["Embed_0"]["embedding"], expected_adam["Embed_0"]["embedding"]
    )
    np.testing.assert_allclose(updates["Dense_0"]["bias"], expected_adam["Dense_0"]["bias"])
    np.testing.assert_allclose(
        updates["Dense_0"]["kernel"], expected_muon["Dense_0"]["kernel"], rtol=1e-4, atol=1e-7
    )


def test_ema_of_params_and_eval_params():
    params, batches = _init_params(), _batches()
    tx = optim.create(dict(name="adamw", learning_rate=LR, ema_decay=0.5), total_steps=TOTAL_STEPS)
    got, state = run_dict(tx, params, batches)
    expected, _ = run_dict(optax.adamw(LR), params, batches)
    assert_trees_close(got[-1], expected[-1])
    ema = params
    for p in expected:
        ema = jax.tree.map(lambda e, x: 0.5 * e + 0.5 * x, ema, p)
    assert_trees_close(optim.eval_params(state, got[-1]), ema)
    # The same through nnx.Optimizer: eval_params reads nnx's wrapped state.
    got_nnx, optimizer = run_nnx(tx, params, batches)
    ema_nnx = optim.eval_params(optimizer.opt_state, nnx.State(got_nnx[-1]))
    assert_trees_close(nnx.to_pure_dict(ema_nnx), ema)
    # Without EMA, eval_params is the identity.
    plain = optim.create(dict(name="adam", learning_rate=LR), total_steps=TOTAL_STEPS)
    assert optim.eval_params(plain.init(params), params) is params


def test_multisteps_equals_big_batch_and_schedule_counts_optimizer_steps():
    params = _init_params()
    big = _batches(n=2, batch=32, seed=3)
    micro = [(x[i : i + 8], y[i : i + 8]) for x, y in big for i in range(0, 32, 8)]
    schedule = dict(name="warmup_cosine", warmup_steps=1, end_value=0.0)
    tx = optim.create(
        dict(name="adam", learning_rate=LR, schedule=schedule, accumulate_steps=4), total_steps=8
    )
    got, state = run_dict(tx, params, micro)
    reference = optax.adam(optax.warmup_cosine_decay_schedule(0.0, LR, 1, 2, 0.0))
    expected, _ = run_dict(reference, params, big)
    assert_trees_close(got[3], expected[0], rtol=1e-4, atol=1e-6)
    assert_trees_close(got[7], expected[1], rtol=1e-4, atol=1e-6)
    assert_trees_close(got[2], params)  # nothing applied before the 4th micro-step
    # Two optimizer steps taken: the recorded LR is the schedule at optimizer step 1.
    np.testing.assert_allclose(optim.learning_rate(state), LR)


def test_frozen_params_unchanged_and_get_no_state():
    params, batches = _init_params(), _batches()
    tx = optim.create(dict(name="adam", learning_rate=LR, freeze=["backbone"]), total_steps=10)
    got, state = run_dict(tx, params, batches)
    assert_trees_close(got[-1]["backbone"], params["backbone"], rtol=0, atol=0)
    assert not np.allclose(got[-1]["head"]["kernel"], params["head"]["kernel"])
    head_size = sum(x.size for x in jax.tree.leaves(params["head"]))
    state_arrays = [x for x in jax.tree.leaves(state) if x.ndim > 0]
    assert sum(x.size for x in state_arrays) == 2 * head_size  # adam's mu and nu of the head only


def test_learning_rate_is_read_from_state():
    schedule = dict(name="warmup_linear", warmup_steps=2, end_value=0.0)
    tx = optim.create(dict(name="sgd", learning_rate=0.5, schedule=schedule), total_steps=10)
    params, batches = _init_params(), _batches(n=4)
    _, state = run_dict(tx, params, batches)
    expected = optax.join_schedules(
        [optax.linear_schedule(0.0, 0.5, 2), optax.linear_schedule(0.5, 0.0, 8)], [2]
    )
    np.testing.assert_allclose(optim.learning_rate(state), expected(3), rtol=1e-6)
    _, optimizer = run_nnx(tx, params, batches)
    np.testing.assert_allclose(optim.learning_rate(optimizer.opt_state), expected(3), rtol=1e-6)


def test_schedule_free_own_warmup_is_the_logged_learning_rate():
    cfg = dict(name="schedule_free_adamw", learning_rate=LR, kwargs=dict(warmup_steps=4))
    _, state = run_dict(optim.create(cfg, total_steps=10), _init_params(), _batches(n=2))
    expected = optax.warmup_constant_schedule(0.0, LR, 4)(1)
    np.testing.assert_allclose(optim.learning_rate(state), expected, rtol=1e-6)


def test_state_readers_take_the_nnx_optimizer_and_refuse_its_nnx_state():
    cfg = dict(name="adamw", learning_rate=LR, ema_decay=0.5)
    params, batches = _init_params(), _batches(n=2)
    got, optimizer = run_nnx(optim.create(cfg, total_steps=10), params, batches)
    np.testing.assert_allclose(optim.learning_rate(optimizer), LR)
    assert int(optim.nonfinite_count(optimizer)) == 0
    params_now = nnx.State(got[-1])
    ema = optim.eval_params(optimizer, params_now)
    assert_trees_close(ema, optim.eval_params(optimizer.opt_state, params_now))
    assert not np.allclose(ema["head"]["kernel"], got[-1]["head"]["kernel"])  # the EMA, not params
    for read in (optim.learning_rate, optim.nonfinite_count):
        with pytest.raises(TypeError, match=r"nnx\.state\(optimizer\)\?\): pass the optimizer"):
            read(nnx.state(optimizer))
    with pytest.raises(TypeError, match="pass the optimizer or its opt_state"):
        optim.eval_params(nnx.state(optimizer), params_now)


def test_skip_nonfinite_skips_and_counts():
    params = _init_params()
    tx = optim.create(dict(name="adam", learning_rate=LR, skip_nonfinite=True), total_steps=10)
    state = tx.init(params)
    good = jax.tree.map(jnp.ones_like, params)
    bad = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), good)
    updates, state = tx.update(bad, state, params)
    assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(updates))
    assert int(optim.nonfinite_count(state)) == 1
    updates, state = tx.update(good, state, params)
    assert all(bool(jnp.isfinite(u).all()) for u in jax.tree.leaves(updates))
    assert max(float(jnp.abs(u).max()) for u in jax.tree.leaves(updates)) > 0
    assert int(optim.nonfinite_count(state)) == 1
    assert int(optim.nonfinite_count(optax.adam(1.0).init(params))) == 0


def test_keep_if_skipped_follows_the_skip_decision():
    params = {"w": jnp.ones(3)}
    new, old = {"mean": jnp.full(3, jnp.nan)}, {"mean": jnp.zeros(3)}
    for skip in (True, False):
        tx = optim.create(dict(name="sgd", learning_rate=1.0, skip_nonfinite=skip), total_steps=4)
        state = tx.init(params)
        _, state = tx.update({"w": jnp.array([jnp.nan, 0.0, 0.0])}, state, params)
        kept = optim.keep_if_skipped(state, new, old)["mean"]
        np.testing.assert_array_equal(kept, old["mean"] if skip else new["mean"])
        _, state = tx.update({"w": jnp.ones(3)}, state, params)
        np.testing.assert_array_equal(optim.keep_if_skipped(state, new, old)["mean"], new["mean"])
    # On an nnx.Optimizer's state (Variables), inside jit.
    tx = optim.create(dict(name="sgd", learning_rate=1.0, skip_nonfinite=True), total_steps=4)
    model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    grads = jax.tree.map(lambda p: jnp.full_like(p, jnp.inf), nnx.state(model, nnx.Param))
    optimizer.update(model, grads)
    kept = nnx.jit(optim.keep_if_skipped)(optimizer.opt_state, new, old)["mean"]
    np.testing.assert_array_equal(kept, old["mean"])


def test_skip_nonfinite_with_accumulation_drops_only_the_bad_microbatch():
    params = {"w": jnp.ones(3)}
    cfg = dict(name="sgd", learning_rate=1.0, accumulate_steps=2, skip_nonfinite=True)
    tx = optim.create(cfg, total_steps=10)
    state = tx.init(params)
    g = {"w": jnp.full(3, 2.0)}
    _, state = tx.update({"w": jnp.array([jnp.inf, 0.0, 0.0])}, state, params)
    _, state = tx.update(g, state, params)
    u, state = tx.update(g, state, params)
    np.testing.assert_allclose(u["w"], -2.0)
    assert int(optim.nonfinite_count(state)) == 1


def test_same_numbers_on_equinox_module():
    eqx = pytest.importorskip("equinox")
    key = jax.random.PRNGKey(0)
    model = eqx.nn.MLP(8, 4, 16, depth=1, key=key)
    params = eqx.filter(model, eqx.is_array)
    flat = {
        str(p): x for p, x in zip(masks.leaf_paths(params), jax.tree.leaves(params), strict=True)
    }
    assert set(flat) == {"layers/0/weight", "layers/0/bias", "layers/1/weight", "layers/1/bias"}
    grads = jax.tree.map(
        lambda p: jnp.cos(jnp.arange(p.size, dtype=jnp.float32)).reshape(p.shape), params
    )
    cfg = dict(name="adamw", learning_rate=LR, weight_decay=0.1, freeze=["^layers/0/"])
    tx = optim.create(cfg, total_steps=10, params=params)
    plain = dict(flat)
    plain_grads = {
        str(p): g for p, g in zip(masks.leaf_paths(grads), jax.tree.leaves(grads), strict=True)
    }
    tx_plain = optim.create(cfg, total_steps=10, params=plain)
    s, sp = tx.init(params), tx_plain.init(plain)
    for _ in range(3):
        u, s = tx.update(grads, s, params)
        params = eqx.apply_updates(params, u)
        up, sp = tx_plain.update(plain_grads, sp, plain)
        plain = optax.apply_updates(plain, up)
    flat_after = {
        str(p): x for p, x in zip(masks.leaf_paths(params), jax.tree.leaves(params), strict=True)
    }
    assert_trees_close(flat_after, plain)
    np.testing.assert_array_equal(flat_after["layers/0/weight"], flat["layers/0/weight"])
    # Rank-2 weights decay, biases don't: compare with optax.adamw and the matching mask.
    ref_params = {k: v for k, v in flat.items() if k.startswith("layers/1/")}
    ref = optax.adamw(LR, weight_decay=0.1, mask={k: v.ndim >= 2 for k, v in ref_params.items()})
    rs = ref.init(ref_params)
    for _ in range(3):
        ru, rs = ref.update({k: plain_grads[k] for k in ref_params}, rs, ref_params)
        ref_params = optax.apply_updates(ref_params, ru)
    assert_trees_close({k: plain[k] for k in ref_params}, ref_params)


# ----------------------------------------------------------------------------- contrib


def _all_configs():
    """Every optimizer plugins.optim knows (optax's and optax.contrib's), with the kwargs it
    needs."""
    sub = dict(name="sgd", learning_rate=LR)
    extra = {
        "dpsgd": dict(l2_norm_clip=1.0, noise_multiplier=0.1, seed=0),
        "schedule_free": dict(base_optimizer=dict(name="adam", learning_rate=1.0)),
        "mechanize": dict(base_optimizer=dict(name="adam")),
        "sam": dict(optimizer=sub, adv_optimizer=dict(name="sgd", learning_rate=0.05)),
        "galore": dict(rank=2),
    }
    return {name: extra.get(name, {}) for name in optim.OPTIMIZERS}


def test_discovery_finds_optax_and_contrib_optimizers():
    # The sweep below steps every discovered optimizer: discovery must not shrink unnoticed.
    for name in ("sgd", "adamw", "rprop", "lbfgs", "muon", "prodigy", "sophia", "sam", "galore"):
        assert name in optim.OPTIMIZERS, name
    assert len(optim.OPTIMIZERS) >= 45


@pytest.mark.parametrize("name", sorted(_all_configs()))
def test_every_optimizer_can_be_created_and_stepped(name):
    params = _init_params()
    kwargs = _all_configs()[name]
    cfg = dict(name=name, learning_rate=LR, kwargs=kwargs)
    tx = optim.create(cfg, total_steps=10)
    state = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.1), params)
    if name == "dpsgd":  # differentially private SGD clips per-example gradients
        grads = jax.tree.map(lambda g: jnp.stack([g, -g, 2 * g]), grads)
    args = optim.extra_update_args(cfg)
    extra = {}
    if "value" in args:
        extra["value"] = jnp.asarray(1.0)
    if "obj_fn" in args:
        extra["obj_fn"] = lambda p: sum(jnp.sum(x**2) for x in jax.tree.leaves(p))
    if "grad" in args:
        extra["grad"] = grads
    if "value_fn" in args:
        extra["value_fn"] = lambda p: sum(jnp.sum(x**2) for x in jax.tree.leaves(p))
    updates, state = tx.update(grads, state, params, **extra)
    assert jax.tree.structure(updates) == jax.tree.structure(params)
    assert all(bool(jnp.isfinite(u).all()) for u in jax.tree.leaves(updates))


def test_noisy_sgd_without_a_key_uses_optax_fallback_silently():
    # optax warns when noisy_sgd gets no key and then uses key 0; the config gives 0 itself.
    # optax's deprecated ``seed`` is read as ``key``.
    params = _init_params()
    batches = _batches()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        default = optim.create(dict(name="noisy_sgd", learning_rate=LR), total_steps=10)
        seeded = optim.create(
            dict(name="noisy_sgd", learning_rate=LR, kwargs=dict(seed=3)), total_steps=10
        )
        got_default, _ = run_dict(default, params, batches)
        got_seeded, _ = run_dict(seeded, params, batches)
    expected_default, _ = run_dict(optax.noisy_sgd(LR, key=0), params, batches)
    expected_seeded, _ = run_dict(optax.noisy_sgd(LR, key=3), params, batches)
    assert_trees_close(got_default[-1], expected_default[-1])
    assert_trees_close(got_seeded[-1], expected_seeded[-1])
    assert not np.allclose(got_default[-1]["head"]["kernel"], got_seeded[-1]["head"]["kernel"])


def test_optimizers_needing_more_than_grads_say_so():
    assert optim.extra_update_args(dict(name="momo", learning_rate=1.0)) == {"value"}
    assert optim.extra_update_args(dict(name="sophia", learning_rate=1.0)) == {"obj_fn"}
    assert optim.extra_update_args(dict(name="adam", learning_rate=1.0)) == set()
    params = _init_params()
    tx = optim.create(dict(name="momo", learning_rate=1.0), total_steps=10)
    with pytest.raises(TypeError, match=r"'momo' needs more than gradients.*value="):
        tx.update(params, tx.init(params), params)
    # Served the loss, momo matches optax's own.
    batches = _batches()
    expected, _ = run_dict(optax.contrib.momo(1.0), params, batches, value=True)
    got, _ = run_dict(tx, params, batches, value=True)
    assert_trees_close(got[-1], expected[-1])


def test_schedule_free_eval_params_match_optax():
    params, batches = _init_params(), _batches()
    cfg = dict(name="schedule_free_adamw", learning_rate=LR)
    got, state = run_dict(optim.create(cfg, total_steps=TOTAL_STEPS), params, batches)
    ref_tx = optax.contrib.schedule_free_adamw(LR)
    expected, ref_state = run_dict(ref_tx, params, batches)
    assert_trees_close(got[-1], expected[-1])
    assert_trees_close(
        optim.eval_params(state, got[-1]),
        optax.contrib.schedule_free_eval_params(ref_state, expected[-1]),
    )


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "config, pattern",
    [
        (dict(name="adamm", learning_rate=1e-3), r"optimizer\.name.*did you mean 'adam'"),
        (dict(name="adamw", learning_rate=1e-3, kwargs=dict(beta1=0.9)), r"kwargs\.beta1.*'b1'"),
        (
            dict(name="adamw", learning_rate=1e-3, wieght_decay=0.1),
            r"optimizer\.wieght_decay.*'weight_decay'",
        ),
        (dict(name="adamw", learning_rate=0.0), r"learning_rate"),
        (dict(name="adamw", learning_rate=-1.0), r"learning_rate"),
        (dict(name="adamw"), r"optimizer\.learning_rate is required"),
        (dict(learning_rate=1e-3), r"optimizer\.name is required"),
        (
            dict(name="adamw", learning_rate=1e-3, schedule=dict(name="cosin")),
            r"did you mean 'cosine'",
        ),
        (
            dict(
                name="adamw",
                learning_rate=1e-3,
                schedule=dict(name="warmup_cosine", warmup_steps=500),
            ),
            r"warmup_steps",
        ),
        (dict(name="adamw", learning_rate=1e-3, accumulate_steps=0), r"accumulate_steps"),
        (dict(name="adamw", learning_rate=1e-3, ema_decay=1.5), r"ema_decay"),
        (
            dict(name="adamw", learning_rate=1e-3, freeze=["("]),
            r"optimizer\.freeze\[0\].*invalid regex",
        ),
        (
            dict(name="adamw", learning_rate=1e-3, kwargs=dict(weight_decay=0.1)),
            r"set optimizer\.weight_decay",
        ),
        (
            dict(name="adamw", learning_rate=1e-3, param_groups=[dict(lr_mult=2.0)]),
            r"param_groups\[0\]\.match",
        ),
        (
            dict(name="adamw", learning_rate=1e-3, param_groups=[dict(match="x", lr=2.0)]),
            r"param_groups\[0\]\.lr.*'lr_mult'",
        ),
        (dict(name="schedule_free", learning_rate=1e-3), r"kwargs\.base_optimizer"),
        (
            dict(name="rprop", learning_rate=1e-3, schedule=dict(name="cosine")),
            r"'rprop' takes a fixed learning rate, not a schedule: remove optimizer\.schedule",
        ),
        (
            dict(
                name="schedule_free_adamw",
                learning_rate=1e-3,
                kwargs=dict(warmup_steps=5),
                schedule=dict(name="linear_warmup", warmup_steps=5),
            ),
            r"kwargs\.warmup_steps and optimizer\.schedule both shape the learning rate",
        ),
        (
            dict(name="adamw", learning_rate=1e-3, freeze={"backbone": "kernel"}),
            r"optimizer\.freeze must be a regex, a list of regexes, a predicate",
        ),
        (
            dict(name="muon", learning_rate=1e-3, kwargs=dict(momentum=0.9, beta=0.9)),
            r"'momentum' is another name for 'beta'",
        ),
        (dict(name="adamw", learning_rate=1e-3, clip_global_norm=-1.0), r"clip_global_norm"),
        (
            dict(name="adamw", learning_rate=optax.linear_schedule(0.0, 1e-3, 10)),
            r"learning_rate must be a number .*got a function .*optimizer\.schedule instead",
        ),
        (
            dict(name="galore", learning_rate=1e-3, kwargs=dict(base_optimizer=dict(name="adam"))),
            r"kwargs\.base_optimizer: 'galore' takes a gradient scaling transformation",
        ),
        (
            dict(name="prodigy", learning_rate=1.0, weight_decay=0.01),
            r"weight_decay_mask: 'prodigy' decays every parameter itself.*='all'",
        ),
    ],
)
def test_bad_config_raises_one_clear_error(config, pattern):
    with pytest.raises(ConfigError, match=pattern):
        optim.create(config, total_steps=100)


@pytest.mark.parametrize(
    "config, pattern",
    [
        # Another case, other libraries' names, optax's function names for schedules.
        (dict(name="SGD", learning_rate=0.1), r"'SGD' at optimizer\.name \(did you mean 'sgd'"),
        (dict(name="adam", lr=0.1), r"optimizer\.lr \(did you mean 'learning_rate'"),
        (
            dict(name="split_real_and_imaginary", learning_rate=0.1),
            r"optax\.contrib\.split_real_and_imaginary is a transform or wrapper, not an optimizer",
        ),
        (dict(name="scale_by_adam", learning_rate=0.1), r"optax\.chain\(\.\.\., optim\.create"),
        (
            dict(name="differentially_private_aggregate", learning_rate=0.1),
            r"transform or wrapper, not an optimizer.*where its documentation says",
        ),
        (dict(name="adam", learning_rate=0.1, kwargs=dict(lr=0.1)), r"set optimizer\.learn"),
        (
            dict(name="adam", learning_rate=0.1, kwargs=dict(betas=(0.9, 0.99))),
            r"kwargs\.betas \(did you mean 'b1', 'b2'",
        ),
        (
            dict(name="adam", learning_rate=0.1, every_k_schedule=4),
            r"did you mean 'accumulate_steps'",
        ),
        (
            dict(name="adam", learning_rate=0.1, schedule=dict(name="cosine_decay_schedule")),
            r"did you mean 'cosine'",
        ),
        (
            dict(name="adam", learning_rate=0.1, schedule=dict(name="warmup_constant_schedule")),
            r"did you mean 'linear_warmup'",
        ),
    ],
)
def test_mistakes_get_the_name_meant(config, pattern):
    with pytest.raises(ConfigError, match=pattern):
        optim.create(config, total_steps=100)


def test_regex_matching_no_parameter_is_an_error_at_create_and_at_init():
    params = _init_params()
    cfg = dict(name="adam", learning_rate=1e-3, freeze=["backbon/"])
    with pytest.raises(
        ConfigError, match=r"optimizer\.freeze\[0\].*matches no parameter.*backbone"
    ):
        optim.create(cfg, total_steps=10, params=params)
    tx = optim.create(cfg, total_steps=10)
    with pytest.raises(ConfigError, match="matches no parameter"):
        tx.init(params)
    groups = dict(name="adam", learning_rate=1e-3, param_groups=[dict(match="heads", lr_mult=2.0)])
    with pytest.raises(ConfigError, match=r"param_groups\[0\]\.match"):
        optim.create(groups, total_steps=10, params=params)
    # The same check on its own, without building the optimizer.
    with pytest.raises(ConfigError, match=r"param_groups\[0\]\.match.*matches no parameter"):
        optim.check_patterns(groups, params)
    optim.check_patterns(dict(groups, param_groups=[dict(match="head", lr_mult=2.0)]), params)


def test_accepts_ml_collections_config():
    ml_collections = pytest.importorskip("ml_collections")
    cfg = ml_collections.ConfigDict(
        dict(
            name="adamw",
            learning_rate=1e-3,
            weight_decay=0.1,
            kwargs=dict(b2=0.95),
            schedule=dict(name="warmup_cosine", warmup_steps=0.1),
            param_groups=[],
        )
    )
    tx = optim.create(ml_collections.FrozenConfigDict(cfg), total_steps=100)
    plain = optim.create(cfg.to_dict(), total_steps=100)
    params = _init_params()
    got, _ = run_dict(tx, params, _batches())
    expected, _ = run_dict(plain, params, _batches())
    assert_trees_close(got[-1], expected[-1], rtol=0, atol=0)


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("schedule_free", dict(base_optimizer=dict(name="sgd"))),
        (
            "sam",
            dict(optimizer=dict(name="sgd"), adv_optimizer=dict(name="sgd", learning_rate=0.05)),
        ),
    ],
)
def test_lr_mult_scales_the_optimizer_a_wrapper_wraps(name, kwargs):
    """A group's lr_mult on a wrapper is its learning rate times lr_mult, inner optimizer
    included; sam's adversarial step keeps its size."""
    params = _init_params()
    rng = np.random.default_rng(0)
    grads = [jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)] * 2
    grads += [jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)] * 2

    def head_after(cfg):
        tx, p = optim.create(cfg, total_steps=10), params
        state = tx.init(p)
        for g in grads:
            updates, state = tx.update(g, state, p)
            p = optax.apply_updates(p, updates)
        return p["head"]

    group = dict(match="^head/", lr_mult=4.0)
    grouped = head_after(dict(name=name, learning_rate=LR, kwargs=kwargs, param_groups=[group]))
    scaled = head_after(dict(name=name, learning_rate=4 * LR, kwargs=kwargs))
    plain = head_after(dict(name=name, learning_rate=LR, kwargs=kwargs))
    assert_trees_close(grouped, scaled)
    assert not np.allclose(grouped["kernel"], plain["kernel"])


def test_a_groups_own_weight_decay_mask_must_match_a_parameter():
    params = _init_params()
    group = dict(match="^head/", optimizer=dict(name="adamw", weight_decay=0.1,
                                                weight_decay_mask=["kernal"]))  # fmt: skip
    cfg = dict(name="adam", learning_rate=1e-3, param_groups=[group])
    pattern = r"optimizer\.param_groups\[0\]\.optimizer\.weight_decay_mask.*matches no parameter"
    with pytest.raises(ConfigError, match=pattern):
        optim.create(cfg, total_steps=10, params=params)
    with pytest.raises(ConfigError, match=pattern):
        optim.create(cfg, total_steps=10).init(params)
    inner = dict(name="adamw", weight_decay=0.1, weight_decay_mask=["kernal"])
    wrapper = dict(name="schedule_free", learning_rate=1e-3, kwargs=dict(base_optimizer=inner))
    with pytest.raises(ConfigError, match=r"kwargs\.base_optimizer\.weight_decay_mask"):
        optim.create(wrapper, total_steps=10).init(params)
    group["optimizer"]["weight_decay_mask"] = ["kernel"]
    optim.create(cfg, total_steps=10, params=params).init(params)


def test_accumulate_steps_must_divide_the_training_steps():
    cfg = dict(name="adam", learning_rate=1e-3, accumulate_steps=4)
    with pytest.raises(ConfigError, match=r"accumulate_steps=4 does not divide the 10 training "
                       r"steps: the last 2 micro-batches would never be applied \(train for 8 "
                       r"or 12 steps\)"):  # fmt: skip
        optim.create(cfg, total_steps=10)
    assert optim.optimizer_steps(12, 4) == 3


@pytest.mark.parametrize("name, extra", [("momo", "value"), ("sophia", "obj_fn")])
def test_accumulation_passes_the_extra_arguments_on(name, extra):
    """momo's value= and sophia's obj_fn= reach the optimizer through MultiSteps."""
    params, batches = _init_params(), _batches(n=4)
    cfg = dict(name=name, learning_rate=LR, accumulate_steps=2)
    tx = optim.create(cfg, total_steps=4)
    reference = optax.MultiSteps(optim.create(dict(cfg, accumulate_steps=1), total_steps=2), 2)

    def loss_fn(p, x, y):
        return _loss(LinenMLP().apply({"params": p}, x), y)

    def run(tx):
        p, state = params, tx.init(params)
        for x, y in batches:
            loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
            kwargs = (
                {"value": loss}
                if extra == "value"
                else {"obj_fn": functools.partial(loss_fn, x=x, y=y)}
            )
            updates, state = tx.update(grads, state, p, **kwargs)
            p = optax.apply_updates(p, updates)
        return p

    got = run(tx)
    assert_trees_close(got, run(reference))
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), got, params)
    assert max(jax.tree.leaves(moved)) > 0


def test_own_step_size_optimizers_take_weight_decay_on_every_parameter():
    params, batches = _init_params(), _batches()
    cfg = dict(name="prodigy", learning_rate=1.0, weight_decay=0.01, weight_decay_mask="all")
    got, _ = run_dict(optim.create(cfg, total_steps=TOTAL_STEPS), params, batches)
    expected, _ = run_dict(optax.contrib.prodigy(1.0, weight_decay=0.01), params, batches)
    assert_trees_close(got[-1], expected[-1])


def test_nadam_is_an_optimizer():
    params, batches = _init_params(), _batches()
    got, _ = run_dict(
        optim.create(dict(name="nadamw", learning_rate=LR), total_steps=10), params, batches
    )
    expected, _ = run_dict(optax.nadamw(LR), params, batches)
    assert_trees_close(got[-1], expected[-1])


def test_a_decay_mask_that_selects_nothing_is_an_error():
    """The tutorial's mask function tests ``'kernel' in path`` on jax key paths: never true."""
    params = _init_params()

    def create_weight_decay_mask(params):
        return jax.tree_util.tree_map_with_path(lambda path, _: "kernel" in path, params)

    cfg = dict(name="adamw", learning_rate=LR, weight_decay=0.1)
    with pytest.raises(
        ConfigError, match=r"weight_decay_mask selects no parameter.*'kernel' in path"
    ):
        optim.create(dict(cfg, weight_decay_mask=create_weight_decay_mask), total_steps=10).init(
            params
        )
    fixed = lambda path, _: "kernel" in path  # a plugins path: tuple of keys and '/'-joined string
    state = optim.create(dict(cfg, weight_decay_mask=fixed), total_steps=10).init(params)
    assert state is not None


# ----------------------------------------------------------------------------- weight decay
#
# ``weight_decay`` is AdamW's decoupled decay, -lr(step) * wd * param, for every optimizer that
# takes it as such; each optimizer with a weight-decay argument of its own is in exactly one of
# these groups (checked below, so a new optax optimizer cannot slip through unclassified).

WD = 0.1
# Own argument is AdamW's (added right before the learning rate scales the step), or optax's
# argument has another scale and plugins adds AdamW's decay after the optimizer instead.
ADAMW_DECAY = (
    "acprop",
    "adamaxw",
    "adamw",
    "adan",
    "ademamix",
    "galore",
    "lion",
    "nadamw",
    "simplified_ademamix",
    "sophia",
)
OTHER_SCALE = ("adadelta", "adafactor", "lamb", "lars", "novograd")
# Estimate their own step size; decay inside it, at the step size they use.
OWN_STEP_SIZE = (
    "cocob",
    "dadapt_adamw",
    "dog",
    "dowg",
    "mechanize",
    "momo",
    "momo_adam",
    "prodigy",
)
# Own tests below.
OTHERS = ("madgrad", "muon", "schedule_free_adamw", "schedule_free_sgd")
_WD_KWARGS = {"galore": dict(rank=2)}


def _extra_for(name, params):
    args = optim.extra_update_args(dict(name=name, learning_rate=LR, kwargs=_WD_KWARGS.get(name)))
    extra = {}
    if "obj_fn" in args:
        extra["obj_fn"] = lambda p: sum(jnp.sum(x**2) for x in jax.tree.leaves(p))
    if "value" in args:
        extra["value"] = jnp.asarray(1.0)
    return extra


def test_every_optimizer_with_a_weight_decay_argument_is_classified():
    import inspect

    with_decay = {
        name
        for name, fn in optim.OPTIMIZERS.items()
        if {"weight_decay", "weight_decay_rate"} & set(inspect.signature(fn).parameters)
    }
    classified = set(ADAMW_DECAY + OTHER_SCALE + OWN_STEP_SIZE + OTHERS)
    assert with_decay == classified


def _zero_grad_run(tx, params, steps=4, **extra):
    zeros = jax.tree.map(jnp.zeros_like, params)
    state = tx.init(params)
    for _ in range(steps):
        updates, state = tx.update(zeros, state, params, **extra)
        params = optax.apply_updates(params, updates)
    return params


@pytest.mark.parametrize("name", ADAMW_DECAY + OTHER_SCALE)
def test_weight_decay_is_adamws_for_every_optimizer(name):
    """With zero gradients the only change is the decay: after 4 steps of a warmup-cosine
    schedule each optimizer has decayed the matrices exactly as optax.adamw does, and left the
    biases (outside the default 'matrices' mask) alone. Before, adafactor's weight_decay_rate
    took ``weight_decay`` unscaled by the learning rate (about 1/lr times AdamW's decay)."""
    params = _init_params()
    schedule = dict(name="warmup_cosine", warmup_steps=2, end_value=1e-4)
    cfg = dict(
        name=name, learning_rate=LR, schedule=schedule, weight_decay=WD, kwargs=_WD_KWARGS.get(name)
    )
    got = _zero_grad_run(
        optim.create(cfg, total_steps=TOTAL_STEPS), params, **_extra_for(name, params)
    )
    lr = optax.warmup_cosine_decay_schedule(0.0, LR, 2, TOTAL_STEPS, 1e-4)
    adamw = optax.adamw(lr, weight_decay=WD, mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p))
    expected = _zero_grad_run(adamw, params)
    assert_trees_close(got, expected, rtol=1e-6, atol=1e-7)
    decayed = params["head"]["kernel"] - got["head"]["kernel"]
    assert float(jnp.abs(decayed).max()) > 1e-5  # the decay did happen


def _decay_term(wd, lr, mask=None):
    """AdamW's decay on its own: -lr(step) * wd * param, as optax composes it in adamw."""
    return optax.chain(
        optax.set_to_zero(), optax.add_decayed_weights(wd, mask), optax.scale_by_learning_rate(lr)
    )


def _sum_of(a, b):
    """Updates of ``a`` plus updates of ``b`` (both given the same gradients and params)."""

    def update(g, s, p=None):
        ua, sa = a.update(g, s[0], p)
        ub, sb = b.update(g, s[1], p)
        return jax.tree.map(jnp.add, ua, ub), (sa, sb)

    return optax.GradientTransformation(lambda p: (a.init(p), b.init(p)), update)


@pytest.mark.parametrize("name", OTHER_SCALE)
def test_other_scale_optimizers_get_adamws_decay_added_after_them(name):
    """With real gradients: optax's optimizer without its own decay, plus AdamW's decay term
    (add_decayed_weights then scale_by_learning_rate, as optax.adamw composes them)."""
    params, batches = _init_params(), _batches()
    cfg = dict(name=name, learning_rate=LR, weight_decay=WD, weight_decay_mask="all")
    got, _ = run_dict(optim.create(cfg, total_steps=TOTAL_STEPS), params, batches)
    reference = _sum_of(getattr(optax, name)(LR), _decay_term(WD, LR))
    expected, _ = run_dict(reference, params, batches)
    assert_trees_close(got[-1], expected[-1])
    # ... which is not what optax's own argument does.
    own = optim._OTHER_SCALE_DECAY[name][0]
    optax_own, _ = run_dict(getattr(optax, name)(LR, **{own: WD}), params, batches)
    gap = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), optax_own[-1], expected[-1])
    assert max(jax.tree.leaves(gap)) > 1e-4


@pytest.mark.parametrize(
    "name, mask",
    [
        ("adafactor", "matrices"),
        ("lamb", "matrices"),
        ("lars", "all"),
        ("novograd", "all"),
        ("adadelta", "all"),
        ("madgrad", "all"),
    ],
)
def test_an_optimizers_own_decay_with_optaxs_meaning_is_its_kwarg(name, mask):
    params, batches = _init_params(), _batches()
    own = optim._OTHER_SCALE_DECAY[name][0]
    cfg = dict(name=name, learning_rate=LR, kwargs={own: WD}, weight_decay_mask=mask)
    got, _ = run_dict(optim.create(cfg, total_steps=TOTAL_STEPS), params, batches)
    call = {own: WD}
    if mask == "matrices":
        arg = "weight_decay_mask" if name == "adafactor" else "mask"
        call[arg] = jax.tree.map(lambda x: x.ndim >= 2, params)
    fn = getattr(optax, name, None) or getattr(optax.contrib, name)
    expected, _ = run_dict(fn(LR, **call), params, batches)
    assert_trees_close(got[-1], expected[-1])


@pytest.mark.parametrize(
    "config, pattern",
    [
        (
            dict(name="madgrad", weight_decay=WD),
            r"optimizer\.weight_decay: 'madgrad' steps from its initial parameters.*set "
            r"optimizer\.kwargs\.weight_decay=0\.1 with optimizer\.weight_decay_mask='all'",
        ),
        (
            dict(name="novograd", kwargs=dict(weight_decay=WD)),
            r"optax's novograd decays every parameter \(it takes no mask\); set "
            r"optimizer\.weight_decay_mask='all'",
        ),
        (
            dict(name="lamb", weight_decay=WD, kwargs=dict(weight_decay=WD)),
            r"two kinds of decay: give one.*is scaled by the trust ratio",
        ),
        (
            dict(name="adamw", kwargs=dict(weight_decay=WD)),
            r"optimizer\.kwargs\.weight_decay: set optimizer\.weight_decay instead \(decoupled",
        ),
        (
            dict(name="polyak_sgd", weight_decay=WD),
            r"'polyak_sgd' chooses its own step size.*leave optimizer\.weight_decay unset",
        ),
        (
            dict(
                name="schedule_free", weight_decay=WD, kwargs=dict(base_optimizer=dict(name="adam"))
            ),
            r"give the decay to that one: optimizer\.kwargs\.base_optimizer\.weight_decay=0\.1",
        ),
        (
            dict(name="adamw", kwargs=dict(b1="0.9")),
            r"optimizer\.kwargs\.b1 must be a number \(as optax adamw\(\)'s default 0\.9\), "
            r"got '0\.9' \(a str\)",
        ),
        (
            dict(name="sgd", kwargs=dict(nesterov="yes")),
            r"optimizer\.kwargs\.nesterov must be True or False.*got 'yes' \(a str\)",
        ),
        (
            dict(name="adamw", learning_rate="fast"),
            r"optimizer\.learning_rate must be a number \(an int or float\), got 'fast' \(a str\)",
        ),
        (
            dict(name="adamw", ema_decay=1.5),
            r"ema_decay must be None or in \(0, 1\), got 1\.5: .*started at the initial parameters "
            r"without bias correction",
        ),
    ],
)
def test_weight_decay_and_kwarg_mistakes_are_one_clear_line(config, pattern):
    config = dict(dict(learning_rate=LR), **config)
    with pytest.raises(ConfigError, match=pattern) as info:
        optim.create(config, total_steps=TOTAL_STEPS)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "name, mask",
    [
        ("prodigy", "all"),
        ("dadapt_adamw", "all"),
        ("dog", "matrices"),
        ("dowg", "matrices"),
        ("cocob", "matrices"),
    ],
)
def test_own_step_size_optimizers_decay_with_their_own_argument(name, mask):
    params, batches = _init_params(), _batches()
    cfg = dict(name=name, learning_rate=1.0, weight_decay=0.01, weight_decay_mask=mask)
    got, _ = run_dict(optim.create(cfg, total_steps=TOTAL_STEPS), params, batches)
    call = dict(weight_decay=0.01)
    if mask == "matrices":
        call["mask"] = jax.tree.map(lambda x: x.ndim >= 2, params)
    expected, _ = run_dict(getattr(optax.contrib, name)(1.0, **call), params, batches)
    assert_trees_close(got[-1], expected[-1])


def _fixed_grads_run(tx, params, steps=STEPS, seed=0):
    """``steps`` updates with gradients that do not depend on the params (so every leaf steps
    on its own); returns the final params."""
    rng = np.random.default_rng(seed)
    state = tx.init(params)
    for _ in range(steps):
        grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params


@pytest.mark.parametrize("name", ["schedule_free_adamw", "schedule_free_sgd"])
def test_schedule_free_decays_with_its_own_argument_masked(name):
    """optax's schedule-free optimizers decay inside the step (at y, feeding z) and take no mask.
    With weight_decay_mask='all' plugins is optax's own; with the default mask, under gradients
    that do not depend on the params (every leaf steps on its own), the matrices follow optax's
    with the decay and the biases optax's without. Before, the decay was set to 0 and added
    after the optimizer, where schedule-free's z undoes part of it."""
    fn = getattr(optax.contrib, name)
    params = _init_params()
    lr = 0.1 if name == "schedule_free_sgd" else LR
    base = dict(name=name, learning_rate=lr, weight_decay=WD)
    with_decay = _fixed_grads_run(fn(lr, weight_decay=WD), params)
    without = _fixed_grads_run(fn(lr, weight_decay=0.0), params)
    everything = optim.create(dict(base, weight_decay_mask="all"), total_steps=TOTAL_STEPS)
    assert_trees_close(_fixed_grads_run(everything, params), with_decay)
    got = _fixed_grads_run(optim.create(base, total_steps=TOTAL_STEPS), params)
    for layer in ("backbone", "head"):
        assert_trees_close(got[layer]["kernel"], with_decay[layer]["kernel"])
        assert_trees_close(got[layer]["bias"], without[layer]["bias"])
    gap = float(jnp.abs(with_decay["head"]["bias"] - without["head"]["bias"]).max())
    assert gap > 1e-5  # the mask made a difference


def test_muon_adam_weight_decay_decays_the_adamw_half_as_optax_does():
    """optax.contrib.muon(adam_weight_decay=...) decays every parameter of its AdamW half
    (here the biases); the default weight_decay_mask ('matrices') used to mask them all out."""
    params, batches = _init_params(), _batches()
    cfg = dict(name="muon", learning_rate=LR, kwargs=dict(adam_weight_decay=WD))
    got, _ = run_dict(optim.create(cfg, total_steps=TOTAL_STEPS), params, batches)
    expected, _ = run_dict(optax.contrib.muon(LR, adam_weight_decay=WD), params, batches)
    assert_trees_close(got[-1], expected[-1])
    plain, _ = run_dict(optax.contrib.muon(LR), params, batches)
    gap = float(jnp.abs(plain[-1]["head"]["bias"] - expected[-1]["head"]["bias"]).max())
    assert gap > 1e-6
    # The parameter table says so: path, shape, size, group, lr_mult, weight_decay, ...
    rows = {
        r.split()[0]: r.split()
        for r in optim.summary(params, cfg, total_steps=10).splitlines()
        if r.strip()
    }
    assert rows["head/bias"][-3:] == ["0.1", "no", "adamw"]
    assert rows["head/kernel"][-3:] == ["default", "no", "muon"]
    # weight_decay goes to both halves, masked: the biases (AdamW half) are not decayed here.
    cfg = dict(name="muon", learning_rate=LR, weight_decay=WD)
    got, _ = run_dict(optim.create(cfg, total_steps=TOTAL_STEPS), params, batches)
    expected, _ = run_dict(optax.contrib.muon(LR, weight_decay=WD), params, batches)
    assert_trees_close(got[-1], expected[-1])


def test_polyak_sgd_is_an_optimizer_whose_learning_rate_is_its_max_learning_rate():
    params, batches = _init_params(), _batches()
    cfg = dict(name="polyak_sgd", learning_rate=0.5, kwargs=dict(f_min=0.1))
    assert optim.extra_update_args(cfg) == {"value"}
    tx = optim.create(cfg, total_steps=TOTAL_STEPS)
    with pytest.raises(TypeError, match=r"'polyak_sgd' needs more than gradients.*value="):
        tx.update(params, tx.init(params), params)
    got, state = run_dict(tx, params, batches, value=True)
    expected, _ = run_dict(
        optax.polyak_sgd(max_learning_rate=0.5, f_min=0.1), params, batches, value=True
    )
    assert_trees_close(got[-1], expected[-1])
    assert float(optim.learning_rate(state)) == pytest.approx(0.5)
    with pytest.raises(ConfigError, match=r"'polyak_sgd' takes a fixed learning rate"):
        optim.create(dict(cfg, schedule="cosine"), total_steps=TOTAL_STEPS)
    with pytest.raises(
        ConfigError, match=r"kwargs\.max_learning_rate: set optimizer\.learning_rate"
    ):
        optim.create(dict(cfg, kwargs=dict(max_learning_rate=1.0)), total_steps=TOTAL_STEPS)


def test_ema_decay_is_optax_ema_without_bias_correction_started_at_the_params():
    params, batches = _init_params(), _batches()
    d = 0.9
    tx = optim.create(dict(name="adamw", learning_rate=LR, ema_decay=d), total_steps=TOTAL_STEPS)
    got, state = run_dict(tx, params, batches)
    ema = optax.ema(d, debias=False)
    ema_state = ema.init(params)._replace(ema=params)  # started at the params, not at zero
    for p in got:
        averaged, ema_state = ema.update(p, ema_state)
    assert_trees_close(optim.eval_params(state, got[-1]), averaged)
    # optax's default ema (from zero, debiased) is another average.
    default = optax.ema(d)
    default_state = default.init(params)
    for p in got:
        debiased, default_state = default.update(p, default_state)
    gap = float(jnp.abs(debiased["head"]["kernel"] - averaged["head"]["kernel"]).max())
    assert gap > 1e-6


def test_a_sequence_given_as_a_string_on_the_command_line_is_a_sequence(tmp_path):
    """The config file's weight_decay_mask is a string, so ml_collections keeps
    --config.optimizer.weight_decay_mask="('kernel$',)" a string; plugins reads a tuple or list
    literal as the sequence it spells (a regex such as '(kernel|bias)$' stays a regex)."""
    from absl import flags
    from ml_collections import config_flags

    path = tmp_path / "cfg.py"
    path.write_text(
        "import ml_collections\n"
        "def get_config():\n"
        "    return ml_collections.ConfigDict(dict(optimizer=dict(name='adamw', "
        "learning_rate=0.01, weight_decay=0.1, weight_decay_mask='matrices', freeze=())))\n"
    )
    for value, expected in [
        ("('head/kernel$',)", ["head/kernel$"]),
        ("['head/kernel$', 'bias']", ["head/kernel$", "bias"]),
        ("(kernel|bias)$", ["(kernel|bias)$"]),
    ]:
        argv = ["prog", f"--config={path}", f"--config.optimizer.weight_decay_mask={value}"]
        fv = flags.FlagValues()
        config_flags.DEFINE_config_file(
            "config", None, "", flag_values=fv, sys_argv=argv, lock_config=True
        )
        fv(argv)
        assert fv.config.optimizer.weight_decay_mask == value  # a string, as ml_collections has it
        assert optim.check_config(fv.config.optimizer)["weight_decay_mask"] == expected
    params, batches = _init_params(), _batches()
    argv = ["prog", f"--config={path}", "--config.optimizer.weight_decay_mask=('head/kernel$',)"]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, sys_argv=argv)
    fv(argv)
    got, _ = run_dict(optim.create(fv.config.optimizer, total_steps=TOTAL_STEPS), params, batches)
    only_head = jax.tree_util.tree_map_with_path(
        lambda kp, x: kp[0].key == "head" and kp[-1].key == "kernel", params
    )
    expected, _ = run_dict(optax.adamw(LR, weight_decay=0.1, mask=only_head), params, batches)
    assert_trees_close(got[-1], expected[-1])
