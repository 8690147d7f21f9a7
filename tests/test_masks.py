"""plugins.masks: canonical paths and masks on Linen, NNX, Equinox and plain pytrees."""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.core import freeze as freeze_dict

from plugins import masks
from plugins.config_errors import ConfigError


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(10, 6)(tokens)
        x = nn.LayerNorm()(x)
        return nn.Dense(3)(x)


class NnxNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(10, 6, rngs=rngs)
        self.norm = nnx.LayerNorm(6, rngs=rngs)
        self.blocks = nnx.List([nnx.Linear(6, 6, rngs=rngs)])
        self.out = nnx.Linear(6, 3, rngs=rngs)


def linen_params():
    return LinenNet().init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))["params"]


def nnx_params():
    return nnx.state(NnxNet(nnx.Rngs(0)), nnx.Param)


def test_paths_of_linen_frozendict_and_dict():
    expected = [
        "Dense_0/bias",
        "Dense_0/kernel",
        "Embed_0/embedding",
        "LayerNorm_0/bias",
        "LayerNorm_0/scale",
    ]
    assert masks.path_strings(linen_params()) == expected
    assert masks.path_strings(freeze_dict(dict(linen_params()))) == expected


def test_paths_of_nnx_state_drop_the_variable_value():
    paths = masks.path_strings(nnx_params())
    assert sorted(paths) == [
        "blocks/0/bias",
        "blocks/0/kernel",
        "embed/embedding",
        "norm/bias",
        "norm/scale",
        "out/bias",
        "out/kernel",
    ]
    tree = masks.path_tree(nnx_params())
    assert isinstance(tree, nnx.State)
    assert tree["out"]["kernel"].get_value() == "out/kernel"


def test_paths_of_equinox_module_and_plain_lists():
    eqx = pytest.importorskip("equinox")
    mlp = eqx.nn.MLP(4, 2, 8, depth=1, key=jax.random.PRNGKey(0))
    assert masks.path_strings(eqx.filter(mlp, eqx.is_array)) == [
        "layers/0/weight",
        "layers/0/bias",
        "layers/1/weight",
        "layers/1/bias",
    ]
    assert masks.path_strings({"a": [jnp.ones(2), (jnp.ones(1),)]}) == ["a/0", "a/1/0"]


def test_path_behaves_as_tuple_and_string():
    path = masks.leaf_paths({"linear1": {"kernel": jnp.ones((2, 2))}})[0]
    assert "kernel" in path and path[-1] == "kernel"
    assert str(path) == "linear1/kernel" and "linear1/" in str(path)


def test_predicates():
    params = linen_params()
    got = {str(p): p for p in masks.leaf_paths(params)}
    leaves = dict(zip(got, jax.tree.leaves(params), strict=True))

    def which(pred):
        return sorted(k for k in got if pred(got[k], leaves[k]))

    assert which(masks.is_bias) == ["Dense_0/bias", "LayerNorm_0/bias"]
    assert which(masks.is_norm_scale) == ["LayerNorm_0/scale"]
    assert which(masks.is_embedding) == ["Embed_0/embedding"]
    assert which(masks.is_matrix) == ["Dense_0/kernel", "Embed_0/embedding"]
    assert which(masks.is_2d_non_embedding) == ["Dense_0/kernel"]


def test_match_and_decay_masks_keep_structure():
    params = nnx_params()
    m = masks.match(params, [r"kernel$", r"^embed/"])
    # The structure of the arrays nnx.Optimizer hands optax: the state without its Variables.
    assert jax.tree.structure(m) == jax.tree.structure(nnx.as_pure(params))
    linen = linen_params()
    assert jax.tree.structure(masks.decay_mask(linen)) == jax.tree.structure(linen)
    flat = dict(zip(masks.path_strings(m), jax.tree.leaves(m), strict=True))
    assert flat == {
        "blocks/0/bias": False,
        "blocks/0/kernel": True,
        "embed/embedding": True,
        "norm/bias": False,
        "norm/scale": False,
        "out/bias": False,
        "out/kernel": True,
    }
    assert all(jax.tree.leaves(masks.decay_mask(params, "all")))
    matrices = masks.decay_mask(params, "matrices")
    assert jax.tree.leaves(matrices) == jax.tree.leaves(
        masks.match(params, lambda p, x: x.ndim >= 2)
    )


def test_label_trees_feed_optax_multi_transform_on_nnx_state():
    model = NnxNet(nnx.Rngs(0))
    labels = lambda params: masks.labels_by_patterns(params, [("head", "^out/")], default="body")
    tx = optax.multi_transform({"head": optax.sgd(1.0), "body": optax.set_to_zero()}, labels)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    before = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    grads = jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param))
    optimizer.update(model, grads)
    after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    np.testing.assert_allclose(after["out"]["kernel"], before["out"]["kernel"] - 1.0)
    np.testing.assert_array_equal(after["embed"]["embedding"], before["embed"]["embedding"])


def test_trees_built_from_nnx_state_feed_optax_in_nnx_optimizer():
    """Masks and labels computed once from ``nnx.state(model, nnx.Param)``, as the tutorial
    does, fit the parameters ``nnx.Optimizer`` passes to optax."""
    model = NnxNet(nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    labels = masks.label_tree(state, lambda path, _: "head" if path[0] == "out" else "body")
    head_only = optax.multi_transform({"head": optax.sgd(1.0), "body": optax.set_to_zero()}, labels)
    frozen_body = optax.chain(
        optax.sgd(1.0), optax.masked(optax.set_to_zero(), masks.match(state, "^(?!out/)"))
    )
    decayed = optax.adamw(1.0, weight_decay=0.5, mask=masks.decay_mask(state))
    for tx in (head_only, frozen_body, decayed):
        model = NnxNet(nnx.Rngs(0))
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
        before = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        optimizer.update(model, jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param)))
        after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        assert not np.allclose(after["out"]["kernel"], before["out"]["kernel"])
        if tx is not decayed:
            np.testing.assert_array_equal(after["embed"]["embedding"], before["embed"]["embedding"])
        # Functional use on the state itself (Variables in the tree) takes the same trees.
        tx.update(jax.tree.map(jnp.ones_like, state), tx.init(state), state)


def test_partition_as_the_cheat_sheet_writes_it():
    params = linen_params()
    grads = jax.tree.map(jnp.ones_like, params)

    # The cheat sheet's predicate, with 'kernel' in path and str(path).lower().
    def is_decayed(path, param):
        return param.ndim == 2 and "embedding" not in str(path).lower() and "kernel" in path

    tx = masks.partition(
        condition=is_decayed,
        true_gradient_transform=optax.sgd(1.0),
        false_gradient_transform=optax.set_to_zero(),
    )
    updates, _ = tx.update(grads, tx.init(params), params)
    flat = dict(zip(masks.path_strings(updates), jax.tree.leaves(updates), strict=True))
    assert float(flat["Dense_0/kernel"].sum()) == -flat["Dense_0/kernel"].size
    for other in ("Dense_0/bias", "Embed_0/embedding", "LayerNorm_0/scale"):
        assert float(jnp.abs(flat[other]).sum()) == 0
    # Positional form with a regex condition.
    tx = masks.partition(r"^Embed_0/", optax.sgd(1.0), optax.set_to_zero())
    updates, _ = tx.update(grads, tx.init(params), params)
    assert float(updates["Embed_0"]["embedding"].sum()) == -60
    assert float(jnp.abs(updates["Dense_0"]["kernel"]).sum()) == 0


def test_freeze_gives_zero_updates_and_no_state():
    params = linen_params()
    tx = masks.freeze(optax.adam(1e-3), r"^(Embed_0|LayerNorm_0)/")
    state = tx.init(params)
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    assert float(jnp.abs(updates["Embed_0"]["embedding"]).sum()) == 0
    assert float(jnp.abs(updates["Dense_0"]["kernel"]).sum()) > 0
    dense = sum(x.size for x in jax.tree.leaves(params["Dense_0"]))
    assert sum(x.size for x in jax.tree.leaves(state) if x.ndim) == 2 * dense


def _optax_style_mask(params):
    """What the optax tutorials write for ``mask=``: params -> bool tree."""
    return jax.tree_util.tree_map_with_path(lambda path, _: "kernel" in str(path), params)


@pytest.mark.parametrize("params_of", [linen_params, nnx_params])
def test_bool_trees_and_mask_functions_select_like_predicates(params_of):
    params = params_of()
    kernels = lambda path, leaf: path[-1] == "kernel"
    expected = jax.tree.leaves(masks.match(params, kernels))
    assert sum(expected) == (1 if params_of is linen_params else 2)
    # The bool tree optax's mask= takes (here a plain dict of the paths), and the function form.
    as_dict = {str(p): bool(k) for p, k in zip(masks.leaf_paths(params), expected, strict=True)}
    nested: dict = {}
    for path, keep in as_dict.items():
        *outer, last = path.split("/")
        node = nested
        for key in outer:
            node = node.setdefault(key, {})
        node[last] = keep
    for spec in (masks.match(params, kernels), nested, _optax_style_mask):
        assert jax.tree.leaves(masks.match(params, spec)) == expected
        assert jax.tree.leaves(masks.decay_mask(params, spec)) == expected
        masks.check_patterns_match(params, spec, "optimizer.freeze")
    # Through partition, the function form is evaluated on the parameters optax passes.
    grads = jax.tree.map(jnp.ones_like, params)
    tx = masks.partition(_optax_style_mask, optax.sgd(1.0), optax.set_to_zero())
    updates, _ = tx.update(grads, tx.init(params), params)
    moved = [bool(jnp.abs(u).sum() > 0) for u in jax.tree.leaves(updates)]
    assert moved == expected


def test_mask_trees_whose_paths_are_not_the_parameters_are_errors():
    params = linen_params()
    wrong = {"Dense_0": {"kernel": True, "bias": False}, "Dense_9": {"kernel": True}}
    with pytest.raises(ConfigError, match=r"optimizer\.freeze: the mask tree's paths.*Embed_0"):
        masks.check_patterns_match(params, wrong, "optimizer.freeze")
    with pytest.raises(ConfigError, match=r"not a tree of bools"):
        masks.match(params, lambda params: "kernel")


def test_bad_regexes_are_clear_errors():
    with pytest.raises(ConfigError, match=r"freeze\[1\]: invalid regex"):
        masks.compile_patterns(["ok", "(unclosed"], "freeze")
    with pytest.raises(ConfigError, match=r"matches no parameter \(did you mean 'Dense_0/kernel'"):
        masks.check_patterns_match(linen_params(), ["Dense_0/kernal"], "optimizer.freeze")


def test_summary_table_and_state_totals():
    params = linen_params()
    config = dict(
        name="adamw",
        learning_rate=1e-3,
        weight_decay=0.1,
        freeze=["^Embed_0/"],
        param_groups=[dict(name="norms", match="LayerNorm", lr_mult=0.5)],
    )
    table = masks.summary(params, config, total_steps=100)
    cells = [re.split(r"\s{2,}", line) for line in table.splitlines()[2:] if "/" in line]
    rows = {row[0]: row for row in cells}
    assert rows["Embed_0/embedding"][-2:] == ["yes", "frozen"]
    assert rows["LayerNorm_0/scale"][3:6] == ["norms", "0.5", "0"]
    assert rows["Dense_0/kernel"][3:] == ["default", "1", "0.1", "no", "adamw"]
    assert rows["Dense_0/bias"][5] == "0"  # 'matrices' mask: no decay on biases
    n = sum(x.size for x in jax.tree.leaves(params))
    frozen = params["Embed_0"]["embedding"].size
    assert f"parameters:      {n:,}" in table and f"frozen {frozen:,}" in table
    # Adam keeps two values per trainable parameter (plus step counters).
    adam_table = masks.summary(params, dict(name="adam", learning_rate=1e-3), total_steps=10)
    values = int(re.search(r"optimizer state: ([\d,]+) values", adam_table)[1].replace(",", ""))
    assert 2 * n <= values <= 2 * n + 4  # mu and nu, plus a few scalar step counters
    assert re.search(r"= 2\.0\dx the parameters", adam_table)


def test_summary_evaluates_a_mask_function_per_tree_not_per_parameter():
    calls = []

    def kernels(params):
        calls.append(1)
        return jax.tree_util.tree_map_with_path(lambda path, _: "kernel" in str(path), params)

    def count(layers: int) -> int:
        params = {f"l{i}": {"kernel": jnp.ones((3, 3)), "bias": jnp.ones(3)} for i in range(layers)}
        cfg = dict(name="adamw", learning_rate=1e-3, weight_decay=0.1, weight_decay_mask=kernels)
        calls.clear()
        rows = [
            re.split(r"\s{2,}", r) for r in masks.summary(params, cfg, total_steps=10).split("\n")
        ]
        decay = {row[0]: row[5] for row in rows[2 : 2 + 2 * layers]}
        assert decay["l0/kernel"] == "0.1" and decay["l0/bias"] == "0", decay
        return len(calls)

    assert count(5) == count(20)


def test_summary_shows_each_parameters_sharding_and_bytes_per_device():
    from plugins import sharding

    params = {
        "dense": {"kernel": np.zeros((256, 128), np.float32), "bias": np.zeros((128,), np.float32)}
    }
    mesh = sharding.mesh_from_axes({"data": -1, "fsdp": 8})
    table = masks.summary(
        params, {"name": "adam", "learning_rate": 1e-3}, total_steps=10, mesh=mesh,
        partition=sharding.partition_rule(mesh),
    )  # fmt: skip
    rows = {line.split()[0]: line.split() for line in table.splitlines()[2:4]}
    assert rows["dense/kernel"][-3:] == ["('fsdp',", "None)", str(256 * 128 * 4 // 8)]
    assert rows["dense/bias"][-2:] == ["replicated", str(128 * 4)]
    # adam keeps two moments per parameter (and a count): twice the parameters' bytes per device
    params_here = (256 * 128 * 4 // 8 + 128 * 4) / 1024
    assert f"parameters {params_here:.1f} KiB, optimizer state {2 * params_here:.1f} KiB" in table
    assert "sharding" not in masks.summary(params, {"name": "adam", "learning_rate": 1e-3},
                                           total_steps=10)  # fmt: skip
