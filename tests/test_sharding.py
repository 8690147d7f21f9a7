"""plugins.sharding on 8 simulated CPU devices (one process)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx
from flax.training import train_state
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from plugins import sharding

N = 8
FEATURES, HIDDEN, CLASSES = 8, 16, 4


def _params():
    rng = np.random.default_rng(0)
    return {
        "w1": rng.normal(size=(FEATURES, HIDDEN)).astype(np.float32) / 3,
        "b1": np.zeros(HIDDEN, np.float32),
        "w2": rng.normal(size=(HIDDEN, CLASSES)).astype(np.float32) / 3,
        "b2": np.zeros(CLASSES, np.float32),
    }


def _batches(steps=3, batch=32):
    rng = np.random.default_rng(1)
    return [
        {
            "x": rng.normal(size=(batch, FEATURES)).astype(np.float32),
            "y": rng.integers(0, CLASSES, size=batch).astype(np.int32),
        }
        for _ in range(steps)
    ]


def _loss(params, batch):
    h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
    logits = h @ params["w2"] + params["b2"]
    return optax.losses.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


TX = optax.adam(1e-2)


def _update(params, opt_state, grads):
    updates, opt_state = TX.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def _single_device_run(batches):
    @jax.jit
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(_loss)(params, batch)
        return (*_update(params, opt_state, grads), loss)

    params = jax.device_put(_params(), jax.devices()[0])
    opt_state = TX.init(params)
    losses = []
    for batch in batches:
        params, opt_state, loss = step(params, opt_state, batch)
        losses.append(loss)
    return np.asarray(losses), jax.tree.map(np.asarray, params)


def test_pmap_and_jit_steps_match_single_device():
    batches = _batches()
    ref_losses, ref_params = _single_device_run(batches)

    # pmap: replicated state, sharded batches, pmean'd grads.
    def pmap_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(_loss)(params, batch)
        loss, grads = jax.lax.pmean((loss, grads), "batch")
        return (*_update(params, opt_state, grads), loss)

    p_step = jax.pmap(pmap_step, axis_name="batch", donate_argnums=(0, 1))
    params = sharding.replicate(_params())
    opt_state = sharding.replicate(TX.init(_params()))
    pmap_losses = []
    for batch in sharding.prefetch_to_device(map(sharding.shard, batches)):
        params, opt_state, loss = p_step(params, opt_state, batch)
        pmap_losses.append(sharding.unreplicate(loss))
    np.testing.assert_allclose(pmap_losses, ref_losses, rtol=1e-5)
    for k, v in sharding.unreplicate(params).items():
        np.testing.assert_allclose(v, ref_params[k], rtol=1e-5, atol=1e-6)

    # jit: data mesh, global batch, replicated state -- and the same with w1 sharded (FSDP-like),
    # which callers get through param_sharding without any other change.
    mesh = sharding.data_mesh()
    for rules in (None, [(r"w1$", PartitionSpec("data"))]):
        state = {"params": _params(), "opt_state": TX.init(_params())}
        shardings = sharding.state_shardings(mesh, state, param_sharding=rules)
        state = jax.device_put(sharding.place_replicated(state, mesh), shardings)

        def jit_step(state, batch):
            loss, grads = jax.value_and_grad(_loss)(state["params"], batch)
            params, opt_state = _update(state["params"], state["opt_state"], grads)
            return {"params": params, "opt_state": opt_state}, loss

        j_step = jax.jit(
            jit_step,
            in_shardings=(shardings, sharding.batch_sharding(mesh)),
            out_shardings=(shardings, sharding.replicated_sharding(mesh)),
            donate_argnums=0,
        )
        jit_losses = []
        for batch in batches:
            state, loss = j_step(state, sharding.global_batch(mesh, batch))
            jit_losses.append(loss)
        np.testing.assert_allclose(jit_losses, ref_losses, rtol=1e-5)
        for k, v in state["params"].items():
            np.testing.assert_allclose(v, ref_params[k], rtol=1e-5, atol=1e-6)
        expected = PartitionSpec("data") if rules else PartitionSpec()
        assert state["params"]["w1"].sharding.spec == expected
        assert state["opt_state"][0].mu["w1"].sharding.spec == expected


def _copied_sizes(compiled_text: str) -> list[int]:
    """Elements of every array the entry computation of an XLA program copies."""
    entry = compiled_text[compiled_text.index("ENTRY") :]
    shapes = re.findall(r"= [a-z0-9]+\[([0-9,]*)\]\{[^}]*\} copy\(", entry)
    return [int(np.prod([int(d) for d in s.split(",") if d])) for s in shapes]


def test_pmap_is_jax_pmap_with_donated_state_updated_in_place(request):
    """sharding.pmap computes what jax.pmap computes (collectives, axis_index, donation) from
    numpy or prefetched batches, compiling once when its state is typed as its outputs, and its
    program copies no donated array (jax.pmap's squeeze of the device axis makes XLA:CPU copy
    each one every step)."""
    batches = list(map(sharding.shard, _batches(steps=3)))
    compiles = []

    def on_duration(name: str, *_, **kwargs) -> None:
        if name == "/jax/core/compile/backend_compile_duration":
            compiles.append(kwargs.get("fun_name"))

    jax.monitoring.register_event_duration_secs_listener(on_duration)
    request.addfinalizer(lambda: jax.monitoring.unregister_event_duration_listener(on_duration))

    def step(state, batch):
        loss, grads = jax.value_and_grad(_loss)(state["params"], batch)
        loss, grads = jax.lax.pmean((loss, grads), "batch")
        params, opt_state = _update(state["params"], state["opt_state"], grads)
        return {"params": params, "opt_state": opt_state}, (loss, jax.lax.axis_index("batch"))

    def run(compiled, batch_iter, place=lambda tree: tree):
        state = place(sharding.replicate({"params": _params(), "opt_state": TX.init(_params())}))
        first = state["params"]["w1"]
        compiles.clear()
        outs = []
        for batch in batch_iter:
            state, out = compiled(state, batch)
            outs.append(out)
        assert first.is_deleted()  # donated
        return state, outs, len(compiles)

    ref_state, ref_outs, _ = run(jax.pmap(step, "batch", donate_argnums=(0,)), batches)
    ours = sharding.pmap(step, "batch", donate_argnums=(0,))
    # The mesh axis name is part of an array's type: state placed by the identity under
    # sharding.pmap is typed like the step's outputs, so later steps reuse the first compile.
    as_output = sharding.pmap(lambda tree: tree, "batch")
    for batch_iter in (batches, sharding.prefetch_to_device(batches)):
        state, outs, step_compiles = run(ours, batch_iter, as_output)
        assert step_compiles == 1
        for (loss, index), (ref_loss, ref_index) in zip(outs, ref_outs, strict=True):
            np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
            np.testing.assert_array_equal(index, ref_index)
            np.testing.assert_array_equal(index, np.arange(N))
        for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state), strict=True):
            assert got.shape == want.shape
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)

    copied = _copied_sizes(ours.lower(state, batches[0]).compile().as_text())
    assert all(size <= 1 for size in copied), copied  # scalars (step counts) at most


def test_replicate_unreplicate_round_trip():
    tree = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": jnp.int32(7), "c": 3}
    rep = sharding.replicate(tree)
    assert rep["a"].shape == (N, 2, 3) and rep["a"].dtype == np.float32
    assert rep["b"].shape == (N,) and rep["c"].shape == (N,)
    assert {s.device for s in rep["a"].addressable_shards} == set(jax.local_devices())
    for s in rep["a"].addressable_shards:
        np.testing.assert_array_equal(s.data, tree["a"][None])
    back = sharding.unreplicate(rep)
    np.testing.assert_array_equal(back["a"], tree["a"])
    assert int(back["b"]) == 7 and int(back["c"]) == 3
    out = jax.pmap(lambda t: jax.tree.map(lambda x: x + 1, t))(rep)
    np.testing.assert_array_equal(sharding.unreplicate(out)["a"], tree["a"] + 1)
    two = sharding.replicate(tree, devices=jax.local_devices()[:2])
    assert two["a"].shape == (2, 2, 3)


def test_replicate_takes_leaves_placed_on_different_devices():
    mesh = sharding.data_mesh()
    tree = {
        "params": sharding.place_replicated(jnp.arange(2.0), mesh),
        "count": jax.device_put(jnp.ones(3), jax.devices()[1]),
        "host": np.float32(2.0),
    }
    rep = sharding.replicate(tree)
    for name, shape in (("params", (N, 2)), ("count", (N, 3)), ("host", (N,))):
        assert rep[name].shape == shape
        assert {s.device for s in rep[name].addressable_shards} == set(jax.local_devices())
    np.testing.assert_array_equal(sharding.unreplicate(rep)["params"], np.arange(2.0))


def test_prefetch_size_must_be_positive():
    with pytest.raises(ValueError, match="size must be an int >= 1, got 0"):
        next(sharding.prefetch_to_device(iter([]), size=0))


def test_pmap_decorates_as_jax_pmap_does():
    @sharding.pmap(axis_name="batch")
    def mean_over_devices(x):
        return jax.lax.pmean(x, "batch")

    x = jnp.arange(N * 2.0).reshape(N, 2)
    np.testing.assert_allclose(mean_over_devices(x), jnp.broadcast_to(x.mean(0), (N, 2)))
    with pytest.raises(TypeError, match="needs axis_name"):
        sharding.pmap(lambda x: x)


def test_pmap_maps_keyword_arguments_and_names_a_wrong_leading_axis():
    step = sharding.pmap(lambda state, batch: state * 2 + batch, "batch")
    x, y = jnp.ones((N, 2)), jnp.arange(2.0 * N).reshape(N, 2)
    expected = jax.pmap(lambda state, batch: state * 2 + batch, "batch")(x, y)
    np.testing.assert_array_equal(step(state=x, batch=y), expected)
    np.testing.assert_array_equal(step(x, batch=y), expected)
    for rows in (12, 16):  # not a multiple of the devices, and one
        with pytest.raises(ValueError, match=rf"leading axis of {N} .* shape \({rows}, 2\)"):
            step(jnp.ones((rows, 2)), jnp.ones((rows, 2)))
    with pytest.raises(TypeError, match="pass them positionally"):
        sharding.pmap(lambda *xs, scale: xs[0] * scale, "batch")(x, scale=y)


def test_global_replicated_keeps_the_copies_and_round_trips():
    """pmap-replicated leaves (scalars too) become global arrays replicated over every device,
    with the values of ``unreplicate``; ``replicate`` takes them back."""
    tree = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "step": jnp.int32(7)}
    rep = jax.pmap(lambda t: jax.tree.map(lambda x: x + 1, t))(sharding.replicate(tree))
    glob = sharding.global_replicated(rep)
    for key, value in glob.items():
        assert value.shape == np.shape(tree[key]) and value.dtype == rep[key].dtype
        assert value.sharding.is_fully_replicated
        assert value.sharding.device_set == set(jax.devices())
        np.testing.assert_array_equal(value, np.asarray(tree[key]) + 1)
        for shard in value.addressable_shards:
            np.testing.assert_array_equal(shard.data, np.asarray(tree[key]) + 1)
    again = sharding.replicate(glob)
    assert again["a"].shape == (N, 2, 3) and again["step"].shape == (N,)
    np.testing.assert_array_equal(sharding.unreplicate(again)["a"], tree["a"] + 1)


def test_shard_and_errors():
    batch = {"x": np.arange(32).reshape(16, 2), "y": np.arange(16)}
    sharded = sharding.shard(batch)
    assert sharded["x"].shape == (N, 2, 2) and sharded["y"].shape == (N, 2)
    np.testing.assert_array_equal(sharded["y"].reshape(-1), batch["y"])
    # Other pytrees (nested, jax arrays: not the flat dict of numpy arrays) shard alike.
    nested = sharding.shard({"in": {"x": jnp.asarray(batch["x"])}, "y": [batch["y"]]})
    np.testing.assert_array_equal(nested["in"]["x"], sharded["x"])
    np.testing.assert_array_equal(nested["y"][0], sharded["y"])
    with pytest.raises(ValueError, match="batch of 12 does not divide over 8 local devices"):
        sharding.shard({"x": np.zeros((12, 2))})
    with pytest.raises(ValueError, match="leaves disagree on the batch size"):
        sharding.shard({"x": np.zeros((16, 2)), "y": np.zeros(8)})
    with pytest.raises(ValueError, match="'y' is a scalar"):
        sharding.shard({"x": np.zeros((16, 2)), "y": np.float32(1)})


def test_shard_prng_key():
    for key in (jax.random.PRNGKey(0), jax.random.key(0)):
        keys = sharding.shard_prng_key(key)
        assert keys.shape[0] == N
        data = (
            jax.random.key_data(keys) if jnp.issubdtype(keys.dtype, jax.dtypes.prng_key) else keys
        )
        assert len({tuple(np.asarray(k).ravel()) for k in data}) == N
        draws = jax.pmap(lambda k: jax.random.normal(k, (2,)))(keys)
        assert len({tuple(np.asarray(d)) for d in draws}) == N


def test_keep_ahead_produces_items_before_they_are_needed():
    produced = []

    def items():
        for i in range(5):
            produced.append(i)
            yield i

    ahead = sharding.keep_ahead(items(), size=2)
    assert produced == []  # nothing before the first item is asked for
    assert next(ahead) == 0 and produced == [0, 1]  # a buffer of 2: item 1 is on its way
    assert next(ahead) == 1 and produced == [0, 1, 2]
    assert list(ahead) == [2, 3, 4] and produced == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="keep_ahead: size must be an int >= 1"):
        sharding.keep_ahead(items(), size=0)


def test_prefetch_to_device():
    batches = [{"x": np.full((16, 3), i, np.float32)} for i in range(5)]
    seen = list(sharding.prefetch_to_device(map(sharding.shard, batches), size=2))
    assert len(seen) == 5
    for i, item in enumerate(seen):
        x = item["x"]
        assert isinstance(x, jax.Array) and x.shape == (N, 2, 3)
        assert {s.device for s in x.addressable_shards} == set(jax.local_devices())
        assert all(s.data.shape == (1, 2, 3) for s in x.addressable_shards)
        np.testing.assert_array_equal(np.asarray(x), i)
    with pytest.raises(ValueError, match="leading axis of 8 devices, got 16"):
        next(sharding.prefetch_to_device(iter(batches)))


def test_pad_shard_unpad_uneven_batch():
    w = np.random.default_rng(0).normal(size=(3, 2)).astype(np.float32)
    x = np.random.default_rng(1).normal(size=(13, 3)).astype(np.float32)

    def forward(w, x):
        return {"y": x @ w, "n": jnp.sum(x, axis=-1)}

    expected = jax.jit(forward)(w, x)
    wrapped = sharding.pad_shard_unpad(jax.pmap(forward, in_axes=(None, 0)))
    for min_device_batch in (None, 4):
        out = wrapped(w, x, min_device_batch=min_device_batch)
        assert out["y"].shape == (13, 2) and out["n"].shape == (13,)
        np.testing.assert_allclose(out["y"], expected["y"], rtol=1e-6)
        np.testing.assert_allclose(out["n"], expected["n"], rtol=1e-6)

    # static_return with a mask: a masked, psum'd count over real examples only.
    def count(x, mask):
        return jax.lax.psum(jnp.sum(mask), "d")

    counted = sharding.pad_shard_unpad(
        jax.pmap(count, axis_name="d"), static_argnums=(), static_return=True
    )
    assert int(counted(x, np.ones(13, bool))[0]) == 13
    # Errors name arguments as the caller wrote them: by position among all, or by keyword.
    with pytest.raises(ValueError, match=r"disagree .*'args\[1\]/a': 13, 'args\[1\]/b': 5"):
        wrapped(w, {"a": x, "b": x[:5]})
    with pytest.raises(ValueError, match=r"'args\[0\]': 13, 'mask': 5"):
        counted(x, mask=np.ones(5, bool))


def test_global_batch_divides_by_what_the_given_sharding_splits():
    # The batch axis over 'data' only of a ('data', 'model') mesh (FSDP-style), or replicated.
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(2, N // 2), ("data", "model"))
    over_data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    x = np.arange(12, dtype=np.float32).reshape(6, 2)
    placed = sharding.global_batch(mesh, {"x": x}, sharding=over_data)["x"]
    assert placed.sharding == over_data and placed.shape == (6, 2)
    np.testing.assert_array_equal(placed, x)
    replicated = sharding.global_batch(
        mesh, {"x": x[:3]}, sharding=sharding.replicated_sharding(mesh)
    )
    np.testing.assert_array_equal(replicated["x"], x[:3])
    with pytest.raises(ValueError, match=r"does not divide over the 2 parts its sharding cuts"):
        sharding.global_batch(mesh, {"x": x[:3]}, sharding=over_data)


def test_data_mesh_global_batch_and_errors():
    mesh = sharding.data_mesh()
    assert mesh.axis_names == ("data",) and mesh.size == N
    batch = {"x": np.arange(48, dtype=np.float32).reshape(16, 3), "y": np.arange(16)}
    gb = sharding.global_batch(mesh, batch, check_processes=True)
    assert gb["x"].sharding == sharding.batch_sharding(mesh)
    assert gb["x"].shape == (16, 3)
    assert all(s.data.shape == (2, 3) for s in gb["x"].addressable_shards)
    np.testing.assert_array_equal(gb["y"], batch["y"])
    with pytest.raises(ValueError, match=r"global batch of 12 .* does not divide over the 8"):
        sharding.global_batch(mesh, {"x": np.zeros((12, 3))})
    with pytest.raises(ValueError, match="leaves disagree"):
        sharding.global_batch(mesh, {"x": np.zeros((16, 3)), "y": np.zeros(8)})
    named = sharding.data_mesh(jax.devices()[:4], axis_name="batch")
    assert named.axis_names == ("batch",) and named.size == 4
    assert sharding.batch_sharding(named).spec == PartitionSpec("batch")


def test_data_mesh_axis_types_and_device_order():
    mesh = sharding.data_mesh()
    assert mesh.axis_types == (AxisType.Auto,)
    assert list(mesh.devices.flat) == sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    explicit = sharding.data_mesh(axis_type=AxisType.Explicit)
    assert explicit.axis_types == (AxisType.Explicit,)
    given = jax.devices()[::-1][:4]
    assert list(sharding.data_mesh(given).devices.flat) == given  # the order given

    # An Explicit mesh, set with jax.set_mesh, types the batch's sharding inside a jitted step.
    batch = sharding.global_batch(explicit, {"x": np.ones((16, 3), np.float32)})
    specs = []

    @jax.jit
    def step(b):
        specs.append(jax.typeof(b["x"]).sharding.spec)
        return b["x"].sum()

    with jax.set_mesh(explicit):
        assert step(batch) == 48
    assert specs == [PartitionSpec("data", None)]


def test_place_replicated_and_state_shardings():
    mesh = sharding.data_mesh()
    model = nn.Dense(4)
    params = model.init(jax.random.key(0), jnp.ones((1, 3)))["params"]
    state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=optax.adam(1e-3))
    placed = sharding.place_replicated(state, mesh)
    kernel = placed.params["kernel"]
    assert kernel.sharding.is_fully_replicated and len(kernel.addressable_shards) == N
    np.testing.assert_array_equal(kernel, params["kernel"])

    shardings = sharding.state_shardings(mesh, jax.eval_shape(lambda: state))
    assert jax.tree.structure(shardings) == jax.tree.structure(state)
    assert all(s == sharding.replicated_sharding(mesh) for s in jax.tree.leaves(shardings))

    def rule(path, leaf):
        return PartitionSpec(None, "data") if path.endswith("kernel") else None

    ruled = sharding.state_shardings(mesh, state, param_sharding=rule)
    assert ruled.params["kernel"].spec == PartitionSpec(None, "data")
    assert ruled.opt_state[0].nu["kernel"].spec == PartitionSpec(None, "data")
    assert ruled.params["bias"].spec == PartitionSpec()
    custom = NamedSharding(mesh, PartitionSpec("data"))
    given = sharding.state_shardings(mesh, state, param_sharding=lambda p, x: custom)
    assert given.step == custom

    # nnx: canonical paths without the Variable's ``value``.
    nnx_state = nnx.state(nnx.Linear(3, 4, rngs=nnx.Rngs(0)))
    seen = []
    sharding.state_shardings(mesh, nnx_state, param_sharding=lambda p, x: seen.append(p))
    assert sorted(seen) == ["bias", "kernel"]


def test_initialize_distributed_single_process(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(sharding, "_cluster_process_count", lambda: None)
    assert sharding.initialize_distributed() is False
    assert sharding.initialize_distributed() is False
    assert not jax.distributed.is_initialized()
    assert sharding.initialize_distributed(num_processes=1) is False
    monkeypatch.setenv("JAX_NUM_PROCESSES", "1")
    assert sharding.initialize_distributed("127.0.0.1:1234") is False
    monkeypatch.delenv("JAX_NUM_PROCESSES")
    monkeypatch.setattr(sharding, "_cluster_process_count", lambda: 1)
    assert sharding.initialize_distributed() is False
    assert not jax.distributed.is_initialized()
    assert jax.process_count() == 1


def test_initialize_distributed_incomplete_settings(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(sharding, "_cluster_process_count", lambda: None)
    with pytest.raises(ValueError, match=r"missing num_processes .*, process_id"):
        sharding.initialize_distributed("127.0.0.1:1234")
    monkeypatch.setenv("JAX_PROCESS_ID", "zero")
    with pytest.raises(ValueError, match="JAX_PROCESS_ID='zero' is not an integer"):
        sharding.initialize_distributed()
    assert not jax.distributed.is_initialized()


def test_assert_same_across_processes_single_process():
    sharding.assert_same_across_processes({"a": np.arange(3)}, what="params")
    sharding.assert_same_across_processes({"a": np.arange(3)}, shapes_only=True)


# ----------------------------------------------------------------------------- FSDP


def test_mesh_from_axes_takes_the_devices_left_and_refuses_what_does_not_fit():
    mesh = sharding.mesh_from_axes({"data": -1, "fsdp": 2})
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2}
    assert [d.id for d in mesh.devices.flat] == sorted(d.id for d in jax.devices())
    assert dict(sharding.mesh_from_axes({"data": 8}).shape) == {"data": 8}
    for axes, message in [
        ({"data": 3}, "does not fit the 8 device"),
        ({"data": -1, "fsdp": 3}, "does not fit the 8 device"),
        ({"data": -1, "fsdp": -1}, "only one axis can be -1"),
        ({"data": 0}, "mesh.data must be a positive int or -1"),
        ({"data": True}, "mesh.data must be a positive int or -1"),
        ({}, "mesh has no axes"),
    ]:
        with pytest.raises(sharding.MeshError, match=message):
            sharding.mesh_from_axes(axes)


def test_fsdp_spec_splits_the_largest_dimension_that_divides():
    P = jax.sharding.PartitionSpec
    assert sharding.fsdp_spec((3, 3, 32, 64), "fsdp", 8, 1024) == P(None, None, None, "fsdp")
    assert sharding.fsdp_spec((256, 128), "fsdp", 8, 1024) == P("fsdp", None)
    assert sharding.fsdp_spec((100, 30), "fsdp", 8, 1024) is None  # no dimension divides
    assert sharding.fsdp_spec((64,), "fsdp", 8, 1024) is None  # small: replicated
    assert sharding.fsdp_spec((256, 128), "fsdp", 1, 1024) is None  # no fsdp axis


def test_partition_rules_come_first_then_fsdp_and_name_the_leaf_they_cannot_fit():
    P = jax.sharding.PartitionSpec
    mesh = sharding.mesh_from_axes({"data": 2, "fsdp": 4})
    rule = sharding.partition_rule(mesh, [(r"head/kernel$", (None, "fsdp")), (r"keep$", ())])
    kernel, head = np.zeros((256, 128)), np.zeros((128, 16))
    assert rule("params/dense/kernel", kernel) == P("fsdp", None)
    assert rule("opt_state/0/mu/head/kernel", head) == P(None, "fsdp")
    assert rule("params/keep", kernel) == P()
    state = {"params": {"dense": {"kernel": kernel}, "head": {"kernel": head}}}
    shardings = sharding.state_shardings(mesh, state, param_sharding=rule)
    placed = sharding.place(state, shardings)
    held = sharding.bytes_per_device(placed)
    assert set(held) == set(jax.devices())
    total = sum(x.nbytes for x in jax.tree.leaves(placed))  # float32 on the devices
    assert all(b == total // 4 for b in held.values())
    bad = sharding.partition_rule(mesh, [(r"head/kernel$", ("model",))])
    with pytest.raises(ValueError, match="'params/head/kernel': mesh axis 'model'"):
        bad("params/head/kernel", head)
    odd = sharding.partition_rule(mesh, [(r"kernel$", (("data", "fsdp"), None))])
    with pytest.raises(ValueError, match=r"dimension 3 of shape \(3, 8\) does not split into 8"):
        odd("params/x/kernel", np.zeros((3, 8)))
