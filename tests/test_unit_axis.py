"""plugins.unit_axis.lift: a function run on blocks with a leading axis of size 1."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from plugins import sharding, unit_axis


def _blocks(tree):
    return jax.tree.map(lambda x: jnp.asarray(x)[None], tree)


def _assert_same(got, want, rtol=1e-6):
    got_leaves, want_leaves = jax.tree.leaves(got), jax.tree.leaves(want)
    assert len(got_leaves) == len(want_leaves)
    for g, w in zip(got_leaves, want_leaves, strict=True):
        assert g.shape == (1, *w.shape) and g.dtype == w.dtype, (g.shape, w.shape, g.dtype)
        if jnp.issubdtype(w.dtype, jax.dtypes.prng_key):
            g, w = jax.random.key_data(g), jax.random.key_data(w)
        np.testing.assert_allclose(g[0], w, rtol=rtol, atol=1e-7)


def _where_clip(x, y):
    # jnp.where and jnp.clip are jax.jit calls: their select is part of the output tail.
    return jnp.where(x > 0, x, 0.5 * y), jnp.clip(x, -0.1, 0.1) + 1.0, x.sum() * 2


def _loops(x, n):
    carry, ys = jax.lax.scan(lambda c, r: (c + r.sum(), jnp.tanh(r) * c), 0.0, x)
    count = jax.lax.while_loop(lambda c: c[0] < n, lambda c: (c[0] + 1, c[1] * 1.5), (0, 1.0))
    branch = jax.lax.cond(n > 2, lambda v: v * 2, lambda v: -v, x[0])
    return carry, ys, count, branch


def _custom(x):
    # custom_jvp calls (relu, logsumexp's internals) and an integer / bool path.
    return jax.nn.relu(x) + jax.nn.logsumexp(x), (x > 0).astype(jnp.int32).sum(), x.argmax()


def _along_axes(x):
    # Shape-preserving but not elementwise (their axis is the block's second): never lifted.
    return jnp.cumsum(x, axis=0) * 2, jnp.sort(x, axis=0) + 1, jnp.flip(x, 0) - x


def _passthrough(x, key):
    # An input returned as it is, a constant output, a PRNG key split.
    return x, jnp.ones(3), jax.random.split(key)[0], jax.random.normal(key, (2,))


@pytest.mark.parametrize(
    "fn, args",
    [
        (_where_clip, (np.linspace(-1, 1, 12).reshape(3, 4), np.ones((3, 4)))),
        (_loops, (np.linspace(-1, 1, 12).reshape(3, 4).astype(np.float32), np.int32(4))),
        (_custom, (np.linspace(-2, 3, 7).astype(np.float32),)),
        (_along_axes, (np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32),)),
        (_passthrough, (np.arange(5.0, dtype=np.float32), jax.random.key(0))),
    ],
    ids=["where_clip", "scan_while_cond", "custom_jvp", "along_axes", "passthrough_and_keys"],
)
def test_lift_gives_fn_values_with_the_unit_axis(fn, args):
    """Under jit, the lifted function gives what ``fn`` gives, each output with the axis."""
    want = jax.jit(fn)(*args)
    _assert_same(jax.jit(unit_axis.lift(fn))(*_blocks(args)), want)


def test_lift_keeps_weak_types_and_names_a_missing_axis():
    """A weakly typed argument stays weak, so it still takes its partner's dtype (bfloat16
    here, not float32); an argument without the size-1 axis raises one clear error."""
    fn = lambda x: x * jnp.ones(2, jnp.bfloat16)  # noqa: E731
    lifted = jax.jit(unit_axis.lift(fn))
    weak = jax.jit(lambda: jnp.broadcast_to(1.0, (1,)))()
    assert jax.typeof(weak).weak_type
    assert lifted(weak).dtype == jnp.bfloat16 == fn(weak[0]).dtype
    with pytest.raises(ValueError, match=r"leading axis of size 1; got an array of shape \(2, 3\)"):
        lifted(np.ones((2, 3), np.float32))


class _ConvNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.Conv(8, (3, 3))(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.relu(x)
        x = nn.avg_pool(x, (2, 2), (2, 2))
        return nn.Dense(3)(x.reshape(x.shape[0], -1))


def _conv_step():
    """An SGD-momentum train step of a conv net with batch norm, and its state and batch."""
    model, tx = _ConvNet(), optax.sgd(0.1, momentum=0.9)
    x = np.random.default_rng(0).normal(size=(4, 8, 8, 2)).astype(np.float32)
    y = np.arange(4) % 3
    variables = model.init(jax.random.key(0), x)
    state = {
        "params": variables["params"],
        "stats": variables["batch_stats"],
        "opt": tx.init(variables["params"]),
    }

    def step(state, x, y):
        def loss_of(params):
            logits, new = model.apply(
                {"params": params, "batch_stats": state["stats"]}, x, mutable=["batch_stats"]
            )
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new

        (loss, new), grads = jax.value_and_grad(loss_of, has_aux=True)(state["params"])
        updates, opt = tx.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return {"params": params, "stats": new["batch_stats"], "opt": opt}, loss

    return step, state, x, y


def _kernels(compiled_text: str) -> dict[str, int]:
    entry = compiled_text[compiled_text.index("ENTRY") :]
    ops = re.findall(r"= \S+ (copy|fusion|dot|convolution|all-reduce)\(", entry)
    copies = re.findall(r"%(\w*copy\w*)(?:\.\d+)? = ", entry)
    return {"kernels": len(ops), "copies": len(copies)}


def test_lifted_train_step_is_the_unbatched_program_with_donation_in_place():
    """A conv + batch norm step, state donated: lifted, it computes the step's values, and XLA
    compiles it to as many kernels and copies as the step itself on unbatched arrays -- the
    optimizer updates write the donated (1, ...) buffers in place. (Squeezing the blocks on the
    way in and out instead makes XLA:CPU copy each donated array.)"""
    step, state, x, y = _conv_step()
    plain = jax.jit(step, donate_argnums=(0,))
    lifted = jax.jit(unit_axis.lift(step), donate_argnums=(0,))
    want = jax.jit(step)(state, x, y)
    _assert_same(lifted(_blocks(state), *_blocks((x, y))), want, rtol=1e-5)

    plain_kernels = _kernels(plain.lower(state, x, y).compile().as_text())
    lifted_kernels = _kernels(lifted.lower(_blocks(state), *_blocks((x, y))).compile().as_text())
    assert lifted_kernels["copies"] <= plain_kernels["copies"], (lifted_kernels, plain_kernels)
    assert lifted_kernels["kernels"] <= plain_kernels["kernels"] + 2, (
        lifted_kernels,
        plain_kernels,
    )


def test_update_broadcasting_a_size_1_dim_writes_in_place():
    """``w - g`` with ``g`` of shape (1, n) (how ``jnp`` broadcasts a row against a matrix) is
    part of the output tail too: the donated ``w`` is updated in place, no copy."""

    def step(w, x):
        return w - 1e-3 * jnp.tanh(x @ w).mean(axis=0)

    w, x = np.ones((64, 32), np.float32), np.ones((8, 64), np.float32)
    lifted = jax.jit(unit_axis.lift(step), donate_argnums=(0,))
    _assert_same(lifted(*_blocks((w, x))), jax.jit(step)(w, x))
    assert _kernels(lifted.lower(*_blocks((w, x))).compile().as_text())["copies"] == 0


_COLLECTIVES = r"(all-reduce|all-gather|collective-permute|reduce-scatter|all-to-all)\("


@pytest.mark.parametrize("n", [8, 1])
def test_sharding_pmap_collectives_match_jax_pmap(n):
    """Through sharding.pmap (a shard_map of the lifted function) over 8 devices and over one:
    psum, pmean (its 1/axis-size is read at trace time), pmax, all_gather, ppermute,
    psum_scatter, axis_index and batch-norm statistics synced over the axis give what jax.pmap
    gives. Over one device no collective is left in the program (XLA:CPU would run each as a
    synchronisation of one participant)."""
    devices = jax.local_devices()[:n]
    perm = [(i, (i + 1) % n) for i in range(n)]

    def fn(x):
        i = jax.lax.axis_index("d")
        return (
            jax.lax.psum(x, "d"),
            jax.lax.pmean(x * i, "d"),
            jax.lax.pmax(x.sum(), "d"),
            jax.lax.all_gather(x[0], "d"),
            jax.lax.ppermute(x, "d", perm),
            jax.lax.psum_scatter(jnp.tile(x, n), "d", tiled=True),
            jnp.where(x > 0.5, x, i.astype(x.dtype)),
            i,
        )

    x = np.random.default_rng(0).uniform(size=(n, 3)).astype(np.float32)
    want = jax.pmap(fn, "d", devices=devices)(x)
    ours = sharding.pmap(fn, "d", devices=devices)
    for g, w in zip(ours(x), want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_allclose(g, w, rtol=1e-6)
    left = re.findall(_COLLECTIVES, ours.lower(x).compile().as_text())
    assert (left == []) == (n == 1), left

    bn = nn.BatchNorm(use_running_average=False, axis_name="d")
    images = np.random.default_rng(1).normal(size=(n, 4, 5)).astype(np.float32)
    variables = bn.init(jax.random.key(0), images[0])
    apply = lambda v, im: bn.apply(v, im, mutable=["batch_stats"])  # noqa: E731
    replicated = sharding.replicate(variables, devices=devices)
    for g, w in zip(
        jax.tree.leaves(sharding.pmap(apply, "d", devices=devices)(replicated, images)),
        jax.tree.leaves(jax.pmap(apply, "d", devices=devices)(replicated, images)),
        strict=True,
    ):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_sharding_pmap_names_a_wrong_device_axis():
    """An argument whose leading axis is a multiple of the device count, not the count itself,
    is an error (shard_map alone would hand each device several rows)."""
    n = jax.local_device_count()
    with pytest.raises(ValueError, match=f"leading axis of {n} .* shape \\({2 * n}, 3\\)"):
        sharding.pmap(lambda x: x + 1, "d")(np.ones((2 * n, 3), np.float32))


def test_one_device_sum_is_the_operand_itself():
    """Over one device a ``psum``/``pmean``/``pmax`` is its operand, and is evaluated as such:
    what Flax's synced batch norm reduces (its mean and mean of squares stacked into one
    array, split again after the ``pmean``) compiles to no ``concatenate`` at all, the
    program the same function without an axis name compiles to. Integer sums keep their
    type."""

    def stats(x, axis_name):
        both = jnp.concatenate([x.mean(0), (x * x).mean(0)])
        if axis_name:
            both = jax.lax.pmean(both, axis_name)
        mu, mu2 = jnp.split(both, 2)
        count = jax.lax.psum(jnp.int32(x.shape[1]), axis_name) if axis_name else x.shape[1]
        peak = jax.lax.pmax(x, axis_name) if axis_name else x
        return mu, mu2 - mu * mu, peak, jnp.asarray(count, jnp.int32)

    x = np.random.default_rng(0).normal(size=(1, 8, 16)).astype(np.float32)
    ours = sharding.pmap(lambda x: stats(x, "d"), "d", devices=jax.local_devices()[:1])
    plain = jax.jit(lambda x: stats(x, None))
    for g, w in zip(ours(x), plain(x[0]), strict=True):
        assert g.dtype == w.dtype
        np.testing.assert_allclose(g[0], w, rtol=1e-6)
    assert "concatenate" not in ours.lower(x).compile().as_text()
    assert "concatenate" not in plain.lower(x[0]).compile().as_text()
