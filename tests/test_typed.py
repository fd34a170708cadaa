"""jaxtyping-annotated user functions inside every eqpar transform: dimensions are
checked against what the function sees (one example under vmap/pmap, one shard
under shard_map/Parallel), and a wrong shape names the parameter."""

import jax.numpy as jnp
import pytest
from beartype import beartype
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float, jaxtyped, TypeCheckError

import eqpar


@jaxtyped(typechecker=beartype)
def camera(
    planes: Float[Array, "planes h w"], gain: Float[Array, ""]
) -> Float[Array, "h w"]:
    return gain * planes.sum(axis=0)


@jaxtyped(typechecker=beartype)
def per_example(image: Float[Array, "h w"]) -> Float[Array, " h"]:
    return image.mean(axis=1)


GAIN = jnp.array(2.0)


def test_vmap_sees_one_example():
    batch = jnp.ones((5, 3, 4, 6))  # 5 examples of (planes=3, h=4, w=6)
    out = eqpar.filter_vmap(camera, in_axes=(0, None))(batch, GAIN)
    assert out.shape == (5, 4, 6)


def test_pmap_sees_one_element():
    out = eqpar.filter_pmap(camera, in_axes=(0, None))(jnp.ones((8, 3, 4, 6)), GAIN)
    assert out.shape == (8, 4, 6)


def test_shard_map_sees_one_shard(mesh8):
    planes = jnp.ones((32, 4, 6))  # each device: planes=4

    def device_image(p, g):
        return eqpar.psum(camera(p, g), "data")

    out = eqpar.filter_shard_map(
        device_image, mesh=mesh8, in_specs=(P("data"), P()), out_specs=P()
    )(planes, GAIN)
    assert out.shape == (4, 6)
    assert (out == 2.0 * 32).all()


def test_parallel_sees_one_shard():
    images = jnp.ones((16, 4, 6))
    out = eqpar.Parallel(eqpar.filter_vmap(per_example))(images)
    assert out.shape == (16, 4)


def test_wrong_shape_names_the_parameter_under_vmap():
    with pytest.raises(TypeCheckError, match="planes"):
        # mapped over axis 0, each example is (4, 6): rank 2, not "planes h w"
        eqpar.filter_vmap(camera, in_axes=(0, None))(jnp.ones((5, 4, 6)), GAIN)


def test_wrong_shape_names_the_parameter_under_shard_map(mesh8):
    f = eqpar.filter_shard_map(
        lambda im: per_example(im), mesh=mesh8, in_specs=P("data"), out_specs=P("data")
    )
    with pytest.raises(TypeCheckError, match="image"):
        f(jnp.ones((16, 4, 6)))  # each shard is (2, 4, 6): rank 3, not "h w"


def test_return_shape_is_checked_too():
    @jaxtyped(typechecker=beartype)
    def wrong(x: Float[Array, " n"]) -> Float[Array, " n"]:
        return jnp.concatenate([x, x])

    with pytest.raises(TypeCheckError):
        eqpar.filter_vmap(wrong)(jnp.ones((3, 2)))
