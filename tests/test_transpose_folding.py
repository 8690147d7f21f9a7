"""plugins.transpose_folding: the same results, without the transposes, in jaxprs and under jit."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from plugins import sharding
from plugins.transpose_folding import fold_transposes


def _primitives(fn, *args) -> list[str]:
    """Every primitive name in ``fn``'s jaxpr, nested jaxprs included."""
    names = []

    def visit(jaxpr):
        for eqn in jaxpr.eqns:
            names.append(eqn.primitive.name)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                visit(sub)

    visit(jax.make_jaxpr(fn)(*args).jaxpr)
    return names


def _mlp_loss(params, x):
    h = jax.nn.relu(x @ params["w1"])
    return jnp.mean(jnp.square(h @ params["w2"]))


def _params(rng):
    return {
        "w1": rng.normal(size=(6, 5)).astype(np.float32),
        "w2": rng.normal(size=(5, 3)).astype(np.float32),
    }


def test_weight_gradients_without_transposes():
    rng = np.random.default_rng(0)
    params, x = _params(rng), rng.normal(size=(4, 6)).astype(np.float32)
    grad = jax.grad(_mlp_loss)
    assert _primitives(grad, params, x).count("transpose") == 2  # JAX's rule: dot, then transpose
    folded = fold_transposes(grad)
    assert "transpose" not in _primitives(folded, params, x)
    for a, b in zip(
        jax.tree.leaves(folded(params, x)), jax.tree.leaves(grad(params, x)), strict=True
    ):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "subscripts, lhs, rhs",
    [
        ("bij,bjk->bik", (3, 4, 5), (3, 5, 2)),  # batch dims
        ("ij,kj->ik", (4, 5), (2, 5)),  # contracting the last dims of both
        ("ijk,kl->ijl", (2, 3, 4), (4, 5)),  # several free dims
        ("i,j->ij", (4,), (3,)),  # no contraction
    ],
)
def test_einsum_gradients_match(subscripts, lhs, rhs):
    """Batch dims, several free dims, contractions on either side: the same gradients."""
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=lhs).astype(np.float32), rng.normal(size=rhs).astype(np.float32)

    def loss(a, b):
        return jnp.sum(jnp.sin(jnp.einsum(subscripts, a, b)))

    grad = jax.grad(loss, argnums=(0, 1))
    expected = grad(a, b)
    got = jax.jit(fold_transposes(grad))(a, b)
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)
    assert "transpose" not in _primitives(fold_transposes(grad), a, b)
    if subscripts in ("bij,bjk->bik", "ijk,kl->ijl"):  # where JAX's rule transposes
        assert "transpose" in _primitives(grad, a, b)


def test_nested_jit_is_folded():
    """A gradient computed inside a nested ``jax.jit`` (a jit eqn in the outer jaxpr)."""
    rng = np.random.default_rng(4)
    params, x = _params(rng), rng.normal(size=(4, 6)).astype(np.float32)
    inner = jax.jit(jax.grad(_mlp_loss))

    def fn(params, x):
        return jax.tree.map(lambda g: 2.0 * g, inner(params, x))

    assert "jit" in _primitives(fn, params, x) and "transpose" in _primitives(fn, params, x)
    assert "transpose" not in _primitives(fold_transposes(fn), params, x)
    for a, b in zip(
        jax.tree.leaves(fold_transposes(fn)(params, x)), jax.tree.leaves(fn(params, x)), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def _through_scan(params, x):  # a scan over stacked layers, as nn.scan / nnx.scan build
    def layer(h, w):
        return jax.nn.relu(h @ w), None

    h, _ = jax.lax.scan(layer, x @ params["w1"], params["stack"])
    return jnp.mean(jnp.square(h @ params["w2"]))


def _through_while_loop(params, x):  # gradient steps inside a while loop's body
    def body(carry):
        i, p = carry
        return i + 1, jax.tree.map(lambda w, g: w - 0.1 * g, p, jax.grad(_mlp_loss)(p, x))

    return jax.lax.while_loop(lambda carry: carry[0] < 3, body, (0, params))[1]


def _through_cond(params, x):  # the gradient computed inside both branches of a cond
    def grad_of(scale):
        return lambda p, x: jax.tree.map(lambda g: scale * g, jax.grad(_mlp_loss)(p, x))

    return jax.lax.cond(x[0, 0] > 0, grad_of(1.0), grad_of(-1.0), params, x)


def _through_remat(params, x):  # jax.checkpoint: the backward pass recomputes inside remat
    return jax.checkpoint(_mlp_loss)(params, x)


@pytest.mark.parametrize(
    "fn",
    [
        jax.grad(_through_scan),
        _through_while_loop,
        _through_cond,
        jax.grad(_through_remat),
    ],
    ids=["scan", "while_loop", "cond", "remat"],
)
def test_control_flow_bodies_are_folded(fn):
    """Gradients whose dot-then-transpose pairs sit inside ``scan``, ``while``, ``cond`` or
    remat bodies: folded there too, with the same results."""
    rng = np.random.default_rng(5)
    params = dict(_params(rng), stack=rng.normal(size=(2, 5, 5)).astype(np.float32) / 2)
    x = rng.normal(size=(4, 6)).astype(np.float32)
    assert "transpose" in _primitives(fn, params, x)
    assert "transpose" not in _primitives(fold_transposes(fn), params, x)
    for a, b in zip(
        jax.tree.leaves(fold_transposes(fn)(params, x)), jax.tree.leaves(fn(params, x)), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_pallas_kernels_are_left_alone():
    """A kernel body is the kernel's own memory layout: its dot-then-transpose stays."""
    from jax.experimental import pallas as pl

    def kernel(x_ref, y_ref, out_ref):
        out_ref[...] = (x_ref[...] @ y_ref[...]).T

    def fn(x, y):
        out_shape = jax.ShapeDtypeStruct((3, 4), jnp.float32)
        return pl.pallas_call(kernel, out_shape=out_shape, interpret=True)(x, y)

    x, y = np.ones((4, 5), np.float32), np.arange(15, dtype=np.float32).reshape(5, 3)
    assert "transpose" in _primitives(fold_transposes(fn), x, y)
    np.testing.assert_allclose(fold_transposes(fn)(x, y), (x @ y).T)


def test_a_transposed_product_used_elsewhere_is_kept():
    """The untransposed product is needed as well: nothing is folded, the results agree."""

    def fn(a, b):
        c = a @ b
        return c.T * 2.0, c

    a, b = np.ones((3, 4), np.float32), np.arange(8, dtype=np.float32).reshape(4, 2)
    assert _primitives(fold_transposes(fn), a, b).count("transpose") == 1
    for g, e in zip(fold_transposes(fn)(a, b), fn(a, b), strict=True):
        np.testing.assert_array_equal(g, e)


def test_precision_preferred_type_and_pytrees_pass_through():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(8, 4)).astype(jnp.bfloat16)
    b = rng.normal(size=(8, 3)).astype(jnp.bfloat16)

    def fn(tree):
        t = lax_dot(tree["a"], tree["b"]).T
        return {"t": t, "n": None, "s": jnp.sum(t)}

    def lax_dot(x, y):
        return jax.lax.dot_general(
            x, y, (((0,), (0,)), ((), ())),
            precision=(jax.lax.Precision.HIGHEST, jax.lax.Precision.DEFAULT),
            preferred_element_type=jnp.float32,
        )  # fmt: skip

    tree = {"a": a, "b": b}
    got, expected = fold_transposes(fn)(tree), fn(tree)
    assert got["n"] is None and got["t"].dtype == jnp.float32 and got["t"].shape == (3, 4)
    np.testing.assert_allclose(got["t"], expected["t"], rtol=1e-6)
    assert "transpose" not in _primitives(fold_transposes(fn), tree)


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(32)(x.reshape((x.shape[0], -1))))
        return nn.Dense(10)(x)


class _Layer(nn.Module):
    @nn.compact
    def __call__(self, carry, _):
        x, h = carry
        return (x, h + jnp.tanh(nn.Dense(32)(x))), None


class _ScanOverLayers(nn.Module):
    """Three stacked layers run by ``nn.scan`` (a ``lax.scan`` whose body holds the dots)."""

    @nn.compact
    def __call__(self, x):
        layers = nn.scan(
            _Layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=3
        )()
        (_, h), _ = layers((x, jnp.zeros((x.shape[0], 32), x.dtype)), None)
        return nn.Dense(10)(h)


@pytest.mark.parametrize("model", [_MLP(), _ScanOverLayers()], ids=["mlp", "scan"])
def test_data_parallel_step_all_reduces_gradients_in_parameter_layout(model):
    """8 devices, jit with a sharded batch and replicated, donated state: the folded step makes
    the same update, and every gradient XLA all-reduces has its parameter's shape (one layer's
    of a stacked parameter: the scan reduces them inside its body), never the transpose."""
    tx = optax.adamw(1e-2)
    rng = np.random.default_rng(3)
    x = rng.normal(size=(64, 12)).astype(np.float32)
    y = rng.integers(0, 10, 64).astype(np.int32)
    params = jax.device_get(model.init(jax.random.key(0), x[:1])["params"])

    def step(state, x, y):
        params, opt_state = state

        def loss_of(params):
            logits = model.apply({"params": params}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_of)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    mesh = sharding.data_mesh()
    assert mesh.size == 8
    replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    results = {}
    for name, fn in (("plain", step), ("folded", fold_transposes(step))):
        compiled = jax.jit(
            fn, in_shardings=(replicated, split, split), out_shardings=replicated,
            donate_argnums=0,
        )  # fmt: skip
        state = jax.device_put((params, tx.init(params)), replicated)
        hlo = compiled.lower(state, x, y).compile().as_text()
        reduced = " ".join(re.findall(r"\(([^()]*)\) all-reduce\(", hlo))
        results[name] = dict(
            shapes={tuple(map(int, d.split(","))) for d in re.findall(r"f32\[([\d,]+)\]", reduced)}
        )
        for _ in range(3):
            state, loss = compiled(state, x, y)
        results[name]["state"], results[name]["loss"] = state, float(loss)
    kernels = {  # one layer's, for the stacked kernels of the scan
        tuple(p.shape[-2:])
        for path, p in jax.tree_util.tree_leaves_with_path(params)
        if "kernel" in jax.tree_util.keystr(path)
    }
    assert kernels <= results["folded"]["shapes"], results["folded"]["shapes"]
    assert not {s[::-1] for s in kernels} & results["folded"]["shapes"]
    assert {s[::-1] for s in kernels} & results["plain"]["shapes"]  # what the fold removes
    np.testing.assert_allclose(results["folded"]["loss"], results["plain"]["loss"], rtol=1e-5)
    for a, b in zip(
        jax.tree.leaves(results["folded"]["state"]),
        jax.tree.leaves(results["plain"]["state"]),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
