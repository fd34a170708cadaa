"""Bad input gets a clear eqpar error, one test per case."""

import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

import eqpar


def test_mapped_sizes_disagree_names_argument_path_and_sizes():
    f = eqpar.filter_vmap(lambda params, x: params["w"] * x)
    with pytest.raises(eqpar.AxisSizeError) as info:
        f({"w": jnp.ones((3, 2))}, jnp.ones((5, 2)))
    msg = str(info.value)
    assert "argument `params` at ['w']" in msg and "argument `x`" in msg
    assert "size 3" in msg and "size 5" in msg and "[3, 5]" in msg


def test_mapped_sizes_disagree_under_pmap():
    f = eqpar.filter_pmap(lambda a, b: a + b)
    with pytest.raises(eqpar.AxisSizeError, match="argument `b`.*size 3"):
        f(jnp.ones(2), jnp.ones(3))


def test_pmap_axis_larger_than_device_count():
    with pytest.raises(eqpar.AxisSizeError, match="size 9.*only 8 devices"):
        eqpar.filter_pmap(lambda x: x)(jnp.ones(9))


def test_batch_that_does_not_divide_the_mesh_axis(mesh8):
    f = eqpar.filter_shard_map(
        lambda x: x, mesh=mesh8, in_specs=P("data"), out_specs=P("data")
    )
    with pytest.raises(eqpar.AxisSizeError) as info:
        f(jnp.ones((37, 2)))
    msg = str(info.value)
    assert "size 37" in msg and "8 devices" in msg and "argument `x`" in msg
    assert "pad_batch" in msg and "Parallel" in msg


def test_spec_naming_an_axis_the_mesh_lacks(mesh8):
    f = eqpar.filter_shard_map(
        lambda x: x, mesh=mesh8, in_specs=P("batch"), out_specs=P()
    )
    with pytest.raises(eqpar.MeshError, match=r"\['batch'\].*its axes are \('data',\)"):
        f(jnp.ones(8))


def test_out_spec_naming_an_axis_the_mesh_lacks(mesh8):
    f = eqpar.filter_shard_map(
        lambda x: x, mesh=mesh8, in_specs=P("data"), out_specs=P("model")
    )
    with pytest.raises(eqpar.MeshError, match="output.*'model'"):
        f(jnp.ones(8))


def test_no_mesh_and_no_context_mesh():
    f = eqpar.filter_shard_map(lambda x: x, in_specs=P("data"), out_specs=P("data"))
    with pytest.raises(eqpar.MeshError, match="mesh=None.*jax.set_mesh"):
        f(jnp.ones(8))


def test_spec_tree_that_does_not_match_the_argument():
    f = eqpar.filter_vmap(lambda t: t["a"], in_axes=({"a": 0, "zzz": None},))
    with pytest.raises(eqpar.SpecError, match="argument `t`.*not a pytree prefix"):
        f({"a": jnp.ones(3), "b": jnp.ones(3)})


def test_spec_tuple_of_wrong_length(mesh8):
    f = eqpar.filter_shard_map(
        lambda x, y: x, mesh=mesh8, in_specs=(P("data"),), out_specs=P()
    )
    with pytest.raises(eqpar.SpecError, match="1 entries.*2 positional"):
        f(jnp.ones(8), jnp.ones(8))


def test_spec_longer_than_rank(mesh8):
    f = eqpar.filter_shard_map(
        lambda x: x, mesh=mesh8, in_specs=P(None, "data"), out_specs=P()
    )
    with pytest.raises(eqpar.SpecError, match="longer than the array's rank"):
        f(jnp.ones(8))


def test_mapped_axis_out_of_range():
    with pytest.raises(eqpar.SpecError, match="axis 2 of argument `x`.*rank 1"):
        eqpar.filter_vmap(lambda x: x, in_axes=2)(jnp.ones(3))


def test_unknown_parameter_name_in_dict_spec():
    with pytest.raises(eqpar.SpecError, match=r"\['y'\].*parameters are \['x'\]"):
        eqpar.filter_vmap(lambda x: x, in_axes=dict(y=0))(jnp.ones(3))


def test_keyword_argument_without_a_spec(mesh8):
    f = eqpar.filter_shard_map(
        lambda x, *, w: x * w, mesh=mesh8, in_specs=(P("data"),), out_specs=P("data")
    )
    with pytest.raises(eqpar.SpecError, match="`w` has no spec.*dict"):
        f(jnp.ones(8), w=jnp.ones(8))


def test_nothing_mapped_and_no_axis_size():
    with pytest.raises(eqpar.SpecError, match="axis_size"):
        eqpar.filter_vmap(lambda x: x, in_axes=None)(jnp.ones(3))


def test_wrong_spec_kind_for_shard_map(mesh8):
    f = eqpar.filter_shard_map(
        lambda x: x, mesh=mesh8, in_specs=lambda leaf: 0, out_specs=P()
    )
    with pytest.raises(
        eqpar.SpecError, match="resolved to 0 for argument `x`.*PartitionSpec"
    ):
        f(jnp.ones(8))


def test_errors_are_value_errors_too():
    assert issubclass(eqpar.SpecError, ValueError)
    assert issubclass(eqpar.UnboundAxisError, NameError)
    assert issubclass(eqpar.AxisSizeError, eqpar.EqparError)


def test_pmap_under_a_different_context_mesh():
    import jax

    with jax.set_mesh(jax.make_mesh((8,), ("data",))):
        with pytest.raises(eqpar.MeshError, match="context mesh.*set_mesh"):
            eqpar.filter_pmap(lambda x: x)(jnp.ones(4))
