"""Gradients across devices: every cell of {loss kind} x {transform} x {devices} x
{route} equals the single-device gradient or raises the documented error.

Each test compiles one per-device program that computes every loss kind at once (a
kind whose route raises is recorded while tracing), so the matrix costs one compile
per (transform, devices, route).
"""

import functools as ft

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, strategies as st
from jax.sharding import AxisType, PartitionSpec as P

import eqpar


AX = "d"
BATCH, N_REAL = 24, 21  # 24 divides over 1, 2 and 8 devices; 21 real when padded
WD = 0.05
TOL = dict(rtol=1e-6, atol=1e-6)


def _per_example(model, x, y):
    return jnp.sum((jax.vmap(model)(x) - y) ** 2, axis=-1)


def _sum_squares(model):
    leaves = jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array))
    return sum(jnp.sum(w**2) for w in leaves)


def _add_decay(grads, model):
    params = eqx.filter(model, eqx.is_inexact_array)
    return jax.tree.map(lambda g, w: g + 2 * WD * w, grads, params)


def mean_loss(model, x, y, mask):
    """This device's mean over its own examples (the batch is not padded)."""
    del mask
    return jnp.mean(_per_example(model, x, y))


def pmean_loss(model, x, y, mask):
    """The pmap-era idiom: the loss averaged across devices inside the loss."""
    return jax.lax.pmean(mean_loss(model, x, y, mask), AX)


def global_loss(model, x, y, mask):
    """Normalised by the global count of real examples (`psum`), padded batch."""
    masked = jnp.sum(jnp.where(mask, _per_example(model, x, y), 0.0))
    return jax.lax.psum(masked, AX) / jax.lax.psum(jnp.sum(mask, dtype=jnp.float32), AX)


def masked_mean_loss(model, x, y, mask):
    """This device's mean over its real examples: NaN (0/0) on a device that has
    none, which `count=0` must drop."""
    masked = jnp.sum(jnp.where(mask, _per_example(model, x, y), 0.0))
    return masked / jnp.sum(mask, dtype=jnp.float32)


def decay_loss(model, x, y, mask):
    return mean_loss(model, x, y, mask) + WD * _sum_squares(model)


# kind -> (per-device loss, pass count=?, padded batch?, where weight decay goes)
KINDS = {
    "per_device_mean": (mean_loss, False, False, None),
    "pmean_loss": (pmean_loss, False, False, None),
    "global_count_loss": (global_loss, False, True, None),
    "global_count_loss_and_count": (global_loss, True, True, None),
    "weight_decay_before": (mean_loss, False, False, "before"),
    "weight_decay_after": (mean_loss, False, False, "after"),
    "count_with_padding": (masked_mean_loss, True, True, None),
}


def _route_value_and_grad_mean(kind, model, x, y, mask):
    loss, use_count, _, decay = KINDS[kind]
    count = jnp.sum(mask) if use_count else None
    if decay == "before":  # in the loss, before any averaging
        loss = decay_loss
    value, grads = eqpar.filter_value_and_grad_mean(loss, AX)(
        model, x, y, mask, count=count
    )
    if decay == "after":
        grads = _add_decay(grads, model)
    return value, grads


def _route_grad_mean(kind, model, x, y, mask):
    loss, use_count, _, decay = KINDS[kind]
    grads = eqx.filter_grad(loss)(model, x, y, mask)
    if decay == "before":  # added to the local gradient, before grad_mean
        grads = _add_decay(grads, model)
    grads = eqpar.grad_mean(grads, AX, count=jnp.sum(mask) if use_count else None)
    if decay == "after":
        grads = _add_decay(grads, model)
    return None, grads


def _route_pmean_of_grads(kind, model, x, y, mask):
    """The Objax / `jax.pmap` idiom: each device's gradient, averaged."""
    loss, _, _, decay = KINDS[kind]
    grads = eqx.filter_grad(decay_loss if decay == "before" else loss)(
        model, x, y, mask
    )
    grads = eqpar.pmean(grads, AX)
    return None, _add_decay(grads, model) if decay == "after" else grads


def _route_psum_of_grads(kind, model, x, y, mask):
    """The same with `psum` and a division by the number of devices."""
    loss, _, _, decay = KINDS[kind]
    grads = eqx.filter_grad(decay_loss if decay == "before" else loss)(
        model, x, y, mask
    )
    n = eqpar.axis_size(AX)
    grads = jax.tree.map(lambda g: g / n, eqpar.psum(grads, AX))
    return None, _add_decay(grads, model) if decay == "after" else grads


# Kinds a plain average of per-device gradients is right for: per-device losses.
PER_DEVICE = ["per_device_mean", "weight_decay_before", "weight_decay_after"]

# route -> (function, the loss kinds it is documented for). `grad_mean(count=)`
# weights per-device losses; with a loss already normalised across devices its
# docstring says to leave `count` out, and without replication types (vmap, pmap,
# check_vma=False) it cannot tell, so that kind is filter_value_and_grad_mean's only.
ROUTES = {
    "filter_value_and_grad_mean": (_route_value_and_grad_mean, list(KINDS)),
    "grad_mean": (
        _route_grad_mean,
        [k for k in KINDS if k != "global_count_loss_and_count"],
    ),
    "pmean_of_grads": (_route_pmean_of_grads, PER_DEVICE),
    "psum_of_grads_over_n": (_route_psum_of_grads, PER_DEVICE),
}
# Routes that average gradients they did not compute: under replication typing a
# replicated parameter's gradient is already summed over the devices, so they raise.
AVERAGING = {"grad_mean", "pmean_of_grads", "psum_of_grads_over_n"}


@ft.cache
def _data():
    key = jax.random.key(0)
    kx, ky, km = jax.random.split(key, 3)
    x = jax.random.normal(kx, (BATCH, 3))
    y = jax.random.normal(ky, (BATCH, 2))
    model = eqx.nn.MLP(3, 2, 4, 1, activation=jnp.tanh, key=km)
    mask = jnp.arange(BATCH) < N_REAL  # the padding is last: device 7 of 8 has none
    return model, x, y, mask


@ft.cache
def _reference(kind):
    model, x, y, _ = _data()
    _, _, padded, decay = KINDS[kind]
    if padded:
        x, y = x[:N_REAL], y[:N_REAL]

    def loss(m):
        value = jnp.mean(_per_example(m, x, y))
        return value + WD * _sum_squares(m) if decay == "before" else value

    # Compiled: eagerly, each of its many small operations would compile alone.
    value, grads = eqx.filter_jit(eqx.filter_value_and_grad(loss))(model)
    return value, (_add_decay(grads, model) if decay == "after" else grads)


def _mesh(n, axis_type):
    return jax.make_mesh(
        (n,), (AX,), axis_types=(axis_type,), devices=jax.devices()[:n]
    )


def _stack_shard_map(n, axis_type, check_vma):
    def run(body, model, x, y, mask):
        def stacked(*args):  # every device's result, to check they all agree
            return jax.tree.map(lambda a: a[None], body(*args))

        return eqpar.filter_shard_map(
            stacked,
            mesh=_mesh(n, axis_type),
            in_specs=(P(), P(AX), P(AX), P(AX)),
            out_specs=P(AX),
            check_vma=check_vma,
        )(model, x, y, mask)

    return run


def _split(n, *arrays):
    return [a.reshape(n, -1, *a.shape[1:]) for a in arrays]


def _vmap(n):
    def run(body, model, x, y, mask):
        mapped = eqpar.filter_vmap(body, in_axes=(None, 0, 0, 0), axis_name=AX)
        return eqpar.filter_jit(mapped)(model, *_split(n, x, y, mask))

    return run


def _pmap(n):
    def run(body, model, x, y, mask):
        return eqpar.filter_pmap(
            body, in_axes=(None, 0, 0, 0), axis_name=AX, devices=jax.devices()[:n]
        )(model, *_split(n, x, y, mask))

    return run


def _parallel(n, check_vma=False):
    def run(body, model, x, y, mask):
        return eqpar.Parallel(
            body,
            reduce=None,  # stacked per device
            axis_name=AX,
            in_axes=(None, 0, 0, 0),
            mesh=_mesh(n, AxisType.Auto),
            check_vma=check_vma,
        )(model, x, y, mask)

    return run


# transform -> (runner factory, does it type replication (check_vma=True)?)
TRANSFORMS = {
    "filter_vmap": (_vmap, False),
    "filter_pmap": (_pmap, False),
    "shard_map_auto": (lambda n: _stack_shard_map(n, AxisType.Auto, True), True),
    "shard_map_auto_unchecked": (
        lambda n: _stack_shard_map(n, AxisType.Auto, False),
        False,
    ),
    "shard_map_explicit": (
        lambda n: _stack_shard_map(n, AxisType.Explicit, True),
        True,
    ),
    "shard_map_explicit_unchecked": (
        lambda n: _stack_shard_map(n, AxisType.Explicit, False),
        False,
    ),
    "Parallel": (_parallel, False),  # jax.pmap's semantics by default
    "Parallel_checked": (lambda n: _parallel(n, check_vma=True), True),
}


@pytest.mark.parametrize("devices", [1, 2, 8])
@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("route", list(ROUTES))
def test_gradient_matrix(route, transform, devices):
    make_runner, typed = TRANSFORMS[transform]
    run, kinds = ROUTES[route]
    model, x, y, mask = _data()
    raised: dict[str, eqpar.ReplicationError] = {}
    traced = []

    def body(model, x, y, mask):
        traced.append(True)
        out = {}
        for kind in kinds:
            try:
                out[kind] = run(kind, model, x, y, mask)
            except eqpar.ReplicationError as error:
                raised[kind] = error
        return out

    results = jax.device_get(make_runner(devices)(body, model, x, y, mask))
    assert traced, "the per-device body was not traced: nothing was checked"

    # The only documented errors: averaging an invariant gradient (the gradient of
    # a replicated parameter under check_vma=True), never n times the mean.
    should_raise = route in AVERAGING and typed
    for kind in kinds:
        if should_raise:
            assert kind in raised, f"{kind}: expected eqpar.ReplicationError"
            message = str(raised[kind])
            if route == "grad_mean":
                assert "cannot say which" in message
                assert (
                    "eqpar.filter_value_and_grad_mean(loss, 'd')(model, x, y)"
                    in message
                )
            else:
                assert "already the same on every device" in message
                assert "eqpar.filter_value_and_grad_mean(loss, 'd')" in message
            continue
        assert kind not in raised, f"{kind}: unexpected {raised.get(kind)}"
        ref_value, ref_grads = _reference(kind)
        value, grads = results[kind]
        for d in range(devices):  # every device holds the single-device result
            for a, b in zip(
                jax.tree.leaves(jax.tree.map(lambda g: g[d], grads)),
                jax.tree.leaves(ref_grads),
            ):
                np.testing.assert_allclose(a, b, **TOL, err_msg=f"{kind}, device {d}")
            if value is not None:
                np.testing.assert_allclose(value[d], ref_value, **TOL, err_msg=kind)


# ------------------------------------------------------------ the error's advice


def test_grad_mean_advice_followed_literally(mesh8):
    """The code in grad_mean's error, run as written, gives the single-device value
    and gradient for every kind of loss that raised it."""
    model, x, y, _ = _data()
    losses = {
        "per-device": lambda m, x, y: jnp.mean(_per_example(m, x, y)),
        "pmean-ed": lambda m, x, y: jax.lax.pmean(jnp.mean(_per_example(m, x, y)), AX),
        "psum-normalised": lambda m, x, y: (
            jax.lax.psum(jnp.sum(_per_example(m, x, y)), AX) / BATCH
        ),
        "weight decay": lambda m, x, y: (
            jnp.mean(_per_example(m, x, y)) + WD * _sum_squares(m)
        ),
    }
    advice: dict[str, str] = {}

    @eqpar.filter_shard_map(
        mesh=_mesh(8, AxisType.Auto), in_specs=(P(), P(AX), P(AX)), out_specs=P()
    )
    def step(model, x, y):
        out = {}
        for name, loss in losses.items():
            with pytest.raises(eqpar.ReplicationError) as info:
                eqpar.grad_mean(eqx.filter_grad(loss)(model, x, y), AX)
            advice[name] = str(info.value)
            code = [line.strip() for line in str(info.value).splitlines()]
            code = [line for line in code if line.startswith("value, grads = ")]
            assert len(code) == 1, info.value
            namespace = dict(eqpar=eqpar, loss=loss, model=model, x=x, y=y)
            exec(code[0], namespace)  # the advice, literally
            out[name] = namespace["value"], namespace["grads"]
        return out

    results = step(model, x, y)
    for name, loss in losses.items():
        assert "cannot say which" in advice[name]
        ref_value, ref_grads = eqx.filter_value_and_grad(
            lambda m: loss(m, x, y) if name == "weight decay" else _full_loss(m, x, y)
        )(model)
        value, grads = results[name]
        np.testing.assert_allclose(value, ref_value, **TOL, err_msg=name)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
            np.testing.assert_allclose(a, b, **TOL, err_msg=name)


def _full_loss(m, x, y):
    return jnp.mean(_per_example(m, x, y))


def test_grad_mean_error_names_the_leaf_paths(mesh8):
    w = {"weight": jnp.ones((2, 3)), "step": jnp.int32(3)}

    @eqpar.filter_shard_map(mesh=mesh8, in_specs=(P(), P("data")), out_specs=P())
    def step(w, x):
        g = jax.grad(lambda w: jnp.mean(x @ w["weight"]))(
            {"weight": w["weight"]}
        )  # a replicated parameter's gradient: invariant
        return eqpar.grad_mean({**g, "step": w["step"]}, "data")

    with pytest.raises(eqpar.ReplicationError, match=r"\['weight'\] \(shape \(2, 3\)"):
        step(w, jnp.ones((8, 2)))


def test_pmean_updates_follows_grad_mean(mesh8):
    model, x, y, _ = _data()
    optimiser = optax.chain(eqpar.pmean_updates(AX), optax.sgd(0.1))
    state = optimiser.init(eqx.filter(model, eqx.is_inexact_array))

    @eqpar.filter_shard_map(
        mesh=_mesh(8, AxisType.Auto),
        in_specs=(P(), P(), P(AX), P(AX)),
        out_specs=P(),
    )
    def step(model, state, x, y):
        grads = eqx.filter_grad(_full_loss)(model, x, y)  # invariant: raises
        updates, state = optimiser.update(grads, state, model)
        return eqx.apply_updates(model, updates), state

    with pytest.raises(eqpar.ReplicationError, match="pmean_updates got gradient"):
        step(model, state, x, y)

    # Per-device gradients (filter_vmap) are averaged, as grad_mean does.
    @eqpar.filter_vmap(in_axes=(None, None, 0, 0), axis_name=AX)
    def per_device(model, state, x, y):
        grads = eqx.filter_grad(_full_loss)(model, x, y)
        return optimiser.update(grads, state, model)[0]

    updates = per_device(model, state, *_split(8, x, y))
    ref = jax.tree.map(lambda g: -0.1 * g, eqx.filter_grad(_full_loss)(model, x, y))
    for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(ref)):
        np.testing.assert_allclose(a[0], b, **TOL)


# ------------------------------------------------------------- the one-call helper


@ft.cache
def _masked_step(devices):
    @eqpar.filter_shard_map(
        mesh=_mesh(devices, AxisType.Explicit),
        in_specs=(P(), P(AX), P(AX), P(AX)),
        out_specs=P(),
    )
    def step(model, x, y, mask):
        return eqpar.filter_value_and_grad_mean(masked_mean_loss, AX)(
            model, x, y, mask, count=jnp.sum(mask)
        )

    return step


@given(
    real=st.lists(st.booleans(), min_size=40, max_size=40).filter(any),
    devices=st.sampled_from([1, 2, 4, 8]),
)
def test_value_and_grad_mean_count_on_any_padding(real, devices):
    """Real examples anywhere in the batch, uneven per device (some devices maybe
    with none, whose loss is NaN): the single-device mean over the real examples."""
    model, _, _, _ = _data()
    x = jnp.linspace(-2.0, 2.0, 3 * 40).reshape(40, 3)
    y = jnp.stack([jnp.sin(x[:, 0]), x[:, 1] * x[:, 2]], axis=1)
    mask = jnp.array(real)
    value, grads = _masked_step(devices)(model, x, y, mask)
    ref_value, ref_grads = eqpar.filter_jit(
        eqx.filter_value_and_grad(masked_mean_loss)
    )(model, x, y, mask)
    np.testing.assert_allclose(value, ref_value, **TOL)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(a, b, **TOL)


def test_filter_grad_mean_with_aux_and_a_two_axis_mesh():
    """Averaging over both axes of a 2-D mesh; aux stays per device."""
    model, x, y, _ = _data()
    mesh = jax.make_mesh((2, 4), ("a", "b"), axis_types=(AxisType.Auto,) * 2)

    def loss(model, x, y):
        return _full_loss(model, x, y), x.shape[0]

    @eqpar.filter_shard_map(
        mesh=mesh, in_specs=(P(), P(("a", "b")), P(("a", "b"))), out_specs=P()
    )
    def step(model, x, y):
        grads, per_device = eqpar.filter_grad_mean(loss, ("a", "b"), has_aux=True)(
            model, x, y
        )
        assert per_device == BATCH // 8
        return grads

    ref = eqx.filter_grad(_full_loss)(model, x, y)
    for a, b in zip(jax.tree.leaves(step(model, x, y)), jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, b, **TOL)


def test_value_and_grad_mean_binds_as_a_method():
    class Regressor(eqx.Module):
        w: jax.Array

        def loss(self, x):
            return jnp.mean((x @ self.w) ** 2)

        value_and_grad = eqpar.filter_value_and_grad_mean(loss, "i")

    model, x = Regressor(jnp.array([1.0, -2.0])), jnp.arange(16.0).reshape(4, 2, 2)
    value, grads = eqpar.filter_vmap(
        lambda m, x: m.value_and_grad(x), in_axes=(None, 0), axis_name="i"
    )(model, x)
    ref_value, ref_grads = eqx.filter_value_and_grad(Regressor.loss)(
        model, x.reshape(8, 2)
    )
    np.testing.assert_allclose(value, jnp.broadcast_to(ref_value, (4,)), **TOL)
    np.testing.assert_allclose(grads.w, jnp.broadcast_to(ref_grads.w, (4, 2)), **TOL)


def test_value_and_grad_mean_bad_input():
    model, x, y, mask = _data()
    with pytest.raises(eqpar.UnboundAxisError, match="'d'"):
        eqpar.filter_value_and_grad_mean(mean_loss, AX)(model, x, y, mask)

    def bad_count(model, x, y, mask):
        return eqpar.filter_value_and_grad_mean(mean_loss, AX)(
            model, x, y, mask, count=mask
        )

    with pytest.raises(eqpar.SpecError, match="count of shape.*jnp.sum"):
        eqpar.filter_vmap(bad_count, in_axes=(None, 0, 0, 0), axis_name=AX)(
            model, *_split(8, x, y, mask)
        )
