import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st
from jax.sharding import NamedSharding, PartitionSpec as P

import eqpar

from .helpers import assert_tree_allclose, make_mixed


def test_data_mesh_and_context_use():
    mesh = eqpar.data_mesh()
    assert mesh.axis_names == ("data",) and mesh.size == 8
    small = eqpar.data_mesh("batch", jax.devices()[:2])
    assert small.axis_names == ("batch",) and small.size == 2
    with jax.set_mesh(mesh):
        f = eqpar.filter_shard_map(
            lambda x: eqpar.psum(x, "data"), in_specs=P("data"), out_specs=P()
        )
        assert_tree_allclose(f(jnp.arange(8.0)), jnp.array([28.0]))


def test_filter_device_put_places_arrays_and_keeps_statics(getkey):
    mesh = eqpar.data_mesh()
    tree = {"x": jnp.ones((16, 3)), "model": make_mixed(getkey()), "tag": "t"}
    placed = eqpar.filter_device_put(
        tree, {"x": P("data"), "model": P(), "tag": None}, mesh=mesh
    )
    assert placed["tag"] == "t" and placed["model"].name == "mixed"
    assert placed["x"].sharding == NamedSharding(mesh, P("data"))
    assert placed["model"].weight.sharding.is_fully_replicated
    assert_tree_allclose(placed, tree)
    with jax.set_mesh(mesh):  # the context mesh is the default
        assert eqpar.filter_device_put(tree["x"], P("data")).sharding.mesh == mesh


def test_replicate_then_unreplicate_objax_table():
    mesh = eqpar.data_mesh()
    r = eqpar.replicate(jnp.arange(5), mesh=mesh)
    assert r.sharding.is_fully_replicated and len(r.sharding.device_set) == 8
    np.testing.assert_array_equal(eqpar.unreplicate(r, "sum"), [0, 8, 16, 24, 32])
    first = eqpar.unreplicate(r, "first")
    np.testing.assert_array_equal(first, np.arange(5))
    assert first.dtype == jnp.int32
    mean = eqpar.unreplicate(r, "mean")
    assert jnp.issubdtype(mean.dtype, jnp.floating)
    np.testing.assert_allclose(mean, np.arange(5.0))
    np.testing.assert_array_equal(
        eqpar.unreplicate(r, "stack"), np.tile(np.arange(5), (8, 1))
    )
    np.testing.assert_array_equal(
        eqpar.unreplicate(r, lambda x: x.max(0)), np.arange(5)
    )


@pytest.mark.parametrize("devices", [1, 2, 8])
def test_round_trip_on_any_device_count(devices):
    """On a 1-device mesh a copy's own axis 0 is not taken for the device axis,
    while a 1-device filter_pmap output's (of size 1) is."""
    mesh = eqpar.data_mesh(devices=jax.devices()[:devices])
    x = jnp.arange(6).reshape(3, 2)
    r = eqpar.replicate(x, mesh=mesh)
    np.testing.assert_array_equal(eqpar.unreplicate(r), x)
    np.testing.assert_array_equal(eqpar.unreplicate(r, "sum"), x * devices)
    assert eqpar.unreplicate(r, "stack").shape == (devices, 3, 2)
    scalar = eqpar.replicate(jnp.float32(1.5), mesh=mesh)
    assert eqpar.unreplicate(scalar, "sum") == 1.5 * devices
    stacked = eqpar.filter_pmap(lambda v: v * 2, axis_size=devices)(jnp.arange(devices))
    np.testing.assert_array_equal(
        eqpar.unreplicate(stacked, "stack"), 2 * np.arange(devices)
    )
    assert eqpar.unreplicate(stacked) == 0


def test_unreplicate_per_device_outputs_with_mixed_reductions():
    stacked = eqpar.filter_pmap(lambda x: {"v": x * 2, "name": "n"})(jnp.arange(8.0))
    assert eqpar.unreplicate(stacked)["v"] == 0.0
    out = eqpar.unreplicate(stacked, "mean")
    assert out["name"] == "n" and out["v"] == 7.0


def test_unreplicate_per_variable_reductions_objax_example():
    """Objax's per-variable `reduce` (TrainVar(..., reduce=...)), in one call: three
    copies of `arange(5)` replicated on 8 devices, reduced by device 0's value, a
    sum and a stack."""
    m = eqpar.replicate([jnp.arange(5)] * 3, mesh=eqpar.data_mesh())
    out = eqpar.unreplicate(
        m, reduce=[lambda x: x[0], lambda x: x.sum(0), lambda x: jnp.stack(x)]
    )
    np.testing.assert_array_equal(out[0], np.arange(5))
    np.testing.assert_array_equal(out[1], [0, 8, 16, 24, 32])
    np.testing.assert_array_equal(out[2], np.tile(np.arange(5), (8, 1)))
    assert [x.dtype for x in out] == [jnp.int32] * 3
    # The same with names.
    named = eqpar.unreplicate(m, reduce=["first", "sum", "stack"])
    assert_tree_allclose(named, out)


class _BatchNormState(eqx.Module):
    model: eqx.nn.Linear
    mean: jax.Array
    var: jax.Array
    step: jax.Array


def test_unreplicate_batchnorm_statistics_averaged_step_from_device_0(getkey):
    """Each device computes BatchNorm statistics over its part of the batch and
    counts the step; one `unreplicate` call averages the statistics, takes the
    counter (and the replicated model) from device 0, keeping its dtype. Equal to
    the statistics of the whole batch on one device."""
    model = eqx.nn.Linear(3, 4, key=getkey())
    x = jax.random.normal(getkey(), (8 * 6, 3))
    state = _BatchNormState(model, jnp.zeros(4), jnp.ones(4), jnp.int32(41))

    def per_device(state, xb):
        h = jax.vmap(state.model)(xb)
        return eqx.tree_at(
            lambda s: (s.mean, s.var, s.step),
            state,
            (h.mean(0), (h**2).mean(0), state.step + 1),
        )

    out = eqpar.filter_pmap(per_device, in_axes=(None, 0), out_axes=eqx.if_array(0))(
        state, x.reshape(8, 6, 3)
    )
    assert out.mean.shape == (8, 4) and out.step.shape == (8,)
    # A prefix shaped like the state (a Module is a prefix, even a callable one).
    reduce = _BatchNormState(model="first", mean="mean", var="mean", step="first")
    got = eqpar.unreplicate(out, reduce=reduce)
    h = jax.vmap(model)(x)
    want = _BatchNormState(model, h.mean(0), (h**2).mean(0), jnp.int32(42))
    assert_tree_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert got.step.dtype == jnp.int32 and got.step.shape == ()
    # The same as a partial prefix: a whole subtree under one reduction.
    parts = eqpar.unreplicate(
        {"stats": (out.mean, out.var), "step": out.step},
        reduce={"stats": "mean", "step": "first"},
    )
    assert_tree_allclose(parts, {"stats": (want.mean, want.var), "step": want.step})


@given(n=st.integers(1, 20), multiple=st.sampled_from([1, 2, 3, 8]))
def test_pad_batch(n, multiple):
    tree = {"x": jnp.arange(n * 2.0).reshape(n, 2), "k": "static"}
    padded, n_real = eqpar.pad_batch(tree, multiple)
    assert n_real == n and padded["k"] == "static"
    size = padded["x"].shape[0]
    assert size % multiple == 0 and 0 <= size - n < multiple
    np.testing.assert_array_equal(padded["x"][:n], tree["x"])
    np.testing.assert_array_equal(
        padded["x"][n:], np.broadcast_to(tree["x"][-1], (size - n, 2))
    )


def test_filter_device_put_spec_longer_than_rank():
    with pytest.raises(eqpar.SpecError, match="rank 1"):
        eqpar.filter_device_put(jnp.ones(8), P("data", None), mesh=eqpar.data_mesh())


def test_filter_device_put_indivisible_and_unknown_axis():
    mesh = eqpar.data_mesh()
    with pytest.raises(eqpar.AxisSizeError, match="size 7.*8 devices.*pad_batch"):
        eqpar.filter_device_put(jnp.ones(7), P("data"), mesh=mesh)
    with pytest.raises(eqpar.MeshError, match="'model'"):
        eqpar.filter_device_put(jnp.ones(8), P("model"), mesh=mesh)


def test_unreplicate_without_device_axis():
    with pytest.raises(eqpar.SpecError, match="no device axis"):
        eqpar.unreplicate({"loss": jnp.array(1.0)})


def test_unreplicate_unknown_reduce():
    with pytest.raises(eqpar.SpecError, match="reduce='median'.*first"):
        eqpar.unreplicate(jnp.ones((8, 2)), "median")


def test_pad_batch_disagreeing_sizes():
    with pytest.raises(eqpar.AxisSizeError, match=r"\['a'\]: 3.*\['b'\]: 4"):
        eqpar.pad_batch({"a": jnp.ones(3), "b": jnp.ones(4)}, 2)
