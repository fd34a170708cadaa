import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, strategies as st
from jax.sharding import AxisType, PartitionSpec as P

import eqpar

from .helpers import assert_tree_allclose, make_mixed


N = 8


def run_everywhere(body, stacked, n=N):
    """Runs `body` (one device's view) under filter_vmap, filter_pmap and
    filter_shard_map (check_vma=True), on `stacked` (leading axis = device)."""
    vm = eqpar.filter_vmap(body, axis_name="d")(stacked)
    pm = eqpar.filter_pmap(body, axis_name="d")(stacked)
    mesh = jax.make_mesh(
        (n,), ("d",), devices=jax.devices()[:n], axis_types=(AxisType.Auto,)
    )

    def block(tree):
        arrays, static = eqx.partition(tree, eqx.is_array)
        out = body(eqx.combine(jax.tree.map(lambda a: a[0], arrays), static))
        out_arrays, out_static = eqx.partition(out, eqx.is_array)
        return eqx.combine(jax.tree.map(lambda a: a[None], out_arrays), out_static)

    sm = eqpar.filter_shard_map(block, mesh=mesh, in_specs=P("d"), out_specs=P("d"))(
        stacked
    )
    return vm, pm, sm


@pytest.fixture
def tree(getkey):
    keys = jax.random.split(getkey(), N)
    return {
        "model": eqpar.filter_vmap(make_mixed)(keys),  # (N, ...) arrays + statics
        "x": jax.random.normal(getkey(), (N, 4, 6)),
        "count": jnp.arange(N, dtype=jnp.int32),
        "label": "static",
        "nothing": None,
    }


def expected(tree, reduce):
    """Per-device copies of a reduction over the device axis (numpy reference)."""
    return jax.tree.map(
        lambda a: (
            jnp.broadcast_to(reduce(np.asarray(a)), a.shape) if eqx.is_array(a) else a
        ),
        tree,
    )


@pytest.mark.parametrize(
    "collective, reduce",
    [
        (eqpar.psum, lambda a: a.sum(0)),
        (eqpar.pmax, lambda a: a.max(0)),
        (eqpar.pmin, lambda a: a.min(0)),
    ],
)
def test_reductions_on_a_module_tree(tree, collective, reduce):
    for out in run_everywhere(lambda t: collective(t, "d"), tree):
        assert_tree_allclose(out, expected(tree, reduce), rtol=1e-5)
        assert out["model"].name == "mixed" and out["model"].activation is jnp.tanh
        assert out["label"] == "static" and out["nothing"] is None


def test_pmean_on_a_module_tree(tree):
    floats = eqx.filter(tree, eqx.is_inexact_array)
    for out in run_everywhere(lambda t: eqpar.pmean(t, "d"), floats):
        assert_tree_allclose(out, expected(floats, lambda a: a.mean(0)), rtol=1e-5)


def test_all_gather_stacked_and_tiled(tree):
    x = tree["x"]
    for out in run_everywhere(lambda t: eqpar.all_gather(t, "d"), tree):
        assert_tree_allclose(out["x"], jnp.broadcast_to(x, (N, *x.shape)))
        assert out["model"].name == "mixed"
    for out in run_everywhere(
        lambda t: eqpar.all_gather(t, "d", axis=1, tiled=True), x
    ):
        full = jnp.concatenate(list(x), axis=1)  # (4, 6 * N) on every device
        assert_tree_allclose(out, jnp.broadcast_to(full, (N, *full.shape)))


def test_psum_scatter(getkey):
    x = jax.random.normal(getkey(), (N, 2 * N, 3))
    total = x.sum(0)
    for out in run_everywhere(lambda t: eqpar.psum_scatter(t, "d", tiled=True), x):
        assert_tree_allclose(out, total.reshape(N, 2, 3), rtol=1e-5)
    y = jax.random.normal(getkey(), (N, N, 3))
    for out in run_everywhere(lambda t: eqpar.psum_scatter(t, "d"), y):
        assert_tree_allclose(out, y.sum(0), rtol=1e-5)


def test_ring_shift(tree):
    for out in run_everywhere(lambda t: eqpar.ring_shift(t, "d", shift=3), tree):
        assert_tree_allclose(out["x"], jnp.roll(tree["x"], 3, axis=0))
        assert out["label"] == "static"


def test_tuple_of_axis_names_on_a_2d_mesh(getkey):
    mesh = jax.make_mesh((4, 2), ("data", "model"))
    x = jax.random.normal(getkey(), (8, 6))
    f = eqpar.filter_shard_map(
        lambda x: (eqpar.psum(x, ("data", "model")), eqpar.pmean(x, "model")),
        mesh=mesh,
        in_specs=P(("data", "model")),
        out_specs=(P(), P("data")),
    )
    total, mean_model = f(x)
    assert_tree_allclose(total, x.reshape(8, 1, 6).sum(0), rtol=1e-5)
    assert_tree_allclose(mean_model, x.reshape(4, 2, 6).mean(1), rtol=1e-5)


@pytest.mark.parametrize("devices", [1, 2, 4, 8])
def test_sensor_sums_planes_across_devices(getkey, devices):
    planes = jax.random.uniform(getkey(), (32, 16, 16))
    mesh = jax.make_mesh((devices,), ("planes",), devices=jax.devices()[:devices])

    def camera(p):  # each device: its planes -> the full image, on every device
        return eqpar.sensor_sum(p, axis=0, axis_name="planes")[None]

    images = eqpar.filter_shard_map(
        camera, mesh=mesh, in_specs=P("planes"), out_specs=P("planes")
    )(planes)
    assert images.shape == (devices, 16, 16)
    for image in np.asarray(
        images
    ):  # identical on every device, equal to one device's sum
        assert_tree_allclose(image, jnp.sum(planes, axis=0), rtol=1e-5)
    assert_tree_allclose(eqpar.sensor_sum(planes), jnp.sum(planes, axis=0))


def test_sensor_sum_same_under_vmap_on_one_device(getkey):
    planes = jax.random.uniform(getkey(), (4, 8, 5, 5))  # 4 "devices" x 8 planes
    out = eqpar.filter_vmap(
        lambda p: eqpar.sensor_sum(p, axis_name="i"), axis_name="i"
    )(planes)
    assert_tree_allclose(
        out, jnp.broadcast_to(planes.sum((0, 1)), (4, 5, 5)), rtol=1e-5
    )


# ------------------------------------------------------------- data-parallel SGD


def _loss(model, x, y, mask):
    err = jnp.sum((jax.vmap(model)(x) - y) ** 2, axis=-1)
    return jnp.sum(jnp.where(mask, err, 0.0)) / jnp.maximum(
        jnp.sum(mask, dtype=jnp.float32), 1.0
    )


def _data(getkey, n_examples=37):
    x = jax.random.normal(getkey(), (n_examples, 3))
    y = jnp.stack([jnp.sin(x[:, 0]), x[:, 1] * x[:, 2]], axis=1)
    return x, y, eqx.nn.MLP(3, 2, 16, 2, key=getkey())


# The single-device references, compiled: run eagerly, each of their many small
# operations would compile on its own for every new shape.
_reference_grad = eqx.filter_jit(eqx.filter_grad(_loss))


def _single_device_sgd(model, x, y, steps, lr):
    mask = jnp.ones(x.shape[0], bool)
    for _ in range(steps):
        grads = _reference_grad(model, x, y, mask)
        model = eqx.apply_updates(model, jax.tree.map(lambda g: -lr * g, grads))
    return model


def _padded(x, y, n):
    pad = (-x.shape[0]) % n
    mask = jnp.arange(x.shape[0] + pad) < x.shape[0]
    return jnp.pad(x, ((0, pad), (0, 0))), jnp.pad(y, ((0, pad), (0, 0))), mask


def _assert_params_close(a, b, rtol=1e-5):
    for pa, pb in zip(
        jax.tree.leaves(eqx.filter(a, eqx.is_array)),
        jax.tree.leaves(eqx.filter(b, eqx.is_array)),
    ):
        np.testing.assert_allclose(pa, pb, rtol=rtol, atol=1e-7)


def test_grad_mean_with_count_matches_single_device(getkey, mesh8):
    x, y, model = _data(getkey)
    xp, yp, mask = _padded(x, y, N)
    lr = 0.1

    @eqpar.filter_shard_map(
        mesh=mesh8, in_specs=(P(), P("data"), P("data"), P("data")), out_specs=P()
    )
    def step(model, x, y, mask):
        local = eqpar.mark_varying(model, "data")  # per-device gradients
        grads = eqx.filter_grad(_loss)(local, x, y, mask)
        grads = eqpar.grad_mean(grads, "data", count=jnp.sum(mask))
        return eqx.apply_updates(model, jax.tree.map(lambda g: -lr * g, grads))

    parallel = model
    for _ in range(5):
        parallel = step(parallel, xp, yp, mask)
    _assert_params_close(parallel, _single_device_sgd(model, x, y, 5, lr))


def test_pmean_updates_in_an_optax_chain(getkey, mesh8):
    x, y, model = _data(getkey)
    xp, yp, mask = _padded(x, y, N)
    optimiser = optax.chain(eqpar.pmean_updates("data"), optax.sgd(0.1))
    reference_opt = optax.sgd(0.1)

    @eqpar.filter_shard_map(
        mesh=mesh8,
        in_specs=(P(), P(), P("data"), P("data"), P("data")),
        out_specs=P(),
    )
    def step(model, state, x, y, mask):
        grads = eqx.filter_grad(_loss)(eqpar.mark_varying(model, "data"), x, y, mask)
        updates, state = optimiser.update(grads, state, model, count=jnp.sum(mask))
        return eqx.apply_updates(model, updates), state

    params = eqx.filter(model, eqx.is_inexact_array)
    parallel, state = model, optimiser.init(params)
    single, ref_state = model, reference_opt.init(params)
    full = jnp.ones(x.shape[0], bool)
    for _ in range(5):
        parallel, state = step(parallel, state, xp, yp, mask)
        grads = _reference_grad(single, x, y, full)
        updates, ref_state = reference_opt.update(grads, ref_state, single)
        single = eqx.apply_updates(single, updates)
    _assert_params_close(parallel, single)


def _check_grad_mean_with_count(n_examples, devices, transforms):
    # The data made with numpy: each new shape would compile JAX's eager operations.
    x = np.random.default_rng(n_examples).normal(size=(n_examples, 3))
    x = x.astype(np.float32)
    y = np.stack([np.sin(x[:, 0]), x[:, 1]], axis=1)
    model = eqx.nn.MLP(3, 2, 8, 1, key=jax.random.key(n_examples))
    pad = (-n_examples) % devices
    xp, yp = np.pad(x, ((0, pad), (0, 0))), np.pad(y, ((0, pad), (0, 0)))
    mask = np.arange(n_examples + pad) < n_examples
    x, y, xp, yp, mask = map(jnp.asarray, (x, y, xp, yp, mask))
    shard = lambda a: a.reshape(devices, -1, *a.shape[1:])  # noqa: E731

    def per_device(model, x, y, mask):
        grads = eqx.filter_grad(_loss)(model, x, y, mask)
        return eqpar.grad_mean(grads, "d", count=jnp.sum(mask))

    ref = _reference_grad(model, x, y, np.ones(n_examples, bool))
    for transform in transforms:
        out = transform(per_device, in_axes=(None, 0, 0, 0), axis_name="d")(
            model, shard(xp), shard(yp), shard(mask)
        )
        _assert_params_close(jax.tree.map(lambda g: g[0], out), ref, rtol=2e-5)


@given(n_examples=st.integers(8, 30), devices=st.sampled_from([2, 4, 8]))
def test_grad_mean_with_count_under_pmap_and_vmap(n_examples, devices):
    # filter_vmap as one compiled program: eagerly, each new shape would compile
    # every operation on its own (the eager map is the next test's, at one size).
    jitted_vmap = lambda f, **kw: eqx.filter_jit(eqpar.filter_vmap(f, **kw))  # noqa: E731
    _check_grad_mean_with_count(n_examples, devices, [eqpar.filter_pmap, jitted_vmap])


def test_grad_mean_with_count_under_eager_vmap():
    _check_grad_mean_with_count(13, 4, [eqpar.filter_vmap])


@pytest.mark.parametrize("count", [None, 1])
def test_grad_mean_of_an_invariant_gradient_raises(mesh8, count):
    """check_vma=True: the gradient of a P() input comes back invariant (here summed
    by autodiff, but it could be an average or a term that never varied): grad_mean
    raises rather than guess, with or without count; the one-call helper is exact."""
    w = jnp.array([1.0, 2.0])
    x = jnp.arange(16.0).reshape(8, 2)

    def local_loss(w, x):
        return jnp.mean(jnp.tanh(x @ w))

    @eqpar.filter_shard_map(mesh=mesh8, in_specs=(P(), P("data")), out_specs=P())
    def mean_grad(w, x):
        g = jax.grad(local_loss)(w, x)
        assert not eqpar.varying_axes(g)  # invariant: autodiff summed it
        return eqpar.grad_mean(g, "data", count=count)

    with pytest.raises(eqpar.ReplicationError, match="filter_value_and_grad_mean"):
        mean_grad(w, x)

    @eqpar.filter_shard_map(mesh=mesh8, in_specs=(P(), P("data")), out_specs=P())
    def helper(w, x):
        return eqpar.filter_grad_mean(local_loss, "data")(w, x, count=count)

    assert_tree_allclose(helper(w, x), jax.grad(local_loss)(w, x))


# ------------------------------------------------------------- shard_map kernels


def test_ring_allgather_matmul(getkey, mesh8):
    a = jax.random.normal(getkey(), (16, 24))
    b = jax.random.normal(getkey(), (24, 10))

    # A is sharded by columns, B by rows: out = sum_k A[:, k] @ B[k, :]. Each device
    # starts with its own A block and passes it round the ring.
    @eqpar.filter_shard_map(
        mesh=mesh8, in_specs=(P(None, "data"), P("data")), out_specs=P()
    )
    def ring(a_block, b_block):
        n = jax.lax.axis_size("data")
        idx = jax.lax.axis_index("data")
        b_all = eqpar.all_gather(b_block, "data")  # (n, k, 10)
        acc = jnp.zeros((a_block.shape[0], b_block.shape[1]), a_block.dtype)
        blk = a_block
        for step in range(n):
            src = (idx - step) % n  # whose A block this device holds now
            acc = acc + blk @ b_all[src]
            blk = eqpar.ring_shift(blk, "data")
        return eqpar.pmean(acc, "data")

    assert_tree_allclose(ring(a, b), a @ b, rtol=1e-4, atol=1e-4)


def _laplacian_1d(u, periodic):
    left = jnp.roll(u, 1) if periodic else jnp.pad(u, (1, 0))[:-1]
    right = jnp.roll(u, -1) if periodic else jnp.pad(u, (0, 1))[1:]
    return left - 2 * u + right


@pytest.mark.parametrize("periodic", [False, True])
def test_halo_exchange_1d_laplacian(getkey, mesh8, periodic):
    u = jax.random.normal(getkey(), (64,))

    @eqpar.filter_shard_map(mesh=mesh8, in_specs=P("data"), out_specs=P("data"))
    def laplacian(block):
        ext = eqpar.halo_exchange(block, "data", width=1, periodic=periodic)
        return ext[:-2] - 2 * block + ext[2:]

    assert_tree_allclose(laplacian(u), _laplacian_1d(u, periodic), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("periodic", [False, True])
def test_halo_exchange_2d_convolution(getkey, periodic):
    mesh = jax.make_mesh((4, 2), ("rows", "cols"))
    image = jax.random.normal(getkey(), (16, 12))
    kernel = jax.random.normal(getkey(), (5, 5))

    @eqpar.filter_shard_map(
        mesh=mesh, in_specs=(P("rows", "cols"), P()), out_specs=P("rows", "cols")
    )
    def conv(block, kernel):
        ext = eqpar.halo_exchange(block, "rows", width=2, axis=0, periodic=periodic)
        ext = eqpar.halo_exchange(ext, "cols", width=2, axis=1, periodic=periodic)
        return jax.scipy.signal.correlate2d(ext, kernel, mode="valid")

    padded = jnp.pad(image, 2, mode="wrap" if periodic else "constant")
    ref = jax.scipy.signal.correlate2d(padded, kernel, mode="valid")
    assert_tree_allclose(conv(image, kernel), ref, rtol=1e-4, atol=1e-4)


def test_halo_exchange_same_under_vmap_on_one_device(getkey):
    u = jax.random.normal(getkey(), (64,))
    blocks = u.reshape(8, 8)

    def lap(block):
        ext = eqpar.halo_exchange(block, "d", width=1)
        return ext[:-2] - 2 * block + ext[2:]

    out = eqpar.filter_vmap(lap, axis_name="d")(blocks)
    assert_tree_allclose(out.reshape(-1), _laplacian_1d(u, False), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------- bad input


def test_unbound_axis_name():
    with pytest.raises(
        eqpar.UnboundAxisError, match="'batch'.*filter_vmap.*filter_shard_map"
    ):
        eqpar.psum(jnp.ones(3), "batch")
    inside = eqpar.filter_vmap(lambda x: eqpar.pmean(x, "other"), axis_name="i")
    with pytest.raises(eqpar.UnboundAxisError, match="'other'"):
        inside(jnp.ones(3))


def test_unbound_axis_inside_shard_map(mesh8):
    f = eqpar.filter_shard_map(
        lambda x: eqpar.psum(x, "model"),
        mesh=mesh8,
        in_specs=P("data"),
        out_specs=P("data"),
    )
    with pytest.raises(eqpar.UnboundAxisError, match="'model'"):
        f(jnp.ones(8))


def test_halo_wider_than_block(mesh8):
    f = eqpar.filter_shard_map(
        lambda x: eqpar.halo_exchange(x, "data", width=3),
        mesh=mesh8,
        in_specs=P("data"),
        out_specs=P("data"),
    )
    with pytest.raises(ValueError, match="width=3.*only 2 entries"):
        f(jnp.ones(16))


def test_halo_axis_out_of_range(mesh8):
    f = eqpar.filter_shard_map(
        lambda x: eqpar.halo_exchange(x, "data", width=1, axis=2),
        mesh=mesh8,
        in_specs=P("data"),
        out_specs=P("data"),
    )
    with pytest.raises(ValueError, match="axis=2.*rank 1"):
        f(jnp.ones(16))
