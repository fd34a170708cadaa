"""The placement cache never changes a result: unchanged inputs are placed once;
anything that changed (a mutated NumPy array, a deleted or donated source, another
mesh, a list inside a Module) is placed or flattened afresh; memory goes with the
Module; the byte bound and the off switch hold."""

import gc
import weakref

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import eqpar
from eqpar import _placement_cache

from .helpers import TraceCounter


N = 8


@pytest.fixture(autouse=True)
def fresh_cache():
    bound = eqpar.placement_cache().max_bytes
    eqpar.placement_cache(clear=True)
    yield
    eqpar.placement_cache(max_bytes=bound, clear=True)


def _mesh(devices=None, name="data"):
    devices = jax.devices() if devices is None else devices
    return jax.sharding.Mesh(np.array(devices), (name,), axis_types=(AxisType.Auto,))


def _model(seed=0):
    return eqx.nn.MLP(4, 3, 8, 1, key=jax.random.key(seed))


def _batch(seed=1):
    return jax.random.normal(jax.random.key(seed), (N, 2, 4))


def _ref(model, x):
    return jax.vmap(jax.vmap(model))(x)


def _pmap():
    return eqpar.filter_pmap(lambda m, x: jax.vmap(m)(x), in_axes=(None, 0))


def _shard_map(mesh):
    return eqpar.filter_shard_map(
        lambda m, x: jax.vmap(m)(x),
        mesh=mesh,
        in_specs=(P(), P("data")),
        out_specs=P("data"),
    )


def _copies_of(array):
    source = _placement_cache._sources.get(id(array))
    if source is None or source.ref() is not array:
        return {}
    return dict(source.copies)


def test_unplaced_module_is_placed_once_and_results_match():
    model, x = _model(), _batch()
    f = _pmap()
    out1 = f(model, x)
    info1 = eqpar.placement_cache()
    out2 = f(model, x)
    out3 = f(model, x)
    info3 = eqpar.placement_cache()
    np.testing.assert_allclose(out1, _ref(model, x), rtol=1e-6, atol=1e-6)
    assert (np.asarray(out1) == np.asarray(out2)).all()
    assert (np.asarray(out1) == np.asarray(out3)).all()
    assert info1.copies > 0 and info3.copies == info1.copies
    assert info3.misses == info1.misses  # nothing copied again
    weight = model.layers[0].weight
    (copy,) = _copies_of(weight).values()
    assert copy.copy.sharding.is_fully_replicated
    assert len(copy.copy.sharding.device_set) == N


@pytest.mark.parametrize("cached", [True, False])
def test_results_equal_uncached_calls_for_every_placing_transform(cached):
    if not cached:
        eqpar.placement_cache(max_bytes=0)
    model, x = _model(), _batch()
    flat = x.reshape(N * 2, 4)
    mesh = _mesh()
    parallel = eqpar.Parallel(lambda m, x: jax.vmap(m)(x), mesh=mesh, in_axes=(None, 0))
    ref = _ref(model, x)
    for _ in range(3):
        np.testing.assert_allclose(_pmap()(model, x), ref, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(
            _shard_map(mesh)(model, flat), ref.reshape(N * 2, 3), rtol=1e-6, atol=1e-6
        )
        np.testing.assert_allclose(
            parallel(model, flat), ref.reshape(N * 2, 3), rtol=1e-6, atol=1e-6
        )
    assert (eqpar.placement_cache().copies > 0) == cached


def test_mutated_numpy_source_is_never_served_stale():
    class Scaled(eqx.Module):
        w: np.ndarray

        def __call__(self, x):
            return x * self.w

    w = np.ones(4, np.float32)
    model = Scaled(w)
    f = eqpar.filter_pmap(lambda m, x: m(x), in_axes=(None, 0))
    x = jnp.ones((N, 4))
    np.testing.assert_array_equal(f(model, x), np.ones((N, 4)))
    w[:] = 3.0  # the same Module object, its NumPy leaf changed in place
    np.testing.assert_array_equal(f(model, x), np.full((N, 4), 3.0))
    w[1] = -1.0
    g = eqpar.filter_jit(lambda m, x: m(x))  # the flatten-once path too
    g(model, x[0])
    w[2] = 7.0
    np.testing.assert_array_equal(g(model, x[0]), np.asarray([3.0, -1.0, 7.0, 3.0]))
    assert _copies_of(w) == {}


def test_deleted_source_gets_no_stale_copy():
    model, x = _model(), _batch()
    f = _pmap()
    f(model, x)
    f(model, x)
    weight = model.layers[0].weight
    assert _copies_of(weight)
    weight.delete()
    with pytest.raises(RuntimeError, match="deleted"):
        f(model, x)
    # A new Module with new arrays (same structure) is placed afresh and correct.
    fresh = _model(seed=3)
    np.testing.assert_allclose(f(fresh, x), _ref(fresh, x), rtol=1e-6, atol=1e-6)


def test_donated_source_gets_no_stale_copy():
    model, x = _model(), _batch()
    f = _pmap()
    f(model, x)
    f(model, x)
    params, static = eqx.partition(model, eqx.is_array)
    updated = jax.jit(lambda p: jax.tree.map(lambda a: a + 1.0, p), donate_argnums=0)(
        params
    )
    assert model.layers[0].weight.is_deleted()
    with pytest.raises(RuntimeError, match="deleted"):
        f(model, x)
    new_model = eqx.combine(updated, static)
    np.testing.assert_allclose(
        f(new_model, x), _ref(new_model, x), rtol=1e-6, atol=1e-6
    )


def test_a_different_mesh_gets_its_own_placement():
    model = _model()
    x = jax.random.normal(jax.random.key(1), (16, 4))
    devices = jax.devices()
    mesh_a = _mesh(devices)
    mesh_b = _mesh(devices[::-1])
    mesh_c = _mesh(devices[:4])
    ref = jax.vmap(model)(x)
    for mesh in (mesh_a, mesh_b, mesh_c, mesh_a):
        out = _shard_map(mesh)(model, x)
        np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
        assert out.sharding.mesh == mesh
    copies = _copies_of(model.layers[0].weight)
    assert {c.copy.sharding.mesh for c in copies.values()} == {mesh_a, mesh_b, mesh_c}


def test_memory_is_released_when_the_module_is_dropped():
    f = _pmap()
    x = _batch()
    before = eqpar.placement_cache()
    model = _model()
    f(model, x)
    f(model, x)
    during = eqpar.placement_cache()
    assert during.bytes > before.bytes
    copy = next(iter(_copies_of(model.layers[0].weight).values())).copy
    copy_ref, model_ref = weakref.ref(copy), weakref.ref(model)
    del model, copy, x  # the batch was unplaced too: its copy goes with it
    gc.collect()
    assert model_ref() is None
    assert copy_ref() is None
    assert eqpar.placement_cache().bytes == before.bytes


def test_byte_bound_evicts_oldest_first():
    f = _pmap()
    x = _batch()
    first = _model(0)
    f(first, x)
    one_model = eqpar.placement_cache().bytes
    eqpar.placement_cache(max_bytes=one_model)
    second = _model(1)
    out = f(second, x)
    info = eqpar.placement_cache()
    assert info.bytes <= one_model
    assert _copies_of(second.layers[-1].bias)  # the newest stays
    assert not _copies_of(first.layers[0].weight)  # the oldest went
    np.testing.assert_allclose(out, _ref(second, x), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(f(first, x), _ref(first, x), rtol=1e-6, atol=1e-6)
    assert eqpar.placement_cache().bytes <= one_model


def test_off_switch_keeps_nothing():
    f = _pmap()
    model, x = _model(), _batch()
    f(model, x)
    assert eqpar.placement_cache().copies > 0
    eqpar.placement_cache(max_bytes=0)
    assert eqpar.placement_cache().copies == 0
    for _ in range(3):
        np.testing.assert_allclose(f(model, x), _ref(model, x), rtol=1e-6, atol=1e-6)
    info = eqpar.placement_cache()
    assert info.copies == 0 and info.bytes == 0


def test_bad_bound_is_refused():
    with pytest.raises(ValueError, match="max_bytes"):
        eqpar.placement_cache(max_bytes=-1)


def test_a_list_inside_a_module_is_flattened_every_call():
    class Holder(eqx.Module):
        items: list

    holder = Holder([jnp.ones(2), jnp.ones(2)])
    f = eqpar.filter_jit(lambda h: sum(h.items))
    np.testing.assert_array_equal(f(holder), 2 * np.ones(2))
    np.testing.assert_array_equal(f(holder), 2 * np.ones(2))
    holder.items[1] = jnp.full(2, 5.0)  # the list is mutable: must be seen
    np.testing.assert_array_equal(f(holder), np.full(2, 6.0))
    holder.items.append(jnp.ones(2))
    np.testing.assert_array_equal(f(holder), np.full(2, 7.0))


def test_same_module_object_reuses_its_flattening_and_stays_correct():
    counter = TraceCounter(lambda m, x: m(x))
    f = eqpar.filter_jit(counter)
    model = _model()
    x = jnp.ones(4)
    outs = [f(model, x + i) for i in range(4)]
    for i, out in enumerate(outs):
        np.testing.assert_allclose(out, model(x + i), rtol=1e-6, atol=1e-6)
    other = _model(seed=5)  # same structure: no new trace
    np.testing.assert_allclose(f(other, x), other(x), rtol=1e-6, atol=1e-6)
    assert counter.count == 1


def test_bound_call_method_of_a_fresh_module_does_not_retrace():
    calls = []

    class Affine(eqx.Module):
        w: jax.Array

        def __call__(self, x):
            calls.append(None)
            return x * self.w

    x = jnp.ones((N, 3))
    for i in range(4):
        m = Affine(jnp.full(3, float(i)))
        np.testing.assert_array_equal(eqpar.filter_pmap(m.__call__)(x), x * i)
    assert len(calls) == 1


def test_placed_inputs_are_passed_as_they_are():
    mesh = _mesh()
    model = _model()
    x = jax.device_put(
        jax.random.normal(jax.random.key(1), (16, 4)), NamedSharding(mesh, P("data"))
    )
    params, static = eqx.partition(model, eqx.is_array)
    placed = eqx.combine(jax.device_put(params, NamedSharding(mesh, P())), static)
    f = _shard_map(mesh)
    for _ in range(3):
        np.testing.assert_allclose(
            f(placed, x), jax.vmap(model)(x), rtol=1e-6, atol=1e-6
        )
    assert eqpar.placement_cache().copies == 0


def test_a_concrete_input_placed_under_an_outer_trace_is_not_cached():
    """A concrete array closed over by a jitted function reaches the dispatcher as
    itself, but placing it there is staged (a tracer): nothing is remembered, and
    the result is right inside and outside the trace."""
    mesh = eqpar.data_mesh()
    f = eqpar.Parallel(lambda w, x: w * x, in_axes=(None, 0), mesh=mesh)
    x = jnp.arange(16.0)
    loss = lambda w: f(w, x).sum()  # noqa: E731
    with jax.set_mesh(mesh):  # eager: x is placed and its copy remembered
        assert jax.grad(loss)(jnp.float32(2.0)) == x.sum()
    assert jax.jit(jax.grad(loss))(jnp.float32(2.0)) == x.sum()
    assert jnp.array_equal(f(jnp.float32(2.0), x), 2.0 * x)


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_calls_stay_right_whatever_comes_next(axis_type):
    """After many calls with inputs already where the program wants them, whatever
    arrives next (an array placed elsewhere, a NumPy array, a fresh unplaced
    Module, other shapes, a deleted leaf) gives the single-device result, or
    eqpar's error."""
    mesh = jax.sharding.Mesh(
        np.array(jax.devices()), ("data",), axis_types=(axis_type,)
    )
    model = _model()
    x = jax.random.normal(jax.random.key(1), (16, 4))
    params, static = eqx.partition(model, eqx.is_array)
    placed = eqx.combine(jax.device_put(params, NamedSharding(mesh, P())), static)
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    f = _shard_map(mesh)
    ref = jax.vmap(model)(x)
    for _ in range(12):
        np.testing.assert_allclose(f(placed, xs), ref, rtol=1e-6, atol=1e-6)

    on_one = jax.device_put(x, jax.devices()[3])  # committed elsewhere
    np.testing.assert_allclose(f(placed, on_one), ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(f(placed, np.asarray(x)), ref, rtol=1e-6, atol=1e-6)
    fresh = _model(seed=5)  # same structure, unplaced
    np.testing.assert_allclose(f(fresh, xs), jax.vmap(fresh)(x), rtol=1e-6, atol=1e-6)
    x32 = jax.random.normal(jax.random.key(2), (32, 4))
    np.testing.assert_allclose(
        f(placed, x32), jax.vmap(model)(x32), rtol=1e-6, atol=1e-6
    )
    for _ in range(12):
        np.testing.assert_allclose(f(placed, xs), ref, rtol=1e-6, atol=1e-6)
    placed.layers[0].weight.delete()
    with pytest.raises(eqpar.DeletedArrayError, match="`m` at .layers\\[0\\].weight"):
        f(placed, xs)


def test_a_repeated_unplaced_array_is_placed_once():
    """An unplaced array passed again and again is placed once and its copy
    reused, also after many calls with placed inputs."""
    mesh = _mesh()
    model = _model()
    params, static = eqx.partition(model, eqx.is_array)
    placed = eqx.combine(jax.device_put(params, NamedSharding(mesh, P())), static)
    xs = jax.device_put(
        jax.random.normal(jax.random.key(1), (16, 4)), NamedSharding(mesh, P("data"))
    )
    f = _shard_map(mesh)
    for _ in range(12):
        f(placed, xs)
    x = jax.random.normal(jax.random.key(2), (16, 4))  # on one device
    misses = eqpar.placement_cache().misses
    for _ in range(10):
        out = f(placed, x)
    np.testing.assert_allclose(out, jax.vmap(model)(x), rtol=1e-6, atol=1e-6)
    assert _copies_of(x), "the repeated unplaced array should have been placed"
    assert eqpar.placement_cache().misses == misses + 1, "and placed once"


def test_the_last_copy_is_reused_only_while_it_is_right():
    """A program called again with the very unplaced arrays it copied last reuses
    those copies without a lookup; a new batch beside them, a donated copy, the
    cache turned off, a deleted source or a NumPy leaf each get the single-device
    result or eqpar's error."""
    mesh = _mesh()
    model = _model()
    f = _shard_map(mesh)
    same_shape = lambda m, x: x + jax.vmap(m)(x).sum(-1, keepdims=True)  # noqa: E731
    donating = eqpar.filter_shard_map(
        same_shape,  # so that the donated batch's buffer is reused (and deleted)
        mesh=mesh,
        in_specs=(P(), P("data")),
        out_specs=P("data"),
        donate="all-except-first",
    )
    for k in range(4):  # a new batch each call, on one device or placed
        x = jax.random.normal(jax.random.key(k), (16, 4))
        if k % 2:
            x = jax.device_put(x, NamedSharding(mesh, P("data")))
        np.testing.assert_allclose(f(model, x), jax.vmap(model)(x), atol=1e-6)
    misses = eqpar.placement_cache().misses
    x = jax.random.normal(jax.random.key(9), (16, 4))
    for _ in range(3):
        np.testing.assert_allclose(f(model, x), jax.vmap(model)(x), atol=1e-6)
    assert eqpar.placement_cache().misses == misses + 1  # only the new batch

    # The donating program donates its copy of the batch: copied afresh each call.
    for _ in range(3):
        with pytest.warns(eqpar.EqparWarning, match="the copy was donated"):
            out = donating(model, x)
        np.testing.assert_allclose(out, same_shape(model, x), atol=1e-6)
        assert not x.is_deleted()

    eqpar.placement_cache(max_bytes=0)  # off: the copies die, nothing stale
    np.testing.assert_allclose(f(model, x), jax.vmap(model)(x), atol=1e-6)
    np.testing.assert_allclose(f(model, x), jax.vmap(model)(x), atol=1e-6)
    eqpar.placement_cache(max_bytes=1 << 30)

    w = np.ones((8, 4), np.float32)  # NumPy: mutable, so never reused
    numpy_model = eqx.tree_at(lambda m: m.layers[0].weight, model, w)
    ref = jax.vmap(numpy_model)(x)
    np.testing.assert_allclose(f(numpy_model, x), ref, atol=1e-6)
    w[:] = 2.0
    ref = jax.vmap(eqx.tree_at(lambda m: m.layers[0].weight, model, w.copy()))(x)
    np.testing.assert_allclose(f(numpy_model, x), ref, atol=1e-6)

    np.testing.assert_allclose(f(model, x), jax.vmap(model)(x), atol=1e-6)
    model.layers[1].bias.delete()
    with pytest.raises(eqpar.DeletedArrayError, match="layers\\[1\\].bias"):
        f(model, x)


def test_an_equivalent_placement_passes_as_it_is_every_call():
    """Inputs placed with a spec equivalent to the one the call asks for (`P(None,
    None)` for `P()`) are neither copied nor looked up again, and stay right."""
    mesh = _mesh()
    model = _model()
    params, static = eqx.partition(model, eqx.is_array)
    odd = jax.tree.map(
        lambda a: jax.device_put(a, NamedSharding(mesh, P(*[None] * a.ndim))), params
    )
    placed = eqx.combine(odd, static)
    x = jax.device_put(
        jax.random.normal(jax.random.key(1), (16, 4)), NamedSharding(mesh, P("data"))
    )
    f = _shard_map(mesh)
    misses = eqpar.placement_cache().misses
    for _ in range(4):
        out = f(placed, x)
        np.testing.assert_allclose(out, jax.vmap(model)(x), rtol=1e-6, atol=1e-6)
    assert eqpar.placement_cache().misses == misses
    assert _copies_of(placed.layers[0].weight) == {}


def _shrink(m, x):
    """One 'training step': every array of the Module scaled, fed back next call."""
    p, s = eqx.partition(m, eqx.is_array)
    scale = 1.0 - 0.1 * jnp.tanh(jnp.mean(jax.vmap(m)(x)))
    return eqx.combine(jax.tree.map(lambda a: a * scale, p), s), scale


def _arrays(tree):
    return [a for a in jax.tree.leaves(tree) if eqx.is_array(a)]


def _reference_steps(model, x, steps):
    params, static = eqx.partition(model, eqx.is_array)
    step = jax.jit(
        lambda p: eqx.partition(_shrink(eqx.combine(p, static), x)[0], eqx.is_array)[0]
    )
    for _ in range(steps):
        params = step(params)
    return eqx.combine(params, static)


def test_a_module_fed_back_stays_correct():
    """Feeding a compiled call's output Module back gives, step after step, what
    `jax.jit` on the parameters gives, with one trace."""
    counter = TraceCounter(_shrink)
    f = eqpar.filter_jit(counter)
    model, x = _model(), jnp.linspace(-1.0, 1.0, 16).reshape(4, 4)
    m = model
    for _ in range(6):
        m, scale = f(m, x)
    assert counter.count == 1
    ref = _reference_steps(model, x, 6)
    for a, b in zip(_arrays(m), _arrays(ref)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    # Under an outer trace the outputs are tracers: nothing recorded, still right.
    twice = eqx.filter_jit(lambda m: f(f(m, x)[0], x)[0])(model)
    ref2 = _reference_steps(model, x, 2)
    for a, b in zip(_arrays(twice), _arrays(ref2)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    # An output whose array is deleted is refused, as by `jax.jit`.
    m.layers[0].weight.delete()
    with pytest.raises(RuntimeError, match="deleted"):
        f(m, x)


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_a_module_fed_back_through_shard_map_matches_one_device(axis_type):
    mesh = jax.sharding.Mesh(
        np.array(jax.devices()), ("data",), axis_types=(axis_type,)
    )
    f = eqpar.filter_shard_map(
        lambda m, x: (_shrink(m, x)[0], None),
        mesh=mesh,
        in_specs=(P(), P("data")),
        out_specs=P(),
        check_vma=False,
    )
    model = _model()
    x = jnp.linspace(-1.0, 1.0, 8 * N).reshape(2 * N, 4)
    m = model
    for _ in range(SETTLE_STEPS):
        m, _ = f(m, x)
    # Each device scaled by its own block's mean: the reference does the same.
    params, static = eqx.partition(model, eqx.is_array)
    for _ in range(SETTLE_STEPS):
        scale = 1.0 - 0.1 * jnp.tanh(
            jnp.mean(jax.vmap(eqx.combine(params, static))(x[:2]))
        )
        params = jax.tree.map(lambda a: a * scale, params)
    for a, b in zip(_arrays(m), _arrays(params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


SETTLE_STEPS = 12


def test_an_input_typed_on_another_explicit_mesh_is_placed_eagerly():
    """Eagerly, an array on another mesh's Explicit axes is copied onto the call's
    mesh like any unplaced input (its type would not fit the program as it is)."""
    explicit = eqpar.data_mesh(explicit=True)
    auto = _mesh()
    x = eqpar.filter_device_put(jnp.arange(16.0), P("data"), mesh=explicit)
    f = eqpar.filter_shard_map(
        lambda x: 2 * x, mesh=auto, in_specs=P("data"), out_specs=P("data")
    )
    for _ in range(2):
        out = f(x)
        np.testing.assert_array_equal(out, 2 * jnp.arange(16.0))
        assert out.sharding.mesh == auto
