"""Replication types: which manual mesh axes a value varies over (JAX's `check_vma`).

Under `shard_map` with `check_vma=True`, every value carries the set of mesh axes it
may differ over between devices; an invariant value is the same on every device.
eqpar's collectives, gradients, chunked maps and output checks all ask the same
questions of it; this is their one home.
"""

from collections.abc import Callable, Hashable
from typing import Any

import jax
from jax.sharding import PartitionSpec as P

from ._errors import ReplicationError
from ._specs import spec_axes


AxisName = Hashable | tuple[Hashable, ...]


def axis_names(axis_name: AxisName) -> tuple[Hashable, ...]:
    """`axis_name` as a tuple of names."""
    return tuple(axis_name) if isinstance(axis_name, tuple) else (axis_name,)


def manual_axes(axis_name: AxisName) -> tuple[Hashable, ...]:
    """The names among `axis_name` that are manual `shard_map` axes here."""
    manual = jax.sharding.get_abstract_mesh().manual_axes
    return tuple(n for n in axis_names(axis_name) if n in manual)


def typed(axes: tuple[Hashable, ...]) -> bool:
    """Whether replication typing is on for these manual axes (`check_vma=True`).

    `axis_index` always varies over its axis when typing is on, and never carries a
    type when it is off: a probe that needs nothing private.
    """
    if not axes:
        return False
    varying = jax.typeof(jax.lax.axis_index(axes[0])).manual_axis_type.varying
    return axes[0] in varying


def varying_axes(x: Any) -> frozenset[Hashable]:
    """The manual mesh axes over which `x` may differ between devices (its VMA type).

    Empty for values that carry no type: outside `shard_map`, under `vmap`, or with
    `check_vma=False`. `x` may also be a `jax.ShapeDtypeStruct` from
    `jax.eval_shape`, which carries the type it was traced with.

    !!! example

        ```python
        import jax, jax.numpy as jnp, eqpar
        from jax.sharding import PartitionSpec as P

        mesh = jax.make_mesh((2, jax.device_count() // 2), ("data", "model"))

        @eqpar.filter_shard_map(mesh=mesh, in_specs=(P("data"), P()), out_specs=P())
        def types(x, w):
            return eqpar.varying_axes(x), eqpar.varying_axes(w)

        x_type, w_type = types(jnp.ones((4, 3)), jnp.ones(3))
        assert x_type == frozenset({"data"}) and w_type == frozenset()
        ```
    """
    if isinstance(x, jax.ShapeDtypeStruct):
        return frozenset(x.manual_axis_type.varying)
    return jax.typeof(x).manual_axis_type.varying


def to_varying(x: Any, axes: tuple[Hashable, ...]) -> Any:
    """`x` cast to vary over `axes` (no-op for the axes it already varies over)."""
    missing = tuple(a for a in axes if a not in varying_axes(x))
    return jax.lax.pcast(x, missing, to="varying") if missing else x


def check_replicated(leaf: Any, spec: P, where: Callable[[], str], what: str) -> None:
    """Raises `ReplicationError` for an output spec that claims replication over a
    mesh axis the output varies over (`check_vma=True`)."""
    missing = sorted(
        (a for a in varying_axes(leaf) if a not in spec_axes(spec)), key=str
    )
    if missing:
        name = missing[0]
        raise ReplicationError(
            f"{what} gives {spec} for {where()}, which says it is the same on every "
            f"device along mesh axes {missing}, but it varies over them (its "
            "replication type, `check_vma=True`). Reduce it first (e.g. "
            f"`eqpar.pmean(x, {name!r})` or `eqpar.psum(x, {name!r})`), return every "
            f"device's block with a sharded spec such as `P({name!r})`, or pass "
            "`check_vma=False` to take the first device's value unchecked."
        )


def vmap_axis_error(subject: str) -> ReplicationError:
    """The error for a collective over a vmap axis in a `check_vma=True` shard_map;
    `subject` names the collective and its axis."""
    return ReplicationError(
        f"{subject} is bound by `filter_vmap(axis_name=...)` (or `jax.vmap`) inside "
        "`filter_shard_map` or `Parallel` with replication checking on "
        "(`check_vma=True`), whose typing knows only mesh axes: JAX "
        f"{jax.__version__} cannot reduce over a vmap axis there. Pass "
        "`check_vma=False` to the enclosing `filter_shard_map` / `Parallel` (values "
        "are then per device, as under `filter_pmap`; average gradients with "
        "`eqpar.filter_value_and_grad_mean`), or reduce over the vmap axis without a "
        "collective (e.g. `jnp.mean` of the `filter_vmap` output)."
    )
