"""The dispatch core is sound: what it caches is keyed as finely as `jax.jit`'s own
cache (weak types, x64, the context mesh), a program runs exactly once per call,
every compiling transform can be called from many threads with any shapes, a donated
input used again is an eqpar error, typed keys go in and out, and wrappers keep what
Equinox's keep."""

import json
import pathlib
import subprocess
import sys
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import eqpar
from eqpar._dispatch import _parts

from .helpers import TraceCounter


N = 8
AUTO = jax.make_mesh((N,), ("data",), axis_types=(AxisType.Auto,))


def _model(seed=0):
    return eqx.nn.MLP(4, 3, 8, 1, key=jax.random.key(seed))


def _apply(m, x):
    return jax.vmap(m)(x)


def _transforms(fun):
    """Each compiling transform of `fun(model, x)` with `x` a batch of rows, and how
    its output compares with `jax.vmap(model)(x)` (`(function, to_rows)`). Built
    afresh on every call, so each test starts with a cold cache."""
    pmapped = eqpar.filter_pmap(fun, in_axes=(None, 0))
    return {
        "filter_jit": (eqpar.filter_jit(fun), lambda y: y),
        "filter_shard_map": (
            eqpar.filter_shard_map(
                fun, mesh=AUTO, in_specs=(P(), P("data")), out_specs=P("data")
            ),
            lambda y: y,
        ),
        "filter_pmap": (
            lambda m, x: pmapped(m, x.reshape(N, -1, x.shape[-1])),
            lambda y: y.reshape(-1, y.shape[-1]),
        ),
        "Parallel": (eqpar.Parallel(fun, in_axes=(None, 0)), lambda y: y),
    }


TRANSFORMS = ["filter_jit", "filter_shard_map", "filter_pmap", "Parallel"]


# ----------------------------------------------------------------------------------
# Threads


def _fresh_apply():
    """A new function object per test: programs are keyed by it, so its cache is
    cold."""

    def apply(m, x):
        return jax.vmap(m)(x)

    return apply


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
@pytest.mark.parametrize("name", TRANSFORMS)
def test_threads_with_mixed_shapes_give_what_serial_calls_give(name, warm):
    f, rows = _transforms(_fresh_apply())[name]
    model = _model()
    batches = [
        jax.random.normal(jax.random.key(i), (size, 4))
        for i, size in enumerate([8, 16, 24, 32, 8, 16])
    ]
    expected = [jax.vmap(model)(x) for x in batches]
    if warm:
        for x in batches:
            f(model, x)
    jobs = [i % len(batches) for i in range(4 * 30)]
    start = threading.Barrier(4)

    def run(worker: int) -> list[tuple[int, object]]:
        # Each call waits for its result: many multi-device programs left in flight
        # from several threads can hang XLA's CPU backend (raw `jax.pmap` too).
        start.wait()
        return [
            (i, jax.block_until_ready(rows(f(model, batches[i]))))
            for i in jobs[worker::4]
        ]

    with ThreadPoolExecutor(4) as pool:
        results = [r for rs in pool.map(run, range(4)) for r in rs]
    assert len(results) == len(jobs)
    for i, out in results:
        np.testing.assert_allclose(out, expected[i], rtol=1e-5, atol=1e-6)


def test_threads_building_wrappers_inline_share_one_trace():
    counter = TraceCounter(_apply)
    model, x = _model(), jnp.ones((16, 4))

    def run(_: int) -> object:
        return [
            jax.block_until_ready(eqpar.filter_jit(counter)(model, x))
            for _ in range(20)
        ]

    with ThreadPoolExecutor(4) as pool:
        for outs in pool.map(run, range(4)):
            for out in outs:
                np.testing.assert_allclose(out, jax.vmap(model)(x), rtol=1e-6)
    assert counter.count == 1


# ----------------------------------------------------------------------------------
# Keyed as finely as jax.jit


def _weakness(x):
    return x + 1, "weak" if jax.typeof(x).weak_type else "strong"


@pytest.mark.parametrize("name", TRANSFORMS)
def test_a_static_output_follows_weak_types_as_jax_jit_does(name):
    if name == "filter_jit":
        f = eqpar.filter_jit(_weakness)
        call = f
    elif name == "filter_shard_map":
        f = eqpar.filter_shard_map(
            _weakness, mesh=AUTO, in_specs=P(), out_specs=P(), check_vma=False
        )
        call = f
    elif name == "filter_pmap":
        f = eqpar.filter_pmap(_weakness, in_axes=None, out_axes=None, axis_size=2)
        call = f
    else:
        f = eqpar.Parallel(
            lambda b, x: (b + x, _weakness(x)[1]), in_axes=(0, None), reduce="concat"
        )
        call = lambda x: f(jnp.zeros(N), x)  # noqa: E731
    strong, weak = jnp.float32(1.0), jnp.asarray(1.0)
    assert not jax.typeof(strong).weak_type and jax.typeof(weak).weak_type
    answers = [call(x)[1] for x in (strong, weak, strong, weak)]
    assert answers == ["strong", "weak", "strong", "weak"]
    # Equinox gives the same.
    eqx_f = eqx.filter_jit(_weakness)
    assert [eqx_f(x)[1] for x in (strong, weak, strong)] == ["strong", "weak", "strong"]


def test_x64_changes_give_jax_jits_answers():
    def f(x):
        return x + 1, jnp.zeros(()).dtype.name

    ours, raw = eqpar.filter_jit(f), jax.jit(lambda x: (x + 1, jnp.zeros(())))
    x = np.ones(3)  # NumPy float64: canonicalised by the x64 flag
    out32, name32 = ours(x)
    with jax.enable_x64(True):
        out64, name64 = ours(x)
        assert out64.dtype == raw(x)[0].dtype == jnp.float64
        assert name64 == raw(x)[1].dtype.name == "float64"
    again, name_again = ours(x)
    assert out32.dtype == again.dtype == jnp.float32
    assert name32 == name_again == "float32"


def test_the_context_mesh_is_part_of_the_key():
    def f(x):
        return x * 2, str(jax.sharding.get_abstract_mesh().axis_names)

    ours = eqpar.filter_jit(f)
    x = jnp.ones(8)
    assert ours(x)[1] == "()"
    with jax.set_mesh(AUTO):
        assert ours(x)[1] == "('data',)"
    assert ours(x)[1] == "()"
    assert eqx.filter_jit(f)(x)[1] == "()"


def test_a_context_mesh_picks_the_program_of_filter_shard_map():
    f = eqpar.filter_shard_map(
        lambda x: eqpar.psum(x.sum(), "data"), in_specs=P("data"), out_specs=P()
    )
    x = jnp.arange(16.0)
    with jax.set_mesh(AUTO):
        assert f(x) == x.sum()
    four = jax.make_mesh((4,), ("data",), axis_types=(AxisType.Auto,))
    with jax.set_mesh(four):
        out = f(x)
    assert out == x.sum() and len(out.sharding.device_set) == 4


# ----------------------------------------------------------------------------------
# Exactly once


@pytest.mark.programs
@pytest.mark.parametrize("mode", ["raise", "ok"])
def test_a_program_runs_exactly_once_per_call(mode):
    """A host callback (raising or not) runs as often per eqpar call as per call of
    the same program in raw JAX, for every compiling transform: a failed program
    is never run again. In a process of its own, since a failed callback leaves
    JAX's effect tokens failed for the rest of the process."""
    worker = pathlib.Path(__file__).with_name("_callback_worker.py")
    done = subprocess.run(
        [sys.executable, str(worker), mode],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(counts) == set(TRANSFORMS)
    for name, (raw, first, cached) in counts.items():
        assert raw >= 1, name
        assert first == cached == raw, (name, counts[name])


# ----------------------------------------------------------------------------------
# Alternating shapes


@pytest.mark.parametrize("name", TRANSFORMS)
def test_alternating_shapes_trace_once_each_and_stay_right(name):
    counter = TraceCounter(_apply)
    f, rows = _transforms(counter)[name]
    model = _model()
    small, large = jnp.ones((32, 4)), jnp.linspace(-1, 1, 256).reshape(64, 4)
    for _ in range(5):
        for x in (small, large):
            np.testing.assert_allclose(
                rows(f(model, x)), jax.vmap(model)(x), rtol=1e-5, atol=1e-6
            )
    assert counter.count == 2


# ----------------------------------------------------------------------------------
# Donation


def _donating(name):
    """A donating step `(model, x) -> (model, y)` and the shape of its `x`."""

    def step(m, x):
        return m, jax.vmap(jax.vmap(m))(x)

    if name == "filter_jit":
        return eqpar.filter_jit(step, donate="all"), (N, 2, 4)
    if name == "filter_shard_map":
        return eqpar.filter_shard_map(
            step,
            mesh=AUTO,
            in_specs=(P(), P("data")),
            out_specs=(P(), P("data")),
            donate="all",
        ), (N, 2, 4)
    if name == "filter_pmap":
        pmapped = eqpar.filter_pmap(
            lambda m, x: (m, jax.vmap(m)(x)),
            in_axes=(None, 0),
            out_axes=(None, 0),
            donate="all",
        )
        return pmapped, (N, 2, 4)
    return eqpar.Parallel(
        step,
        in_axes=(None, 0),
        reduce="first",
        mesh=AUTO,
        axis_name="data",
        donate="all",
        check_vma=False,
    ), (N, 2, 4)


def _placed(x):
    return jax.device_put(x, NamedSharding(AUTO, P("data")))


@pytest.mark.parametrize("name", TRANSFORMS)
def test_a_donated_input_used_again_is_an_eqpar_error(name):
    f, shape = _donating(name)
    params, static = eqx.partition(_model(), eqx.is_array)
    placed = eqx.combine(jax.device_put(params, NamedSharding(AUTO, P())), static)
    model, _ = f(placed, _placed(jnp.ones(shape)))  # donates placed's arrays
    assert placed.layers[0].weight.is_deleted()
    with pytest.raises(eqpar.DeletedArrayError, match="donated.*in its place"):
        f(placed, _placed(jnp.ones(shape)))
    gone = _placed(jnp.ones(shape))
    gone.delete()
    with pytest.raises(eqpar.DeletedArrayError, match="argument `x` at"):
        f(model, gone)
    x = _placed(jnp.linspace(0.0, 1.0, np.prod(shape)).reshape(shape))
    np.testing.assert_allclose(  # the returned model is fine
        jax.vmap(model)(x.reshape(-1, 4)),
        jax.vmap(_model())(x.reshape(-1, 4)),
        rtol=1e-6,
    )


def test_donating_a_copy_warns_with_eqpars_warning_at_the_callers_line():
    f, shape = _donating("filter_shard_map")
    model = _model()  # on one device: placed (copied) before it can be donated
    with pytest.warns(eqpar.EqparWarning, match="copied there first") as record:
        f(model, jnp.ones(shape))
    assert record[0].filename == __file__


# ----------------------------------------------------------------------------------
# Typed keys


def test_typed_keys_go_in_and_out_of_every_transform():
    key = jax.random.key(0)
    keys = jax.random.split(key, N)

    def draw(k):
        return jax.random.split(k), jax.random.normal(k, (2,))

    out_keys, values = eqpar.filter_jit(draw)(key)
    ref_keys, ref_values = draw(key)
    assert jnp.array_equal(jax.random.key_data(out_keys), jax.random.key_data(ref_keys))
    np.testing.assert_array_equal(values, ref_values)

    ref = jax.vmap(draw)(keys)
    for f in (
        eqpar.filter_pmap(draw),
        eqpar.filter_shard_map(
            lambda k: jax.vmap(draw)(k),
            mesh=AUTO,
            in_specs=P("data"),
            out_specs=P("data"),
        ),
        eqpar.Parallel(lambda k: jax.vmap(draw)(k), in_axes=0),
    ):
        for _ in range(2):
            got_keys, got = f(keys)
            assert jnp.array_equal(
                jax.random.key_data(got_keys), jax.random.key_data(ref[0])
            )
            np.testing.assert_array_equal(got, ref[1])


def test_typed_key_committed_elsewhere_is_placed():
    keys = jax.device_put(jax.random.split(jax.random.key(1), N), jax.devices()[3])
    f = eqpar.filter_shard_map(
        lambda k: jax.vmap(lambda k: jax.random.normal(k))(k),
        mesh=AUTO,
        in_specs=P("data"),
        out_specs=P("data"),
    )
    expected = jax.vmap(lambda k: jax.random.normal(k))(keys)
    for _ in range(2):
        np.testing.assert_array_equal(f(keys), expected)


# ----------------------------------------------------------------------------------
# Wrappers


def _annotated(x: jax.Array, n: int = 2) -> jax.Array:
    """Doubles."""
    return x * n


@pytest.mark.parametrize(
    "make",
    [
        eqpar.filter_jit,
        eqpar.filter_vmap,
        eqpar.filter_pmap,
        lambda f: eqpar.filter_shard_map(f, mesh=AUTO, in_specs=P(), out_specs=P()),
    ],
    ids=["filter_jit", "filter_vmap", "filter_pmap", "filter_shard_map"],
)
def test_wrappers_keep_what_equinox_keeps(make):
    ours, theirs = make(_annotated), eqx.filter_jit(_annotated)
    for name in (
        "__name__",
        "__qualname__",
        "__doc__",
        "__module__",
        "__annotations__",
    ):
        assert getattr(ours, name) == getattr(theirs, name) == getattr(_annotated, name)
    assert ours.__wrapped__ is _annotated
    # Also after being flattened and rebuilt (e.g. through filter_jit).
    rebuilt = jtu.tree_unflatten(*reversed(jtu.tree_flatten(ours)))
    assert rebuilt.__annotations__ == _annotated.__annotations__
    assert rebuilt.__name__ == "_annotated"
    passed = eqpar.filter_jit(lambda w: (w.__annotations__, w.__name__))(ours)
    assert passed == (_annotated.__annotations__, "_annotated")


def test_a_wrapper_built_inline_is_a_real_module():
    a = eqpar.filter_jit(_annotated)
    b = eqpar.filter_jit(_annotated)  # rebuilt from the first one's structure
    assert isinstance(b, eqx.Module)
    assert jtu.tree_structure(a) == jtu.tree_structure(b)
    assert a.__dict__.keys() == b.__dict__.keys()
    assert b(jnp.ones(2)).tolist() == [2.0, 2.0]


def test_a_wrapped_function_is_not_kept_alive():
    import gc
    import weakref

    def f(x):
        return x + 1

    ref = weakref.ref(f)
    g = eqpar.filter_jit(f)
    g(jnp.ones(2))
    eqpar.filter_jit(f)(jnp.ones(2))
    del f, g
    gc.collect()
    assert ref() is None


def test_no_warning_on_a_plain_call():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        eqpar.filter_jit(_annotated)(jnp.ones(2))


# ----------------------------------------------------------------------------------
# Arguments cut into parts, each Module flattened once


class _Tag:
    """A static field that counts how often it is compared: once per flatten of its
    Module by the dispatch core (to find the argument's structure)."""

    comparisons = 0

    def __eq__(self, other):
        _Tag.comparisons += 1
        return isinstance(other, _Tag)

    def __hash__(self):
        return 0


class _Holder(eqx.Module):
    w: jax.Array
    tag: _Tag = eqx.field(static=True)


def test_a_module_passed_again_is_not_flattened_again_and_stays_right():
    f = eqpar.filter_jit(lambda h, x: h.w * x)
    holder, x = _Holder(jnp.arange(3.0), _Tag()), jnp.ones(3)
    f(holder, x)
    f(_Holder(jnp.arange(3.0), _Tag()), x)
    before = _Tag.comparisons
    for i in range(5):
        np.testing.assert_array_equal(f(holder, x + i), jnp.arange(3.0) * (1 + i))
    assert _Tag.comparisons == before  # remembered: not flattened again
    other = _Holder(jnp.ones(3), _Tag())  # a new Module is flattened
    np.testing.assert_array_equal(f(other, x), np.ones(3))
    assert _Tag.comparisons > before


class _Stepper(eqx.Module):
    w: jax.Array
    act: object  # a non-array leaf: the output comes back through jit's node data
    tag: _Tag = eqx.field(static=True)


def _step(m, x):
    new = eqx.tree_at(lambda m: m.w, m, 0.5 * m.w + m.act(x))
    return new, jnp.sum(new.w)


@pytest.mark.parametrize("act", [jnp.tanh, lambda v: 2.0 * v], ids=["jax", "lambda"])
def test_a_module_fed_back_is_looked_up_not_flattened_and_stays_right(act):
    """A training loop's output Module, passed into the next call, is found by its
    remembered part (not flattened again) and every step equals `jax.jit` on the
    array alone, with one trace."""
    counter = TraceCounter(_step)
    f = eqpar.filter_jit(counter)
    x = jnp.linspace(-1.0, 1.0, 3)
    m = _Stepper(jnp.arange(3.0), act, _Tag())
    m, _ = f(m, x)
    m, _ = f(m, x)
    w = m.w
    ref = jax.jit(lambda w: 0.5 * w + act(x))
    for _ in range(5):
        m, total = f(m, x)
        # Its part is remembered as it is rebuilt: the next call looks it up.
        record = _parts._RECORDS.get(id(m))
        assert record is not None and record[0]() is m
        w = ref(w)
        np.testing.assert_allclose(m.w, w, rtol=1e-6)
        np.testing.assert_allclose(total, jnp.sum(w), rtol=1e-6)
        assert m.act is act
    assert counter.count == 1
    # A Module fed back from a program inside an outer trace is not remembered
    # (its arrays are tracers), and is right.
    twice = eqx.filter_jit(lambda m: f(f(m, x)[0], x)[0].w)(m)
    np.testing.assert_allclose(twice, ref(ref(w)), rtol=1e-6)


class _Pair(eqx.Module):
    c: jax.Array
    w: jax.Array
    tag: str = "t"


@pytest.mark.parametrize("outer", ["grad", "vmap"])
def test_an_output_partly_traced_under_an_outer_transform_keeps_one_trace(outer):
    """Under an eager `jax.grad` or `filter_vmap`, some outputs come back concrete
    and others as tracers: nothing is remembered from such an output, and a model
    fed back afterwards finds the one program (one trace, as `eqx.filter_jit`)."""
    counter = TraceCounter(lambda m, x: _Pair(m.c, m.w * x))
    f = eqpar.filter_jit(counter)
    m, x = _Pair(jnp.ones(3), jnp.arange(3.0)), jnp.full(3, 2.0)
    if outer == "grad":  # c has a zero tangent: it comes back concrete
        g = jax.grad(lambda x: f(m, x).w.sum())(x)
        np.testing.assert_allclose(g, m.w)
    else:  # c does not depend on the mapped x: it comes back concrete
        out = eqpar.filter_vmap(f, in_axes=(None, 0))(m, jnp.stack([x, x]))
        np.testing.assert_allclose(out.w, jnp.stack([m.w * x] * 2))
    out = f(m, x)
    for _ in range(3):
        out = f(out, x)
    np.testing.assert_allclose(out.w, m.w * x**4)
    assert counter.count == 1


def test_donating_a_copy_of_an_unplaced_input_never_deletes_the_source():
    """An input on one device that a donating program copies to its devices: the
    copy is donated, the source stays alive (`device_put` would otherwise share the
    source's buffer on its own device), call after call."""
    w = jax.device_put(jnp.ones((8, 8)), jax.devices()[0])
    f = eqpar.filter_pmap(
        lambda w, x: (w * 2.0, x + 1.0),
        in_axes=(None, 0),
        out_axes=(None, 0),
        donate="all",
    )
    for _ in range(3):
        with pytest.warns(eqpar.EqparWarning, match="the copy was donated"):
            doubled, _ = f(w, jnp.ones((N, 3)))
        assert not w.is_deleted()
        np.testing.assert_array_equal(doubled, np.full((8, 8), 2.0))


def test_a_fed_back_module_holding_a_list_is_flattened_and_stays_right():
    class Listed(eqx.Module):
        ws: list
        act: object

    f = eqpar.filter_jit(lambda m, x: Listed([w * 0.5 + m.act(x) for w in m.ws], m.act))
    x = jnp.ones(2)
    m = Listed([jnp.zeros(2), jnp.ones(2)], jnp.tanh)
    for _ in range(3):
        m = f(m, x)
        m.ws.append(jnp.zeros(2))  # changed in place: must be flattened again
        m.ws.pop()
    want = [jnp.zeros(2), jnp.ones(2)]
    for _ in range(3):
        want = [w * 0.5 + jnp.tanh(x) for w in want]
    for a, b in zip(m.ws, want):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_a_remembered_module_is_not_kept_alive():
    import gc
    import weakref

    f = eqpar.filter_jit(lambda m, x: m(x))
    model = _model()
    f(model, jnp.ones(4))
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


def test_keyword_and_positional_dicts_are_different_calls():
    counter = TraceCounter(lambda x, d=None, **kw: x + (d or kw)["a"])
    f = eqpar.filter_jit(counter)
    x, a = jnp.ones(2), jnp.full(2, 3.0)
    np.testing.assert_array_equal(f(x, {"a": a}), 4 * np.ones(2))
    np.testing.assert_array_equal(f(x, a=a), 4 * np.ones(2))
    assert counter.count == 2


def test_a_bound_method_and_a_function_of_the_same_module_are_different_calls():
    class Scale(eqx.Module):
        w: jax.Array

        def __call__(self, x):
            return self.w * x

    m, x = Scale(jnp.full(2, 3.0)), jnp.ones(2)
    np.testing.assert_array_equal(eqpar.filter_jit(m.__call__)(x), 3 * np.ones(2))
    np.testing.assert_array_equal(
        eqpar.filter_jit(Scale.__call__)(m, x), 3 * np.ones(2)
    )
    np.testing.assert_array_equal(eqpar.filter_jit(m)(x), 3 * np.ones(2))


def test_an_unhashable_static_value_names_its_leaf():
    f = eqpar.filter_jit(lambda x, opts: x)
    with pytest.raises(eqpar.SpecError, match=r"argument `opts` at \[0\] \(set\)"):
        f(jnp.ones(2), ({1, 2},))


def test_a_deleted_input_to_any_program_is_named():
    """Also a program that neither donates nor places (JAX's own error, named)."""
    f = eqpar.filter_jit(lambda m, x: m(x))
    model, x = _model(), jnp.ones(4)
    f(model, x)
    x.delete()
    with pytest.raises(eqpar.DeletedArrayError, match="argument `x` at \\(root\\)"):
        f(model, x)


def test_a_mixed_axes_collective_keeps_jaxs_error():
    """A collective over mesh axes that a value varies over only in part is JAX's
    error to explain, not a vmap-axis one."""
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    f = eqpar.filter_shard_map(
        lambda x: jax.lax.pmean(jnp.mean(x), ("data", "model")),
        mesh=mesh,
        in_specs=P("data"),
        out_specs=P(),
    )
    with pytest.raises(ValueError, match="can only accept axis_name") as info:
        f(jnp.ones(8))
    assert not isinstance(info.value, eqpar.ReplicationError)
