"""Model sharding (issue 19): `partition_specs` from jaxtyping dimension names and
path rules, `filter_device_put` eagerly and under a trace, `filter_shard_map` with
`in_specs` read from placements, the re-layout warning, and tensor-parallel and
FSDP training that equal one device, automatic and explicit."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from jaxtyping import Array, Float, Int

import eqpar

from ._future_annotations import Later


MESH = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
EXPLICIT = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)


class Dense(eqx.Module):
    w: Float[Array, "embed hidden"]
    b: Float[Array, " hidden"]
    name: str = eqx.field(static=True)


class Shapes(eqx.Module):
    batched: Float[Array, "*batch hidden"]
    front: Float[Array, "hidden ..."]
    fixed: Float[Array, "3 hidden"]
    labelled: Float[Array, "rows=2 hidden"]
    broadcast: Float[Array, "#embed hidden"]
    anonymous: Float[Array, "_ hidden"]
    symbolic: Float[Array, "hidden+1"]  # noqa: F821
    maybe: Float[Array, "embed hidden"] | None
    count: Int[Array, ""]
    plain: Array
    scale: float


def _dense(hidden=8):
    return Dense(jnp.ones((4, hidden)), jnp.ones(hidden), "dense")


# ----------------------------------------------------------------- partition_specs


def test_dims_name_each_dimension_and_the_rest_is_replicated():
    specs = eqpar.partition_specs(_dense(), dims={"hidden": "model"})
    assert specs.w == P(None, "model") and specs.b == P("model")
    assert specs.name == "dense"  # static fields as they are
    both = eqpar.partition_specs(_dense(), dims={"hidden": "model", "embed": "data"})
    assert both.w == P("data", "model")
    tupled = eqpar.partition_specs(_dense(), dims={"embed": ("data", "model")})
    assert tupled.w == P(("data", "model"), None) and tupled.b == P(None)
    assert eqpar.partition_specs(_dense()).w == P()  # nothing asked: replicated


def test_what_jaxtyping_allows_is_understood():
    s = Shapes(
        batched=jnp.ones((2, 3, 8)),
        front=jnp.ones((8, 2, 3)),
        fixed=jnp.ones((3, 8)),
        labelled=jnp.ones((2, 8)),
        broadcast=jnp.ones((1, 8)),
        anonymous=jnp.ones((5, 8)),
        symbolic=jnp.ones(9),
        maybe=jnp.ones((4, 8)),
        count=jnp.array(3),
        plain=jnp.ones((8, 8)),
        scale=2.0,
    )
    specs = eqpar.partition_specs(
        s, dims={"hidden": "model", "rows": "data", "embed": "data"}
    )
    assert specs.batched == P(None, None, "model")
    assert specs.front == P("model", None, None)
    assert specs.fixed == P(None, "model")
    assert specs.labelled == P("data", "model")
    assert specs.broadcast == P("data", "model")
    assert specs.anonymous == P(None, "model")
    assert specs.symbolic == P(None)
    assert specs.maybe == P("data", "model")
    assert specs.count == P() and specs.plain == P()
    assert specs.scale is None  # a non-array leaf


def test_string_annotations_are_read():
    later = Later(jnp.ones((4, 8)), jnp.ones((2, 8)))
    specs = eqpar.partition_specs(later, dims={"hidden": "model"})
    assert specs.w == P(None, "model") and specs.v == P(None, "model")


def test_path_rules_come_first_and_shard_layers_without_names():
    mlp = eqx.nn.MLP(8, 4, 16, 2, key=jax.random.key(0))
    specs = eqpar.partition_specs(
        mlp,
        paths=[
            (r"layers\[0\]\.weight", P("model", None)),
            (r"layers\[\d\]\.weight", P("data", None)),
        ],
    )
    assert specs.layers[0].weight == P("model", None)  # first match wins
    assert specs.layers[1].weight == specs.layers[2].weight == P("data", None)
    assert specs.layers[0].bias == P()
    dense = eqpar.partition_specs(
        _dense(), dims={"hidden": "model"}, paths=[(r"\.w$", P())]
    )
    assert dense.w == P() and dense.b == P("model")  # paths override dims


def test_an_optimiser_state_gets_its_parameters_specs():
    model = _dense()
    state = optax.adam(1e-3).init(eqx.filter(model, eqx.is_array))
    _, (adam, _) = eqpar.partition_specs((model, state), dims={"hidden": "model"})
    assert adam.mu.w == adam.nu.w == P(None, "model")
    assert adam.mu.b == P("model") and adam.count == P()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(paths="layers"), "sequence of \\(regex, PartitionSpec\\)"),
        (dict(paths=[("w",)]), "pair"),
        (dict(paths=[("w", "model")]), "not a `PartitionSpec`"),
        (dict(paths=[("(", P())]), "not a regular expression"),
        (dict(dims=["hidden"]), "maps jaxtyping dimension names"),
        (dict(dims={1: "model"}), "dimension names \\(strings\\)"),
    ],
)
def test_bad_rules_are_eqpar_errors(kwargs, match):
    with pytest.raises(eqpar.SpecError, match=match):
        eqpar.partition_specs(_dense(), **kwargs)


# ----------------------------------------------------------------- placement


def test_filter_device_put_places_a_spec_tree():
    model = _dense()
    specs = eqpar.partition_specs(model, dims={"hidden": "model"})
    placed = eqpar.filter_device_put(model, specs, mesh=MESH)
    assert placed.w.sharding == NamedSharding(MESH, P(None, "model"))
    assert placed.b.sharding == NamedSharding(MESH, P("model"))
    np.testing.assert_array_equal(placed.w, model.w)


def test_an_indivisible_named_dimension_names_leaf_name_and_sizes():
    model = _dense(hidden=6)
    specs = eqpar.partition_specs(model, dims={"hidden": "model"})
    with pytest.raises(
        eqpar.AxisSizeError,
        match=r"\.w has size 6 along dimension 1 \('hidden'\).*4 devices",
    ):
        eqpar.filter_device_put(model, specs, mesh=MESH)


@pytest.mark.parametrize("mesh", [MESH, EXPLICIT], ids=["auto", "explicit"])
def test_a_model_built_inside_filter_jit_is_born_sharded(mesh):
    @eqpar.filter_jit
    def build(key):
        model = Dense(jax.random.normal(key, (4, 8)), jnp.zeros(8), "d")
        specs = eqpar.partition_specs(model, dims={"hidden": "model"})
        return eqpar.filter_device_put(model, specs, mesh=mesh)

    with jax.set_mesh(mesh):
        built = build(jax.random.key(0))
    assert built.w.sharding.spec == P(None, "model")
    assert built.b.sharding.spec == P("model")
    np.testing.assert_allclose(built.w, jax.random.normal(jax.random.key(0), (4, 8)))
    # Inside the program the constraint is a sharding, not a copy to one device.
    text = build.lower(jax.random.key(0)).as_text() if mesh is MESH else ""
    assert mesh is EXPLICIT or "sharding" in text


def test_explicit_axes_under_a_trace_need_the_mesh_as_context():
    @eqpar.filter_jit
    def build(x):
        return eqpar.filter_device_put(x, P("model"), mesh=EXPLICIT)

    with pytest.raises(eqpar.MeshError, match="jax.set_mesh"):
        build(jnp.ones(8))


# ----------------------------------------------------------------- inferred in_specs


def _tp_forward(model, x):
    """Column-parallel then row-parallel, per device: a psum after the second."""
    h = jax.nn.relu(x @ model.w + model.b[None])
    return eqpar.psum(h.sum(axis=1, keepdims=True), "model")


def _reference_forward(model, x):
    return jax.nn.relu(x @ model.w + model.b[None]).sum(axis=1, keepdims=True)


@pytest.mark.parametrize("mesh", [MESH, EXPLICIT], ids=["auto", "explicit"])
def test_in_specs_left_out_are_read_from_the_placement(mesh):
    model = Dense(jax.random.normal(jax.random.key(0), (4, 8)), jnp.ones(8), "d")
    x = jax.random.normal(jax.random.key(1), (6, 4))
    placed = eqpar.filter_device_put(
        model, eqpar.partition_specs(model, dims={"hidden": "model"}), mesh=mesh
    )
    xs = eqpar.filter_device_put(x, P("data"), mesh=mesh)
    f = eqpar.filter_shard_map(_tp_forward, mesh=mesh, out_specs=P("data"))
    np.testing.assert_allclose(
        f(placed, xs), _reference_forward(model, x), rtol=1e-5, atol=1e-6
    )
    with pytest.raises(eqpar.SpecError, match="argument `x` at \\(root\\)"):
        f(placed, x)  # on one device: no placement on the mesh


def test_in_specs_read_from_types_under_a_trace_on_explicit_axes():
    model = _dense()
    placed = eqpar.filter_device_put(
        model, eqpar.partition_specs(model, dims={"hidden": "model"}), mesh=EXPLICIT
    )
    xs = eqpar.filter_device_put(jnp.ones((6, 4)), P("data"), mesh=EXPLICIT)
    f = eqpar.filter_shard_map(_tp_forward, mesh=EXPLICIT, out_specs=P("data"))
    with jax.set_mesh(EXPLICIT):
        out = eqpar.filter_jit(lambda m, x: f(m, x))(placed, xs)
    np.testing.assert_allclose(out, _reference_forward(model, jnp.ones((6, 4))))


def test_a_sharded_model_gathered_by_its_spec_warns_once_naming_the_leaf():
    model = _dense()
    placed = eqpar.filter_device_put(
        model, eqpar.partition_specs(model, dims={"hidden": "model"}), mesh=MESH
    )
    f = eqpar.filter_shard_map(
        lambda m, x: jax.vmap(lambda r: r @ m.w + m.b)(x),
        mesh=MESH,
        in_specs=(P(), P("data")),
        out_specs=P("data"),
    )
    x = eqpar.filter_device_put(jnp.ones((6, 4)), P("data"), mesh=MESH)
    with pytest.warns(eqpar.EqparWarning, match=r"`m` at \.w: placed as") as record:
        out = f(placed, x)
    assert len(record) == 1 and "`m` at .b" in str(record[0].message)
    np.testing.assert_allclose(out, jnp.ones((6, 4)) @ model.w + model.b[None])
    f(placed, x)  # the gathered copy is kept: no second warning (filterwarnings=error)
    # Slicing a replicated array to the spec moves less: no warning either.
    replicated = eqpar.filter_device_put(jnp.ones((6, 4)), P(), mesh=MESH)
    f(model, replicated)


# ----------------------------------------------------------------- training


class Block(eqx.Module):
    w1: Float[Array, "embed hidden"]
    b1: Float[Array, " hidden"]
    w2: Float[Array, "hidden embed"]
    b2: Float[Array, " embed"]

    def __call__(self, x):
        return jax.nn.gelu(x @ self.w1 + self.b1) @ self.w2 + self.b2


def _block():
    k1, k2 = jax.random.split(jax.random.key(0))
    return Block(
        jax.random.normal(k1, (8, 16)) * 0.3,
        jnp.full(16, 0.1),
        jax.random.normal(k2, (16, 8)) * 0.3,
        jnp.full(8, 0.2),
    )


def _data():
    kx, ky = jax.random.split(jax.random.key(1))
    return jax.random.normal(kx, (32, 8)), jax.random.normal(ky, (32, 8))


def _loss(model, x, y):
    return jnp.mean((jax.vmap(model)(x) - y) ** 2)


def _tp_loss(model, x, y):
    h = jax.nn.gelu(x @ model.w1 + model.b1[None])
    return jnp.mean((eqpar.psum(h @ model.w2, "model") + model.b2[None] - y) ** 2)


def _fsdp_loss(model, x, y):
    whole = jax.tree.map(lambda a: jax.lax.all_gather(a, "data", tiled=True), model)
    return _loss(whole, x, y)


TP = dict(dims={"hidden": "model"})
FSDP = dict(paths=[(r"\.(w|b)\d", P("data"))])


@pytest.mark.parametrize("rules, loss", [(TP, _tp_loss), (FSDP, _fsdp_loss)])
def test_explicit_gradients_equal_one_devices(rules, loss):
    """No 1/n or n-fold factor hides in `filter_value_and_grad_mean` for parameters
    sharded over the data axis (FSDP) or over another one (tensor parallel)."""
    model, (x, y) = _block(), _data()
    ref_loss, ref_grads = eqx.filter_value_and_grad(_loss)(model, x, y)
    specs = eqpar.partition_specs(model, **rules)
    placed = eqpar.filter_device_put(model, specs, mesh=EXPLICIT)
    xs, ys = eqpar.filter_device_put((x, y), P("data"), mesh=EXPLICIT)
    step = eqpar.filter_shard_map(
        eqpar.filter_value_and_grad_mean(loss, "data"),
        mesh=EXPLICIT,
        out_specs=(P(), specs),
    )
    value, grads = step(placed, xs, ys)
    np.testing.assert_allclose(value, ref_loss, rtol=1e-6)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)
    for g, s in zip(jax.tree.leaves(grads), jax.tree.leaves(specs)):
        assert _same(g.sharding.spec, s, g.ndim)  # each device holds its shard


def _same(a, b, ndim):
    def pad(s):
        return tuple(s) + (None,) * (ndim - len(s))

    return pad(a) == pad(b)


def _adam_reference(model, x, y, steps):
    opt = optax.adam(1e-2)
    state = opt.init(model)
    for _ in range(steps):
        grads = jax.grad(_loss)(model, x, y)
        updates, state = opt.update(grads, state, model)
        model = optax.apply_updates(model, updates)
    return model


@pytest.mark.parametrize("rules", [TP, FSDP], ids=["tensor", "fsdp"])
@jax.numpy_dtype_promotion("standard")  # as optax needs
def test_automatic_training_equals_one_device_and_stays_sharded(rules):
    model, (x, y) = _block(), _data()
    opt = optax.adam(1e-2)
    state = opt.init(model)
    specs = eqpar.partition_specs((model, state), **rules)
    model_s, state_s = eqpar.filter_device_put((model, state), specs, mesh=MESH)
    xs, ys = eqpar.filter_device_put((x, y), P("data"), mesh=MESH)

    @eqpar.filter_jit
    def step(model, state, x, y):
        grads = eqx.filter_grad(_loss)(model, x, y)
        updates, state = opt.update(grads, state, model)
        new = (eqx.apply_updates(model, updates), state)
        return eqpar.filter_device_put(new, specs, mesh=MESH)

    for _ in range(5):
        model_s, state_s = step(model_s, state_s, xs, ys)
    ref = _adam_reference(model, x, y, 5)
    for a, b in zip(jax.tree.leaves(model_s), jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    placed = jax.tree.leaves((model_s, state_s))
    wanted = jax.tree.leaves(specs)
    assert len(placed) == len(wanted)
    assert all(_same(a.sharding.spec, s, a.ndim) for a, s in zip(placed, wanted))


def test_a_name_jaxtyping_does_not_check_still_names_its_dimension():
    class Quiet(eqx.Module):
        w: Float[Array, "embed _hidden"]

    specs = eqpar.partition_specs(Quiet(jnp.ones((4, 8))), dims={"hidden": "model"})
    assert specs.w == P(None, "model")
