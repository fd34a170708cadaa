import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st
from jaxtyping import Array, Float

import eqpar

from .helpers import assert_tree_allclose, make_mixed, TraceCounter


def loop(fn, *batched):
    """Single-device reference: a Python loop over axis 0, stacked."""
    outs = [fn(*xs) for xs in zip(*batched)]
    return jax.tree.map(lambda *ys: jnp.stack(ys), *outs)


def test_mlp_module_as_function(getkey):
    mlp = eqx.nn.MLP(5, 3, 16, 2, key=getkey())
    x = jax.random.normal(getkey(), (12, 5))
    assert_tree_allclose(eqpar.filter_vmap(mlp)(x), loop(mlp, x))


def test_mixed_module_mapped_as_ensemble(getkey):
    keys = jax.random.split(getkey(), 6)
    ensemble = eqpar.filter_vmap(make_mixed)(keys)
    # Arrays got a leading axis; static fields and the plain int stayed as they were.
    assert ensemble.weight.shape == (6, 4, 3)
    assert ensemble.name == "mixed" and ensemble.power == 2
    assert ensemble.activation is jnp.tanh
    x = jax.random.normal(getkey(), (3,))
    out = eqpar.filter_vmap(lambda m, x: m(x), in_axes=(0, None))(ensemble, x)
    members = [make_mixed(k) for k in keys]
    assert_tree_allclose(out, jnp.stack([m(x) for m in members]))


class Layer(eqx.Module):
    weight: Float[Array, "o i"]
    activation: str = eqx.field(static=True)

    @eqpar.filter_vmap(in_axes=(None, 0))
    def apply(self, x):
        y = self.weight @ x
        return jnp.tanh(y) if self.activation == "tanh" else y

    @eqpar.filter_vmap(in_axes=dict(self=None, x=0, scale=None))
    def apply_scaled(self, x, *, scale):
        return self.weight @ x * scale


def test_method_binds_self(getkey):
    layer = Layer(jax.random.normal(getkey(), (4, 3)), "tanh")
    x = jax.random.normal(getkey(), (9, 3))
    assert_tree_allclose(layer.apply(x), jnp.tanh(x @ layer.weight.T))
    linear = Layer(layer.weight, "linear")
    assert_tree_allclose(linear.apply(x), x @ layer.weight.T)
    assert_tree_allclose(
        layer.apply_scaled(x, scale=jnp.array(2.0)), 2.0 * (x @ layer.weight.T)
    )


def test_nested_pytrees_and_prefix_specs(getkey):
    tree = {
        "a": jax.random.normal(getkey(), (5, 2)),
        "b": (jax.random.normal(getkey(), (2, 5)), None, "tag"),
        "c": jax.random.normal(getkey(), (3,)),
    }

    def f(t):
        assert t["b"][2] == "tag" and t["b"][1] is None
        return {"sum": t["a"] + t["b"][0] + t["c"][:2].sum(), "tag": t["b"][2]}

    in_axes = ({"a": 0, "b": (1, None, None), "c": None},)
    out = eqpar.filter_vmap(f, in_axes=in_axes)(tree)
    expected = tree["a"] + tree["b"][0].T + tree["c"][:2].sum()
    assert out["tag"] == "tag"
    assert_tree_allclose(out["sum"], expected)


@given(
    batch=st.integers(1, 7),
    in_axis=st.integers(0, 2),
    out_axis=st.integers(-2, 1),
)
def test_in_and_out_axes_other_than_zero(batch, in_axis, out_axis):
    shape = [2, 3]
    shape.insert(in_axis, batch)
    x = jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape)
    y = jnp.linspace(0.0, 1.0, 3)

    def f(x, y):  # x: (2, 3), y broadcast
        return x * y[None, :]

    out = eqpar.filter_vmap(f, in_axes=(in_axis, None), out_axes=out_axis)(x, y)
    ref = jnp.stack([f(xi, y) for xi in jnp.moveaxis(x, in_axis, 0)])
    assert_tree_allclose(out, jnp.moveaxis(ref, 0, out_axis))


def test_callable_specs_see_each_leaf():
    xs = jnp.ones((4, 3))
    table = jnp.arange(3.0)
    spec = lambda leaf: 0 if leaf.ndim == 2 else None  # noqa: E731
    out = eqpar.filter_vmap(lambda x, t: x * t, in_axes=spec)(xs, table)
    assert_tree_allclose(out, xs * table[None, :])


def test_axis_size_with_no_mapped_input():
    x = jnp.arange(3.0)
    out = eqpar.filter_vmap(lambda x: x * 2, in_axes=None, axis_size=5)(x)
    assert_tree_allclose(out, jnp.tile(x * 2, (5, 1)))


def test_nested_filter_vmap_pairwise_dots():
    a = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    b = jnp.array([[1.0, 1.0], [1.0, -1.0]])
    inner = eqpar.filter_vmap(jnp.dot, in_axes=(None, 0))
    outer = eqpar.filter_vmap(inner, in_axes=(0, None))
    out = outer(a, b)
    assert_tree_allclose(out, jnp.array([[1.0, 1.0], [1.0, -1.0], [2.0, 0.0]]))
    assert_tree_allclose(out, a @ b.T)


def test_keyword_arguments_at_call_time(getkey):
    x = jax.random.normal(getkey(), (6, 3))
    w = jax.random.normal(getkey(), (3,))

    def f(x, *, w, shift=0.0):
        return x @ w + shift

    mapped = eqpar.filter_vmap(f, in_axes=dict(w=None))
    assert_tree_allclose(mapped(x, w=w), x @ w)
    assert_tree_allclose(mapped(x, w=w, shift=1.5), x @ w + 1.5)  # float: static
    # Without a dict, keyword arrays get the default spec and are mapped.
    ws = jax.random.normal(getkey(), (6, 3))
    assert_tree_allclose(eqpar.filter_vmap(f)(x, w=ws), jnp.sum(x * ws, axis=1))


def test_axis_name_binds_collectives():
    x = jnp.array([1.0, 2.0, 3.0, 4.0])
    out = eqpar.filter_vmap(lambda v: v - eqpar.pmean(v, "i"), axis_name="i")(x)
    assert_tree_allclose(out, jnp.array([-1.5, -0.5, 0.5, 1.5]))


def test_non_array_outputs_and_unmapped_outputs():
    x = jnp.arange(6.0).reshape(3, 2)
    c = jnp.array(7.0)
    out = eqpar.filter_vmap(
        lambda x, c: (x.sum(), c * 2, "label"),
        in_axes=(0, None),
        out_axes=(0, None, None),
    )(x, c)
    assert_tree_allclose(out, (x.sum(axis=1), c * 2, "label"))


@given(n=st.integers(1, 23), chunk=st.integers(1, 9))
def test_chunk_size_matches_unchunked(n, chunk):
    x = jnp.linspace(-1.0, 1.0, n * 3).reshape(n, 3)
    y = jnp.linspace(0.0, 2.0, n)
    w = jnp.array([0.5, -1.0, 2.0])

    def f(x, y, w):
        return {"v": jnp.cos(x @ w + y), "static": "ok"}, x * y

    full = eqpar.filter_vmap(f, in_axes=(0, 0, None))(x, y, w)
    chunked = eqpar.filter_vmap(f, in_axes=(0, 0, None), chunk_size=chunk)(x, y, w)
    assert_tree_allclose(chunked, full)


def test_chunk_size_bounds_memory():
    """The compiled program's temporaries scale with the chunk, not the batch."""
    n, d = 1024, 128
    x = jnp.ones((n, d))

    def f(v):  # (d, d) intermediates per example that XLA cannot fuse away
        m = jnp.sin(jnp.outer(v, v))
        return jnp.sum(m @ jnp.cos(m))

    def temp_bytes(chunk):
        g = eqpar.filter_vmap(f, chunk_size=chunk)
        return (
            jax.jit(lambda x: g(x))
            .lower(x)
            .compile()
            .memory_analysis()
            .temp_size_in_bytes
        )

    small, large, full = temp_bytes(16), temp_bytes(256), temp_bytes(None)
    per_example = d * d * 4
    assert full >= n * per_example  # unchunked holds every example's intermediate
    assert small < 3 * 16 * per_example  # chunked: about one chunk's worth
    assert small < large < full


def test_chunk_size_with_axis_name_is_refused():
    with pytest.raises(eqpar.SpecError, match="chunk_size.*axis_name"):
        eqpar.filter_vmap(lambda x: x, axis_name="i", chunk_size=2)


def test_maps_eagerly_and_compiles_inside_filter_jit():
    # filter_vmap maps like jax.vmap: eager calls run the function every time ...
    counter = TraceCounter(lambda x, power: x**power)
    f = eqpar.filter_vmap(counter)
    x = jnp.arange(4.0)
    f(x, 2)
    f(x + 1, 2)
    assert counter.count == 2
    # ... and inside filter_jit it is traced once per signature with the program.
    g = eqpar.filter_jit(lambda x, power: eqpar.filter_vmap(counter)(x, power))
    g(x, 2)
    g(x + 1, 2)
    assert counter.count == 3
    assert_tree_allclose(g(x, 3), x**3)  # a new static value retraces
    assert counter.count == 4
    g(jnp.arange(5.0), 2)  # a new shape retraces
    assert counter.count == 5
