"""The dispatch core's defects of issue 25, each pinned: nested and concurrent
donating calls (no lock across a traced call), any Python value as a static output,
`Parallel.lower`, ahead-of-time calls that outlive their program's place in the
table, and bounded, least-recently-used, thread-safe tables."""

import threading
from concurrent.futures import ThreadPoolExecutor

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

import eqpar
import eqpar._dispatch._compiled as compiled_module
from eqpar._dispatch._tables import Bounded

from .helpers import TraceCounter


N = 8
AUTO = jax.make_mesh((N,), ("data",), axis_types=(AxisType.Auto,))


def _in_thread(fn, timeout=120.0):
    """`fn()` in a real thread; fails (instead of hanging the suite) if it does not
    finish within `timeout` seconds."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised below
            box["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "deadlock: the call did not finish"
    if "error" in box:
        raise box["error"]
    return box["value"]


# ----------------------------------------------------------------------------------
# Donation: nested and concurrent


@pytest.mark.parametrize("donate", ["all", "all-except-first"])
def test_a_donating_program_called_inside_another_does_not_deadlock(donate):
    inner = eqpar.filter_jit(lambda x: x * 2.0, donate=donate)

    def outer_fn(x, y):
        return inner(x) + y, inner(y)

    outer = eqpar.filter_jit(outer_fn, donate=donate)
    x, y = jnp.arange(4.0), jnp.ones(4)
    a, b = _in_thread(lambda: outer(jnp.copy(x), jnp.copy(y)))
    np.testing.assert_array_equal(a, x * 2.0 + y)
    np.testing.assert_array_equal(b, y * 2.0)


def test_donating_calls_trace_concurrently():
    """Two threads trace donating programs at the same moment: each trace waits for
    the other's to have started, which a lock held across the call forbids."""
    both = threading.Barrier(2, timeout=60)

    def make(scale):
        def f(x):
            both.wait()  # while tracing
            return x * scale

        return eqpar.filter_jit(f, donate="all")

    f2, f3 = make(2.0), make(3.0)
    x = jnp.arange(8.0)
    with ThreadPoolExecutor(2) as pool:
        a = pool.submit(f2, jnp.copy(x))
        b = pool.submit(f3, jnp.copy(x))
        np.testing.assert_array_equal(a.result(timeout=120), x * 2.0)
        np.testing.assert_array_equal(b.result(timeout=120), x * 3.0)


def test_quiet_donation_leaves_no_warning_filter_behind():
    import warnings

    before = list(warnings.filters)
    f = eqpar.filter_jit(lambda x: x.sum(), donate="all")  # x cannot be reused
    f(jnp.ones(3))
    assert warnings.filters == before
    with pytest.warns(UserWarning, match="Some donated buffers"):
        eqpar.filter_jit(lambda x: x.sum(), donate="warn")(jnp.ones(5))


# ----------------------------------------------------------------------------------
# Any Python value as a static output


class _Unhashable:
    __hash__ = None  # type: ignore[assignment]

    def __eq__(self, other):
        return isinstance(other, _Unhashable)


_STATICS = ("mapped", "unmapped", "<array>", None, ("concat", frozenset({1})))


def _with_statics(x):
    return x * 2.0, _STATICS, {"u": _Unhashable()}


def _check(out, expected):
    arrays, statics, holder = out
    np.testing.assert_allclose(arrays, expected, rtol=1e-6)
    assert statics == _STATICS
    assert isinstance(holder["u"], _Unhashable)


def test_any_python_value_is_a_static_output_of_filter_vmap():
    x = jnp.arange(8.0)
    _check(eqpar.filter_vmap(_with_statics)(x), x * 2.0)
    _check(eqpar.filter_vmap(_with_statics, chunk_size=3)(x), x * 2.0)
    _check(eqpar.filter_jit(eqpar.filter_vmap(_with_statics))(x), x * 2.0)


def test_any_python_value_is_a_static_output_of_filter_pmap():
    x = jnp.arange(float(N))
    _check(eqpar.filter_pmap(_with_statics)(x), x * 2.0)


def test_any_python_value_is_a_static_output_of_the_mesh_transforms():
    x = jnp.arange(16.0)
    _check(eqpar.filter_jit(_with_statics)(x), x * 2.0)
    _check(
        eqpar.filter_shard_map(
            _with_statics, mesh=AUTO, in_specs=P("data"), out_specs=P("data")
        )(x),
        x * 2.0,
    )
    _check(eqpar.Parallel(_with_statics)(x), x * 2.0)


# ----------------------------------------------------------------------------------
# Ahead of time


@pytest.mark.parametrize("reduce", ["concat", "mean", None])
def test_parallel_lowers_and_compiles_ahead_of_time(reduce):
    model = eqx.nn.MLP(3, 2, 8, 1, key=jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (16, 3))
    f = eqpar.Parallel(lambda m, x: jax.vmap(m)(x), reduce=reduce)
    lowered = f.lower(model, x)
    assert "sharding" in lowered.as_text()
    out = lowered.compile()(model, x)
    expected = f(model, x)
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    if reduce == "concat":
        np.testing.assert_allclose(out, jax.vmap(model)(x), rtol=1e-5, atol=1e-6)


def test_an_ahead_of_time_call_outlives_its_program_in_the_table(monkeypatch):
    monkeypatch.setattr(compiled_module, "MAX_PROGRAMS", 2)
    counter = TraceCounter(lambda x, tag=0: x + 1.0)
    # A fresh axis name: a caller of its own, with the small table.
    f = eqpar.Parallel(counter, axis_name="aot_outlives")
    x = jnp.arange(8.0)
    compiled = f.lower(x).compile()
    for tag in (1, 2, 3):  # three other programs push it out of a table of two
        f(x, tag=tag)
    assert counter.count == 4
    np.testing.assert_array_equal(compiled(x), x + 1.0)
    with pytest.raises(eqpar.SpecError, match="Lower it again"):
        compiled(x, extra=1)


def test_programs_in_use_stay_while_others_come_and_go(monkeypatch):
    monkeypatch.setattr(compiled_module, "MAX_PROGRAMS", 2)
    counter = TraceCounter(lambda x, tag=0: x * 3.0)
    mesh = jax.make_mesh((N,), ("lru",), axis_types=(AxisType.Auto,))
    # A mesh of its own: a caller of its own, with the small table.
    f = eqpar.filter_shard_map(
        counter, mesh=mesh, in_specs=P("lru"), out_specs=P("lru")
    )
    step = jnp.arange(8.0)
    f(step)
    assert counter.count == 1
    for tag in (1, 2, 3, 4):  # the step is used between every other program
        f(step, tag=tag)  # a static value of its own: a program of its own
        np.testing.assert_array_equal(f(step), step * 3.0)
    assert counter.count == 5  # the step traced once: never evicted


# ----------------------------------------------------------------------------------
# Tables


def test_bounded_is_least_recently_used():
    table: Bounded[str] = Bounded(2)
    table.put("a", "A")
    table.put("b", "B")
    assert table.get("a") == "A"  # now the most recent
    table.put("c", "C")
    assert table.get("b") is None and table.get("a") == "A" and len(table) == 2


def test_bounded_under_threads_stays_bounded_and_consistent():
    table: Bounded[tuple] = Bounded(16)
    start = threading.Barrier(4)

    def work(worker):
        start.wait()
        for i in range(3000):
            key = (worker + i) % 40
            got = table.get_or_make(key, lambda: (key,))
            assert got == (key,)
            if i % 7 == 0:
                table.discard(key, got)
            assert len(table) <= 16
        return True

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(work, range(4)))


def test_chunk_choices_from_threads_give_the_serial_results():
    def f(x):
        return jnp.tanh(jnp.outer(x, x)) @ x

    mapped = eqpar.filter_vmap(f, chunk_size="auto", memory_budget=2**16)
    xs = [jax.random.normal(jax.random.key(i), (8 * (1 + i % 3), 16)) for i in range(6)]
    expected = [jax.vmap(f)(x) for x in xs]
    start = threading.Barrier(3)

    def run(worker):
        start.wait()
        return [(i, mapped(xs[i % len(xs)])) for i in range(worker, len(xs) * 3, 3)]

    with ThreadPoolExecutor(3) as pool:
        results = [r for rs in pool.map(run, range(3)) for r in rs]
    for i, out in results:
        np.testing.assert_allclose(out, expected[i % len(xs)], rtol=1e-5, atol=1e-5)


def test_every_table_of_the_core_is_bounded():
    from eqpar import _jit
    from eqpar._dispatch import _parts, _wrapper

    for table in (
        _parts._TOKENS,
        _parts._RECORDS,
        _wrapper._STRUCTURES,
        _wrapper._SHARED,
        _jit._CALLERS,
    ):
        assert isinstance(table, Bounded)


# ----------------------------------------------------------------------------------
# Parallel's default (check_vma=False): outputs the same on every device


def _loss(w, x, y):
    return jnp.mean((x @ w["a"] + w["b"][None] - y) ** 2)


def _objax_step(w, x, y):
    loss, g = jax.value_and_grad(_loss)(w, x, y)
    g = jax.lax.pmean(g, "devices")
    new = jax.tree.map(lambda p, d: p - 0.1 * d, w, g)
    return new, jax.lax.pmean(loss, "devices"), loss[None]


def _problem():
    w = {
        "a": jax.random.normal(jax.random.key(0), (4, 3)),
        "b": jax.random.normal(jax.random.key(1), (3,)),
    }
    x = jax.random.normal(jax.random.key(2), (16, 4))
    y = jax.random.normal(jax.random.key(3), (16, 3))
    return w, x, y


def _collectives(text):
    return {
        kind: text.count(f" {kind}(") + text.count(f" {kind}-start(")
        for kind in ("all-reduce", "all-gather", "collective-permute", "all-to-all")
    }


def test_default_parallel_objax_step_is_the_mean_and_device_0s_value():
    w, x, y = _problem()
    step = eqpar.Parallel(_objax_step, reduce="first", in_axes=(None, 0, 0))
    new, mean_loss, first_loss = step(w, x, y)
    shards = [(x[2 * i : 2 * i + 2], y[2 * i : 2 * i + 2]) for i in range(N)]
    grads = [jax.grad(_loss)(w, *s) for s in shards]
    expected = jax.tree.map(lambda p, *g: p - 0.1 * (sum(g) / N), w, *grads)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        new,
        expected,
    )
    np.testing.assert_allclose(
        mean_loss, np.mean([_loss(w, *s) for s in shards]), rtol=1e-5
    )
    # A value that differs between devices: exactly device 0's, as before.
    mesh = jax.make_mesh((N,), ("devices",), axis_types=(AxisType.Auto,))
    raw = jax.jit(
        jax.shard_map(
            _objax_step,
            mesh=mesh,
            in_specs=(P(), P("devices"), P("devices")),
            out_specs=(P(), P(), P("devices")),
            check_vma=False,
        )
    )
    raw_new, raw_mean, raw_losses = raw(w, x, y)
    np.testing.assert_array_equal(first_loss, raw_losses[:1])
    # The parameters are raw jit(shard_map)'s, bit for bit, from the same program.
    jax.tree.map(np.testing.assert_array_equal, new, raw_new)
    np.testing.assert_array_equal(mean_loss, raw_mean)


def test_default_parallel_returns_same_outputs_without_communicating_them():
    w, x, y = _problem()

    def step(w, x, y):
        new, mean_loss, _ = _objax_step(w, x, y)
        return new, mean_loss

    mesh = jax.make_mesh((N,), ("devices",), axis_types=(AxisType.Auto,))
    raw = jax.jit(
        jax.shard_map(
            step,
            mesh=mesh,
            in_specs=(P(), P("devices"), P("devices")),
            out_specs=P(),
            check_vma=False,
        )
    )
    raw_text = raw.lower(w, x, y).compile().as_text()
    for reduce in ("first", "mean"):
        par = eqpar.Parallel(step, reduce=reduce, in_axes=(None, 0, 0))
        text = par.lower(w, x, y).compile().as_text()
        assert _collectives(text) == _collectives(raw_text), reduce


def test_default_parallel_keeps_per_device_values_per_device():
    """What is not certainly the same everywhere is still stacked: a value after
    `axis_index`, a `ppermute`, or a loop whose carry becomes per device."""
    x = jnp.arange(16.0)

    def step(x):
        i = jax.lax.axis_index("devices").astype(jnp.float32)
        shifted = jax.lax.ppermute(
            x.sum(), "devices", [(j, (j + 1) % N) for j in range(N)]
        )

        def body(carry, _):
            a, b = carry
            return (b, i), None

        (looped, _), _ = jax.lax.scan(body, (jnp.float32(0), jnp.float32(0)), None, 2)
        return i, shifted, looped, jax.lax.psum(x.sum(), "devices")

    firsts = eqpar.Parallel(step, reduce="first")(x)
    np.testing.assert_array_equal(firsts[0], 0.0)
    np.testing.assert_array_equal(firsts[1], x[-2:].sum())  # from device 7
    np.testing.assert_array_equal(firsts[2], 0.0)  # device 0's index, after 2 steps
    np.testing.assert_array_equal(firsts[3], x.sum())
    means = eqpar.Parallel(step, reduce="mean")(x)
    np.testing.assert_allclose(means[0], np.mean(np.arange(N)), rtol=1e-6)
    np.testing.assert_allclose(means[2], np.mean(np.arange(N)), rtol=1e-6)


def test_parallel_traces_fun_once_for_a_padded_batch():
    counter = TraceCounter(lambda x: x * 2.0)
    out = eqpar.Parallel(counter)(jnp.arange(13.0))
    np.testing.assert_array_equal(out, jnp.arange(13.0) * 2.0)
    assert counter.count == 1


# ----------------------------------------------------------------------------------
# One home for meshes


def test_one_axis_meshes_come_from_one_place():
    devices = jax.devices()[::-1][:4]
    mesh = eqpar.data_mesh("rows", devices)
    assert list(mesh.devices) == devices  # in the order given
    assert eqpar.data_mesh("rows", devices) is mesh  # built once
    assert mesh.axis_types == (AxisType.Auto,)
    explicit = eqpar.data_mesh("rows", devices, explicit=True)
    assert explicit.axis_types == (AxisType.Explicit,)
    x = jnp.arange(8.0)
    # filter_pmap and Parallel's default mesh: the same builder, the same answers
    np.testing.assert_array_equal(
        eqpar.filter_pmap(lambda v: v * 2.0, devices=devices)(x[:4]), x[:4] * 2.0
    )
    np.testing.assert_array_equal(eqpar.Parallel(lambda v: v + 1.0)(x), x + 1.0)


def test_no_context_mesh_is_one_error_everywhere():
    from jax.sharding import PartitionSpec

    with pytest.raises(eqpar.MeshError, match="no mesh is set"):
        eqpar.filter_device_put(jnp.ones(8), PartitionSpec("data"))
    with pytest.raises(eqpar.MeshError, match="no mesh is set"):
        eqpar.filter_shard_map(lambda v: v, in_specs=P(), out_specs=P())(jnp.ones(8))


# ----------------------------------------------------------------------------------
# User callables in in_axes run once per call signature


def test_a_callable_in_axes_runs_once_per_signature():
    seen = []

    def batch_axis(leaf):
        seen.append(leaf.shape)
        return 0

    x = jnp.arange(16.0).reshape(8, 2)
    par = eqpar.Parallel(lambda v: v * 2.0, in_axes=batch_axis)
    np.testing.assert_array_equal(par(x), x * 2.0)
    assert seen == [(8, 2)]
    par(x)
    assert seen == [(8, 2)]  # the same signature: nothing resolved again
    pmapped = eqpar.filter_pmap(lambda v: v + 1.0, in_axes=batch_axis)
    seen.clear()
    np.testing.assert_array_equal(pmapped(x), x + 1.0)
    assert seen == [(8, 2)]


def test_what_is_the_same_on_every_device_is_read_conservatively():
    from eqpar._vma import same_on_every_device

    def host(v):
        return np.float32(0.0)

    def f(w, x):
        callback = jax.experimental.io_callback(
            host, jax.ShapeDtypeStruct((), jnp.float32), w.sum(), ordered=False
        )
        summed = jax.lax.psum(x, "devices")
        branched = jax.lax.cond(w.sum() > 0, lambda: w * 2.0, lambda: w)
        varying_inside = jax.lax.cond(
            w.sum() > 0,
            lambda: w + jax.lax.axis_index("devices").astype(jnp.float32),
            lambda: w,
        )
        return callback, summed, w * 3.0, x, branched, varying_inside

    w, x = jnp.ones(3), jnp.ones(3)
    closed = jax.make_jaxpr(f, axis_env=[("devices", N)])(w, x)
    assert same_on_every_device(closed.jaxpr, [True, False], "devices") == [
        False,  # a host callback may answer each device differently
        True,  # psum over the axis
        True,  # from a broadcast input
        False,  # the device's own block
        True,  # a branch on broadcast values
        False,  # a branch that reads the device index
    ]
