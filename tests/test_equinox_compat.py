"""eqpar as a drop-in for Equinox's transforms (issue 11).

Two parts:

1. What Equinox's own `tests/test_vmap.py` and `tests/test_pmap.py` check, restated
   in our own words and run side by side on `eqx.filter_vmap`/`eqx.filter_pmap` and
   on eqpar's: the same assertion holding for both is what "drop-in" means. Where
   Equinox asserts its exact trace counts (it traces twice per signature: an
   `eval_shape` and the `pmap`), the count per signature is a parameter and eqpar's
   is one.
2. The semantics listed in issue 11: `filter_vmap` maps eagerly (it is not a jit),
   int `out_axes` on non-array outputs, dict `in_axes` checks, `.lower()`, `donate`,
   unhashable static leaves, one compile cache shared by fresh wrappers, and caches
   that do not keep a dropped function alive.
"""

import functools as ft
import gc
import math
import weakref

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

import eqpar

from .helpers import TraceCounter


LIBS = ["eqx", "eqpar"]
VMAP = {"eqx": eqx.filter_vmap, "eqpar": eqpar.filter_vmap}
PMAP = {"eqx": eqx.filter_pmap, "eqpar": eqpar.filter_pmap}
JIT = {"eqx": eqx.filter_jit, "eqpar": eqpar.filter_jit}
# Equinox's filter_pmap traces twice per call signature (eval_shape, then pmap);
# eqpar's traces once.
PMAP_TRACES_PER_SIGNATURE = {"eqx": 2, "eqpar": 1}

both = pytest.mark.parametrize("lib", LIBS)


def assert_same(out, expected):
    """Same tree structure; array leaves of the same shape and values (a non-array
    expected leaf may come back as a 0-d array only if it was one); other leaves equal.
    """
    lo, to = jax.tree.flatten(out)
    le, te = jax.tree.flatten(expected)
    assert to == te, f"structures differ:\n{to}\n{te}"
    for o, e in zip(lo, le):
        if eqx.is_array(e):
            assert eqx.is_array(o), f"expected an array, got {o!r}"
            assert np.shape(o) == np.shape(e), f"{np.shape(o)} != {np.shape(e)}"
            np.testing.assert_allclose(np.asarray(o), np.asarray(e), rtol=1e-6)
        else:
            assert not eqx.is_array(o), f"expected the non-array {e!r}, got {o!r}"
            assert o == e


def _zero_if_inexact(x):
    return 0 if eqx.is_inexact_array(x) else None


@ft.cache
def _mlp():
    """A small MLP with a function field (`activation`), built once."""
    return eqx.nn.MLP(2, 2, 2, 2, activation=jax.nn.relu, key=jr.key(42))


def _auto_mesh(n=None, name="data"):
    devices = jax.devices()[: n or jax.device_count()]
    return Mesh(np.array(devices), (name,), axis_types=(AxisType.Auto,))


# ==================================================================================
# Part 1: Equinox's filter_vmap tests, both libraries
# ==================================================================================


@both
def test_vmap_in_axes_tuple_mixes_callables_ints_and_nested_none(lib):
    # One spec per positional argument: a callable (int array -> None), a nested
    # prefix with None inside a list of dicts, a plain int, and eqx.if_array(0) on a
    # Python int (static).
    @VMAP[lib](in_axes=(_zero_if_inexact, [{"a": None}], 0, eqx.if_array(0)))
    def f(a, b, c, d):
        return a + b[0]["a"] + c + d

    a, b, c = jnp.array([1]), jnp.array([2]), jnp.array([3])
    out = f(a, [{"a": b}], c, 4)
    assert_same(out, jnp.stack([a + b + ci + 4 for ci in c]))


@both
def test_vmap_callable_in_axes_applies_to_every_argument(lib):
    @VMAP[lib](in_axes=_zero_if_inexact)
    def f(a, b):
        with jax.numpy_dtype_promotion("standard"):
            return a + b

    # The int array is broadcast, the float array mapped.
    assert_same(f(jnp.array(3), jnp.array([3.0])), jnp.array([6.0]))
    # Now both are mapped, and the 0-d one has no axis 0.
    with pytest.raises(ValueError):
        f(jnp.array(3.0), jnp.array([3.0]))


@both
def test_vmap_out_axes_with_axis_size(lib):
    vmap = VMAP[lib]

    def identity(x):
        return x

    x = jnp.array([3, 4])
    # Unmapped output, nothing mapped: the value comes back as it went in.
    assert_same(vmap(identity, out_axes=None, axis_size=5)(1), 1)
    assert_same(vmap(identity, in_axes=None, out_axes=None, axis_size=5)(x), x)
    # An int out_axes broadcasts the output along a new axis of size axis_size, even
    # a non-array output.
    assert_same(vmap(identity, out_axes=0, axis_size=5)(1), jnp.array([1] * 5))
    assert_same(
        vmap(identity, in_axes=None, out_axes=0, axis_size=5)(x), jnp.stack([x] * 5)
    )


@both
def test_vmap_non_array_output_with_callable_out_axes_stays_static(lib):
    f = VMAP[lib](lambda x: x, out_axes=_zero_if_inexact, axis_size=5)
    assert_same(f(1), 1)


def _scaled_mlp(scale):
    """The shared MLP with every array multiplied by `scale`: an ensemble member
    without a random initialisation (whose operations are slow to compile)."""
    return jax.tree.map(lambda a: a * scale if eqx.is_array(a) else a, _mlp())


@both
def test_vmap_ensemble_of_modules(lib, getkey):
    vmap = VMAP[lib]
    scales = jnp.array([1.0, -2.0, 3.0])
    models = vmap(_scaled_mlp)(scales)
    singles = [_scaled_mlp(s) for s in scales]
    assert models.activation is jax.nn.relu
    stacked = jax.tree.map(
        lambda *a: jnp.stack(a) if eqx.is_array(a[0]) else a[0], *singles
    )
    assert_same(models, stacked)

    def call(model, x):
        return model(x)

    xs = jr.normal(getkey(), (3, 2))
    expected = jnp.stack([m(x) for m, x in zip(singles, xs)])
    assert_same(vmap(call)(models, xs), expected)
    x = xs[0]
    out = vmap(call, in_axes=(eqx.if_array(0), None))(models, x)
    assert_same(out, jnp.stack([m(x) for m in singles]))


def _increment_module(transform, call, outer, traces=None):
    """A Module adding `increment`, as `__call__` or as `method`, with `transform`
    applied in the class body unless `outer` (then the caller applies it). Each run
    of the body (each trace) appends to `traces`."""

    class M(eqx.Module):
        increment: int | jax.Array

        def _add(self, x):
            if traces is not None:
                traces.append(None)
            return x + self.increment

        if call:
            __call__ = _add if outer else transform(_add)
        else:
            method = _add if outer else transform(_add)

    return M


def _run_increment(transform, m, call, outer, y):
    fn = m if call else m.method
    return transform(fn)(y) if outer else fn(y)


@both
@pytest.mark.parametrize("call", [False, True])
@pytest.mark.parametrize("outer", [False, True])
def test_vmap_methods_and_callable_modules(lib, call, outer):
    vmap = VMAP[lib]
    M = _increment_module(vmap, call, outer)
    y = jnp.array([1.0, 2.0])
    assert_same(_run_increment(vmap, M(5), call, outer, y), y + 5)


@both
def test_vmap_axis_name_binds_collectives(lib):
    def f(x):
        return jax.lax.psum(x + 1, axis_name="i")

    out = VMAP[lib](f, axis_name="i")(jnp.zeros(2))
    assert_same(out, jnp.full(2, 2.0))


@both
def test_vmap_identity_on_module_with_function_field(lib):
    mlp = _mlp()
    ensemble = jax.tree.map(
        lambda a: jnp.stack([a, 2 * a]) if eqx.is_array(a) else a, mlp
    )
    out = VMAP[lib](lambda m: m)(ensemble)
    assert out.activation is jax.nn.relu
    assert_same(out, ensemble)


@both
def test_vmap_dict_in_axes_for_positional_arguments(lib, getkey):
    x = jr.normal(getkey(), (3, 4))
    y = jr.normal(getkey(), (1, 3))
    out = VMAP[lib](lambda x, y: x + y, in_axes=dict(y=1))(x, y)
    assert_same(out, x + y.T)


@both
def test_vmap_dict_in_axes_and_defaulted_parameters(lib, getkey):
    vmap = VMAP[lib]
    x = jr.normal(getkey(), (3, 4))
    # A defaulted parameter that the dict does not name keeps its default.
    out = vmap(lambda x, y=1.0: x + y, in_axes=dict(x=0))(x)
    assert_same(out, x + 1.0)
    # A dict naming a defaulted parameter that was not passed is an error: whether
    # the default should be mapped is ambiguous.
    with pytest.raises(ValueError):
        vmap(lambda x, y=1.0: x, in_axes=dict(y=0))(x)


@both
@pytest.mark.parametrize("out_axis", [0, 1, 2, -1, -2, -3])
def test_vmap_out_axes_on_rank_three_outputs(lib, out_axis):
    x = jnp.arange(24).reshape(2, 3, 4)
    out = VMAP[lib](lambda x: x * 2, out_axes=out_axis)(x)
    assert_same(out, jax.vmap(lambda x: x * 2, out_axes=out_axis)(x))


# ==================================================================================
# Part 1: Equinox's filter_pmap tests, both libraries
# ==================================================================================


@both
def test_pmap_in_axes_tuple_mixes_callables_ints_and_nested_none(lib):
    @PMAP[lib](in_axes=(_zero_if_inexact, [{"a": None}], 0, eqx.if_array(0)))
    def f(a, b, c, d):
        return a + b[0]["a"] + c + d

    a, b, c = jnp.array([1]), jnp.array([2]), jnp.array([3, 5])
    out = f(a, [{"a": b}], c, 4)
    assert_same(out, jnp.stack([a + b + ci + 4 for ci in c]))


@both
def test_pmap_callable_in_axes_applies_to_every_argument(lib):
    @PMAP[lib](in_axes=_zero_if_inexact)
    def f(a, b):
        with jax.numpy_dtype_promotion("standard"):
            return a + b

    assert_same(f(jnp.array(3), jnp.array([3.0, 4.0])), jnp.array([6.0, 7.0]))
    with pytest.raises(ValueError):
        f(jnp.array(3.0), jnp.array([3.0]))


@both
def test_pmap_out_axes_with_axis_size(lib):
    pmap = PMAP[lib]

    def identity(x):
        return x

    x = jnp.array([3, 4])
    assert_same(pmap(identity, in_axes=None, out_axes=None, axis_size=2)(x), x)
    assert_same(pmap(identity, out_axes=0, axis_size=2)(1), jnp.array([1, 1]))
    assert_same(
        pmap(identity, in_axes=None, out_axes=0, axis_size=2)(x), jnp.stack([x, x])
    )


@both
def test_pmap_unmapped_non_array_output(lib):
    assert_same(PMAP[lib](lambda x: x, out_axes=None, axis_size=2)(1), 1)


@both
def test_pmap_runs_on_the_devices_given(lib):
    # Equinox's tests pin filter_pmap to one CPU with `devices=`.
    devices = jax.devices()[2:4]
    x = jnp.arange(2.0)
    out = PMAP[lib](lambda x: x * 3, devices=devices)(x)
    assert_same(out, x * 3)
    assert out.sharding.device_set == set(devices)


@both
def test_pmap_traces_once_per_signature(lib):
    per_signature = PMAP_TRACES_PER_SIGNATURE[lib]
    f = TraceCounter(lambda x, y: x + y)
    g = PMAP[lib](f, in_axes=None, axis_size=2)

    def expect(x, y, signatures):
        assert_same(g(x, y), jnp.stack([x + y] * 2))
        assert f.count == per_signature * signatures

    expect(jnp.array(1), 2, 1)
    expect(jnp.array(3), 2, 1)  # new values, same signature
    expect(jnp.array(1), 3, 2)  # a new static value
    expect(jnp.array([3]), 3, 3)  # a new shape
    expect(jnp.array([4]), 3, 3)


@both
@pytest.mark.parametrize("call", [False, True])
@pytest.mark.parametrize("outer", [False, True])
def test_pmap_methods_and_callable_modules_trace_once_per_signature(lib, call, outer):
    pmap = PMAP[lib]
    per_signature = PMAP_TRACES_PER_SIGNATURE[lib]
    traces = []
    M = _increment_module(pmap, call, outer, traces)
    y = jnp.array([1, 2])

    def run(m):
        return _run_increment(pmap, m, call, outer, y)

    def expect(m, expected, signatures):
        assert_same(run(m), expected)
        assert len(traces) == per_signature * signatures

    expect(M(1), y + 1, 1)
    expect(M(1), y + 1, 1)  # an equal Module: no retrace
    expect(M(2), y + 2, 2)  # a new static field
    expect(M(2), y + 2, 2)
    o, p = M(jnp.array([5, 5])), M(jnp.array([6, 6]))
    if outer:
        # The Module is the function: its arrays are broadcast to every device.
        expect(o, jnp.stack([yi + o.increment for yi in y]), 3)
        expect(p, jnp.stack([yi + p.increment for yi in y]), 3)
    else:
        # The Module is `self`, the first argument: its arrays are mapped.
        expect(o, y + 5, 3)
        expect(p, y + 6, 3)


@both
def test_pmap_of_fresh_grad_wrappers_traces_once_per_signature(lib):
    per_signature = PMAP_TRACES_PER_SIGNATURE[lib]
    pmap = PMAP[lib]
    f = TraceCounter(lambda x: jnp.sum(x**2))

    # eqx.filter_grad(f) is a new (but equal) wrapper on every call.
    assert_same(pmap(eqx.filter_grad(f))(jnp.array([1.0, 2.0])), jnp.array([2.0, 4.0]))
    assert f.count == per_signature
    assert_same(pmap(eqx.filter_grad(f))(jnp.array([3.0, 4.0])), jnp.array([6.0, 8.0]))
    assert f.count == per_signature

    value, grad = pmap(eqx.filter_value_and_grad(f))(jnp.array([1.0, 2.0]))
    assert_same((value, grad), (jnp.array([1.0, 4.0]), jnp.array([2.0, 4.0])))
    assert f.count == 2 * per_signature
    value, grad = pmap(eqx.filter_value_and_grad(f))(jnp.array([3.0, 4.0]))
    assert_same((value, grad), (jnp.array([9.0, 16.0]), jnp.array([6.0, 8.0])))
    assert f.count == 2 * per_signature


@both
def test_pmap_of_fresh_vmap_wrappers_traces_once_per_signature(lib):
    per_signature = PMAP_TRACES_PER_SIGNATURE[lib]
    pmap, vmap = PMAP[lib], VMAP[lib]
    f = TraceCounter(lambda x: x + 1)
    x = jnp.arange(6).reshape(2, 3)
    assert_same(pmap(vmap(f))(x), x + 1)
    assert f.count == per_signature
    assert_same(pmap(vmap(f))(x * 2), x * 2 + 1)
    assert f.count == per_signature


@both
def test_pmap_axis_name_binds_collectives_over_all_devices(lib):
    n = jax.device_count()
    out = PMAP[lib](lambda x: jax.lax.psum(x + 1, "device"), axis_name="device")(
        jnp.zeros(n)
    )
    assert_same(out, jnp.full(n, float(n)))


@both
def test_pmap_identity_on_module_with_function_field(lib):
    n = jax.device_count()
    mlp = _mlp()
    per_device = jax.tree.map(
        lambda a: jnp.stack([a * i for i in range(n)]) if eqx.is_array(a) else a, mlp
    )
    out = PMAP[lib](lambda m: m)(per_device)
    assert out.activation is jax.nn.relu
    assert_same(out, per_device)


@both
def test_pmap_dict_in_axes_for_positional_arguments(lib, getkey):
    x = jr.normal(getkey(), (2, 4))
    y = jr.normal(getkey(), (1, 2))
    out = PMAP[lib](lambda x, y: x + y, in_axes=dict(y=1))(x, y)
    assert_same(out, x + y.T)


@both
def test_pmap_dict_in_axes_and_defaulted_parameters(lib, getkey):
    pmap = PMAP[lib]
    x = jr.normal(getkey(), (2, 4))
    assert_same(pmap(lambda x, y=1.0: x + y, in_axes=dict(x=0))(x), x + 1.0)
    with pytest.raises(ValueError):
        pmap(lambda x, y=1.0: x, in_axes=dict(y=0))(x)


@both
@pytest.mark.parametrize("donate", ["all", "none"])
def test_pmap_lower_and_compile(lib, donate):
    def f(x, y):
        return 2 * x + y

    x, y = jnp.array([3]), 4
    expected = 2 * x + y
    lowered = PMAP[lib](f, donate=donate).lower(x, y)
    assert isinstance(lowered.as_text(), str)
    compiled = lowered.compile()
    assert_same(compiled(x, y), expected)


@both
@pytest.mark.parametrize("out_axis", [0, 1, 2])
def test_pmap_out_axes_on_rank_three_outputs(lib, out_axis):
    x = jnp.arange(48).reshape(2, 2, 3, 4)
    out = PMAP[lib](lambda x: x * 2, out_axes=out_axis)(x)
    assert_same(out, jax.vmap(lambda x: x * 2, out_axes=out_axis)(x))


# ==================================================================================
# Part 2: filter_vmap maps; it is not a jit (issue 11)
# ==================================================================================


@both
def test_vmap_python_math_on_values_independent_of_the_mapped_input(lib):
    vmap = VMAP[lib]
    x = jnp.arange(3.0)
    # A jnp value computed inside from constants stays concrete under a plain vmap.
    out = vmap(lambda x: x * math.exp(jnp.log(2.0)))(x)
    assert_same(out, x * 2.0)
    # So does an unmapped array argument.
    t = jnp.array(0.5)
    out = vmap(lambda x, t: x * math.exp(float(t)), in_axes=(0, None))(x, t)
    assert_same(out, x * math.exp(0.5))


def _rejection_sample(x, key):
    # A Python loop whose condition is computed from an unmapped key.
    while True:
        key, sub = jr.split(key)
        u = jr.uniform(sub)
        if u < 0.5:
            return x * u


@both
def test_vmap_python_control_flow_on_an_unmapped_key(lib):
    x, key = jnp.arange(3.0), jr.key(0)
    out = VMAP[lib](_rejection_sample, in_axes=(0, None))(x, key)
    # The reference: the same loop, run once outside any transform.
    assert_same(out, _rejection_sample(jnp.float32(1.0), key) * x)


class _Layer(eqx.Module):
    weight: jax.Array
    init: ft.partial = eqx.field(static=True)


def _make_layer(key):
    # `init` closes over an array computed inside the mapped function, but one that
    # does not depend on the mapped key: under a vmap it is a concrete array.
    return _Layer(jr.normal(key, (3,)), ft.partial(jnp.multiply, jnp.linspace(0, 1, 3)))


@both
def test_vmap_static_output_closing_over_an_inner_array_does_not_leak(lib):
    keys = jr.split(jr.key(0), 2)
    layers = VMAP[lib](_make_layer)(keys)
    assert_same(layers.weight, jnp.stack([_make_layer(k).weight for k in keys]))
    (closed,) = layers.init.args
    assert not isinstance(closed, jax.core.Tracer)
    assert_same(layers.init(jnp.ones(3)), jnp.linspace(0, 1, 3))


@both
def test_vmap_python_side_effects_run_on_every_call(lib):
    calls = []

    def f(x):
        calls.append(None)
        return x * 2

    g = VMAP[lib](f)
    x = jnp.arange(3.0)
    for i in range(1, 4):
        assert_same(g(x), x * 2)
        assert len(calls) == i


_OFFSET = jnp.array(1.0)


def _add_offset(x):
    return x + _OFFSET


@both
@pytest.mark.parametrize("inline", [False, True])
def test_vmap_sees_a_reassigned_global(lib, inline):
    global _OFFSET
    vmap = VMAP[lib]
    built = vmap(_add_offset)

    def call(x):
        return vmap(_add_offset)(x) if inline else built(x)

    x = jnp.arange(3.0)
    try:
        _OFFSET = jnp.array(1.0)
        assert_same(call(x), x + 1.0)
        _OFFSET = jnp.array(5.0)
        assert_same(call(x), x + 5.0)
    finally:
        _OFFSET = jnp.array(1.0)


@both
def test_vmap_inside_jit_traces_with_the_outer_program(lib):
    jit, vmap = JIT[lib], VMAP[lib]
    f = TraceCounter(lambda x: jnp.sin(x) * 2)
    g = jit(lambda x: vmap(f)(x))
    for i in range(3):
        x = jnp.arange(4.0) + i
        assert_same(g(x), jnp.sin(x) * 2)
    assert f.count == 1


def test_vmap_chunk_size_works_eagerly():
    # Called outside any jit, with a chunk that does not divide the batch.
    def f(x):
        return jnp.sin(x) * 2

    x = jnp.arange(10.0)
    assert_same(eqpar.filter_vmap(f, chunk_size=3)(x), jax.vmap(f)(x))


# ==================================================================================
# Part 2: nothing mapped; int out_axes on non-array outputs (issue 11)
# ==================================================================================


@both
def test_vmap_nothing_mapped_and_unmapped_outputs_needs_no_axis_size(lib):
    x = jnp.arange(3.0)
    out = VMAP[lib](lambda x, s: (x * s, s), in_axes=None, out_axes=None)(x, 2.0)
    assert_same(out, (x * 2.0, 2.0))


@both
def test_vmap_nothing_mapped_and_a_mapped_output_needs_axis_size(lib):
    with pytest.raises(ValueError):
        VMAP[lib](lambda x: x, in_axes=None, out_axes=0)(jnp.arange(3.0))


@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("kind", ["vmap", "pmap"])
def test_int_out_axes_broadcasts_a_non_array_output(lib, kind):
    transform = (VMAP if kind == "vmap" else PMAP)[lib]
    assert_same(transform(lambda: 1, out_axes=0, axis_size=5)(), jnp.array([1] * 5))
    x = jnp.arange(4.0)
    x2, two = transform(lambda x: (x, 2.0), out_axes=0)(x)
    assert_same(x2, x)
    assert_same(two, jnp.full(4, 2.0))


# ==================================================================================
# Part 2: dict in_axes naming parameters that were not passed (issue 11)
# ==================================================================================


@pytest.mark.parametrize("kind", ["vmap", "pmap"])
def test_dict_in_axes_naming_an_unpassed_default_is_a_spec_error(kind):
    transform = eqpar.filter_vmap if kind == "vmap" else eqpar.filter_pmap
    with pytest.raises(eqpar.SpecError, match=r"[`'\"]y[`'\"]"):
        transform(lambda x, y=1.0: x + y, in_axes=dict(y=0))(jnp.arange(2.0))


def _with_kwargs(x, **kwargs):
    return x * kwargs.get("scale", 1.0)


@both
def test_dict_in_axes_misspelled_under_var_kwargs_raises(lib):
    with pytest.raises(ValueError):
        VMAP[lib](_with_kwargs, in_axes=dict(sclae=None))(jnp.arange(2.0))


def test_dict_in_axes_misspelled_under_var_kwargs_with_keywords_is_a_spec_error():
    # The keyword passed is `scale`; the spec names `sclae`, which the function never
    # receives. Ignoring the name would map `scale` by the default spec instead of
    # broadcasting it, silently.
    x, scale = jnp.arange(2.0), jnp.array([2.0, 3.0])
    f = eqpar.filter_vmap(_with_kwargs, in_axes=dict(sclae=None))
    with pytest.raises(eqpar.SpecError, match="sclae"):
        f(x, scale=scale)
    # Named correctly, `scale` is broadcast.
    g = eqpar.filter_vmap(_with_kwargs, in_axes=dict(scale=None))
    assert_same(g(x, scale=scale), jnp.stack([xi * scale for xi in x]))


# ==================================================================================
# Part 2: ahead-of-time compilation (issue 11)
# ==================================================================================


def _affine(x, y, *, shift=0.0):
    return 2 * x + y + shift


@both
def test_jit_lower_and_compile(lib):
    x = jnp.arange(4.0)
    lowered = JIT[lib](_affine).lower(x, 3.0, shift=jnp.array(1.0))
    assert isinstance(lowered.as_text(), str)
    compiled = lowered.compile()
    assert_same(compiled(x, 3.0, shift=jnp.array(1.0)), _affine(x, 3.0, shift=1.0))


@both
def test_jit_ahead_of_time_objects_are_equinoxs(lib):
    """`.lowered`, `.compile(compiler_options=...)` and `.compiled` (JAX's stages)
    as in Equinox; eqpar's compiled call also gives JAX's memory and cost
    analyses directly, the same as through `.compiled`."""
    x = jnp.arange(256.0).reshape(16, 16)
    lowered = JIT[lib](lambda a: jnp.tanh(a @ a)).lower(x)
    assert isinstance(lowered.lowered, jax.stages.Lowered)
    compiled = lowered.compile(compiler_options={"xla_cpu_enable_fast_math": False})
    assert isinstance(compiled.compiled, jax.stages.Compiled)
    assert_same(compiled(x), jnp.tanh(x @ x))
    memory = compiled.compiled.memory_analysis()
    assert memory.argument_size_in_bytes == x.nbytes
    if lib == "eqpar":
        ours = compiled.memory_analysis()
        assert ours.argument_size_in_bytes == memory.argument_size_in_bytes
        assert ours.output_size_in_bytes == memory.output_size_in_bytes
        assert compiled.cost_analysis() == compiled.compiled.cost_analysis()
        assert lowered.cost_analysis() == lowered.lowered.cost_analysis()
        assert compiled.executable is compiled.compiled  # eqpar's earlier name


def test_pmap_lower_and_compile_with_keywords():
    x = jnp.arange(4.0)
    f = eqpar.filter_pmap(_affine, in_axes=dict(shift=None))
    compiled = f.lower(x, 3.0, shift=jnp.array(1.0)).compile()
    assert_same(compiled(x, 3.0, shift=jnp.array(1.0)), _affine(x, 3.0, shift=1.0))


def test_shard_map_lower_and_compile():
    mesh = _auto_mesh()
    x = jnp.arange(16.0)
    f = eqpar.filter_shard_map(
        _affine,
        in_specs=dict(x=P("data"), y=None, shift=P()),
        out_specs=P("data"),
        mesh=mesh,
    )
    compiled = f.lower(x, 3.0, shift=jnp.array(1.0)).compile()
    assert_same(compiled(x, 3.0, shift=jnp.array(1.0)), _affine(x, 3.0, shift=1.0))


# ==================================================================================
# Part 2: donate (issue 11)
# ==================================================================================

# donate value -> (first argument donated, second argument donated)
DONATED = {
    "all": (True, True),
    "all-except-first": (False, True),
    "warn": (True, True),
    "warn-except-first": (False, True),
    "none": (False, False),
}


def _step(a, b):
    return a + 1, b * 2


@both
@pytest.mark.parametrize("donate", list(DONATED))
def test_jit_donate(lib, donate):
    a, b = jnp.arange(3.0), jnp.arange(3.0) + 10
    expected = _step(np.asarray(a), np.asarray(b))
    out = JIT[lib](_step, donate=donate)(a, b)
    assert (a.is_deleted(), b.is_deleted()) == DONATED[donate]
    assert_same(out, tuple(map(jnp.asarray, expected)))


@both
def test_jit_donate_warn_reports_unusable_buffers_and_all_does_not(lib):
    x = jnp.arange(3.0)
    with pytest.warns(UserWarning, match="donated buffers"):
        JIT[lib](jnp.sum, donate="warn")(x)
    y = jnp.arange(3.0)
    assert_same(JIT[lib](jnp.sum, donate="all")(y), jnp.array(3.0))


# Equinox's filter_pmap knows "all", "warn", "none"; eqpar's takes filter_jit's five.
_PMAP_DONATE = [
    (lib, d)
    for lib in LIBS
    for d in DONATED
    if lib == "eqpar" or d in ("all", "warn", "none")
]


@pytest.mark.parametrize("lib,donate", _PMAP_DONATE)
def test_pmap_donate(lib, donate):
    pmap = PMAP[lib]
    # Inputs placed where the pmap wants them: outputs of the same transform.
    a, b = pmap(lambda a, b: (a * 1, b * 1))(jnp.arange(4.0), jnp.arange(4.0) + 10)
    expected = _step(np.asarray(a), np.asarray(b))
    out = pmap(_step, donate=donate)(a, b)
    assert (a.is_deleted(), b.is_deleted()) == DONATED[donate]
    assert_same(out, tuple(map(jnp.asarray, expected)))


def test_pmap_donating_an_input_that_had_to_be_placed_warns():
    x = jnp.arange(4.0)  # on one device: filter_pmap must copy it onto four
    with pytest.warns(UserWarning, match="(?i)donat"):
        out = eqpar.filter_pmap(lambda x: x + 1, donate="all")(x)
    assert_same(out, jnp.arange(4.0) + 1)


@pytest.mark.parametrize("donate", ["all", "none"])
def test_shard_map_donate(donate):
    mesh = _auto_mesh()
    x = jax.device_put(jnp.arange(16.0), NamedSharding(mesh, P("data")))
    expected = np.asarray(x) * 2
    f = eqpar.filter_shard_map(
        lambda x: x * 2,
        in_specs=P("data"),
        out_specs=P("data"),
        mesh=mesh,
        donate=donate,
    )
    out = f(x)
    assert x.is_deleted() == (donate == "all")
    assert_same(out, jnp.asarray(expected))


@pytest.mark.parametrize("donate", ["all", "none"])
def test_parallel_donate(donate):
    mesh = _auto_mesh()
    x = jax.device_put(jnp.arange(16.0), NamedSharding(mesh, P("data")))
    expected = np.asarray(x) * 2
    out = eqpar.Parallel(lambda x: x * 2, axis_name="data", mesh=mesh, donate=donate)(x)
    assert x.is_deleted() == (donate == "all")
    assert_same(out, jnp.asarray(expected))


# ==================================================================================
# Part 2: unhashable static leaves (issue 11)
# ==================================================================================


class _Unhashable:
    """Equality without a hash (defining __eq__ sets __hash__ to None)."""

    def __init__(self, value):
        self.value = value

    def __eq__(self, other):
        return isinstance(other, _Unhashable) and other.value == self.value


def _scaled(x, config):
    return x * config["opt"].value


_UNHASHABLE_CALLS = {
    "filter_jit": lambda: eqpar.filter_jit(_scaled),
    "filter_pmap": lambda: eqpar.filter_pmap(_scaled, in_axes=(0, None)),
    "filter_shard_map": lambda: eqpar.filter_shard_map(
        _scaled, in_specs=(P("data"), None), out_specs=P("data"), mesh=_auto_mesh()
    ),
    "Parallel": lambda: eqpar.Parallel(_scaled, in_axes=(0, None)),
}


@pytest.mark.parametrize("transform", list(_UNHASHABLE_CALLS))
def test_unhashable_static_leaf_is_an_error_naming_its_path(transform):
    f = _UNHASHABLE_CALLS[transform]()
    with pytest.raises(eqpar.EqparError, match=r"(?s)config.*opt"):
        f(jnp.arange(8.0), {"opt": _Unhashable(2.0)})


@both
def test_vmap_accepts_unhashable_static_leaves(lib):
    # Eagerly there is nothing to cache: Equinox's filter_vmap takes them.
    x = jnp.arange(3.0)
    out = VMAP[lib](_scaled, in_axes=(0, None))(x, {"opt": _Unhashable(2.0)})
    assert_same(out, x * 2.0)


def test_eqx_jit_refuses_unhashable_static_leaves():
    # The behaviour eqpar matches (with its own error type and the leaf's path).
    with pytest.raises(ValueError, match="(?i)hash"):
        eqx.filter_jit(_scaled)(jnp.arange(3.0), {"opt": _Unhashable(2.0)})


# ==================================================================================
# Part 2: a fresh wrapper per call does not retrace (issue 11)
# ==================================================================================


@both
def test_inline_jit_in_a_loop_traces_once(lib, getkey):
    step = TraceCounter(lambda model, x: model(x))
    for _ in range(3):
        model = eqx.nn.Linear(3, 2, key=getkey())  # new values, same structure
        x = jr.normal(getkey(), (3,))
        assert_same(JIT[lib](step)(model, x), model(x))
    assert step.count == 1


@both
def test_inline_pmap_traces_once_per_signature(lib):
    f = TraceCounter(lambda x: x * 3)
    for i in range(3):
        x = jnp.arange(4.0) + i
        assert_same(PMAP[lib](f)(x), x * 3)
    assert f.count == PMAP_TRACES_PER_SIGNATURE[lib]


@both
@pytest.mark.parametrize("bound", ["method", "module"])
def test_pmap_of_a_fresh_module_each_step_traces_once(lib, bound):
    traces = []

    class Shift(eqx.Module):
        w: jax.Array

        def method(self, x):
            traces.append(None)
            return x + self.w

        def __call__(self, x):
            traces.append(None)
            return x - self.w

    x = jnp.arange(4.0)
    for i in range(3):
        m = Shift(jnp.array(float(i)))  # a new Module of the same structure
        if bound == "method":
            assert_same(PMAP[lib](m.method)(x), x + i)
        else:
            assert_same(PMAP[lib](m)(x), x - i)
    assert len(traces) == PMAP_TRACES_PER_SIGNATURE[lib]


def test_fresh_parallel_each_call_traces_once():
    f = TraceCounter(lambda x: x * 2)
    for i in range(3):
        x = jnp.arange(16.0) + i
        assert_same(eqpar.Parallel(f)(x), x * 2)
    assert f.count == 1


def test_inline_shard_map_traces_once():
    mesh = _auto_mesh()
    f = TraceCounter(lambda x: x * 2)
    for i in range(3):
        x = jnp.arange(16.0) + i
        g = eqpar.filter_shard_map(
            f, in_specs=P("data"), out_specs=P("data"), mesh=mesh
        )
        assert_same(g(x), x * 2)
    assert f.count == 1


# ==================================================================================
# Part 2: caches do not keep a dropped function alive (issue 11)
# ==================================================================================


def _new_function():
    def double(x):
        return x * 2.0

    return double


_CALL_ONCE = {
    "filter_jit": lambda f, x: eqpar.filter_jit(f)(x),
    "filter_vmap": lambda f, x: eqpar.filter_vmap(f)(x),
    "filter_jit(filter_vmap)": lambda f, x: eqpar.filter_jit(eqpar.filter_vmap(f))(x),
    "filter_pmap": lambda f, x: eqpar.filter_pmap(f)(x),
    "filter_shard_map": lambda f, x: eqpar.filter_shard_map(
        f, in_specs=P("data"), out_specs=P("data"), mesh=_auto_mesh()
    )(x),
    "Parallel": lambda f, x: eqpar.Parallel(f)(x),
}


@pytest.mark.parametrize("transform", list(_CALL_ONCE))
def test_a_dropped_function_is_not_kept_alive(transform):
    x = jnp.arange(8.0)
    f = _new_function()
    ref = weakref.ref(f)
    out = _CALL_ONCE[transform](f, x)
    assert_same(out, x * 2.0)
    del f
    gc.collect()
    assert ref() is None, f"eqpar's {transform} keeps a dropped function alive"
