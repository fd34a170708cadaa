"""Pipeline parallelism (issue 23, item 6): `eqpar.pipeline` runs a stack of layers
as stages over a mesh axis with a GPipe schedule. Outputs and gradients (after
several optimiser steps) equal the sequential fold over the unstacked layers on one
device; each device holds only its own stage's layers; the compiled step gathers no
stack; the block is traced once; bad input gets eqpar's errors."""

import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st
from jax.sharding import AxisType, PartitionSpec as P
from jaxtyping import Array, Float

import eqpar

from .helpers import assert_tree_allclose, TraceCounter


def _mesh(shape, names):
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape))


STAGES4 = _mesh((4,), ("stage",))
STAGES8 = _mesh((8,), ("stage",))
GRID = _mesh((2, 4), ("data", "stage"))
D = 8


class Block(eqx.Module):
    """A residual MLP block on a batch of rows."""

    w1: Float[Array, "embed hidden"]
    b1: Float[Array, " hidden"]
    w2: Float[Array, "hidden embed"]
    scale: float = eqx.field(static=True)

    def __init__(self, key, embed=D, hidden=2 * D, scale=0.5):
        k1, k2, k3 = jax.random.split(key, 3)
        self.w1 = jax.random.normal(k1, (embed, hidden)) / embed**0.5
        self.b1 = 0.1 * jax.random.normal(k2, (hidden,))
        self.w2 = jax.random.normal(k3, (hidden, embed)) / hidden**0.5
        self.scale = scale

    def __call__(self, h: Float[Array, "batch embed"]) -> Float[Array, "batch embed"]:
        return h + self.scale * jnp.tanh(h @ self.w1 + self.b1[None]) @ self.w2


def _stack(layers, seed=0, hidden=2 * D):
    keys = jax.random.split(jax.random.key(seed), layers)
    return eqx.filter_vmap(lambda k: Block(k, hidden=hidden))(keys)


def _layer(stack, i):
    return jax.tree.map(lambda a: a[i] if eqx.is_array(a) else a, stack)


def _fold(stack, x):
    """The reference: the unstacked layers, one after another, on one device."""
    layers = jax.tree.leaves(stack)[0].shape[0]
    for i in range(layers):
        x = _layer(stack, i)(x)
    return x


def _inputs(batch, seed=1):
    return jax.random.normal(jax.random.key(seed), (batch, D))


def _place(stack, x, mesh):
    batch = P("data") if "data" in mesh.axis_names else P()
    return (
        eqpar.filter_device_put(stack, P("stage"), mesh=mesh),
        eqpar.filter_device_put(x, batch, mesh=mesh),
    )


# ---------------------------------------------------------------- outputs


@pytest.mark.parametrize(
    "mesh", [STAGES4, STAGES8, GRID], ids=["4 stages", "8 stages", "2x4"]
)
def test_output_equals_the_sequential_fold(mesh):
    stack, x = _stack(8), _inputs(16)
    placed, xp = _place(stack, x, mesh)
    y = eqpar.pipeline(placed, xp, microbatches=4)
    assert_tree_allclose(y, _fold(stack, x))
    assert y.sharding.spec == xp.sharding.spec  # the batch stays where it was


def test_gradient_with_respect_to_the_input_equals_the_folds():
    stack, x = _stack(8), _inputs(16)
    placed, xp = _place(stack, x, GRID)
    cot = jnp.cos(x)  # a cotangent unlike the output, so that rows differ

    def loss(forward, s, x):
        return jnp.sum(forward(s, x) * cot)

    def piped(s, x):  # tracers carry no placement on Auto axes: say where
        return eqpar.pipeline(s, x, microbatches=4, mesh=GRID, data_axis="data")

    grads = jax.grad(loss, argnums=(1, 2))(piped, placed, xp)
    ref = jax.grad(loss, argnums=(1, 2))(_fold, stack, x)
    assert_tree_allclose(grads, ref)
    assert grads[1].sharding.spec == P("data")
    y = jax.jit(piped)(placed, xp)  # data parallel inside jit too
    assert y.sharding.spec == P("data")
    assert_tree_allclose(y, _fold(stack, x))


@settings(max_examples=5)  # each example compiles a pipeline
@given(
    per_stage=st.integers(1, 3),
    microbatches=st.sampled_from([1, 2, 3, 4, 8]),
    rows=st.integers(1, 2),
)
def test_any_depth_and_microbatch_count_equals_the_fold(per_stage, microbatches, rows):
    stack = _stack(4 * per_stage, seed=per_stage)
    x = _inputs(2 * microbatches * rows, seed=microbatches)
    placed, xp = _place(stack, x, GRID)
    y = eqpar.pipeline(placed, xp, microbatches=microbatches)
    assert_tree_allclose(y, _fold(stack, x))


def test_a_function_per_layer_and_a_pytree_of_activations():
    # Per-example Modules (eqx.nn.Linear) through `fn`; the activations a tuple
    # of two arrays and a static string that `fn` sees as it is.
    keys = jax.random.split(jax.random.key(3), 4)
    stack = eqx.filter_vmap(lambda k: eqx.nn.Linear(D, D, key=k))(keys)

    def fn(layer, h):
        a, b, tag = h
        assert tag == "tag"
        a = jnp.tanh(jax.vmap(layer)(a) + b)
        return a, b * 0.5, tag

    x = (_inputs(8), _inputs(8, seed=2), "tag")
    y = eqpar.pipeline(stack, x, fn=fn, microbatches=2, mesh=STAGES4)
    ref = x
    for i in range(4):
        ref = fn(_layer(stack, i), ref)
    assert_tree_allclose(y, ref)


def test_inside_filter_shard_map_with_data_parallel_gradients():
    stack, x = _stack(8), _inputs(16)

    def loss(stack, x):
        return jnp.mean(eqpar.pipeline(stack, x, microbatches=2) ** 2)

    @eqpar.filter_shard_map(
        mesh=GRID, in_specs=(P("stage"), P("data")), out_specs=(P(), P("stage"))
    )
    def step(stack, x):
        return eqpar.filter_value_and_grad_mean(loss, "data")(stack, x)

    value, grads = step(stack, x)
    ref_value, ref_grads = eqx.filter_value_and_grad(
        lambda s, x: jnp.mean(_fold(s, x) ** 2)
    )(stack, x)
    assert_tree_allclose(value, ref_value)
    assert_tree_allclose(grads, ref_grads)
    assert grads.w1.sharding.spec == P("stage")


def test_a_stage_axis_bound_by_filter_vmap():
    # Any binding of the axis name runs the schedule: here 4 vmapped "stages",
    # each given its own layers (the stack reshaped to stages x layers).
    stack, x = _stack(8), _inputs(8)
    staged = jax.tree.map(
        lambda a: a.reshape(4, 2, *a.shape[1:]) if eqx.is_array(a) else a, stack
    )
    y = eqpar.filter_vmap(
        lambda s: eqpar.pipeline(s, x, microbatches=4),
        axis_name="stage",
    )(staged)
    for i in range(4):  # every stage returns the whole output
        assert_tree_allclose(y[i], _fold(stack, x))


def test_check_vma_off_gives_the_forward_result():
    stack, x = _stack(4), _inputs(8)
    y = eqpar.filter_shard_map(
        lambda s, x: eqpar.pipeline(s, x, microbatches=2),
        mesh=STAGES4,
        in_specs=(P("stage"), P()),
        out_specs=P(),
        check_vma=False,
    )(stack, x)
    assert_tree_allclose(y, _fold(stack, x))


def test_explicit_mesh_under_jit_reads_the_batch_axes_from_the_types():
    mesh = jax.make_mesh((2, 4), ("data", "stage"), axis_types=(AxisType.Explicit,) * 2)
    stack, x = _stack(4), _inputs(8)
    placed, xp = _place(stack, x, mesh)

    def loss(s, x):
        return jnp.mean(eqpar.pipeline(s, x, microbatches=2) ** 2)

    with jax.set_mesh(mesh):  # the mesh and x's split come from the context
        value, grads = jax.jit(lambda s, x: eqx.filter_value_and_grad(loss)(s, x))(
            placed, xp
        )
        y = jax.jit(lambda s, x: eqpar.pipeline(s, x, microbatches=2))(placed, xp)
    ref_value, ref_grads = eqx.filter_value_and_grad(
        lambda s, x: jnp.mean(_fold(s, x) ** 2)
    )(stack, x)
    assert_tree_allclose((value, grads), (ref_value, ref_grads))
    assert y.sharding.spec == P("data", None)
    assert grads.w1.sharding.spec == P("stage", None, None)


# ---------------------------------------------------------------- training


@pytest.mark.parametrize("mesh", [STAGES4, GRID], ids=["4 stages", "2x4"])
def test_training_equals_the_fold_after_several_adam_steps(mesh):
    stack, x = _stack(8), _inputs(16)
    target = jnp.sin(x)
    optimiser = optax.adam(1e-2)

    def make_step(forward, place):
        def step(stack, state, x, target):
            loss = lambda s: jnp.mean((forward(s, x) - target) ** 2)  # noqa: E731
            value, grads = eqx.filter_value_and_grad(loss)(stack)
            updates, state = optimiser.update(grads, state, stack)
            return place(eqx.apply_updates(stack, updates)), state, value, grads

        return jax.jit(step)

    data = "data" if "data" in mesh.axis_names else None
    piped = make_step(
        lambda s, x: eqpar.pipeline(s, x, microbatches=4, mesh=mesh, data_axis=data),
        lambda s: eqpar.filter_device_put(s, P("stage"), mesh=mesh),
    )
    folded = make_step(_fold, lambda s: s)
    params, xp = _place(stack, x, mesh)
    tp = eqpar.filter_device_put(target, xp.sharding.spec, mesh=mesh)
    ref = stack
    with jax.numpy_dtype_promotion("standard"):  # optax's int32 step count
        state = optimiser.init(eqx.filter(params, eqx.is_array))
        ref_state = optimiser.init(eqx.filter(ref, eqx.is_array))
        for _ in range(4):
            params, state, value, grads = piped(params, state, xp, tp)
            ref, ref_state, ref_value, ref_grads = folded(ref, ref_state, x, target)
            assert_tree_allclose(value, ref_value, rtol=1e-5, atol=1e-5)
            assert_tree_allclose(grads, ref_grads, rtol=1e-5, atol=1e-5)
    assert_tree_allclose(params, ref, rtol=1e-5, atol=1e-5)
    assert grads.w1.sharding.spec == P("stage")  # gradients stay with their stage


# ---------------------------------------------------------------- placement


def _stage_of(device, mesh):
    (position,) = zip(*np.nonzero(mesh.devices == device))
    return int(position[list(mesh.axis_names).index("stage")])


def test_each_device_holds_only_its_stages_layers_and_nothing_is_gathered():
    layers, stages = 8, GRID.shape["stage"]
    per_stage = layers // stages
    stack, x = _stack(layers, hidden=256), _inputs(16)  # parameters dominate
    params, xp = _place(stack, x, GRID)

    def loss(s, x):
        return jnp.mean(eqpar.pipeline(s, x, microbatches=4, mesh=GRID) ** 2)

    grad = jax.jit(lambda s, x: eqx.filter_grad(loss)(s, x))
    grads = grad(params, xp)
    for tree in (params, grads):
        for leaf in jax.tree.leaves(eqx.filter(tree, eqx.is_array)):
            for shard in leaf.addressable_shards:
                stage = _stage_of(shard.device, GRID)
                assert shard.index[0] == slice(
                    stage * per_stage, (stage + 1) * per_stage
                )
                assert shard.data.shape[0] == per_stage
                np.testing.assert_array_equal(
                    shard.data,
                    np.asarray(leaf)[stage * per_stage : (stage + 1) * per_stage],
                )

    compiled = grad.lower(params, xp).compile()
    text = compiled.as_text()
    stack_shapes = {
        f"[{','.join(map(str, a.shape))}]"
        for a in jax.tree.leaves(eqx.filter(stack, eqx.is_array))
    }
    gathered = re.findall(r"= \w+(\[[\d,]*\])\{[^}]*\} all-gather\(", text)
    assert not stack_shapes & set(gathered), gathered
    # Stages pass activations with collective-permutes (forward and backward).
    assert "collective-permute" in text
    stats = compiled.memory_analysis()
    stack_bytes = sum(
        a.nbytes for a in jax.tree.leaves(eqx.filter(stack, eqx.is_array))
    )
    # Each device's arguments: its stage's quarter of the stack and its half of
    # the batch (plus a little); never the whole stack.
    assert stats.argument_size_in_bytes <= stack_bytes / stages + x.nbytes
    # Temporaries: the stage's gradients being summed over the steps and a step's
    # recomputed activations (the stage is rematerialised), never a stack's worth.
    assert stats.temp_size_in_bytes < stack_bytes


def test_the_block_is_traced_once_whatever_the_depth():
    for layers in (4, 16):
        stack, x = _stack(layers), _inputs(8)
        counter = TraceCounter(lambda layer, h: layer(h))
        eqpar.pipeline(stack, x, fn=counter, microbatches=2, mesh=STAGES4)
        assert counter.count == 1, (layers, counter.count)


# ---------------------------------------------------------------- errors


def test_layers_must_divide_over_the_stages():
    with pytest.raises(eqpar.AxisSizeError, match=r"6 layers.*\.w1.*multiple of 4"):
        eqpar.pipeline(_stack(6), _inputs(8), microbatches=2, mesh=STAGES4)


def test_microbatches_must_divide_the_batch_per_device():
    stack, x = _place(_stack(4), _inputs(12), GRID)
    with pytest.raises(eqpar.AxisSizeError, match=r"12 rows.*6 rows each.*of 8"):
        eqpar.pipeline(stack, x, microbatches=4)
    for bad in (0, 2.0, True):
        with pytest.raises(eqpar.SpecError, match="microbatches"):
            eqpar.pipeline(stack, x, microbatches=bad)


def test_leaves_that_disagree_on_the_layer_axis_are_named():
    stack = _stack(4)
    stack = eqx.tree_at(lambda s: s.b1, stack, jnp.zeros((2, 2 * D)))
    with pytest.raises(eqpar.AxisSizeError, match=r"\.b1: shape \(2, 16\)"):
        eqpar.pipeline(stack, _inputs(8), microbatches=2, mesh=STAGES4)


def test_a_layer_that_changes_the_activations_shape_is_refused():
    fn = lambda layer, h: layer(h)[:, :4]  # noqa: E731
    with pytest.raises(eqpar.SpecError, match="unlike its input"):
        eqpar.pipeline(_stack(4), _inputs(8), fn=fn, microbatches=2, mesh=STAGES4)


def test_stage_axis_and_mesh_problems():
    with pytest.raises(eqpar.MeshError, match="'layers'.*not an axis"):
        eqpar.pipeline(
            _stack(4), _inputs(8), microbatches=2, stage_axis="layers", mesh=STAGES4
        )
    with pytest.raises(eqpar.MeshError, match="no `mesh=`"):
        eqpar.pipeline(_stack(4), _inputs(8), microbatches=2)
    x = eqpar.filter_device_put(_inputs(8), P("stage"), mesh=STAGES4)
    with pytest.raises(eqpar.SpecError, match="split over the stage axis"):
        eqpar.pipeline(_stack(4), x, microbatches=2, mesh=STAGES4)
    with pytest.raises(eqpar.SpecError, match="includes the stage axis"):
        eqpar.pipeline(
            _stack(4), _inputs(8), microbatches=2, data_axis="stage", mesh=GRID
        )
    with pytest.raises(eqpar.MeshError, match=r"names \['batch'\]"):
        eqpar.pipeline(
            _stack(4), _inputs(8), microbatches=2, data_axis="batch", mesh=GRID
        )
    keys = jax.random.split(jax.random.key(0), 4)
    linears = eqx.filter_vmap(lambda k: eqx.nn.Lambda(jnp.tanh))(keys)
    with pytest.raises(eqpar.SpecError, match="no array leaves"):
        eqpar.pipeline(linears, _inputs(8), microbatches=2, mesh=STAGES4)
    with pytest.raises(eqpar.SpecError, match="not callable"):
        eqpar.pipeline({"w": jnp.ones((4, D))}, _inputs(8), microbatches=2)


def test_inside_filter_shard_map_a_replicated_stack_or_a_split_input_is_refused():
    stack, x = _stack(4), _inputs(8)
    run = lambda specs: eqpar.filter_shard_map(  # noqa: E731
        lambda s, x: eqpar.pipeline(s, x, microbatches=2),
        mesh=STAGES4,
        in_specs=specs,
        out_specs=P(),
    )(stack, x)
    with pytest.raises(eqpar.SpecError, match=r"\.w1 is the same on every stage"):
        run((P(), P()))  # every stage would run all 4 layers
    with pytest.raises(eqpar.SpecError, match="split over the stage axis 'stage'"):
        run((P("stage"), P("stage")))


def test_a_stacked_module_is_pipelined_as_its_layers():
    """An `eqpar.Stacked`, sharded over the stage axis by its own layer-axis name,
    is pipelined as its layers: equal to its own fold and to the unstacked layers,
    each device holding only its stage's layers."""
    stacked = eqpar.Stacked(_stack(8))
    specs = eqpar.partition_specs(stacked, dims={"layers": "stage"})
    placed = eqpar.filter_device_put(stacked, specs, mesh=STAGES4)
    assert placed.layers.w1.addressable_shards[0].data.shape == (2, D, 2 * D)
    x = _inputs(16)
    out = eqpar.pipeline(placed, x, microbatches=4, mesh=STAGES4)
    assert_tree_allclose(out, stacked.fold(x), rtol=1e-5, atol=1e-5)
    assert_tree_allclose(out, _fold(stacked.layers, x), rtol=1e-5, atol=1e-5)
