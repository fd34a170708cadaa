"""Memory-bounded mapping: chunked `filter_vmap` against the unchunked map and a
Python loop, one traced body per signature, `chunk_size="auto"` against XLA's memory
analysis, per-example keys, and chunking inside `shard_map`/`Parallel`."""

import logging

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st
from jax.sharding import PartitionSpec as P

import eqpar

from .helpers import assert_tree_allclose, TraceCounter


def loop(fn, *batched):
    """Single-device reference: a Python loop over axis 0, stacked."""
    outs = [fn(*xs) for xs in zip(*batched)]
    return jax.tree.map(
        lambda *ys: jnp.stack(ys) if eqx.is_array(ys[0]) else ys[0], *outs
    )


def temps(fn, *args):
    """XLA's temporaries for `fn(*args)` compiled as one program."""
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def element(x, y, w):
    h = jnp.tanh(jnp.outer(x, w) + y)
    return {"v": h @ w, "label": "static"}, jnp.sum(h * h)


# ------------------------------------------------------------------ chunk invariance


@given(n=st.integers(1, 257), chunk=st.integers(1, 300))
def test_every_chunk_size_matches_unchunked_and_a_loop(n, chunk):
    x = jnp.linspace(-1.0, 1.0, n * 3).reshape(n, 3)
    y = jnp.linspace(0.0, 2.0, n)
    w = jnp.array([0.5, -1.0, 2.0])
    full = eqpar.filter_vmap(element, in_axes=(0, 0, None))(x, y, w)
    chunked = eqpar.filter_vmap(element, in_axes=(0, 0, None), chunk_size=chunk)
    out = chunked(x, y, w)
    assert_tree_allclose(out, full)
    if n <= 30:  # a Python loop is slow; jax.vmap stands in for it beyond
        assert_tree_allclose(out, loop(lambda a, b: element(a, b, w), x, y))
    assert_tree_allclose(eqpar.filter_jit(chunked)(x, y, w), full)


@pytest.mark.parametrize("n", [64, 65, 70, 127])
def test_one_traced_body_whatever_the_remainder(n):
    """Under filter_jit the element function is traced once per signature: no
    second body for the remainder, and one loop in the compiled program."""
    f = TraceCounter(lambda x, w: jnp.sin(x * w).sum())
    mapped = eqpar.filter_vmap(f, in_axes=(0, None), chunk_size=16)
    run = eqpar.filter_jit(lambda x, w: mapped(x, w))
    x, w = jnp.ones((n, 5)), jnp.arange(5.0)
    out = run(x, w)
    assert f.count == 1
    run(x + 1, w)  # same signature: no new trace
    assert f.count == 1
    assert_tree_allclose(out, jax.vmap(lambda r: jnp.sin(r * w).sum())(x))
    hlo = jax.jit(lambda x, w: mapped(x, w)).lower(x, w).compile().as_text()
    assert hlo.count(" while(") == 1


def test_eager_chunked_calls_compile_once():
    f = TraceCounter(lambda x: jnp.cos(x) * 2)
    mapped = eqpar.filter_vmap(f, chunk_size=3)
    x = jnp.arange(10.0)
    for _ in range(3):
        assert_tree_allclose(mapped(x), jnp.cos(x) * 2)
    assert f.count == 1


def test_remainder_costs_no_padded_or_trimmed_copies():
    """A size that the chunk does not divide needs no more memory than one it
    does: the last chunk overlaps the one before it instead of being padded."""
    f = lambda x: jnp.tanh(jnp.outer(x, x)).sum(0)  # noqa: E731
    mapped = eqpar.filter_vmap(f, chunk_size=32)
    even = temps(mapped, jnp.ones((1024, 64)))
    uneven = temps(mapped, jnp.ones((1000, 64)))
    assert uneven <= even


def test_axes_unmapped_outputs_modules_and_keys_chunked(getkey):
    mlp = eqx.nn.MLP(3, 2, 8, 2, key=getkey())
    x = jax.random.normal(getkey(), (3, 11))  # mapped along axis 1
    keys = jax.random.split(getkey(), 11)

    def f(model, x, key):
        return model(x) + jax.random.normal(key, (2,)), jnp.sum(model.layers[0].bias)

    kwargs = dict(in_axes=(None, 1, 0), out_axes=(1, None))
    full = eqpar.filter_vmap(f, **kwargs)(mlp, x, keys)
    for chunk in (1, 2, 4, 10):
        out = eqpar.filter_vmap(f, chunk_size=chunk, **kwargs)(mlp, x, keys)
        assert_tree_allclose(out, full)
        assert out[0].shape == (2, 11)
    # Mapped typed-key outputs and an axis_size-only map, chunked.
    split = eqpar.filter_vmap(lambda k: jax.random.split(k), chunk_size=4)(keys)
    assert jnp.array_equal(
        jax.random.key_data(split),
        jax.random.key_data(jax.vmap(jax.random.split)(keys)),
    )
    tiled = eqpar.filter_vmap(lambda v: v * 2, in_axes=None, axis_size=7, chunk_size=3)
    assert_tree_allclose(tiled(jnp.arange(3.0)), jnp.tile(jnp.arange(3.0) * 2, (7, 1)))


def test_gradients_through_a_chunked_map(getkey):
    x = jax.random.normal(getkey(), (37, 4))
    w = jax.random.normal(getkey(), (4,))

    def loss(w, chunk):
        per = eqpar.filter_vmap(
            lambda xi, w: jnp.tanh(xi @ w) ** 2, in_axes=(0, None), chunk_size=chunk
        )(x, w)
        return per.mean()

    assert_tree_allclose(jax.grad(loss)(w, 5), jax.grad(loss)(w, None), rtol=1e-5)


def test_unmapped_output_that_depends_on_the_element_is_named():
    with pytest.raises(eqpar.SpecError, match=r"\[1\]"):
        eqpar.filter_vmap(lambda x: (x, x), out_axes=(0, None), chunk_size=2)(
            jnp.arange(5.0)
        )


# ------------------------------------------------------------------ chunk_size="auto"


def _heavy(x):
    """Per-example temporaries of d x d floats that XLA cannot fuse away."""
    h = jnp.tanh(jnp.outer(x, x))
    return h @ jnp.cos(h) @ x


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.5, 1.0])
def test_auto_fits_the_budget_and_matches(fraction):
    x = jnp.linspace(-1.0, 1.0, 301 * 32).reshape(301, 32)
    unchunked = temps(lambda x: eqpar.filter_vmap(_heavy)(x), x)
    budget = int(unchunked * fraction)
    mapped = eqpar.filter_vmap(_heavy, chunk_size="auto", memory_budget=budget)
    chunk = eqpar.chosen_chunk_size(mapped, x)
    assert temps(lambda x: mapped(x), x) <= budget
    assert (chunk == 301) == (fraction == 1.0)
    # The largest chunk that fits, up to how chunks balance: one that needs a
    # chunk fewer does not fit.
    n_chunks = -(-301 // chunk)
    if n_chunks > 1:
        bigger = -(-301 // (n_chunks - 1))
        fixed = eqpar.filter_vmap(_heavy, chunk_size=bigger)
        assert temps(lambda x: fixed(x), x) > budget
    assert_tree_allclose(mapped(x), jax.vmap(_heavy)(x), rtol=1e-5, atol=1e-5)


def test_auto_choice_is_cached_logged_and_queried(caplog):
    f = TraceCounter(_heavy)
    x = jnp.ones((200, 32))
    mapped = eqpar.filter_vmap(f, chunk_size="auto", memory_budget=100_000)
    with caplog.at_level(logging.DEBUG, logger="eqpar"):
        chunk = eqpar.chosen_chunk_size(mapped, x)
    assert 1 <= chunk < 200
    (record,) = [r for r in caplog.records if "chunk_size='auto'" in r.getMessage()]
    assert f"chunks of {chunk}" in record.getMessage()
    probes = f.count
    assert 2 <= probes <= 10  # a few compiles of the map, on abstract shapes
    # Calls and fresh wrappers with the same options reuse the choice: the map is
    # traced once more (to run), never measured again.
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="eqpar"):
        eqpar.filter_vmap(f, chunk_size="auto", memory_budget=100_000)(x)
        eqpar.filter_vmap(f, chunk_size="auto", memory_budget=100_000)(x)
    assert f.count == probes + 1
    assert not [r for r in caplog.records if "chunk_size='auto'" in r.getMessage()]
    assert eqpar.chosen_chunk_size(mapped, jax.ShapeDtypeStruct((200, 32), x.dtype))
    # A fixed chunk, or none, is reported as it is.
    assert eqpar.chosen_chunk_size(eqpar.filter_vmap(f, chunk_size=7), x) == 7
    assert eqpar.chosen_chunk_size(eqpar.filter_vmap(f), x) == 200


def test_auto_under_jit_and_inside_shard_map(mesh8):
    x = jnp.ones((8 * 40, 32))
    mapped = eqpar.filter_vmap(_heavy, chunk_size="auto", memory_budget=50_000)
    ref = jax.vmap(_heavy)(x)
    assert_tree_allclose(eqpar.filter_jit(lambda x: mapped(x))(x), ref, rtol=1e-5)
    sharded = eqpar.filter_shard_map(
        lambda x: mapped(x), mesh=mesh8, in_specs=P("data"), out_specs=P("data")
    )
    assert_tree_allclose(sharded(x), ref, rtol=1e-5)


def test_budget_below_one_example_warns_and_uses_one():
    mapped = eqpar.filter_vmap(_heavy, chunk_size="auto", memory_budget=16)
    with pytest.warns(eqpar.EqparWarning, match="memory_budget"):
        assert eqpar.chosen_chunk_size(mapped, jnp.ones((50, 32))) == 1


def test_default_and_fractional_budgets():
    from eqpar import _chunking

    x = jnp.ones((64, 8))
    for budget in (None, 0.5):
        mapped = eqpar.filter_vmap(_heavy, chunk_size="auto", memory_budget=budget)
        assert eqpar.chosen_chunk_size(mapped, x) == 64  # small: fits unchunked
    reported = _chunking.device_memory()
    expected = (
        _chunking.DEFAULT_CPU_BUDGET
        if reported is None
        else int(reported * _chunking.DEFAULT_MEMORY_FRACTION)
    )
    assert _chunking.resolve_budget(None) == expected
    assert _chunking.resolve_budget(12345) == 12345
    assert 0 < _chunking.resolve_budget(0.5) <= _chunking.resolve_budget(1.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(chunk_size="big"), "chunk_size"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(chunk_size=True), "chunk_size"),
        (dict(chunk_size=4, memory_budget=2**20), "chunk_size='auto'"),
        (dict(memory_budget=2**20), "chunk_size='auto'"),
        (dict(chunk_size="auto", memory_budget=0), "positive number of bytes"),
        (dict(chunk_size="auto", memory_budget=1.5), r"\(0, 1\]"),
        (dict(chunk_size="auto", memory_budget="1GB"), "number of bytes"),
        (dict(chunk_size="auto", axis_name="i"), "axis_name"),
    ],
)
def test_bad_chunk_options_are_refused(kwargs, match):
    with pytest.raises(eqpar.SpecError, match=match):
        eqpar.filter_vmap(lambda x: x, **kwargs)


def test_bad_options_advice_works_when_followed():
    # "Pass `chunk_size='auto'` as well": then the budget is used.
    x = jnp.ones((100, 32))
    mapped = eqpar.filter_vmap(_heavy, chunk_size="auto", memory_budget=2**16)
    assert eqpar.chosen_chunk_size(mapped, x) < 100
    # "For a number of bytes pass an int (e.g. `memory_budget=2**30` for 1 GiB)".
    mapped = eqpar.filter_vmap(_heavy, chunk_size="auto", memory_budget=2**30)
    assert eqpar.chosen_chunk_size(mapped, x) == 100


def test_chosen_chunk_size_wants_a_filter_vmap():
    with pytest.raises(eqpar.SpecError, match="filter_vmap"):
        eqpar.chosen_chunk_size(eqpar.filter_jit(lambda x: x), jnp.ones(3))


def test_chosen_chunk_size_of_a_method():
    class Model(eqx.Module):
        w: jax.Array

        @eqpar.filter_vmap(in_axes=(None, 0), chunk_size="auto", memory_budget=2**16)
        def __call__(self, x):
            return _heavy(x * self.w)

    model, x = Model(jnp.ones(32)), jnp.ones((100, 32))
    assert eqpar.chosen_chunk_size(model.__call__, x) < 100
    assert_tree_allclose(model(x), jax.vmap(_heavy)(x), rtol=1e-5)


# ------------------------------------------------------------------ per-example keys


def _noise(key, x):
    return x + jax.random.normal(key, x.shape)


@given(n=st.integers(1, 257), chunk=st.integers(1, 64))
def test_split_key_is_fold_in_by_index_for_every_chunk(n, chunk):
    key, x = jax.random.key(3), jnp.zeros((n, 2))
    ref = jax.vmap(lambda i, xi: _noise(jax.random.fold_in(key, i), xi))(
        jnp.arange(n), x
    )
    full = eqpar.filter_vmap(_noise, in_axes=eqpar.split_key)(key, x)
    chunked = eqpar.filter_vmap(_noise, in_axes=eqpar.split_key, chunk_size=chunk)
    np.testing.assert_array_equal(np.asarray(full), np.asarray(ref))
    np.testing.assert_array_equal(np.asarray(chunked(key, x)), np.asarray(ref))


@pytest.mark.parametrize("devices", [1, 2, 8])
@pytest.mark.parametrize("chunk", [None, 1, 3, 16])
def test_keys_identical_for_every_chunk_and_device_count(devices, chunk):
    """Parallel gives each device its examples' keys, fold_in(key, global index);
    a chunked map over them draws what the single-device map draws."""
    key, x = jax.random.key(7), jnp.zeros((37, 4))
    ref = eqpar.filter_vmap(_noise, in_axes=eqpar.split_key)(key, x)
    mesh = eqpar.data_mesh("devices", jax.devices()[:devices])
    run = eqpar.Parallel(eqpar.filter_vmap(_noise, chunk_size=chunk), mesh=mesh)
    np.testing.assert_array_equal(np.asarray(run(key, x)), np.asarray(ref))


def test_split_key_per_argument_and_errors():
    key, x, w = jax.random.key(0), jnp.ones((6, 3)), jnp.ones(3)
    f = lambda k, x, w: _noise(k, x) * w  # noqa: E731
    out = eqpar.filter_vmap(f, in_axes=(eqpar.split_key, 0, None))(key, x, w)
    ref = eqpar.filter_vmap(f, in_axes=eqpar.split_key)(key, x, jnp.ones((6, 3)))
    assert_tree_allclose(out, ref)
    with pytest.raises(eqpar.SpecError, match="legacy.*jax.random.key"):
        eqpar.filter_vmap(f, in_axes=eqpar.split_key)(jax.random.PRNGKey(0), x, w)
    # ...and the advice, followed:
    legacy = jax.random.PRNGKey(0)
    eqpar.filter_vmap(f, in_axes=eqpar.split_key)(
        jax.random.wrap_key_data(legacy), x, x
    )
    with pytest.raises(eqpar.SpecError, match="axis_size"):
        eqpar.filter_vmap(lambda k: jax.random.normal(k), in_axes=eqpar.split_key)(key)
    draws = eqpar.filter_vmap(
        lambda k: jax.random.normal(k), in_axes=eqpar.split_key, axis_size=4
    )(key)
    assert draws.shape == (4,) and len(set(np.asarray(draws).tolist())) == 4


# ------------------------------------------------------------------ inside shard_map


def _psums_in_loops(jaxpr, in_loop=False) -> int:
    """psums inside the body of any scan/while loop of `jaxpr` (recursively)."""
    from jax.extend.core import jaxprs_in_params

    count = 0
    for eqn in jaxpr.eqns:
        if in_loop and "psum" in eqn.primitive.name:
            count += 1
        loop = in_loop or eqn.primitive.name in ("scan", "while")
        for sub in jaxprs_in_params(eqn.params):
            count += _psums_in_loops(getattr(sub, "jaxpr", sub), loop)
    return count


@pytest.mark.parametrize("check_vma", [True, False])
def test_chunked_map_inside_shard_map_and_its_gradient(mesh8, check_vma, getkey):
    x = jax.random.normal(getkey(), (8 * 13, 4))
    w = jax.random.normal(getkey(), (4,))

    def per_example(xi, w):
        return jnp.tanh(xi @ w) ** 2

    def loss(w, x, chunk):
        def body(w, x):
            per = eqpar.filter_vmap(per_example, in_axes=(0, None), chunk_size=chunk)
            return eqpar.psum(per(x, w).sum(), "data")

        total = eqpar.filter_shard_map(
            body,
            mesh=mesh8,
            in_specs=(P(), P("data")),
            out_specs=P(),
            check_vma=check_vma,
        )(w, x)
        return total / x.shape[0]

    ref_value, ref_grad = jax.value_and_grad(
        lambda w: jax.vmap(per_example, in_axes=(0, None))(x, w).mean()
    )(w)
    value, grad = jax.jit(jax.value_and_grad(loss), static_argnums=2)(w, x, 5)
    assert_tree_allclose((value, grad), (ref_value, ref_grad), rtol=1e-5)
    # The broadcast parameter is cast to varying once, before the loop: no psum
    # (the transpose of that cast) runs once per chunk.
    jaxpr = jax.make_jaxpr(jax.grad(loss), static_argnums=2)(w, x, 5)
    assert _psums_in_loops(jaxpr.jaxpr) == 0
    assert "psum" in str(jaxpr)


# ------------------------------------------------------------------ microbatching


def _masked_loss(model, x, y, mask):
    """Mean squared error over the real rows (mask) of whatever rows it is given."""
    err = jnp.sum((jax.vmap(model)(x) - y) ** 2, axis=1)
    real = jnp.sum(mask, dtype=err.dtype)
    return jnp.sum(jnp.where(mask, err, 0.0)) / jnp.maximum(real, 1.0)


def _sharded_step(devices, microbatch, has_aux=False):
    mesh = eqpar.data_mesh("data", jax.devices()[:devices])

    def step(model, x, y, n_real):
        per = x.shape[0]
        start = jax.lax.axis_index("data") * per
        mask = jnp.arange(per) + start < n_real
        count = jnp.clip(n_real - start, 0, per)
        loss = _masked_loss
        if has_aux:
            loss = lambda *a: (_masked_loss(*a), jnp.sum(a[3], dtype=jnp.int32))  # noqa: E731
        out, grads = eqpar.filter_value_and_grad_mean(
            loss, "data", microbatch=microbatch, has_aux=has_aux
        )(model, x, y, mask, count=count)
        return (out[0] if has_aux else out), grads

    return eqpar.filter_shard_map(
        step, mesh=mesh, in_specs=(P(), P("data"), P("data"), P()), out_specs=P()
    )


_reference_value_and_grad = eqx.filter_jit(eqx.filter_value_and_grad(_masked_loss))


@given(
    n=st.integers(1, 257),
    microbatch=st.integers(1, 40),
    devices=st.sampled_from([1, 2, 8]),
)
def test_microbatched_gradient_is_the_full_batch_gradient(n, microbatch, devices):
    model = eqx.nn.MLP(3, 2, 8, 1, key=jax.random.key(0))
    # The data made with numpy and the reference compiled: eagerly, each new shape
    # would compile every operation on its own.
    x = np.linspace(-2.0, 2.0, n * 3, dtype=np.float32).reshape(n, 3)
    x, y = jnp.asarray(x), jnp.asarray(np.cos(x[:, :2]))
    ref = _reference_value_and_grad(model, x, y, np.ones(n, bool))
    (xp, yp), _ = eqpar.pad_batch((x, y), devices)
    out = _sharded_step(devices, microbatch)(model, xp, yp, jnp.int32(n))
    assert_tree_allclose(out, ref, rtol=1e-6, atol=1e-6)


def test_microbatching_bounds_memory_and_emits_no_psum_per_microbatch():
    model = eqx.nn.MLP(64, 1, 256, 2, key=jax.random.key(0))
    x, y = jnp.ones((8 * 512, 64)), jnp.ones((8 * 512, 1))
    args = (model, x, y, jnp.int32(8 * 512))

    def step_temps(microbatch):
        compiled = _sharded_step(8, microbatch).lower(*args).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    full = step_temps(None)
    by_k = {k: step_temps(k) for k in (16, 64)}
    assert by_k[16] < by_k[64] < full
    assert by_k[64] < full / 4  # activations of 64 examples, not 512, per device
    jaxpr = eqx.filter_make_jaxpr(_sharded_step(8, 16))(*args)[0]
    assert _psums_in_loops(jaxpr.jaxpr) == 0  # one psum per gradient, after the loop


def test_microbatch_options_and_aux():
    step = _sharded_step(2, 4, has_aux=True)
    model = eqx.nn.MLP(3, 2, 8, 1, key=jax.random.key(0))
    x, y = jnp.ones((16, 3)), jnp.ones((16, 2))
    value, _ = step(model, x, y, jnp.int32(16))
    assert_tree_allclose(value, _masked_loss(model, x, y, jnp.ones(16, bool)))
    # 8 examples per device do not split into microbatches of 3 with an aux to
    # stack; the advice names one that does.
    with pytest.raises(eqpar.SpecError, match=r"microbatch=2\b"):
        _sharded_step(2, 3, has_aux=True)(model, x, y, jnp.int32(16))
    _sharded_step(2, 2, has_aux=True)(model, x, y, jnp.int32(16))
    for bad in (0, 2.5, True):
        with pytest.raises(eqpar.SpecError, match="microbatch"):
            eqpar.filter_value_and_grad_mean(_masked_loss, "data", microbatch=bad)
