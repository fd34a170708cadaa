"""Stateful layers across devices (`eqx.nn.State`, `eqx.nn.BatchNorm`): one route per
transform, each equal to one device computing the batch statistics of the whole
batch (docs/concepts.md, "Stateful layers across devices")."""

import equinox as eqx
import jax
import pytest
from jax.sharding import PartitionSpec as P

import eqpar

from .helpers import assert_tree_allclose


N_DEV, PER_DEV, FEATURES = 8, 4, 3


def _model_and_state():
    return eqx.nn.make_with_state(eqx.nn.BatchNorm)(
        FEATURES, axis_name=("devices", "batch"), momentum=0.5, mode="batch"
    )


def _batch(getkey):
    return jax.random.normal(getkey(), (N_DEV * PER_DEV, FEATURES)) * 3.0 + 1.0


def _reference(x):
    """One device: the whole batch is one vmap axis."""
    bn, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(
        FEATURES, axis_name="batch", momentum=0.5, mode="batch"
    )
    return eqpar.filter_vmap(
        bn, in_axes=(0, None), out_axes=(0, None), axis_name="batch"
    )(x, state)


def _per_device(bn, x, state):
    """The per-device body: BatchNorm over this device's examples ("batch") and,
    through its axis_name, over the devices ("devices")."""
    return eqpar.filter_vmap(
        bn, in_axes=(0, None), out_axes=(0, None), axis_name="batch"
    )(x, state)


def _state_arrays(state):
    return jax.tree.leaves(state)


def _check(out, x):
    y, state = out
    ref_y, ref_state = _reference(x)
    assert_tree_allclose(y, ref_y, rtol=1e-5, atol=1e-5)
    assert_tree_allclose(_state_arrays(state), _state_arrays(ref_state), rtol=1e-5)


def test_batchnorm_under_filter_vmap(getkey):
    bn, state = _model_and_state()
    x = _batch(getkey)
    y, new = eqpar.filter_vmap(
        _per_device, in_axes=(None, 0, None), out_axes=(0, None), axis_name="devices"
    )(bn, x.reshape(N_DEV, PER_DEV, FEATURES), state)
    _check((y.reshape(x.shape), new), x)


def test_batchnorm_under_filter_pmap(getkey):
    bn, state = _model_and_state()
    x = _batch(getkey)
    y, new = eqpar.filter_pmap(
        _per_device, in_axes=(None, 0, None), out_axes=(0, None), axis_name="devices"
    )(bn, x.reshape(N_DEV, PER_DEV, FEATURES), state)
    _check((y.reshape(x.shape), new), x)


def test_batchnorm_under_filter_shard_map(getkey):
    bn, state = _model_and_state()
    x = _batch(getkey)
    mesh = jax.make_mesh((N_DEV,), ("devices",))
    f = eqpar.filter_shard_map(
        _per_device,
        mesh=mesh,
        in_specs=(P(), P("devices"), P()),
        out_specs=(P("devices"), P()),
        check_vma=False,  # BatchNorm's pmean is over a vmap axis too
    )
    _check(f(bn, x, state), x)


def test_batchnorm_under_parallel(getkey):
    bn, state = _model_and_state()
    x = _batch(getkey)
    # reduce=None: per-example outputs stacked per device, and the state, which
    # every device holds alike after BatchNorm's pmean, taken from the first.
    y, new = eqpar.Parallel(_per_device, reduce=None, check_vma=False)(bn, x, state)
    _check((y.reshape(x.shape), eqpar.unreplicate(new, "first")), x)


@pytest.mark.parametrize("who", ["Parallel", "filter_shard_map"])
def test_batchnorm_with_replication_checking_says_which_switch(who, getkey):
    bn, state = _model_and_state()
    x = _batch(getkey)
    if who == "Parallel":
        f = eqpar.Parallel(_per_device, reduce=None, check_vma=True)
    else:
        f = eqpar.filter_shard_map(
            _per_device,
            mesh=jax.make_mesh((N_DEV,), ("devices",)),
            in_specs=(P(), P("devices"), P()),
            out_specs=(P("devices"), P()),
        )
    with pytest.raises(eqpar.ReplicationError, match="BatchNorm.*check_vma=False"):
        f(bn, x, state)
