"""eqpar.fft: distributed FFTs equal to jnp.fft of the whole array, still sharded,
never gathering it (the compiled HLO is read), on 1-D (8) and 2-D (2x4) meshes,
Auto and Explicit, eagerly, under jax.jit and inside filter_shard_map."""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, strategies as st
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from jaxtyping import Array, Complex, Float

import eqpar


MESHES = {  # name -> (shape, axis names)
    "1d": ((8,), ("d",)),
    "2d": ((2, 4), ("a", "b")),
}
LAYOUTS = [  # mesh, spec, shape: slab and pencil
    ("1d", P("d"), (16, 24)),
    ("1d", P(None, "d"), (24, 16)),
    ("1d", P("d"), (8, 4, 16)),
    ("2d", P("a", "b"), (8, 16)),  # pencil: both dimensions split
    ("2d", P(("a", "b")), (16, 8)),  # slab over both mesh axes
    ("2d", P("b", None, "a"), (8, 12, 4)),  # pencil with a whole middle dimension
]
TYPES = [AxisType.Auto, AxisType.Explicit]


def make_mesh(name, axis_type):
    shape, names = MESHES[name]
    return jax.make_mesh(shape, names, axis_types=(axis_type,) * len(names))


def field(key, shape, dtype=jnp.complex64):
    k1, k2 = jax.random.split(key)
    x = jax.lax.complex(jax.random.normal(k1, shape), jax.random.normal(k2, shape))
    return x.astype(dtype)


def place(x, mesh, spec):
    return jax.device_put(x, NamedSharding(mesh, spec))


def same_placement(y, x):
    return y.sharding.is_equivalent_to(x.sharding, x.ndim)


def close(a, b):  # complex64 to 1e-5, relative to the transform's magnitude
    scale = max(float(np.max(np.abs(np.asarray(b)))), 1.0)
    np.testing.assert_allclose(
        np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5 * scale
    )


# ----------------------------------------------------------------------------------
# Equal to jnp.fft, placement kept


@pytest.mark.parametrize("axis_type", TYPES, ids=str)
@pytest.mark.parametrize("mesh_name, spec, shape", LAYOUTS, ids=str)
def test_fftn_equals_jnp_and_keeps_the_placement(
    getkey, axis_type, mesh_name, spec, shape
):
    mesh = make_mesh(mesh_name, axis_type)
    x = field(getkey(), shape)
    xs = place(x, mesh, spec)
    y = eqpar.fft.fftn(xs)
    close(y, jnp.fft.fftn(x))
    assert same_placement(y, xs)
    back = eqpar.fft.ifftn(y)
    close(back, x)
    assert same_placement(back, xs)


@pytest.mark.parametrize(
    "norm, axis_type",
    [
        (None, AxisType.Auto),
        ("backward", AxisType.Explicit),
        ("ortho", AxisType.Auto),
        ("forward", AxisType.Explicit),
    ],
    ids=str,
)
def test_norm_and_single_axes(getkey, norm, axis_type):
    mesh = make_mesh("2d", axis_type)
    x = field(getkey(), (8, 4, 8))
    xs = place(x, mesh, P("a", None, "b"))
    # Along each split dimension, several at once, a whole one, and two by default.
    close(eqpar.fft.fft(xs, axis=0, norm=norm), jnp.fft.fft(x, axis=0, norm=norm))
    close(eqpar.fft.ifft(xs, axis=-1, norm=norm), jnp.fft.ifft(x, axis=-1, norm=norm))
    close(
        eqpar.fft.fftn(xs, axes=(2, 0), norm=norm),
        jnp.fft.fftn(x, axes=(2, 0), norm=norm),
    )
    close(
        eqpar.fft.ifftn(xs, axes=(1,), norm=norm),
        jnp.fft.ifftn(x, axes=(1,), norm=norm),
    )
    close(eqpar.fft.ifft2(xs, norm=norm), jnp.fft.ifft2(x, norm=norm))


@pytest.mark.parametrize("axis_type", TYPES, ids=str)
def test_real_transforms(getkey, axis_type):
    mesh = make_mesh("1d", axis_type)
    x = jax.random.normal(getkey(), (16, 8, 10))
    xs = place(x, mesh, P("d"))
    y = eqpar.fft.rfftn(xs)
    close(y, jnp.fft.rfftn(x))
    assert same_placement(y, xs) and y.shape == (16, 8, 6)
    back = eqpar.fft.irfftn(y, s=(16, 8, 10))
    close(back, x)
    assert back.dtype == jnp.float32 and same_placement(back, xs)
    close(eqpar.fft.rfft(xs), jnp.fft.rfft(x))
    close(eqpar.fft.irfft(eqpar.fft.rfft(xs), n=10), x)
    with pytest.raises(eqpar.SpecError, match="last of its axes.*split over 'd'"):
        eqpar.fft.rfftn(xs, axes=(1, 0))


def test_lengths_along_whole_dimensions(getkey):
    mesh = make_mesh("1d", AxisType.Auto)
    x = field(getkey(), (16, 8))
    xs = place(x, mesh, P("d"))
    close(eqpar.fft.fftn(xs, s=(16, 16)), jnp.fft.fftn(x, s=(16, 16)))
    close(eqpar.fft.fft(xs, n=5), jnp.fft.fft(x, n=5))
    with pytest.raises(eqpar.SpecError, match="length 12 along dimension 0.*split"):
        eqpar.fft.fftn(xs, s=(12, 8))


@example(rows=16, cols=8, axis_type=AxisType.Auto)  # divides
@given(
    rows=st.sampled_from([8, 16, 12, 24]),
    cols=st.sampled_from([8, 16, 6, 4, 1]),
    axis_type=st.sampled_from(TYPES),
)
def test_shapes_that_divide_and_that_do_not(rows, cols, axis_type):
    """Rows split over 8 devices: a transform along them trades places with the
    columns, so the columns must divide too; otherwise an AxisSizeError that says
    what to pad."""
    mesh = make_mesh("1d", axis_type)
    x = field(jax.random.key(rows * 100 + cols), (rows, cols))
    if rows % 8:
        with pytest.raises(eqpar.AxisSizeError, match=f"size {rows} along dimension 0"):
            with jax.set_mesh(mesh):
                eqpar.fft.fftn(x, spec=P("d"))
        return
    xs = place(x, mesh, P("d"))
    if cols % 8:
        with pytest.raises(eqpar.AxisSizeError, match="divisible by 8.*Pad"):
            eqpar.fft.fftn(xs)
        # Along the whole dimension only: no exchange needed.
        close(eqpar.fft.fft(xs, axis=1), jnp.fft.fft(x, axis=1))
        return
    y = eqpar.fft.fftn(xs)
    close(y, jnp.fft.fftn(x))
    close(eqpar.fft.ifftn(y), x)
    assert same_placement(y, xs)


@example(rows=16, cols=8, axis_type=AxisType.Explicit)  # divides
@example(rows=8, cols=12, axis_type=AxisType.Auto)  # the columns' blocks do not
@given(
    rows=st.sampled_from([16, 8, 6, 4]),
    cols=st.sampled_from([16, 8, 12, 6]),
    axis_type=st.sampled_from(TYPES),
)
def test_pencil_shapes_that_divide_and_that_do_not(rows, cols, axis_type):
    """Rows over "a" (2), columns over "b" (4) of a 2 x 4 mesh: each split
    dimension trades places with the other, whose block must divide again."""
    mesh = make_mesh("2d", axis_type)
    x = field(jax.random.key(rows * 100 + cols), (rows, cols))
    with jax.set_mesh(mesh):
        if rows % 2 or cols % 4:
            with pytest.raises(eqpar.AxisSizeError, match="is not a multiple"):
                eqpar.fft.fftn(x, spec=P("a", "b"))
            return
    xs = place(x, mesh, P("a", "b"))
    if (cols // 4) % 2 or (rows // 2) % 4:
        with pytest.raises(eqpar.AxisSizeError, match="divisible by.*Pad"):
            eqpar.fft.fftn(xs)
        return
    y = eqpar.fft.fftn(xs)
    close(y, jnp.fft.fftn(x))
    close(eqpar.fft.ifftn(y), x)
    assert same_placement(y, xs)


# ----------------------------------------------------------------------------------
# Under jax.jit: the HLO has all-to-alls and no all-gather


def hlo(f, *args):
    compiled = jax.jit(f).lower(*args).compile()
    return compiled.as_text(), compiled.memory_analysis()


@pytest.mark.parametrize(
    "mesh_name, spec, shape, exchanges",
    [
        ("1d", P("d"), (64, 64), 2),  # slab: one split axis, there and back
        ("2d", P("a", "b"), (32, 64), 4),  # pencil: two split axes
        ("2d", P(("a", "b")), (64, 32), 2),
    ],
    ids=str,
)
def test_compiled_fftn_never_gathers(getkey, mesh_name, spec, shape, exchanges):
    mesh = make_mesh(mesh_name, AxisType.Explicit)
    x = field(getkey(), shape)
    xs = place(x, mesh, spec)
    with jax.set_mesh(mesh):
        text, memory = hlo(eqpar.fft.fftn, xs)  # the placement is in the type
        y = jax.jit(eqpar.fft.fftn)(xs)
        baseline, _ = hlo(jnp.fft.fftn, xs)
    close(y, jnp.fft.fftn(x))
    assert same_placement(y, xs)
    assert "all-gather" not in text and "all-reduce" not in text
    assert text.count(" all-to-all(") == exchanges, text
    block = x.nbytes // 8
    assert memory.argument_size_in_bytes == block
    assert memory.output_size_in_bytes == block
    assert memory.temp_size_in_bytes <= 3 * block, (memory.temp_size_in_bytes, block)
    assert "all-gather" in baseline  # what eqpar.fft avoids: XLA gathers it all


def test_under_jit_on_auto_axes_with_spec(getkey):
    """Auto axes leave the placement out of a tracer's type: `spec=` says it."""
    mesh = make_mesh("1d", AxisType.Auto)
    x = field(getkey(), (32, 16))
    xs = place(x, mesh, P("d"))
    f = lambda x: eqpar.fft.fftn(x, spec=P("d"))  # noqa: E731
    with jax.set_mesh(mesh):
        text, _ = hlo(f, xs)
        y = jax.jit(f)(xs)
    close(y, jnp.fft.fftn(x))
    assert "all-gather" not in text
    assert text.count(" all-to-all(") == 2
    with pytest.raises(eqpar.MeshError, match="jax.set_mesh"):
        jax.jit(f)(x)


# ----------------------------------------------------------------------------------
# Gradients


@pytest.mark.parametrize("axis_type", TYPES, ids=str)
@pytest.mark.parametrize("mesh_name, spec, shape", [LAYOUTS[0], LAYOUTS[3]], ids=str)
def test_gradients_equal_one_devices(getkey, axis_type, mesh_name, spec, shape):
    mesh = make_mesh(mesh_name, axis_type)
    x = jax.random.normal(getkey(), shape)
    w = jax.random.uniform(getkey(), shape)

    def loss(fftn, x):
        k = fftn(x.astype(jnp.complex64), norm="ortho")
        return jnp.sum(jnp.abs(k) ** 2 * w) + jnp.sum(jnp.real(fftn(k)) * w)

    expected = jax.grad(lambda x: loss(jnp.fft.fftn, x))(x)
    xs = place(x, mesh, spec)
    # Under jax.grad `xs` is a tracer: its type carries the placement on Explicit
    # axes only; on Auto axes `spec=` says it.
    split = functools.partial(
        eqpar.fft.fftn, spec=spec if axis_type == AxisType.Auto else None
    )
    with jax.set_mesh(mesh):  # Explicit axes mix with unplaced `w` under a mesh
        got = jax.jit(jax.grad(lambda x: loss(split, x)))(xs)
        close(got, expected)
        if axis_type == AxisType.Explicit:  # eagerly: the tracer's type says it
            got = jax.grad(lambda x: loss(split, x))(xs)
            close(got, expected)


# ----------------------------------------------------------------------------------
# Inside filter_shard_map: a device's block, given its spec


@pytest.mark.parametrize("check_vma", [True, False])
@pytest.mark.parametrize("mesh_name, spec, shape", LAYOUTS, ids=str)
def test_on_a_block_inside_filter_shard_map(getkey, mesh_name, spec, shape, check_vma):
    mesh = make_mesh(mesh_name, AxisType.Auto)
    x = field(getkey(), shape)
    scale = jax.random.uniform(getkey(), ())  # replicated, mixed with the blocks

    def body(block, scale):
        k = eqpar.fft.fftn(block, spec=spec)
        return k, eqpar.fft.ifftn(k * scale.astype(k.dtype), spec=spec)

    k, back = eqpar.filter_shard_map(
        body, mesh=mesh, in_specs=(spec, P()), out_specs=spec, check_vma=check_vma
    )(x, scale)
    close(k, jnp.fft.fftn(x))
    close(back, x * scale.astype(x.dtype))


def test_inside_a_shard_map_the_spec_is_needed(mesh8):
    f = eqpar.filter_shard_map(
        lambda b: eqpar.fft.fftn(b), mesh=mesh8, in_specs=P("data"), out_specs=P("data")
    )
    with pytest.raises(eqpar.SpecError, match=r"spec=P\('rows'\)"):
        f(jnp.ones((16, 8), jnp.complex64))
    g = eqpar.filter_shard_map(
        lambda b: eqpar.fft.fftn(b, spec=P("rows")),
        mesh=mesh8,
        in_specs=P("data"),
        out_specs=P("data"),
    )
    with pytest.raises(eqpar.SpecError, match=r"names \['rows'\].*not bound"):
        g(jnp.ones((16, 8), jnp.complex64))


def test_under_filter_vmap_it_is_jnp_fft(getkey):
    x = field(getkey(), (4, 8, 6))
    close(eqpar.filter_vmap(eqpar.fft.fftn)(x), jax.vmap(jnp.fft.fftn)(x))
    close(eqpar.fft.fftn(np.asarray(x)), jnp.fft.fftn(x))  # unplaced


# ----------------------------------------------------------------------------------
# Axes by jaxtyping name; pytrees


class Field(eqx.Module):
    u: Complex[Array, "y x"]
    weights: Float[Array, "batch y x"]
    wavelength: float = eqx.field(static=True)


def test_axes_by_dimension_name(getkey):
    mesh = make_mesh("2d", AxisType.Explicit)
    u = field(getkey(), (16, 8))
    wts = field(getkey(), (2, 16, 8))
    model = Field(place(u, mesh, P("a", "b")), place(wts, mesh, P(None, "b", "a")), 0.5)
    out = eqpar.fft.fftn(model, axes=("y",))
    close(out.u, jnp.fft.fftn(u, axes=(0,)))
    close(out.weights, jnp.fft.fftn(wts, axes=(1,)))
    assert out.wavelength == 0.5 and same_placement(out.u, model.u)
    xs = place(wts, mesh, P(None, "a"))
    close(eqpar.fft.fft2(xs, axes=("x", "y"), names="batch y x"), jnp.fft.fft2(wts))
    close(
        eqpar.fft.ifft(xs, axis="y", names=("b", "y", "x")), jnp.fft.ifft(wts, axis=1)
    )
    with pytest.raises(eqpar.SpecError, match=r"'z'.*named \['y', 'x'\]"):
        eqpar.fft.fftn(model, axes=("z",))
    with pytest.raises(eqpar.SpecError, match="no names"):
        eqpar.fft.fftn(xs, axes=("y",))
    with pytest.raises(eqpar.SpecError, match="one name"):
        eqpar.fft.fftn(xs, axes=("y",), names=("y", "x"))


def test_errors_name_the_leaf(getkey):
    mesh = make_mesh("1d", AxisType.Auto)
    tree = {"ok": place(field(getkey(), (8, 8)), mesh, P("d")), "v": None}
    tree["bad"] = place(field(getkey(), (8, 3)), mesh, P("d"))
    with pytest.raises(eqpar.AxisSizeError, match=r"\['bad'\].*shape \(1, 3\)"):
        eqpar.fft.fftn(tree)
    with pytest.raises(eqpar.SpecError, match="axis 2"):
        eqpar.fft.fft(tree["ok"], axis=2)
    with pytest.raises(eqpar.SpecError, match="PartitionSpec"):
        eqpar.fft.fft(tree["ok"], spec="d")
    out = eqpar.fft.fftn({"ok": tree["ok"], "v": None})
    assert out["v"] is None
