import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import eqpar

from .helpers import assert_tree_allclose, make_mixed, TraceCounter


AUTO, EXPLICIT = AxisType.Auto, AxisType.Explicit


def make_mesh(shape, names, kind):
    return jax.make_mesh(shape, names, axis_types=(kind,) * len(shape))


@pytest.mark.parametrize("kind", [AUTO, EXPLICIT])
def test_mlp_data_parallel(getkey, kind):
    mesh = make_mesh((8,), ("data",), kind)
    mlp = eqx.nn.MLP(5, 3, 16, 2, key=getkey())
    x = jax.random.normal(getkey(), (32, 5))
    f = eqpar.filter_shard_map(
        lambda m, x: jax.vmap(m)(x),
        mesh=mesh,
        in_specs=(None, P("data")),
        out_specs=P("data"),
    )
    out = f(mlp, x)
    assert_tree_allclose(out, jax.vmap(mlp)(x))
    assert out.sharding.is_equivalent_to(NamedSharding(mesh, P("data")), out.ndim)


def test_mixed_module_kwargs_and_static_outputs(getkey, mesh8):
    model = make_mixed(getkey())
    x = jax.random.normal(getkey(), (16, 3))

    def f(model, x, *, scale):
        return {
            "y": jax.vmap(lambda v: model.scaled(v, scale=scale))(x),
            "name": model.name,
        }

    g = eqpar.filter_shard_map(
        f,
        mesh=mesh8,
        in_specs=dict(model=P(), x=P("data"), scale=P()),
        out_specs={"y": P("data"), "name": None},
    )
    out = g(model, x, scale=jnp.array(0.5))
    assert out["name"] == "mixed"
    assert_tree_allclose(out["y"], jax.vmap(lambda v: model.scaled(v, scale=0.5))(x))


def test_nested_pytrees_with_prefix_specs(mesh8):
    tree = {"a": jnp.arange(16.0), "b": (jnp.ones((3,)), None, "s")}

    def f(t):
        return (t["a"] * t["b"][0].sum(), t["b"][2], t["b"][1])

    out = eqpar.filter_shard_map(
        f, mesh=mesh8, in_specs=({"a": P("data"), "b": P()},), out_specs=P("data")
    )(tree)
    assert out[1] == "s" and out[2] is None
    assert_tree_allclose(out[0], tree["a"] * 3.0)


@pytest.mark.parametrize("kind", [AUTO, EXPLICIT])
def test_two_dimensional_mesh(getkey, kind):
    """Data parallel over rows, tensor parallel over the weight's columns."""
    mesh = make_mesh((4, 2), ("data", "model"), kind)
    x = jax.random.normal(getkey(), (8, 6))
    w = jax.random.normal(getkey(), (6, 10))

    def f(x, w):
        return jnp.tanh(x @ w), eqpar.psum(jnp.sum(x @ w), ("data", "model"))

    out, total = eqpar.filter_shard_map(
        f,
        mesh=mesh,
        in_specs=(P("data"), P(None, "model")),
        out_specs=(P("data", "model"), P()),
    )(x, w)
    assert_tree_allclose(out, jnp.tanh(x @ w))
    np.testing.assert_allclose(total, jnp.sum(x @ w), rtol=1e-5)


@pytest.mark.parametrize("kind", [AUTO, EXPLICIT])
def test_context_mesh_and_unplaced_inputs(kind):
    mesh = make_mesh((8,), ("data",), kind)
    f = eqpar.filter_shard_map(lambda x: x * 2, in_specs=P("data"), out_specs=P("data"))
    x = jnp.arange(16.0)
    sources = [
        x,
        np.arange(16.0, dtype=np.float32),
        jax.device_put(x, jax.devices()[5]),
        jax.device_put(x, NamedSharding(mesh, P())),
        jax.device_put(x, NamedSharding(mesh, P("data"))),
    ]
    with jax.set_mesh(mesh):
        for value in sources:
            assert_tree_allclose(f(value), x * 2)


def test_no_retrace_on_second_call(mesh8):
    counter = TraceCounter(lambda x, n: x * n)
    f = eqpar.filter_shard_map(
        counter, mesh=mesh8, in_specs=P("data"), out_specs=P("data")
    )
    x = jnp.arange(16.0)
    f(x, 2)
    f(x + 1, 2)
    assert counter.count == 1
    f(x, 3)
    assert counter.count == 2


def test_per_leaf_out_specs_from_callables(mesh8):
    """Pins the JAX behaviour eqpar relies on: out_specs read after the body traced."""

    def f(x):
        return {"rows": x, "total": eqpar.psum(x.sum(), "data")}

    spec = lambda leaf: P("data") if leaf.ndim else P()  # noqa: E731
    out = eqpar.filter_shard_map(f, mesh=mesh8, in_specs=P("data"), out_specs=spec)(
        jnp.arange(16.0)
    )
    assert_tree_allclose(out, {"rows": jnp.arange(16.0), "total": jnp.array(120.0)})


@given(per_device=st.integers(1, 5), devices=st.sampled_from([1, 2, 4, 8]))
def test_batch_sizes_and_device_counts(per_device, devices):
    mesh = jax.make_mesh((devices,), ("data",), devices=jax.devices()[:devices])
    x = jnp.linspace(0.0, 1.0, per_device * devices * 2).reshape(-1, 2)
    f = eqpar.filter_shard_map(
        lambda x: jnp.sin(x) - eqpar.pmean(x.mean(), "data"),
        mesh=mesh,
        in_specs=P("data"),
        out_specs=P("data"),
    )
    assert_tree_allclose(f(x), jnp.sin(x) - x.mean())


def test_method_and_inside_filter_jit(mesh8, getkey):
    class Model(eqx.Module):
        w: jax.Array

        @eqpar.filter_shard_map(
            mesh=mesh8, in_specs=(P(), P("data")), out_specs=P("data")
        )
        def forward(self, x):
            return x @ self.w

    model = Model(jax.random.normal(getkey(), (3, 2)))
    x = jax.random.normal(getkey(), (16, 3))
    assert_tree_allclose(model.forward(x), x @ model.w)
    step = eqpar.filter_jit(lambda m, x: m.forward(x) * 2)
    assert_tree_allclose(step(model, x), 2 * (x @ model.w))


def test_check_vma_false_keeps_gradients_per_device(mesh8):
    w = jnp.array(2.0)
    x = jnp.arange(8.0)

    def local_grad(w, x):
        return jax.grad(lambda w: jnp.sum(w * x))(w)[None]

    checked = eqpar.filter_shard_map(
        local_grad, mesh=mesh8, in_specs=(P(), P("data")), out_specs=P("data")
    )(w, x)
    unchecked = eqpar.filter_shard_map(
        local_grad,
        mesh=mesh8,
        in_specs=(P(), P("data")),
        out_specs=P("data"),
        check_vma=False,
    )(w, x)
    assert_tree_allclose(unchecked, x)  # each device: its own example
    assert_tree_allclose(checked, jnp.full(8, x.sum()))  # autodiff summed over devices
