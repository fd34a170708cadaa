"""Per-example random keys: one key per example, by its index in the whole batch.

`filter_vmap(in_axes=eqpar.split_key)`, chunked maps and `Parallel` all give example
`i` the key `fold_in(key, i)`, so what it draws does not depend on how the batch is
chunked or split over devices.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._specs import is_array


def is_scalar_key(leaf: Any) -> bool:
    """A scalar typed PRNG key (`jax.random.key(seed)`)."""
    return (
        is_array(leaf)
        and np.ndim(leaf) == 0
        and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key)
    )


def is_legacy_key(leaf: Any) -> bool:
    return is_array(leaf) and np.shape(leaf) == (2,) and leaf.dtype == np.uint32


def per_example_keys(key: Any, size: int) -> Any:
    """`fold_in(key, i)` for `i in range(size)`: one key per example, by its index in
    the whole batch, so that example `i` draws the same numbers however the batch
    is chunked or split over devices (the rule `eqpar.Parallel` follows too)."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(size))


class _SplitKey:
    """An `in_axes` spec for [`eqpar.filter_vmap`][] (and `filter_pmap`) that maps
    random keys: a scalar typed key (`jax.random.key(seed)`) becomes one key per
    example, `jax.random.fold_in(key, i)` for example `i`; every other array maps
    axis 0, like the default `eqx.if_array(0)`.

    Use it as the whole spec (`in_axes=eqpar.split_key`) or for one argument
    (`in_axes=(eqpar.split_key, None)`). Example `i` draws the same numbers
    whatever `chunk_size` is, and the same as under [`eqpar.Parallel`][], which
    applies this rule to a mapped key on any number of devices. (Flax NNX's
    `split_rngs`, made invariant to chunking and devices.) Legacy `uint32[2]` keys
    are refused with advice: only typed keys are split.

    !!! example

        ```python
        import jax, jax.numpy as jnp, eqpar

        def noisy(key, x):
            return x + jax.random.normal(key, x.shape)

        key, x = jax.random.key(0), jnp.zeros((10, 3))
        a = eqpar.filter_vmap(noisy, in_axes=eqpar.split_key)(key, x)
        b = eqpar.filter_vmap(noisy, in_axes=eqpar.split_key, chunk_size=3)(key, x)
        assert jnp.array_equal(a, b)                      # chunking changes nothing
        assert jnp.array_equal(a[4], noisy(jax.random.fold_in(key, 4), x[4]))
        ```
    """

    def __call__(self, leaf: Any) -> Any:
        if is_scalar_key(leaf):
            return SPLIT
        if is_legacy_key(leaf):
            return LEGACY
        return 0 if is_array(leaf) else None

    def __repr__(self) -> str:
        return "eqpar.split_key"


class _Split:
    def __repr__(self) -> str:
        return "SPLIT"


SPLIT: Any = _Split()
LEGACY: Any = _Split()  # a uint32[2] array under `split_key`: refused by name
split_key = _SplitKey()
