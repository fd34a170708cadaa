import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, strategies as st
from jax.sharding import NamedSharding, PartitionSpec as P

import eqpar

from .helpers import assert_tree_allclose, make_mixed, TraceCounter


def test_mlp_equals_single_device(getkey):
    mlp = eqx.nn.MLP(5, 3, 16, 2, key=getkey())
    x = jax.random.normal(getkey(), (8, 5))
    out = eqpar.filter_pmap(mlp)(x)
    assert_tree_allclose(out, jax.vmap(mlp)(x))
    assert isinstance(out.sharding, NamedSharding)
    assert len(out.sharding.device_set) == 8


def test_mixed_module_and_same_result_as_filter_vmap(getkey):
    keys = jax.random.split(getkey(), 4)
    ensemble = eqpar.filter_pmap(make_mixed)(keys)
    assert ensemble.name == "mixed" and ensemble.activation is jnp.tanh
    assert_tree_allclose(ensemble, eqpar.filter_vmap(make_mixed)(keys))
    x = jax.random.normal(getkey(), (4, 3))
    out = eqpar.filter_pmap(lambda m, x: m.scaled(x, scale=3.0))(ensemble, x)
    ref = jnp.stack([make_mixed(k).scaled(xi, scale=3.0) for k, xi in zip(keys, x)])
    assert_tree_allclose(out, ref)


def test_nested_pytrees_kwargs_and_static_outputs(getkey):
    tree = {"a": jax.random.normal(getkey(), (3, 2)), "b": (None, "tag")}
    w = jax.random.normal(getkey(), (2,))

    def f(t, *, w):
        return {"y": t["a"] @ w, "tag": t["b"][1], "none": None}

    out = eqpar.filter_pmap(f, in_axes=dict(w=None))(tree, w=w)
    assert out["tag"] == "tag" and out["none"] is None
    assert_tree_allclose(out["y"], tree["a"] @ w)


@given(n=st.integers(1, 8), in_axis=st.integers(0, 1), out_axis=st.integers(-1, 1))
def test_in_and_out_axes(n, in_axis, out_axis):
    shape = [3]
    shape.insert(in_axis, n)
    x = jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape)
    c = jnp.array(2.0)

    def f(x, c):
        return jnp.stack([x * c, x + c]), c * 3

    out = eqpar.filter_pmap(f, in_axes=(in_axis, None), out_axes=(out_axis, None))(x, c)
    ref = eqpar.filter_vmap(f, in_axes=(in_axis, None), out_axes=(out_axis, None))(x, c)
    assert_tree_allclose(out, ref)


def test_axis_name_and_collectives():
    x = jnp.arange(1.0, 9.0)
    out = eqpar.filter_pmap(lambda v: v / eqpar.psum(v, "i"), axis_name="i")(x)
    assert_tree_allclose(out, x / x.sum())


def test_axis_size_with_no_mapped_input():
    x = jnp.arange(3.0)
    out = eqpar.filter_pmap(
        lambda x: x * jax.lax.axis_index("i").astype(x.dtype),
        in_axes=None,
        axis_size=4,
        axis_name="i",
    )(x)
    assert_tree_allclose(out, jnp.arange(4.0)[:, None] * x[None, :])


def test_devices_argument():
    devices = jax.devices()[-2:]
    out = eqpar.filter_pmap(lambda x: x * 2, devices=devices)(jnp.arange(2.0))
    assert out.sharding.device_set == set(devices)
    assert_tree_allclose(out, jnp.arange(2.0) * 2)


def test_no_retrace_on_second_call():
    counter = TraceCounter(lambda x, k: x * k)
    f = eqpar.filter_pmap(counter)
    x = jnp.arange(8.0)
    f(x, 2)
    f(x + 1, 2)
    assert counter.count == 1
    f(x, 3)
    assert counter.count == 2


def test_places_committed_and_uncommitted_inputs():
    f = eqpar.filter_pmap(lambda x: x + 1)
    x = jnp.arange(8.0)
    on_one = jax.device_put(x, jax.devices()[3])
    mesh = jax.make_mesh((8,), ("i",), axis_types=(jax.sharding.AxisType.Auto,))
    replicated = jax.device_put(x, NamedSharding(mesh, P()))
    for value in (x, np.arange(8.0, dtype=np.float32), on_one, replicated):
        assert_tree_allclose(f(value), x + 1)


def test_nested_filter_vmap_inside_filter_pmap():
    x = jnp.arange(24.0).reshape(8, 3)
    f = eqpar.filter_pmap(eqpar.filter_vmap(lambda v: v**2))
    assert_tree_allclose(f(x), x**2)


def test_gradients_stay_per_device():
    w = jnp.array(2.0)
    x = jnp.arange(8.0)

    def grad_fn(w, x):
        return jax.grad(lambda w: w * x)(w)

    g = eqpar.filter_pmap(grad_fn, in_axes=(None, 0))(w, x)
    assert_tree_allclose(g, x)


def test_donate_all():
    mesh = jax.make_mesh((8,), ("i",), axis_types=(jax.sharding.AxisType.Auto,))
    x = jax.device_put(jnp.arange(8.0), NamedSharding(mesh, P("i")))
    kept = eqpar.filter_pmap(lambda x: x * 2)(x)
    assert not x.is_deleted()
    out = eqpar.filter_pmap(lambda x: x * 2, donate="all")(x)
    assert x.is_deleted()  # its buffer now belongs to the output
    assert_tree_allclose(out, kept)
