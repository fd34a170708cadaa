from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float


def assert_tree_allclose(a, b, *, rtol=1e-5, atol=1e-6):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb, f"structures differ:\n{ta}\n{tb}"
    for x, y in zip(la, lb):
        if eqx.is_array(x):
            np.testing.assert_allclose(
                np.asarray(x), np.asarray(y), rtol=rtol, atol=atol
            )
        else:
            assert x == y


class TraceCounter:
    """Wraps a function and counts how often it is traced (i.e. run in Python)."""

    def __init__(self, fn):
        self.fn = fn
        self.count = 0

    def __call__(self, *args, **kwargs):
        self.count += 1
        return self.fn(*args, **kwargs)


class Mixed(eqx.Module):
    """A Module with arrays, a static activation, a static string and a plain int."""

    weight: Float[Array, "out inp"]
    bias: Float[Array, " out"]
    activation: Callable = eqx.field(static=True)
    name: str = eqx.field(static=True)
    power: int = 1
    extra: None = None

    def __call__(self, x: Float[Array, " inp"]) -> Float[Array, " out"]:
        return self.activation(self.weight @ x + self.bias) ** self.power

    def scaled(self, x, *, scale):
        return self(x) * scale


def make_mixed(key, inp=3, out=4, power=2, activation=jnp.tanh):
    k1, k2 = jax.random.split(key)
    return Mixed(
        jax.random.normal(k1, (out, inp)),
        jax.random.normal(k2, (out,)),
        activation,
        "mixed",
        power,
    )
