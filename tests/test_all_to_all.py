"""eqpar.all_to_all and eqpar.axis_index: the same meaning under filter_vmap,
filter_pmap, filter_shard_map and Parallel, equal to a one-device reference."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P
from jaxtyping import Array, Float

import eqpar

from .helpers import assert_tree_allclose
from .test_collectives import run_everywhere


N = 8


class Block(eqx.Module):
    a: Float[Array, "n k"]
    tag: str = eqx.field(static=True)


def swap(x):
    """The reference for tiled=False, split 0, concat 0 on stacked (N, N, ...)."""
    return jnp.swapaxes(x, 0, 1)


def tiled_ref(x, split, concat):
    """The reference for tiled=True on per-device blocks stacked along axis 0."""
    blocks = [np.asarray(b) for b in x]  # device i's block
    out = []
    for i in range(len(blocks)):
        chunks = [np.array_split(b, len(blocks), axis=split)[i] for b in blocks]
        out.append(np.concatenate(chunks, axis=concat))
    return np.stack(out)


@pytest.fixture
def tree(getkey):
    return {
        "block": Block(jax.random.normal(getkey(), (N, N, 3)), "static"),
        "x": jax.random.normal(getkey(), (N, N, 2)),
        "ints": jnp.arange(N * N * 2, dtype=jnp.int32).reshape(N, N, 2),
        "label": "label",
        "nothing": None,
    }


def test_all_to_all_untiled_on_a_module_tree(tree):
    def body(t):
        return eqpar.all_to_all(t, "d", split_axis=0, concat_axis=0)

    for out in run_everywhere(body, tree):
        assert_tree_allclose(out["block"].a, swap(tree["block"].a))
        assert_tree_allclose(out["x"], swap(tree["x"]))
        assert_tree_allclose(out["ints"], swap(tree["ints"]))
        assert out["block"].tag == "static"
        assert out["label"] == "label" and out["nothing"] is None


@pytest.mark.parametrize("split, concat", [(0, 1), (1, 0), (1, 1), (0, 0)])
def test_all_to_all_tiled(getkey, split, concat):
    x = jax.random.normal(getkey(), (N, 2 * N, 2 * N))

    def body(t):
        return eqpar.all_to_all(
            t, "d", split_axis=split, concat_axis=concat, tiled=True
        )

    for out in run_everywhere(body, x):
        assert_tree_allclose(out, tiled_ref(x, split, concat))


def test_all_to_all_under_parallel(getkey):
    x = jax.random.normal(getkey(), (N, N, 2))
    out = eqpar.Parallel(
        lambda b: eqpar.all_to_all(b[0], "d", split_axis=0, concat_axis=0)[None],
        axis_name="d",
    )(x)
    assert_tree_allclose(out, swap(x))


def test_all_to_all_relays_out_a_sharded_array_on_a_2d_mesh(getkey):
    """A tuple of mesh axes: rows over ("a", "b") become columns over them."""
    mesh = jax.make_mesh((2, 4), ("a", "b"))
    x = jax.random.normal(getkey(), (16, 24))
    f = eqpar.filter_shard_map(
        lambda b: eqpar.all_to_all(
            b, ("a", "b"), split_axis=1, concat_axis=0, tiled=True
        ),
        mesh=mesh,
        in_specs=P(("a", "b")),
        out_specs=P(None, ("a", "b")),
    )
    y = f(x)
    assert_tree_allclose(y, x)
    assert y.sharding.spec == P(None, ("a", "b"))
    ids = eqpar.filter_shard_map(
        lambda: eqpar.axis_index(("a", "b"))[None],
        mesh=mesh,
        in_specs=(),
        out_specs=P(("a", "b")),
    )()
    assert (ids == jnp.arange(8)).all()


def test_all_to_all_gradient_equals_one_devices(getkey):
    """The all-to-all's transpose is the all-to-all back: the gradient through it
    equals the gradient through the same permutation on one device."""
    x = jax.random.normal(getkey(), (N, 2 * N, 3))
    w = jax.random.normal(getkey(), (N, 2 * N, 3))

    def reference(x):
        y = jnp.asarray(x).reshape(N, N, 2, 3).transpose(1, 0, 2, 3).reshape(x.shape)
        return jnp.sum(jnp.sin(y) * w)

    body = lambda t: eqpar.all_to_all(t, "d", split_axis=0, concat_axis=0, tiled=True)  # noqa: E731
    mesh = jax.make_mesh((N,), ("d",), axis_types=(AxisType.Auto,))
    sm = eqpar.filter_shard_map(
        lambda b: body(b[0])[None], mesh=mesh, in_specs=P("d"), out_specs=P("d")
    )
    expected = jax.grad(reference)(x)
    for mapped in (eqpar.filter_vmap(body, axis_name="d"), sm):
        got = jax.grad(lambda x: jnp.sum(jnp.sin(mapped(x)) * w))(x)
        assert_tree_allclose(got, expected, rtol=1e-5)


def test_axis_index_everywhere():
    for out in run_everywhere(
        lambda t: eqpar.axis_index("d") + 0 * t, jnp.zeros(N, jnp.int32)
    ):
        assert (np.asarray(out) == np.arange(N)).all()


def test_all_to_all_errors(getkey):
    with pytest.raises(eqpar.UnboundAxisError):
        eqpar.all_to_all(jnp.ones((8, 2)), "d", split_axis=0, concat_axis=0)
    with pytest.raises(eqpar.UnboundAxisError):
        eqpar.axis_index("d")
    bad = {"w": jnp.ones((N, 12, 2))}
    with pytest.raises(eqpar.AxisSizeError, match=r"\['w'\].*12.*multiple of 8"):
        eqpar.filter_vmap(
            lambda t: eqpar.all_to_all(t, "d", split_axis=0, concat_axis=1, tiled=True),
            axis_name="d",
        )(bad)
    with pytest.raises(eqpar.AxisSizeError, match=r"\['w'\].*equal to 8"):
        eqpar.filter_vmap(
            lambda t: eqpar.all_to_all(t, "d", split_axis=0, concat_axis=1),
            axis_name="d",
        )(bad)
    with pytest.raises(eqpar.SpecError, match="concat_axis=5"):
        eqpar.filter_vmap(
            lambda t: eqpar.all_to_all(t, "d", split_axis=0, concat_axis=5),
            axis_name="d",
        )(jnp.ones((N, N)))
    with pytest.raises(eqpar.SpecError, match="scalar"):
        eqpar.filter_vmap(
            lambda t: eqpar.all_to_all(1.0, "d", split_axis=0, concat_axis=0),
            axis_name="d",
        )(jnp.ones(N))


def test_over_a_vmap_axis_inside_a_typed_shard_map(mesh8):
    """As the other collectives: JAX's replication typing knows only mesh axes, so
    an all-to-all over a vmap axis inside check_vma=True is eqpar's error, and
    fine with check_vma=False; axis_index of the vmap axis is fine in both."""

    def body(b):
        inner = eqpar.filter_vmap(
            lambda r: eqpar.all_to_all(r, "i", split_axis=0, concat_axis=0),
            axis_name="i",
        )
        return inner(b)

    x = jnp.arange(8 * 4 * 4, dtype=jnp.float32).reshape(8 * 4, 4)
    for check_vma in (True, False):
        ids = eqpar.filter_shard_map(
            lambda b: eqpar.filter_vmap(
                lambda r: eqpar.axis_index("i") + 0 * r[0].astype(jnp.int32),
                axis_name="i",
            )(b),
            mesh=mesh8,
            in_specs=P("data"),
            out_specs=P("data"),
            check_vma=check_vma,
        )(x)
        assert (np.asarray(ids) == np.tile(np.arange(4), 8)).all()
    with pytest.raises(eqpar.ReplicationError, match="all_to_all.*check_vma=False"):
        eqpar.filter_shard_map(
            body, mesh=mesh8, in_specs=P("data"), out_specs=P("data")
        )(x)
    out = eqpar.filter_shard_map(
        body, mesh=mesh8, in_specs=P("data"), out_specs=P("data"), check_vma=False
    )(x)
    expected = np.concatenate(
        [np.swapaxes(b, 0, 1) for b in np.split(np.asarray(x), 8)]
    )
    assert_tree_allclose(out, expected)
