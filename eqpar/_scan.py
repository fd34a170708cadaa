"""`filter_scan`: `jax.lax.scan` over pytrees with non-array leaves, whose carry may
become per-device inside `filter_shard_map(check_vma=True)` without a cast.

Under replication typing a scan's carry must have the same type going in and out.
A carry that starts the same on every device (zeros) and picks up per-device values
in the body (a device's block of the data, its shard of a layer) fails JAX's check
("carry input and carry output must have equal types"); JAX's documentation asks for
a hand-written `jax.lax.pcast(..., to="varying")` of the initial carry. Here the
initial carry is cast to vary over every mesh axis that the body's output carry
varies over (found by tracing the body abstractly once), and the body's output carry
over any axes the input carry varies over and the output does not: the types agree
whatever the body does, and nothing changes outside `shard_map` or with
`check_vma=False`.
"""

from collections.abc import Callable, Hashable
from typing import Any, TypeVar

import equinox as eqx
import jax
import jax.tree_util as jtu
from jaxtyping import PyTree

from ._errors import SpecError
from ._specs import StaticCarrier
from ._vma import to_varying, typed, varying_axes


Carry = TypeVar("Carry")


def filter_scan(
    f: Callable[[Carry, Any], tuple[Carry, Any]],
    init: Carry,
    xs: PyTree = None,
    length: int | None = None,
    *,
    reverse: bool = False,
    unroll: int | bool = 1,
) -> tuple[Carry, PyTree]:
    """`jax.lax.scan` for any pytrees, whose carry may become per-device inside
    [`eqpar.filter_shard_map`][] with replication checking (`check_vma=True`).

    **Arguments:**

    - `f`: `(carry, x) -> (carry, y)`, as for `jax.lax.scan`. The carry's non-array
        leaves (Python numbers, functions, strings) are static: `f` must return
        them unchanged.
    - `init`: the initial carry, any pytree.
    - `xs`: a pytree whose array leaves are scanned along their leading axis;
        non-array leaves are passed to every step as they are.
    - `length`, `reverse`, `unroll`: as for `jax.lax.scan`.

    **Returns:**

    `(carry, ys)`: the final carry and the outputs `y` of every step stacked along a
    leading axis (array leaves; a non-array leaf of `y` comes back once, as it is).

    Inside `filter_shard_map(check_vma=True)` the carry is cast to vary over every
    mesh axis the body makes it vary over (e.g. it starts as zeros, the same on
    every device, and picks up a device's block of the data): the
    `jax.lax.pcast(..., to="varying")` that JAX's own `scan` asks for is not needed.
    Outside `shard_map` this is `jax.lax.scan`.

    !!! example

        ```python
        import jax, jax.numpy as jnp, numpy as np, eqpar
        from jax.sharding import PartitionSpec as P

        mesh = jax.make_mesh((8,), ("data",))

        def cumsum(x):  # a device's block; the carry starts the same everywhere
            def step(c, v):
                return c + v, c + v
            return eqpar.filter_scan(step, jnp.zeros(()), x)[1]

        f = eqpar.filter_shard_map(
            cumsum, mesh=mesh, in_specs=P("data"), out_specs=P("data")
        )
        out = np.asarray(f(jnp.arange(16.0)))
        assert out[1] == 1.0 and out[3] == 5.0  # a running sum per block of 2
        ```
    """
    carry_dyn, carry_static = eqx.partition(init, eqx.is_array)
    xs_dyn, xs_static = eqx.partition(xs, eqx.is_array)
    ys = StaticCarrier()

    def body(c_dyn: Any, x_dyn: Any) -> tuple[Any, Any]:
        carry = eqx.combine(c_dyn, carry_static)
        new, y = f(carry, eqx.combine(x_dyn, xs_static))
        new_dyn, new_static = eqx.partition(new, eqx.is_array)
        _check_static(new_static, carry_static, new_dyn, c_dyn)
        return new_dyn, ys.split(y)

    carry_dyn = typed_carry(body, carry_dyn, xs_dyn)
    out_dyn, ys_dyn = scan_typed(
        body, carry_dyn, xs_dyn, length=length, reverse=reverse, unroll=unroll
    )
    return eqx.combine(out_dyn, carry_static), ys.merge(ys_dyn)


def _check_static(new: Any, old: Any, new_dyn: Any, old_dyn: Any) -> None:
    if jtu.tree_structure(new_dyn) != jtu.tree_structure(old_dyn) or not eqx.tree_equal(
        new, old
    ):
        raise SpecError(
            "filter_scan: the body returned a carry whose structure or non-array "
            "leaves differ from the initial carry's "
            f"({jtu.tree_structure(eqx.combine(new_dyn, new))} against "
            f"{jtu.tree_structure(eqx.combine(old_dyn, old))}). Return a carry of "
            "the same structure, with the same non-array leaves (they are static); "
            "a value that changes from step to step must be an array."
        )


# ----------------------------------------------------------------------------------
# Replication types of a carry


def _typed_axes() -> tuple[Hashable, ...]:
    """The manual mesh axes here, when they carry replication types
    (`check_vma=True`); `()` otherwise."""
    manual = tuple(jax.sharding.get_abstract_mesh().manual_axes)
    return manual if typed(manual) else ()


def typed_carry(
    body: Callable[[Any, Any], tuple[Any, Any]], carry: Any, xs: Any
) -> Any:
    """`carry` (arrays only) cast to vary over every mesh axis that `body`'s output
    carry varies over, given that its input does: the least such type, found by
    tracing `body` abstractly (`jax.eval_shape`), again only if a cast widened it.
    Outside `shard_map` with replication typing: `carry` as it is."""
    leaves = jtu.tree_leaves(carry)
    if not _typed_axes() or not leaves:
        return carry
    x0 = jax.tree.map(lambda x: x[0], xs)
    axes = frozenset().union(*map(varying_axes, leaves))
    while True:
        cast = _cast(carry, axes)
        out, _ = jax.eval_shape(body, cast, x0)
        wider = axes.union(*map(varying_axes, jtu.tree_leaves(out)))
        if wider == axes:
            return cast
        axes = wider


def _cast(carry: Any, axes: frozenset[Hashable]) -> Any:
    ordered = tuple(sorted(axes, key=str))
    return jax.tree.map(lambda c: to_varying(c, ordered), carry)


def scan_typed(
    body: Callable[[Any, Any], tuple[Any, Any]],
    carry: Any,
    xs: Any,
    **scan_kwargs: Any,
) -> tuple[Any, Any]:
    """`jax.lax.scan(body, carry, xs)`, with `body`'s output carry cast to vary over
    whatever axes the input carry varies over (the initial carry having been cast by
    `typed_carry`), so that their types agree."""
    if not _typed_axes():
        return jax.lax.scan(body, carry, xs, **scan_kwargs)

    def cast_body(c: Any, x: Any) -> tuple[Any, Any]:
        new, y = body(c, x)
        new = jax.tree.map(
            lambda n, old: to_varying(n, tuple(sorted(varying_axes(old), key=str))),
            new,
            c,
        )
        return new, y

    return jax.lax.scan(cast_body, carry, xs, **scan_kwargs)
