import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, strategies as st

import eqpar

from .helpers import assert_tree_allclose


@pytest.fixture
def linear(getkey):
    return eqx.nn.Linear(3, 4, key=getkey())


def test_objax_output_reductions(linear, getkey):
    x = jax.random.normal(getkey(), (96, 3))
    forward = eqpar.filter_vmap(linear)
    ref = forward(x)
    assert eqpar.Parallel(forward, reduce=None)(x).shape == (8, 12, 4)
    assert_tree_allclose(eqpar.Parallel(forward, reduce=None)(x), ref.reshape(8, 12, 4))
    assert_tree_allclose(eqpar.Parallel(forward, reduce="first")(x), ref[:12])
    assert_tree_allclose(
        eqpar.Parallel(forward, reduce="mean")(x),
        ref.reshape(8, 12, 4).mean(0),
        rtol=1e-5,
    )
    out = eqpar.Parallel(forward)(x)
    assert out.shape == (96, 4)
    assert_tree_allclose(out, ref)
    assert_tree_allclose(
        eqpar.Parallel(forward, reduce=lambda y: y.max(0))(x),
        ref.reshape(8, 12, 4).max(0),
    )


@pytest.mark.parametrize("check_vma", [False, True])
def test_a_reduction_per_output(linear, getkey, check_vma):
    """`reduce` as a pytree prefix of the outputs (Objax's per-variable reduce on
    the way out): per-example predictions concatenated, the loss averaged, the
    BatchNorm-like statistics of each device stacked, a step counter from device
    0, in one call; equal to one device."""
    x = jax.random.normal(getkey(), (32, 3))

    def step(model, x, count):
        y = jax.vmap(model)(x)
        return {
            "pred": y,
            "loss": jnp.mean(y**2),
            "stats": (y.mean(0), y.var(0)),
            "count": count + 1,
        }

    reduce = {"pred": "concat", "loss": "mean", "stats": None, "count": "first"}
    run = eqpar.Parallel(
        step, reduce=reduce, in_axes=(None, 0, None), check_vma=check_vma
    )
    got = run(linear, x, jnp.int32(4))
    y = jax.vmap(linear)(x)
    blocks = y.reshape(8, 4, 4)
    want = {
        "pred": y,
        "loss": jnp.mean(y**2),
        "stats": (blocks.mean(1), blocks.var(1)),
        "count": jnp.int32(5),
    }
    assert_tree_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert got["count"].dtype == jnp.int32
    # A padded batch is refused as soon as one output is not concatenated.
    with pytest.raises(eqpar.AxisSizeError, match="13 examples"):
        run(linear, x[:13], jnp.int32(4))
    only_concat = eqpar.Parallel(
        lambda x: {"a": x, "b": 2 * x}, reduce={"a": "concat", "b": "concat"}
    )
    assert_tree_allclose(only_concat(x[:13]), {"a": x[:13], "b": 2 * x[:13]})
    with pytest.raises(eqpar.SpecError, match=r"reduce='median' at \['loss'\]"):
        eqpar.Parallel(step, reduce={"loss": "median"})
    with pytest.raises(eqpar.SpecError, match="nor a pytree prefix"):
        eqpar.Parallel(step, reduce={"loss": "mean"}, in_axes=(None, 0, None))(
            linear, x, jnp.int32(4)
        )


@given(n=st.integers(1, 40))
def test_concat_pads_and_trims_any_batch_size(n):
    x = jnp.arange(n * 3.0).reshape(n, 3)
    out = eqpar.Parallel(lambda x: (x * 2, x.sum(1)))(x)
    assert_tree_allclose(out, (x * 2, x.sum(1)))  # no padded row leaks


def test_broadcast_and_static_arguments(linear, getkey):
    x = jax.random.normal(getkey(), (16, 3))

    def f(model, x, activation):
        return activation(jax.vmap(model)(x))

    out = eqpar.Parallel(f, in_axes=(None, 0, None))(linear, x, jax.nn.relu)
    assert_tree_allclose(out, jax.nn.relu(jax.vmap(linear)(x)))


def test_axis_name_is_bound_inside(getkey):
    x = jax.random.normal(getkey(), (32, 2))
    centred = eqpar.Parallel(
        lambda x: x - eqpar.pmean(x.mean(0, keepdims=True), "devices")
    )(x)
    assert_tree_allclose(centred, x - x.mean(0, keepdims=True), rtol=1e-5, atol=1e-6)


def _noisy(x, keys):  # per-example randomness, as dropout or noise would use it
    return jax.vmap(
        lambda xi, k: jnp.where(jax.random.bernoulli(k, 0.5, xi.shape), xi, 0.0)
    )(x, keys)


@pytest.mark.parametrize("n", [37, 64])
def test_randomness_does_not_depend_on_device_count(n, getkey):
    x = jnp.ones((n, 16))
    key = jax.random.key(42)
    results = [
        np.asarray(
            eqpar.Parallel(_noisy, mesh=eqpar.data_mesh("devices", jax.devices()[:d]))(
                x, key
            )
        )
        for d in (1, 2, 4, 8)
    ]
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])
    # Different examples got different draws.
    assert len({tuple(row) for row in results[0]}) > n // 2


def test_broadcast_key_is_the_same_everywhere():
    """The documented pitfall: a key with in_axes=None draws alike on every device,
    and Parallel warns that it does."""
    x = jnp.ones((16, 16))
    with pytest.warns(eqpar.EqparWarning, match="same numbers.*in_axes 0"):
        out = eqpar.Parallel(
            lambda x, k: jnp.where(jax.random.bernoulli(k, 0.5, x.shape), x, 0.0),
            in_axes=(0, None),
        )(x, jax.random.key(0))
    shards = np.asarray(out).reshape(8, 2, 16)
    assert (shards == shards[:1]).all()


# ------------------------------------------------------------- training


def _loss(model, x, y, mask):
    err = jnp.sum((jax.vmap(model)(x) - y) ** 2, axis=-1)
    return jnp.sum(jnp.where(mask, err, 0.0)) / jnp.maximum(
        jnp.sum(mask, dtype=jnp.float32), 1.0
    )


@pytest.mark.parametrize("n_examples", [64, 37])
def test_training_through_parallel_matches_one_device(n_examples, getkey):
    x = jax.random.normal(getkey(), (n_examples, 3))
    y = jnp.stack([jnp.sin(x[:, 0]), x[:, 1] * x[:, 2]], axis=1)
    model = eqx.nn.MLP(3, 2, 16, 2, key=getkey())
    optimiser = optax.sgd(0.05, momentum=0.9)  # (adam is not strict-promotion clean)

    def step(model, state, x, y, mask):
        grads = eqx.filter_grad(_loss)(eqpar.mark_varying(model, "devices"), x, y, mask)
        grads = eqpar.grad_mean(grads, "devices", count=jnp.sum(mask))
        updates, state = optimiser.update(grads, state, model)
        return eqx.apply_updates(model, updates), state

    parallel_step = eqpar.Parallel(step, reduce="first", in_axes=(None, None, 0, 0, 0))
    (xp, yp), n_real = eqpar.pad_batch((x, y), jax.device_count())
    mask = jnp.arange(xp.shape[0]) < n_real

    params = eqx.filter(model, eqx.is_inexact_array)
    parallel, state = model, optimiser.init(params)
    single, ref_state = model, optimiser.init(params)
    single_step = eqpar.filter_jit(lambda m, s: _single(m, s, x, y, optimiser))
    for _ in range(5):
        parallel, state = parallel_step(parallel, state, xp, yp, mask)
        single, ref_state = single_step(single, ref_state)
    for a, b in zip(
        jax.tree.leaves(eqx.filter(parallel, eqx.is_array)),
        jax.tree.leaves(eqx.filter(single, eqx.is_array)),
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def _single(model, state, x, y, optimiser):
    grads = eqx.filter_grad(_loss)(model, x, y, jnp.ones(x.shape[0], bool))
    updates, state = optimiser.update(grads, state, model)
    return eqx.apply_updates(model, updates), state


# ------------------------------------------------------------- bad input


@pytest.mark.parametrize("reduce", ["concat", None, "first", "mean"])
def test_empty_batch_gives_empty_outputs_like_vmap(reduce):
    """An empty batch is split like any other (0 examples per device): outputs are
    what `jax.vmap` / `shard_map` give for it, not an error."""
    x = jnp.ones((0, 3))
    f = lambda x: (2 * x, x.sum(0))  # noqa: E731
    out = eqpar.Parallel(f, reduce=None if reduce == "concat" else reduce)(x)
    stacked = (jnp.zeros((8, 0, 3)), jnp.zeros((8, 3)))
    if reduce == "concat":
        out = eqpar.Parallel(lambda x: 2 * x)(x)
        assert_tree_allclose(out, eqpar.filter_vmap(lambda v: 2 * v)(x))
    elif reduce is None:
        assert_tree_allclose(out, stacked)
    else:
        assert_tree_allclose(out, jax.tree.map(lambda s: s[0], stacked))


def test_leading_sizes_disagree():
    with pytest.raises(
        eqpar.AxisSizeError, match=r"argument `batch` at \['y'\].*size 5"
    ):
        eqpar.Parallel(lambda batch: batch["x"])({"x": jnp.ones(8), "y": jnp.ones(5)})


@pytest.mark.parametrize("reduce", ["mean", "first", None])
def test_padding_never_feeds_mean_first_or_stack(reduce):
    with pytest.raises(eqpar.AxisSizeError, match="37 examples.*8 devices.*pad_batch"):
        eqpar.Parallel(lambda x: x, reduce=reduce)(jnp.ones((37, 2)))


def test_concat_of_scalars_is_refused():
    with pytest.raises(eqpar.SpecError, match="scalar"):
        eqpar.Parallel(lambda x: x.sum())(jnp.ones((16, 2)))


def test_unknown_reduce_and_axis():
    with pytest.raises(eqpar.SpecError, match="'median'"):
        eqpar.Parallel(lambda x: x, reduce="median")
    with pytest.raises(eqpar.MeshError, match="'devices'.*\\('data',\\)"):
        eqpar.Parallel(lambda x: x, mesh=eqpar.data_mesh(), axis_name="devices")


@pytest.mark.parametrize("explicit", [False, True], ids=["auto", "explicit"])
def test_reductions_on_either_mesh_type(linear, getkey, explicit):
    """Every reduce works on an Auto mesh and on eqpar.data_mesh (Explicit axes),
    for per-device (varying) outputs and for outputs every device holds alike."""
    mesh = (
        eqpar.data_mesh("devices")
        if explicit
        else jax.make_mesh((8,), ("devices",), (jax.sharding.AxisType.Auto,))
    )
    x = jax.random.normal(getkey(), (32, 3))
    per_device = jax.vmap(linear)(x).reshape(8, 4, 4)

    def f(model, x):
        y = jax.vmap(model)(x)
        return y, eqpar.pmean(y.sum(0), "devices"), jnp.int32(3)

    same = per_device.sum(1).mean(0)
    expected = {
        "first": (per_device[0], same, jnp.int32(3)),
        "mean": (per_device.mean(0), same, jnp.int32(3)),
        None: (per_device, jnp.broadcast_to(same, (8, 4)), jnp.full(8, 3, jnp.int32)),
        "max": (per_device.max(0), same, jnp.int32(3)),
    }
    for name, want in expected.items():
        reduce = (lambda y: y.max(0)) if name == "max" else name
        run = eqpar.Parallel(f, reduce=reduce, in_axes=(None, 0), mesh=mesh)
        assert_tree_allclose(run(linear, x), want, rtol=1e-5, atol=1e-6)


def test_integer_outputs_mean_like_jnp_mean():
    x = jnp.arange(16, dtype=jnp.int32).reshape(16, 1)
    out = eqpar.Parallel(lambda x: x.sum(), reduce="mean")(x)
    assert_tree_allclose(out, jnp.mean(x.reshape(8, 2).sum(1)))
