"""`eqpar.kernel`: Pallas (interpret mode) and `custom_vjp` kernels under
`filter_shard_map(check_vma=True)`, against single-device references."""

import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax.experimental import pallas as pl
from jax.sharding import AxisType, PartitionSpec as P

import eqpar

from .helpers import assert_tree_allclose


AUTO, EXPLICIT = AxisType.Auto, AxisType.Explicit


# ---------------------------------------------------------------- kernels


def _scale_body(x_ref, w_ref, o_ref):
    # A constant in the body: interpret mode under typing fails on it.
    o_ref[...] = x_ref[...] * w_ref[...] + 1.0


def _mul_body(x_ref, w_ref, o_ref):
    o_ref[...] = x_ref[...] * w_ref[...]


def _elementwise(body, x, w):
    out = jax.ShapeDtypeStruct(x.shape, x.dtype)
    return pl.pallas_call(body, out_shape=out, interpret=True)(x, w)


@jax.custom_vjp
def pallas_scale(x, w):
    """`x * w + 1` (w a `(1, n)` row or x's shape), forward and backward in
    Pallas."""
    return _elementwise(_scale_body, x, jnp.broadcast_to(w, x.shape))


def _scale_fwd(x, w):
    return pallas_scale(x, w), (x, w)


def _scale_bwd(saved, g):
    x, w = saved
    dx = _elementwise(_mul_body, g, jnp.broadcast_to(w, g.shape))
    dw = _elementwise(_mul_body, g, x)
    if w.shape[0] == 1:  # a row broadcast over x's rows
        dw = jnp.sum(dw, axis=0, keepdims=True)
    return dx, dw


pallas_scale.defvjp(_scale_fwd, _scale_bwd)


def _matmul_body(x_ref, w_ref, o_ref):
    o_ref[...] = jnp.dot(x_ref[...], w_ref[...]) * 1.0


def _pallas_matmul_raw(x, w):
    """A row-blocked Pallas matmul: a grid of one row per step (a loop carry in
    interpret mode)."""
    (m, k), n = x.shape, w.shape[1]
    return pl.pallas_call(
        _matmul_body,
        out_shape=jax.ShapeDtypeStruct((m, n), x.dtype),
        grid=(m,),
        in_specs=[
            pl.BlockSpec((1, k), lambda i: (i, 0)),
            pl.BlockSpec((k, n), lambda i: (0, 0)),
        ],
        out_specs=pl.BlockSpec((1, n), lambda i: (i, 0)),
        interpret=True,
    )(x, w)


@jax.custom_vjp
def pallas_matmul(x, w):
    return _pallas_matmul_raw(x, w)


def _matmul_fwd(x, w):
    return pallas_matmul(x, w), (x, w)


def _matmul_bwd(saved, g):
    x, w = saved
    return _pallas_matmul_raw(g, w.T), _pallas_matmul_raw(x.T, g)


pallas_matmul.defvjp(_matmul_fwd, _matmul_bwd)


@jax.custom_vjp
def softplus_linear(x, w):
    """A plain-JAX `custom_vjp` kernel: `softplus(x @ w)`."""
    return jax.nn.softplus(x @ w)


def _softplus_fwd(x, w):
    z = x @ w
    return jax.nn.softplus(z), (x, w, z)


def _softplus_bwd(saved, g):
    x, w, z = saved
    gz = g * jax.nn.sigmoid(z)
    return gz @ w.T, x.T @ gz


softplus_linear.defvjp(_softplus_fwd, _softplus_bwd)


def _scale_ref(x, w):
    return x * w + 1.0


def _matmul_ref(x, w):
    return x @ w


def _softplus_ref(x, w):
    return jax.nn.softplus(x @ w)


# (name, kernel, jnp reference, weight shape from (k, n))
KERNELS = {
    "pallas-elementwise": (pallas_scale, _scale_ref, lambda k, n: (1, k)),
    "pallas-matmul": (pallas_matmul, _matmul_ref, lambda k, n: (k, n)),
    "custom-vjp": (softplus_linear, _softplus_ref, lambda k, n: (k, n)),
}


# ---------------------------------------------------------------- meshes

# (mesh shape, axis names, spec of x's rows): the rows are sharded over the first
# axis, and on the 2-D mesh x is replicated over the second (as in JAX #21855).
MESHES = {
    "1d": ((8,), ("data",), "data"),
    "2d": ((2, 4), ("data", "model"), "data"),
    "2d-both": ((2, 4), ("data", "model"), ("data", "model")),
}


def _mesh(name, axis_type):
    shape, names, _ = MESHES[name]
    return jax.make_mesh(shape, names, axis_types=(axis_type,) * len(names))


def _data(key, rows, k, w_shape):
    kx, kw = jax.random.split(key)
    x = jax.random.normal(kx, (rows, k))
    w = jax.random.normal(kw, w_shape)
    return x, w


def _all_reduces(hlo: str) -> int:
    """How many arrays the compiled program all-reduces: XLA combines several into
    one instruction with a tuple result, so count the arrays in each result type."""
    count = 0
    for result in re.findall(r"= (\(.*?\)|\S+) all-reduce(?:-start)?\(", hlo):
        count += len(re.findall(r"\w+\[[^\]]*\]", result))
    return count


def _grads_program(kern, mesh, rows_spec):
    """Per device: the local loss's gradient with respect to the sharded input and
    the replicated weight (whose gradient autodiff sums over the devices)."""

    def grads(x, w):
        return jax.grad(lambda x, w: jnp.sum(eqpar.kernel(kern)(x, w) ** 2), (0, 1))(
            x, w
        )

    return eqpar.filter_shard_map(
        grads,
        mesh=mesh,
        in_specs=(P(rows_spec), P()),
        out_specs=(P(rows_spec), P()),
    )


# ---------------------------------------------------------------- JAX's failures


def test_pallas_fails_under_typing_without_kernel():
    """What `eqpar.kernel` removes (JAX 0.10.2): a `pallas_call` without a
    hand-filled `manual_axis_type`, and a `custom_vjp` with a replicated input, are
    errors under `check_vma=True`."""
    mesh = _mesh("1d", EXPLICIT)
    x, w = _data(jax.random.key(0), 16, 3, (1, 3))

    raw = eqpar.filter_shard_map(
        lambda x, w: _elementwise(_scale_body, x, jnp.broadcast_to(w, x.shape)),
        mesh=mesh,
        in_specs=(P("data"), P()),
        out_specs=P("data"),
    )
    with pytest.raises(ValueError, match="manual_axis_type"):
        raw(x, w)

    x, w = _data(jax.random.key(0), 16, 3, (3, 2))
    custom = eqpar.filter_shard_map(
        lambda x, w: jax.grad(lambda w: jnp.sum(softplus_linear(x, w)))(w),
        mesh=mesh,
        in_specs=(P("data"), P()),
        out_specs=P(),
    )
    with pytest.raises(ValueError, match="manual axis types do not match"):
        custom(x, w)


# ---------------------------------------------------------------- forward


@pytest.mark.parametrize("axis_type", [AUTO, EXPLICIT], ids=["auto", "explicit"])
@pytest.mark.parametrize("mesh_name", list(MESHES))
@pytest.mark.parametrize("kernel_name", list(KERNELS))
def test_forward_equals_reference(kernel_name, mesh_name, axis_type, getkey):
    kern, ref, w_shape = KERNELS[kernel_name]
    mesh = _mesh(mesh_name, axis_type)
    rows_spec = MESHES[mesh_name][2]
    x, w = _data(getkey(), 16, 3, w_shape(3, 2))
    f = eqpar.filter_shard_map(
        eqpar.kernel(kern),
        mesh=mesh,
        in_specs=(P(rows_spec), P()),
        out_specs=P(rows_spec),
    )
    assert_tree_allclose(f(x, w), ref(x, w), rtol=1e-5, atol=1e-5)
    # One kernel serves the single-device reference: outside a map it is `kern`.
    assert_tree_allclose(eqpar.kernel(kern)(x, w), ref(x, w), rtol=1e-5, atol=1e-5)


def test_output_type_is_the_union_of_the_inputs(getkey):
    """Outputs vary exactly where some input does: a replicated output stays
    replicated (out_specs P() is accepted), a sharded one is sharded."""
    mesh = _mesh("2d", EXPLICIT)
    seen = {}

    def body(x, w):
        both = eqpar.kernel(pallas_matmul)(x, w)
        only_w = eqpar.kernel(pallas_matmul)(w.T, w)
        seen["both"] = eqpar.varying_axes(both)
        seen["only_w"] = eqpar.varying_axes(only_w)
        return both, only_w

    x, w = _data(getkey(), 4, 3, (3, 4))
    f = eqpar.filter_shard_map(
        body,
        mesh=mesh,
        in_specs=(P("data"), P(None, "model")),
        out_specs=(P("data", "model"), P(None, "model")),
    )
    both, only_w = f(x, w)
    assert seen == {
        "both": frozenset({"data", "model"}),
        "only_w": frozenset({"model"}),
    }
    assert_tree_allclose(both, x @ w, atol=1e-5)
    # each `model` device holds its own columns of w: w.T @ w block by block
    blocks = [w[:, j : j + 1].T @ w[:, j : j + 1] for j in range(4)]
    assert_tree_allclose(only_w, jnp.concatenate(blocks, axis=1), atol=1e-5)


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("axis_type", [AUTO, EXPLICIT], ids=["auto", "explicit"])
@pytest.mark.parametrize("mesh_name", list(MESHES))
@pytest.mark.parametrize("kernel_name", list(KERNELS))
def test_gradients_equal_one_device(kernel_name, mesh_name, axis_type, getkey):
    kern, ref, w_shape = KERNELS[kernel_name]
    mesh = _mesh(mesh_name, axis_type)
    rows_spec = MESHES[mesh_name][2]
    x, w = _data(getkey(), 16, 3, w_shape(3, 2))
    program = _grads_program(kern, mesh, rows_spec)
    gx, gw = program(x, w)
    rgx, rgw = jax.grad(lambda x, w: jnp.sum(ref(x, w) ** 2), (0, 1))(x, w)
    assert_tree_allclose((gx, gw), (rgx, rgw), rtol=1e-4, atol=1e-4)

    # The replicated weight's gradient is summed over the devices once: one
    # all-reduce in the whole program (none for x, even where x is replicated over
    # `model` and a kernel output typed as varying over every axis would add one).
    hlo = program.lower(x, w).compile().as_text()
    assert _all_reduces(hlo) == 1, hlo
    assert "all-gather" not in hlo


def test_gradient_of_each_replicated_input_summed_once(getkey):
    """Two replicated weights and one sharded input: two all-reduces, and a weight
    sharded like the input gets none."""
    mesh = _mesh("1d", EXPLICIT)

    @eqpar.kernel
    def two(x, w, b):
        return pallas_scale(x, w) * b

    x, w = _data(getkey(), 16, 3, (1, 3))
    b = jax.random.normal(getkey(), (1, 3))
    loss = lambda x, w, b: jnp.sum(two(x, w, b) ** 2)  # noqa: E731
    ref = lambda x, w, b: jnp.sum(((x * w + 1.0) * b) ** 2)  # noqa: E731

    program = eqpar.filter_shard_map(
        jax.grad(loss, (0, 1, 2)),
        mesh=mesh,
        in_specs=(P("data"), P(), P()),
        out_specs=(P("data"), P(), P()),
    )
    assert_tree_allclose(
        program(x, w, b), jax.grad(ref, (0, 1, 2))(x, w, b), rtol=1e-4, atol=1e-4
    )
    assert _all_reduces(program.lower(x, w, b).compile().as_text()) == 2

    sharded_w = jnp.tile(w, (16, 1))  # one row of w per row of x, sharded like x
    program = eqpar.filter_shard_map(
        jax.grad(loss, (0, 1)),
        mesh=mesh,
        in_specs=(P("data"), P("data"), P()),
        out_specs=(P("data"), P("data")),
    )
    assert _all_reduces(program.lower(x, sharded_w, b).compile().as_text()) == 0
    assert_tree_allclose(
        program(x, sharded_w, b),
        jax.grad(ref, (0, 1))(x, sharded_w, b),
        rtol=1e-4,
        atol=1e-4,
    )


@settings(max_examples=4)  # each example compiles a forward and a gradient program
@given(
    rows=st.integers(1, 3),
    k=st.integers(1, 4),
    n=st.integers(1, 3),
    kernel_name=st.sampled_from(list(KERNELS)),
    mesh_name=st.sampled_from(list(MESHES)),
    axis_type=st.sampled_from([AUTO, EXPLICIT]),
)
def test_shapes_hypothesis(rows, k, n, kernel_name, mesh_name, axis_type):
    kern, ref, w_shape = KERNELS[kernel_name]
    mesh = _mesh(mesh_name, axis_type)
    rows_spec = MESHES[mesh_name][2]
    x, w = _data(jax.random.key(rows * 100 + k * 10 + n), 8 * rows, k, w_shape(k, n))
    out = eqpar.filter_shard_map(
        eqpar.kernel(kern),
        mesh=mesh,
        in_specs=(P(rows_spec), P()),
        out_specs=P(rows_spec),
    )(x, w)
    assert_tree_allclose(out, ref(x, w), rtol=1e-5, atol=1e-5)
    grads = _grads_program(kern, mesh, rows_spec)(x, w)
    expected = jax.grad(lambda x, w: jnp.sum(ref(x, w) ** 2), (0, 1))(x, w)
    assert_tree_allclose(grads, expected, rtol=1e-4, atol=1e-4)


def test_grad_mean_with_a_kernel_in_a_module(getkey):
    """Equinox style: a Module whose `__call__` is a kernel, its replicated weight's
    mean gradient from `eqpar.filter_value_and_grad_mean` equal to one device's."""

    class Dense(eqx.Module):
        w: jax.Array

        @eqpar.kernel
        def __call__(self, x):
            return pallas_matmul(x, self.w)

    x, w = _data(getkey(), 16, 3, (3, 2))
    model = Dense(w)
    mesh = _mesh("1d", EXPLICIT)

    def loss(model, x):
        return jnp.mean(model(x) ** 2)

    step = eqpar.filter_shard_map(
        eqpar.filter_value_and_grad_mean(loss, "data"),
        mesh=mesh,
        in_specs=(P(), P("data")),
        out_specs=P(),
    )
    value, grads = step(model, x)
    ref_value, ref_grads = eqx.filter_value_and_grad(loss)(model, x)
    assert_tree_allclose((value, grads), (ref_value, ref_grads), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- options and passes


def test_untyped_contexts_call_the_function_as_it_is(getkey):
    x, w = _data(getkey(), 16, 3, (3, 2))
    mesh = _mesh("1d", EXPLICIT)
    unchecked = eqpar.filter_shard_map(
        eqpar.kernel(pallas_matmul),
        mesh=mesh,
        in_specs=(P("data"), P()),
        out_specs=P("data"),
        check_vma=False,
    )
    assert_tree_allclose(unchecked(x, w), x @ w, atol=1e-5)
    mapped = eqpar.filter_vmap(eqpar.kernel(pallas_matmul), in_axes=(0, None))
    assert_tree_allclose(mapped(x[:, None], w)[:, 0], x @ w, atol=1e-5)


def test_varying_declares_a_device_dependent_kernel(getkey):
    """A kernel reading `axis_index` from replicated inputs: `varying` says its
    outputs differ between devices, and a non-array output comes back as is."""

    @eqpar.kernel(varying="data")
    def offset(w):
        return w + jax.lax.axis_index("data").astype(w.dtype), "static"

    mesh = _mesh("1d", AUTO)
    w = jax.random.normal(getkey(), (1, 3))
    out, tag = eqpar.filter_shard_map(
        offset, mesh=mesh, in_specs=P(), out_specs=(P("data"), None)
    )(w)
    assert tag == "static"
    assert_tree_allclose(out, w + jnp.arange(8.0)[:, None], atol=1e-6)


def test_integer_inputs_are_not_differentiated(getkey):
    @eqpar.kernel
    def scaled(x, w, n):
        return softplus_linear(x, w) * n.astype(x.dtype)

    x, w = _data(getkey(), 16, 3, (3, 2))
    n = jnp.array(3)
    mesh = _mesh("1d", EXPLICIT)
    gw = eqpar.filter_shard_map(
        jax.grad(lambda w, x, n: jnp.sum(scaled(x, w, n))),
        mesh=mesh,
        in_specs=(P(), P("data"), P()),
        out_specs=P(),
    )(w, x, n)
    assert_tree_allclose(gw, jax.grad(lambda w: jnp.sum(3 * _softplus_ref(x, w)))(w))


# ---------------------------------------------------------------- errors


def test_error_input_varies_beyond_varying(getkey):
    mesh = _mesh("2d", EXPLICIT)
    x, w = _data(getkey(), 4, 4, (4, 4))
    f = eqpar.filter_shard_map(
        eqpar.kernel(pallas_matmul, varying="data"),
        mesh=mesh,
        in_specs=(P("data"), P(None, "model")),
        out_specs=P("data", "model"),
    )
    with pytest.raises(eqpar.ReplicationError, match=r"argument `w`.*\['model'\]"):
        f(x, w)


def test_error_varying_names_an_axis_not_mapped(getkey):
    mesh = _mesh("1d", EXPLICIT)
    x, w = _data(getkey(), 16, 3, (3, 2))
    f = eqpar.filter_shard_map(
        eqpar.kernel(pallas_matmul, varying=("data", "model")),
        mesh=mesh,
        in_specs=(P("data"), P()),
        out_specs=P("data"),
    )
    with pytest.raises(eqpar.MeshError, match=r"\['model'\].*\['data'\]"):
        f(x, w)


def test_error_partial_sum_input(getkey):
    mesh = _mesh("1d", EXPLICIT)
    x, w = _data(getkey(), 16, 3, (3, 2))

    def body(x, w):
        partial = jax.lax.pcast(x, "data", to="unreduced")
        return eqpar.kernel(pallas_matmul)(partial, w)

    f = eqpar.filter_shard_map(
        body, mesh=mesh, in_specs=(P("data"), P()), out_specs=P("data")
    )
    with pytest.raises(eqpar.ReplicationError, match=r"argument `x`.*\['data'\]"):
        f(x, w)


def test_error_bad_options():
    with pytest.raises(eqpar.SpecError, match="not callable"):
        eqpar.kernel(3)  # pyright: ignore
    with pytest.raises(eqpar.SpecError, match="not a name"):
        eqpar.kernel(pallas_matmul, varying=(["data"],))  # pyright: ignore


def test_error_batched_from_outside_and_the_map_inside(getkey):
    """JAX 0.10 cannot batch the cast a kernel starts with: a clear error naming
    the leaf, and the map inside the kernel works, gradients included."""
    mesh = _mesh("1d", EXPLICIT)
    x, w = _data(getkey(), 16, 3, (3, 2))
    xs = x.reshape(16, 1, 3)

    outside = eqpar.filter_shard_map(
        eqpar.filter_vmap(eqpar.kernel(pallas_matmul), in_axes=(0, None)),
        mesh=mesh,
        in_specs=(P("data"), P()),
        out_specs=P("data"),
    )
    with pytest.raises(eqpar.ReplicationError, match=r"argument `x`.*\['data'\]"):
        outside(xs, w)

    inside = eqpar.kernel(jax.vmap(pallas_matmul, in_axes=(0, None)))
    grads = eqpar.filter_shard_map(
        jax.grad(lambda x, w: jnp.sum(inside(x, w) ** 2), (0, 1)),
        mesh=mesh,
        in_specs=(P("data"), P()),
        out_specs=(P("data"), P()),
    )(xs, w)
    expected = jax.grad(lambda x, w: jnp.sum((x @ w) ** 2), (0, 1))(x, w)
    assert_tree_allclose(
        grads, (expected[0].reshape(16, 1, 3), expected[1]), rtol=1e-4, atol=1e-4
    )


def test_partially_manual_mesh(getkey):
    """`filter_shard_map(axis_names={"data"})` on a 2-D mesh: `model` stays
    automatic and the kernel runs over `data` only."""
    mesh = _mesh("2d", EXPLICIT)
    x, w = _data(getkey(), 16, 3, (3, 4))
    program = eqpar.filter_shard_map(
        jax.grad(lambda x, w: jnp.sum(eqpar.kernel(pallas_matmul)(x, w) ** 2), (0, 1)),
        mesh=mesh,
        in_specs=(P("data"), P()),
        out_specs=(P("data"), P()),
        axis_names={"data"},
    )
    expected = jax.grad(lambda x, w: jnp.sum((x @ w) ** 2), (0, 1))(x, w)
    assert_tree_allclose(program(x, w), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernel_name", ["pallas-matmul", "custom-vjp"])
def test_gradient_taken_outside_the_map(kernel_name, getkey):
    """`jax.grad` of a `filter_shard_map` program: the kernel's residuals cross the
    map's boundary per device (none is taken for replicated)."""
    kern, ref, w_shape = KERNELS[kernel_name]
    mesh = _mesh("1d", EXPLICIT)
    x, w = _data(getkey(), 16, 3, w_shape(3, 2))
    f = eqpar.filter_shard_map(
        eqpar.kernel(kern), mesh=mesh, in_specs=(P("data"), P()), out_specs=P("data")
    )
    grads = jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.sin(f(x, w))), (0, 1)))(x, w)
    expected = jax.grad(lambda x, w: jnp.sum(jnp.sin(ref(x, w))), (0, 1))(x, w)
    assert_tree_allclose(grads, expected, rtol=1e-4, atol=1e-4)


def test_gradient_reuses_the_forward_pass(getkey):
    """The kernel's forward rule runs once per gradient (its residuals are saved,
    not recomputed): one trace, and in the compiled program one interpreter loop
    for the forward matmul and one for each backward matmul."""
    fwd_traces = []

    @jax.custom_vjp
    def counted(x, w):
        return _pallas_matmul_raw(x, w)

    def counted_fwd(x, w):
        fwd_traces.append(None)
        return _pallas_matmul_raw(x, w), (x, w)

    counted.defvjp(counted_fwd, _matmul_bwd)
    mesh = _mesh("1d", EXPLICIT)
    x, w = _data(getkey(), 16, 3, (3, 2))
    program = _grads_program(counted, mesh, "data")
    hlo = program.lower(x, w).compile().as_text()
    assert len(fwd_traces) == 1
    assert len(re.findall(r" while\(", hlo)) == 3
    expected = jax.grad(lambda x, w: jnp.sum((x @ w) ** 2), (0, 1))(x, w)
    assert_tree_allclose(program(x, w), expected, rtol=1e-4, atol=1e-4)


def test_closed_over_arrays_are_inputs(getkey):
    """`eqpar.kernel(lambda x: kern(x, w))`: the closed-over weight is typed and
    differentiated like an argument (one all-reduce), a closed-over sharded array
    mixes with a replicated argument, and errors name the closed-over variable."""
    mesh = _mesh("2d", EXPLICIT)
    x, w = _data(getkey(), 16, 3, (3, 4))

    def loss(w, x):
        return jnp.sum(eqpar.kernel(lambda x: pallas_matmul(x, w))(x) ** 2)

    program = eqpar.filter_shard_map(
        jax.grad(loss), mesh=mesh, in_specs=(P(), P("data")), out_specs=P()
    )
    expected = jax.grad(lambda w: jnp.sum((x @ w) ** 2))(w)
    assert_tree_allclose(program(w, x), expected, rtol=1e-4, atol=1e-4)
    assert _all_reduces(program.lower(w, x).compile().as_text()) == 1

    mixed = eqpar.filter_shard_map(
        lambda w, x: eqpar.kernel(lambda w: pallas_matmul(x, w))(w),
        mesh=mesh,
        in_specs=(P(), P("data")),
        out_specs=P("data"),
    )
    assert_tree_allclose(mixed(w, x), x @ w, atol=1e-5)

    declared = eqpar.filter_shard_map(
        lambda w, x: eqpar.kernel(lambda x: pallas_matmul(x, w), varying="data")(x),
        mesh=mesh,
        in_specs=(P(None, "model"), P("data")),
        out_specs=P("data", "model"),
    )
    with pytest.raises(eqpar.ReplicationError, match=r"`w` \(closed over.*'model'"):
        declared(w, x)


def test_no_extra_all_reduce_jax_21855(getkey):
    """On a 2x4 mesh with x sharded over `data` (replicated over `model`) and w
    replicated: casting every input to vary over every axis by hand (what JAX's
    error suggests) all-reduces x's gradient too and counts the loss once per
    `model` device; the kernel's typing all-reduces w's only, and is exact."""
    mesh = _mesh("2d", EXPLICIT)
    x, w = _data(getkey(), 16, 3, (3, 2))
    expected = jax.grad(lambda x, w: jnp.sum(_softplus_ref(x, w) ** 2), (0, 1))(x, w)

    def by_hand(x, w):
        def loss(x, w):
            x = jax.lax.pcast(x, "model", to="varying")
            w = jax.lax.pcast(w, ("data", "model"), to="varying")
            return jnp.sum(softplus_linear(x, w) ** 2)

        return jax.grad(loss, (0, 1))(x, w)

    hand = eqpar.filter_shard_map(
        by_hand, mesh=mesh, in_specs=(P("data"), P()), out_specs=(P("data"), P())
    )
    assert _all_reduces(hand.lower(x, w).compile().as_text()) == 2
    assert_tree_allclose(
        hand(x, w), jax.tree.map(lambda g: 4 * g, expected), rtol=1e-4, atol=1e-4
    )

    typed = _grads_program(softplus_linear, mesh, "data")
    assert _all_reduces(typed.lower(x, w).compile().as_text()) == 1
    assert_tree_allclose(typed(x, w), expected, rtol=1e-4, atol=1e-4)


def test_parallel_with_typing_and_pmap(getkey):
    """`Parallel(check_vma=True)` types like `filter_shard_map`; `filter_pmap` does
    not type, and the kernel is called as it is."""
    x, w = _data(getkey(), 16, 3, (3, 2))
    par = eqpar.Parallel(lambda x: eqpar.kernel(pallas_matmul)(x, w), check_vma=True)
    assert_tree_allclose(par(x), x @ w, atol=1e-5)
    pmapped = eqpar.filter_pmap(
        eqpar.kernel(pallas_matmul), in_axes=(0, None), axis_name="i"
    )
    out = pmapped(x.reshape(8, 2, 3), w)
    assert_tree_allclose(out.reshape(16, 2), x @ w, atol=1e-5)


@given(rows=st.integers(1, 30).filter(lambda r: r % 8))
def test_rows_that_do_not_divide(rows):
    """A batch the devices do not divide is `filter_shard_map`'s clear error, before
    any kernel runs."""
    x, w = np.ones((rows, 3), np.float32), np.ones((3, 2), np.float32)
    f = eqpar.filter_shard_map(
        eqpar.kernel(pallas_matmul),
        mesh=_mesh("1d", EXPLICIT),
        in_specs=(P("data"), P()),
        out_specs=P("data"),
    )
    with pytest.raises(eqpar.AxisSizeError, match=rf"`x`.*size {rows}.*8 devices"):
        f(x, w)
