"""Issue 20, sections 3 and 4: the last silent results are right or eqpar errors
(the Objax gradient step, padding reaching collectives, unchecked counts), and the
defaults let the obvious next line work (repeated mesh axes, `data_mesh` + `Parallel`
+ eager indexing)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

import eqpar


def _loss(w, x):
    return jnp.mean(jnp.tanh(x @ w) ** 2)


W = jnp.linspace(-1.0, 1.0, 3)
X = jnp.linspace(-2.0, 2.0, 48).reshape(16, 3)


def _mesh(n, name="devices"):
    return jax.make_mesh(
        (n,), (name,), axis_types=(AxisType.Auto,), devices=jax.devices()[:n]
    )


# ----------------------------------------------------------------- the Objax step


@pytest.mark.parametrize("devices", [1, 2, 8])
def test_the_objax_gradient_step_gives_objaxs_answer(devices):
    """Objax's guide: `pmean` of each device's gradient, under `Parallel`."""
    step = eqpar.Parallel(
        lambda w, x: eqpar.pmean(jax.grad(_loss)(w, x), "devices"),
        reduce="first",
        in_axes=(None, 0),
        mesh=_mesh(devices),
    )
    np.testing.assert_allclose(step(W, X), jax.grad(_loss)(W, X), rtol=1e-6, atol=1e-7)
    psum_step = eqpar.Parallel(
        lambda w, x: eqpar.psum(jax.grad(_loss)(w, x), "devices") / devices,
        reduce="first",
        in_axes=(None, 0),
        mesh=_mesh(devices),
    )
    np.testing.assert_allclose(
        psum_step(W, X), jax.grad(_loss)(W, X), rtol=1e-6, atol=1e-7
    )


@pytest.mark.parametrize("collective", ["pmean", "psum"])
def test_averaging_an_invariant_gradient_raises_with_the_way_out(collective):
    """Under replication checking the gradient of a replicated parameter is already
    summed over the devices: `pmean`/`psum` of it is an error, never n times the
    mean; the advice, followed, gives the mean gradient."""
    mesh = _mesh(8, "data")
    op = getattr(eqpar, collective)
    wrong = eqpar.filter_shard_map(
        lambda w, x: op(jax.grad(_loss)(w, x), "data"),
        mesh=mesh,
        in_specs=(P(), P("data")),
        out_specs=P(),
    )
    with pytest.raises(eqpar.ReplicationError, match="filter_value_and_grad_mean"):
        wrong(W, X)
    right = eqpar.filter_shard_map(
        eqpar.filter_grad_mean(_loss, "data"),
        mesh=mesh,
        in_specs=(P(), P("data")),
        out_specs=P(),
    )
    np.testing.assert_allclose(right(W, X), jax.grad(_loss)(W, X), rtol=1e-6, atol=1e-7)
    checked = eqpar.Parallel(
        lambda w, x: eqpar.pmean(jax.grad(_loss)(w, x), "devices"),
        reduce="first",
        in_axes=(None, 0),
        check_vma=True,
    )
    with pytest.raises(eqpar.ReplicationError, match="already summed"):
        checked(W, X)


def test_collectives_of_varying_values_and_numbers_are_unchanged():
    mesh = _mesh(8, "data")
    f = eqpar.filter_shard_map(
        lambda x: (
            eqpar.psum(x, "data"),
            eqpar.pmean(x, "data"),
            eqpar.psum(1, "data"),
        ),
        mesh=mesh,
        in_specs=P("data"),
        out_specs=P(),
    )
    total, mean, size = f(jnp.arange(8.0))
    assert total == 28.0 and mean == 3.5 and size == 8


# ----------------------------------------------------------------- padding


@pytest.mark.parametrize(
    "fun, what",
    [
        (lambda x: x - eqpar.pmean(x.mean(), "devices"), "pmean"),
        (lambda x: x * 0 + eqpar.psum(x.sum(), "devices"), "psum"),
        (lambda x: x - jax.lax.pmean(x.mean(), "devices"), "jax.lax.pmean"),
        (
            lambda x: jax.lax.all_gather(x, "devices", tiled=True)[: x.shape[0]],
            "gather",
        ),
    ],
)
def test_a_padded_batch_never_reaches_a_collective(fun, what):
    f = eqpar.Parallel(fun)
    with pytest.raises(eqpar.AxisSizeError, match="10 examples to 16.*pad_batch"):
        f(jnp.arange(10.0))
    # A batch that divides runs as written.
    assert f(jnp.arange(16.0)).shape == (16,)


def test_padding_without_collectives_still_pads_and_trims():
    index = jax.lax.axis_index  # communicates nothing: padding is allowed
    f = eqpar.Parallel(lambda x: 2 * x + 0 * index("devices").astype(x.dtype))
    np.testing.assert_array_equal(f(jnp.arange(10.0)), 2 * jnp.arange(10.0))


def test_data_parallel_batchnorm_on_a_padded_batch_is_refused():
    bn, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(
        3, axis_name=("devices", "batch"), mode="batch"
    )

    def both(x, state):
        return eqpar.filter_vmap(
            bn, in_axes=(0, None), out_axes=(0, None), axis_name="batch"
        )(x, state)[0]

    f = eqpar.Parallel(both, in_axes=(0, None))
    with pytest.raises(eqpar.AxisSizeError, match="pads this batch of 12"):
        f(jnp.ones((12, 3)), state)


def test_the_advice_for_padding_gives_one_devices_mean():
    """Pad yourself and weight by the count: the mean over the real rows only."""
    x = jnp.arange(10.0)
    padded, n = eqpar.pad_batch(x, 8)
    mask = jnp.arange(padded.shape[0]) < n

    def centred(x, m):
        total = eqpar.psum(jnp.sum(jnp.where(m, x, 0.0)), "devices")
        count = eqpar.psum(jnp.sum(m, dtype=jnp.float32), "devices")
        return x - total / count

    out = eqpar.Parallel(centred)(padded, mask)[:n]
    np.testing.assert_allclose(out, x - x.mean(), rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------- counts


def _with_count(counts):
    mesh = _mesh(8, "data")
    step = eqpar.filter_shard_map(
        lambda w, x, c: eqpar.filter_grad_mean(_loss, "data")(w, x, count=c[0]),
        mesh=mesh,
        in_specs=(P(), P("data"), P("data")),
        out_specs=P(),
    )
    return jax.block_until_ready(step(W, X, jnp.asarray(counts, jnp.int32)))


def test_a_negative_count_is_an_error():
    with pytest.raises(Exception, match="`count` is negative"):
        _with_count([2, 2, 2, 2, 2, 2, 2, -2])


def test_no_real_example_anywhere_is_an_error():
    with pytest.raises(Exception, match="every device's `count` is 0"):
        _with_count([0] * 8)


def test_grad_mean_checks_counts_too():
    mesh = _mesh(8, "data")
    f = eqpar.filter_pmap(
        lambda w, x, c: eqpar.grad_mean(jax.grad(_loss)(w, x), "i", count=c),
        in_axes=(None, 0, 0),
        axis_name="i",
    )
    del mesh
    with pytest.raises(Exception, match="`count` is negative"):
        jax.block_until_ready(f(W, X.reshape(8, 2, 3), jnp.array([1] * 7 + [-1])))
    ok = f(W, X.reshape(8, 2, 3), jnp.full(8, 2))
    np.testing.assert_allclose(ok[0], jax.grad(_loss)(W, X), rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------- misleading


def test_a_mesh_axis_used_twice_is_reported_as_such():
    f = eqpar.filter_shard_map(
        lambda x: x, mesh=_mesh(8, "data"), in_specs=P("data", "data"), out_specs=P()
    )
    with pytest.raises(eqpar.SpecError, match=r"uses mesh axes \['data'\] more than"):
        f(jnp.ones((3, 8)))
    with pytest.raises(eqpar.SpecError, match="more than once"):
        eqpar.filter_device_put(
            jnp.ones((8, 8)), P("data", "data"), mesh=_mesh(8, "data")
        )


def test_the_migration_recipe_and_the_next_lines_work():
    """`replicate` on `data_mesh`, then `Parallel` with no mesh; outputs indexed
    eagerly."""
    model = eqx.nn.Linear(3, 2, key=jax.random.key(0))
    placed = eqpar.replicate(model, mesh=eqpar.data_mesh("devices"))
    y = eqpar.Parallel(eqpar.filter_vmap(lambda m, x: m(x), in_axes=(None, 0)))(
        placed, X
    )
    ref = jax.vmap(model)(X)
    np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(y[0], ref[0], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(y[:3], ref[:3], rtol=1e-6, atol=1e-7)
    sm = eqpar.filter_shard_map(
        lambda x: 2 * x, mesh=eqpar.data_mesh(), in_specs=P("data"), out_specs=P("data")
    )
    out = sm(X)
    np.testing.assert_allclose(out[0], 2 * X[0])
    grad = jax.grad(lambda w: sm(w * X).sum())(1.0)  # outside jit, no context
    np.testing.assert_allclose(grad, 2 * X.sum(), atol=1e-5)
