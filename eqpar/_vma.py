"""Replication types: which manual mesh axes a value varies over (JAX's `check_vma`).

Under `shard_map` with `check_vma=True`, every value carries the set of mesh axes it
may differ over between devices; an invariant value is the same on every device.
eqpar's collectives, gradients, chunked maps and output checks all ask the same
questions of it; this is their one home.
"""

from collections.abc import Callable, Hashable
from typing import Any

import jax
from jax.extend.core import jaxprs_in_params, Literal
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


# ----------------------------------------------------------------------------------
# Replication read from a traced program (`check_vma=False`)

_SAME_AFTER = frozenset({"psum", "pmax", "pmin", "all_gather", "psum_invariant"})
"""Collectives whose result over an axis is the same on every device of it."""
_IDENTITY = frozenset({"pvary", "pcast"})
"""Primitives that name an axis but leave values as they are (casts of the type)."""
_CALLS = frozenset(
    {
        "pjit",
        "jit",
        "closed_call",
        "core_call",
        "remat",
        "checkpoint",
        "custom_jvp_call",
        "custom_vjp_call",
    }
)
"""Primitives that call one inner program once, inputs to inputs and outputs to
outputs: their outputs are read from that program."""
_OWN_STATE = frozenset({"rng_uniform", "io_callback"})
"""Primitives whose outputs may differ between devices for the same inputs (a
stateful generator, a host callback with effects)."""


def same_on_every_device(
    jaxpr: Any, same_in: list[bool], axis_name: Hashable
) -> list[bool]:
    """For each output of `jaxpr` (traced inside a per-device program without
    replication typing), whether it is certainly the same on every device along
    `axis_name`, given which inputs are (`same_in`).

    A value is the same everywhere when everything it is computed from is, or when
    it comes out of a collective that makes it so (`psum`, `pmax`, `pmin`,
    `all_gather` over the axis: every device gets the identical result).
    `axis_index`, `ppermute`, `all_to_all`, `psum_scatter` over the axis make it
    differ, and so do a stateful generator and a host `io_callback`. Loops,
    branches and anything else not known are read conservatively: their outputs
    differ if any input does, or if the axis is named (or such a primitive called)
    inside. "Not certain" is always a safe answer (the caller then treats the
    value as per device).
    """
    env: dict[Any, bool] = {}

    def read(v: Any) -> bool:
        return True if isinstance(v, Literal) else env.get(v, False)

    for v in jaxpr.constvars:
        env[v] = True
    for v, same in zip(jaxpr.invars, same_in):
        env[v] = same
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        if name in _OWN_STATE:
            outs = [False] * len(eqn.outvars)
        elif axis_name in _named_axes(eqn.params):
            if name in _SAME_AFTER:
                outs = [True] * len(eqn.outvars)
            elif name in _IDENTITY:
                outs = [all(ins)] * len(eqn.outvars)
            else:
                outs = [False] * len(eqn.outvars)
        else:
            inner = _inner_programs(eqn.params)
            if name in _CALLS and len(inner) == 1:
                sub = inner[0]
                if len(sub.invars) == len(ins) and len(sub.outvars) == len(eqn.outvars):
                    outs = same_on_every_device(sub, ins, axis_name)
                else:
                    outs = [all(ins) and not _unsure(sub, axis_name)] * len(eqn.outvars)
            else:
                same = all(ins) and not any(_unsure(s, axis_name) for s in inner)
                outs = [same] * len(eqn.outvars)
        for v, same in zip(eqn.outvars, outs):
            env[v] = same
    return [read(v) for v in jaxpr.outvars]


def names_axis(jaxpr: Any, axis_name: Hashable, local: frozenset = frozenset()) -> str:
    """The name of a primitive in `jaxpr` (or a program inside it) that names
    `axis_name`, other than those in `local`; `""` if none does."""
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name not in local and axis_name in _named_axes(eqn.params):
            return name
        for sub in _inner_programs(eqn.params):
            found = names_axis(sub, axis_name, local)
            if found:
                return found
    return ""


def _unsure(jaxpr: Any, axis_name: Hashable) -> bool:
    """Whether `jaxpr` (or a program inside it) names `axis_name` or calls a
    primitive of `_OWN_STATE`."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in _OWN_STATE or axis_name in _named_axes(eqn.params):
            return True
        if any(_unsure(sub, axis_name) for sub in _inner_programs(eqn.params)):
            return True
    return False


def _named_axes(params: dict) -> tuple[Any, ...]:
    found: tuple[Any, ...] = ()
    for key in ("axes", "axis_name"):
        axes = params.get(key)
        if axes is None:
            continue
        found += tuple(axes) if isinstance(axes, (tuple, list)) else (axes,)
    return found


def _inner_programs(params: dict) -> list[Any]:
    """The jaxprs among an equation's parameters (open, not closed)."""
    return list(jaxprs_in_params(params))
